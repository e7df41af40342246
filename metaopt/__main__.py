"""``python -m metaopt [overrides]``: compose ``conf/config.yaml`` and run :func:`metaopt.train.train`."""

from __future__ import annotations

import logging
import math
import sys

import hydra
from omegaconf import DictConfig

from metaopt.config import config_dir
from metaopt.errors import MetaoptError, describe


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from metaopt.train import train

    try:
        return train(cfg)
    except KeyboardInterrupt:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            from metaopt.hydra_callbacks import job_interrupted

            job_interrupted(HydraConfig.get())
        raise
    except Exception as exc:
        config_error = isinstance(exc, MetaoptError)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            if not config_error:
                raise
            _log_to_files(str(exc))
            print(f"metaopt: error: {exc}", file=sys.stderr)
            sys.exit(2)
        # In a sweep an error ends this job, not the sweep: recorded as failed (summary.json, then
        # manifest.json) and listed when the sweep ends, and the command exits 1. Re-raised, Hydra
        # would print only the first one, as a traceback, after every job had run. A config error
        # is logged as its line, a crash with its traceback (also in the job's metaopt.log). A SLURM
        # requeue is a SystemExit and passes through.
        log = logging.getLogger("metaopt")
        if config_error:
            log.error("job failed: %s", exc)
        else:
            log.exception("job crashed: %s", describe(exc))
        _record_failure(HydraConfig.get().runtime.output_dir, exc)
        return math.inf


def _record_failure(run_dir: str, exc: BaseException) -> None:
    from metaopt.errors import RunDirInUse
    from metaopt.runfiles import RunFiles

    if isinstance(exc, RunDirInUse):  # the directory and its summary are the other run's
        return

    files = RunFiles(run_dir)
    summary = files.read_summary() or {}
    # Raised before the run record existed. A recorded result (a completed run asked for other
    # trainer.steps) is kept: the error refused the new request, not that result.
    if summary.get("status") in (None, "running"):
        files.write_summary({**summary, "status": "failed", "error": describe(exc)})


def _log_to_files(message: str) -> None:
    """Put an error in the run's log file only: the terminal gets it once, as the stderr line."""
    log = logging.getLogger("metaopt")
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for logger in (log, logging.getLogger()):
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)


def main() -> None:
    from metaopt.cli_check import check_keys, check_overrides

    problem = check_overrides(sys.argv[1:]) or check_keys(sys.argv[1:])
    if problem is not None:  # Hydra's own message for this is a screenful
        print(f"metaopt: error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        _hydra_main()
    except KeyboardInterrupt:
        print("metaopt: interrupted", file=sys.stderr)
        sys.exit(130)
    from metaopt.hydra_callbacks import failed_sweeps

    for failed, total, sweep_dir in failed_sweeps:  # each job's error is in the log lines above
        print(f"metaopt: {failed} of {total} jobs failed; see {sweep_dir}/manifest.json", file=sys.stderr)
    if failed_sweeps:
        sys.exit(1)


if __name__ == "__main__":
    main()
