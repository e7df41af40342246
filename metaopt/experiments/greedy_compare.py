"""Greedy momentum against the fixed-momentum sweep: table and plots from finished sweeps.

``python -m metaopt.experiments.greedy_compare <sweep dir> [<sweep dir> ...] [--out DIR]``

Reads every run directory under the given sweeps (``experiment=greedy_mnist1d``, ``greedy_two_moons``,
``greedy_quadratic``: ``optimizer=greedy_sgd,greedy_adam`` × ``optimizer.fixed_momentum=null,β…`` ×
seeds) and, per task, optimizer family and learning rate, compares the greedy run (β solved online,
``fixed_momentum=null``) with the best fixed β (chosen per metric, after the fact) on these numbers,
each averaged over seeds:

- ``final``: the issue's "final loss", the metric the ≤ 5% claim is judged on. For a task with
  held-out data it is ``val``. For a tracking task (:data:`TRACKING_TASKS`: the noisy quadratic,
  whose training loss and validation metric are the same function of a random-walking centre) it
  is ``train_tail``: one final value of a random walk says little.
- ``val``: the final validation loss (the run's objective; a diverged run counts as ``inf``);
- ``best_val``: the lowest validation loss of the run;
- ``train_tail``: the mean training loss over the last ``--tail`` fraction of the steps.

``train_tail`` is reported for every task: on the classification tasks a large fixed β drives the
training loss far lower while the validation loss rises (it fits the training set), so the best β
by training loss and by validation loss differ and no single run can match both.

Greedy runs with GreedyAdam's ``energy_matched_lr=true`` or GreedySGD's ``lr_rule=energy`` (our
variants) are a second greedy variant, ``greedy+energy`` (GreedySGD's ``lr_rule=motion``:
``greedy+motion``), compared with the same fixed-β runs; fixed-β runs with one on are their own
variants (``β+energy``) and are not candidates for the best fixed β. Sweeps can be combined: pass the sweep of
the variant and the fixed-β sweep together.

Writes ``greedy_table.md``, ``greedy_results.json`` and ``greedy_momentum.png`` (the β chosen over
training, one line per seed, per task and family) into ``--out`` (default: the first sweep).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

FAMILIES = {"GreedySGD": "SGD+momentum", "GreedyAdam": "Adam"}
METRICS = ("final", "val", "best_val", "train_tail")
# Tasks without held-out data whose loss tracks a moving optimum: "final" is the mean tracking loss.
TRACKING_TASKS = frozenset({"NoisyQuadratic"})


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(run_dir: Path, tail: float) -> dict[str, Any] | None:
    """One run's identity and numbers, or None if it is not a greedy comparison run."""
    summary_path, config_path = run_dir / "summary.json", run_dir / ".hydra" / "config.yaml"
    if not (summary_path.exists() and config_path.exists()):
        return None
    cfg = yaml.safe_load(config_path.read_text())
    family = FAMILIES.get(str(cfg["optimizer"]["_target_"]).rsplit(".", 1)[-1])
    if family is None:
        return None
    summary = json.loads(summary_path.read_text())
    records = _read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    ok = summary.get("status") == "completed"
    steps = int(cfg["trainer"]["steps"])
    tail_losses = [r["train/loss"] for r in records if r["step"] > (1.0 - tail) * steps]
    fixed = cfg["optimizer"].get("fixed_momentum")
    rule = _lr_rule(cfg["optimizer"])
    if fixed is None:
        variant: Any = f"greedy+{rule}" if rule else "greedy"
    else:
        variant = f"{float(fixed):g}+{rule}" if rule else float(fixed)
    task = str(cfg["task"]["_target_"]).rsplit(".", 1)[-1]
    val = float(summary.get("objective", math.inf)) if ok else math.inf
    train_tail = statistics.fmean(tail_losses) if ok and tail_losses else math.inf
    return {
        "dir": str(run_dir),
        "task": task,
        "family": family,
        "lr": float(cfg["optimizer"]["lr"]),
        "variant": variant,
        "seed": int(cfg["seed"]),
        "status": summary.get("status"),
        "final": train_tail if task in TRACKING_TASKS else val,
        "val": val,
        "best_val": float(summary.get("best", {}).get("val/loss", math.inf)) if ok else math.inf,
        "train_tail": train_tail,
        "momentum": [(r["step"], r["opt/momentum"]) for r in records if "opt/momentum" in r],
    }


def collect(sweeps: Iterable[Path], tail: float) -> list[dict[str, Any]]:
    runs = []
    for sweep in sweeps:
        for summary in sorted(Path(sweep).rglob("summary.json")):
            run = load_run(summary.parent, tail)
            if run is not None:
                runs.append(run)
    return runs


GREEDY_VARIANTS = ("greedy", "greedy+energy", "greedy+motion")


def _lr_rule(optimizer: dict[str, Any]) -> str | None:
    """The learning-rate rule that sets a run apart from the plain optimizer: ``energy``
    (GreedyAdam's ``energy_matched_lr``, GreedySGD's ``lr_rule=energy``), ``motion``, or None."""
    if optimizer.get("energy_matched_lr", False):
        return "energy"
    rule = optimizer.get("lr_rule") or "fixed"
    return None if rule == "fixed" else str(rule)


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, family, lr) and greedy variant present (``greedy`` if none): the mean of each
    metric per variant, the best fixed β (plain fixed-β runs only), the gaps."""
    cells: dict[tuple, dict[Any, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cells[(run["task"], run["family"], run["lr"])][run["variant"]].append(run)
    out = []
    for (task, family, lr), variants in sorted(cells.items()):
        means = {v: {m: statistics.fmean(r[m] for r in rs) for m in METRICS}
                 | {f"{m}_sd": _sd([r[m] for r in rs]) for m in METRICS} | {"seeds": len(rs)}
                 for v, rs in variants.items()}
        fixed = {v: m for v, m in means.items() if isinstance(v, float)}
        present = [g for g in GREEDY_VARIANTS if g in means] or ["greedy"]
        for name in present:
            row: dict[str, Any] = {"task": task, "family": family, "lr": lr, "greedy_variant": name,
                                   "variants": means}
            g_means = means.get(name, {})
            for metric in METRICS:
                if not fixed:
                    continue
                best_beta = min(fixed, key=lambda v: fixed[v][metric])
                best = fixed[best_beta][metric]
                greedy = g_means.get(metric, math.nan)
                gap = greedy / best - 1.0 if best > 0 and math.isfinite(best) else math.nan
                row[metric] = {"best_fixed_momentum": best_beta, "best_fixed": best, "greedy": greedy,
                               "best_fixed_sd": fixed[best_beta][f"{metric}_sd"],
                               "greedy_sd": g_means.get(f"{metric}_sd", math.nan),
                               "gap": gap, "within_5pct": bool(gap <= 0.05)}
            out.append(row)
    return out


def _sd(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return math.inf
    return statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | family | lr | metric | greedy (± sd over seeds) | best fixed β: value (± sd) | gap "
             "| ≤ 5% | all fixed β: value | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for metric in METRICS:
            if metric not in row:
                continue
            c = row[metric]
            others = ", ".join(f"{v:g}: {m[metric]:.4g}" for v, m in sorted(
                ((v, m) for v, m in row["variants"].items() if isinstance(v, float)), key=lambda x: x[0]))
            variant = row.get("greedy_variant", "greedy")
            family = row["family"] if variant == "greedy" else f"{row['family']} ({variant})"
            lines.append(f"| {row['task']} | {family} | {row['lr']:g} | {metric} | "
                         f"{c['greedy']:.4g} ± {c['greedy_sd']:.2g} | "
                         f"{c['best_fixed_momentum']:g}: {c['best_fixed']:.4g} ± {c['best_fixed_sd']:.2g} | "
                         f"{100 * c['gap']:+.1f}% | "
                         f"{'yes' if c['within_5pct'] else 'no'} | {others} | "
                         f"{row['variants'].get(variant, {}).get('seeds', 0)} |")
    return "\n".join(lines) + "\n"


def plot_momentum(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    greedy = [r for r in runs if r["variant"] in GREEDY_VARIANTS and r["momentum"]]
    families = sorted({r["family"] for r in greedy})
    columns = sorted({r["task"] for r in greedy})
    if not greedy:
        return
    fig, axes = plt.subplots(len(families), len(columns), figsize=(3.6 * len(columns), 2.8 * len(families)),
                             squeeze=False)
    for i, family in enumerate(families):
        for j, task in enumerate(columns):
            ax = axes[i][j]
            cell = [r for r in greedy if (r["family"], r["task"]) == (family, task)]
            # One colour per (lr, variant): every seed thin, their median thick, one legend entry each
            # (a legend line per seed buries the axes once there are more than a few seeds).
            arms = sorted({(r["lr"], r["variant"]) for r in cell})
            for k, (lr, variant) in enumerate(arms):
                colour = f"C{k % 10}"
                seeds = [dict(r["momentum"]) for r in cell if (r["lr"], r["variant"]) == (lr, variant)]
                for betas in seeds:
                    ax.plot(list(betas), list(betas.values()), color=colour, lw=0.6, alpha=0.35)
                steps = sorted(set.intersection(*(set(b) for b in seeds)))
                tag = "" if variant == "greedy" else f", {variant}"
                ax.plot(steps, [statistics.median(b[t] for b in seeds) for t in steps], color=colour, lw=1.8,
                        label=f"lr {lr:g}{tag} (median of {len(seeds)} seeds)")
            ax.set_title(f"{task} · {family}", fontsize=9)
            ax.set_ylim(-0.02, 1.0)
            ax.grid(alpha=0.3)
            if i == len(families) - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("greedy β")
            if cell:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metaopt.experiments.greedy_compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep directories (searched recursively)")
    parser.add_argument("--out", type=Path, help="where to write the table and plot (default: first sweep)")
    parser.add_argument("--tail", type=float, default=0.2, help="fraction of steps for train_tail")
    args = parser.parse_args(argv)
    runs = collect(args.sweeps, args.tail)
    if not runs:
        raise SystemExit("no greedy comparison runs (summary.json + .hydra/config.yaml) found")
    rows = compare(runs)
    out = args.out or args.sweeps[0]
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (out / "greedy_table.md").write_text(table)
    (out / "greedy_results.json").write_text(json.dumps(
        {"rows": rows, "runs": [{k: v for k, v in r.items() if k != "momentum"} for r in runs]},
        indent=2, default=str) + "\n")
    plot_momentum(runs, out / "greedy_momentum.png")
    print(table, end="")
    print(f"wrote {out / 'greedy_table.md'}, {out / 'greedy_results.json'}, {out / 'greedy_momentum.png'}")


if __name__ == "__main__":
    main()
