"""Training-loop analysis for LODO: how close its preconditioner is to the inverse Hessian.

Liao et al., "Learning to Optimize Quasi-Newton Methods" (TMLR 2023) measure LODO by
``‖I − G H‖_F/√n``. The optimizer sees parameters and gradients only, so the Hessian-vector
products come from here: the task's exact Hessian where it has one (``NoisyQuadratic``,
``LinearRegression``), else double back-propagation through the step's minibatch loss.
With momentum β the preconditioner LODO learns tends to ``(1 + β) H⁻¹`` (see
:class:`metaopt.optim.LODO`), so a momentum-aware form of the measure is logged beside the paper's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metaopt.nn_utils import frozen_running_stats
from metaopt.optim.lodo import LODO
from metaopt.train import Callback, Components

__all__ = ["LODOHessianError"]

log = logging.getLogger("metaopt")


class LODOHessianError(Callback):
    """Logs ``analysis/hessian_error`` = ``‖I − D G H‖_F/√n`` every ``every`` steps, and
    ``analysis/hessian_error_momentum`` = ``‖I − D G H/(1 + β)‖_F/√n``.

    ``D G`` is the map of LODO's step (``lr·G`` with one group), H the Hessian of the training
    loss at the parameters after the step. H is the task's ``hessian`` attribute when it has one
    of the right size and ``use_task_hessian`` is set (exact, n columns); otherwise products with
    the Hessian of the step's minibatch loss, by double backward, estimate the norm from
    ``probes`` Rademacher vectors (``probes: null`` computes all n columns; affordable for small
    models only). Probe vectors come from a private generator; dropout's draws and BatchNorm
    running statistics are restored, so a run with this callback follows the same trajectory.

    Args:
      every: compute after steps whose count is a multiple of this (align with
        ``trainer.log_every`` so each value reaches a metrics record).
      probes: Hutchinson probes per estimate, or None for the exact norm.
      use_task_hessian: use ``task.hessian`` when present.
      seed: seed of the probe generator.
    """

    def __init__(self, every: int = 50, probes: int | None = 16, use_task_hessian: bool = True,
                 seed: int = 0):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every: {every!r} (must be an integer >= 1)")
        if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int)
                                   or probes < 1):
            raise ValueError(f"Invalid probes: {probes!r} (must be None or an integer >= 1)")
        self.every, self.probes, self.use_task_hessian = every, probes, bool(use_task_hessian)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._hessian: Tensor | None = None
        self._active = False

    def on_start(self, c: Components, run_dir: Path) -> None:
        del run_dir
        self._active = isinstance(c.optimizer, LODO)
        if not self._active:
            # A sweep compares LODO with baselines under one analysis setting: skip, don't fail.
            log.warning("analysis=lodo_hessian: %s is not LODO; no hessian_error is logged",
                        type(c.optimizer).__name__)
            return
        n = sum(p.numel() for group in c.optimizer.param_groups for p in group["params"])
        hessian = getattr(c.task, "hessian", None)
        if self.use_task_hessian and isinstance(hessian, Tensor) and hessian.shape == (n, n):
            self._hessian = hessian

    def after_step(self, step: int, batch: Any, c: Components) -> dict[str, float] | None:
        if not self._active or (step + 1) % self.every:
            return None
        if self._hessian is not None:
            h = self._hessian
            errors = c.optimizer.hessian_errors(lambda v: v.to(h) @ h, probes=None)
        else:
            errors = c.optimizer.hessian_errors(self._loss_hvp(batch, c), self.probes,
                                                self.generator)
        return {f"analysis/{key}": value for key, value in errors.items()}

    @staticmethod
    def _loss_hvp(batch: Any, c: Components):
        params = [p for group in c.optimizer.param_groups for p in group["params"]]

        def hvp(v: Tensor) -> Tensor:
            devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
            with torch.random.fork_rng(devices=devices), frozen_running_stats(c.model), \
                    torch.enable_grad():
                loss = c.task.loss(batch)
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                # A parameter the loss does not reach has zero gradient and zero curvature.
                flat = torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                                  for p, g in zip(params, grads)])
                rows = []
                for i, row in enumerate(v.to(flat)):
                    hv = torch.autograd.grad(flat, params, grad_outputs=row,
                                             retain_graph=i + 1 < len(v), allow_unused=True)
                    rows.append(torch.cat([torch.zeros_like(p).reshape(-1) if h is None else
                                           h.reshape(-1) for p, h in zip(params, hv)]))
            return torch.stack(rows)

        return hvp
