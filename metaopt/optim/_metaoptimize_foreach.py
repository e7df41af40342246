"""MetaOptimize's base updates on lists of tensors (``torch._foreach_*``): the multi-tensor path.

Same math as the single-tensor functions in :mod:`metaopt.optim.metaoptimize` (Hessian-free trace
only), for a bucket of tensors that share one step size α, one parameter group, one device and
dtype, and one trace scale. The parameter arithmetic repeats torch.optim's multi-tensor code operation for
operation (``_multi_tensor_sgd``, ``_multi_tensor_rmsprop``, ``_multi_tensor_adam``), so that
``meta="fixed"`` with ``foreach=True`` follows torch.optim with ``foreach=True`` bit for bit. On
a GPU this is what keeps the step cheap: one kernel launch per operation per bucket instead of
one per tensor. For SGD and SGD with momentum (:data:`FLAT_UPDATES`) the traces and buffers are
also stored flat, which makes the meta work a constant number of kernels per bucket on any
device (see the section "Flat storage" below).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metaopt.optim.utils import flat_views

State = dict[str, Any]
Hyper = dict[str, Any]


# The trace is h = s·u as in the single-tensor path; a bucket shares one s (share_trace_scale).
_MIN_TRACE_SCALE = 1e-6


def share_trace_scale(states: list[State]) -> float:
    """Give the bucket's traces one scale s (folding the others into u); returns it."""
    scales = {st["trace_scale"] for st in states}
    if len(scales) > 1:
        # Tensors that missed steps (no gradient) decayed less; rare, so fold them all.
        for st in states:
            st["trace"].mul_(st["trace_scale"])
            st["trace_scale"] = 1.0
    return states[0]["trace_scale"]


def _decay(params: list[Tensor], states: list[State], alpha: float, wd: float, gamma: float,
           trace_wd: bool = True) -> float:
    """The weight-decay part of the step on θ and h; returns ``1/s`` for the terms that follow."""
    scale = states[0]["trace_scale"] * gamma * (1 - alpha * wd)
    traces = [st["trace"] for st in states]
    if scale < _MIN_TRACE_SCALE:
        torch._foreach_mul_(traces, scale)
        scale = 1.0
    for st in states:
        st["trace_scale"] = scale
    if wd != 0:
        if trace_wd:
            torch._foreach_add_(traces, params, alpha=-alpha * wd / scale)
        torch._foreach_mul_(params, 1 - alpha * wd)
    return 1.0 / scale


def zeros_state(p: Tensor, st: State, key: str) -> Tensor:
    """``st[key]``, created as zeros shaped like ``p`` on first use (lazy state, as torch.optim)."""
    if key not in st:
        st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return st[key]


def _state_tensors(states: list[State], key: str, like: list[Tensor]) -> list[Tensor]:
    return [zeros_state(p, st, key) for st, p in zip(states, like)]


def sgd_update(params, grads, states, alpha, hp, gamma) -> None:
    k = _decay(params, states, alpha, hp["weight_decay"], gamma)
    traces = [st["trace"] for st in states]
    torch._foreach_add_(params, grads, alpha=-alpha)
    torch._foreach_add_(traces, grads, alpha=-alpha * k)


def sgdm_update(params, grads, states, alpha, hp, gamma) -> None:
    k = _decay(params, states, alpha, hp["weight_decay"], gamma)
    traces = [st["trace"] for st in states]
    if all("momentum_buffer" in st for st in states):
        bufs = [st["momentum_buffer"] for st in states]
        torch._foreach_mul_(bufs, hp["momentum"])
        torch._foreach_add_(bufs, grads, alpha=1)
    else:
        bufs = []
        for st, g in zip(states, grads):
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = g.detach().clone()
            else:
                st["momentum_buffer"].mul_(hp["momentum"]).add_(g, alpha=1)
            bufs.append(st["momentum_buffer"])
    torch._foreach_add_(params, bufs, alpha=-alpha)
    torch._foreach_add_(traces, bufs, alpha=-alpha * k)


def rmsprop_update(params, grads, states, alpha, hp, gamma) -> None:
    k = _decay(params, states, alpha, hp["weight_decay"], gamma)
    traces = [st["trace"] for st in states]
    squares = _state_tensors(states, "square_avg", params)
    torch._foreach_mul_(squares, hp["rho"])
    torch._foreach_addcmul_(squares, grads, grads, value=1 - hp["rho"])
    avg = torch._foreach_sqrt(squares)
    torch._foreach_add_(avg, hp["eps"])
    torch._foreach_addcdiv_(params, grads, avg, value=-alpha)
    torch._foreach_addcdiv_(traces, grads, avg, value=-alpha * k)


def adam_update(params, grads, states, alpha, hp, gamma) -> None:
    k = _decay(params, states, alpha, hp["weight_decay"], gamma, hp["trace_term"] == "step")
    traces = [st["trace"] for st in states]
    for st in states:
        st.setdefault("step", 0)
    exp_avgs = _state_tensors(states, "exp_avg", params)
    exp_avg_sqs = _state_tensors(states, "exp_avg_sq", params)
    beta1, beta2 = hp["betas"]
    for st in states:
        st["step"] += 1
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_size = [(alpha / (1 - beta1 ** float(st["step"]))) * -1 for st in states]
    bias_correction2_sqrt = [(1 - beta2 ** float(st["step"])) ** 0.5 for st in states]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, hp["eps"])
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
    if hp["trace_term"] == "gradient":
        torch._foreach_addcdiv_(traces, grads, denom, -alpha * k)
    else:
        torch._foreach_addcdiv_(traces, exp_avgs, denom, [c * k for c in step_size])


def lion_update(params, grads, states, alpha, hp, gamma) -> None:
    k = _decay(params, states, alpha, hp["weight_decay"], gamma)
    traces = [st["trace"] for st in states]
    moments = _state_tensors(states, "exp_avg", params)
    beta1, beta2 = hp["betas"]
    direction = torch._foreach_lerp(moments, grads, 1 - beta1)
    torch._foreach_sign_(direction)
    torch._foreach_add_(params, direction, alpha=-alpha)
    torch._foreach_add_(traces, direction, alpha=-alpha * k)
    torch._foreach_lerp_(moments, grads, 1 - beta2)


# --------------------------------------------------------------------------------------------
# Flat storage (SGD and SGD with momentum). The bucket's traces and momentum buffers are views
# into one flat tensor each, so that the trace update, the momentum update and the meta-gradient
# are one kernel each for the whole bucket rather than one per tensor: with only two or three
# operations in the base step, per-tensor dispatch is most of the meta overhead on small models.
# The arithmetic per element is unchanged (same operations in the same order as torch.optim's
# single- and multi-tensor SGD), so meta="fixed" still matches torch.optim bit for bit.
# The state entries are the views themselves; the flat tensor is found again through a cache
# that is checked by identity each step, so that load_state_dict (new tensors), a parameter
# that gains or loses its gradient, or anything else that replaces a state entry repacks it.
# --------------------------------------------------------------------------------------------


def _adopt(cache: dict, flat: Tensor, params: list[Tensor], states: list[State], name: str) -> list[Tensor]:
    views = flat_views(flat, params)
    for st, view in zip(states, views):
        st[name] = view
    # One entry per bucket leader: a bucket whose members change replaces its entry, so the
    # cache cannot grow with the number of distinct sets of tensors that had gradients.
    cache[(name, id(params[0]))] = (flat, views)
    return views


def packed(cache: dict, params: list[Tensor], states: list[State], name: str) -> tuple[Tensor, list[Tensor]] | None:
    """``st[name]`` of the bucket as one flat tensor and its views (packing it on first use).

    None when some state lacks the entry.
    """
    entry = cache.get((name, id(params[0])))
    if (entry is not None and len(entry[1]) == len(states)
            and all(st.get(name) is v for st, v in zip(states, entry[1]))):
        return entry
    if any(name not in st for st in states):
        return None
    flat = torch.cat([st[name].reshape(-1) for st in states])
    return flat, _adopt(cache, flat, params, states, name)


def flat_sgd_update(params, grads, states, alpha, hp, gamma, cache) -> Tensor:
    """SGD on the bucket with flat traces; returns ``uᵀg``, the meta-gradient before the step."""
    g = torch.cat([x.reshape(-1) for x in grads])
    u, _ = packed(cache, params, states, "trace")
    dot = torch.dot(u, g)
    k = _decay(params, states, alpha, hp["weight_decay"], gamma)
    torch._foreach_add_(params, grads, alpha=-alpha)
    u.add_(g, alpha=-alpha * k)
    return dot


def flat_sgdm_update(params, grads, states, alpha, hp, gamma, cache) -> Tensor:
    """SGD with momentum on the bucket with flat traces and buffers; returns ``uᵀg``."""
    g = torch.cat([x.reshape(-1) for x in grads])
    u, _ = packed(cache, params, states, "trace")
    dot = torch.dot(u, g)
    k = _decay(params, states, alpha, hp["weight_decay"], gamma)
    entry = packed(cache, params, states, "momentum_buffer")
    if entry is not None:
        buf, bufs = entry
        buf.mul_(hp["momentum"]).add_(g)
    elif all("momentum_buffer" not in st for st in states):
        # torch.optim's first step: the buffer is a copy of the gradient, and g is already one.
        buf = g
        bufs = _adopt(cache, buf, params, states, "momentum_buffer")
    else:
        # Some tensors start their buffer now (a first gradient): as torch.optim, then pack.
        for st, x in zip(states, grads):
            if "momentum_buffer" in st:
                st["momentum_buffer"].mul_(hp["momentum"]).add_(x)
            else:
                st["momentum_buffer"] = x.detach().clone()
        buf, bufs = packed(cache, params, states, "momentum_buffer")
    torch._foreach_add_(params, bufs, alpha=-alpha)
    u.add_(buf, alpha=-alpha * k)
    return dot


FLAT_UPDATES: dict[str, Callable[..., Tensor]] = {
    "sgd": flat_sgd_update,
    "sgdm": flat_sgdm_update,
}


FOREACH_UPDATES: dict[str, Callable[..., None]] = {
    "sgd": sgd_update,
    "sgdm": sgdm_update,
    "rmsprop": rmsprop_update,
    "adam": adam_update,
    "lion": lion_update,
}


def trace_dot(traces: list[Tensor], grads: list[Tensor]) -> Tensor:
    """``Σ_i hᵢ·gᵢ`` over the bucket as a 0-d tensor: one multiply, one concatenation, one sum."""
    products = torch._foreach_mul(traces, grads)
    return torch.cat([t.reshape(-1) for t in products]).sum()
