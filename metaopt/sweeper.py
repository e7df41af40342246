"""What a benchmark-suite sweep runs: tasks × optimizers, each optimizer tuned on its own grid.

Hydra's basic sweeper takes one Cartesian product, so it cannot give Adam a learning-rate grid and
PAL a grid over its measuring step in the same sweep. :class:`SuiteSweeper` expands

    tasks × optimizers × (that optimizer's grid) × (the ordinary sweep params, e.g. seed=0,1,2)

with each task's budget overrides attached to its jobs. The grids live in config
(``conf/experiment/bench_small.yaml``), and every optimizer gets the same number of grid points:
the tuning budget of baselines and of "tuning-free" methods is equal (DeepOBS/AlgoPerf practice,
``shared/papers.md``), which the sweeper checks before launching anything.

``task=`` or ``optimizer=`` on the command line narrows the suite to those entries
(``python -m metaopt -m experiment=bench_small task=two_moons optimizer=adam,pal seed=0``).
An optimizer entry may name the Python module it ``requires`` (the peers extra); when that is
not installed the entry is skipped with a warning instead of adding failed jobs.

The Hydra sweeper itself lives in ``hydra_plugins/metaopt_sweeper`` (Hydra loads sweepers only
from that namespace); this module holds its logic so the report and tests can use it.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from metaopt.errors import ConfigError

# Command-line overrides of these keys select suite entries instead of being swept as usual.
SELECTORS = ("task", "optimizer")


def _value(v: Any) -> str:
    """An override value as Hydra parses it back (floats keep their exact text, None is null)."""
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


def grid_points(grid: Mapping[str, Sequence[Any]] | None) -> list[list[str]]:
    """The product of a ``{key: [values]}`` grid as override lists (one empty point if no grid)."""
    if not grid:
        return [[]]
    keys = list(grid)
    for k in keys:
        if isinstance(grid[k], (str, bytes)) or not isinstance(grid[k], Sequence):
            raise ConfigError(f"hydra.sweeper.optimizers: grid key {k!r} needs a list of values, got {grid[k]!r}")
    return [[f"{k}={_value(v)}" for k, v in zip(keys, values)]
            for values in itertools.product(*(grid[k] for k in keys))]


def _select(kind: str, names: Sequence[str], chosen: list[str] | None) -> list[str]:
    if chosen is None:
        return list(names)
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise ConfigError(f"{kind}={','.join(unknown)}: not in this suite; valid choices: {', '.join(names)}")
    return [n for n in names if n in chosen]


def plan(tasks: Mapping[str, Any], optimizers: Mapping[str, Any], selected: Mapping[str, list[str] | None]
         | None = None, equal_budget: bool = True) -> tuple[list[list[str]], list[str]]:
    """Expand the suite into one override list per (task, optimizer, grid point); also the skipped entries.

    Raises ConfigError when the grids' sizes differ (``equal_budget``) or a selection is unknown.
    """
    selected = selected or {}
    skipped, sizes, entries = [], {}, {}
    for name in _select("optimizer", list(optimizers), selected.get("optimizer")):
        entry = optimizers[name] or {}
        unknown = set(entry) - {"grid", "requires"}
        if unknown:
            raise ConfigError(f"hydra.sweeper.optimizers.{name}: unknown key(s) {sorted(unknown)}; valid: grid, requires")
        module = entry.get("requires")
        if module and importlib.util.find_spec(module) is None:
            skipped.append(f"{name} (needs {module}: pip install -e '.[peers]' in the metaopt checkout)")
            continue
        entries[name] = grid_points(entry.get("grid"))
        sizes[name] = len(entries[name])
    if equal_budget and len(set(sizes.values())) > 1:
        shown = ", ".join(f"{n}: {s}" for n, s in sizes.items())
        raise ConfigError("hydra.sweeper.optimizers: every optimizer needs the same number of grid points "
                          f"(the same tuning budget); got {shown}")
    jobs = []
    for task in _select("task", list(tasks), selected.get("task")):
        budget = [f"{k}={_value(v)}" for k, v in (tasks[task] or {}).items()]
        for name, points in entries.items():
            for point in points:
                jobs.append([f"task={task}", *budget, f"optimizer={name}", *point])
    return jobs, skipped
