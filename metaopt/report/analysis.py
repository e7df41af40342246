"""Numbers of the report: per-setting statistics over seeds, tuning on validation, time to target,
and performance profiles across tasks.

Rules, applied everywhere (DeepOBS/AlgoPerf practice, ``shared/papers.md``):

- A finished run counts. ``diverged`` and ``failed`` runs are failures: their final/best metric is
  the worst possible value (``+inf`` for a loss) and they never reach the target. Only runs that have
  not finished (no final ``summary.json``) are left out, and the report lists them.
- Statistics over seeds are the median with the min–max range (with 3 seeds an IQR says little).
- Tuning: per task × optimizer the setting with the best median final validation metric.
- Time to target: the first evaluation at which the validation metric reaches the task's target,
  in steps, training seconds (evaluation excluded) and passes (forward + backward); the
  resolution is the run's ``eval_every``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from metaopt.report.runs import Run

MEASURES = ("steps", "time", "passes")
TAU_MAX = 4.0  # AlgoPerf integrates the profile up to τ = 4


@dataclass(frozen=True)
class Target:
    metric: str = "val/loss"
    mode: str = "min"  # min: lower is better (a loss); max: higher is better (an accuracy)
    value: float | None = None
    source: str = "none"  # targets.yaml | auto | none

    def reached(self, x: float) -> bool:
        if self.value is None or not math.isfinite(x):
            return False
        return x <= self.value if self.mode == "min" else x >= self.value

    @property
    def worst(self) -> float:
        return math.inf if self.mode == "min" else -math.inf

    def badness(self, x: float) -> float:
        """Lower is better, whatever the mode; NaN counts as the worst."""
        if math.isnan(x):
            return math.inf
        return x if self.mode == "min" else -x

    @property
    def test_metric(self) -> str:
        return "test/" + self.metric.split("/", 1)[1] if self.metric.startswith("val/") else ""


@dataclass
class TargetsFile:
    """``conf/report_targets.yaml``: per-task metric and target, and how to guess a missing one."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_metric: str = "val/loss"
    default_mode: str = "min"
    auto_slack: float | None = 0.1

    @classmethod
    def load(cls, path: str | Path | None) -> TargetsFile:
        if path is None:
            from metaopt.config import config_dir

            path = config_dir() / "report_targets.yaml"
            if not path.exists():
                return cls()
        data = yaml.safe_load(Path(path).read_text()) or {}
        defaults = data.get("defaults") or {}
        return cls(tasks=data.get("tasks") or {}, default_metric=defaults.get("metric", "val/loss"),
                   default_mode=defaults.get("mode", "min"), auto_slack=defaults.get("auto_slack", 0.1))

    def spec(self, task: str, task_name: str) -> dict[str, Any]:
        """The entry for a task label (``rosenbrock (a_weight=0.01)``) or else its config option."""
        entry = self.tasks.get(task, self.tasks.get(task_name))
        if entry is None:
            return {}
        return entry if isinstance(entry, dict) else {"target": entry}


def _stat(values: list[float]) -> tuple[float, float, float] | None:
    """Median, min and max; NaN (a value a run never wrote) sorts as missing, not as a number."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return None
    return float(np.median(vals)), float(min(vals)), float(max(vals))


@dataclass
class RunNumbers:
    final: float
    best: float
    test: float
    to_target: dict[str, float]  # measure -> value; inf when never reached


def run_numbers(run: Run, target: Target) -> RunNumbers:
    vals = [r[target.metric] for r in run.records if isinstance(r.get(target.metric), (int, float))]
    if run.status != "completed":
        final = best = test = target.worst
    else:
        final = float(run.summary.get("final", {}).get(target.metric, vals[-1] if vals else math.nan))
        test = float(run.summary.get("final", {}).get(target.test_metric, math.nan))
        finite = [v for v in vals if math.isfinite(v)]
        if finite:
            best = min(finite) if target.mode == "min" else max(finite)
        else:
            best = float(run.summary.get("best", {}).get(target.metric, final))
    to_target = dict.fromkeys(MEASURES, math.inf)
    # A run that touched the target and diverged afterwards still never reached it: a failure is a
    # failure everywhere, so a table row, its curve and the profile never disagree about a run.
    if run.status == "completed":
        for r in run.records:
            if target.reached(r.get(target.metric, math.nan)):
                to_target = {"steps": float(r["step"]), "time": float(r.get("time", math.nan)),
                             "passes": float(r.get("passes/forward", 0) + r.get("passes/backward", 0))}
                break
    return RunNumbers(final=final, best=best, test=test, to_target=to_target)


@dataclass
class Setting:
    """One task × optimizer × hyperparameter setting, over its seeds."""

    task: str
    task_name: str
    optimizer: str
    setting: str
    params: dict[str, Any]
    runs: list[Run]  # finished runs only
    incomplete: list[Run]
    numbers: list[RunNumbers] = field(default_factory=list)
    chosen: bool = False
    # For a chosen setting: swept hyperparameter -> "lowest" | "highest" where its value is at the
    # end of the grid, so the best value may lie outside what was tried.
    edges: dict[str, str] = field(default_factory=dict)

    @property
    def n_runs(self) -> int:
        return len(self.runs)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.runs)

    def final(self):
        return _stat([n.final for n in self.numbers])

    def best(self):
        return _stat([n.best for n in self.numbers])

    def test(self):
        return _stat([n.test for n in self.numbers])

    def to_target(self, measure: str) -> float:
        """Median over seeds, a run that never reached counting as ∞ (so a majority must reach)."""
        vals = [n.to_target[measure] for n in self.numbers]
        vals = [v for v in vals if not math.isnan(v)]
        return float(np.median(vals)) if vals else math.inf

    def n_reached(self) -> int:
        return sum(math.isfinite(n.to_target["steps"]) for n in self.numbers)

    def _summary_median(self, key: str) -> float | None:
        vals = [float(r.summary[key]) for r in self.runs if isinstance(r.summary.get(key), (int, float))]
        return float(np.median(vals)) if vals else None

    def state_bytes_per_param(self) -> float | None:
        return self._summary_median("optimizer_state_bytes_per_param")

    def step_time(self) -> float | None:
        return self._summary_median("step_time_mean")

    def seeds(self) -> list[int | None]:
        return sorted((r.seed for r in self.runs), key=lambda s: (s is None, s))


@dataclass
class Analysis:
    settings: list[Setting]
    targets: dict[str, Target]  # task label -> target
    task_names: dict[str, str]  # task label -> config option
    notes: list[str]

    @property
    def tasks(self) -> list[str]:
        return sorted(self.targets)

    @property
    def optimizers(self) -> list[str]:
        return sorted({s.optimizer for s in self.settings})

    def chosen(self, task: str | None = None) -> list[Setting]:
        return [s for s in self.settings if s.chosen and (task is None or s.task == task)]

    def for_method(self, task: str, optimizer: str) -> list[Setting]:
        return [s for s in self.settings if s.task == task and s.optimizer == optimizer]


def _selection_key(s: Setting, target: Target) -> tuple[float, int, float]:
    final = s.final()
    median = target.badness(final[0]) if final else math.inf
    best = s.best()
    # Ties (e.g. every setting diverged) go to fewer failures, then to the better best value.
    return (median, s.count("diverged") + s.count("failed"), target.badness(best[0]) if best else math.inf)


def grid_edges(chosen: Setting, group: list[Setting]) -> dict[str, str]:
    """The numeric hyperparameters, swept over three or more values, whose chosen value is an end."""
    edges = {}
    for key, value in chosen.params.items():
        values = {s.params.get(key) for s in group}
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) or len(values) < 3:
            continue
        if value == min(values):
            edges[key] = "lowest"
        elif value == max(values):
            edges[key] = "highest"
    return edges


def analyse(runs: list[Run], targets_file: TargetsFile) -> Analysis:
    notes: list[str] = []
    groups: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.task, r.optimizer, r.setting)].append(r)
    settings = []
    for (task, optimizer, setting), group in sorted(groups.items()):
        finished = [r for r in group if r.finished]
        settings.append(Setting(task=task, task_name=group[0].task_name, optimizer=optimizer, setting=setting,
                                params=group[0].params, runs=finished,
                                incomplete=[r for r in group if not r.finished]))
        seeds = [r.seed for r in finished]
        duplicated = sorted({s for s in seeds if s is not None and seeds.count(s) > 1})
        if duplicated:
            notes.append(f"{task} / {optimizer} {setting}: seed(s) {duplicated} appear more than once "
                         "(the same sweep given twice?); each run is counted")

    task_names = {s.task: s.task_name for s in settings}
    targets: dict[str, Target] = {}
    for task, name in task_names.items():
        spec = targets_file.spec(task, name)
        metric = spec.get("metric", targets_file.default_metric)
        mode = spec.get("mode", "max" if "accuracy" in metric else targets_file.default_mode)
        value = spec.get("target")
        targets[task] = Target(metric=metric, mode=mode, value=None if value is None else float(value),
                               source="targets.yaml" if value is not None else "none")

    for s in settings:
        s.numbers = [run_numbers(r, targets[s.task]) for r in s.runs]
        if not any(isinstance(r.get(targets[s.task].metric), (int, float)) for run in s.runs for r in run.records) \
                and s.count("completed"):
            notes.append(f"{s.task} / {s.optimizer}: no run logged {targets[s.task].metric}")

    # Tuning on validation: one chosen setting per task × optimizer.
    by_method: dict[tuple[str, str], list[Setting]] = defaultdict(list)
    for s in settings:
        by_method[(s.task, s.optimizer)].append(s)
    for (task, optimizer), group in by_method.items():
        counted = [s for s in group if s.runs] or group
        best = min(counted, key=lambda s: _selection_key(s, targets[task]))
        best.chosen = True
        best.edges = grid_edges(best, group)
        for key, side in best.edges.items():
            values = sorted({s.params[key] for s in group})
            notes.append(f"{task} / {optimizer}: the chosen {key}={best.params[key]:g} is the {side} of its grid "
                         f"({values[0]:g} … {values[-1]:g}); the best value may lie beyond it")
        if not any(s.runs for s in group):
            notes.append(f"{task} / {optimizer}: no run has finished yet; the row is empty")
        elif not any(s.count("completed") for s in group):
            notes.append(f"{task} / {optimizer}: every run diverged or failed; the row shows failures only")

    # A task without a target in targets.yaml gets one from the sweep: the best chosen setting's
    # median final value, loosened by auto_slack, so the fastest method still has to get close.
    for task, target in list(targets.items()):
        if target.value is not None or targets_file.auto_slack is None:
            continue
        finals = [f[0] for s in settings if s.chosen and s.task == task and (f := s.final())]
        finals = [f for f in finals if math.isfinite(f)]
        if not finals:
            continue
        slack = float(targets_file.auto_slack)
        best = min(finals) if target.mode == "min" else max(finals)
        value = best * (1 + slack) if target.mode == "min" else best * (1 - slack)
        if target.mode == "min" and best < 0:
            value = best * (1 - slack)
        targets[task] = Target(metric=target.metric, mode=target.mode, value=value, source="auto")
        for s in settings:
            if s.task == task:
                s.numbers = [run_numbers(r, targets[task]) for r in s.runs]
    return Analysis(settings=settings, targets=targets, task_names=task_names, notes=notes)


# Performance profiles ------------------------------------------------------------------------

@dataclass
class Profile:
    """ρ_m(τ): the fraction of tasks on which method m's cost is within τ of the best method's."""

    measure: str
    tasks: list[str]
    methods: list[str]
    ratios: dict[str, list[float]]  # method -> ratio per task (inf: never reached or not run)

    def rho(self, method: str, tau: float) -> float:
        r = self.ratios[method]
        return sum(x <= tau for x in r) / len(r) if r else 0.0

    def score(self, method: str, tau_max: float = TAU_MAX) -> float:
        """AlgoPerf's benchmark score: ∫_1^τmax ρ(τ) dτ / (τmax − 1), exact for a step function."""
        r = self.ratios[method]
        if not r:
            return 0.0
        return sum(max(tau_max - x, 0.0) for x in r if math.isfinite(x)) / ((tau_max - 1) * len(r))


def profile(analysis: Analysis, measure: str) -> Profile:
    tasks = analysis.tasks
    methods = analysis.optimizers
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    for task in tasks:
        cost = {m: math.inf for m in methods}
        for s in analysis.chosen(task):
            cost[s.optimizer] = s.to_target(measure)
        finite = [c for c in cost.values() if math.isfinite(c)]
        best = min(finite) if finite else math.inf
        for m in methods:
            c = cost[m]
            if not math.isfinite(c) or not math.isfinite(best):
                ratios[m].append(math.inf)
            elif best <= 0:  # reached at the first evaluation by the best: equal costs tie at 1
                ratios[m].append(1.0 if c <= 0 else math.inf)
            else:
                ratios[m].append(c / best)
    return Profile(measure=measure, tasks=tasks, methods=methods, ratios=ratios)
