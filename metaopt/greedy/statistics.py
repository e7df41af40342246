"""Gradient autocorrelations at lags 0..K, estimated online with EMAs, and AR(1) test streams.

The greedy design problems of :mod:`metaopt.greedy.problems` take the statistics of the gradient
stream as input: the lag-``k`` autocorrelation ``R_k = E[g_{t-k} g_tᵀ]`` of Lee & Lee (arXiv
2512.06370), in practice its trace over a block of coordinates, ``r_k = E[⟨g_t, g_{t−k}⟩]``, or its
diagonal, ``E[g_{t,i} g_{t−k,i}]`` per coordinate. This module estimates them from a stream:

* :func:`lag_products` and :func:`ema_debiased` are the plain functions: a ring buffer of the last
  K + 1 vectors, their products with the newest one, the bias-corrected EMA;
* :class:`LagAutocorrelation` wraps them for one stream of vectors (analysis, and the reference
  the tests hold the online optimizers to: :mod:`metaopt.optim.greedy` fuses the same
  bookkeeping into one ``addmv`` per step over all parameters);
* :func:`ar1_autocorrelation` and :func:`ar1_stream` give a stream with known statistics, an AR(1)
  signal plus white noise, on which the solvers must recover the analytic optimum.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LagAutocorrelation",
    "ar1_autocorrelation",
    "ar1_stream",
    "ema_debiased",
    "lag_order",
    "lag_products",
]


def lag_order(step: int, slots: int, device: str | torch.device = "cpu") -> Tensor:
    """Slot index holding lag ``k`` (``k = 0..slots−1``) once ``step`` (0-based) has been written.

    The ring buffer of :func:`lag_products` writes the gradient of step ``s`` into slot
    ``s mod slots``, so lag ``k`` of step ``t`` sits in slot ``(t − k) mod slots``.
    """
    return _lag_order(step % slots, slots, str(torch.device(device)))


@functools.lru_cache(maxsize=1024)
def _lag_order(position: int, slots: int, device: str) -> Tensor:
    # Cached: a stream indexes its products every step, and building the index costs more than
    # using it.
    return torch.remainder(position - torch.arange(slots), slots).to(device)


def lag_products(ring: Tensor, step: int, current: Tensor, weighted: Tensor | None = None) -> Tensor:
    """Write ``current`` into the ring buffer and return its products with lags ``0..K``.

    Args:
      ring: ``(K + 1, n)`` buffer of the last ``K + 1`` vectors, written in place.
      step: 0-based index of ``current`` in the stream.
      current: the newest vector ``g_t`` (any shape with ``n`` elements).
      weighted: if given, ``w ⊙ g_t`` for a diagonal weight ``w`` (a preconditioner): the products
        are then ``⟨w ⊙ g_t, g_{t−k}⟩`` (the autocorrelation seen through ``w``).

    Returns:
      ``(K + 1,)`` products in lag order. Lags older than the stream (``k > step``) read zeros
      from a zero-initialised ring; :func:`ema_debiased` never counts them.
    """
    slots = ring.shape[0]
    ring[step % slots].copy_(current.reshape(-1))
    probe = current if weighted is None else weighted
    by_slot = torch.mv(ring, probe.reshape(-1))
    return by_slot[lag_order(step, slots, ring.device)]


def ema_debiased(ema: Tensor, samples: int, decay: float) -> Tensor:
    """Bias-corrected EMA of lags ``0..K`` after ``samples`` vectors (lag ``k`` has ``samples − k``).

    The EMA starts from zero, so after ``n`` updates it carries weight ``1 − decay**n`` (Adam's
    correction, Kingma & Ba 2015); lags with no update yet are NaN.
    """
    lags = torch.arange(ema.shape[-1], dtype=torch.float64)
    n = (samples - lags).clamp(min=0)
    weight = 1.0 - torch.pow(torch.tensor(decay, dtype=torch.float64), n)
    out = ema.to(torch.float64) / weight.to(ema.device)
    return torch.where(n.to(ema.device) > 0, out, torch.full_like(out, math.nan))


class LagAutocorrelation:
    """Streaming estimate of ``r_k = E[⟨g_t, g_{t−k}⟩]``, ``k = 0..K``, with an EMA of ``horizon`` steps.

    ``per_coordinate=True`` keeps ``E[g_{t,i} g_{t−k,i}]`` for every coordinate instead (shape
    ``(K + 1, n)``), the diagonal of ``R_k``. Memory: ``K + 1`` copies of the vector.

    Args:
      dim: length of the vectors.
      lags: ``K`` (≥ 1).
      horizon: EMA time constant in steps (decay ``1 − 1/horizon``; ≥ 1).
    """

    def __init__(self, dim: int, lags: int, horizon: float, per_coordinate: bool = False,
                 dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"):
        if not isinstance(lags, int) or isinstance(lags, bool) or lags < 1:
            raise ValueError(f"Invalid lags: {lags!r} (must be an int >= 1)")
        if not isinstance(horizon, (int, float)) or isinstance(horizon, bool) or not horizon >= 1:
            raise ValueError(f"Invalid horizon: {horizon!r} (must be >= 1)")
        self.lags, self.horizon, self.per_coordinate = lags, float(horizon), per_coordinate
        self.decay = 1.0 - 1.0 / self.horizon
        self.ring = torch.zeros(lags + 1, dim, dtype=dtype, device=device)
        shape = (lags + 1, dim) if per_coordinate else (lags + 1,)
        self.ema = torch.zeros(shape, dtype=dtype, device=device)
        self.samples = 0

    @torch.no_grad()
    def update(self, g: Tensor) -> None:
        g = g.reshape(-1).to(self.ring)
        step, slots = self.samples, self.lags + 1
        if self.per_coordinate:
            self.ring[step % slots].copy_(g)
            products = self.ring[lag_order(step, slots, self.ring.device)] * g
        else:
            products = lag_products(self.ring, step, g)
        live = min(step + 1, slots)  # lags the stream already reaches
        self.ema[:live].lerp_(products[:live], 1.0 - self.decay)
        self.samples += 1

    def value(self) -> Tensor:
        """Debiased estimates, ``(K + 1,)`` or ``(K + 1, n)``, float64 (NaN for unseen lags)."""
        if self.per_coordinate:
            return ema_debiased(self.ema.T, self.samples, self.decay).T
        return ema_debiased(self.ema, self.samples, self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"ring": self.ring.clone(), "ema": self.ema.clone(), "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ring.copy_(state["ring"])
        self.ema.copy_(state["ema"])
        self.samples = int(state["samples"])


def ar1_autocorrelation(rho: float, signal_var: float, noise_var: float, lags: int) -> Tensor:
    """Exact ``r_k``, ``k = 0..lags``, of ``g_t = s_t + n_t`` per coordinate (float64).

    ``s_t = ρ s_{t−1} + √(1−ρ²)·σ_s ξ_t`` is a stationary AR(1) signal of variance ``signal_var`` and
    ``n_t`` white noise of variance ``noise_var``: ``r_0 = σ_s² + σ_n²``, ``r_k = σ_s² ρ^k`` (k ≥ 1).
    """
    k = torch.arange(lags + 1, dtype=torch.float64)
    r = signal_var * torch.pow(torch.tensor(rho, dtype=torch.float64), k)
    r[0] += noise_var
    return r


def ar1_stream(rho: float, signal_var: float, noise_var: float, steps: int, dim: int,
               generator: torch.Generator) -> Tensor:
    """``(steps, dim)`` samples of the process of :func:`ar1_autocorrelation`, started stationary."""
    s = math.sqrt(signal_var) * torch.randn(dim, generator=generator, dtype=torch.float64)
    innovation = math.sqrt(signal_var * (1.0 - rho * rho))
    out = torch.empty(steps, dim, dtype=torch.float64)
    for t in range(steps):
        if t:
            s = rho * s + innovation * torch.randn(dim, generator=generator, dtype=torch.float64)
        out[t] = s + math.sqrt(noise_var) * torch.randn(dim, generator=generator, dtype=torch.float64)
    return out
