"""Hydra callbacks for sweeps (``hydra.callbacks`` in ``conf/config.yaml``).

- :class:`ClusterJob`: what a job needs before the task runs, wherever it was launched: no W&B
  service state inherited from the submitting process, and checkpoint-then-requeue on SLURM's
  warning signal (:mod:`metaopt.preemption`).
- :class:`SweepManifest`: ``<sweep dir>/manifest.json``, one entry per job: its overrides, run
  dir, SLURM job id, attempts and status (from the run's ``summary.json``). Jobs keep it current
  themselves, so it is right even when the submitting process is gone; the submitting process
  settles it once more when the sweep ends.

Both are imported by every ``python -m metaopt``, so they import nothing heavy (no torch).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from metaopt import preemption
from metaopt.errors import describe
from metaopt.runfiles import atomic_write_bytes

log = logging.getLogger("metaopt")

MANIFEST = "manifest.json"
_ENTRIES = ".manifest"  # one file per job under the sweep dir; manifest.json is merged from them
# Statuses a run's summary.json ends with; anything else may still change.
FINAL = ("completed", "diverged", "failed")
# (failed jobs, jobs, sweep dir) of each sweep this process ran to its end with failures: the
# command's exit status (python -m metaopt -m ...) is 1 then.
failed_sweeps: list[tuple[int, int, str]] = []
# sacct states of a job that will not run again.
_SLURM_ENDED = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _multirun(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


class ClusterJob(Callback):
    """Prepare each job's process: a clean W&B environment and requeue-on-signal.

    ``fallback_s``: how long the loop has after SLURM's signal to checkpoint at a step boundary
    before submitit requeues the job wherever it is; ``null`` is half the launcher's
    ``signal_delay_s`` (submitit's local default of 30 s without one).
    """

    def __init__(self, fallback_s: float | None = None):
        self.fallback_s = fallback_s

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # sbatch hands the submitting environment to the jobs; a W&B service address in it belongs
        # to whatever process started this one and is no use (or harm) to a job.
        os.environ.pop("WANDB_SERVICE", None)
        if "SlurmLauncher" in str(OmegaConf.select(config, "hydra.launcher._target_", default="")):
            _require_slurm()
        timeout_min = OmegaConf.select(config, "hydra.launcher.timeout_min", default=None)
        delay = OmegaConf.select(config, "hydra.launcher.signal_delay_s", default=None)
        if timeout_min is not None and delay is not None and delay + 30 >= 60 * timeout_min:
            # slurmctld checks limits every 30 s: the warning would come as each attempt starts.
            log.warning("hydra.launcher.timeout_min=%s leaves no time before SLURM's warning signal "
                        "(signal_delay_s=%s, checked every 30 s): every attempt would be signalled as it "
                        "starts and requeued until max_num_timeout; use timeout_min >= %d", timeout_min, delay,
                        (delay + 30) // 60 + 1)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop("WANDB_SERVICE", None)
        fallback_s = self.fallback_s
        if fallback_s is None:
            fallback_s = float(OmegaConf.select(config, "hydra.launcher.signal_delay_s", default=None) or 30) / 2
        if preemption.install(fallback_s=fallback_s):
            log.info("SLURM's warning signal checkpoints at the next step and requeues this job")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        preemption.job_done()


def _require_slurm() -> None:
    """Exit with one line (status 2) when no SLURM controller answers, before anything is written.

    Otherwise submitit's sbatch failure ends the sweep in a 40-line traceback, with every job left
    ``pending`` in a manifest although nothing was submitted. Runs before the manifest callback.
    """
    try:
        probe = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=30)
        said = probe.stderr.strip().splitlines()
        problem = None if probe.returncode == 0 else said[-1] if said else f"exit status {probe.returncode}"
    except FileNotFoundError:
        problem = "sinfo is not installed"
    except subprocess.TimeoutExpired:
        problem = "sinfo did not answer in 30 s"
    if problem is not None:
        print(f"metaopt: error: hydra/launcher=slurm: no SLURM cluster answers here ({problem}); "
              "start one (launch/slurm-up.sh on a single machine) or run the sweep with "
              "hydra/launcher=local", file=sys.stderr)
        sys.exit(2)


class SweepManifest(Callback):
    """Write ``<sweep dir>/manifest.json`` for every multirun (SLURM, local or in-process)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        header = {
            "sweep_dir": str(sweep_dir),
            "launcher": OmegaConf.select(config, "hydra.runtime.choices.hydra/launcher"),
            "overrides": list(config.hydra.overrides.task),
            "created_at": _now(),
            "planned": _planned_jobs(config),
        }
        _write_json(sweep_dir / _ENTRIES / "sweep.json", header)
        _merge(sweep_dir)
        # on_multirun_end is skipped when a job fails (Hydra re-raises first): settle at exit too.
        atexit.register(_settle_all, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        _settle_all(sweep_dir)
        # A benchmark suite's failed job is one of its results (the report counts it): listed, but
        # the command still succeeds, so scripts go on to the report.
        suite = "SuiteSweeper" in str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
        _list_failures(sweep_dir, exit_status=not suite)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _multirun(config):
            return
        sweep_dir, num = _job_location(config.hydra)
        previous = _read_json(_entry_path(sweep_dir, num)) or {}
        entry = {
            "num": num,
            "overrides": list(config.hydra.overrides.task),
            "run_dir": str(config.hydra.runtime.output_dir),
            "job_id": OmegaConf.select(config, "hydra.job.id", default=None),
            "slurm_job_id": _slurm_job_id(),
            "host": socket.gethostname(),
            "attempts": int(previous.get("attempts", 0)) + 1,
            "status": "running",
            "started_at": previous.get("started_at") or _now(),
        }
        _update(sweep_dir, entry)

        def requeued() -> None:
            entry.update(status="requeued", updated_at=_now())
            _update(sweep_dir, entry)

        preemption.on_requeue(requeued)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _multirun(config):
            return
        failed = job_return.status == JobStatus.FAILED
        _end_entry(config.hydra, "failed" if failed else "completed",
                   describe(job_return._return_value) if failed else None)


def _end_entry(hydra: DictConfig, fallback: str, error: str | None, final: tuple[str, ...] = FINAL) -> None:
    """Write a job's end into its manifest entry: the status its summary.json ends with when that is
    one of ``final``, else ``fallback`` (the task failed before the loop wrote a summary, or never
    trained); the summary's error, else ``error``; and its objective."""
    sweep_dir, num = _job_location(hydra)
    entry = _read_json(_entry_path(sweep_dir, num)) or {"num": num}
    summary = _read_json(Path(str(hydra.runtime.output_dir)) / "summary.json") or {}
    status = summary.get("status")
    entry.update(status=status if status in final else fallback, finished_at=_now())
    error = summary.get("error", error)
    if error is not None:
        entry["error"] = error
    if "objective" in summary:
        entry["objective"] = summary["objective"]
    _update(sweep_dir, entry)


def job_interrupted(hydra: DictConfig) -> None:
    """Record a sweep job stopped by Ctrl-C (``hydra``: the job's ``HydraConfig``).

    Hydra calls no ``on_job_end`` for a KeyboardInterrupt, which would leave the job ``running`` in
    the manifest. ``interrupted`` is not final: re-running the sweep resumes the job. A run that
    completed before the signal (it came during the last step) keeps its status.
    """
    _end_entry(hydra, "interrupted", "interrupted (Ctrl-C)", final=(*FINAL, "interrupted"))


def _job_location(hydra: DictConfig) -> tuple[Path, int]:
    """Sweep dir and job number from the job's ``hydra`` node."""
    return Path(str(hydra.sweep.dir)).absolute(), int(hydra.job.num)


def _entry_path(sweep_dir: Path, num: int) -> Path:
    return sweep_dir / _ENTRIES / f"{num}.json"


def _slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def _planned_jobs(config: DictConfig) -> list[dict[str, Any]] | None:
    """The sweep points the basic sweeper will launch, numbered as it numbers them; ``None`` for
    other sweepers (their points are decided as they go) or what cannot be expanded here."""
    if OmegaConf.select(config, "hydra.sweeper._target_") != \
            "hydra._internal.core_plugins.basic_sweeper.BasicSweeper":
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    except Exception:  # noqa: BLE001 - e.g. glob() needs the config loader: jobs appear when they start
        return None
    return [{"num": num, "overrides": list(overrides)}
            for num, overrides in enumerate(o for batch in batches for o in batch)]


# --- the manifest files ----------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically: readers (and a job killed mid-write) never see half a file."""
    text = (json.dumps(data, indent=2, default=str) + "\n").encode()
    atomic_write_bytes(path, lambda fh: fh.write(text))


@contextlib.contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    """Serialise merges across the jobs of a sweep (POSIX locks also hold on NFS)."""
    import fcntl

    lock = sweep_dir / _ENTRIES / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX)
        except OSError:
            pass  # a filesystem without locks: the last writer wins, the final merge repairs it
        yield


def _update(sweep_dir: Path, entry: dict[str, Any]) -> None:
    try:
        entry["updated_at"] = _now()
        _write_json(_entry_path(sweep_dir, entry["num"]), entry)
        _merge(sweep_dir)
    except OSError as exc:  # the manifest is a convenience: never fail a job over it
        log.warning("could not update %s: %s", sweep_dir / MANIFEST, exc)


def _merge(sweep_dir: Path) -> dict[str, Any]:
    with _locked(sweep_dir):
        header = _read_json(sweep_dir / _ENTRIES / "sweep.json") or {"sweep_dir": str(sweep_dir)}
        jobs = {job["num"]: {**job, "status": "pending"} for job in header.pop("planned", None) or []}
        for path in (sweep_dir / _ENTRIES).glob("*.json"):
            if path.stem.isdigit():
                entry = _read_json(path)
                if entry is not None:
                    jobs[entry["num"]] = entry
        counts: dict[str, int] = {}
        for job in jobs.values():
            counts[job["status"]] = counts.get(job["status"], 0) + 1
        manifest = {**header, "updated_at": _now(), "counts": counts,
                    "jobs": [jobs[num] for num in sorted(jobs)]}
        _write_json(sweep_dir / MANIFEST, manifest)
    return manifest


def _list_failures(sweep_dir: Path, exit_status: bool = True) -> None:
    """Log every failed job of the sweep, one line each; with ``exit_status``, note the sweep in
    ``failed_sweeps`` (the command then exits with 1)."""
    manifest = _read_json(sweep_dir / MANIFEST) or {}
    jobs = manifest.get("jobs") or []
    failed = [job for job in jobs if job.get("status") == "failed"]
    if not failed:
        return
    lines = [f"job {job['num']} ({' '.join(job.get('overrides') or [])}): {job.get('error', 'failed')}"
             for job in failed]
    log.error("%d of %d jobs failed (python launch/collect.py %s lists every job):\n  %s", len(failed), len(jobs),
              sweep_dir, "\n  ".join(lines[:50]) + (f"\n  ... and {len(lines) - 50} more" if len(lines) > 50 else ""))
    if exit_status:
        failed_sweeps.append((len(failed), len(jobs), str(sweep_dir)))


def _settle_all(sweep_dir: Path) -> None:
    """Give jobs that ended without a word (killed, out of memory, out of requeues) a final status."""
    try:
        unsettled = [e for p in (sweep_dir / _ENTRIES).glob("*.json") if p.stem.isdigit()
                     and (e := _read_json(p)) is not None and e.get("status") not in FINAL]
        states = _slurm_states([e["slurm_job_id"] for e in unsettled if e.get("slurm_job_id")])
        for entry in unsettled:
            state = states.get(entry.get("slurm_job_id") or "")
            if state is None or state.split()[0] not in _SLURM_ENDED:
                continue  # still queued or running, or not a SLURM job: its own process reports
            summary = _read_json(Path(entry["run_dir"]) / "summary.json") or {}
            if summary.get("status") in FINAL:
                entry.update(status=summary["status"], **{k: summary[k] for k in ("error", "objective")
                                                          if k in summary})
            else:
                entry.update(status="failed", error=f"the job ended in SLURM state {state} "
                                                    "without writing a result")
            entry["slurm_state"] = state
            _write_json(_entry_path(sweep_dir, entry["num"]), {**entry, "updated_at": _now()})
        _merge(sweep_dir)
    except OSError as exc:
        log.warning("could not settle %s: %s", sweep_dir / MANIFEST, exc)


def _slurm_states(job_ids: list[str]) -> dict[str, str]:
    if not job_ids or shutil.which("sacct") is None:
        return {}
    try:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
