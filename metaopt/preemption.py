"""Checkpoint, then requeue, when SLURM warns a job that its time is up (time limit or preemption).

Jobs of a ``hydra/launcher=slurm`` sweep run under submitit, which traps SLURM's warning signal
(``USR2``, sent ``signal_delay_s`` before the time limit) with a handler that pickles the job,
requeues it and exits on the spot: from the middle of a step, losing every step since the last
periodic checkpoint. :func:`install` puts a flag in front of that handler. The signal then only
sets the flag; the training loop looks at :func:`requested` after each step, saves its
checkpoint there and calls :func:`requeue`, which hands over to submitit's handler. The
requeued job is the same Hydra job with the same run dir, so it resumes through the ordinary
resume path: same checkpoint, same W&B run id, the same metrics as a run never interrupted.

A job that does not reach a step boundary in time (a long evaluation, an outer loop that never
looks at the flag) is not left to be killed at the limit: ``fallback_s`` after the signal,
submitit's handler runs wherever the job is, and the requeued job resumes from its last
periodic checkpoint (until it does, the run's summary says ``failed`` with :class:`Requeued`).

A training loop takes part with two lines after each step (``metaopt.train`` and the outer
trainer do): include ``requested()`` in the condition for saving a checkpoint, and after saving
it, ``if requested(): requeue(files, summary, logger)``.

Outside submitit (a plain run, the basic launcher) :func:`install` does nothing and
:func:`requested` stays ``False``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("metaopt")

_requested = False  # read after every training step: a plain global, no call into the OS
_signum: int | None = None
_submitit_handler: Callable[[int, Any], Any] | None = None
_fallback_s: float | None = None
_timer: threading.Timer | None = None
_overdue = False  # the loop missed its chance: the next signal requeues on the spot
_hooks: list[Callable[[], None]] = []


class Requeued(SystemExit):
    """The job was requeued and this process is leaving; the requeued job resumes the run."""

    def __str__(self) -> str:
        return "the job was requeued by SLURM's signal and resumes from its last checkpoint"


def requested() -> bool:
    """Whether SLURM asked this job to stop: checkpoint at this step boundary and :func:`requeue`."""
    return _requested


def install(fallback_s: float | None = 30.0) -> bool:
    """Take over submitit's warning-signal handler in this process; ``False`` outside submitit.

    ``fallback_s``: seconds the loop has to act on the signal before submitit's handler runs
    anyway (``None``: never).
    """
    global _signum, _submitit_handler, _fallback_s
    if _submitit_handler is not None:
        _fallback_s = fallback_s
        return True
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return False  # not a submitit job; spare every plain run the import (~0.1 s)
    try:
        from submitit.core.job_environment import JobEnvironment, SignalHandler
    except ImportError:
        return False
    signum = JobEnvironment._usr_sig()
    current = signal.getsignal(signum)
    if not isinstance(getattr(current, "__self__", None), SignalHandler):
        return False  # not inside a submitit job, or someone else owns the signal
    _signum, _submitit_handler, _fallback_s = signum, current, fallback_s
    signal.signal(signum, _on_signal)
    return True


def job_done() -> None:
    """The job's task has returned: forget any request, and ignore the signal from now on.

    A signal that comes between here and the end of the process has nothing left to save;
    submitit's handler would requeue a finished job only for it to return its result again.
    """
    global _requested, _overdue, _signum, _submitit_handler
    _cancel_timer()
    if _submitit_handler is not None and _signum is not None:
        signal.signal(_signum, signal.SIG_IGN)
    _requested = _overdue = False
    _signum = _submitit_handler = None
    _hooks.clear()


def on_requeue(hook: Callable[[], None]) -> None:
    """Call ``hook()`` once the job is requeued, just before this process leaves."""
    _hooks.append(hook)


def requeue(files: Any = None, summary: dict[str, Any] | None = None, logger: Any = None) -> None:
    """Requeue this job through submitit and leave; call it right after saving the checkpoint.

    With ``files`` (:class:`metaopt.runfiles.RunFiles`) and ``summary``, the run's summary is
    written with ``status: requeued`` first; ``logger`` is finished before the requeue, because
    ``scontrol requeue`` sends SIGTERM to every process of the job, W&B's service among them.
    Raises :class:`Requeued` (a ``SystemExit``) once the job is requeued; submitit's
    ``UncompletedJobError`` when it may not be requeued any more (``max_num_timeout`` reached),
    and the run is then recorded as failed with that reason. Returns at once on a non-zero rank
    of a multi-task job, which carries on: rank 0 requeues the whole job.
    """
    global _requested
    if _submitit_handler is None or _signum is None:
        raise RuntimeError("preemption.requeue() outside a submitit job")
    _cancel_timer()
    handler, signum = _submitit_handler, _signum
    if getattr(getattr(handler, "__self__", None), "env", None) is not None and handler.__self__.env.global_rank:
        _requested = False
        return
    if files is not None and summary is not None:
        summary["status"] = "requeued"
        files.write_summary(summary)
    if logger is not None:
        logger.finish("requeued")
    _stop_wandb_service()
    try:
        handler(signum, None)  # pickles the Hydra job, runs `scontrol requeue`, then sys.exit
    except SystemExit as exc:
        log.warning("job requeued after SLURM's signal; it resumes from the checkpoint in the run dir")
        for hook in list(_hooks):
            try:
                hook()
            except Exception as hook_exc:  # noqa: BLE001 - the job is requeued; leave regardless
                log.warning("requeue hook failed: %s", hook_exc)
        raise Requeued(exc.code) from None
    except BaseException:
        if summary is not None:
            summary["status"] = "running"  # not requeued after all: the loop records the failure
        raise
    raise RuntimeError("submitit's handler returned without requeueing or exiting")


def _stop_wandb_service() -> None:
    """Stop W&B's service process while this process still owns it: the requeue's SIGTERM would
    kill it first, and W&B's exit hook then fails noisily on the lost connection."""
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    try:
        wandb.teardown()
    except Exception as exc:  # noqa: BLE001 - the run's files are written; leave regardless
        log.debug("wandb.teardown failed: %s", exc)


def _on_signal(signum: int, frame: Any) -> None:
    global _requested, _timer
    del frame
    if _overdue:
        requeue()
    if _requested:
        return
    _requested = True
    log.warning("SLURM signal %s: checkpointing at the next step, then requeueing",
                signal.Signals(signum).name)
    if _fallback_s is not None:
        _timer = threading.Timer(_fallback_s, _fall_back, args=(signum, threading.main_thread().ident))
        _timer.daemon = True
        _timer.start()


def _fall_back(signum: int, main_thread: int) -> None:
    global _overdue
    if not _requested or _submitit_handler is None:
        return
    log.warning("no step boundary within %.0fs of SLURM's signal; requeueing from the last periodic "
                "checkpoint", _fallback_s)
    _overdue = True
    signal.pthread_kill(main_thread, signum)  # handlers run on the main thread: let it requeue


def _cancel_timer() -> None:
    global _timer
    if _timer is not None:
        _timer.cancel()
        _timer = None
