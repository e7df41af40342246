r"""Online greedy optimizers: SGD+momentum and Adam whose momentum is re-solved during training.

Lee, J. and Lee, K. M., "Greedy Alignment Principle for Optimizer Selection" (arXiv 2512.06370
v3, 2026; v1/v2 "Optimizing Optimizers for Fast Gradient-Based Learning").

Each step the optimizers update EMA estimates of the gradient autocorrelation at lags 0..K,
``r_k = E[⟨g_t, g_{t−k}⟩]`` (for Adam seen through its preconditioner), over all parameters or per
parameter tensor. At each of the first K + 1 steps (while the lags fill) and then every
``update_every`` steps they re-solve the greedy problem of the momentum family,
``β* = argmax √(1−β²) Σ_k β^k r_k`` (:func:`metaopt.greedy.optimal_momentum`), and use β* until
the next solve. The update math lives
in plain functions over lists of tensors (:func:`greedy_sgd_update`, :func:`greedy_adam_update`);
the classes gather tensors, keep the statistics and call the solver.

The selection scores are those of the authors' reference code (github.com/ironjr/gap, README; the
v3 text beyond its introduction was not retrievable here): for candidate momenta β_j,

    SGD+momentum: J_j = ⟨g_t, buf_j⟩·√(1 − β_j²),          buf_j = Σ_k β_j^k g_{t−k}
    Adam/AdamW:   J_j = ⟨g_t, update_j⟩·√((1 − β_j²)/W),  W = mean_p 1/(√v_p + ε)

``E[⟨g_t, buf_j⟩] = Σ_k β_j^k r_k``, so J is the unit-energy score above, and for Adam the same
score on the autocorrelation seen through the preconditioner, reading ``update_j`` as P times the
undampened buffer (W does not depend on β, so it does not change a choice made from one tensor's
statistics). Read with Adam's dampened ``m_j = (1−β_j)Σ_k β_j^k g_{t−k}`` instead, the score
gains a factor ``1 − β_j``; its expectation is then at most ``√(1−β_j²)·r̃_0`` (a convex
combination of the ``r̃_k`` never exceeds ``r̃_0``), so β_j = 0.99 (≤ 0.14·r̃_0) could never beat
0.5 (≥ 0.43·r̃_0 for non-negative autocorrelations), and the README's candidate list (0.5, 0.99)
would be moot; we take the first reading. Departures from the reference code, ours:

- The expectation is estimated (EMAs of the lag products, a geometric tail beyond lag K) and β is
  the continuous maximiser over ``[min_momentum, max_momentum]``; the reference picks, every step,
  the best of a short candidate list by the one-step product ``⟨g_t, buf_j⟩`` (optionally smoothed
  by ``J_ema``, with hysteresis and a soft reset of the buffers on a switch, none of which is here).
- In the global mode (``per_block=False``) the lag products are summed over all coordinates; the
  reference sums per-tensor scores each divided by that tensor's √W.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metaopt.greedy.problems import geometric_tail, momentum_learning_rate, optimal_momentum
from metaopt.optim.utils import flat_views, rejected_group_removed, shared_hyperparameters

__all__ = ["GreedyAdam", "GreedySGD", "energy_matched_factor", "greedy_adam_update", "greedy_sgd_update"]

Closure = Callable[[], Any]

# GreedySGD's learning-rate rules (see its docstring).
_LR_RULES = ("fixed", "motion", "energy")

# Knobs of the statistics and the solve: one set for the whole optimizer, since in the default
# (global) mode one β is solved from the statistics of every group together.
_GREEDY_KEYS = ("horizon", "lags", "update_every", "min_momentum", "max_momentum", "per_block",
                "fixed_momentum")


def greedy_sgd_update(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor],
                      momenta: list[float], lrs: list[float]) -> None:
    """Heavy ball as ``torch.optim.SGD`` (no dampening), per tensor: ``m ← βm + g``, ``θ ← θ − lr·m``."""
    _foreach_mul_scalars(bufs, momenta)
    torch._foreach_add_(bufs, grads)
    _foreach_add_scaled(params, bufs, [-lr for lr in lrs])


def _scalars(values: list[float]) -> float | list[float]:
    """One scalar when all agree (one group, global β): the foreach kernels that take a list of
    scalars cost several times more on CPU than those that take one."""
    return values[0] if values and all(v == values[0] for v in values) else values


def _foreach_mul_scalars(tensors: list[Tensor], scalars: list[float]) -> None:
    torch._foreach_mul_(tensors, _scalars(scalars))


def _foreach_add_scaled(targets: list[Tensor], sources: list[Tensor], scales: list[float]) -> None:
    """``t ← t + s·x`` per tensor, one fused call per distinct scale (usually one per group)."""
    if scales and all(x == scales[0] for x in scales):
        torch._foreach_add_(targets, sources, alpha=scales[0])
        return
    buckets: dict[float, list[int]] = {}
    for i, scale in enumerate(scales):
        buckets.setdefault(scale, []).append(i)
    for scale, idx in buckets.items():
        torch._foreach_add_([targets[i] for i in idx], [sources[i] for i in idx], alpha=scale)


def energy_matched_factor(beta1: float) -> float:
    """``√((1+β₁)/(1−β₁))``: the lr factor that gives Adam's filter ``(1−β₁)β₁^k`` (energy
    ``(1−β₁)/(1+β₁)``) the unit energy of β₁ = 0, i.e. runs the filter ``√(1−β₁²)β₁^k`` that the
    greedy score assumes (``energy_matched_lr``; ours)."""
    return math.sqrt((1.0 + beta1) / (1.0 - beta1))


def greedy_adam_update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                       denoms: list[Tensor], beta1s: list[float], avg_weights: list[float],
                       lrs: list[float], energy_matched_lr: bool = False) -> list[float]:
    """Adam's step with a β₁ that may change between steps; returns the new weights of the EMAs.

    ``m ← β₁m + (1−β₁)g`` and ``c ← β₁c + (1−β₁)`` (``c_0 = 0``), ``θ ← θ − lr·(m/c)/denom``. ``c``
    is the total weight of the EMA, so ``m/c`` is the bias correction that ``1 − β₁^t`` gives for
    a constant β₁ (Kingma & Ba 2015), valid for any sequence of β₁. With ``energy_matched_lr`` the
    lr of each tensor is multiplied by :func:`energy_matched_factor` of its β₁ (ours).
    """
    if energy_matched_lr:
        lrs = [lr * energy_matched_factor(b) for lr, b in zip(lrs, beta1s)]
    if beta1s and all(b == beta1s[0] for b in beta1s):
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1s[0])
    else:
        torch._foreach_mul_(exp_avgs, beta1s)
        torch._foreach_add_(exp_avgs, torch._foreach_mul(grads, [1.0 - b for b in beta1s]))
    weights = [b * c + (1.0 - b) for b, c in zip(beta1s, avg_weights)]
    steps = _scalars([-lr / c for lr, c in zip(lrs, weights)])
    if isinstance(steps, list):
        torch._foreach_addcdiv_(params, exp_avgs, denoms, steps)
    else:
        torch._foreach_addcdiv_(params, exp_avgs, denoms, value=steps)
    return weights


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate_greedy(hp: dict[str, Any]) -> None:
    def check(name: str, ok: bool, rule: str, label: str | None = None) -> None:
        if not ok:
            raise ValueError(f"Invalid {label or name}: {hp[name]!r} (must be {rule})")

    # "learning rate" as torch.optim words it, so that one pattern matches every optimizer.
    check("lr", _is_real(hp["lr"]) and hp["lr"] >= 0, ">= 0", "learning rate (lr)")
    check("weight_decay", _is_real(hp["weight_decay"]) and hp["weight_decay"] >= 0, ">= 0")
    check("horizon", _is_real(hp["horizon"]) and hp["horizon"] >= 1, ">= 1 (steps)")
    check("lags", _is_int(hp["lags"]) and hp["lags"] >= 1, "an int >= 1")
    check("update_every", _is_int(hp["update_every"]) and hp["update_every"] >= 1, "an int >= 1")
    check("min_momentum", _is_real(hp["min_momentum"]) and 0 <= hp["min_momentum"] < 1, "in [0, 1)")
    check("max_momentum", _is_real(hp["max_momentum"]) and hp["min_momentum"] <= hp["max_momentum"] < 1,
          "in [min_momentum, 1)")
    check("per_block", isinstance(hp["per_block"], bool), "a bool")
    fixed = hp["fixed_momentum"]
    check("fixed_momentum", fixed is None or (_is_real(fixed) and 0 <= fixed < 1), "None or in [0, 1)")


class _GreedyMomentum(torch.optim.Optimizer):
    """Statistics, solves and diagnostics shared by :class:`GreedySGD` and :class:`GreedyAdam`.

    The statistics keep one ring buffer of the last K + 1 gradients of *all* parameters, flattened
    in group order, so that each step costs one copy, one matrix-vector product and one EMA
    update whatever the number of tensors (per tensor in ``per_block`` mode: one product each).
    A tensor without a gradient at a step counts as a zero gradient there (and, as in torch.optim,
    is not moved). All parameters must be on one device; a parameter group added after the first
    step restarts the statistics.
    """

    def __init__(self, params: Any, defaults: dict[str, Any]):
        self._validate(defaults)
        super().__init__(params, defaults)

    def _validate(self, hp: dict[str, Any]) -> None:
        _validate_greedy(hp)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # The layout of the statistics and the per-step lists change with the parameters.
        self._checked_glob = self._step_cache = None
        with rejected_group_removed(self):
            super().add_param_group(param_group)
            self._validate(self.param_groups[-1])
            shared_hyperparameters(self.param_groups, _GREEDY_KEYS + getattr(self, "_shared_keys", ()),
                                   "the statistics and the momentum solve span all groups, so it must be "
                                   "equal in every group")

    # ---- state ----------------------------------------------------------------------------

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _global_state(self) -> dict[str, Any]:
        # Optimizer-wide values live in the first parameter's state (as torch.optim.LBFGS does),
        # so that state_dict() carries them; python numbers are not cast by load_state_dict.
        state = self.state[self.param_groups[0]["params"][0]]
        state.setdefault("greedy_step", 0)
        state.setdefault("num_solves", 0)
        state.setdefault("solve", {})
        return state

    def _statistics(self, params: list[Tensor]) -> dict[str, Any]:
        """The global state, with ring and EMAs (re)built if the parameter layout is new."""
        glob = self._global_state()
        if getattr(self, "_checked_glob", None) is glob:
            # The layout can only change through add_param_group (which clears this) or
            # load_state_dict (which replaces the state dicts): no need to re-read it every step.
            return glob
        hp = self.param_groups[0]
        layout = [p.numel() for p in params]
        if glob.get("layout") != layout:
            first = params[0]
            if any(p.device != first.device for p in params):
                raise RuntimeError(f"{type(self).__name__} needs all parameters on one device "
                                   "(its statistics concatenate their gradients)")
            blocks = len(params) if hp["per_block"] else 1
            glob["layout"] = layout
            # At least float32: in bfloat16 an EMA increment of w = 1/horizon is mostly rounded
            # away (r₀ came out 17-47 % low and β biased high on an AR(1) stream).
            dtype = torch.promote_types(first.dtype, torch.float32)
            glob["lag_ring"] = torch.zeros(hp["lags"] + 1, sum(layout), dtype=dtype, device=first.device)
            glob["autocorr"] = torch.zeros(hp["lags"] + 1, blocks, dtype=dtype, device=first.device)
            glob["samples"] = 0
        self._checked_glob = glob
        return glob

    def _step_plan(self, params: list[Tensor], grads: list[Tensor | None]
                   ) -> tuple[list[int], list[dict[str, Any]], list[dict[str, Any]]]:
        """Indices of the parameters with a gradient, their states and their groups.

        Cached while every parameter has a gradient and neither the groups nor the state dicts
        have been replaced (``load_state_dict`` replaces both, ``add_param_group`` clears the
        cache): on a small model, rebuilding these lists every step costs a visible fraction of
        the base optimizer's step.
        """
        glob = self._global_state()
        key = (glob, tuple(map(id, self.param_groups)))
        cache = getattr(self, "_step_cache", None)
        complete = all(g is not None for g in grads)
        if complete and cache is not None and cache[0][0] is key[0] and cache[0][1] == key[1]:
            return cache[1]
        groups = [group for group in self.param_groups for _ in group["params"]]
        active = [i for i, g in enumerate(grads) if g is not None]
        plan = (active, [self._param_state(params[i]) for i in active], [groups[i] for i in active])
        self._step_cache = (key, plan) if complete else None
        return plan

    def _param_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "momentum" not in state:
            hp = self.param_groups[0]
            fixed = hp["fixed_momentum"]
            state["momentum"] = float(hp["min_momentum"] if fixed is None else fixed)
            state["lr_scale"] = float(self._lr_scales(np.zeros((1, 1)), np.array([state["momentum"]]), None)[0])
        return state

    def _accumulate(self, params: list[Tensor], grads: list[Tensor | None],
                    probes: list[Tensor | None] | None) -> dict[str, Any]:
        """Write this step's gradients into the ring and update the EMAs of lags 0..K.

        ``probes`` (Adam: ``P g``) replace the current gradient on the left of ``⟨·, g_{t−k}⟩``.
        The EMAs are kept in time order (row ``i`` is lag ``K − i``): the ring read from the slot
        after the newest one is then time-ordered too, in at most two contiguous pieces
        (:meth:`_ring_views`), and each piece updates its EMAs with one fused ``addmv``
        (``ema ← (1−w)·ema + w·ring·probe``).
        """
        hp = self.param_groups[0]
        glob = self._statistics(params)
        ring, samples = glob["lag_ring"], glob["samples"]
        slots = ring.shape[0]
        row, pieces, row_parts = self._ring_views(glob, samples % slots, samples + 1 >= slots, params)
        # One fused copy into per-tensor views of the slot costs about half of reshape + cat on a
        # small model; cat remains for steps where a tensor has no gradient.
        if all(t is not None for t in grads):
            torch._foreach_copy_(row_parts, grads)
        else:
            row.copy_(torch.cat([t.reshape(-1) if t is not None else p.new_zeros(p.numel())
                                 for t, p in zip(grads, params)]))
        if probes is None:
            probe = row
        elif all(t is not None for t in probes):
            probe, probe_parts = self._probe_buffer(ring, params)
            torch._foreach_copy_(probe_parts, probes)
        else:
            probe = torch.cat([t.reshape(-1) if t is not None else p.new_zeros(p.numel())
                               for t, p in zip(probes, params)]).to(ring.dtype)
        w = 1.0 / float(hp["horizon"])
        for rows, emas, columns in pieces:
            if columns is None:
                emas.addmv_(rows, probe, beta=1.0 - w, alpha=w)
            else:
                for block_rows, block_ema, (a, b) in zip(rows, emas, columns):
                    block_ema.addmv_(block_rows, probe[a:b], beta=1.0 - w, alpha=w)
        glob["samples"] = samples + 1
        return glob

    def _probe_buffer(self, ring: Tensor, params: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """A flat buffer for the probe, like a ring row, and its per-tensor views; cached."""
        cache = getattr(self, "_probe_cache", None)
        if cache is None or cache[0] is not ring:
            buf = torch.empty_like(ring[0])
            cache = self._probe_cache = (ring, buf, flat_views(buf, params))
        return cache[1], cache[2]

    def _ring_views(self, glob: dict[str, Any], pos: int, full: bool, params: list[Tensor]
                    ) -> tuple[Tensor, list[tuple], list[Tensor]]:
        """Slot ``pos`` of the ring, the ``(ring rows, EMAs, column ranges)`` pieces to update
        after writing it, and the slot's views shaped as the parameters; cached.

        Rows ``pos+1..`` hold the older lags ``K..pos+1``, rows ``0..pos`` the lags ``pos..0``;
        before the stream is K + 1 long (``full`` false) the older rows are unwritten and their
        EMAs wait. The views are cached per slot because building them costs more per step, on a
        small model, than the products themselves. In ``per_block`` mode each piece is a list of
        per-tensor views and the column ranges of the tensors.
        """
        ring, ema = glob["lag_ring"], glob["autocorr"]
        base = getattr(self, "_view_base", None)
        if base is None or base[0] is not ring or base[1] is not ema:
            self._view_base, self._view_cache = (ring, ema), {}
        key = (pos, full)
        if key not in self._view_cache:
            slots = ring.shape[0]
            pieces = [(ring[:pos + 1], ema[slots - 1 - pos:])]
            if full and pos + 1 < slots:
                pieces.append((ring[pos + 1:], ema[:slots - 1 - pos]))
            if self.param_groups[0]["per_block"]:
                bounds, start = [], 0
                for n in glob["layout"]:
                    bounds.append((start, start + n))
                    start += n
                views = [([rows[:, a:b] for a, b in bounds], [e[:, i] for i in range(len(bounds))], bounds)
                         for rows, e in pieces]
            else:
                views = [(rows, e[:, 0], None) for rows, e in pieces]
            self._view_cache[key] = (ring[pos], views, flat_views(ring[pos], params))
        return self._view_cache[key]

    # ---- the solve ------------------------------------------------------------------------

    def _solve(self, params: list[Tensor]) -> None:
        """Re-solve β (and, for GreedySGD's ``lr_rule`` other than ``"fixed"``, the lr scale) from the
        current statistics."""
        hp = self.param_groups[0]
        glob = self._global_state()
        decay = 1.0 - 1.0 / float(hp["horizon"])
        samples = glob["samples"]
        live = min(samples, hp["lags"] + 1)  # lags seen at least once
        # Debiased as statistics.ema_debiased does, in numpy: the arrays are tiny and numpy's
        # per-call cost is a fraction of torch's.
        stats = glob["autocorr"]
        if stats.dtype not in (torch.float32, torch.float64):  # numpy has no bfloat16
            stats = stats.double()
        ema = stats.cpu().numpy().T[:, ::-1][:, :live].astype(np.float64)  # lag order
        # horizon 1 (decay 0): the EMA is the last product, already unbiased.
        r = ema / -np.expm1((samples - np.arange(live)) * math.log(decay)) if decay > 0 else ema
        if not np.isfinite(r).all():
            return  # a non-finite gradient reached the statistics; keep the last solution
        tail = geometric_tail(r, max_ratio=hp["max_momentum"])
        # Two zooms of 33 points locate β* to ~1e-4·(1−β*), far below what the statistics resolve.
        sol = optimal_momentum(r, hp["min_momentum"], hp["max_momentum"], tail=tail,
                               refinements=2, zoom=33)
        fixed = hp["fixed_momentum"]
        betas = sol.momentum if fixed is None else np.full_like(sol.momentum, fixed)
        # Python lists: indexing numpy scalars one at a time costs more than the solve's maths.
        betas_l, scales_l = betas.tolist(), self._lr_scales(r, betas, tail).tolist()
        usable = (r[:, 0] > 0).tolist()  # no signal (zero gradients): keep the current β
        per_block = hp["per_block"]
        for i, p in enumerate(params):
            j = i if per_block else 0
            if usable[j]:
                state = self._param_state(p)
                state["momentum"] = betas_l[j]
                if math.isfinite(scales_l[j]):  # else the estimate has no valid scale: keep the last
                    state["lr_scale"] = scales_l[j]
        glob["num_solves"] += 1
        total = r.sum(0).tolist()
        solved, ratios = sol.momentum.tolist(), sol.tail_ratio.tolist()
        info: dict[str, Any] = {"momentum_solved": sum(solved) / len(solved),
                                "objective": sum(sol.objective.tolist()),
                                "tail_ratio": sum(ratios) / len(ratios), "r0": total[0]}
        for k in range(1, hp["lags"] + 1):
            info[f"acf_{k}"] = total[k] / total[0] if k < live and total[0] > 0 else math.nan
        glob["solve"] = info

    def _lr_scales(self, r: np.ndarray, betas: np.ndarray, tail: tuple[np.ndarray, np.ndarray] | None
                   ) -> np.ndarray:
        """The lr factor of each block at momenta ``betas``; ``tail`` None before any statistics."""
        del r, tail
        return np.ones_like(betas)

    def _due(self, step: int) -> bool:
        # Every step while the ring fills (lag k first exists at step k + 1), so that β follows
        # the statistics from the start rather than waiting update_every steps at the β that lag
        # 0 alone gives; then every update_every steps.
        hp = self.param_groups[0]
        return step <= hp["lags"] + 1 or step % hp["update_every"] == 0

    # ---- reporting ------------------------------------------------------------------------

    def diagnostics(self) -> dict[str, Any]:
        """The chosen hyperparameters and the statistics of the last solve, as python floats.

        Keys: ``momentum`` (β in use; in ``per_block`` mode the mean over tensors, with
        ``momentum_min``/``momentum_max``), ``momentum_solved`` (the greedy β*, equal to
        ``momentum`` unless ``fixed_momentum`` holds β), ``objective`` (J(β*), summed over blocks),
        ``tail_ratio`` (geometric continuation beyond lag K), ``r0`` (``E‖g‖²``; for Adam the
        preconditioned ``E[gᵀPg]``), ``acf_1..acf_K`` (``r_k/r_0`` of all tensors together), for
        GreedySGD with ``lr_rule="motion"`` or ``"energy"`` ``lr_eff`` (first group's lr times its scale), for
        GreedyAdam with ``energy_matched_lr`` ``lr_factor`` (``√((1+β₁)/(1−β₁))`` of the β₁ in use,
        mean over tensors) and ``lr_eff`` (first group's lr times it), and the
        counts ``num_solves`` and ``steps`` since the start of training (they survive
        ``state_dict()``). NaN before the first step.
        """
        glob = self._global_state()
        hp = self.param_groups[0]
        out: dict[str, Any] = {"momentum": math.nan, "momentum_solved": math.nan,
                               "objective": math.nan, "tail_ratio": math.nan, "r0": math.nan}
        out.update({f"acf_{k}": math.nan for k in range(1, hp["lags"] + 1)})
        out.update(glob["solve"])
        betas = [s["momentum"] for s in self.state.values() if "momentum" in s]
        if betas:
            out["momentum"] = sum(betas) / len(betas)
            if hp["per_block"]:
                out["momentum_min"], out["momentum_max"] = min(betas), max(betas)
        out.update(self._extra_diagnostics())
        out["num_solves"] = int(glob["num_solves"])
        out["steps"] = int(glob["greedy_step"])
        return out

    def _extra_diagnostics(self) -> dict[str, Any]:
        return {}

    # ---- step -----------------------------------------------------------------------------

    def step(self, closure: Closure | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step()
        return loss

    def _gather(self) -> tuple[list[Tensor], list[Tensor | None]]:
        params = self._all_params()
        grads = [p.grad for p in params]
        for p, g in zip(params, grads):
            if g is not None and g.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if p.is_complex():
                raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
        return params, grads

    def _step(self) -> None:  # pragma: no cover - defined by subclasses
        raise NotImplementedError


def _scatter(values: list[Tensor], active: list[int], n: int) -> list[Tensor | None]:
    """``values`` of the parameters at indices ``active`` as a list over all ``n`` (None elsewhere)."""
    if len(active) == n:
        return list(values)
    out: list[Tensor | None] = [None] * n
    for i, v in zip(active, values):
        out[i] = v
    return out


def _with_weight_decay(params: list[Tensor], grads: list[Tensor | None],
                       groups: list[dict[str, Any]]) -> list[Tensor | None]:
    """``g + λθ`` (L2, as torch.optim) where the parameter's group has ``weight_decay`` λ > 0."""
    return [g if g is None or group["weight_decay"] == 0 else g.add(p, alpha=group["weight_decay"])
            for p, g, group in zip(params, grads, groups)]


class GreedySGD(_GreedyMomentum):
    r"""SGD with heavy-ball momentum chosen online by the greedy principle (Lee & Lee, arXiv 2512.06370).

    .. code-block:: text

        g ← ∇L + λθ                                  # weight_decay λ (L2, as torch.optim.SGD)
        r̂_k ← EMA_horizon(⟨g_t, g_{t−k}⟩), k = 0..K  # bias-corrected; all tensors or per tensor
        at steps 1..K+1 and every update_every steps:
            β ← argmax_{β∈[β_min, β_max]} √(1−β²) Σ_k β^k r̂_k   # lags > K: geometric, ratio ≤ β_max
        m ← βm + g ;  θ ← θ − lr·s·m                # s = 1; lr_rule="motion": s = 1/√Ê‖m‖²;
                                                    #        lr_rule="energy": s = √(1−β²)

    The score is the loss-drop rate of the unit-energy exponential filter; the update is the
    heavy ball of ``torch.optim.SGD`` with that β, as the paper's dynamic momentum rule applies it
    (with β held constant the optimizer is ``torch.optim.SGD(momentum=β)``). At step 1 only lag 0
    exists and the solve returns ``min_momentum``; until lag K has been seen, the solve runs every
    step on the lags seen.

    Args:
      params: parameters or parameter groups (``lr`` and ``weight_decay`` may differ per group).
      lr: learning rate; with ``lr_rule="motion"`` the expected motion per step instead.
      weight_decay: L2 coefficient added to the gradient.
      horizon: EMA time constant of the statistics, in steps.
      lags: K, the number of lags estimated.
      update_every: steps between solves. The default is a fifth of the default horizon: the EMAs
        move little between solves, and a solve's cost (about 0.1–0.2 ms of numpy on a CPU) is
        spread over 20 steps.
      min_momentum, max_momentum: bounds of the solve.
      per_block: solve one β per parameter tensor from its own statistics, instead of one β from
        the sum over all tensors.
      lr_rule: ``"fixed"`` (lr as given) or ``"motion"``: the learning rate is re-solved with β as
        ``lr/√Ê‖m‖²`` (:func:`metaopt.greedy.momentum_learning_rate`), the greedy learning rate under
        an expected-motion budget of ``lr`` per step (normalised SGD with momentum; with
        ``per_block`` the budget is per tensor, so the whole model moves about √(tensors)·lr).
        Where the truncated statistics give ``Ê‖m‖² ≤ 0`` (an oscillating stream at a β held
        above the free optimum) the last scale is kept; or
        ``"energy"`` (ours, like GreedyAdam's ``energy_matched_lr``): the lr is scaled by √(1−β²),
        so that the filter run is ``lr·√(1−β²)β^k``, the unit-energy filter the score ranks, at
        the energy of β = 0. On the noisy quadratic (lr 0.3, 5 seeds) it tracks at 49.0 against
        the default's 42.2 and the best fixed β's 45.5: the default's margin there comes from the
        heavy ball's larger motion at the chosen β, not from the filter's shape.
      fixed_momentum: if set, β is held at this value instead of solved (statistics and
        diagnostics continue, ``momentum_solved`` shows the greedy choice): the optimizer is then
        ``torch.optim.SGD(momentum=β)``, the baseline of a momentum sweep on the same code path.

    Warning: a non-finite gradient enters the EMAs and stays there; solves are then skipped and
    the last β kept.

    Memory: K + 2 tensors the size of the parameters (lag ring, in at least float32, and
    momentum buffer).
    """

    _shared_keys = ("lr_rule",)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.05,
        weight_decay: float = 0.0,
        horizon: float = 100.0,
        lags: int = 8,
        update_every: int = 20,
        min_momentum: float = 0.0,
        max_momentum: float = 0.99,
        per_block: bool = False,
        lr_rule: str = "fixed",
        fixed_momentum: float | None = None,
    ):
        defaults = dict(lr=lr, weight_decay=weight_decay, horizon=horizon, lags=lags,
                        update_every=update_every, min_momentum=min_momentum,
                        max_momentum=max_momentum, per_block=per_block, lr_rule=lr_rule,
                        fixed_momentum=fixed_momentum)
        super().__init__(params, defaults)

    def _validate(self, hp: dict[str, Any]) -> None:
        _validate_greedy(hp)
        if hp["lr_rule"] not in _LR_RULES:
            raise ValueError(f"Invalid lr_rule: {hp['lr_rule']!r} (must be one of {', '.join(map(repr, _LR_RULES))})")

    def _lr_scales(self, r: np.ndarray, betas: np.ndarray, tail: tuple[np.ndarray, np.ndarray] | None
                   ) -> np.ndarray:
        rule = self.param_groups[0]["lr_rule"]
        if rule == "energy":
            return np.sqrt(1.0 - betas ** 2)
        if rule == "fixed" or tail is None:  # no statistics yet (a tensor's first step): the lr as given
            return np.ones_like(betas)
        return momentum_learning_rate(r, betas[:, None], 1.0, tail)[:, 0]

    def _extra_diagnostics(self) -> dict[str, Any]:
        if self.param_groups[0]["lr_rule"] == "fixed":
            return {}
        first = self.state.get(self.param_groups[0]["params"][0], {})
        return {"lr_eff": float(self.param_groups[0]["lr"]) * float(first.get("lr_scale", math.nan))}

    def _step(self) -> None:
        params, grads = self._gather()
        if all(g is None for g in grads):
            return
        active, states, groups = self._step_plan(params, grads)
        act_params = params if len(active) == len(params) else [params[i] for i in active]
        act_grads = _with_weight_decay(act_params, [grads[i] for i in active], groups)
        glob = self._accumulate(params, _scatter(act_grads, active, len(params)), None)
        glob["greedy_step"] += 1
        if self._due(glob["greedy_step"]):
            self._solve(params)
        for p, state in zip(act_params, states):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        greedy_sgd_update(act_params, act_grads, [s["momentum_buffer"] for s in states],
                          [s["momentum"] for s in states],
                          [g["lr"] * s["lr_scale"] for g, s in zip(groups, states)])


class GreedyAdam(_GreedyMomentum):
    r"""Adam (or AdamW) with β₁ chosen online by the greedy principle (Lee & Lee, arXiv 2512.06370).

    .. code-block:: text

        v ← β₂v + (1−β₂)g² ;  P = 1/(√(v/(1−β₂^t)) + ε)      # Adam's diagonal preconditioner
        r̃_k ← EMA_horizon(⟨P g_t, g_{t−k}⟩), k = 0..K       # the autocorrelation seen through P
        at steps 1..K+1 and every update_every steps:
            β₁ ← argmax √(1−β²) Σ_k β^k r̃_k
        m ← β₁m + (1−β₁)g ;  c ← β₁c + (1−β₁) ;  θ ← θ − lr·P·m/c

    Adam's motion is ``P·Σ_k (1−β₁)β₁^k g_{t−k}``: the exponential family filtered through P, so
    the loss-drop rate is ``Σ_k q_k⟨P, R_k⟩`` and β₁ is ranked by the same unit-energy score as SGD's
    momentum, on the preconditioned autocorrelation. ``c`` generalises Adam's bias correction
    ``1 − β₁^t`` to a β₁ that changes. The diagonal preconditioner is itself the greedy optimizer
    under a per-coordinate motion budget (:func:`metaopt.greedy.diagonal_optimizer`).

    Warning: the score ranks filter *shapes* at equal energy, ``√(1−β²)β^k``, but Adam applies the
    shape at unit DC gain, ``(1−β)β^k``: its motion per step shrinks as β grows, where heavy-ball
    momentum's grows. Where Adam's motion, not its noise, is the bottleneck the rule errs towards
    large β. On the noisy quadratic bowl (experiment ``greedy_quadratic``, lr 0.3) the gradient
    stream under β₁ = 0 has lag-1 autocorrelation ≈ 0.5 and the rule picks β₁ ≈ 0.64, while β₁ = 0
    tracks best (mean tracking loss +60%, 3 seeds). Measured on that stream, the preconditioned
    ``⟨Pg_t, g_{t−k}⟩``, the normalised stream's ``⟨Pg_t, Pg_{t−k}⟩`` and the raw ``⟨g_t, g_{t−k}⟩``
    all give β₁* ≈ 0.64 (the rotated bowl makes P nearly isotropic), and horizon 30–300, K 3–16 or
    a solve every step move it by less than 0.1. Scoring Adam's own unit-DC-gain filter instead,
    ``(1−β)Σ β^k r̃_k``, would always pick β₁ = 0 (a convex combination of the ``r̃_k`` never
    exceeds ``r̃_0``), so no re-reading of the score fixes this; we keep the paper's rule.
    The choice is right for the filter the score assumes: Adam at β₁ = 0.64 with the lr raised to
    keep β₁ = 0's motion energy, 0.3·√((1+β₁)/(1−β₁)) = 0.64, tracks at 24.4 (β₁ = 0 at lr 0.3:
    31.6). At Adam's tuned lr on that bowl (3; lr grid at β₁ = 0.9) the failure is the opposite
    one: under β₁ = 0 the stream oscillates (lag-1 autocorrelation −0.96), the score is largest at
    β₁ = 0 and the rule stays there (103.5), while β₁ = 0.5 tracks at 21.8. The score is first
    order in the motion; it cannot see momentum damping an overshoot.

    Args:
      params: parameters or parameter groups (``lr``, ``weight_decay`` may differ per group).
      lr: learning rate.
      beta2: decay of the second-moment EMA.
      eps: added to ``√v̂``.
      weight_decay: L2 coefficient added to the gradient, or with ``decoupled_weight_decay``
        the AdamW decay ``θ ← θ(1 − lr·λ)`` (Loshchilov & Hutter 2019).
      horizon, lags, update_every, min_momentum, max_momentum, per_block: as :class:`GreedySGD`
        (``min_momentum``/``max_momentum`` bound β₁).
      fixed_momentum: if set, β₁ is held at this value (the optimizer is then
        ``torch.optim.Adam(betas=(β₁, beta2))``); statistics and diagnostics continue.
      energy_matched_lr: our variant, not the paper's (default ``False``: plain Adam steps). If
        true, the effective lr is ``lr·√((1+β₁)/(1−β₁))`` for the β₁ in use at each step (solved
        or fixed), so the step applies the unit-energy filter ``√(1−β₁²)β₁^k`` the score ranks
        (the motion energy of β₁ = 0 at ``lr``) instead of Adam's ``(1−β₁)β₁^k``; see the warning
        above. With ``fixed_momentum=b`` the optimizer is ``torch.optim.Adam`` at lr
        ``lr·√((1+b)/(1−b))`` (the factor scales Adam's step; AdamW's decoupled decay keeps
        ``lr·λ``). The authors' reference code has an ``lr_modulation`` switch (off by
        default) whose rule is not known here; this is not claimed to be it. One value for all
        groups; :meth:`diagnostics` reports ``lr_factor`` and ``lr_eff`` (first group) when on.
        Measured (mean over seeds; fixed-β baselines plain Adam at the same lr): noisy quadratic lr
        0.3, 24.0 vs best fixed β₁ = 0 31.6 (β₁ → 0.37); at lr 1 and 3 the rule stays at β₁ = 0,
        factor 1, so nothing changes (22.5 vs β₁ = 0.5 16.0; 103.5 vs 21.8); mnist1d val 1.566 vs
        1.564 (β₁ = 0, 5 seeds); two moons val 0.0968 vs 0.0919 (β₁ = 0.9, 3 seeds).

    Memory: K + 4 tensors the size of the parameters (lag ring, m, v, and the preconditioned
    gradient fed to the statistics), the ring and that buffer in at least float32.
    """

    _shared_keys = ("energy_matched_lr",)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        horizon: float = 100.0,
        lags: int = 8,
        update_every: int = 20,
        min_momentum: float = 0.0,
        max_momentum: float = 0.99,
        per_block: bool = False,
        fixed_momentum: float | None = None,
        energy_matched_lr: bool = False,
    ):
        defaults = dict(lr=lr, beta2=beta2, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, horizon=horizon, lags=lags,
                        update_every=update_every, min_momentum=min_momentum,
                        max_momentum=max_momentum, per_block=per_block,
                        fixed_momentum=fixed_momentum, energy_matched_lr=energy_matched_lr)
        super().__init__(params, defaults)

    def _validate(self, hp: dict[str, Any]) -> None:
        _validate_greedy(hp)
        if not (_is_real(hp["beta2"]) and 0 <= hp["beta2"] < 1):
            raise ValueError(f"Invalid beta2: {hp['beta2']!r} (must be in [0, 1))")
        if not (_is_real(hp["eps"]) and hp["eps"] >= 0):
            raise ValueError(f"Invalid eps: {hp['eps']!r} (must be >= 0)")
        if not isinstance(hp["decoupled_weight_decay"], bool):
            raise ValueError(f"Invalid decoupled_weight_decay: {hp['decoupled_weight_decay']!r} "
                             "(must be a bool)")
        if not isinstance(hp["energy_matched_lr"], bool):
            raise ValueError(f"Invalid energy_matched_lr: {hp['energy_matched_lr']!r} (must be a bool)")

    def _extra_diagnostics(self) -> dict[str, Any]:
        hp = self.param_groups[0]
        if not hp["energy_matched_lr"]:
            return {}
        betas = [s["momentum"] for s in self.state.values() if "momentum" in s]
        if not betas:
            return {"lr_factor": math.nan, "lr_eff": math.nan}
        factor = sum(energy_matched_factor(b) for b in betas) / len(betas)
        return {"lr_factor": factor, "lr_eff": float(hp["lr"]) * factor}

    def _step(self) -> None:
        params, grads = self._gather()
        if all(g is None for g in grads):
            return
        active, states, act_groups = self._step_plan(params, grads)
        act_params = params if len(active) == len(params) else [params[i] for i in active]
        coupled = [{"weight_decay": 0.0} if g["decoupled_weight_decay"] else g for g in act_groups]
        act_grads = _with_weight_decay(act_params, [grads[i] for i in active], coupled)
        for p, state in zip(act_params, states):
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["avg_weight"] = 0.0
                state["adam_step"] = 0
            state["adam_step"] += 1
        sq = [s["exp_avg_sq"] for s in states]
        beta2 = _scalars([g["beta2"] for g in act_groups])
        torch._foreach_mul_(sq, beta2)
        if isinstance(beta2, list):
            torch._foreach_addcmul_(sq, act_grads, act_grads, [1.0 - b for b in beta2])
        else:
            torch._foreach_addcmul_(sq, act_grads, act_grads, value=1.0 - beta2)
        denoms = torch._foreach_div(sq, _scalars([1.0 - g["beta2"] ** s["adam_step"]
                                                  for g, s in zip(act_groups, states)]))
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, _scalars([g["eps"] for g in act_groups]))
        probes = _scatter(torch._foreach_div(act_grads, denoms), active, len(params))
        glob = self._accumulate(params, _scatter(act_grads, active, len(params)), probes)
        glob["greedy_step"] += 1
        if self._due(glob["greedy_step"]):
            self._solve(params)
        decoupled = [(p, g) for p, g in zip(act_params, act_groups)
                     if g["decoupled_weight_decay"] and g["weight_decay"] != 0]
        if decoupled:
            torch._foreach_mul_([p for p, _ in decoupled],
                                [1.0 - g["lr"] * g["weight_decay"] for _, g in decoupled])
        weights = greedy_adam_update(act_params, act_grads, [s["exp_avg"] for s in states], denoms,
                                     [s["momentum"] for s in states],
                                     [s["avg_weight"] for s in states], [g["lr"] for g in act_groups],
                                     energy_matched_lr=act_groups[0]["energy_matched_lr"])
        for state, w in zip(states, weights):
            state["avg_weight"] = w
