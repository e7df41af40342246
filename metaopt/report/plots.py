"""The report's figures (matplotlib, Agg backend, PNG).

Curves are of each optimizer's chosen setting: at every logged step, the median over seeds with a
min–max band. A seed that diverged (or failed) counts as +∞ after its last record, so the median
line stops once half the seeds are gone instead of following the survivors; the band covers the
seeds still running, and an × marks where a seed ended.

Figures are built as bare ``Figure`` objects (PNG through Agg), never through pyplot, so making a
report leaves the caller's matplotlib backend and open figures alone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from metaopt.report.analysis import MEASURES, TAU_MAX, Analysis, Profile, Setting, Target
from metaopt.report.runs import Run

X_LABELS = {"steps": "steps", "time": "training time (s, evaluation excluded)",
            "passes": "passes (forward + backward)"}
# Effective learning rate, in order of preference: what adaptive methods report, else the lr
# the scheduler sets (the same for every step of a constant schedule).
LR_KEYS = ("opt/lr_eff", "opt/alpha", "lr")
_COLS = 3


def _x(record: dict, measure: str) -> float:
    if measure == "steps":
        return float(record["step"])
    if measure == "time":
        return float(record.get("time", math.nan))
    return float(record.get("passes/forward", 0) + record.get("passes/backward", 0))


def aggregate(runs: list[Run], key: str, measure: str = "steps", worst: float = math.inf):
    """(x, median, low, high, n_alive) over seeds at each step where some run logged ``key``."""
    per_step: dict[int, list[tuple[float, float]]] = defaultdict(list)
    ended: list[int] = []  # last step of runs that died
    for run in runs:
        last = 0
        for r in run.records:
            y = r.get(key)
            if isinstance(y, (int, float)) and "step" in r:
                per_step[int(r["step"])].append((_x(r, measure), float(y)))
                last = int(r["step"])
        if run.status in ("diverged", "failed"):
            ended.append(last)
    if not per_step:
        return None
    steps = sorted(per_step)
    xs, med, lo, hi, alive = [], [], [], [], []
    for s in steps:
        pts = [(x, y) for x, y in per_step[s] if math.isfinite(y)]
        dead = sum(e < s for e in ended) + sum(not math.isfinite(y) for _, y in per_step[s])
        ys = [y for _, y in pts] + [worst] * dead
        finite_x = [x for x, _ in per_step[s] if math.isfinite(x)]
        xs.append(float(np.median(finite_x)) if finite_x else math.nan)
        med.append(float(np.median(ys)) if ys else math.nan)
        lo.append(min((y for _, y in pts), default=math.nan))
        hi.append(max((y for _, y in pts), default=math.nan))
        alive.append(len(pts))
    return np.array(xs), np.array(med), np.array(lo), np.array(hi), np.array(alive)


def _ends(runs: list[Run], key: str, measure: str) -> list[tuple[float, float]]:
    """Where diverged/failed runs stopped: their last finite point of ``key``."""
    out = []
    for run in runs:
        if run.status not in ("diverged", "failed"):
            continue
        pts = [(_x(r, measure), r[key]) for r in run.records
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            out.append(pts[-1])
    return out


def colours(analysis: Analysis) -> dict[str, tuple]:
    cmap = matplotlib.colormaps["tab10" if len(analysis.optimizers) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(analysis.optimizers)}


# Beyond this many methods, per-axis legends hide the curves: one legend for the figure, below it.
_MAX_AXIS_LEGEND = 6


def _legend(fig, axes, n_methods: int, loc: str = "best") -> None:
    """Per-axis legends for a few methods; for many, one figure legend (first label of each)."""
    if n_methods <= _MAX_AXIS_LEGEND:
        for ax in axes.flat:
            if ax.get_visible() and ax.has_data() and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc=loc)
        fig.tight_layout()
        return
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    ncol = min(6, max(1, len(handles)))
    rows = math.ceil(len(handles) / ncol)
    height = fig.get_figheight()
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, min(0.4, (0.18 * rows + 0.1) / height), 1, 1))


def _label(s: Setting) -> str:
    bad = s.count("diverged") + s.count("failed")
    text = f"{s.optimizer} {s.setting}".strip()
    return f"{text} ({bad}/{s.n_runs} failed)" if bad else text


def _log_if_wide(ax, values: list[np.ndarray]) -> None:
    ys = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    if ys.size and ys.min() > 0 and ys.max() / ys.min() > 20:
        ax.set_yscale("log")


def _grid(n_tasks: int, rows_per_task: int, width: float = 4.2, height: float = 3.0):
    cols = min(max(n_tasks, 1), _COLS)
    blocks = math.ceil(max(n_tasks, 1) / cols)
    fig = Figure(figsize=(width * cols, height * rows_per_task * blocks))
    axes = fig.subplots(rows_per_task * blocks, cols, squeeze=False)
    return fig, axes, cols


def _panel(ax, settings: list[Setting], key: str, measure: str, colour: dict, worst: float,
           short: bool = False) -> list[np.ndarray]:
    drawn = []
    for s in settings:
        agg = aggregate(s.runs, key, measure, worst)
        if agg is None:
            continue
        x, med, lo, hi, _ = agg
        c = colour[s.optimizer]
        ax.plot(x, np.where(np.isfinite(med), med, np.nan), color=c, lw=1.6,
                label=s.optimizer if short else _label(s))
        ax.fill_between(x, lo, hi, color=c, alpha=0.18, lw=0)
        ends = _ends(s.runs, key, measure)
        if ends:
            ax.plot(*zip(*ends), "x", color=c, ms=7, mew=2)
        drawn += [med, lo, hi]
    return drawn


def loss_curves(analysis: Analysis, measure: str, path: Path) -> Path:
    """Train loss (top row of each block) and the validation metric (below) against ``measure``."""
    tasks = analysis.tasks
    colour = colours(analysis)
    fig, axes, cols = _grid(len(tasks), 2)
    for i, task in enumerate(tasks):
        target: Target = analysis.targets[task]
        chosen = analysis.chosen(task)
        ax_train = axes[2 * (i // cols), i % cols]
        ax_val = axes[2 * (i // cols) + 1, i % cols]
        short = len(analysis.optimizers) > _MAX_AXIS_LEGEND  # chosen settings: in the table
        _log_if_wide(ax_train, _panel(ax_train, chosen, "train/loss", measure, colour, math.inf, short))
        drawn = _panel(ax_val, chosen, target.metric, measure, colour, target.worst, short)
        if target.value is not None:
            ax_val.axhline(target.value, color="0.35", ls="--", lw=1, label=f"target ({target.source})")
            drawn.append(np.array([target.value]))
        _log_if_wide(ax_val, drawn)
        ax_train.set_title(task, fontsize=10)
        ax_train.set_ylabel("train loss")
        ax_val.set_ylabel(target.metric)
        ax_val.set_xlabel(X_LABELS[measure])
        for ax in (ax_train, ax_val):
            ax.grid(alpha=0.3, which="both")
    _hide_unused(axes, len(tasks), cols, 2)
    fig.suptitle(f"Loss against {measure}\nmedian over seeds, band min–max, × a seed that diverged", fontsize=9)
    _legend(fig, axes[1::2], len(analysis.optimizers))  # validation rows: they carry the target line
    fig.savefig(path, dpi=110)
    return path


def _hide_unused(axes, n_tasks: int, cols: int, rows_per_task: int) -> None:
    for j in range(n_tasks, axes.shape[1] * (axes.shape[0] // rows_per_task)):
        for k in range(rows_per_task):
            axes[rows_per_task * (j // cols) + k, j % cols].set_visible(False)


def lr_key(runs: list[Run]) -> str | None:
    for key in LR_KEYS:
        if any(isinstance(r.get(key), (int, float)) for run in runs for r in run.records):
            return key
    return None


def lr_curves(analysis: Analysis, path: Path) -> Path:
    tasks = analysis.tasks
    colour = colours(analysis)
    fig, axes, cols = _grid(len(tasks), 1)
    for i, task in enumerate(tasks):
        ax = axes[i // cols, i % cols]
        drawn = []
        for s in analysis.chosen(task):
            key = lr_key(s.runs)
            if key is None:
                continue
            agg = aggregate(s.runs, key, "steps", math.nan)
            if agg is None:
                continue
            # A zero lr_eff (a line search that stayed put) has no place on the log axis: a gap.
            x, med, lo, hi = (agg[0], *(np.where(v > 0, v, np.nan) for v in agg[1:4]))
            c = colour[s.optimizer]
            adaptive = key != "lr"
            ax.plot(x, med, color=c, lw=1.6 if adaptive else 1.2, ls="-" if adaptive else "--",
                    label=f"{s.optimizer} ({key})")
            if adaptive:
                ax.fill_between(x, lo, hi, color=c, alpha=0.18, lw=0)
            drawn += [med, lo, hi]
        if any(np.isfinite(v).any() for v in drawn):  # learning rates span decades across methods
            ax.set_yscale("log")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("steps")
        ax.set_ylabel("effective learning rate")
        ax.grid(alpha=0.3, which="both")
    _hide_unused(axes, len(tasks), cols, 1)
    fig.suptitle("Effective learning rate\nsolid: reported by the optimizer; dashed: the scheduled lr", fontsize=9)
    _legend(fig, axes, len(analysis.optimizers))
    fig.savefig(path, dpi=110)
    return path


def profile_plot(analysis: Analysis, profiles: dict[str, Profile], path: Path) -> Path:
    colour = colours(analysis)
    fig = Figure(figsize=(4.6 * len(MEASURES), 3.6))
    axes = fig.subplots(1, len(MEASURES), squeeze=False)
    for ax, measure in zip(axes[0], MEASURES):
        prof = profiles[measure]
        finite = [x for r in prof.ratios.values() for x in r if math.isfinite(x)]
        tau_hi = max([TAU_MAX, *finite]) * 1.15
        taus = np.unique(np.concatenate([[1.0, tau_hi], finite]))
        for k, m in enumerate(prof.methods):
            rho = [prof.rho(m, t) for t in taus]
            # Later lines thinner, so methods with the same profile stay visible underneath.
            ax.step(taus, rho, where="post", color=colour[m], lw=3.0 - 1.8 * k / max(len(prof.methods), 1),
                    label=f"{m} (score {prof.score(m):.2f})")
        ax.axvline(TAU_MAX, color="0.6", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlim(1, tau_hi)
        ax.set_xticks([t for t in (1, 1.5, 2, 3, 4, 6, 10, 20, 50, 100, 1000) if t <= tau_hi])
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(f"τ (time to target / best, in {measure})")
        ax.set_ylabel("fraction of tasks")
        ax.set_title(f"{measure} to target ({len(prof.tasks)} tasks)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if len(prof.methods) > _MAX_AXIS_LEGEND:  # one legend for all three: names only (scores: table)
            for line, m in zip(ax.get_lines(), prof.methods):
                line.set_label(m)
    fig.suptitle("Performance profiles: never reached or diverged = ∞; score = ∫₁⁴ ρ(τ) dτ / 3 (AlgoPerf)",
                 fontsize=10)
    _legend(fig, axes[:, :1] if len(analysis.optimizers) > _MAX_AXIS_LEGEND else axes,
            len(analysis.optimizers), loc="lower right")
    fig.savefig(path, dpi=110)
    return path


def all_figures(analysis: Analysis, profiles: dict[str, Profile], out: Path) -> dict[str, Path]:
    figures = {f"loss_vs_{m}": loss_curves(analysis, m, out / f"loss_vs_{m}.png") for m in MEASURES}
    figures["lr_eff"] = lr_curves(analysis, out / "lr_eff.png")
    figures["profile"] = profile_plot(analysis, profiles, out / "profile.png")
    return figures
