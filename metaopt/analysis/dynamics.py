"""Reverse-engineering tools for recurrent learned optimizers.

Maheswaranathan, Sussillo, Metz, Sun, Sohl-Dickstein, "Reverse engineering learned optimizers
reveals known and novel mechanisms" (NeurIPS 2021, arXiv 2011.02159), §3-4: a component-wise
learned optimizer is a small dynamical system per parameter coordinate,

.. code-block:: text

    x_t = encode(g_t)        h_t = cell(h_{t-1}, x_t)        Δθ_t = readout(h_t)      θ ← θ + Δθ

and the mechanisms it learned (momentum, gradient clipping, learning-rate schedules, learning-rate
adaptation) can be read off its fixed points, their linearisation, and its update function. The
tools take the dynamics as plain functions, so they work on metaopt's
:class:`~metaopt.learned.RecurrentLearnedOptimizer` (pass ``lopt.cell``, ``lopt.readout``,
``lopt.encode``) and on hand-built ones alike:

- ``cell(h, x) -> h_next``: ``h`` the state of one coordinate ``[H]``, ``x`` its encoded input
  ``[D]``. It must be written with torch operations (it is vectorised with :func:`torch.func.vmap`
  and differentiated with :func:`torch.func.jacrev`).
- ``readout(h_next) -> update``: the coordinate's Δθ, a scalar tensor.
- ``encode(g) -> x`` (optional): from a scalar gradient to ``[D]``; without it ``x = [g]``.

Sign convention: an *effective learning rate* is ``−dΔθ/dg``, positive when the optimizer steps
downhill, so it reads like the α of SGD (``Δθ = −α·g``).

Derivatives with respect to the gradient are right-sided, the response to a small *positive*
gradient: ``f'(g+) ≈ (−5 f(g+ε) + 8 f(g+2ε) − 3 f(g+3ε)) / (2ε)`` (second-order accurate, and it
never evaluates f at g itself). The paper's ``[log(1+|g|), sign g]`` encoding makes the response
at g = 0 discontinuous (a step from ``sign g``, a kink from ``|g|``), so a central difference there
would measure the step or cancel the kink; a right-sided one is well defined for every encoding
and equals the ordinary derivative for smooth ones. Run in float64 (``lopt.double()``): with
ε = 1e-5 the derivatives are then accurate to ~1e-9.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import jacrev, vmap

Cell = Callable[[Tensor, Tensor], Tensor]
Readout = Callable[[Tensor], Tensor]
Encode = Callable[[Tensor], Tensor]

__all__ = [
    "AdaptationCurve",
    "FixedPoints",
    "Mode",
    "PCA",
    "Schedule",
    "adaptation_curve",
    "autonomous_schedule",
    "clipping_threshold",
    "effective_lr",
    "fixed_points",
    "input_direction",
    "linearize",
    "optimal_heavy_ball",
    "sign_step",
    "update_function",
]

DEFAULT_EPS = 1e-5


def _encoded(encode: Encode | None, g: Tensor) -> Tensor:
    return g.reshape(1) if encode is None else encode(g)


def _jump_free_derivative(f: Callable[[Tensor], Tensor], g: Tensor, eps: float) -> Tensor:
    """Right-sided ``f'(g+)`` from ``f(g+ε), f(g+2ε), f(g+3ε)``: blind to a step or kink of f
    exactly at ``g`` (see module doc). Fitting f(g+kε) = a + bkε + ck²ε² to the three values
    gives b = (−5f₁ + 8f₂ − 3f₃)/(2ε)."""
    g = torch.as_tensor(g)
    e = torch.as_tensor(eps, dtype=g.dtype)
    return (-5 * f(g + e) + 8 * f(g + 2 * e) - 3 * f(g + 3 * e)) / (2 * e)


def _check_state(h: Tensor, name: str = "h") -> None:
    if not isinstance(h, Tensor) or h.dim() != 1:
        raise ValueError(f"{name} must be the 1-D state of one coordinate, got "
                         f"{getattr(h, 'shape', type(h).__name__)}")


# -- 1. fixed points ------------------------------------------------------------------------------


@dataclass
class FixedPoints:
    """Result of :func:`fixed_points`.

    Attributes:
      points: the kept approximate fixed points ``[K, H]``.
      speeds: their q(h) = ½‖cell(h, x) − h‖², ``[K]``.
      all_points / all_speeds: every optimised start, before outlier removal ``[N, H]`` / ``[N]``.
      kept: boolean mask over the N starts.
    """

    points: Tensor
    speeds: Tensor
    all_points: Tensor
    all_speeds: Tensor
    kept: Tensor

    def to_dict(self) -> dict[str, Any]:
        return {"num_starts": int(self.kept.numel()), "num_kept": int(self.kept.sum()),
                "max_speed": float(self.speeds.max()) if self.speeds.numel() else None,
                "points": self.points.tolist(), "speeds": self.speeds.tolist()}


def _speed(cell: Cell, h: Tensor, x: Tensor) -> Tensor:
    return 0.5 * (vmap(cell, in_dims=(0, None))(h, x) - h).pow(2).sum(-1)


def fixed_points(
    cell: Cell,
    x: Tensor,
    starts: Tensor,
    *,
    steps: int = 1000,
    lr: float = 1e-2,
    tol: float = 1e-8,
    newton_steps: int = 10,
    max_speed: float = 1e-4,
    outlier_factor: float = 10.0,
) -> FixedPoints:
    """Approximate fixed points ``h* = cell(h*, x)`` for a constant input ``x``.

    Minimises the speed q(h) = ½‖cell(h, x) − h‖² from each start with Adam (Sussillo & Barak,
    "Opening the black box: low-dimensional dynamics in high-dimensional recurrent neural networks",
    Neural Computation 2013; ~1000 steps, tolerance 1e-8, as in Maheswaranathan et al. 2021),
    then polishes each point with damped Newton steps on cell(h) − h = 0 (a step is kept only when
    it lowers q): Adam alone stalls at a speed set by its step size, and the linearisation is read
    at these points. Newton is also tried first, and when every start then meets ``tol`` the Adam
    phase is skipped (``steps=0``: Newton only). Starts should be states visited along real
    trajectories, so that the fixed points found are the ones the optimizer actually uses.

    Outliers dropped: points whose speed stays above ``max_speed`` (slow regions, not fixed points)
    or non-finite, and points isolated from the others (nearest-neighbour distance above
    ``outlier_factor`` × (median nearest-neighbour distance + 1e-3 × RMS point norm + 1e-6); the
    last terms keep a tight cluster, e.g. one fixed point found from every start, from calling its
    own members outliers).

    Args:
      cell: ``cell(h [H], x [D]) -> [H]``.
      x: the constant encoded input ``[D]``.
      starts: ``[N, H]`` initial states (or ``[H]`` for one).
    """
    starts = torch.as_tensor(starts)
    if starts.dim() == 1:
        starts = starts.unsqueeze(0)
    if starts.dim() != 2 or starts.shape[0] == 0:
        raise ValueError(f"starts must be [N, H] with N >= 1, got {tuple(starts.shape)}")
    x = torch.as_tensor(x, dtype=starts.dtype)
    residual = lambda hh: cell(hh, x) - hh  # noqa: E731
    jac = vmap(jacrev(residual))

    def polish(h: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            q = _speed(cell, h, x)
            for _ in range(newton_steps):
                try:
                    step = torch.linalg.lstsq(jac(h), -vmap(residual)(h).unsqueeze(-1)).solution
                except RuntimeError:
                    break
                # backtracking: a full Newton step can overshoot far from the fixed point
                for frac in (1.0, 0.5, 0.25, 0.125):
                    cand = h + frac * step.squeeze(-1)
                    q_cand = _speed(cell, cand, x)
                    better = torch.isfinite(q_cand) & (q_cand < q)
                    h = torch.where(better.unsqueeze(-1), cand, h)
                    q = torch.where(better, q_cand, q)
        return h, q

    # Newton first: starts on a trajectory are often already near a fixed point, and then the
    # Adam phase (the robust, global part) can be skipped.
    h, q = polish(starts.detach().clone())
    if not bool((q <= tol).all()):
        h = h.clone().requires_grad_(True)
        opt = torch.optim.Adam([h], lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            q = _speed(cell, h, x)
            if bool((q <= tol).all()):
                break
            q.sum().backward()  # q_i depends on h_i only, so one backward gives every gradient
            opt.step()
        h, q = polish(h.detach())
    kept = torch.isfinite(q) & (q <= max_speed) & torch.isfinite(h).all(-1)
    idx = kept.nonzero().squeeze(-1)
    if idx.numel() >= 3:
        pts = h[idx]
        d = torch.cdist(pts, pts)
        d.fill_diagonal_(float("inf"))
        nn = d.min(-1).values
        scale = nn.median() + 1e-3 * pts.pow(2).sum(-1).mean().sqrt() + 1e-6
        kept[idx[nn > outlier_factor * scale]] = False
    return FixedPoints(points=h[kept], speeds=q[kept], all_points=h, all_speeds=q, kept=kept)


# -- 2. linearisation -----------------------------------------------------------------------------


@dataclass
class Mode:
    """One eigenmode of the linearised optimizer: heavy-ball momentum ``m ← λ m + g``,
    ``Δθ = −α m`` (see :func:`linearize`).

    Attributes:
      eigenvalue: λ (complex; conjugate pairs come as two modes with conjugate α).
      beta: |λ|, the mode's momentum.
      alpha: Re α, the mode's learning rate (the pair of a conjugate pair sums to 2·Re α).
      alpha_complex: α itself.
      timescale: 1/(1 − β) steps (inf for β ≥ 1).
    """

    eigenvalue: complex
    beta: float
    alpha: float
    alpha_complex: complex
    timescale: float

    def to_dict(self) -> dict[str, Any]:
        return {"eigenvalue": [self.eigenvalue.real, self.eigenvalue.imag], "beta": self.beta,
                "alpha": self.alpha, "alpha_imag": self.alpha_complex.imag,
                "timescale": self.timescale if math.isfinite(self.timescale) else None}


def input_direction(encode: Encode | None, g: float = 0.0, *, eps: float = DEFAULT_EPS,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """``dx/dg`` of the encoding at ``g`` (``[D]``; ``[1.]`` without an encoding), jump-free."""
    g_t = torch.tensor(float(g), dtype=dtype)
    if encode is None:
        return torch.ones(1, dtype=dtype)
    return _jump_free_derivative(encode, g_t, eps)


def linearize(
    cell: Cell,
    readout: Readout,
    h: Tensor,
    x: Tensor,
    *,
    encode: Encode | None = None,
    g: float = 0.0,
    eps: float = DEFAULT_EPS,
) -> list[Mode]:
    r"""Eigenmodes of the optimizer linearised at state ``h`` (normally a fixed point for ``x``).

    Derivation (Maheswaranathan et al. 2021, §4.1). Near a fixed point h* of the input x* = encode(g*),
    write δh = h − h* and δg = g − g*. To first order

    .. code-block:: text

        δh_t = J δh_{t−1} + b δg_t          J = ∂cell/∂h (J_rec),  b = ∂cell/∂x · dx/dg (J_inp·dx/dg)
        Δθ_t = Δθ* + wᵀ δh_t                 w = ∂readout/∂h at h* (the readout reads the new state)

    Eigendecompose J = R Λ L with L = R⁻¹ (columns r_i: right eigenvectors; rows l_iᵀ: left ones,
    normalised so l_iᵀ r_j = δ_ij). In mode coordinates c_i = l_iᵀ δh the dynamics decouple,

    .. code-block:: text

        c_{i,t} = λ_i c_{i,t−1} + (l_iᵀ b) δg_t          Δθ_t − Δθ* = Σ_i (wᵀ r_i) c_{i,t}.

    Setting m_{i,t} = c_{i,t} / (l_iᵀ b) gives m_{i,t} = λ_i m_{i,t−1} + δg_t and
    Δθ_t − Δθ* = −Σ_i α_i m_{i,t} with

    .. code-block:: text

        α_i = −(wᵀ r_i)(l_iᵀ b),

    i.e. the linearised optimizer is a sum of heavy-ball momentum updates (Polyak 1964), one per
    mode, with momentum β_i = |λ_i| (the modulus sets the decay; a phase adds oscillation) and
    learning rate α_i: the readout's sensitivity to the input, routed through mode i. The product
    is invariant to the scaling of r_i (l_i scales inversely), so α_i is well defined. Modes the
    input cannot reach (l_iᵀ b = 0) or the readout cannot see (wᵀ r_i = 0) get α_i = 0. A mode's
    memory lasts about 1/(1 − β_i) steps (its timescale). Σ_i α_i is the learning rate the
    linearised optimizer applies to a constant gradient per unit of momentum-weighted history at
    the first step (the instantaneous slope of the update function is −Σ_i α_i).

    Args:
      cell, readout, encode: the optimizer (module doc).
      h: state ``[H]`` to linearise at.
      x: encoded input ``[D]`` held there (for the paper's analysis: encode(0)).
      g: the gradient the input direction ``dx/dg`` is taken at (jump-free, step ``eps``).

    Returns:
      The H modes sorted by |λ| descending.
    """
    _check_state(h)
    x = torch.as_tensor(x, dtype=h.dtype)
    jac_h, jac_x = jacrev(cell, argnums=(0, 1))(h, x)
    dxdg = input_direction(encode, g, eps=eps, dtype=h.dtype)
    if jac_x.shape[-1] != dxdg.shape[-1]:
        raise ValueError(f"cell takes inputs of size {jac_x.shape[-1]} but the encoding gives "
                         f"{dxdg.shape[-1]}: pass encode=")
    b = jac_x @ dxdg
    w = jacrev(readout)(cell(h, x).detach()).reshape(-1)
    lam, right = torch.linalg.eig(jac_h.detach().to(torch.float64))
    left = torch.linalg.inv(right)  # rows: left eigenvectors with l_iᵀ r_j = δ_ij
    cplx = right.dtype
    alphas = -(w.detach().to(cplx) @ right) * (left @ b.detach().to(cplx))
    order = torch.argsort(lam.abs(), descending=True)
    modes = []
    for i in order.tolist():
        ev, a = complex(lam[i]), complex(alphas[i])
        beta = abs(ev)
        modes.append(Mode(eigenvalue=ev, beta=beta, alpha=a.real, alpha_complex=a,
                          timescale=1.0 / (1.0 - beta) if beta < 1.0 else math.inf))
    return modes


def optimal_heavy_ball(mu: float, big_l: float) -> tuple[float, float]:
    """The fastest heavy-ball (α*, β*) for quadratics with curvature in [μ, L].

    Polyak, "Some methods of speeding up the convergence of iteration methods" (USSR Comp. Math.
    1964): α* = 4/(√L + √μ)², β* = ((√L − √μ)/(√L + √μ))², with linear rate √β*.
    """
    if not (0 < mu <= big_l) or not math.isfinite(big_l):
        raise ValueError(f"need 0 < mu <= L < inf, got mu={mu!r}, L={big_l!r}")
    sl, sm = math.sqrt(big_l), math.sqrt(mu)
    return 4.0 / (sl + sm) ** 2, ((sl - sm) / (sl + sm)) ** 2


# -- 3. update function and clipping --------------------------------------------------------------


def update_function(cell: Cell, readout: Readout, h: Tensor, gs: Tensor, *,
                    encode: Encode | None = None) -> Tensor:
    """Δθ(g) = readout(cell(h, encode(g))) for each gradient in ``gs`` at the fixed state ``h``.

    A curve that saturates for large |g| means the optimizer clips its gradients
    (Maheswaranathan et al. 2021, §4.2); see :func:`clipping_threshold`.
    """
    _check_state(h)
    gs = torch.as_tensor(gs, dtype=h.dtype)
    one = lambda g: readout(cell(h, _encoded(encode, g))).reshape(())  # noqa: E731
    with torch.no_grad():
        return vmap(one)(gs.reshape(-1)).reshape(gs.shape)


def effective_lr(cell: Cell, readout: Readout, h: Tensor, g: float = 0.0, *,
                 encode: Encode | None = None, eps: float = DEFAULT_EPS) -> float:
    """−dΔθ/dg at gradient ``g`` and state ``h`` (jump-free difference, step ``eps``)."""
    _check_state(h)
    f = lambda gg: readout(cell(h, _encoded(encode, gg))).reshape(())  # noqa: E731
    with torch.no_grad():
        return -float(_jump_free_derivative(f, torch.tensor(float(g), dtype=h.dtype), eps))


def _extrapolate_to_zero(x: Tensor, y: Tensor) -> float:
    """The Lagrange polynomial through (x, y) evaluated at 0."""
    total = 0.0
    for i in range(x.numel()):
        w = 1.0
        for j in range(x.numel()):
            if j != i:
                w *= float(x[j] / (x[j] - x[i]))
        total += w * float(y[i])
    return total


def clipping_threshold(gs: Tensor, updates: Tensor, *, flat: float = 0.05,
                       slope: float | None = None) -> dict[str, float | None]:
    """The gradient magnitude at which an update function saturates.

    With slope s₀ = dΔθ/dg at g = 0 and saturation level M = max |Δθ(g) − Δθ(0±)| on one side
    (measured from that side's limit at 0), the threshold is M / |s₀|: where the linear response
    meets the plateau. For ``Δθ = −c·tanh(g/c)`` this is c (for a range ≫ c); for hard clipping
    ``−clamp(g, −c, c)`` too. A side counts as saturated only when the local slope at its far end is
    below ``flat``·|s₀|; otherwise its threshold is None (no clipping inside the probed range).
    With the default 0.05 a tanh-shaped curve must reach 97.5% of its plateau, so M (hence the
    threshold) is underestimated by at most 2.5%.

    An update with a step at g = 0 (a ``sign g`` input) is reported by ``jump`` = −[Δθ(0+) −
    Δθ(0−)]/2: the part of the update that is signSGD with that step size (Bernstein et al.,
    "signSGD", ICML 2018), the extreme of clipping (threshold → 0).

    Args:
      gs: sorted gradients spanning 0 ``[N]``; updates: Δθ(gs) ``[N]``.
      slope: dΔθ/dg at 0 when known exactly (e.g. ``−effective_lr(...)``); default: from the
        grid points nearest 0 on each side (accurate to the grid's resolution).

    Returns:
      ``{"positive", "negative", "threshold", "slope_at_zero", "update_at_zero", "jump"}``; ``threshold``
      is the mean of the saturated sides (None when neither is).
    """
    gs = torch.as_tensor(gs, dtype=torch.float64).reshape(-1)
    u = torch.as_tensor(updates, dtype=torch.float64).reshape(-1)
    if gs.numel() < 5 or not bool((gs[1:] > gs[:-1]).all()) or not (gs[0] < 0 < gs[-1]):
        raise ValueError("gs must be increasing, with at least 5 points and 0 strictly inside")
    pos, neg = gs > 0, gs < 0
    gp, up = gs[pos], u[pos]
    gn, un = gs[neg], u[neg]
    zero = gs == 0
    # Δθ(0): the value there, else interpolated between the two nearest sides
    u0 = float(u[zero][0]) if bool(zero.any()) else \
        float(un[-1] + (up[0] - un[-1]) * (0 - gn[-1]) / (gp[0] - gn[-1]))
    if gp.numel() < 3 or gn.numel() < 3:
        raise ValueError("gs needs at least 3 points on each side of 0")
    # slope at 0 from the nearest points of each side, so a step at g = 0 is not counted
    s_right = float((up[1] - up[0]) / (gp[1] - gp[0]))
    s_left = float((un[-1] - un[-2]) / (gn[-1] - gn[-2]))
    s0 = 0.5 * (s_right + s_left) if slope is None else float(slope)
    # each side's limit at 0: the quadratic through its three nearest points, evaluated at 0
    u_plus = _extrapolate_to_zero(gp[:3], up[:3])
    u_minus = _extrapolate_to_zero(gn[-3:], un[-3:])
    out: dict[str, float | None] = {"slope_at_zero": s0, "update_at_zero": u0,
                                    "jump": -0.5 * (u_plus - u_minus)}
    if s0 == 0 or not math.isfinite(s0):
        out.update(positive=None, negative=None, threshold=None)
        return out
    for name, gg, uu, lim in (("positive", gp, up, u_plus), ("negative", gn.flip(0), un.flip(0), u_minus)):
        m = float((uu - lim).abs().max())
        edge = float(((uu[-1] - uu[-2]) / (gg[-1] - gg[-2])).abs())
        out[name] = m / abs(s0) if edge < flat * abs(s0) else None
    sides = [v for k in ("positive", "negative") if (v := out[k]) is not None]
    out["threshold"] = sum(sides) / len(sides) if sides else None
    return out


# -- 4. autonomous dynamics: learning-rate schedules ----------------------------------------------


@dataclass
class Schedule:
    """Result of :func:`autonomous_schedule`.

    Attributes:
      lr: effective learning rate −dΔθ/dg at g = 0 for steps 1..T ``[T]``.
      drift: Δθ at g = 0 (an update applied without gradient, ideally 0) ``[T]``.
      sign_step: −[Δθ(0+) − Δθ(0−)]/2, the signSGD-like step at each step ``[T]`` (0 for an
        update function continuous at g = 0; the schedule of an optimizer fed ``sign g``).
      states: h_0..h_T under zero input ``[T+1, H]``.
    """

    lr: Tensor
    drift: Tensor
    states: Tensor
    sign_step: Tensor

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr.tolist(), "drift": self.drift.tolist(), "sign_step": self.sign_step.tolist()}


def sign_step(cell: Cell, readout: Readout, h: Tensor, *, encode: Encode | None = None,
              eps: float = DEFAULT_EPS) -> float:
    """−[Δθ(0+) − Δθ(0−)]/2 at state ``h``: the size of the step of the update at g = 0, each side's
    limit extrapolated from g = ±ε, ±2ε (0 for an update function continuous at 0)."""
    _check_state(h)
    f = lambda gg: float(readout(cell(h, _encoded(encode, torch.tensor(gg, dtype=h.dtype)))))  # noqa: E731
    with torch.no_grad():
        plus, minus = 2 * f(eps) - f(2 * eps), 2 * f(-eps) - f(-2 * eps)
    return -0.5 * (plus - minus)


def autonomous_schedule(cell: Cell, readout: Readout, h0: Tensor, steps: int, *,
                        encode: Encode | None = None, eps: float = DEFAULT_EPS) -> Schedule:
    """The learning-rate schedule the optimizer runs by itself (Maheswaranathan et al. 2021, §4.3).

    From ``h0`` the state is iterated with zero gradient input; at step t the effective learning
    rate is −dΔθ/dg at g = 0 for the state h_{t−1} the step starts from (the slope of the update
    function the optimizer would apply at that step). A rise then fall is warm-up then decay.
    """
    _check_state(h0, "h0")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x0 = _encoded(encode, torch.zeros((), dtype=h0.dtype))
    h = h0.detach()
    states, lrs, drift, jumps = [h], [], [], []
    with torch.no_grad():
        for _ in range(steps):
            lrs.append(effective_lr(cell, readout, h, 0.0, encode=encode, eps=eps))
            jumps.append(sign_step(cell, readout, h, encode=encode, eps=eps))
            h = cell(h, x0)
            drift.append(float(readout(h)))
            states.append(h)
    return Schedule(lr=torch.tensor(lrs, dtype=torch.float64),
                    drift=torch.tensor(drift, dtype=torch.float64), states=torch.stack(states),
                    sign_step=torch.tensor(jumps, dtype=torch.float64))


# -- 5. fixed points across inputs: learning-rate adaptation --------------------------------------


@dataclass
class AdaptationCurve:
    """Result of :func:`adaptation_curve`.

    Attributes:
      gs: the constant gradients ``[N]``.
      points: the fixed point for each ``[N, H]`` (NaN where none was found).
      speeds: their speeds ``[N]``.
      lr: effective learning rate −dΔθ/dg at g, at that fixed point ``[N]``.
      update: the steady update Δθ = readout(cell(h*(g), g)) there ``[N]``; −Δθ/g is the
        learning rate per unit gradient, the measure that shows adaptation in an optimizer whose
        update is mostly ``sign g`` (its slope is ~0 everywhere).
    """

    gs: Tensor
    points: Tensor
    speeds: Tensor
    lr: Tensor
    update: Tensor

    def to_dict(self) -> dict[str, Any]:
        return {"g": self.gs.tolist(), "lr": self.lr.tolist(), "update": self.update.tolist(),
                "speed": self.speeds.tolist()}


def adaptation_curve(cell: Cell, readout: Readout, xs: Sequence[float] | Tensor, *,
                     h0: Tensor | None = None, encode: Encode | None = None, settle: int = 200,
                     eps: float = DEFAULT_EPS, **fp_kwargs: Any) -> AdaptationCurve:
    """Fixed points for a range of constant gradients and the slope of the update function there.

    Maheswaranathan et al. 2021, §4.4: under a constant gradient g the state settles on a fixed
    point h*(g); the effective learning rate −dΔθ/dg at (h*(g), g) falling as |g| grows is
    RMSProp-like learning-rate adaptation. The fixed point wanted is the one the optimizer actually
    settles on (a GRU can have several), so each search starts where ``settle`` steps of the cell
    under the constant input lead from ``h0``, and of the points found the one nearest that state
    is kept.

    Args:
      xs: constant gradients g (encoded with ``encode`` when given).
      h0: state to start from; default ``cell.__self__.initial_state()`` for a bound method of a
        :class:`~metaopt.learned.RecurrentLearnedOptimizer`.
      settle: steps of the cell under the constant input before the search.
      fp_kwargs: passed to :func:`fixed_points`.
    """
    gs = torch.as_tensor(xs, dtype=torch.float64).reshape(-1)
    if h0 is None:
        owner = getattr(cell, "__self__", None)
        if owner is None or not hasattr(owner, "initial_state"):
            raise ValueError("adaptation_curve needs h0= (the state to start from) for a cell that "
                             "is not a learned optimizer's bound method")
        h0 = owner.initial_state().detach()
    _check_state(h0, "h0")
    gs = gs.to(h0.dtype)
    n, hdim = gs.numel(), h0.numel()
    points = torch.full((n, hdim), float("nan"), dtype=h0.dtype)
    speeds = torch.full((n,), float("nan"), dtype=h0.dtype)
    lrs = torch.full((n,), float("nan"), dtype=torch.float64)
    updates = torch.full((n,), float("nan"), dtype=torch.float64)
    fp_kwargs.setdefault("max_speed", math.inf)  # keep the point; its speed is reported
    tol = fp_kwargs.get("tol", 1e-8)
    for j in range(n):
        x = _encoded(encode, gs[j])
        h = h0.detach()
        with torch.no_grad():
            for _ in range(settle):
                h = cell(h, x)
        # Newton alone from the settled state usually converges; Adam only runs when it does not.
        fp = fixed_points(cell, x, h.unsqueeze(0), **{**fp_kwargs, "steps": 0})
        if not fp.points.shape[0] or float(fp.speeds.min()) > tol:
            fp = fixed_points(cell, x, h.unsqueeze(0), **fp_kwargs)
        if fp.points.shape[0]:
            points[j], speeds[j] = fp.points[0], fp.speeds[0]
            lrs[j] = effective_lr(cell, readout, points[j], float(gs[j]), encode=encode, eps=eps)
            with torch.no_grad():
                updates[j] = float(readout(cell(points[j], x)))
    return AdaptationCurve(gs=gs, points=points, speeds=speeds, lr=lrs, update=updates)


# -- projections ----------------------------------------------------------------------------------


@dataclass
class PCA:
    """Principal components of states (e.g. trajectories), to project trajectories and fixed
    points on the same axes. ``PCA.fit(states, k)``, then ``pca.transform(anything [..., H])``."""

    mean: Tensor
    components: Tensor  # [k, H], rows orthonormal
    explained: Tensor  # fraction of variance per component [k]

    @classmethod
    def fit(cls, states: Tensor, k: int = 2) -> PCA:
        x = torch.as_tensor(states, dtype=torch.float64).reshape(-1, states.shape[-1])
        x = x[torch.isfinite(x).all(-1)]
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        var = s.pow(2)
        k = min(k, vh.shape[0])
        total = var.sum()
        explained = var[:k] / total if total > 0 else torch.zeros(k, dtype=torch.float64)
        return cls(mean=mean, components=vh[:k], explained=explained)

    def transform(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x, dtype=torch.float64)
        return (x - self.mean) @ self.components.T
