"""MetaOptimize: online step-size tuning wrapped around a first-order optimizer.

Sharifnassab, A., Salehkaleybar, S. and Sutton, R. S., "MetaOptimize: A Framework for Optimizing
Step Sizes and Other Meta-parameters", ICML 2025 (arXiv 2402.02342).

The step sizes are ``α = exp(β)``, one per block of parameters. The base optimizer (SGD, SGD with
momentum, RMSProp, Adam/AdamW or Lion) moves θ with those step sizes; a forward-mode trace ``h``
of ``∂θ/∂β`` turns each new gradient into a meta-gradient ``hᵀ∇f_t``, the derivative of the
current loss with respect to the (discounted) past log step sizes, and a meta-optimizer (RMSProp,
Adam or Lion on scalars) moves β down it.

The math lives in plain functions: one per base optimizer (:data:`BASE_UPDATES`, each moves θ and
its trace together) and :func:`meta_update` (one block's β). :class:`MetaOptimize` gathers tensors,
lays out the blocks and keeps the state; :class:`MetaOptimizeFull` adds the Hessian-vector products
of the fuller trace.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from metaopt.optim._metaoptimize_foreach import (
    FLAT_UPDATES,
    FOREACH_UPDATES,
    share_trace_scale,
    trace_dot,
    zeros_state,
)
from metaopt.optim.pal import _RNGSnapshot
from metaopt.optim.utils import rejected_group_removed, shared_hyperparameters

__all__ = ["BASES", "BASE_UPDATES", "FULL_BASES", "METAS", "MetaOptimize", "MetaOptimizeFull", "VARIANTS",
           "meta_update"]

Closure = Callable[[], Any]
State = dict[str, Any]
Hyper = dict[str, Any]

BASES = ("sgd", "sgdm", "rmsprop", "adam", "lion")
METAS = ("fixed", "rmsprop", "adam", "lion")
VARIANTS = ("hessian_free", "full")
# Lion's sign has derivative 0 almost everywhere, so its Hessian-free trace is already its full one.
FULL_BASES = ("sgd", "sgdm", "rmsprop", "adam")
TRACE_TERMS = ("step", "gradient")
BLOCK_MODES = ("scalar", "layerwise", "groupwise")

# Per-base and per-meta defaults of the options only that optimizer uses; ``None`` in the
# constructor means "this optimizer's default", and an option the chosen optimizer does not use
# must stay ``None`` (a config that sets it has a mistake in it).
_BASE_OPTIONS: dict[str, dict[str, Any]] = {
    "sgd": {},
    "sgdm": {"momentum": 0.9},
    "rmsprop": {"rho": 0.99, "eps": 1e-8},
    "adam": {"betas": (0.9, 0.999), "eps": 1e-8},
    "lion": {"betas": (0.9, 0.99)},
}
_META_OPTIONS: dict[str, dict[str, Any]] = {
    "fixed": {},
    "rmsprop": {"meta_rho": 0.999, "meta_eps": 1e-12},
    "adam": {"meta_betas": (0.9, 0.999), "meta_eps": 1e-12},
    # (interpolation, momentum) as in Lion; the authors' meta-Lion: 0.9 and 0.99.
    "lion": {"meta_betas": (0.9, 0.99)},
}
_BASE_KEYS = ("momentum", "rho", "betas", "eps")
_META_KEYS = ("meta_betas", "meta_rho", "meta_eps")
# May differ between parameter groups; everything else is optimizer-wide.
_GROUP_KEYS = ("alpha0", "weight_decay", *_BASE_KEYS)
_GLOBAL_KEYS = ("base", "meta", "meta_lr", "gamma", "blocks", "variant", "trace_term", "foreach", *_META_KEYS)
# torch.optim's rule for foreach=None: the multi-tensor path where its kernels exist.
_FOREACH_DEVICES = ("cuda", "xpu")


# --------------------------------------------------------------------------------------------
# Base optimizers: each moves θ by its step and adds the same step to the trace h.
#
# All share the trace recursion (decoupled weight decay λ, discount γ, Δθ_t = θ_t − θ_{t+1}):
#     h_{t+1} = γ(1 − αλ)·h_t − Δθ_t                         (Hessian-free)
# and, given hv = H_t h_t, the fuller form that also differentiates the base optimizer's state
# (see MetaOptimizeFull).
# The trace is kept as h = s·u, u the tensor st["trace"] and s the float st["trace_scale"], so
# that the decay γ(1 − αλ) multiplies a float rather than every element (one kernel less per
# tensor per step); each term added to h is added to u divided by s.
# The parameter arithmetic repeats torch.optim's single-tensor code operation for operation, so
# that meta="fixed" follows torch.optim's trajectory bit for bit.
# --------------------------------------------------------------------------------------------

# Below this s is folded into u (u ← s·u, s ← 1), long before 1/s could overflow a float32 u.
_MIN_TRACE_SCALE = 1e-6


def _decay_scale(st: State, decay: float) -> float:
    """``s ← decay·s`` (folding s into u when small); returns ``1/s``, the factor for new terms."""
    scale = st["trace_scale"] * decay
    if scale < _MIN_TRACE_SCALE:
        st["trace"].mul_(scale)
        scale = 1.0
    st["trace_scale"] = scale
    return 1.0 / scale


def _decay(p: Tensor, st: State, alpha: float, wd: float, gamma: float, trace_wd: bool = True) -> float:
    """``h ← γ(1 − αλ)h − αλθ`` and ``θ ← (1 − αλ)θ``, the weight-decay part of the step.

    ``trace_wd=False`` leaves ``−αλθ`` out of the trace, as the authors' AdamW+Lion code does.
    Returns ``1/s``: the rest of the step is added to ``u`` multiplied by it.
    """
    inv_scale = _decay_scale(st, gamma * (1 - alpha * wd))
    if wd != 0:
        if trace_wd:
            st["trace"].add_(p, alpha=-alpha * wd * inv_scale)
        p.mul_(1 - alpha * wd)
    return inv_scale


def _advance_square_trace(p: Tensor, st: State, g: Tensor, hv: Tensor, rho: float, gamma: float) -> Tensor:
    """``k_v ← γ(ρk_v + 2(1 − ρ)·g ⊙ H h)``: the full trace's ``∂v/∂β`` of ``v ← ρv + (1 − ρ)g²``."""
    kv = zeros_state(p, st, "square_trace")
    return kv.mul_(gamma * rho).addcmul_(g, hv, value=2 * gamma * (1 - rho))


def _normalized_derivative(dx: Tensor, x: Tensor, kv: Tensor, v: Tensor, denom: Tensor,
                           bias: float = 1.0) -> Tensor:
    """``∂(x/D)/∂β`` for ``D = √(v/bias) + ε``, given ``dx = ∂x/∂β`` and ``kv = ∂v/∂β``.

    ``∂D/∂β = k_v/(2√(bias·v))``; where v = 0 the gradient was always 0 and so is k_v.
    """
    d_denom = kv / (v.sqrt().mul_(2 * bias**0.5).clamp_(min=torch.finfo(v.dtype).tiny))
    return (dx - x * d_denom / denom) / denom


def sgd_update(p: Tensor, g: Tensor, st: State, alpha: float, hp: Hyper, gamma: float,
               hv: Tensor | None = None) -> None:
    """SGD, ``θ ← θ − α(g + λθ)``; with ``hv = H h`` the trace gains ``−γα·H h``."""
    k = _decay(p, st, alpha, hp["weight_decay"], gamma)
    u = st["trace"]
    if hv is not None:
        u.add_(hv, alpha=-gamma * alpha * k)
    p.add_(g, alpha=-alpha)
    u.add_(g, alpha=-alpha * k)


def sgdm_update(p: Tensor, g: Tensor, st: State, alpha: float, hp: Hyper, gamma: float,
                hv: Tensor | None = None) -> None:
    """Heavy ball as torch.optim.SGD (``b ← μb + g``, ``θ ← θ − α(b + λθ)``).

    The full trace also differentiates the buffer: ``k ← γ(μk + H h)`` and ``h`` gains ``−αk``.
    """
    k = _decay(p, st, alpha, hp["weight_decay"], gamma)
    u = st["trace"]
    buf = st.get("momentum_buffer")
    if buf is None:
        buf = st["momentum_buffer"] = g.clone(memory_format=torch.preserve_format)
    else:
        buf.mul_(hp["momentum"]).add_(g)
    if hv is not None:
        dk = zeros_state(p, st, "momentum_trace")
        dk.mul_(gamma * hp["momentum"]).add_(hv, alpha=gamma)
        u.add_(dk, alpha=-alpha * k)
    p.add_(buf, alpha=-alpha)
    u.add_(buf, alpha=-alpha * k)


def rmsprop_update(p: Tensor, g: Tensor, st: State, alpha: float, hp: Hyper, gamma: float,
                   hv: Tensor | None = None) -> None:
    """RMSProp as torch.optim.RMSprop (no bias correction, ε outside the root).

    With ``hv = H h`` (the full trace): ``k_v ← γ(ρk_v + 2(1 − ρ)·g ⊙ H h)`` and ``h`` gains
    ``−α·[H h/D − g ⊙ k_v/(2√v·D²)]``, ``D = √v + ε``, the derivative of ``g/D``.
    """
    k = _decay(p, st, alpha, hp["weight_decay"], gamma)
    v = zeros_state(p, st, "square_avg")
    if hv is not None:
        kv = _advance_square_trace(p, st, g, hv, hp["rho"], gamma)
    v.mul_(hp["rho"]).addcmul_(g, g, value=1 - hp["rho"])
    avg = v.sqrt().add_(hp["eps"])
    if hv is not None:
        st["trace"].add_(_normalized_derivative(hv * gamma, g, kv, v, avg), alpha=-alpha * k)
    p.addcdiv_(g, avg, value=-alpha)
    st["trace"].addcdiv_(g, avg, value=-alpha * k)


def adam_update(p: Tensor, g: Tensor, st: State, alpha: float, hp: Hyper, gamma: float,
                hv: Tensor | None = None) -> None:
    """Adam with decoupled weight decay, as torch.optim.AdamW (torch.optim.Adam when λ = 0).

    ``trace_term="gradient"``: the trace gains ``−α·g/(√v̂ + ε)`` instead of the step.

    With ``hv = H h`` (the full trace) both moments are differentiated too, ``k_m = ∂m/∂β`` and
    ``k_v = ∂v/∂β``, and the trace gains the derivative of the direction ``m̂/(√v̂ + ε)``:

    .. code-block:: text

        k_m ← γ(β₁k_m + (1 − β₁)·H h)
        k_v ← γ(β₂k_v + 2(1 − β₂)·g ⊙ H h)
        h   ← γ(1 − αλ)h − Δθ − α/(1 − β₁ᵗ)·[k_m/D − m ⊙ k_v/(2√((1 − β₂ᵗ)v)·D²)],
              D = √(v/(1 − β₂ᵗ)) + ε
    """
    full = hv is not None
    k = _decay(p, st, alpha, hp["weight_decay"], gamma, hp["trace_term"] == "step")
    if "exp_avg" not in st:
        st["step"] = 0
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    beta1, beta2 = hp["betas"]
    m, v = st["exp_avg"], st["exp_avg_sq"]
    if full:
        km = zeros_state(p, st, "moment_trace").mul_(gamma * beta1).add_(hv, alpha=gamma * (1 - beta1))
        kv = _advance_square_trace(p, st, g, hv, beta2, gamma)
    st["step"] += 1
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # A float step, as torch.optim keeps it, so that β^step rounds identically.
    step = float(st["step"])
    step_size = alpha / (1 - beta1**step)
    bias2 = 1 - beta2**step
    denom = (v.sqrt() / bias2**0.5).add_(hp["eps"])
    if full:
        st["trace"].add_(_normalized_derivative(km, m, kv, v, denom, bias2), alpha=-step_size * k)
    p.addcdiv_(m, denom, value=-step_size)
    if hp["trace_term"] == "gradient":
        # The authors' AdamW+Lion code (meta_optimize/MetaOptimize_AdamW_Lion_hg.py).
        st["trace"].addcdiv_(g, denom, value=-alpha * k)
    else:
        st["trace"].addcdiv_(m, denom, value=-step_size * k)


def lion_update(p: Tensor, g: Tensor, st: State, alpha: float, hp: Hyper, gamma: float,
                hv: Tensor | None = None) -> None:
    """Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023).

    ``θ ← (1 − αλ)θ − α·sign(β₁m + (1 − β₁)g)``, then ``m ← β₂m + (1 − β₂)g``.
    """
    del hv
    k = _decay(p, st, alpha, hp["weight_decay"], gamma)
    m = zeros_state(p, st, "exp_avg")
    beta1, beta2 = hp["betas"]
    direction = m.lerp(g, 1 - beta1).sign_()
    p.add_(direction, alpha=-alpha)
    st["trace"].add_(direction, alpha=-alpha * k)
    m.lerp_(g, 1 - beta2)


BASE_UPDATES: dict[str, Callable[..., None]] = {
    "sgd": sgd_update,
    "sgdm": sgdm_update,
    "rmsprop": rmsprop_update,
    "adam": adam_update,
    "lion": lion_update,
}


# --------------------------------------------------------------------------------------------
# Meta-optimizers on one block's log step size β (python floats: a block is one scalar).
# --------------------------------------------------------------------------------------------


def meta_update(meta: str, beta: float, z: float, state: State, *, lr: float,
                betas: tuple[float, float] | None = None, rho: float | None = None,
                eps: float | None = None) -> tuple[float, State]:
    """One meta step on ``β`` down the meta-gradient ``z = hᵀ∇f_t``; returns ``(β, state)``.

    * ``fixed``: β unchanged;
    * ``rmsprop``: ``v ← ρv + (1 − ρ)z²``, ``β ← β − lr·z/(√(v/(1 − ρᵗ)) + ε)``;
    * ``adam``: Adam with bias correction on the scalar z;
    * ``lion``: ``β ← β − lr·sign(β₁m + (1 − β₁)z)``, ``m ← β₂m + (1 − β₂)z``; β moves by
      exactly ``lr`` per step (or not at all when the sign is 0), so α changes by at most a
      factor ``e^lr`` per step.

    ``state`` is not modified; the returned one replaces it.
    """
    if meta == "fixed":
        return beta, state
    new = dict(state)
    if meta == "lion":
        b1, b2 = betas
        m = new.get("meta_exp_avg", 0.0)
        c = b1 * m + (1 - b1) * z
        beta -= lr * ((c > 0) - (c < 0))
        new["meta_exp_avg"] = b2 * m + (1 - b2) * z
        return beta, new
    t = new.get("meta_step", 0) + 1
    new["meta_step"] = t
    if meta == "rmsprop":
        v = rho * new.get("meta_exp_avg_sq", 0.0) + (1 - rho) * z * z
        new["meta_exp_avg_sq"] = v
        return beta - lr * z / (math.sqrt(v / (1 - rho**t)) + eps), new
    if meta == "adam":
        b1, b2 = betas
        m = b1 * new.get("meta_exp_avg", 0.0) + (1 - b1) * z
        v = b2 * new.get("meta_exp_avg_sq", 0.0) + (1 - b2) * z * z
        new["meta_exp_avg"], new["meta_exp_avg_sq"] = m, v
        return beta - lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps), new
    raise ValueError(f"Invalid meta: {meta!r} (must be one of {METAS})")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _is_real(x: Any) -> bool:
    # A bool is an int to Python, but `gamma=True` is a config mistake, not 1.0.
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _pair(name: str, value: Any) -> tuple[float, float]:
    try:
        pair = tuple(value)
    except TypeError:
        raise ValueError(f"Invalid {name}: {value!r} (must be a pair of numbers in [0, 1))") from None
    if len(pair) != 2:
        raise ValueError(f"Invalid {name}: {value!r} (must be a pair of numbers in [0, 1))")
    for i, b in enumerate(pair):
        if not (_is_real(b) and 0 <= b < 1):
            raise ValueError(f"Invalid {name} parameter at index {i}: {b!r} (must be in [0, 1))")
    return float(pair[0]), float(pair[1])


def _resolve(hp: Hyper) -> Hyper:
    """Check every hyperparameter and fill the per-optimizer defaults; raises ValueError naming it."""

    def fail(name: str, rule: str) -> None:
        raise ValueError(f"Invalid {name}: {hp.get(name)!r} (must be {rule})")

    out = dict(hp)
    if out["base"] not in BASES:
        fail("base", f"one of {BASES}")
    if out["meta"] not in METAS:
        fail("meta", f"one of {METAS}")
    if out["variant"] not in VARIANTS:
        fail("variant", f"one of {VARIANTS}")
    if out["variant"] == "full" and out["base"] not in FULL_BASES:
        fail("variant", "'hessian_free' for base "
             f"{out['base']!r}: the full trace is implemented for the bases {FULL_BASES}")
    if out["trace_term"] not in TRACE_TERMS:
        fail("trace_term", f"one of {TRACE_TERMS}")
    if out["trace_term"] == "gradient" and out["variant"] == "full":
        fail("trace_term", "'step' with variant='full' (the full trace differentiates the step itself)")
    if out["trace_term"] == "gradient" and out["base"] != "adam":
        fail("trace_term", f"'step' for base {out['base']!r}: 'gradient' is the authors' AdamW trace")
    if not (_is_real(out["alpha0"]) and out["alpha0"] > 0):
        fail("alpha0", "a finite number > 0")
    if not (_is_real(out["meta_lr"]) and out["meta_lr"] >= 0):
        fail("meta_lr", "a finite number >= 0")
    if not (_is_real(out["gamma"]) and 0 <= out["gamma"] <= 1):
        fail("gamma", "in [0, 1]")
    if not (_is_real(out["weight_decay"]) and out["weight_decay"] >= 0):
        fail("weight_decay", "a finite number >= 0")
    if out["foreach"] is not None and not isinstance(out["foreach"], bool):
        fail("foreach", "None, True or False")
    if out["foreach"] and out["variant"] == "full":
        fail("foreach", "None or False with variant='full' (its trace is per tensor)")
    blocks = out["blocks"]
    if isinstance(blocks, str):
        if blocks not in BLOCK_MODES:
            fail("blocks", f"one of {BLOCK_MODES} or a list of block sizes")
    else:
        try:
            sizes = [int(b) for b in blocks]
        except (TypeError, ValueError):
            fail("blocks", f"one of {BLOCK_MODES} or a list of block sizes")
        if not sizes or any(isinstance(b, bool) or int(b) != b or b < 1 for b in blocks):
            fail("blocks", "a non-empty list of positive integers (tensors per block)")
        out["blocks"] = sizes

    for keys, owner, table in ((_BASE_KEYS, "base", _BASE_OPTIONS), (_META_KEYS, "meta", _META_OPTIONS)):
        used = table[out[owner]]
        for key in keys:
            if key not in used:
                if out.get(key) is not None:
                    users = [name for name, opts in table.items() if key in opts]
                    fail(key, f"None: only {owner} in {users} uses it, not {owner}={out[owner]!r}")
                out[key] = None
            elif out.get(key) is None:
                out[key] = used[key]
    for key in ("betas", "meta_betas"):
        if out[key] is not None:
            out[key] = _pair(key, out[key])
    for key in ("momentum", "rho", "meta_rho"):
        if out[key] is not None and not (_is_real(out[key]) and 0 <= out[key] < 1):
            fail(key, "in [0, 1)")
    for key in ("eps", "meta_eps"):
        if out[key] is not None and not (_is_real(out[key]) and out[key] > 0):
            fail(key, "a finite number > 0")
    return out


def _host_floats(values: Sequence[Tensor]) -> list[float]:
    """0-d tensors, possibly on several devices, as python floats; one transfer per accelerator."""
    out: list[float] = [0.0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        by_device.setdefault(v.device, []).append(i)
    if len(by_device) == 1 and values[0].device.type == "cpu":
        return [v.item() for v in values]
    for device, idx in by_device.items():
        if device.type == "cpu":
            # No transfer to batch: reading each is cheaper than stacking them.
            for i in idx:
                out[i] = values[i].item()
        else:
            for i, x in zip(idx, torch.stack([values[i] for i in idx]).tolist()):
                out[i] = x
    return out


def _flat_dot(x: Tensor, y: Tensor) -> Tensor:
    return torch.dot(x.reshape(-1), y.reshape(-1))


class MetaOptimize(torch.optim.Optimizer):
    r"""MetaOptimize (Sharifnassab, Salehkaleybar and Sutton, ICML 2025): learnt step sizes.

    For each block ``b`` of parameters, ``α_b = exp(β_b)``. One step, with ``g_t = ∇f_t(θ_t)``
    already in ``p.grad``:

    .. code-block:: text

        z_b   = Σ_{i ∈ b} h_t[i] · g_t[i]                 # meta-gradient, trace before the step
        θ_{t+1} = (1 − α_b λ)θ_t − α_b y_t                  # base step (y_t: its usual direction)
        h_{t+1} = γ(1 − α_b λ)h_t − (θ_t − θ_{t+1})          # Hessian-free trace
        β_b   ← meta-optimizer(β_b, z_b)                    # fixed | rmsprop | adam | lion

    ``h`` tracks ``∂θ/∂β`` forward in time. The objective is the discounted future loss
    ``Σ_τ γ^{τ−t} f_τ(θ_τ)``; with γ in the recursion, ``z`` at time t is the sum over past
    steps s of ``γ^{t−1−s} ∂f_t(θ_t)/∂β_s``, which summed over t is the sensitivity of each
    discounted future to its own step size. Differentiating the base step exactly gives
    ``h_{t+1} = γ(∂θ_{t+1}/∂θ_t)h_t − Δθ_t`` (plus the derivative of the base optimizer's own
    state); the Hessian-free trace keeps only the weight-decay part ``(1 − αλ)I`` of
    ``∂θ_{t+1}/∂θ_t``, which is the paper's low-complexity approximation and what the authors'
    code computes (``cifar10/Optimizers/HF.py`` in sabersalehk/MetaOptimize). The recursions here
    are derived that way; the step at time t uses ``α_t = exp(β_t)`` and the meta step then sets
    ``β_{t+1}`` for the next step, the order of the authors' PyTorch code (``HF.py`` and the
    AdamW+Lion file). Their JAX file updates β first and steps θ and h with the new α: a one-step
    lag of β, i.e. a factor of at most ``e^{meta_lr}`` on any step's α.

    Base optimizers (``base``), each with decoupled weight decay ``λ`` (``weight_decay``):

    * ``sgd``: ``y = g``;
    * ``sgdm``: ``y = b``, ``b ← μb + g`` (torch.optim.SGD's buffer, ``momentum``);
    * ``rmsprop``: ``y = g/(√v + ε)``, ``v ← ρv + (1 − ρ)g²`` (torch.optim.RMSprop, ``rho``, ``eps``);
    * ``adam``: torch.optim.AdamW (``betas``, ``eps``); torch.optim.Adam when λ = 0;
    * ``lion``: ``y = sign(β₁m + (1 − β₁)g)``, ``m ← β₂m + (1 − β₂)g`` (``betas``).

    With ``meta="fixed"`` the trajectory is torch.optim's with ``lr=alpha0``, bit for bit (SGD
    and λ ≠ 0 excepted: torch.optim.SGD adds λθ to the gradient, which is the same step rounded
    differently; SGDm and RMSProp weight decay is decoupled here, coupled in torch.optim).

    Args:
      params: parameters or parameter groups.
      base: base optimizer, one of ``sgd``, ``sgdm``, ``rmsprop``, ``adam``, ``lion``.
      meta: meta-optimizer for β, one of ``fixed`` (a control: the base optimizer alone, the
        meta-gradient still computed and reported), ``rmsprop``, ``adam``, ``lion``.
      alpha0: initial step size of every block (may differ between groups when no block spans
        two groups).
      meta_lr: the meta-optimizer's step size η on β (Lion: β moves by exactly η per step).
      gamma: discount γ of the future losses, in ``[0, 1]``.
      blocks: ``"scalar"`` (one α), ``"layerwise"`` (one per tensor), ``"groupwise"`` (one per
        param group), or a list of block sizes in tensors, in parameter order across groups.
      variant: ``"hessian_free"`` (the authors' low-complexity trace) or ``"full"`` (bases in
        :data:`FULL_BASES`: the trace with Hessian-vector products; returns a
        :class:`MetaOptimizeFull`).
      weight_decay: λ, decoupled, scaled by α.
      trace_term: what each step adds to the trace: ``"step"`` (``−Δθ_t``, the paper's recursion
        above and ``cifar10/Optimizers/HF.py``) or, for the Adam base only, ``"gradient"``:
        ``h_{t+1} = γ(1 − αλ)h_t − α·g_t/(√v̂_t + ε)``, the authors' packaged AdamW+Lion
        optimizer (``meta_optimize/MetaOptimize_AdamW_Lion_hg.py``), which also leaves ``αλθ``
        out of the trace.
      momentum: SGDm's μ (default 0.9).  rho: RMSProp's ρ (default 0.99).
      betas: Adam's (β₁, β₂) (default (0.9, 0.999)); Lion's (interpolation, momentum) (default
        (0.9, 0.99)).  eps: Adam's and RMSProp's ε (default 1e-8).
      meta_betas: the meta-optimizer's: Adam (0.9, 0.999), Lion (0.9, 0.99).
      meta_rho: meta-RMSProp's ρ (default 0.999).  meta_eps: meta-Adam/RMSProp's ε (default 1e-12;
        meta-gradients are small when α is).
      Options a chosen optimizer does not use must be left ``None``.
      foreach: the multi-tensor path (``torch._foreach_*``, one kernel per operation per block
        rather than per tensor; for the SGD and SGDm bases the traces and momentum buffers are
        then views into one flat tensor per block, so that their updates and the meta-gradient
        are one kernel each). ``None`` takes it for SGD and SGDm on every device (the flat path
        does torch.optim's arithmetic element for element, so ``meta="fixed"`` still matches
        torch.optim's default) and for the other bases where torch.optim does (all parameters
        on CUDA). ``False``: the per-tensor reference functions. Not with ``variant="full"``.

    Per-group hyperparameters: ``alpha0``, ``weight_decay`` and the base optimizer's options; the
    rest are optimizer-wide and a group that differs raises ``ValueError``. There is no ``lr``:
    the step size is learnt, so ``metaopt.schedules`` (which scale ``lr``) do not apply.

    :meth:`diagnostics` reports α and the meta-gradient of each block, :meth:`alphas` the step
    sizes, :meth:`trace` a parameter's trace. The state of each block (``alpha``, ``beta``, the
    meta-optimizer's ``meta_state``, all python floats) lives in the state of the block's first
    tensor, and each tensor's trace is ``trace_scale * trace`` (a float times a tensor), so that
    ``state_dict()`` carries everything and round-trips exactly.

    Warning: where the code departs from the paper and the authors' code:

    * the base optimizers are torch.optim's (Adam's momentum is ``lerp``'d and bias-corrected,
      RMSProp has no bias correction, SGDm's buffer is ``μb + g`` and steps with g_t included).
      The authors' code differs and so rescales α: ``HF.py``'s Adam sums its momentum
      (``m ← β₁m + g``, no first-moment bias correction, ε = 1e-10 inside the root: about
      ``1/(1 − β₁)`` = 10× this Adam's step at the same α), its SGDm steps with the buffer from
      before g_t is added, and its RMSProp is bias-corrected. So α values of the paper's runs are
      not alpha0 values here;
    * by default the trace uses the base step itself (``θ_t − θ_{t+1}``, weight decay
      included), as the paper and the authors' ``HF.py``; their AdamW+Lion file puts
      ``α·g/(√v̂ + ε)`` (gradient, not momentum) in the trace and leaves ``αλθ`` out, which is
      ``trace_term="gradient"`` (the setting of ``conf/optimizer/metaoptimize.yaml``). The two
      are not equivalent: on LODO's noisy quadratic the step trace settles α near 0.55, the
      gradient trace near 1.1 (best constant Adam lr: 3);
    * the meta-optimizers are the textbook ones on the scalar z (the authors' meta-Adam sums
      rather than averages its momentum; the AdamW+Lion file's meta-Lion updates its momentum
      before interpolating, ``c = 0.9(0.99m + 0.01z) + 0.1z``, where textbook Lion and ``HF.py``
      interpolate with the old momentum); there is no meta weight decay on β;
    * meta-gradients that are NaN or infinite leave β unchanged (counted in diagnostics);
    * with several blocks the trace keeps, per coordinate, only the derivative with respect to
      its own block's β (exact for one block; the cross-block terms need a trace per block).

    Starting above the stable step size: the first base step is taken at α₀ before any
    meta-gradient exists (h₀ = 0), and Lion moves log α by exactly ``meta_lr`` per step (the
    normalised meta-optimizers by about ``meta_lr`` while the meta-gradient keeps its sign), so a
    start far above the largest lr the model survives damages it before α comes down. On
    metaopt's MNIST-1D MLP (40k examples, Adam base, meta_lr 3e-3, 3 seeds; best constant lr
    1e-2, and 0.1 constant already ruins it) the final validation loss is 1.06x the best constant
    lr's from 3x above, 1.32x from 10x above and 4.8x (a dead network) from 100x above; from 100x
    below it is 0.95x. Start low, as the paper's experiments do (α₀ 1e-6 in the authors' code).

    Cost: one trace tensor per parameter beside the base optimizer's state (for SGD/SGDm with
    the flat path, traces and momentum buffers are stored flat: no more memory, but
    ``optimizer_state_bytes`` must count their shared storage once in full); per step beyond
    the base step, for SGD and SGDm a fixed number of kernels per block (one concatenation of
    the gradients, one dot product, one scaled add), for the other bases one dot product and
    one scaled add per tensor (per bucket with foreach), one more with weight decay (the
    trace's decay is a python float, see ``trace_scale``); and one device-to-host transfer
    per step (the meta-gradients, which the python-float β needs), which stalls the CPU until
    the accelerator has finished the step. Measured (metaopt.bench's MNIST-1D MLP, CPU, one
    thread, a shared machine, medians of per-round ratios over interleaved rounds): SGDm base
    1.05-1.12x torch.optim.SGD(momentum)'s full training step (the step itself +29 µs, 159 vs
    130 µs), Adam base 1.03-1.06x torch.optim.Adam's; before the flat path the SGDm base was
    1.16-1.24x. On an H100, ResNet-20, before the flat path: 1.09x and 1.20x (multi-tensor).
    """

    requires_closure = False
    # The multi-tensor path has no Hessian-vector term.
    _foreach_capable = True

    def __new__(cls, params: Any = None, base: str = "adam", meta: str = "lion",
                alpha0: float = 1e-3, meta_lr: float = 1e-3, gamma: float = 0.9999,
                blocks: Any = "scalar", variant: str = "hessian_free", *args: Any, **kwargs: Any):
        # The full trace needs a closure, and the training loop asks the class whether its
        # optimizer does; so variant="full" builds the subclass that says so.
        del params, base, meta, alpha0, meta_lr, gamma, blocks, args, kwargs
        if cls is MetaOptimize and variant == "full":
            cls = MetaOptimizeFull
        return super().__new__(cls)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base: str = "adam",
        meta: str = "lion",
        alpha0: float = 1e-3,
        meta_lr: float = 1e-3,
        gamma: float = 0.9999,
        blocks: str | Sequence[int] = "scalar",
        variant: str = "hessian_free",
        weight_decay: float = 0.0,
        *,
        trace_term: str = "step",
        momentum: float | None = None,
        rho: float | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        meta_betas: tuple[float, float] | None = None,
        meta_rho: float | None = None,
        meta_eps: float | None = None,
        foreach: bool | None = None,
    ):
        defaults = _resolve(dict(
            base=base, meta=meta, alpha0=alpha0, meta_lr=meta_lr, gamma=gamma, blocks=blocks,
            variant=variant, trace_term=trace_term, weight_decay=weight_decay, momentum=momentum,
            rho=rho, betas=betas,
            eps=eps, meta_betas=meta_betas, meta_rho=meta_rho, meta_eps=meta_eps, foreach=foreach,
        ))
        if variant == "full" and not isinstance(self, MetaOptimizeFull):
            raise ValueError("Invalid variant: 'full' needs MetaOptimizeFull (MetaOptimize builds "
                             "it for variant='full'; subclasses must derive from it)")
        self._ready = False
        super().__init__(params, defaults)
        self._ready = True
        self._check_layout()

    # ---- parameter groups and blocks ------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        with rejected_group_removed(self):
            super().add_param_group(param_group)
            group = self.param_groups[-1]
            if any(p.dtype == torch.float16 for p in group["params"]):
                # The trace is stored as scale × tensor with the scale folded in only below 1e-6,
                # so the tensor reaches 1e6·|h|: past float16's 65504 once |h| > 0.07, after which
                # z is inf and β stops learning.
                raise ValueError("Invalid parameters: float16 is not supported (the trace overflows "
                                 "its range); keep float32 parameters under torch.autocast, or use bfloat16")
            group.update(_resolve(group))
            self._check_groups_agree()
            if getattr(self, "_ready", False):
                self._check_layout()

    def _check_groups_agree(self) -> Hyper:
        if len(self.param_groups) > 1:
            shared_hyperparameters(self.param_groups, _GLOBAL_KEYS,
                                   f"only {', '.join(_GROUP_KEYS)} may differ between groups")
        # Group 0 holds the optimizer-wide values (read-only here).
        return self.param_groups[0]

    def _layout(self) -> list[list[tuple[Tensor, Hyper]]]:
        """The blocks, each a list of ``(parameter, its group)`` in parameter order."""
        mode = self.param_groups[0]["blocks"]
        members = [(p, g) for g in self.param_groups for p in g["params"]]
        if mode == "scalar":
            return [members]
        if mode == "layerwise":
            return [[m] for m in members]
        if mode == "groupwise":
            return [[(p, g) for p in g["params"]] for g in self.param_groups if g["params"]]
        if sum(mode) != len(members):
            raise ValueError(f"Invalid blocks: {mode!r} (the sizes must add up to the number of "
                             f"parameter tensors, {len(members)})")
        out, start = [], 0
        for size in mode:
            out.append(members[start:start + size])
            start += size
        return out

    def _check_layout(self) -> None:
        for i, block in enumerate(self._layout()):
            alphas = {g["alpha0"] for _, g in block}
            if len(alphas) > 1:
                raise ValueError(f"Invalid alpha0: block {i} spans parameter groups with different "
                                 f"alpha0 {sorted(alphas)}; one block has one step size")

    def _global_state(self) -> State:
        # Optimizer-wide counters live in the first parameter's state, as in torch.optim.LBFGS,
        # so that state_dict()/load_state_dict() carry them.
        state = self.state[self.param_groups[0]["params"][0]]
        state.setdefault("num_steps", 0)
        state.setdefault("num_nonfinite_meta", 0)
        return state

    def _block_state(self, block: list[tuple[Tensor, Hyper]]) -> State:
        leader, group = block[0]
        state = self.state[leader]
        if "beta" not in state:
            # α is kept beside β = log α so that a β the meta step never moved gives back
            # alpha0 exactly (exp(log(x)) can be off by an ulp).
            state["alpha"] = float(group["alpha0"])
            state["beta"] = math.log(group["alpha0"])
            state["last_meta_grad"] = 0.0
            state["meta_state"] = {}
        return state

    # ---- the step -------------------------------------------------------------------------

    def _before_closure(self, closure: Closure | None) -> Any:
        """Called before the closure's evaluation; the full variant checks and snapshots here."""
        del closure
        return None

    def _hessian_vector_products(self, active: list[Tensor], closure: Closure | None,
                                 before: Any) -> list[Tensor | None] | None:
        """``H_t h_t`` for each active parameter, or None: the Hessian-free trace has none."""
        del active, closure, before
        return None

    def _plan(self, blocks_mode: Any) -> list[tuple[list[tuple[Tensor, Hyper]], list[tuple[Hyper, list[Tensor]]]]]:
        """The blocks, each with its buckets ``(group, parameters)`` of one group, device and dtype.

        Cached: rebuilding it is most of the python cost of a step on a small model. The key is
        the groups' identities and sizes and the block mode, which is all the layout depends on.
        """
        key = (str(blocks_mode), *((id(g), len(g["params"])) for g in self.param_groups))
        cached = getattr(self, "_plan_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = []
        for block in self._layout():
            buckets: dict[tuple, tuple[Hyper, list[Tensor]]] = {}
            for p, group in block:
                buckets.setdefault((id(group), p.device, p.dtype), (group, []))[1].append(p)
            plan.append((block, list(buckets.values())))
        self._plan_cache = (key, plan)
        return plan

    def _start_traces(self, params: list[Tensor]) -> list[State]:
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if "trace" not in st:
                if p.grad.is_sparse:
                    raise RuntimeError("MetaOptimize does not support sparse gradients")
                if p.is_complex():
                    raise RuntimeError("MetaOptimize does not support complex parameters")
                st["trace"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["trace_scale"] = 1.0
        return states

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        """One base step with the current α, then one meta step on β; returns the closure's loss."""
        before = self._before_closure(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hp = self._check_groups_agree()
        gamma = float(hp["gamma"])
        plan = self._plan(hp["blocks"])

        hv_of: dict[int, Tensor | None] = {}
        if not self._foreach_capable:
            active = [p for _, buckets in plan for _, ps in buckets for p in ps if p.grad is not None]
            self._start_traces(active)
            hvs = self._hessian_vector_products(active, closure, before)
            if hvs is not None:
                hv_of = dict(zip(map(id, active), hvs))

        base = BASE_UPDATES[hp["base"]]
        foreach = hp["foreach"]
        flat = FLAT_UPDATES.get(hp["base"]) if self._foreach_capable and foreach is not False else None
        if foreach is None:
            foreach = self._foreach_capable and all(
                p.device.type in _FOREACH_DEVICES for _, buckets in plan for _, ps in buckets for p in ps)
        cache = self.__dict__.setdefault("_flat_cache", {})
        dots: list[Tensor] = []
        owner: list[tuple[int, float]] = []  # (block, trace scale) of each dot
        stepped: list[tuple[int, State]] = []
        for b, (block, buckets) in enumerate(plan):
            bstate = None
            for group, params in buckets:
                if not all(p.grad is not None for p in params):
                    params = [p for p in params if p.grad is not None]
                    if not params:
                        continue
                if bstate is None:
                    bstate = self._block_state(block)
                    alpha = bstate["alpha"]
                    stepped.append((b, bstate))
                states = self._start_traces(params)
                grads = [p.grad for p in params]
                if flat is not None:
                    owner.append((b, share_trace_scale(states)))
                    dots.append(flat(params, grads, states, alpha, group, gamma, cache))
                elif foreach:
                    owner.append((b, share_trace_scale(states)))
                    dots.append(trace_dot([st["trace"] for st in states], grads))
                    FOREACH_UPDATES[hp["base"]](params, grads, states, alpha, group, gamma)
                else:
                    for p, st in zip(params, states):
                        dots.append(_flat_dot(st["trace"], p.grad))
                        owner.append((b, st["trace_scale"]))
                        base(p, p.grad, st, alpha, group, gamma, hv_of.get(id(p)))

        z = [0.0] * len(plan)
        for (b, scale), value in zip(owner, _host_floats(dots) if dots else []):
            z[b] += scale * value
        counters = self._global_state()
        for b, bstate in stepped:
            bstate["last_meta_grad"] = z[b]
            if not math.isfinite(z[b]):
                counters["num_nonfinite_meta"] += 1
                continue
            beta, bstate["meta_state"] = meta_update(
                hp["meta"], bstate["beta"], z[b], bstate["meta_state"], lr=float(hp["meta_lr"]),
                betas=hp["meta_betas"], rho=hp["meta_rho"], eps=hp["meta_eps"])
            if beta != bstate["beta"]:
                bstate["beta"], bstate["alpha"] = beta, math.exp(beta)
        counters["num_steps"] += 1
        return loss

    # ---- reporting ------------------------------------------------------------------------

    def trace(self, p: Tensor) -> Tensor:
        """The trace ``h ≈ ∂θ/∂β`` of parameter ``p`` (a new tensor; zeros before its first step)."""
        st = self.state.get(p, {})
        if "trace" not in st:
            return torch.zeros_like(p)
        return st["trace"] * st["trace_scale"]

    def alphas(self) -> list[float]:
        """The current step size of each block (``alpha0`` for blocks not yet stepped)."""
        out = []
        for block in self._layout():
            state = self.state.get(block[0][0], {})
            out.append(state["alpha"] if "alpha" in state else float(block[0][1]["alpha0"]))
        return out

    def diagnostics(self) -> dict[str, Any]:
        """α and the meta-gradient per block, as python floats, and counters.

        Keys: ``alpha`` (one block: its α; several: the geometric mean), ``beta`` (``log alpha``),
        ``meta_grad`` (one block: the last ``hᵀ∇f``; several: their sum), ``trace_norm`` (‖h‖
        over all parameters), ``num_steps``, ``num_nonfinite_meta``; with several blocks also
        ``alpha/<i>``, ``meta_grad/<i>``, ``alpha_min`` and ``alpha_max``.
        """
        blocks = self._layout()
        alphas = self.alphas()
        grads = [float(self.state.get(b[0][0], {}).get("last_meta_grad", 0.0)) for b in blocks]
        # The stored β, not log α: α underflows to 0.0 once β < −745, and log(0) would raise.
        betas = [float(self.state.get(b[0][0], {}).get("beta", math.log(float(b[0][1]["alpha0"]))))
                 for b in blocks]
        mean_beta = sum(betas) / len(betas)
        states = [self.state[p] for b in blocks for p, _ in b if "trace" in self.state.get(p, {})]
        squares = _host_floats([torch.sum(st["trace"] * st["trace"]) for st in states])
        norm = math.sqrt(math.fsum(st["trace_scale"] ** 2 * q for st, q in zip(states, squares)))
        counters = self._global_state()
        out: dict[str, Any] = dict(alpha=math.exp(mean_beta), beta=mean_beta, meta_grad=math.fsum(grads),
                                   trace_norm=norm, num_steps=int(counters["num_steps"]),
                                   num_nonfinite_meta=int(counters["num_nonfinite_meta"]))
        if len(blocks) > 1:
            out.update(alpha_min=min(alphas), alpha_max=max(alphas))
            for i, (a, z) in enumerate(zip(alphas, grads)):
                out[f"alpha/{i}"] = a
                out[f"meta_grad/{i}"] = z
        return out


class MetaOptimizeFull(MetaOptimize):
    r"""MetaOptimize with the fuller trace (``variant="full"``): Hessian-vector products kept.

    Differentiating the SGD step ``θ_{t+1} = (1 − αλ)θ_t − αg_t(θ_t)`` without dropping the
    Hessian ``H_t`` of ``f_t``:

    .. code-block:: text

        SGD:   h_{t+1} = γ[(1 − αλ)h_t − α H_t h_t] − Δθ_t
        SGDm:  k_{t+1} = γ(μ k_t + H_t h_t)                 # ∂b/∂β, b the momentum buffer
               h_{t+1} = γ(1 − αλ)h_t − α k_{t+1} − Δθ_t

    and for the adaptive bases the derivatives of both moments through the preconditioner
    (:func:`adam_update`, :func:`rmsprop_update`; the paper derives the SGD forms and states the
    rest as the same construction: these are ours). With one block and γ = 1 each is the exact
    forward-mode derivative of θ_t with respect to a constant β (:func:`meta_update` then
    descends the exact hypergradient of ``f_t``); tested against central differences of whole
    trajectories. Lion is not offered: its sign step has derivative 0 almost everywhere, so its
    Hessian-free trace already is the full one.

    Where it helps and where it does not (measured, issue 4): on LODO's noisy quadratic the
    Hessian-free Adam trace settles α about 2.7x below Adam's best constant lr (3), at 1.25-1.29x
    its loss, while the full Adam trace from 100x below and above settles at α 2.6-3.9 with
    1.01-1.03x the best constant lr's loss (20k steps, 3 seeds). On a ReLU MLP (MNIST-1D) the
    exact trace explodes, ‖h‖ ≈ 1e6 by step 550 and overflows by step 2500, because Adam's
    Jacobian ``I − α·P·H`` has eigenvalues far outside the unit circle where ``v`` is tiny and
    ``P = 1/(√v̂ + ε)`` huge (holding ``v`` fixed does not stop it); the meta-gradient's sign
    is then noise and α drifts down (1e-4 → 5e-5 where the best constant lr is 1e-2). That is the
    paper's reason for the Hessian-free trace on deep networks: use ``full`` on small, smooth
    problems.

    ``H_t h_t`` comes from one of two sources:

    * exact, by double backward, when the gradients carry a graph (the closure, or the user's
      loop before ``step()``, called ``loss.backward(create_graph=True)``);
    * otherwise by a forward difference of gradients along the trace,
      ``(∇f_t(θ_t + εh_t) − ∇f_t(θ_t))/ε`` with ``ε‖h_t‖ = √(machine ε)·(1 + ‖θ_t‖)``, which needs
      the closure: ``step`` calls it a second time at ``θ_t + εh_t`` on the same random state
      (dropout masks agree) and then restores θ and ``p.grad`` exactly. An ordinary closure
      (``zero_grad``, forward, ``backward``) therefore costs two forwards and two backwards per
      step, and its side effects (BatchNorm statistics) happen twice.

    Warning: the paper computes ``H_t h_t`` exactly; the finite difference is exact only for
    quadratic losses and otherwise carries an O(ε) error. With the closure, no HVP is evaluated
    while ``h = 0`` (the first step); the ``create_graph`` path differentiates along the zero
    trace then too.
    """

    requires_closure = True
    _foreach_capable = False

    def _before_closure(self, closure: Closure | None) -> Any:
        if closure is None:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            if not params or not all(p.grad.requires_grad for p in params):
                raise RuntimeError(
                    "MetaOptimize(variant='full').step needs a closure (zero_grad, forward, "
                    "backward) for its Hessian-vector products, unless the gradients were made "
                    "with loss.backward(create_graph=True)")
            return None
        return _RNGSnapshot([p for g in self.param_groups for p in g["params"]])

    def _hessian_vector_products(self, active: list[Tensor], closure: Closure | None,
                                 before: Any) -> list[Tensor | None] | None:
        if not active:
            return None
        # Along u, the stored tensor: H h = s·H u.
        traces = [self.state[p]["trace"] for p in active]
        scales = [self.state[p]["trace_scale"] for p in active]
        if all(p.grad.requires_grad for p in active):
            with torch.enable_grad():
                hvs = torch.autograd.grad([p.grad for p in active], active, grad_outputs=traces,
                                          allow_unused=True)
            for p in active:
                p.grad = p.grad.detach()
            return [None if v is None else v.detach().mul_(s) for v, s in zip(hvs, scales)]
        if closure is None:
            raise RuntimeError("MetaOptimize(variant='full'): some gradients carry a graph and "
                               "some do not; pass a closure or use create_graph=True for all")
        squares = _host_floats([torch.sum(t * t) for t in traces] + [torch.sum(p * p) for p in active])
        h_norm = math.sqrt(math.fsum(squares[:len(active)]))
        if h_norm == 0.0 or not math.isfinite(h_norm):
            return None
        theta_norm = math.sqrt(math.fsum(squares[len(active):]))
        eps = math.sqrt(torch.finfo(active[0].dtype).eps) * (1 + theta_norm) / h_norm
        hvs = self._difference_quotients(active, traces, eps, closure, before)
        return [None if v is None else v.mul_(s) for v, s in zip(hvs, scales)]

    def _difference_quotients(self, active: list[Tensor], traces: list[Tensor], eps: float,
                              closure: Closure, rng_start: _RNGSnapshot) -> list[Tensor | None]:
        """``(∇f(θ + εh) − ∇f(θ))/ε`` per active tensor; θ, ``p.grad`` and the RNG as they were."""
        params = [p for g in self.param_groups for p in g["params"]]
        grads = [p.grad for p in params]
        theta = [p.detach().clone(memory_format=torch.preserve_format) for p in active]
        rng_after = _RNGSnapshot(params)
        try:
            for p, h in zip(active, traces):
                p.add_(h, alpha=eps)
            for p in params:
                p.grad = None
            rng_start.restore()
            with torch.enable_grad():
                closure()
            shifted = [p.grad for p in active]
        finally:
            for p, p0 in zip(active, theta):
                p.copy_(p0)
            for p, g in zip(params, grads):
                p.grad = g
            rng_after.restore()
        return [None if gs is None else gs.sub(p.grad).div_(eps) for gs, p in zip(shifted, active)]
