"""Tables (markdown, CSV) and the report page (markdown, HTML) from an :class:`Analysis`.

The page is built once as a list of blocks and written twice, so the markdown and the HTML can
never disagree.
"""

from __future__ import annotations

import csv
import html
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from metaopt.report.analysis import MEASURES, TAU_MAX, Analysis, Profile, Setting
from metaopt.report.runs import Sweep

DASH = "—"


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}g}"


def spread(stat: tuple[float, float, float] | None) -> str:
    if stat is None:
        return DASH
    med, lo, hi = stat
    return fmt(med) if lo == hi else f"{fmt(med)} [{fmt(lo)}–{fmt(hi)}]"


def to_target(s: Setting, measure: str) -> str:
    v = s.to_target(measure)
    return DASH if math.isinf(v) else fmt(v)


def _setting_name(s: Setting) -> str:
    """The swept hyperparameters; for a lone setting its lr, so the table still says what ran."""
    if s.setting:
        return s.setting
    lr = next(iter(s.runs + s.incomplete)).config.get("optimizer.lr")
    return f"lr={fmt(lr) if isinstance(lr, float) else lr}, untuned" if lr is not None else "untuned"


# Rows -----------------------------------------------------------------------------------------

MAIN_HEADERS = ["task", "optimizer", "chosen setting", "runs", "final val", "best val", "test",
                "steps to target", "time to target (s)", "passes to target", "reached", "diverged",
                "failed", "state B/param", "step time (ms)"]


def main_rows(a: Analysis) -> list[list[str]]:
    rows = []
    for s in sorted(a.chosen(), key=lambda s: (s.task, s.optimizer)):
        n_settings = len(a.for_method(s.task, s.optimizer))
        chosen = _setting_name(s) + (f" (best of {n_settings})" if n_settings > 1 else "")
        if s.edges:
            chosen += " — grid edge: " + ", ".join(f"{side} {key.rsplit('.', 1)[-1]}" for key, side in s.edges.items())
        runs = str(s.n_runs) + (f" (+{len(s.incomplete)} unfinished)" if s.incomplete else "")
        step_time = s.step_time()
        rows.append([s.task, s.optimizer, chosen, runs, spread(s.final()), spread(s.best()), spread(s.test()),
                     to_target(s, "steps"), to_target(s, "time"), to_target(s, "passes"),
                     f"{s.n_reached()}/{s.n_runs}", f"{s.count('diverged')}/{s.n_runs}", str(s.count("failed")),
                     fmt(s.state_bytes_per_param(), 3), fmt(None if step_time is None else 1e3 * step_time, 3)])
    return rows


def overview(a: Analysis) -> tuple[list[str], list[list[str]]]:
    """Optimizer × task: the chosen setting's median final metric, the best per task in bold, ✓ where
    the median seed reached the target, and failed/total runs where any run diverged or failed."""
    headers = ["optimizer", *a.tasks]
    chosen = {(c.task, c.optimizer): c for c in a.chosen()}
    finals = {key: c.final()[0] for key, c in chosen.items() if c.final() is not None}
    best = {task: min((a.targets[task].badness(v) for (t, _), v in finals.items() if t == task), default=math.inf)
            for task in a.tasks}
    rows = []
    for opt in a.optimizers:
        row = [opt]
        for task in a.tasks:
            if (task, opt) not in finals:
                row.append(DASH)
                continue
            s, value = chosen[(task, opt)], finals[(task, opt)]
            cell = fmt(value, 3)
            if math.isfinite(value) and a.targets[task].badness(value) == best[task]:
                cell = f"**{cell}**"
            if not math.isinf(s.to_target("steps")):
                cell += " ✓"
            bad = s.count("diverged") + s.count("failed")
            if bad:
                cell += f" ({bad}/{s.n_runs} failed)"
            row.append(cell)
        rows.append(row)
    return headers, rows


SETTING_HEADERS = ["task", "optimizer", "setting", "chosen", "runs", "seeds", "final val", "best val",
                   "steps to target", "reached", "diverged", "failed"]


def setting_rows(a: Analysis) -> list[list[str]]:
    return [[s.task, s.optimizer, _setting_name(s), "✓" if s.chosen else "", str(s.n_runs),
             ",".join(DASH if x is None else str(x) for x in s.seeds()), spread(s.final()), spread(s.best()),
             to_target(s, "steps"), f"{s.n_reached()}/{s.n_runs}", f"{s.count('diverged')}/{s.n_runs}",
             str(s.count("failed"))] for s in a.settings]


def task_rows(a: Analysis) -> list[list[str]]:
    rows = []
    for task in a.tasks:
        t = a.targets[task]
        settings = [s for s in a.settings if s.task == task]
        rows.append([task, f"{t.metric} ({'lower' if t.mode == 'min' else 'higher'} is better)", fmt(t.value),
                     t.source, str(sum(s.n_runs for s in settings)),
                     str(sum(len(s.incomplete) for s in settings))])
    return rows


def profile_rows(a: Analysis, profiles: dict[str, Profile]) -> list[list[str]]:
    rows = []
    for m in a.optimizers:
        row = [m]
        for measure in MEASURES:
            p = profiles[measure]
            row += [f"{p.score(m):.2f}", f"{p.rho(m, 1.0):.2f}"]
        rows.append(row)
    return rows


# CSV --------------------------------------------------------------------------------------------

def _num(v: Any) -> Any:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else "inf" if v == math.inf else "-inf" if v == -math.inf else repr(v)
    return "" if v is None else v


def _setting_record(a: Analysis, s: Setting) -> dict[str, Any]:
    t = a.targets[s.task]
    rec: dict[str, Any] = {"task": s.task, "optimizer": s.optimizer, "setting": s.setting, "chosen": int(s.chosen),
                           "metric": t.metric, "mode": t.mode, "target": t.value, "target_source": t.source,
                           "n_runs": s.n_runs, "n_completed": s.count("completed"),
                           "n_diverged": s.count("diverged"), "n_failed": s.count("failed"),
                           "n_unfinished": len(s.incomplete)}
    for name, stat in (("final", s.final()), ("best", s.best()), ("test", s.test())):
        rec.update(dict(zip((f"{name}_median", f"{name}_min", f"{name}_max"), stat or (None,) * 3)))
    for measure in MEASURES:
        rec[f"{measure}_to_target"] = s.to_target(measure)
    rec.update(n_reached=s.n_reached(), state_bytes_per_param=s.state_bytes_per_param(),
               step_time_mean=s.step_time())
    rec.update({f"param:{k}": v for k, v in s.params.items()})
    return rec


def write_csv(path: Path, records: list[dict[str, Any]]) -> Path:
    headers: list[str] = []
    for rec in records:
        headers += [k for k in rec if k not in headers]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=headers)
        w.writeheader()
        for rec in records:
            w.writerow({k: _num(v) for k, v in rec.items()})
    return path


def write_csvs(a: Analysis, sweep: Sweep, profiles: dict[str, Profile], out: Path) -> dict[str, Path]:
    table = [_setting_record(a, s) for s in sorted(a.chosen(), key=lambda s: (s.task, s.optimizer))]
    settings = [_setting_record(a, s) for s in a.settings]
    runs = []
    for s in a.settings:
        for r, n in zip(s.runs, s.numbers):
            runs.append({"task": s.task, "optimizer": s.optimizer, "setting": s.setting, "seed": r.seed,
                         "status": r.status, "final": n.final, "best": n.best, "test": n.test,
                         **{f"{m}_to_target": n.to_target[m] for m in MEASURES}, "error": r.error or "",
                         "dir": str(r.dir)})
        for r in s.incomplete:
            runs.append({"task": s.task, "optimizer": s.optimizer, "setting": s.setting, "seed": r.seed,
                         "status": r.status, "error": "; ".join(r.problems), "dir": str(r.dir)})
    prof = []
    for measure, p in profiles.items():
        for m, ratios in p.ratios.items():
            for task, ratio in zip(p.tasks, ratios):
                cost = next((s.to_target(measure) for s in a.chosen(task) if s.optimizer == m), math.inf)
                prof.append({"measure": measure, "task": task, "optimizer": m, "to_target": cost, "ratio": ratio})
    return {"table_csv": write_csv(out / "table.csv", table),
            "settings_csv": write_csv(out / "settings.csv", settings),
            "runs_csv": write_csv(out / "runs.csv", runs), "profile_csv": write_csv(out / "profile.csv", prof)}


# The page ---------------------------------------------------------------------------------------

def page_blocks(a: Analysis, sweep: Sweep, profiles: dict[str, Profile], figures: dict[str, Path],
                command: str | None) -> list[tuple]:
    runs = sweep.runs
    counts = {st: sum(r.status == st for r in runs) for st in ("completed", "diverged", "failed", "incomplete")}
    blocks: list[tuple] = [("h1", "Optimizer comparison")]
    blocks.append(("p", "Sweep(s): " + ", ".join(f"`{p}`" for p in sweep.roots) + ". "
                   + f"Made {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
                   + (f" by `{command}`." if command else ".")))
    blocks.append(("p", f"{len(runs)} run(s): {counts['completed']} completed, {counts['diverged']} diverged, "
                   f"{counts['failed']} failed, {counts['incomplete']} unfinished (not counted)."
                   + (" Jobs without a run directory: see the end of the page." if sweep.missing else "")))
    problems = counts["diverged"] + counts["failed"] + counts["incomplete"] + len(sweep.missing)
    if problems:
        blocks.append(("p", "**Note:** diverged and failed runs count as failures (worst value, target never "
                       "reached); they are listed at the end with unfinished runs."))
    blocks.append(("h2", "Tasks and targets"))
    blocks.append(("table", ["task", "metric", "target", "target from", "runs", "unfinished"], task_rows(a)))
    if any(a.targets[t].source == "auto" for t in a.tasks):
        blocks.append(("p", "`auto`: no target in `conf/report_targets.yaml` for this task; the target is the "
                       "best chosen setting's median final value loosened by `auto_slack`, so it only ranks "
                       "methods within this sweep."))
    blocks.append(("h2", "Overview"))
    blocks.append(("p", "Median final validation metric of each optimizer's chosen setting (lower is better for a "
                        "loss); **bold**: best on the task; ✓: the median seed reached the task's target; "
                        "(k/n failed): runs that diverged or failed, counted as the worst value."))
    blocks.append(("table", *overview(a)))
    blocks.append(("h2", "Results"))
    blocks.append(("p", "Per task × optimizer, the setting chosen on validation (best median final validation "
                   "metric; a failed run counts as the worst value). Values over seeds: median [min–max]. "
                   "Time is training time (evaluation excluded), read from each run's own clock: jobs that "
                   "shared the machine slowed each other, so time and step time are noisy (a cheap step can "
                   "read slower than a costly one); `python -m metaopt.bench steps` measures step cost "
                   "interleaved. Passes are forward + backward passes; steps and passes are exact. "
                   "— grid edge: the chosen value is the lowest or highest tried, so the best may lie beyond "
                   "the grid. "
                   "To target: median over seeds, a seed that never reached counting as ∞ (— = the median "
                   "did not reach); resolution is `trainer.eval_every`. `test` is the chosen setting's test "
                   "metric, never used for selection."))
    blocks.append(("table", MAIN_HEADERS, main_rows(a)))
    blocks.append(("p", "CSV: [table.csv](table.csv) (this table), [settings.csv](settings.csv) (every setting), "
                   "[runs.csv](runs.csv) (every run), [profile.csv](profile.csv)."))
    blocks.append(("h2", "Performance profiles"))
    blocks.append(("p", f"ρ(τ): fraction of tasks on which a method's time to target is within τ× of the best "
                   f"method's, in steps, training seconds and passes. Never reached or diverged = ∞. "
                   f"Score: ∫₁^{TAU_MAX:g} ρ(τ) dτ / {TAU_MAX - 1:g} (AlgoPerf); ρ(1): fraction of tasks where "
                   f"the method is fastest."))
    blocks.append(("img", figures["profile"].name, "performance profiles"))
    headers = ["optimizer"] + [h for m in MEASURES for h in (f"score ({m})", f"ρ(1) ({m})")]
    blocks.append(("table", headers, profile_rows(a, profiles)))
    absent = [(m, t) for t in a.tasks for m in a.optimizers if not any(s.optimizer == m for s in a.chosen(t))]
    if absent:
        blocks.append(("p", "Not run (counted as ∞ in the profile): "
                       + ", ".join(f"{m} on {t}" for m, t in absent) + "."))
    blocks.append(("h2", "Curves"))
    blocks.append(("p", "Chosen setting of each optimizer; median over seeds with a min–max band; × marks where a "
                   "seed diverged or failed (it counts as +∞ afterwards, so the median stops when half are gone). "
                   "Wall-clock curves on a shared machine are noisy; steps and passes are exact."))
    for m in MEASURES:
        blocks.append(("img", figures[f"loss_vs_{m}"].name, f"loss against {m}"))
    blocks.append(("h2", "Effective learning rate"))
    blocks.append(("p", "`opt/lr_eff` (or `opt/alpha`) where the optimizer reports one, else the scheduled `lr`; "
                   "the value at each logged step (not an average over the interval), median over seeds."))
    blocks.append(("img", figures["lr_eff"].name, "effective learning rate"))
    blocks.append(("h2", "All settings"))
    blocks.append(("table", SETTING_HEADERS, setting_rows(a)))
    bad = [r for r in runs if r.status in ("failed", "incomplete") or r.problems or r.status == "diverged"]
    if bad or sweep.missing or a.notes:
        blocks.append(("h2", "Failures, unfinished runs and notes"))
        items = []
        for r in sorted(bad, key=lambda r: str(r.dir)):
            why = r.error or (f"diverged at step {r.summary.get('diverged_at')}" if r.status == "diverged" else "")
            why = "; ".join(x for x in [why, *r.problems] if x)
            what = " ".join(x for x in (r.task, "/", r.optimizer, r.setting, f"seed {r.seed}") if x)
            items.append(f"`{r.dir}` ({what}): {r.status}"
                         + (f" — {why}" if why else ""))
        items += sweep.missing + a.notes
        blocks.append(("ul", items))
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind == "h1":
            out.append(f"# {rest[0]}")
        elif kind == "h2":
            out.append(f"## {rest[0]}")
        elif kind == "p":
            out.append(rest[0])
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in rest[0]))
        elif kind == "table":
            headers, rows = rest
            lines = ["| " + " | ".join(map(_md_cell, headers)) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    """The little markdown the page uses in prose: `code`, **bold** and [links](href)."""
    import re

    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)


def to_html(blocks: list[tuple]) -> str:
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{_inline_html(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(rest[0])}</p>")
        elif kind == "img":
            body.append(f'<p><img src="{html.escape(rest[0])}" alt="{html.escape(rest[1])}"></p>')
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in rest[0]) + "</ul>")
        elif kind == "table":
            headers, rows = rest
            head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
            cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%}code{background:#f3f3f3;padding:0 2px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>metaopt report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
