"""Experiment loggers. Plain files (``metrics.jsonl``, ``summary.json``) are written by the loop
whatever the logger; a logger adds a view on top and must never take the run down with it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from metaopt.errors import describe
from metaopt.preemption import Requeued

log = logging.getLogger("metaopt")

WANDB_MODES = ("offline", "online", "disabled")


class Logger:
    """Interface the loop talks to. ``start`` runs once per (re)started run, ``finish`` in ``finally``."""

    def start(self, *, run_dir: Path, config: dict[str, Any], run_id: str, name: str | None,
              group: str | None) -> None:
        del run_dir, config, run_id, name, group

    def log(self, metrics: dict[str, Any], step: int) -> None:
        del metrics, step

    def summary(self, values: dict[str, Any]) -> None:
        del values

    def finish(self, status: str) -> None:
        del status


class NullLogger(Logger):
    """Log nothing beyond the plain files."""


class WandbLogger(Logger):
    """Weights & Biases (offline by default: no account, no network; files in ``<run dir>/wandb``).

    The run id is chosen by the loop and kept in the run directory, so a resumed or requeued run
    continues the same W&B run. ``WANDB_SERVICE`` inherited from a parent process (a submitting
    shell that itself used W&B) points at a service this process does not own, so it is dropped.
    """

    def __init__(self, mode: str = "offline", project: str = "metaopt", entity: str | None = None,
                 group: str | None = None, tags: list[str] | tuple[str, ...] = (), notes: str | None = None,
                 init_timeout: float = 60.0):
        # wandb's own aliases of the two modes, so that WANDB_MODE (the default of logger.mode) may use them.
        mode = {"dryrun": "offline", "run": "online"}.get(str(mode), mode)
        if mode not in WANDB_MODES:  # a typo is bad input (exit 2), not a logger failure to train through
            from metaopt.errors import ConfigError

            raise ConfigError(f"logger.mode: {mode!r} is not one of {', '.join(WANDB_MODES)}")
        self.mode = mode
        self.project = project
        self.entity = entity
        self.group = group
        self.tags = list(tags or ())
        self.notes = notes
        self.init_timeout = init_timeout
        self._run = None

    def start(self, *, run_dir, config, run_id, name, group) -> None:
        os.environ.pop("WANDB_SERVICE", None)
        import wandb

        try:
            self._run = wandb.init(
                project=self.project, entity=self.entity, group=self.group or group, tags=self.tags,
                notes=self.notes, name=name, id=run_id, resume="allow", dir=str(run_dir), config=config,
                mode=self.mode, reinit="finish_previous",
                settings=wandb.Settings(init_timeout=self.init_timeout, console="off", silent=True),
            )
        except Exception as exc:
            if self.mode != "online":
                raise
            raise RuntimeError(f"{describe(exc)} (online, logger.init_timeout={self.init_timeout:g}s); "
                               "without a reachable W&B server or account, logger.mode=offline keeps the run "
                               "in the run dir (upload it later with wandb sync)") from exc

    def log(self, metrics, step) -> None:
        self._run.log(metrics, step=step)

    def summary(self, values) -> None:
        self._run.summary.update(values)

    def finish(self, status) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            run.finish(exit_code=0 if status == "completed" else 1)


class SafeLogger(Logger):
    """Wrap a logger so that its first failure becomes one warning and the run goes on without it."""

    def __init__(self, inner: Logger):
        self.inner: Logger | None = inner

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self.inner is None:
            return
        try:
            getattr(self.inner, method)(*args, **kwargs)
        # SystemExit too: a library's sys.exit (wandb's on some service errors) must not end training.
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a logger must never kill training
            if isinstance(exc, Requeued):  # SLURM's signal requeued the job while the logger ran
                raise
            name = type(self.inner).__name__
            log.warning("%s.%s failed (%s); continuing without this logger (metrics.jsonl and summary.json "
                        "are unaffected)", name, method, describe(exc))
            inner, self.inner = self.inner, None
            if method != "finish":
                try:
                    inner.finish("failed")
                except (Exception, SystemExit):  # noqa: BLE001
                    pass

    def start(self, **kwargs: Any) -> None:
        self._call("start", **kwargs)

    def log(self, metrics, step) -> None:
        self._call("log", metrics, step)

    def summary(self, values) -> None:
        self._call("summary", values)

    def finish(self, status) -> None:
        self._call("finish", status)
