"""``Learned``: a learned optimizer as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from metaopt.learned.base import LearnedOptimizer, load_into, load_lopt

log = logging.getLogger("metaopt")


def _check_lr(lr: Any) -> None:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a number >= 0)")


class Learned(torch.optim.Optimizer):
    r"""Train any model with a (meta-trained) learned optimizer, in place of ``torch.optim.Adam``.

    .. code-block:: text

        θ ← θ + lr_group · Δθ,   (Δθ, state) = lopt.update(φ, state, θ, g)

    Every parameter with a gradient, across all groups, forms one flat vector: the run the learned
    optimizer was meta-trained on (that matters to optimizers that normalise over coordinates, as
    :class:`MLPOptimizer` does). Per-coordinate state lives in ``self.state[p]`` like any
    ``torch.optim`` state, so ``state_dict()`` round-trips; the meta-parameters φ are not part of it
    (they come from ``lopt``/``checkpoint`` and are reported by :meth:`extra_state_bytes`).

    Args:
      params: parameters or parameter groups.
      lopt: the learned optimizer (architecture, and weights unless ``checkpoint`` is given).
      checkpoint: a ``lopt.pt`` written by meta-training (``meta=...``), or the run directory
        holding it. Alone, it rebuilds the architecture it was saved with; with ``lopt``, the
        architectures must match and the weights are loaded into a copy of ``lopt``.
      lr: multiplies every update (1.0 = as meta-trained); per group, so ``lr=0`` freezes a group.

    With neither ``lopt`` nor ``checkpoint`` a GRU hand-set to heavy-ball momentum on softly clipped
    gradients is used (``RNNOptimizer(input_encoding="scaled", init="momentum", init_lr=0.01)``:
    learning rate 0.01 × ``lr``, β = 0.9, clipping at 1), so that a config without weights still
    trains; a warning says so. A learned optimizer whose
    readout is zero (``init="zero"``, never meta-trained) leaves the parameters unchanged, and is
    warned about too.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lopt: LearnedOptimizer | None = None,
        checkpoint: str | os.PathLike | None = None,
        lr: float = 1.0,
    ):
        _check_lr(lr)
        if lopt is not None and not isinstance(lopt, LearnedOptimizer):
            raise ValueError(f"Invalid lopt: expected a metaopt.learned.LearnedOptimizer, got {type(lopt).__name__}")
        if checkpoint is not None:
            if not isinstance(checkpoint, (str, os.PathLike)):
                raise ValueError(f"Invalid checkpoint: expected a path, got {checkpoint!r}")
            lopt = self._load(lopt, checkpoint)
        elif lopt is None:
            from metaopt.learned.rnn import RNNOptimizer

            log.warning("Learned optimizer without lopt or checkpoint: using a GRU hand-set to clipped "
                        "momentum; pass checkpoint=<meta-training run dir>/lopt.pt for meta-trained weights")
            lopt = RNNOptimizer(input_encoding="scaled", init="momentum", init_lr=0.01)
        if getattr(lopt, "is_idle", lambda: False)():
            log.warning("Learned optimizer %s has a zero readout (never meta-trained): parameters will not "
                        "move; pass checkpoint=<meta-training run dir>/lopt.pt", type(lopt).__name__)
        super().__init__(params, {"lr": float(lr)})
        self.lopt = lopt.requires_grad_(False)
        self._phi = lopt.meta_params()
        self._last: dict[str, Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Groups may differ in lr only (the learned optimizer is one for all); torch checks nothing.
        from metaopt.optim.utils import rejected_group_removed  # metaopt.optim imports this module

        with rejected_group_removed(self):
            super().add_param_group(param_group)
            group = self.param_groups[-1]
            extra = sorted(set(group) - {"params", "lr"})
            if extra:
                raise ValueError(f"Invalid param group keys {extra}: Learned's groups take only 'lr'")
            _check_lr(group["lr"])

    @staticmethod
    def _load(lopt: LearnedOptimizer | None, checkpoint: str | os.PathLike) -> LearnedOptimizer:
        try:
            return load_lopt(checkpoint) if lopt is None else load_into(lopt, checkpoint)
        except (OSError, RuntimeError, TypeError) as exc:
            raise ValueError(f"Invalid checkpoint {checkpoint}: {exc}") from exc

    def extra_state_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.lopt.parameters())

    def diagnostics(self) -> dict[str, Tensor]:
        """RMS of the last update and gradient, and their ratio (the step's effective learning rate)."""
        return dict(self._last)

    def _active(self) -> list[tuple[Tensor, float]]:
        return [(p, group["lr"]) for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = self._active()
        if not active:
            return loss
        params = [p for p, _ in active]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("Learned does not support sparse gradients")
        dtype = params[0].dtype
        theta = torch.cat([p.detach().reshape(-1).to(dtype) for p in params]).unsqueeze(0)
        grad = torch.cat([p.grad.reshape(-1).to(dtype) for p in params]).unsqueeze(0)
        phi = {k: v.to(device=theta.device, dtype=dtype) for k, v in self._phi.items()}
        state = self._gather(phi, params, theta)
        delta, new_state = self.lopt.update(phi, state, theta, grad)
        delta = delta[0]
        offset = 0
        for p, lr in active:
            n = p.numel()
            p.add_(delta[offset:offset + n].view_as(p).to(p.dtype), alpha=lr)
            offset += n
        self._scatter(params, new_state)
        g_rms = grad.square().mean().sqrt()
        u_rms = delta.square().mean().sqrt()
        self._last = {"update_rms": u_rms, "grad_rms": g_rms, "effective_lr": u_rms / g_rms.clamp_min(1e-30)}
        return loss

    def _gather(self, phi: dict[str, Tensor], params: list[Tensor], theta: Tensor) -> dict[str, Tensor]:
        """The lopt state for the flat vector of ``params`` (fresh state where a parameter has none)."""
        fresh = None
        if any(not self.state[p] for p in params):
            fresh = self.lopt.init_state(phi, theta)
        per_run = next((self.state[p] for p in params if self.state[p]), None)
        out: dict[str, list[Tensor]] = {}
        offset = 0
        for p in params:
            n = p.numel()
            for key, value in (self.state[p] or {k: v[0, offset:offset + n] if v.dim() > 1 else v[0]
                                                 for k, v in fresh.items()}).items():
                out.setdefault(key, []).append(value)
            offset += n
        state = {}
        for key, parts in out.items():
            if parts[0].dim() == 0:  # one value per run: the same in every parameter's state
                source = per_run[key] if per_run is not None else parts[0]
                # torch's load_state_dict moves every state tensor to its parameter's device except
                # one under the key "step", MLPOptimizer's counter: a CPU checkpoint resumed on CUDA.
                state[key] = source.reshape(1).to(theta.device)
            else:
                state[key] = torch.cat(parts).unsqueeze(0)
        return state

    def _scatter(self, params: list[Tensor], state: dict[str, Tensor]) -> None:
        offset = 0
        for p in params:
            n = p.numel()
            self.state[p] = {k: v[0].clone() if v.dim() == 1 else v[0, offset:offset + n].clone()
                             for k, v in state.items()}
            offset += n
