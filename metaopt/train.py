"""The training loop: ``train(cfg) -> float``, the value a sweeper minimises.

One run = one task, one optimizer, one seed. Everything a run produces lands in its run directory
as plain files (see :mod:`metaopt.runfiles`); re-running in the same directory resumes from the
checkpoint and reproduces the metrics an uninterrupted run would have written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from metaopt import preemption, pretrained
from metaopt.config import config_dir, resolve_device, validate
from metaopt.errors import ConfigError, MetaoptError, describe
from metaopt.loggers import Logger, NullLogger, SafeLogger
from metaopt.nn_utils import frozen_running_stats
from metaopt.optim import optimizer_state_bytes, requires_closure, set_mode
from metaopt.progress import Progress
from metaopt.runfiles import RunFiles, rng_state, seed_everything, set_rng_state
from metaopt.tasks.base import Task

log = logging.getLogger("metaopt")

# Config sections that determine a run's trajectory: a checkpoint is only resumed by the same ones.
_FINGERPRINT_KEYS = ("seed", "task", "optimizer", "scheduler", "meta")
_SHIPPED = str(Path(pretrained.__file__).resolve().parent) + os.sep


@dataclass
class Passes:
    """Forward and backward passes over training minibatches (line searches pay extra forwards)."""

    forward: int = 0
    backward: int = 0


@dataclass
class Components:
    task: Task
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    needs_closure: bool
    device: torch.device
    callback: Callback | None = None
    num_params: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_params = sum(p.numel() for p in self.model.parameters())


class GracefulStop:
    """Once installed, Ctrl-C (SIGINT) or SIGTERM asks the loop to stop at the next step boundary.

    A KeyboardInterrupt raised mid-step would leave model, optimizer and schedule out of step with
    each other, and a plain SIGTERM would lose what the logger had not flushed; so the loop
    checkpoints where a step has finished, finishes the logger and stops. A second signal stops at
    once. Installed only on the main thread and only over the default handlers: a host program's
    (or submitit's) own handling is left alone.
    """

    _DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._installed: list[signal.Signals] = []

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, default in self._DEFAULTS.items():
            if signal.getsignal(signum) is default:
                signal.signal(signum, self._on_signal)
                self._installed.append(signum)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal_name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.remove()
        log.warning("%s: checkpointing at the end of this step, then stopping (a second one stops at once)",
                    self.signal_name)

    def remove(self) -> None:
        while self._installed:
            signum = self._installed.pop()
            signal.signal(signum, self._DEFAULTS[signum])

    def after_last_step(self) -> None:
        """A signal during the last step (no boundary left to stop at): the run is complete and recorded;
        stop now, as asked, rather than go on (to the next job of a sweep)."""
        if self.requested:
            log.warning("%s during the last step: the run completed; stopping", self.signal_name)
            raise KeyboardInterrupt

    def stop(self, files: RunFiles, summary: dict[str, Any], step: int, total: int, resume_with: str) -> None:
        """After the checkpoint at ``step``: record the run as interrupted and raise KeyboardInterrupt."""
        summary.update(status="interrupted", steps=step,
                       error=f"interrupted ({self.signal_name}) at step {step}, checkpoint saved")
        files.write_summary(summary)
        log.warning("interrupted at step %d of %d; checkpoint saved: re-run the same command with %s to resume",
                    step, total, resume_with)
        raise KeyboardInterrupt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate`` a config group, turning constructor errors into a one-line ConfigError.

    ``_convert_="all"`` hands constructors plain lists and dicts: an optimizer that keeps a YAML list
    (Prodigy's ``betas``) as an OmegaConf ``ListConfig`` in its param_groups writes a checkpoint that
    ``torch.load(weights_only=True)`` refuses, so the run could never resume.
    """
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, MetaoptError):
            raise cause from None
        missing = _cause_of(cause, ModuleNotFoundError)
        if missing is not None:
            raise ConfigError(f"{key} ({node.get('_target_')}): module {missing.name!r} is not installed (the "
                              "peer optimizers come with the peers extra: pip install -e '.[peers]' in the "
                              "metaopt checkout)") from exc
        raise ConfigError(f"{key} ({node.get('_target_')}): {_first_line(cause)}{_type_hint(cause, key)}") from exc


def _type_hint(exc: BaseException, key: str) -> str:
    # A wrong value type surfaces in the constructor's own words ("'float' object is not
    # subscriptable"): say which values to look at.
    return f" (a value of the wrong type among {key}.*?)" if _cause_of(exc, TypeError) is not None else ""


def _cause_of(exc: BaseException | None, kind: type[BaseException]) -> Any:
    """The first exception of type ``kind`` in ``exc``'s chain of causes (itself included), or None.

    Hydra and OmegaConf wrap what went wrong (a missing module, a resolver's ConfigError) in
    their own exceptions, sometimes more than once."""
    while exc is not None and not isinstance(exc, kind):
        exc = exc.__cause__ or exc.__context__
    return exc


def _call(factory: Callable[..., Any], key: str, target: str, *args: Any) -> Any:
    """Finish a ``_partial_`` config (optimizer, scheduler) with run-time arguments."""
    try:
        return factory(*args)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key} ({target}): {_first_line(exc)}{_type_hint(exc, key)}") from exc


def build(cfg: DictConfig) -> Components:
    """Check the config and build task, model, optimizer and schedule, before any training."""
    validate(cfg)
    device = resolve_device(str(cfg.device))
    if cfg.trainer.get("threads"):
        torch.set_num_threads(int(cfg.trainer.threads))
    if cfg.trainer.get("deterministic", False):
        _use_deterministic_algorithms()
    seed_everything(int(cfg.seed))
    task = _build(cfg.task, "task", seed=int(cfg.seed), device=str(device))
    model = task.model.to(device)
    opt_factory = _build(cfg.optimizer, "optimizer")
    optimizer = _call(opt_factory, "optimizer", cfg.optimizer._target_, model.parameters())
    sched_factory = _build(cfg.scheduler, "scheduler")
    scheduler = _call(sched_factory, "scheduler", cfg.scheduler._target_, optimizer)
    callback = _build(cfg.analysis, "analysis") if cfg.get("analysis") else None
    return Components(task, model, optimizer, scheduler, requires_closure(optimizer), device, callback)


def _use_deterministic_algorithms() -> None:
    """Bitwise-reproducible GPU runs (cuDNN convolutions are otherwise nondeterministic); slower."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def fingerprint(cfg: DictConfig) -> str:
    sections = {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg.get(k), DictConfig)
                else cfg.get(k) for k in _FINGERPRINT_KEYS}
    return hashlib.sha256(json.dumps(_by_name(sections), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _by_name(value: Any) -> Any:
    """Weights shipped inside the package (``${pretrained:name}``) by their name, not their path:
    the same run from another checkout or install of metaopt is the same run."""
    if isinstance(value, dict):
        return {k: _by_name(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_by_name(v) for v in value]
    if isinstance(value, str) and value.startswith(_SHIPPED):
        return "pretrained:" + value[len(_SHIPPED):]
    return value


def resume_with(hydra_info: dict[str, Any], files: RunFiles) -> str:
    """The override that resumes this run: its sweep dir in a multirun, else its run dir."""
    return hydra_info.get("resume_with", f"hydra.run.dir={files.dir}")


def _hydra_run_info() -> dict[str, Any]:
    """Run dir, W&B group and name from Hydra when running under it; empty otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    info: dict[str, Any] = {"run_dir": hc.runtime.output_dir}
    if hc.mode == RunMode.MULTIRUN:
        sweep = Path(hc.sweep.dir)
        info["group"] = f"{sweep.parent.name}_{sweep.name}"
        info["name"] = hc.job.override_dirname or f"job{hc.job.num}"
        info["resume_with"] = f"hydra.sweep.dir={Path(hc.sweep.dir).absolute()}"
    return info


class Callback:
    """Hooks the loop calls around each optimizer step: analysis tools plug in here.

    Configured by the ``analysis`` group (``analysis=none`` builds none). A callback must not
    consume the global RNG or leave the model changed, so a run with analysis follows the same
    trajectory as one without. ``after_step`` may return scalars; they join the next metrics record.
    """

    def on_start(self, c: Components, run_dir: Path) -> None:
        del c, run_dir

    def before_step(self, step: int, batch: Any, c: Components) -> None:
        del step, batch, c

    def after_step(self, step: int, batch: Any, c: Components) -> dict[str, float] | None:
        del step, batch, c
        return None

    def on_end(self, c: Components, run_dir: Path) -> None:
        del c, run_dir


class _Closure:
    """The closure handed to optimizers that need one.

    With gradients enabled it is an LBFGS closure (zero grads, forward, backward). With gradients
    disabled (a line search's trial point) it only runs the forward, and keeps BatchNorm running
    statistics where they were, so they move once per optimizer step.
    """

    def __init__(self, c: Components, passes: Passes):
        self.c, self.passes, self.batch = c, passes, None

    def __call__(self) -> torch.Tensor:
        c = self.c
        if torch.is_grad_enabled():
            c.optimizer.zero_grad(set_to_none=True)
            loss = c.task.loss(self.batch)
            loss.backward()
            self.passes.backward += 1
        else:
            with frozen_running_stats(c.model):
                loss = c.task.loss(self.batch)
        self.passes.forward += 1
        return loss


def _evaluate(c: Components, split: str) -> dict[str, float]:
    set_mode(c.optimizer, "eval")  # Schedule-Free: evaluate the averaged weights
    try:
        return {f"{'val' if split == 'validation' else split}/{k}": float(v)
                for k, v in c.task.evaluate(split).items()}
    finally:
        set_mode(c.optimizer, "train")


def _diagnostics(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    diag = getattr(optimizer, "diagnostics", None)
    if not callable(diag):
        return {}
    out = {}
    for k, v in diag().items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float, str, bool)):
            out[f"opt/{k}"] = v
    return out


def _resolve_interpolations(cfg: DictConfig) -> None:
    """Resolve every interpolation once, before anything runs: an error of a resolver (an unknown
    ``${pretrained:name}``) or a dangling reference becomes one ConfigError naming the key."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as exc:
        cause = _cause_of(exc, MetaoptError)
        if cause is not None:
            raise cause from None
        raise ConfigError(f"{exc.full_key}: {_first_line(exc)}") from None


def _finite(x: Any) -> bool:
    return not isinstance(x, float) or math.isfinite(x)


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> float:
    """Run one experiment; return the final validation loss (``inf`` if the run diverged).

    ``run_dir`` defaults to Hydra's output directory; outside Hydra it must be given. A directory
    that holds a checkpoint of the same config is resumed; one whose run completed returns its result.
    """
    hydra_info = _hydra_run_info()
    run_dir = run_dir or hydra_info.get("run_dir")
    if not run_dir:
        raise ValueError("train(cfg) outside Hydra needs run_dir=")
    run_dir = Path(run_dir)
    _resolve_interpolations(cfg)
    if cfg.get("meta") is not None:
        if "_target_" not in cfg.meta:  # e.g. an experiment's meta.* deltas on top of meta=none
            choices = ", ".join(sorted(p.stem for p in (config_dir() / "meta").glob("*.yaml") if p.stem != "none"))
            raise ConfigError(f"meta: settings given but no outer trainer selected; pick one with meta=<name>, "
                              f"one of {choices}")
        # An outer loop (meta-training a learned optimizer) owns the run: see the `meta` group.
        return float(_build(cfg.meta, "meta").run(cfg, run_dir))
    record = RunRecord(cfg, run_dir)
    if record.completed_objective is not None:
        done = record.previous.get("target_steps")
        if done is not None and int(done) != int(cfg.trainer.steps):
            raise ConfigError(f"trainer.steps: {run_dir} holds a run finished for {done} steps, not "
                              f"{int(cfg.trainer.steps)}; choose a new run directory")
        log.info("run in %s already %s; returning its result", run_dir, record.previous["status"])
        return record.completed_objective

    def body() -> float:
        c = build(cfg)
        record.logger = SafeLogger(_build(cfg.logger, "logger") if cfg.get("logger") else NullLogger())
        return _run(cfg, c, record.files, record.logger, record.summary, hydra_info)

    return record.run(body)


class RunRecord:
    """What every run directory goes through, for the training loop and the outer trainer alike.

    A directory whose run completed (or diverged) with the same config has ``completed_objective``
    set (re-running returns it). Otherwise :meth:`run` executes the body; any exception is recorded as
    ``status: failed`` (``interrupted`` for Ctrl-C) with its first line in ``summary.json`` before it
    propagates, and the logger is finished and the files closed whatever happens.
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.files = RunFiles(run_dir)
        fp = fingerprint(cfg)
        previous = self.files.read_summary() or {}
        # A diverged run is a result too (objective inf): seeded runs would diverge the same way again.
        finished = previous.get("status") in ("completed", "diverged")
        # Checked before anything is written there: a finished result of another config must not be
        # overwritten (a run that failed or never got going may be replaced, e.g. after a typo).
        if finished and previous.get("fingerprint") != fp:
            raise ConfigError(f"hydra.run.dir: {self.files.dir} holds a run of a different config "
                              "(task/optimizer/scheduler/seed); choose a new run directory")
        self.previous = previous
        self.completed_objective: float | None = float(previous["objective"]) if finished else None
        self.summary: dict[str, Any] = {"status": "running", "run_dir": str(self.files.dir), "fingerprint": fp,
                                        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.logger: Logger = NullLogger()

    def run(self, body: Callable[[], float]) -> float:
        # Before the try: a directory held by another live run gets nothing written by this one.
        self.files.lock()
        try:
            return body()
        except BaseException as exc:
            if self.summary["status"] == "running":
                interrupted = isinstance(exc, KeyboardInterrupt)
                self.summary.update(status="interrupted" if interrupted else "failed",
                                    error="interrupted (Ctrl-C)" if interrupted else describe(exc))
                self.files.write_summary(self.summary)
            raise
        finally:
            self.logger.finish(self.summary["status"])
            self.files.close()


@dataclass
class LoopState:
    """Where the loop is; saved in the checkpoint so a resumed run logs exactly what it would have."""

    step: int = 0
    elapsed: float = 0.0  # training seconds, evaluation/logging/checkpointing excluded
    passes: Passes = field(default_factory=Passes)
    loss_sum: float = 0.0  # train loss summed since the last record (the record logs the mean)
    loss_count: int = 0
    best_val: float = math.inf
    last_val: dict[str, float] = field(default_factory=dict)
    # Step and clock at the first record: the step time leaves out the first steps' warm-up.
    warm_step: int = 0
    warm_elapsed: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {**vars(self), "passes": vars(self.passes)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LoopState:
        return cls(**{**state, "passes": Passes(**state["passes"])})


def _run(cfg: DictConfig, c: Components, files: RunFiles, logger: Logger, summary: dict[str, Any],
         hydra_info: dict[str, Any]) -> float:
    trainer = cfg.trainer
    steps, eval_every, log_every = int(trainer.steps), int(trainer.eval_every), int(trainer.log_every)
    checkpoint_every = int(trainer.checkpoint_every)
    st = LoopState()

    checkpoint = files.load_checkpoint()
    if checkpoint is not None:
        if checkpoint["fingerprint"] != summary["fingerprint"]:
            raise ConfigError(f"hydra.run.dir: {files.dir} holds a checkpoint of a different config "
                              "(task/optimizer/scheduler/seed); choose a new run directory")
        c.model.load_state_dict(checkpoint["model"])
        c.optimizer.load_state_dict(checkpoint["optimizer"])
        if c.scheduler is not None:
            c.scheduler.load_state_dict(checkpoint["scheduler"])
        c.task.load_state_dict(checkpoint["task"])
        set_rng_state(checkpoint["rng"])
        st = LoopState.from_state_dict(checkpoint["loop"])
        log.info("resuming %s from step %d", files.dir, st.step)
    files.truncate_metrics(after_step=st.step)

    logger.start(run_dir=files.dir, config=OmegaConf.to_container(cfg, resolve=True), run_id=files.run_id(),
                 name=hydra_info.get("name"), group=hydra_info.get("group"))
    log.info("run dir: %s", files.dir)
    summary.update(task=cfg.task._target_, optimizer=cfg.optimizer._target_, seed=int(cfg.seed),
                   device=str(c.device), num_params=c.num_params, target_steps=steps)

    def save_checkpoint() -> None:
        files.save_checkpoint({
            "fingerprint": summary["fingerprint"], "loop": st.state_dict(),
            "model": c.model.state_dict(), "optimizer": c.optimizer.state_dict(),
            "scheduler": c.scheduler.state_dict() if c.scheduler is not None else None,
            "task": c.task.state_dict(), "rng": rng_state(),
        })

    closure = _Closure(c, st.passes) if c.needs_closure else None
    progress = Progress(str(trainer.get("progress", "auto")), steps, st.step)
    loss_sum = torch.full((), st.loss_sum, device=c.device)  # on device: no host sync per step
    record: dict[str, Any] = {}
    pending: dict[str, Any] = {}  # callback metrics waiting for the next record
    callback = c.callback
    if callback is not None:
        callback.on_start(c, files.dir)
    diverged = False
    clock = time.perf_counter()  # st.elapsed is brought up to date at each record and checkpoint
    c.model.train()
    set_mode(c.optimizer, "train")
    stop = GracefulStop()
    try:
        stop.install()
        while st.step < steps:
            batch = c.task.batch(st.step)
            if callback is not None:  # analysis time is kept off the training clock
                t0 = time.perf_counter()
                callback.before_step(st.step, batch, c)
                clock += time.perf_counter() - t0
            if closure is not None:
                closure.batch = batch
                loss = c.optimizer.step(closure)
            else:
                c.optimizer.zero_grad(set_to_none=True)
                loss = c.task.loss(batch)
                loss.backward()
                c.optimizer.step()
                st.passes.forward += 1
                st.passes.backward += 1
            if c.scheduler is not None:
                c.scheduler.step()
            if callback is not None:
                t0 = time.perf_counter()
                pending.update(callback.after_step(st.step, batch, c) or {})
                clock += time.perf_counter() - t0
            c.task.advance(st.step)
            st.step += 1
            loss_sum += loss.detach()
            st.loss_count += 1

            do_eval = st.step % eval_every == 0 or st.step == steps
            do_checkpoint = ((st.step % checkpoint_every == 0 or preemption.requested() or stop.requested)
                             and st.step < steps)
            if not (do_eval or do_checkpoint or st.step % log_every == 0):
                continue
            now = time.perf_counter()
            st.elapsed += now - clock
            if do_eval or st.step % log_every == 0:
                if not st.warm_step:
                    st.warm_step, st.warm_elapsed = st.step, st.elapsed
                record = {"step": st.step, "time": st.elapsed, "passes/forward": st.passes.forward,
                          "passes/backward": st.passes.backward,
                          "train/loss": (loss_sum / st.loss_count).item()}
                loss_sum.zero_()
                st.loss_count = 0
                if "lr" in c.optimizer.param_groups[0]:
                    record["lr"] = float(c.optimizer.param_groups[0]["lr"])
                record.update(_diagnostics(c.optimizer))
                record.update(pending)
                pending.clear()
                if do_eval and _finite(record["train/loss"]):
                    st.last_val = _evaluate(c, "validation")
                    record.update(st.last_val)
                    st.best_val = min(st.best_val, st.last_val.get("val/loss", math.inf))
                files.append_metrics(record)
                logger.log(record, st.step)
                progress.update(st.step, record)
                if not all(_finite(record.get(k)) for k in ("train/loss", "val/loss")):
                    diverged = True
                    break
            if do_checkpoint:
                st.loss_sum = loss_sum.item()
                save_checkpoint()
                if preemption.requested():  # SLURM's time-limit/preemption signal: resume from here
                    preemption.requeue(files, summary, logger)
                if stop.requested:
                    stop.stop(files, summary, st.step, steps, resume_with(hydra_info, files))
            clock = time.perf_counter()
    finally:
        stop.remove()
        progress.close()
    if callback is not None:
        callback.on_end(c, files.dir)
    summary.update(steps=st.step, wall_time=st.elapsed, passes=vars(st.passes),
                   optimizer_state_bytes=optimizer_state_bytes(c.optimizer),
                   step_time_mean=(st.elapsed - st.warm_elapsed) / (st.step - st.warm_step) if st.step > st.warm_step
                   else st.elapsed / max(st.step, 1))
    summary["optimizer_state_bytes_per_param"] = summary["optimizer_state_bytes"] / max(c.num_params, 1)
    if diverged:
        summary.update(status="diverged", diverged_at=st.step, objective=math.inf,
                       final={k: v for k, v in record.items() if k.startswith(("train/", "val/"))})
        log.warning("run diverged by step %d (non-finite loss); metrics so far are in %s", st.step, files.dir)
    else:
        final = dict(st.last_val or _evaluate(c, "validation"))
        if "test" in c.task.splits:
            final.update(_evaluate(c, "test"))
        if "train/loss" in record:
            final["train/loss"] = record["train/loss"]
        st.loss_sum = 0.0
        save_checkpoint()
        summary.update(status="completed", objective=final.get("val/loss", math.inf), final=final,
                       best={"val/loss": st.best_val})
    summary["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    files.write_summary(summary)
    logger.summary({k: v for k, v in summary.items() if not isinstance(v, dict)} | summary.get("final", {}))
    written = [name for name in ("summary.json", "metrics.jsonl", "checkpoint.pt", "wandb/")
               if (files.dir / name).exists()]
    log.info("%s: %d steps in %.1fs, %s; results in %s (%s)", summary["status"], st.step, st.elapsed,
             " ".join(f"{k}={v:.4g}" for k, v in summary.get("final", {}).items() if isinstance(v, float)),
             files.dir, ", ".join(written))
    stop.after_last_step()
    return float(summary["objective"])
