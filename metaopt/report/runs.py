"""Find run directories under sweep dirs, read their plain files, and name what each run compared.

Only the files every run writes are read (``summary.json``, ``metrics.jsonl``, ``.hydra/``), so a
local sweep, a SLURM sweep and a hand-made directory of runs all read the same way. Nothing here
raises on a damaged run: what is wrong is recorded in ``Run.problems`` and shown in the report.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metaopt.runfiles import METRICS, SUMMARY

# Statuses a finished run ends with (train.py); any other state means the run may still change.
FINISHED = ("completed", "diverged", "failed")
INCOMPLETE = "incomplete"

# Folders inside a run or sweep dir that never hold runs; skipping them keeps the walk cheap.
_SKIP_DIRS = {".hydra", "wandb", ".submitit", ".manifest", "report", "__pycache__"}

# Config keys that do not change a run's trajectory (or change only with the seed): two runs
# that differ only here are seeds of the same setting.
_IGNORED_PREFIXES = ("hydra.", "paths.", "logger.", "analysis.")
_IGNORED_KEYS = {"seed", "device", "trainer.progress", "trainer.deterministic", "trainer.checkpoint_every",
                 "trainer.log_every", "trainer.eval_every"}
# _target_/_partial_ only change with the group's option, which is recorded by name instead.
_IGNORED_LEAVES = {"seed", "data_dir", "download", "eval_batch_size", "_target_", "_partial_"}
# Varying keys under these prefixes define a different task (budget included), not a setting.
_TASK_PREFIXES = ("task.", "trainer.")
# Config groups whose choice is part of a setting when swept (the task and optimizer have their own axis).
_SETTING_GROUPS = ("scheduler", "meta")


@dataclass
class Run:
    """One run directory and what the report needs from it."""

    dir: Path
    task_name: str
    optimizer: str
    seed: int | None
    config: dict[str, Any]  # flattened, unresolved: interpolations stay strings, equal across seeds
    status: str  # completed | diverged | failed | incomplete
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)
    task: str = ""  # task_name plus task parameters that vary in the sweep
    setting: str = ""  # hyperparameters that vary among this task × optimizer's runs ("" if none)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def error(self) -> str | None:
        return self.summary.get("error")


@dataclass
class Sweep:
    """What was found under the directories given: runs, and jobs a sweep planned but that left nothing."""

    runs: list[Run]
    missing: list[str]  # "<sweep dir>: jobs 3, 7 (of 18 planned)"
    roots: list[Path]


def _num(value: Any) -> Any:
    """runfiles writes non-finite floats as strings; turn them back into floats."""
    if isinstance(value, str) and value in ("inf", "-inf", "nan", "Infinity", "-Infinity", "NaN"):
        return float(value.replace("Infinity", "inf").replace("NaN", "nan"))
    if isinstance(value, dict):
        return {k: _num(v) for k, v in value.items()}
    return value


def read_records(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    lines = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(_num(json.loads(line)))
        except json.JSONDecodeError:
            # A run killed mid-write leaves a torn last line; anything else is worth saying.
            if i != len(lines) - 1:
                problems.append(f"metrics.jsonl line {i + 1} unreadable")
    return records


def _load_yaml(path: Path, problems: list[str]) -> Any:
    if not path.exists():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        problems.append(f"{path.parent.name}/{path.name} unreadable ({type(exc).__name__})")
        return None


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(node, list):
        node = tuple(json.dumps(v) if isinstance(v, (dict, list)) else v for v in node)
    return {prefix[:-1]: node}


def _ignored(key: str) -> bool:
    return (key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES)
            or key.rsplit(".", 1)[-1] in _IGNORED_LEAVES)


def _class_name(target: str | None) -> str:
    return target.rsplit(".", 1)[-1].lower() if target else "unknown"


def load_run(run_dir: Path) -> Run:
    problems: list[str] = []
    summary = None
    if (run_dir / SUMMARY).exists():
        try:
            summary = _num(json.loads((run_dir / SUMMARY).read_text()))
        except json.JSONDecodeError:
            problems.append("summary.json unreadable")
    records = read_records(run_dir / METRICS, problems)
    config = _load_yaml(run_dir / ".hydra" / "config.yaml", problems) or {}
    overrides = _load_yaml(run_dir / ".hydra" / "overrides.yaml", problems) or []
    hydra = _load_yaml(run_dir / ".hydra" / "hydra.yaml", problems) or {}
    choices = dict(((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {})
    # hydra.yaml's choices name the option even when an experiment preset picked it; the
    # overrides are the next best; a run made outside Hydra only has its classes' names.
    for item in overrides:
        key, sep, value = str(item).lstrip("+~").partition("=")
        if sep and "." not in key and "/" not in key:
            choices.setdefault(key, value)
    summary = summary or {}
    task_name = choices.get("task") or _class_name((config.get("task") or {}).get("_target_") or summary.get("task"))
    meta_node = config.get("meta")
    meta = (choices.get("meta") or _class_name(meta_node.get("_target_"))) if isinstance(meta_node, dict) else None
    if meta is not None:
        # Meta-training: val/loss is the held-out mean normalised loss of the learned optimizer, not
        # the task's loss, so it gets a row (and target) of its own.
        task_name = f"{task_name}_meta-{meta}"
    optimizer = choices.get("optimizer") or _class_name(
        (config.get("optimizer") or {}).get("_target_") or summary.get("optimizer"))
    seed = config.get("seed", summary.get("seed"))
    flat = {k: v for k, v in flatten(config).items() if not _ignored(k)}
    for group in _SETTING_GROUPS:
        if choices.get(group) is not None:
            flat[group] = choices[group]

    status = summary.get("status")
    if status not in FINISHED:
        status = INCOMPLETE
        if not summary and not records:
            problems.append("no summary.json or metrics.jsonl: the job never trained")
        elif summary.get("status") == "requeued":
            problems.append("requeued and not finished yet")
        elif summary.get("status") == "interrupted":
            problems.append(f"{summary.get('error') or 'interrupted'}: re-run the sweep to resume")
        else:
            problems.append("no final summary: still running, or killed")
    return Run(dir=run_dir, task_name=str(task_name), optimizer=str(optimizer),
               seed=int(seed) if isinstance(seed, (int, float)) and math.isfinite(seed) else None,
               config=flat, status=status, summary=summary, records=records, problems=problems)


def _is_run_dir(path: Path) -> bool:
    return (path / SUMMARY).exists() or (path / METRICS).exists() or (path / ".hydra" / "config.yaml").exists()


def find_run_dirs(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if _is_run_dir(here):
            found.append(here)
            dirnames[:] = []  # a run dir holds no other runs
            continue
        dirnames[:] = sorted((d for d in dirnames if d not in _SKIP_DIRS), key=_natural)
    return found


def _natural(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def planned_jobs(sweep_dir: Path) -> int | None:
    """How many jobs the sweep launched: the suite sweeper's list, or the basic sweeper's product of
    ``multirun.yaml``'s overrides (None: can't tell)."""
    suite = sweep_dir / "suite_jobs.txt"  # the suite sweeper lists the jobs it launched
    if suite.exists():
        return sum(1 for line in suite.read_text().splitlines() if line.strip())
    path = sweep_dir / "multirun.yaml"
    try:
        cfg = yaml.safe_load(path.read_text())
        hydra = cfg["hydra"]
        if "BasicSweeper" not in str((hydra.get("sweeper") or {}).get("_target_", "")):
            return None
        from hydra.core.override_parser.overrides_parser import OverridesParser

        # The sweep is hydra.sweeper.params (an experiment's grid) overridden by the command line.
        params = [f"{k}={v}" for k, v in ((hydra.get("sweeper") or {}).get("params") or {}).items()]
        by_key = {}
        for override in OverridesParser.create().parse_overrides(params + list(hydra["overrides"]["task"])):
            by_key[override.key_or_group] = override
        total = 1
        for override in by_key.values():
            if override.is_sweep_override():
                if not override.is_discrete_sweep():
                    return None
                total *= len(list(override.sweep_string_iterator()))
        return total
    except Exception:  # noqa: BLE001 - an unreadable multirun.yaml only loses the missing-job check
        return None


def _describe(keys: dict[str, Any], strip: str) -> str:
    parts = []
    for k, v in sorted(keys.items()):
        name = k[len(strip):] if strip and k.startswith(strip) else k
        value = ",".join(map(str, v)) if isinstance(v, tuple) else v
        parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(parts)


def _varying(runs: list[Run], keep) -> set[str]:
    keys = {k for r in runs for k in r.config if keep(k)}
    missing = object()
    return {k for k in keys if len({json.dumps(r.config.get(k, missing), default=str) for r in runs}) > 1}


def name_settings(runs: list[Run]) -> None:
    """Give each run its task label and its setting label, from what varies across the sweep.

    A task is its config option plus any task parameter (or budget) that differs between runs of
    that option; a setting is what differs between the runs of one task × optimizer, seeds aside.
    """
    by_task: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_task[r.task_name].append(r)
    for name, group in by_task.items():
        task_keys = _varying(group, lambda k: k.startswith(_TASK_PREFIXES))
        for r in group:
            extra = _describe({k: r.config[k] for k in task_keys if k in r.config}, "task.")
            r.task = f"{name} ({extra})" if extra else name
    by_method: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        by_method[(r.task, r.optimizer)].append(r)
    for group in by_method.values():
        keys = _varying(group, lambda k: not k.startswith(_TASK_PREFIXES))
        for r in group:
            # A key only some options have (a scheduler's warm-up) is left out where absent.
            r.params = {k: r.config[k] for k in sorted(keys) if k in r.config}
            r.setting = _describe(r.params, "optimizer.")


def load_sweeps(paths: list[str | os.PathLike]) -> Sweep:
    roots = [Path(p) for p in paths]
    runs: list[Run] = []
    missing: list[str] = []
    seen: set[Path] = set()
    manifest_entries: dict[Path, dict[str, Any]] = {}
    for root in roots:
        if not root.exists():
            missing.append(f"{root}: does not exist")
            continue
        dirs = [d for d in find_run_dirs(root) if d.resolve() not in seen]
        seen.update(d.resolve() for d in dirs)
        runs.extend(load_run(d) for d in dirs)
        # Every sweep dir under the root (the root itself, or e.g. outputs/multirun/<date>/*).
        for multirun in sorted(root.rglob("multirun.yaml")):
            sweep_dir = multirun.parent
            manifest_entries.update(_manifest_entries(sweep_dir))
            planned = planned_jobs(sweep_dir)
            if planned is None:
                continue
            present = {int(d.name) for d in sweep_dir.iterdir() if d.name.isdigit() and _is_run_dir(d)}
            absent = sorted(set(range(planned)) - present)
            if absent:
                shown = ", ".join(map(str, absent[:20])) + (" …" if len(absent) > 20 else "")
                missing.append(f"{sweep_dir}: no run dir for job(s) {shown} (of {planned} planned)")
    _settled_by_manifests(runs, manifest_entries)
    name_settings(runs)
    return Sweep(runs=runs, missing=missing, roots=roots)


def _manifest_entries(sweep_dir: Path) -> dict[Path, dict[str, Any]]:
    """The jobs of the sweep's manifest.json (written beside multirun.yaml), by run dir."""
    try:
        jobs = json.loads((sweep_dir / "manifest.json").read_text()).get("jobs") or []
    except (OSError, json.JSONDecodeError):
        return {}
    return {Path(job["run_dir"]).resolve(): job for job in jobs if job.get("run_dir")}


def _settled_by_manifests(runs: list[Run], entries: dict[Path, dict[str, Any]]) -> None:
    """A job its sweep's manifest.json calls failed (cancelled, killed, out of requeues: it never
    wrote a final summary) is failed here too, with the manifest's reason."""
    for run in runs:
        entry = entries.get(run.dir.resolve())
        if run.status == INCOMPLETE and entry is not None and entry.get("status") == "failed":
            run.status = "failed"
            run.summary = {**run.summary, "error": entry.get("error") or "failed (manifest.json)"}
            run.problems = [p for p in run.problems if not p.startswith("no final summary")]
