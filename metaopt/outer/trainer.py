"""The outer loop: meta-train a learned optimizer on a task family (``meta=full_bptt|truncated_bptt|es|pes``).

``python -m metaopt meta=pes task=linreg optimizer=learned_rnn`` builds the learned optimizer from
``optimizer.lopt`` (warm-started from ``optimizer.checkpoint`` when set), the task family from
``task`` (each draw: that task with a fresh seed), and runs ``meta.steps`` meta-iterations. The run
directory then holds, besides the loop's usual files:

- ``lopt.pt``: the meta-trained weights (``optimizer=learned checkpoint=<run dir>`` trains with them);
- ``metrics.jsonl``: per meta-step ``train/loss`` (meta-objective on the training tasks), ``meta/*``,
  and at meta-evaluations ``val/loss`` (mean normalised loss on held-out tasks) and ``val/final``;
- ``meta_eval.json`` and ``meta_curves.png``: held-out inner-loss curves of the learned optimizer
  and the tuned baselines, and the meta-training curve;
- ``checkpoint.pt``: the whole outer state (φ, meta-optimizer, schedule, the estimator's persistent
  inner runs, history), from which a re-run in the same directory resumes to the same result.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metaopt import preemption
from metaopt.config import resolve_device, validate
from metaopt.errors import ConfigError
from metaopt.learned.base import LOPT_FILE, LearnedOptimizer, load_into, load_lopt, save_lopt
from metaopt.loggers import Logger, NullLogger, SafeLogger
from metaopt.outer.baselines import Baseline, tune
from metaopt.outer.estimators import GradientEstimator, MetaContext
from metaopt.outer.families import TaskFamily, build_family
from metaopt.outer.unroll import evaluate
from metaopt.progress import Progress
from metaopt.runfiles import RunFiles, atomic_write_bytes, rng_state, seed_everything, set_rng_state
from metaopt.tasks._common import derive_seed

log = logging.getLogger("metaopt")

EVAL_FILE = "meta_eval.json"
PLOT_FILE = "meta_curves.png"


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"meta.{name}: must be a positive integer, got {value!r}")
    return int(value)


def _number(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            (positive and value <= 0) or value < 0:
        raise ConfigError(f"meta.{name}: must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return float(value)


class MetaTrainer:
    """Meta-train ``optimizer.lopt`` on tasks drawn like ``task``; ``run(cfg, run_dir)`` returns the
    final held-out mean normalised loss.

    Each meta-step: the estimator's meta-gradient over ``tasks_per_step`` tasks (inner runs of
    ``horizon`` steps, truncated every ``unroll`` steps by truncating estimators), plus the
    gradient of ``l2·‖φ‖²``, clipped element-wise to ±``clip``, then Adam with learning rate
    ``lr·lr_decay^⌊step/lr_decay_every⌋`` (Maheswaranathan et al. 2021: Adam, exponentially
    decayed meta-lr, element-wise clipping).

    Every ``eval_every`` meta-steps and at the end, the learned optimizer trains ``eval_tasks``
    held-out tasks (seeds disjoint from training draws) for ``horizon`` steps; the baselines, each
    tuned once over its learning-rate grid on the same tasks, are the reference.

    Args:
      estimator: a :class:`~metaopt.outer.estimators.GradientEstimator`.
      steps, tasks_per_step, horizon, unroll: budgets (``unroll`` null: whole runs; it must divide
        ``horizon`` and may be set only for truncating estimators).
      lr, lr_decay, lr_decay_every, l2, clip: the meta-optimizer.
      max_normalized_loss: cap of the per-step normalised loss (see :mod:`metaopt.outer.unroll`).
      eval_every, eval_tasks: meta-evaluation (``eval_every`` 0: at the end only).
      baselines: name → :class:`~metaopt.outer.baselines.Baseline` to tune and compare against.
      family: options of the task family (e.g. ``init_box``).
      checkpoint_every, log_every: outer-state checkpoints and metrics records, in meta-steps.
      num_threads: torch CPU threads while meta-training (null: leave as is). Inner runs are many
        tiny operations, which on a busy machine run several times faster on one thread.
    """

    def __init__(
        self,
        estimator: GradientEstimator,
        steps: int = 100,
        tasks_per_step: int = 8,
        horizon: int = 200,
        unroll: int | None = None,
        lr: float = 3e-3,
        lr_decay: float = 0.555,
        lr_decay_every: int = 1000,
        l2: float = 1e-6,
        clip: float = 1.0,
        max_normalized_loss: float = 10.0,
        eval_every: int = 50,
        eval_tasks: int = 32,
        baselines: Mapping[str, Baseline] | None = None,
        family: Mapping[str, Any] | None = None,
        checkpoint_every: int = 50,
        log_every: int = 5,
        num_threads: int | None = 1,
    ):
        if not isinstance(estimator, GradientEstimator):
            raise ConfigError(f"meta.estimator: expected a GradientEstimator, got {type(estimator).__name__}")
        self.estimator = estimator
        self.steps = _positive_int("steps", steps)
        self.tasks_per_step = _positive_int("tasks_per_step", tasks_per_step)
        self.horizon = _positive_int("horizon", horizon)
        if unroll is None:
            unroll = self.horizon
        self.unroll = _positive_int("unroll", unroll)
        if self.horizon % self.unroll:
            raise ConfigError(f"meta.unroll: must divide meta.horizon ({self.horizon}), got {self.unroll}")
        if not estimator.truncated and self.unroll != self.horizon:
            raise ConfigError(f"meta.unroll: {type(estimator).__name__} unrolls whole runs; set it to null "
                              "or use meta=truncated_bptt or meta=pes")
        self.lr = _number("lr", lr, positive=True)
        self.lr_decay = _number("lr_decay", lr_decay, positive=True)
        self.lr_decay_every = _positive_int("lr_decay_every", lr_decay_every)
        self.l2 = _number("l2", l2)
        self.clip = _number("clip", clip, positive=True)
        self.cap = _number("max_normalized_loss", max_normalized_loss, positive=True)
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
            raise ConfigError(f"meta.eval_every: must be a non-negative integer, got {eval_every!r}")
        self.eval_every = eval_every
        self.eval_tasks = _positive_int("eval_tasks", eval_tasks)
        self.baselines = dict(baselines or {})
        for name, b in self.baselines.items():
            if not isinstance(b, Baseline):
                raise ConfigError(f"meta.baselines.{name}: expected a Baseline, got {type(b).__name__}")
        self.family_options = dict(family or {})
        self.checkpoint_every = _positive_int("checkpoint_every", checkpoint_every)
        self.log_every = _positive_int("log_every", log_every)
        if num_threads is not None:
            num_threads = _positive_int("num_threads", num_threads)
        self.num_threads = num_threads

    # -- building ----------------------------------------------------------------------------

    @staticmethod
    def build_lopt(cfg: DictConfig) -> LearnedOptimizer:
        """The learned optimizer to meta-train: ``optimizer.lopt``, warm-started from ``optimizer.checkpoint``."""
        opt = cfg.get("optimizer")
        node = opt.get("lopt") if opt is not None else None
        checkpoint = opt.get("checkpoint") if opt is not None else None
        if node is None and checkpoint is None:
            raise ConfigError(f"optimizer: meta-training needs a learned optimizer (optimizer=learned_rnn or "
                              f"learned_mlp), got {opt.get('_target_') if opt is not None else None}")
        try:
            if node is None:
                return load_lopt(checkpoint)
            lopt = instantiate(node, _convert_="all")
        except ValueError as exc:
            raise ConfigError(f"optimizer.{exc}" if str(exc).startswith("checkpoint:") else
                              f"optimizer.lopt: {exc}") from None
        if not isinstance(lopt, LearnedOptimizer):
            raise ConfigError(f"optimizer.lopt: {node.get('_target_')} is not a LearnedOptimizer")
        if checkpoint is not None:
            try:
                lopt = load_into(lopt, checkpoint)
            except ValueError as exc:
                raise ConfigError(f"optimizer.{exc}") from None
            log.info("meta-training starts from the weights in %s", checkpoint)
        return lopt

    @staticmethod
    def build_family(cfg: DictConfig, device: torch.device, options: Mapping[str, Any]) -> TaskFamily:
        from metaopt.train import _build

        task_cfg = cfg.task

        def make_task(seed: int):
            return _build(task_cfg, "task", seed=int(seed), device=str(device))

        return build_family(make_task, **options)

    # -- running -----------------------------------------------------------------------------

    def run(self, cfg: DictConfig, run_dir: str | Path) -> float:
        from metaopt.train import RunRecord, _build, _hydra_run_info

        record = RunRecord(cfg, run_dir)
        if record.completed_objective is not None:
            log.info("meta-training in %s already completed; returning its result", record.files.dir)
            return record.completed_objective

        def body() -> float:
            threads = torch.get_num_threads()
            try:
                if self.num_threads is not None:
                    torch.set_num_threads(self.num_threads)
                validate(cfg)
                device = resolve_device(str(cfg.device))
                seed_everything(int(cfg.seed))
                lopt = self.build_lopt(cfg).to(device)
                family = self.build_family(cfg, device, self.family_options)
                record.logger = SafeLogger(_build(cfg.logger, "logger") if cfg.get("logger") else NullLogger())
                return self._run(cfg, lopt, family, record.files, record.logger, record.summary,
                                 _hydra_run_info())
            finally:
                torch.set_num_threads(threads)

        return record.run(body)

    def _run(self, cfg: DictConfig, lopt: LearnedOptimizer, family: TaskFamily, files: RunFiles, logger: Logger,
             summary: dict[str, Any], info: dict[str, Any]) -> float:
        from metaopt.train import GracefulStop, resume_with

        seed = int(cfg.seed)
        ctx = MetaContext(lopt, family, self.tasks_per_step, self.horizon, self.unroll, self.cap, seed)
        params = list(lopt.parameters())
        meta_opt = torch.optim.Adam(params, lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(meta_opt, step_size=self.lr_decay_every, gamma=self.lr_decay)
        est_state = self.estimator.init_state(ctx)
        eval_seeds = [derive_seed(seed, "meta-eval-task", i) for i in range(self.eval_tasks)]
        loop: dict[str, Any] = {"step": 0, "elapsed": 0.0, "step_time": 0.0, "best": math.inf,
                                "last_eval": None, "skipped": 0, "loss_sum": 0.0, "loss_count": 0}
        baselines: dict[str, Any] | None = None

        checkpoint = files.load_checkpoint()
        if checkpoint is not None:
            if checkpoint.get("fingerprint") != summary["fingerprint"]:
                raise ConfigError(f"hydra.run.dir: {files.dir} holds a checkpoint of a different config; "
                                  "choose a new run directory")
            lopt.load_state_dict(checkpoint["lopt"])
            meta_opt.load_state_dict(checkpoint["meta_opt"])
            sched.load_state_dict(checkpoint["sched"])
            est_state = _to_device(checkpoint["estimator"], family.device)
            baselines = checkpoint["baselines"]
            loop = checkpoint["loop"]
            set_rng_state(checkpoint["rng"])
            log.info("resuming meta-training in %s from meta-step %d", files.dir, loop["step"])
        files.truncate_metrics(after_step=loop["step"])
        logger.start(run_dir=files.dir, config=OmegaConf.to_container(cfg, resolve=True), run_id=files.run_id(),
                     name=info.get("name"), group=info.get("group"))
        num_phi = sum(p.numel() for p in params)
        summary.update(task=cfg.task._target_, lopt=type(lopt).__name__, lopt_config=lopt.config(),
                       estimator=type(self.estimator).__name__, seed=seed, device=str(family.device),
                       num_meta_params=num_phi, target_meta_steps=self.steps, tasks_per_step=self.tasks_per_step,
                       horizon=self.horizon, unroll=self.unroll)
        log.info("meta-training %s (%d meta-parameters) with %s on %s: %d meta-steps × %d tasks, horizon %d, "
                 "unroll %d; run dir %s", type(lopt).__name__, num_phi, type(self.estimator).__name__,
                 cfg.task._target_, self.steps, self.tasks_per_step, self.horizon, self.unroll, files.dir)

        if baselines is None:
            baselines = {}
            for name, b in self.baselines.items():
                clock = time.perf_counter()
                baselines[name] = tune(b, family, eval_seeds, self.horizon, self.cap)
                log.info("baseline %s: best lr %.3g, held-out mean normalised loss %.4g (final %.4g) [%.1fs]",
                         name, baselines[name]["lr"], baselines[name]["mean"], baselines[name]["final"],
                         time.perf_counter() - clock)

        def meta_eval() -> dict[str, Any]:
            return evaluate(family, lopt, {k: v.detach() for k, v in lopt.meta_params().items()}, eval_seeds,
                            self.horizon, self.cap)

        def save() -> None:
            save_lopt(lopt, files.dir / LOPT_FILE, meta_step=loop["step"], task=cfg.task._target_,
                      estimator=type(self.estimator).__name__)
            files.save_checkpoint({"fingerprint": summary["fingerprint"], "loop": loop,
                                   "lopt": lopt.state_dict(), "meta_opt": meta_opt.state_dict(),
                                   "sched": sched.state_dict(), "estimator": est_state,
                                   "baselines": baselines, "rng": rng_state()})

        progress = Progress(str(cfg.trainer.get("progress", "auto")), self.steps, loop["step"])
        clock = time.perf_counter()
        stop = GracefulStop()
        try:
            stop.install()
            while loop["step"] < self.steps:
                step_start = time.perf_counter()
                grads, metrics, est_state = self.estimator.estimate(ctx, est_state, loop["step"])
                with torch.no_grad():
                    grads = [g + 2.0 * self.l2 * p.detach() for g, p in zip(grads, params)]
                    norm = torch.sqrt(sum(g.double().square().sum() for g in grads))
                    finite = bool(torch.isfinite(norm))
                    if finite:
                        for p, g in zip(params, grads):
                            p.grad = g.clamp(-self.clip, self.clip)
                        clipped = sum(int((g.abs() > self.clip).sum()) for g in grads) / num_phi
                        meta_opt.step()
                        meta_opt.zero_grad(set_to_none=True)
                    else:  # a diverged inner run poisoned the estimate: skip it rather than φ
                        loop["skipped"] += 1
                        clipped = float("nan")
                sched.step()
                loop["step"] += 1
                loop["step_time"] += time.perf_counter() - step_start
                if math.isfinite(metrics["loss"]):
                    loop["loss_sum"] += metrics["loss"]
                    loop["loss_count"] += 1
                step = loop["step"]
                do_eval = (self.eval_every and step % self.eval_every == 0) or step == self.steps
                do_ckpt = ((step % self.checkpoint_every == 0 or preemption.requested() or stop.requested)
                           and step < self.steps)
                if not (do_eval or do_ckpt or step % self.log_every == 0):
                    continue
                now = time.perf_counter()
                loop["elapsed"] += now - clock
                record: dict[str, Any] = {
                    "step": step, "time": loop["elapsed"],
                    "train/loss": loop["loss_sum"] / max(loop["loss_count"], 1),
                    "meta/lr": sched.get_last_lr()[0], "meta/grad_norm": float(norm), "meta/clipped": clipped,
                    "meta/phi_norm": float(torch.sqrt(sum(p.detach().double().square().sum() for p in params))),
                    "meta/skipped": loop["skipped"], "meta/step_time": loop["step_time"] / step}
                loop["loss_sum"], loop["loss_count"] = 0.0, 0
                if do_eval:
                    result = meta_eval()
                    loop["last_eval"] = result
                    loop["best"] = min(loop["best"], result["mean"])
                    record.update({"val/loss": result["mean"], "val/final": result["final"]})
                files.append_metrics(record)
                logger.log(record, step)
                progress.update(step, record)
                if do_ckpt:
                    save()
                    if preemption.requested():  # SLURM's time-limit/preemption signal: resume from here
                        preemption.requeue(files, summary, logger)
                    if stop.requested:
                        stop.stop(files, summary, step, self.steps, resume_with(info, files))
                clock = time.perf_counter()
        finally:
            stop.remove()
            progress.close()
        result = loop["last_eval"] if loop["last_eval"] is not None else meta_eval()
        self._write_outputs(files, result, baselines)
        objective = result["mean"]
        versus = {name: {"lr": b["lr"], "mean": b["mean"], "final": b["final"], "beaten": objective < b["mean"]}
                  for name, b in baselines.items()}
        summary.update(status="completed", objective=objective, meta_steps=loop["step"], wall_time=loop["elapsed"],
                       meta_step_time_mean=loop["step_time"] / max(loop["step"], 1),
                       meta_steps_per_second=loop["step"] / max(loop["step_time"], 1e-12), skipped=loop["skipped"],
                       final={"val/loss": objective, "val/final": result["final"]},
                       best={"val/loss": loop["best"]}, baselines=versus,
                       finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        # The final outer state, as the training loop keeps its final checkpoint.
        save()
        files.write_summary(summary)
        logger.summary({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
                       | {f"baseline/{k}": v["mean"] for k, v in versus.items()})
        log.info("meta-training completed: %d meta-steps in %.1fs (%.3fs each); held-out mean normalised loss "
                 "%.4g%s; results in %s (lopt.pt, metrics.jsonl, %s, %s)", loop["step"], loop["elapsed"],
                 summary["meta_step_time_mean"], objective,
                 "".join(f", {k} {v['mean']:.4g}" for k, v in versus.items()), files.dir, EVAL_FILE, PLOT_FILE)
        stop.after_last_step()
        return float(objective)

    def _write_outputs(self, files: RunFiles, result: dict[str, Any], baselines: dict[str, Any]) -> None:
        curves = {"learned": {k: v for k, v in result.items() if k != "per_task"},
                  **baselines}
        data = (json.dumps({"horizon": self.horizon, "eval_tasks": self.eval_tasks, "curves": curves},
                           indent=1) + "\n").encode()
        atomic_write_bytes(files.dir / EVAL_FILE, lambda fh: fh.write(data))
        try:
            _plot(files, curves)
        except Exception as exc:  # noqa: BLE001 - a figure is a convenience; the numbers are in the JSON
            log.warning("could not draw %s (%s); the curves are in %s", PLOT_FILE, exc, EVAL_FILE)


def _to_device(obj: Any, device: torch.device) -> Any:
    """Checkpoints load on the CPU; the estimator's persistent runs belong with the tasks."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _plot(files: RunFiles, curves: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = files.read_metrics()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in records]
    ax0.plot(steps, [r["train/loss"] for r in records], label="train tasks (estimator)")
    ev = [r for r in records if "val/loss" in r]
    ax0.plot([r["step"] for r in ev], [r["val/loss"] for r in ev], "o-", label="held-out tasks")
    ax0.set(xlabel="meta-step", ylabel="mean normalised loss", title="meta-training")
    ax0.legend()
    for name, c in curves.items():
        label = f"{name} (lr {c['lr']:.3g})" if "lr" in c else name
        ax1.plot(range(1, len(c["curve"]) + 1), c["curve"], label=label)
    ax1.set(xlabel="inner step", ylabel="L(θ_t) / L(θ_0)", yscale="log", title="held-out tasks")
    ax1.legend()
    fig.tight_layout()
    path = files.dir / PLOT_FILE
    atomic_write_bytes(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)
