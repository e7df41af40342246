"""PAL: Parabolic Approximation Line search (Mutschler and Zell, NeurIPS 2020).

Mutschler, M. and Zell, A., "Parabolic Approximation Line Search for DNNs", NeurIPS 2020.

Each step fits a parabola to the minibatch loss along a single direction from two loss values and
one slope, and jumps to (a multiple of) its vertex. The math lives in plain functions
(:func:`pal_curvature`, :func:`pal_step_size`); :class:`PAL` gathers tensors, runs the two forward
passes and moves the parameters.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from metaopt.optim.utils import rejected_group_removed, shared_hyperparameters

__all__ = ["PAL", "pal_curvature", "pal_step_size"]

Closure = Callable[[], Any]

CASES = ("parabola", "measuring_point", "no_descent", "nonfinite")

_HYPERPARAMETERS = ("measuring_step", "max_step", "direction_decay", "update_factor", "exact_slope")


def pal_curvature(l0: float, l_mu: float, b: float, mu: float) -> float:
    """Coefficient ``a`` of the parabola ``l0 + b*s + a*s**2`` through ``(0, l0)`` and ``(mu, l_mu)``.

    ``b`` is the slope at ``s = 0``; ``a > 0`` means the loss curves upward along the line.
    """
    return (l_mu - l0 - b * mu) / (mu * mu)


def pal_step_size(
    l0: float,
    l_mu: float,
    b: float,
    mu: float,
    update_factor: float,
    max_step: float,
) -> tuple[float, str]:
    """Step ``s`` along the unit direction, and which branch of PAL chose it.

    Mutschler and Zell (2020), with ``a = pal_curvature(l0, l_mu, b, mu)``:

    * ``"parabola"``: ``a > 0`` and ``b < 0``: ``s = update_factor * (-b / (2a))``;
    * ``"measuring_point"``: ``a <= 0`` and ``b < 0``: ``s = mu`` (no vertex ahead; keep the
      measured improvement);
    * ``"no_descent"``: ``b >= 0``: ``s = 0``;
    * ``"nonfinite"``: any of ``l0``, ``l_mu``, ``b``, ``a`` is NaN or infinite: ``s = 0`` and the
      caller must skip the step.

    Finally ``s = min(s, max_step)``.
    """
    a = pal_curvature(l0, l_mu, b, mu)
    if not all(math.isfinite(v) for v in (l0, l_mu, b, a)):
        return 0.0, "nonfinite"
    if b >= 0.0:
        return 0.0, "no_descent"
    if a > 0.0:
        # A near-zero a gives a huge (or infinite) vertex distance; max_step bounds it.
        return min(update_factor * (-b / (2.0 * a)), max_step), "parabola"
    return min(mu, max_step), "measuring_point"


def _validate(hp: dict[str, Any]) -> None:
    def check(name: str, ok: bool, rule: str) -> None:
        if not ok:
            raise ValueError(f"Invalid {name}: {hp[name]!r} (must be {rule})")

    check("measuring_step", _is_real(hp["measuring_step"]) and 0 < hp["measuring_step"] < math.inf,
          "finite and > 0")
    check("max_step", _is_real(hp["max_step"]) and hp["max_step"] > 0, "> 0 (inf: no cap)")
    check("direction_decay", _is_real(hp["direction_decay"]) and 0 <= hp["direction_decay"] < 1,
          "in [0, 1)")
    check("update_factor", _is_real(hp["update_factor"]) and 0 < hp["update_factor"] < math.inf,
          "finite and > 0")
    check("exact_slope", isinstance(hp["exact_slope"], bool), "a bool")


def _is_real(x: Any) -> bool:
    # NaN needs no test: it fails every comparison in _validate. Bools are Python ints but a
    # `measuring_step=True` is a config mistake, not a step length of 1.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _next_direction(d: Tensor, g: Tensor, beta: float) -> Tensor:
    # Must round exactly like the in-place commit `d.mul_(beta).add_(g)` in PAL.step, so that the
    # measured point and the final point lie on the same line.
    return d.mul(beta).add_(g)


def _host_sum(terms: Sequence[Tensor]) -> float:
    """Sum of 0-d tensors, possibly on several devices, with one host transfer per device."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in terms:
        by_device.setdefault(t.device, []).append(t.to(torch.float64))
    return math.fsum(torch.stack(ts).sum().item() for ts in by_device.values())


def _to_float(loss: Any) -> float:
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)


def _flat_dot(x: Tensor, y: Tensor) -> Tensor:
    return torch.dot(x.reshape(-1), y.reshape(-1))


class _RNGSnapshot:
    """Generator states of the CPU and of each initialised CUDA device holding parameters.

    The reference code calls CUDA's RNG unconditionally, which fails on CPU-only machines; here
    CUDA is touched only when it is already in use.
    """

    def __init__(self, params: Iterable[Tensor]):
        self.cpu = torch.get_rng_state()
        self.cuda: dict[int, Tensor] = {}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for index in sorted({p.device.index for p in params if p.device.type == "cuda"}):
                self.cuda[index] = torch.cuda.get_rng_state(index)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)


def _is_backward_without_graph(err: RuntimeError) -> bool:
    # What autograd raises when an always-backward closure runs under no_grad.
    return "does not require grad" in str(err)


class PAL(torch.optim.Optimizer):
    r"""Parabolic Approximation Line search (Mutschler and Zell, NeurIPS 2020).

    One step on the closure's minibatch, over one line through *all* parameter groups:

    .. code-block:: text

        l0, g = loss(θ), ∇loss(θ)                      # forward + backward
        d  ← β·d + g                                    # direction_decay β
        u  = −d/‖d‖
        b  = gᵀu   (exact_slope)   or   −‖d‖
        l_μ = loss(θ + μ·u)                             # forward, no backward, same minibatch
        a  = (l_μ − l0 − b·μ) / μ²
        s  = α·(−b/(2a)) if a > 0, b < 0;  μ if a ≤ 0, b < 0;  0 if b ≥ 0
        s  = min(s, s_max)
        θ ← θ + s·u

    The effective learning rate of the step (for comparison with SGD) is ``s/‖d‖``; it and the
    other quantities of the last step are in :meth:`diagnostics`.

    Args:
      params: parameters or parameter groups.
      measuring_step: μ, distance along ``u`` of the second loss evaluation (paper: 0.1 to 1).
      max_step: s_max, cap on the step along ``u``.
      direction_decay: β in ``[0, 1)``, the paper's "direction adaptation factor"; 0 gives the
        plain gradient direction.
      update_factor: α, scales the step to the parabola's vertex (α > 1 overshoots, which the
        paper found to help on noisy minibatch losses).
      exact_slope: ``b = gᵀu`` if True, else the cheaper ``b = −‖d‖`` (equal when β = 0).

    The closure protocol. ``step`` calls the closure twice, on the same random state (so dropout
    masks agree): first under ``torch.enable_grad()`` at θ, then under ``torch.no_grad()`` at the
    measuring point. A closure that skips ``backward()`` when gradients are disabled costs two
    forwards and one backward per step; wrapping that forward in
    :func:`metaopt.nn_utils.frozen_running_stats` keeps BatchNorm running statistics moving once
    per step (the reference code moves them twice)::

        def closure():
            if not torch.is_grad_enabled():          # PAL's measuring forward
                with frozen_running_stats(model):
                    return loss_fn(model(x), y)
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = optimizer.step(closure)               # the loss at θ, before the step

    An LBFGS-style closure that always calls ``backward()`` also works and follows the identical
    trajectory, at a price: its ``backward()`` raises under ``no_grad`` (the loss has no graph),
    so ``step`` catches that error, rewinds the random state and evaluates the measuring point
    again with gradients enabled. That is three forwards and two backwards per step, and any side
    effects of the closure (BatchNorm statistics, counters) happen on each call.

    Whatever the closure does with gradients during the measuring call, ``p.grad`` after ``step``
    is the gradient at θ from the first call: ``step`` detaches the gradient tensors before the
    measuring call and puts them back after it.

    Warning: departures from the paper's reference code (cogsys-tuebingen/PAL), all deliberate:

    * all parameter groups form one line (the reference returns inside its group loop and so
      optimises only the first group); hyperparameters must therefore be equal in every group,
      and a group that differs raises ``ValueError``;
    * no clock-seeded or CUDA-only random state: the CPU generator, and the CUDA generator of each
      initialised device holding parameters, are rewound for the measuring forward; after the step
      the generators are where one forward leaves them, so a seed fixes the trajectory;
    * if ``l0``, ``l_μ``, ``b`` or ``a`` is NaN or infinite, θ is restored bitwise, the direction
      buffer is left unchanged and the step is reported as ``"nonfinite"`` (the reference leaves
      θ at the measuring point). A non-finite ``l0``, ``b`` or ``‖d‖`` skips the measuring
      forward; ``‖d‖ = 0`` skips it too (case ``"no_descent"``);
    * parameters whose ``.grad`` is None after the first call are left out of this step's line
      (neither moved nor their direction decayed), as torch.optim optimizers skip them;
    * ``p.grad`` keeps the gradient at θ (the reference overwrites it with the direction buffer),
      so gradient norms logged after ``step`` are the loss's;
    * only torch's generators are rewound for the measuring forward (the reference reseeds
      NumPy's): a closure that draws from NumPy or ``random`` sees other draws on that call;
    * ``direction_decay`` must lie in [0, 1) (the reference accepts any β ≥ 0).

    Memory: one direction buffer per parameter, plus a transient copy of θ during ``step`` so that
    a skipped step restores θ exactly.
    """

    requires_closure = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        measuring_step: float = 1.0,
        max_step: float = 3.16,
        direction_decay: float = 0.4,
        update_factor: float = 1 / 0.6,
        exact_slope: bool = True,
    ):
        defaults = dict(
            measuring_step=measuring_step,
            max_step=max_step,
            direction_decay=direction_decay,
            update_factor=update_factor,
            exact_slope=exact_slope,
        )
        _validate(defaults)
        super().__init__(params, defaults)
        self._last: dict[str, Any] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        with rejected_group_removed(self):
            super().add_param_group(param_group)
            _validate(self.param_groups[-1])
            self._check_groups_agree()

    def _check_groups_agree(self) -> dict[str, Any]:
        return shared_hyperparameters(self.param_groups, _HYPERPARAMETERS,
                                      "PAL searches one line through all groups, so hyperparameters "
                                      "must be equal across groups")

    def _global_state(self) -> dict[str, Any]:
        # Optimizer-wide counters live in the first parameter's state, as in torch.optim.LBFGS,
        # so that state_dict()/load_state_dict() carry them.
        state = self.state[self.param_groups[0]["params"][0]]
        state.setdefault("num_steps", 0)
        for case in CASES:
            state.setdefault(f"num_{case}", 0)
        return state

    def diagnostics(self) -> dict[str, Any]:
        """Quantities of the last step, as python floats and strings, and case counters.

        Keys: ``lr_eff`` (``s/‖d‖``), ``step`` (``s``), ``curvature`` (``a``), ``slope`` (``b``),
        ``case`` (one of ``"parabola"``, ``"measuring_point"``, ``"no_descent"``,
        ``"nonfinite"``; ``"none"`` before the first step), ``loss0``, ``loss_mu`` (NaN where not
        evaluated), ``direction_norm`` (``‖d‖``), and the counts ``num_steps``, ``num_parabola``,
        ``num_measuring_point``, ``num_no_descent``, ``num_nonfinite`` since the start of training
        (they survive ``state_dict()``).
        """
        nan = float("nan")
        out: dict[str, Any] = dict(lr_eff=nan, step=nan, curvature=nan, slope=nan, case="none",
                                   loss0=nan, loss_mu=nan, direction_norm=nan)
        out.update(self._last)
        counters = self._global_state()
        out["num_steps"] = int(counters["num_steps"])
        for case in CASES:
            out[f"num_{case}"] = int(counters[f"num_{case}"])
        return out

    def _finish(self, case: str, **values: float) -> None:
        counters = self._global_state()
        counters["num_steps"] += 1
        counters[f"num_{case}"] += 1
        nan = float("nan")
        self._last = dict(lr_eff=0.0, step=0.0, curvature=nan, slope=nan, loss0=nan, loss_mu=nan,
                          direction_norm=nan)
        self._last.update(values)
        self._last["case"] = case

    def step(self, closure: Closure | None = None) -> Any:
        """One PAL step; returns the closure's loss at the starting point θ.

        See the class docstring for what the closure must do.
        """
        if closure is None:
            raise TypeError(
                "PAL.step requires a closure that evaluates the loss (and calls backward() when "
                "gradients are enabled), e.g. optimizer.step(closure); see the PAL docstring"
            )
        hp = self._check_groups_agree()
        mu = float(hp["measuring_step"])
        beta = float(hp["direction_decay"])
        params = [p for group in self.param_groups for p in group["params"]]

        rng_start = _RNGSnapshot(params)
        with torch.enable_grad():
            loss = closure()
        rng_after_one_forward = _RNGSnapshot(params)
        l0 = _to_float(loss)
        if not math.isfinite(l0):
            self._finish("nonfinite", loss0=l0)
            return loss

        active = [p for p in params if p.grad is not None]
        for p in active:
            if p.grad.is_sparse:
                raise RuntimeError("PAL does not support sparse gradients")
            if p.is_complex():
                raise RuntimeError("PAL does not support complex parameters")
        grads = [p.grad for p in active]
        dirs = []
        for p in active:
            state = self.state[p]
            if "direction_buffer" not in state:
                state["direction_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            dirs.append(state["direction_buffer"])

        # The new direction is materialised one tensor at a time, so the old buffer survives
        # until the step is known to be finite without a second parameter-sized buffer.
        with torch.no_grad():
            sq_terms, gd_terms = [], []
            for d, g in zip(dirs, grads):
                d_new = _next_direction(d, g, beta)
                sq_terms.append(_flat_dot(d_new, d_new))
                gd_terms.append(_flat_dot(g, d_new))
            norm = math.sqrt(_host_sum(sq_terms)) if active else 0.0
            b = -_host_sum(gd_terms) / norm if hp["exact_slope"] and norm > 0 else -norm

        if not (math.isfinite(norm) and math.isfinite(b)):
            self._finish("nonfinite", loss0=l0, slope=b, direction_norm=norm)
            return loss
        if norm == 0.0:
            # Zero gradient and zero history: no line to search along.
            self._commit_directions(dirs, grads, beta)
            self._finish("no_descent", loss0=l0, slope=0.0, direction_norm=0.0)
            return loss

        with torch.no_grad():
            theta0 = [p.detach().clone(memory_format=torch.preserve_format) for p in active]
            for p, d, g in zip(active, dirs, grads):
                p.add_(_next_direction(d, g, beta), alpha=-mu / norm)
        try:
            l_mu = self._measure(closure, params, rng_start)
        except BaseException:
            with torch.no_grad():
                for p, p0 in zip(active, theta0):
                    p.copy_(p0)
            raise
        finally:
            rng_after_one_forward.restore()

        s, case = pal_step_size(l0, l_mu, b, mu, float(hp["update_factor"]),
                                float(hp["max_step"]))
        a = pal_curvature(l0, l_mu, b, mu)
        with torch.no_grad():
            if case == "nonfinite":
                for p, p0 in zip(active, theta0):
                    p.copy_(p0)
            else:
                self._commit_directions(dirs, grads, beta)
                # Recomputed from θ rather than moved by (s - μ)·u from the measuring point, so
                # that s = 0 returns θ bitwise and rounding does not depend on μ.
                for p, p0, d in zip(active, theta0, dirs):
                    p.copy_(p0)
                    if s != 0.0:
                        p.add_(d, alpha=-s / norm)
        del theta0
        self._finish(
            case,
            lr_eff=s / norm,
            step=s,
            curvature=a,
            slope=b,
            loss0=l0,
            loss_mu=l_mu,
            direction_norm=norm,
        )
        return loss

    @staticmethod
    def _commit_directions(dirs: list[Tensor], grads: list[Tensor], beta: float) -> None:
        with torch.no_grad():
            for d, g in zip(dirs, grads):
                d.mul_(beta).add_(g)

    @staticmethod
    def _measure(closure: Closure, params: list[Tensor], rng_start: _RNGSnapshot) -> float:
        """The closure's loss at the current (measuring) point, leaving every ``.grad`` as it was.

        Gradients are detached from the parameters during the call, so neither ``zero_grad()``
        (with or without ``set_to_none``) nor a ``backward()`` inside the closure can touch them.
        """
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            rng_start.restore()
            try:
                with torch.no_grad():
                    value = closure()
            except RuntimeError as err:
                if not _is_backward_without_graph(err):
                    raise
                # An LBFGS-style closure: measure again, same random state, with a graph.
                for p in params:
                    p.grad = None
                rng_start.restore()
                with torch.enable_grad():
                    value = closure()
            return _to_float(value)
        finally:
            for p, g in zip(params, saved):
                p.grad = g
