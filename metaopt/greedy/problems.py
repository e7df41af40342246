r"""The greedy design problems: the optimizer that maximises the expected loss-drop rate.

Lee, J. and Lee, K. M., "Optimizing Optimizers for Fast Gradient-Based Learning", arXiv 2512.06370
(v1/v2, 2025); v3 (2026) "Greedy Alignment Principle for Optimizer Selection".

The frame (v1 eqs. (1)–(2), generalised to filters as v3 states it). An optimizer is a causal
linear filter from gradients to motions, ``u_t = −Σ_k Q_k g_{t−k}``. To first order the loss falls
at the rate

.. math::  −\dot L = E[g_tᵀ Σ_k Q_k g_{t−k}] = Σ_k ⟨Q_k, R_k⟩,   R_k = E[g_{t−k} g_tᵀ],

which is *linear* in the filter. Maximising it over a convex, bounded family of filters (a budget on
the filter or on the motion) is a convex problem, and each budget gives a known optimizer as its
maximiser, with the hyperparameters that suit the measured statistics.

Memoryless optimizers ``u = −Q g`` (only ``R = R_0`` matters), all closed forms:

* ``‖Q‖_F ≤ c``, Q ⪰ 0 → ``Q = c·R₊/‖R₊‖_F``: preconditioning by the gradient covariance
  (:func:`frobenius_optimizer`);
* ``‖Q‖₂ ≤ c``, Q ⪰ 0 → ``Q = c·I``: plain SGD with lr c (:func:`spectral_optimizer`);
* ``tr(QAQ) ≤ c²`` for a metric A ≻ 0 → the Lyapunov equation ``AQ + QA ∝ R``
  (:func:`lyapunov_optimizer`); A = I is the Frobenius budget, A = R the expected motion energy
  ``E‖u‖² = tr(QRQ)``, whose maximiser ``Q ∝ I`` is normalised SGD, ``η = c/√tr R``
  (:func:`scalar_optimizer`);
* ``QRQ ⪯ c²I`` (motion covariance) → ``Q = c·R^{−1/2}``: full-matrix AdaGrad / whitening
  (:func:`whitening_optimizer`);
* diagonal Q, ``E[(q_i g_i)²] ≤ c²`` per coordinate → ``q_i = c/√R_ii``: RMSProp, Adam's
  denominator (:func:`diagonal_optimizer`).

Filters over lags ``0..K`` of a block, with ``r_k = tr R_k`` (scalar taps ``q_k``):

* unit filter energy ``Σ_k q_k² ≤ 1``, free taps → ``q = r/‖r‖`` (:func:`free_filter`);
* unit filter energy, exponential taps ``q_k ∝ β^k`` (SGD+momentum, Adam's first moment) →
  maximise ``J(β) = √(1−β²) Σ_k β^k r_k`` (the worked example of ``shared/papers.md`` §1, and the
  selection score of v3's dynamic momentum rules), by a small numeric 1-D solve
  (:func:`optimal_momentum`); closed forms ``β* = ρ`` for ``r_k ∝ ρ^k`` and the root of a cubic
  for an AR(1) signal in white noise (:func:`ar1_optimal_momentum`);
* a budget on the *motion*, ``E‖Σ_k q_k g_{t−k}‖² = qᵀ T q ≤ c²`` (T the Toeplitz matrix of r) →
  ``q ∝ T⁻¹ r = e₀`` whatever the statistics (:func:`motion_budget_filter`): under a motion
  budget the greedy step never uses memory, it is normalised SGD. Momentum is greedy-optimal only
  under a budget on the filter, which is why the momentum rules use the filter energy. What the
  motion budget does fix is the learning rate of a given filter (:func:`momentum_learning_rate`).

Warning: of the paper we could read the abstracts of v1–v3, v1's eqs. (1)–(2) and a summary of v1
naming its Frobenius, spectral, Lyapunov and diagonal families; the budgets above and their
solutions are derived here from that frame (and checked numerically in
``tests/test_greedy_solver.py``), not transcribed, so no equation numbers beyond (1)–(2) are
cited. Continuing ``r`` beyond lag K geometrically (:func:`geometric_tail`) is our choice.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MomentumSolution",
    "ar1_optimal_momentum",
    "diagonal_optimizer",
    "free_filter",
    "frobenius_optimizer",
    "geometric_tail",
    "lyapunov_optimizer",
    "momentum_learning_rate",
    "momentum_motion_energy",
    "momentum_objective",
    "momentum_series",
    "motion_budget_filter",
    "optimal_momentum",
    "scalar_optimizer",
    "spectral_optimizer",
    "whitening_optimizer",
]


# --------------------------------------------------------------------------------------------
# Memoryless optimizers u = −Q g: the budget decides which popular optimizer is greedy-optimal.


def _check_radius(radius: float) -> float:
    if not (isinstance(radius, (int, float)) and not isinstance(radius, bool) and radius > 0
            and math.isfinite(radius)):
        raise ValueError(f"Invalid radius: {radius!r} (must be a finite number > 0)")
    return float(radius)


def _sym_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    # Only the symmetric part of R enters ⟨Q, R⟩ for a symmetric Q.
    m = matrix.to(torch.float64)
    return torch.linalg.eigh(0.5 * (m + m.T))


def frobenius_optimizer(R: Tensor, radius: float = 1.0) -> Tensor:
    """``argmax ⟨Q, R⟩`` over PSD ``Q`` with ``‖Q‖_F ≤ radius``: ``radius·R₊/‖R₊‖_F``.

    ``R₊`` is the projection of sym(R) on the PSD cone (R itself for a second-moment matrix): the
    greedy optimizer under a Frobenius budget preconditions by the gradient covariance. Returns
    zeros if ``R₊ = 0`` (no direction decreases the loss on average).
    """
    radius = _check_radius(radius)
    lam, vec = _sym_eigh(R)
    plus = (vec * lam.clamp(min=0)) @ vec.T
    norm = torch.linalg.matrix_norm(plus)
    return plus * (radius / norm) if norm > 0 else plus


def spectral_optimizer(R: Tensor, radius: float = 1.0) -> Tensor:
    """``argmax ⟨Q, R⟩`` over PSD ``Q`` with ``‖Q‖₂ ≤ radius``: plain SGD with learning rate ``radius``.

    The maximiser is ``radius`` times the projector on sym(R)'s non-negative eigenspace, which is
    ``radius·I`` for any second-moment matrix (zero eigenvalues are ties; we take the full step).
    """
    radius = _check_radius(radius)
    lam, vec = _sym_eigh(R)
    keep = (lam >= 0).to(torch.float64)
    return radius * (vec * keep) @ vec.T


def lyapunov_optimizer(R: Tensor, metric: Tensor, radius: float = 1.0) -> Tensor:
    """``argmax ⟨Q, R⟩`` over symmetric ``Q`` with ``tr(Q A Q) ≤ radius²`` (``A = metric ≻ 0``).

    Stationarity gives the Lyapunov equation ``AQ + QA = R/λ``; in A's eigenbasis
    ``Q̃_ij = R̃_ij/(a_i + a_j)``, then scaled onto the budget. For PSD R the solution is PSD
    (``∫ e^{−As} R e^{−As} ds``). ``A = I`` is the Frobenius budget (Q ∝ R); ``A = R`` is the
    expected motion energy ``E‖Qg‖² = tr(QRQ)``, whose maximiser is ``Q ∝ I``: normalised SGD.
    """
    radius = _check_radius(radius)
    a, vec = _sym_eigh(metric)
    if not bool(a.min() > 0):
        raise ValueError("Invalid metric: must be symmetric positive definite")
    r = R.to(torch.float64)
    r_tilde = vec.T @ (0.5 * (r + r.T)) @ vec
    q_tilde = r_tilde / (a[:, None] + a[None, :])
    q = vec @ q_tilde @ vec.T
    energy = torch.trace(q @ metric.to(torch.float64) @ q)
    return q * (radius / energy.sqrt()) if energy > 0 else q


def whitening_optimizer(R: Tensor, radius: float = 1.0, damping: float = 0.0) -> Tensor:
    """``argmax ⟨Q, R⟩`` over PSD ``Q`` with ``Q (R + δI) Q ⪯ radius²·I``: ``radius·(R + δI)^{−1/2}``.

    The budget bounds the covariance of the motion in every direction. Writing ``Q (R+δI)^{1/2} =
    radius·W`` with ``‖W‖₂ ≤ 1``, ``⟨Q, R⟩ ≤ radius·tr((R+δI)^{−1/2} R)`` with equality at ``W = I``
    (von Neumann's trace inequality). With R the running sum of ``g gᵀ`` this is full-matrix
    AdaGrad (Duchi et al. 2011); with an EMA, full-matrix RMSProp. Null directions of R get
    ``1/√δ`` (``δ = damping``); with ``δ = 0`` they get 0 (pseudo-inverse).
    """
    radius = _check_radius(radius)
    lam, vec = _sym_eigh(R)
    lam = lam.clamp(min=0) + damping
    inv_sqrt = torch.where(lam > 0, lam.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(),
                           torch.zeros_like(lam))
    return radius * (vec * inv_sqrt) @ vec.T


def diagonal_optimizer(second_moment: Tensor, radius: float = 1.0, eps: float = 0.0) -> Tensor:
    """Diagonal ``Q`` under a per-coordinate motion budget ``E[(q_i g_i)²] ≤ radius²``: ``q_i = radius/√v_i``.

    ``second_moment`` is ``v_i = E[g_i²] = (R_0)_ii``. The objective ``Σ q_i v_i`` separates over
    coordinates and each ``q_i`` sits on its budget: the update ``radius·g/√v`` is RMSProp
    (Tieleman & Hinton 2012) and Adam's denominator (Kingma & Ba 2015). ``eps`` is added to ``√v``
    as those optimizers do (the budget is then measured with ``(√v_i + eps)²``).
    """
    radius = _check_radius(radius)
    v = second_moment.to(torch.float64).clamp(min=0)
    denom = v.sqrt() + eps
    return torch.where(denom > 0, radius / denom.clamp(min=torch.finfo(torch.float64).tiny),
                       torch.zeros_like(denom))


def scalar_optimizer(R: Tensor, radius: float = 1.0) -> float:
    """``Q = ηI`` under the motion budget ``E‖u‖² = η² tr R ≤ radius²``: ``η = radius/√tr R``.

    Normalised SGD: the learning rate that moves a distance ``radius`` per step on average.
    ``R`` may be the matrix ``R_0`` or its trace (a 0-d tensor or float).
    """
    radius = _check_radius(radius)
    trace = torch.as_tensor(R, dtype=torch.float64)
    trace = torch.trace(trace) if trace.ndim == 2 else trace.sum()
    return radius / math.sqrt(float(trace)) if trace > 0 else math.inf


# --------------------------------------------------------------------------------------------
# Filters over lags 0..K (scalar taps per block, r_k = tr R_k). These are solved every few steps
# during training on arrays of a few dozen numbers, where numpy's per-call cost is a fraction of
# torch's: they take array-likes (CPU tensors included) and return float64 numpy arrays.

ArrayLike = Any


def _lags(r: ArrayLike) -> np.ndarray:
    r = np.asarray(r, dtype=np.float64)
    if r.ndim == 0 or r.shape[-1] < 1:
        raise ValueError(f"Invalid r: shape {r.shape} (need lags 0..K on the last axis)")
    return r


def free_filter(r: ArrayLike, radius: float = 1.0) -> np.ndarray:
    """Causal taps ``q_0..q_K`` maximising ``Σ q_k r_k`` under ``Σ q_k² ≤ radius²``: ``radius·r/‖r‖``.

    Without a parametric family the greedy filter is the autocorrelation itself (Cauchy–Schwarz).
    ``r`` may be batched, ``(..., K + 1)``; an all-zero ``r`` gives zero taps.
    """
    radius = _check_radius(radius)
    r = _lags(r)
    norm = np.linalg.norm(r, axis=-1, keepdims=True)
    return np.divide(radius * r, norm, out=np.zeros_like(r), where=norm > 0)


def motion_budget_filter(r: ArrayLike, radius: float = 1.0) -> np.ndarray:
    """Taps maximising ``Σ q_k r_k`` under ``E‖Σ_k q_k g_{t−k}‖² = qᵀ T q ≤ radius²``.

    ``T_jl = r_{|j−l|}`` is the Toeplitz autocorrelation matrix. The maximiser is ``q ∝ T⁻¹ r``, and
    because ``r`` is T's first column, ``T⁻¹ r = e₀``: ``q = (radius/√r_0, 0, …, 0)``, normalised SGD,
    for every stationary stream. (Returned from the closed form; the tests check it against a solve.)
    """
    radius = _check_radius(radius)
    r = _lags(r)
    q = np.zeros_like(r)
    r0 = r[..., 0]
    q[..., 0] = np.divide(radius, np.sqrt(np.maximum(r0, 0.0)), out=np.full_like(r0, np.inf),
                          where=r0 > 0)
    return q


def geometric_tail(r: ArrayLike, max_ratio: float = 0.999) -> tuple[np.ndarray, np.ndarray]:
    """Continue ``r`` beyond lag K as ``r_k ≈ anchor·ratio^{k−K}``; returns ``(ratio, anchor)``.

    ``ratio`` is ``Σ_{k=h+1}^{K} r_k / Σ_{k=h}^{K−1} r_k`` over the older half of the lags
    (``h = max(1, K//2)``; lag 0 holds the white-noise variance and is left out), and ``anchor`` is
    the fitted value at lag K. Exact for ``r_k = b ρ^k`` (k ≥ 1), e.g. an AR(1) signal in white
    noise. Where the sums are not both positive (no persistent positive correlation) or ``K < 2``,
    ratio and anchor are 0: no tail. Our choice, not the paper's: the exponential family needs
    ``r_k`` far beyond any affordable K when β approaches 1, and truncating at K would bias β down.

    ``max_ratio`` caps the ratio. The tail adds ``≈ anchor/(1 − β·ratio)`` to J, so near 1 a small
    error in the estimated ratio is amplified without bound; :func:`optimal_momentum` caps it at its
    largest β (an AR(1) stream with ρ = 0.99 and signal-to-noise 0.1, estimated over 3000 steps,
    otherwise gives β ≈ 0.99 where the optimum is 0.11).
    """
    r = _lags(r)
    K = r.shape[-1] - 1
    if K < 2:
        return np.zeros(r.shape[:-1]), np.zeros(r.shape[:-1])
    h = max(1, K // 2)
    num = r[..., h + 1:].sum(-1)
    den = r[..., h:K].sum(-1)
    ok = (num > 0) & (den > 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.where(ok, np.minimum(num / den, max_ratio), 0.0)
        # The fitted a·ratio^k over lags h+1..K sums to num; anchor = a·ratio^K.
        weights = (ratio[..., None] ** (np.arange(h + 1, K + 1) - K)).sum(-1)
        anchor = np.where(ok, num / weights, 0.0)
    return ratio, anchor


def momentum_series(r: ArrayLike, beta: ArrayLike, tail: tuple[ArrayLike, ArrayLike] | None = None
                    ) -> np.ndarray:
    """``S(β) = Σ_{k≥0} β^k r_k``: lags 0..K from ``r``, beyond K from the geometric ``tail``.

    ``r``: ``(..., K + 1)``; ``beta``: a scalar, ``(G,)`` or ``(..., G)``; returns ``(...)`` or
    ``(..., G)``. With
    ``tail = (ρ, a)`` (each of ``r``'s batch shape) the lags ``k > K`` add ``a·β^K·βρ/(1 − βρ)``.
    """
    r = _lags(r)
    beta = np.asarray(beta, dtype=np.float64)
    if beta.ndim == 0:  # one β for every block
        return momentum_series(r, beta[None], tail)[..., 0]
    K = r.shape[-1] - 1
    powers = np.power(beta[..., None], np.arange(K + 1))  # (..., G, K+1)
    s = (powers * r[..., None, :]).sum(-1)
    if tail is not None:
        ratio, anchor = (np.asarray(t, dtype=np.float64)[..., None] for t in tail)
        br = beta * ratio
        s = s + anchor * np.power(beta, K) * br / (1.0 - br)
    return s


def momentum_objective(r: ArrayLike, beta: ArrayLike, tail: tuple[ArrayLike, ArrayLike] | None = None
                       ) -> np.ndarray:
    """``J(β) = √(1−β²)·S(β)``: loss-drop rate of the unit-energy exponential filter ``q_k = √(1−β²) β^k``.

    The energy ``Σ_k q_k²`` is 1 for every β, so J ranks the momentum values at equal filter budget
    (``shared/papers.md`` §1; the selection score of v3's dynamic momentum rules). Adam's first
    moment ``(1−β)Σ β^k g_{t−k}`` is the same family up to scale, so the same J with the
    autocorrelation seen through Adam's preconditioner ranks its β₁.
    """
    beta = np.asarray(beta, dtype=np.float64)
    return np.sqrt(1.0 - beta * beta) * momentum_series(r, beta, tail)


@dataclass(frozen=True)
class MomentumSolution:
    """Maximiser of :func:`momentum_objective` per block (arrays of ``r``'s batch shape)."""

    momentum: np.ndarray
    objective: np.ndarray
    tail_ratio: np.ndarray


def optimal_momentum(
    r: ArrayLike,
    min_momentum: float = 0.0,
    max_momentum: float = 0.99,
    tail: str | tuple[ArrayLike, ArrayLike] | None = "geometric",
    grid: int = 129,
    refinements: int = 5,
    zoom: int = 17,
) -> MomentumSolution:
    """``argmax_{β ∈ [min, max]} √(1−β²) Σ_k β^k r_k``, per block of ``r`` (shape ``(..., K + 1)``).

    A small numeric solve: J on a grid uniform in ``log(1−β)`` (dense near 1, where the momentum
    horizon ``1/(1−β)`` changes fastest), then ``refinements`` zooms of ``zoom`` points around the
    best point (each shrinks the bracket ``(zoom − 1)/2``-fold). J need not be unimodal for measured ``r`` (negative
    lags from oscillation), hence the global grid rather than a local method. Ties (e.g. ``r ≡ 0``)
    go to the smallest β.

    ``tail``: ``"geometric"`` (:func:`geometric_tail` from ``r``, ratio capped at
    ``max_momentum``), ``None`` (lags > K are zero), or an explicit ``(ratio, anchor)``.
    """
    if not 0.0 <= min_momentum <= max_momentum < 1.0:
        raise ValueError(f"Invalid momentum bounds: [{min_momentum}, {max_momentum}] "
                         "(need 0 <= min_momentum <= max_momentum < 1)")
    r = _lags(r)
    if isinstance(tail, str):
        if tail != "geometric":
            raise ValueError(f"Invalid tail: {tail!r} (must be 'geometric', None or (ratio, anchor))")
        tail = geometric_tail(r, max_ratio=max_momentum)
    batch = r.shape[:-1]
    flat = r.reshape(-1, r.shape[-1])
    flat_tail = None
    if tail is not None:
        parts = [np.asarray(t, dtype=np.float64) for t in tail]
        flat_tail = tuple((t if t.shape == batch else np.broadcast_to(t, batch)).reshape(-1) for t in parts)
    rows = np.arange(flat.shape[0])
    # The first level's grid and its powers are the same at every solve: cached.
    grid_betas, powers, gain = _momentum_grid(min_momentum, max_momentum, grid, flat.shape[-1])
    series = flat @ powers.T
    if flat_tail is not None:
        br = grid_betas * flat_tail[0][:, None]
        series += flat_tail[1][:, None] * grid_betas ** (flat.shape[-1] - 1) * br / (1.0 - br)
    values = gain * series
    betas = np.broadcast_to(grid_betas, values.shape)
    for _ in range(refinements):
        best = np.where(np.isnan(values), -np.inf, values).argmax(-1)
        lo = betas[rows, np.maximum(best - 1, 0)]
        hi = betas[rows, np.minimum(best + 1, betas.shape[-1] - 1)]
        betas = lo[:, None] + (hi - lo)[:, None] * _zoom_span(zoom)
        values = momentum_objective(flat, betas, flat_tail)
    best = np.where(np.isnan(values), -np.inf, values).argmax(-1)
    momentum = betas[rows, best].reshape(batch)
    objective = values[rows, best].reshape(batch)
    ratio = (np.broadcast_to(np.asarray(tail[0], dtype=np.float64), batch).copy() if tail is not None
             else np.zeros(batch))
    return MomentumSolution(momentum=momentum, objective=objective, tail_ratio=ratio)


@functools.lru_cache(maxsize=8)
def _zoom_span(points: int) -> np.ndarray:
    span = np.linspace(0.0, 1.0, points)
    span.flags.writeable = False
    return span


@functools.lru_cache(maxsize=64)
def _momentum_grid(min_momentum: float, max_momentum: float, grid: int, lags: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid uniform in ``log(1−β)``, its powers ``β^k`` (k < lags) and ``√(1−β²)``, read-only."""
    u = np.linspace(-math.log1p(-min_momentum), -math.log1p(-max_momentum), grid)
    betas = -np.expm1(-u)
    out = (betas, np.power(betas[:, None], np.arange(lags)), np.sqrt(1.0 - betas * betas))
    for a in out:
        a.flags.writeable = False
    return out


def ar1_optimal_momentum(rho: float, signal_var: float = 1.0, noise_var: float = 0.0,
                         min_momentum: float = 0.0, max_momentum: float = 0.999) -> float:
    """Closed-form maximiser of J for ``r_0 = σ_s² + σ_n²``, ``r_k = σ_s² ρ^k`` (AR(1) signal + white noise).

    ``J(β) = √(1−β²)·(σ_n² + σ_s²/(1−βρ))``. Setting ``J'(β) = 0`` and clearing the positive factor
    ``√(1−β²)(1−βρ)²``:

        σ_s² (ρ − β) = σ_n² β (1 − ρβ)²,   i.e.   σ_n²ρ²β³ − 2σ_n²ρβ² + (σ_n² + σ_s²)β − σ_s²ρ = 0.

    Without noise ``β* = ρ`` (``shared/papers.md`` §1); noise pulls β* below ρ, to a root in
    ``(0, ρ)``. J can have two local maxima at low signal-to-noise ratio, so the maximiser over the
    bounds is taken among the cubic's real roots and the bounds themselves.
    """
    if not 0.0 <= min_momentum <= max_momentum < 1.0:
        raise ValueError(f"Invalid momentum bounds: [{min_momentum}, {max_momentum}]")
    if not -1.0 < rho < 1.0:
        raise ValueError(f"Invalid rho: {rho!r} (must be in (-1, 1))")
    a, b = float(noise_var), float(signal_var)

    def J(beta: float) -> float:
        return math.sqrt(1.0 - beta * beta) * (a + b / (1.0 - beta * rho))

    candidates = [min_momentum, max_momentum]
    if a == 0.0:
        candidates.append(rho)
    else:
        roots = np.roots([a * rho * rho, -2.0 * a * rho, a + b, -b * rho])
        candidates += [float(x.real) for x in roots if abs(x.imag) < 1e-12]
    candidates = [min(max(c, min_momentum), max_momentum) for c in candidates]
    return max(candidates, key=J)


def momentum_motion_energy(r: ArrayLike, beta: ArrayLike,
                           tail: tuple[ArrayLike, ArrayLike] | None = None) -> np.ndarray:
    """``E‖m_t‖²`` of the heavy-ball buffer ``m_t = Σ_k β^k g_{t−k}``: ``(2 S(β) − r_0)/(1 − β²)``.

    From ``Σ_{j,l} β^{j+l} r_{|j−l|}``: lag 0 appears with weight ``Σ_j β^{2j}``, lag ``k ≥ 1`` with
    ``2 Σ_j β^{2j+k}``. ``beta`` as in :func:`momentum_series`.
    """
    r = _lags(r)
    beta = np.asarray(beta, dtype=np.float64)
    s = momentum_series(r, beta, tail)
    r0 = r[..., 0] if beta.ndim == 0 else r[..., :1]
    return (2.0 * s - r0) / (1.0 - beta * beta)


def momentum_learning_rate(r: ArrayLike, beta: ArrayLike, radius: float = 1.0,
                           tail: tuple[ArrayLike, ArrayLike] | None = None) -> np.ndarray:
    """Learning rate of SGD+momentum (buffer ``m = βm + g``) under the motion budget ``E‖lr·m‖² ≤ radius²``.

    The loss-drop rate ``lr·S(β)`` is linear in ``lr``, so the budget is active:
    ``lr* = radius/√E‖m‖²`` (:func:`momentum_motion_energy`); at β = 0 this is normalised SGD.
    NaN where the energy is not positive: autocorrelations truncated at lag K (an oscillating
    stream at a large β) can give ``E‖m‖² ≤ 0``, which no learning rate answers.
    """
    radius = _check_radius(radius)
    energy = momentum_motion_energy(r, beta, tail)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(energy > 0, radius / np.sqrt(np.where(energy > 0, energy, 1.0)), np.nan)
