"""Line-shape analysis: is the minibatch loss along the update direction locally a parabola?

PAL (Mutschler, M. and Zell, A., "Parabolic Approximation Line Search for DNNs", NeurIPS 2020)
rests on an empirical claim: along the update direction, the loss of the *current minibatch* is,
near the current point, well approximated by a convex parabola, so two loss values and one slope
locate a good step. This module measures that claim on any model and loss.

Two layers, as elsewhere in metaopt:

* plain functions on a loss closure and a list of parameters (:class:`Line`,
  :func:`loss_along_line`, :class:`Parabola`, :func:`line_minimum`, :func:`is_locally_convex`,
  :func:`probe_line`, :func:`plot_line_shape`, :func:`summarize`), usable in any training loop;
* :class:`LineShapeProbe`, a :class:`metaopt.train.Callback` that applies them at chosen steps
  of a metaopt run (``analysis=line_shape``) along the update the optimizer actually made.

Coordinates: ``s`` is the Euclidean distance along the unit direction ``u``, so a step of PAL
(which moves ``s·u`` with ``‖u‖ = 1``) and the measuring step ``μ`` are read on the same axis.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metaopt.nn_utils import frozen_running_stats
from metaopt.optim.pal import PAL, pal_curvature, pal_step_size
from metaopt.runfiles import atomic_write_bytes, dumps
from metaopt.train import Callback, Components

__all__ = [
    "Line",
    "LineMinimum",
    "LineShape",
    "LineShapeProbe",
    "Parabola",
    "is_locally_convex",
    "line_minimum",
    "loss_along_line",
    "plot_line_shape",
    "probe_line",
    "summarize",
]

LossFn = Callable[[], Tensor]

log = logging.getLogger("metaopt")

# PAL's own defaults, read from its signature so the probe cannot drift from the optimizer.
_PAL_DEFAULTS = {name: p.default for name, p in inspect.signature(PAL.__init__).parameters.items()
                 if p.default is not inspect.Parameter.empty}


# -- random state -------------------------------------------------------------------------------


class _RNGState:
    """The CPU generator and those of the CUDA devices in ``devices`` (the devices holding the
    parameters); CUDA is never touched on a machine or run that does not use it."""

    def __init__(self, devices: Iterable[torch.device]):
        self.cpu = torch.get_rng_state()
        self.cuda: dict[int, Tensor] = {}
        indices = sorted({d.index or 0 for d in devices if d.type == "cuda"})
        for index in indices:
            self.cuda[index] = torch.cuda.get_rng_state(index)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)


def _devices(params: Iterable[Tensor]) -> set[torch.device]:
    return {p.device for p in params}


# -- the loss on a line -------------------------------------------------------------------------


class Line:
    """The loss on the line ``θ(s) = θ0 + (s/norm)·direction`` through the current parameters.

    A context manager: on entry it records θ0 (the parameters' current values) and the random
    state; on exit the parameters are θ0 again, bitwise, and the random state is the one on entry,
    so probing a training run does not change its trajectory.

    Args:
      loss_fn: zero-argument callable returning the scalar loss of the current parameters (e.g. a
        fixed minibatch). Wrap BatchNorm models in :func:`metaopt.nn_utils.frozen_running_stats`
        around the ``with Line(...)`` block so the evaluations leave running statistics alone.
      params: the parameters the line moves.
      direction: one tensor per parameter (``None``: that parameter stays fixed).
      norm: divisor that turns ``direction`` into the unit direction; default ``‖direction‖``,
        which makes ``s`` a Euclidean distance.
      rng: random state every evaluation starts from, so dropout draws the same mask at every
        point of the line; default the state on entry. Capture it with :meth:`capture_rng`.
    """

    def __init__(self, loss_fn: LossFn, params: Sequence[Tensor], direction: Sequence[Tensor | None],
                 norm: float | None = None, rng: Any = None):
        self.loss_fn = loss_fn
        self.params = list(params)
        if len(direction) != len(self.params):
            raise ValueError(f"direction has {len(direction)} tensors for {len(self.params)} parameters")
        self.direction = [None if d is None else d.detach() for d in direction]
        if norm is None:
            norm = math.sqrt(math.fsum(float(torch.sum(d.double() ** 2)) for d in self.direction
                                       if d is not None))
        if not (math.isfinite(norm) and norm != 0.0):
            raise ValueError(f"norm must be finite and non-zero, got {norm}")
        self.norm = float(norm)
        self._rng = rng
        self._theta0: list[Tensor] | None = None
        self._entry_rng: _RNGState | None = None

    @staticmethod
    def capture_rng(params: Iterable[Tensor]) -> Any:
        """The current random state (CPU, and CUDA devices among ``params``), for ``rng=``."""
        return _RNGState(_devices(params))

    def __enter__(self) -> Line:
        self._entry_rng = _RNGState(_devices(self.params))
        if self._rng is None:
            self._rng = self._entry_rng
        self._theta0 = [p.detach().clone(memory_format=torch.preserve_format) for p in self.params]
        return self

    def __exit__(self, *exc: Any) -> None:
        self._move(0.0)
        assert self._entry_rng is not None
        self._entry_rng.restore()
        self._theta0 = None

    @torch.no_grad()
    def _move(self, s: float) -> None:
        if self._theta0 is None:
            raise RuntimeError("Line must be used as a context manager: with Line(...) as line: ...")
        # θ0 + (s/norm)·d in one rounding per element, the way PAL.step forms its points, so a
        # probe of a PAL step reproduces PAL's measured losses exactly.
        alpha = s / self.norm
        for p, p0, d in zip(self.params, self._theta0, self.direction):
            p.copy_(p0)
            if d is not None and s != 0.0:
                p.add_(d, alpha=alpha)

    def __call__(self, s: float) -> float:
        """The loss at distance ``s`` along the line (no gradient)."""
        self._move(float(s))
        self._rng.restore()
        with torch.no_grad():
            value = self.loss_fn()
        return float(value.detach()) if isinstance(value, Tensor) else float(value)

    def losses(self, steps: Iterable[float]) -> np.ndarray:
        return np.array([self(s) for s in steps], dtype=np.float64)

    def slope(self) -> tuple[float, float]:
        """``(loss, d loss/ds)`` at ``s = 0``: one forward and one backward.

        Uses :func:`torch.autograd.grad`, so the parameters' ``.grad`` are left untouched.
        """
        self._move(0.0)
        self._rng.restore()
        pairs = [(p, d) for p, d in zip(self.params, self.direction) if d is not None and p.requires_grad]
        with torch.enable_grad():
            loss = self.loss_fn()
            grads = torch.autograd.grad(loss, [p for p, _ in pairs], allow_unused=True) if pairs else ()
        # Accumulated in float64: b is compared with PAL's own slope to many digits.
        dot = math.fsum(float(torch.sum(g.double() * d.double())) for g, (_, d) in zip(grads, pairs)
                        if g is not None)
        return float(loss.detach()), dot / self.norm


def loss_along_line(loss_fn: LossFn, params: Sequence[Tensor], direction: Sequence[Tensor | None],
                    steps: Iterable[float], *, norm: float | None = None, rng: Any = None) -> np.ndarray:
    """Loss at ``θ0 + (s/norm)·direction`` for each ``s`` in ``steps`` (see :class:`Line`).

    The parameters and the random state are as they were on return.
    """
    with Line(loss_fn, params, direction, norm=norm, rng=rng) as line:
        return line.losses(steps)


# -- the parabola PAL fits ----------------------------------------------------------------------


@dataclass(frozen=True)
class Parabola:
    """``l(s) = l0 + b·s + a·s²``."""

    l0: float
    b: float
    a: float

    @classmethod
    def from_pal(cls, l0: float, b: float, l_mu: float, mu: float) -> Parabola:
        """PAL's parabola: value ``l0`` and slope ``b`` at 0, through ``(mu, l_mu)``."""
        return cls(float(l0), float(b), pal_curvature(float(l0), float(l_mu), float(b), float(mu)))

    def __call__(self, s: Any) -> Any:
        return self.l0 + self.b * s + self.a * s * s

    @property
    def convex(self) -> bool:
        return self.a > 0.0

    @property
    def vertex(self) -> float:
        """The minimiser ``-b/(2a)``; NaN when the parabola has none (``a <= 0``)."""
        return -self.b / (2.0 * self.a) if self.a > 0.0 else math.nan


# -- the line's minimum and shape ---------------------------------------------------------------

_INVPHI = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class LineMinimum:
    s: float
    loss: float
    bracketed: bool  # False: the minimum may lie beyond the sampled range (s is then an end)


def line_minimum(steps: Sequence[float], losses: Sequence[float], f: Callable[[float], float] | None = None,
                 *, refine_iters: int = 30, max_extend: int = 8) -> LineMinimum:
    """The minimum of a sampled line, refined by golden-section search when ``f`` is given.

    Without ``f``: the best sample. With ``f`` (the loss at ``s``): if the best sample is at an end
    of the range, the range is extended outward with doubling increments until the loss rises
    (at most ``max_extend`` times); then ``refine_iters`` golden-section evaluations shrink the
    bracket around it, to ``0.618**refine_iters`` of the grid spacing.
    """
    s = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    order = np.argsort(s)
    s, y = s[order], y[order]
    if s.size == 0 or not np.isfinite(y).any():
        return LineMinimum(math.nan, math.nan, False)
    i = int(np.nanargmin(np.where(np.isfinite(y), y, np.nan)))
    best = (float(s[i]), float(y[i]))
    if s.size < 2:
        return LineMinimum(*best, False)
    bracketed = 0 < i < s.size - 1
    if f is None:
        return LineMinimum(*best, bracketed)
    if bracketed:
        lo, hi = float(s[i - 1]), float(s[i + 1])
    else:
        # Walk outward from the end; doubling finds a rise within a few calls at any scale.
        sign = 1.0 if i == s.size - 1 else -1.0
        inner, (end, f_end) = float(s[i - 1] if sign > 0 else s[i + 1]), best
        h = abs(float(s[1] - s[0]))
        for _ in range(max_extend):
            h *= 2.0
            nxt = end + sign * h
            f_nxt = f(nxt)
            if not f_nxt < f_end:  # NaN counts as a rise: it ends the walk
                bracketed = True
                lo, hi = sorted((inner, nxt))
                break
            inner, end, f_end = end, nxt, f_nxt
        best = (end, f_end)
        if not bracketed:
            return LineMinimum(*best, False)
    a, b = lo, hi
    c, d = b - _INVPHI * (b - a), a + _INVPHI * (b - a)
    fc, fd = f(c), f(d)
    for x, fx in ((c, fc), (d, fd)):
        if fx < best[1]:
            best = (x, fx)
    for _ in range(max(0, refine_iters - 2)):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _INVPHI * (b - a)
            fc = f(c)
            x, fx = c, fc
        else:
            a, c, fc = c, d, fd
            d = a + _INVPHI * (b - a)
            fd = f(d)
            x, fx = d, fd
        if fx < best[1]:
            best = (x, fx)
    return LineMinimum(best[0], best[1], True)


def is_locally_convex(steps: Sequence[float], losses: Sequence[float], *, rtol: float = 1e-5) -> bool:
    """Whether the sampled line is convex up to rounding.

    Every second divided difference must be non-negative, with a tolerance equal to perturbing
    each sample by ``rtol·max|loss|`` (float32 losses are exact to about ``1e-7`` relative, so the
    default only forgives rounding). Fewer than three samples, or a non-finite one: False.
    """
    s = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    order = np.argsort(s)
    s, y = s[order], y[order]
    if s.size < 3 or not np.isfinite(y).all():
        return False
    tol = rtol * float(np.max(np.abs(y)))
    h = np.diff(s)
    slopes = np.diff(y) / h
    # Convex iff consecutive chord slopes do not decrease; the tolerance is what a perturbation
    # of ±tol in the three samples can do to the difference of two chord slopes.
    return bool(np.all(np.diff(slopes) >= -tol * (2.0 / h[1:] + 2.0 / h[:-1])))


def _r2(y: np.ndarray, fit: np.ndarray) -> float:
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if not ss_tot > 0.0:
        return math.nan
    return 1.0 - float(np.sum((y - fit) ** 2)) / ss_tot


def _relative_distance(s: float, s_min: float) -> float:
    if not (math.isfinite(s) and math.isfinite(s_min)) or s_min == 0.0:
        return math.nan
    return abs(s - s_min) / abs(s_min)


@dataclass
class LineShape:
    """One probed line: samples, PAL's parabola, the chosen step and the line's true minimum.

    ``step`` is the optimizer step index (the update ``θ_step → θ_step+1``) or None outside a run.
    Ratios are NaN where undefined (e.g. a minimum at ``s = 0``).
    """

    mu: float
    parabola: Parabola
    pal_step: float  # PAL's rule on the parabola: update_factor·vertex, μ, or 0, capped at max_step
    pal_case: str
    chosen_step: float  # the step the optimizer took along the line (PAL: pal_step)
    chosen_loss: float
    line_min: LineMinimum
    grid: list[float]
    losses: list[float]
    loss0: float  # measured at s = 0 (equals parabola.l0 unless given otherwise)
    loss_mu: float  # measured at s = μ
    slope: float  # exact d loss/ds at s = 0 (PAL's b when exact_slope, up to rounding)
    locally_convex: bool  # the samples in [0, local_range] are convex (see is_locally_convex)
    convex_ahead: bool  # all samples with s >= 0 are convex (the whole range probed ahead)
    local_range: float  # max(μ, chosen step, PAL's step, line minimum)
    parabola_r2: float  # how well PAL's two-point parabola explains the samples in [0, local_range]
    quadratic_r2: float  # the least-squares parabola's R² there, the best any parabola can do
    fit_loss_mu: float  # the l_μ PAL's parabola was fitted with (PAL's own when given)
    rel_distance_step: float  # |chosen_step − s*| / |s*|, s* the line's minimum
    rel_distance_vertex: float  # |vertex − s*| / |s*| (PAL with update_factor 1)
    improvement_ratio: float  # (l0 − l(chosen)) / (l0 − l(s*)): share of the best decrease
    step: int | None = None
    optimizer_case: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["parabola"] = {**asdict(self.parabola), "vertex": self.parabola.vertex}
        out["parabola_convex"] = self.parabola.convex
        return out


def probe_line(
    line: Line,
    *,
    mu: float = _PAL_DEFAULTS["measuring_step"],
    update_factor: float = _PAL_DEFAULTS["update_factor"],
    max_step: float = _PAL_DEFAULTS["max_step"],
    chosen_step: float | None = None,
    l0: float | None = None,
    slope: float | None = None,
    l_mu: float | None = None,
    grid: tuple[float, float] = (-0.25, 2.0),
    resolution: int = 20,
    refine_iters: int = 30,
    convex_rtol: float = 1e-5,
) -> LineShape:
    """Sample ``line``, fit PAL's parabola and compare PAL's step with the line's minimum.

    PAL's parabola uses ``l0``, ``slope`` and ``l_mu`` when given (the values PAL itself measured),
    else the line's own: the loss and exact slope at 0 and the loss at ``mu``. ``chosen_step``
    defaults to PAL's step on that parabola. The grid spans ``grid`` (in units of
    ``R = max(mu, |chosen_step|, pal_step)``) with ``resolution`` points per ``R``, and always
    contains 0. Local convexity and the R² of the parabolas are measured on ``[0, max(R, s*)]``,
    ``s*`` the line's minimum; ``convex_ahead`` on all samples with ``s >= 0``.
    Cost: one backward and about ``(hi − lo)·resolution + refine_iters + 10`` forwards.
    """
    lo, hi = grid
    if not (lo <= 0.0 < hi):
        raise ValueError(f"grid must satisfy lo <= 0 < hi, got {grid}")
    loss0, exact_slope = line.slope()
    loss_mu = line(mu)
    fit = (loss0 if l0 is None else float(l0), exact_slope if slope is None else float(slope),
           loss_mu if l_mu is None else float(l_mu))
    parabola = Parabola.from_pal(*fit, mu)
    pal_step, pal_case = pal_step_size(fit[0], fit[2], fit[1], mu, update_factor, max_step)
    chosen = pal_step if chosen_step is None else float(chosen_step)
    scale = max(mu, abs(chosen), pal_step)
    ks = np.arange(math.ceil(lo * resolution), math.floor(hi * resolution) + 1)
    s = scale * ks / resolution
    y = line.losses(s)
    chosen_loss = float(y[ks == 0][0]) if chosen == 0.0 else line(chosen)
    minimum = line_minimum(s, y, line, refine_iters=refine_iters)

    # "Locally": from θ to the farthest of the points PAL and the line care about (μ, the step,
    # PAL's step, the minimum). Beyond it, losses of ReLU networks commonly bend over.
    local_hi = max(scale, minimum.s) if math.isfinite(minimum.s) else scale
    local = (s >= 0.0) & (s <= local_hi * (1 + 1e-12))
    r2_pal = _r2(y[local], parabola(s[local]))
    if np.isfinite(y[local]).all() and local.sum() >= 3:
        r2_ls = _r2(y[local], np.polyval(np.polyfit(s[local], y[local], 2), s[local]))
    else:
        r2_ls = math.nan
    ahead = s >= 0.0
    decrease = loss0 - minimum.loss
    return LineShape(
        mu=float(mu),
        parabola=parabola,
        pal_step=float(pal_step),
        pal_case=pal_case,
        chosen_step=chosen,
        chosen_loss=chosen_loss,
        line_min=minimum,
        grid=s.tolist(),
        losses=y.tolist(),
        loss0=loss0,
        loss_mu=loss_mu,
        slope=exact_slope,
        locally_convex=is_locally_convex(s[local], y[local], rtol=convex_rtol),
        convex_ahead=is_locally_convex(s[ahead], y[ahead], rtol=convex_rtol),
        local_range=local_hi,
        fit_loss_mu=fit[2],
        parabola_r2=r2_pal,
        quadratic_r2=r2_ls,
        rel_distance_step=_relative_distance(chosen, minimum.s),
        rel_distance_vertex=_relative_distance(parabola.vertex, minimum.s),
        improvement_ratio=(loss0 - chosen_loss) / decrease if decrease > 0.0 else math.nan,
    )


# -- reporting ----------------------------------------------------------------------------------


def plot_line_shape(shape: LineShape, path: str | Path, title: str | None = None) -> None:
    """Save a PNG: the sampled loss, PAL's parabola, the measuring point, the chosen step and the
    line's minimum. Uses the Agg canvas directly, so it changes no global matplotlib state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = np.asarray(shape.grid)
    y = np.asarray(shape.losses)
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(s, y, "-", color="black", lw=1.6, label="minibatch loss on the line")
    dense = np.linspace(s.min(), s.max(), 200)
    fit = shape.parabola(dense)
    # Clip the parabola to the loss's own range so a wild fit does not flatten the line.
    span = max(float(np.nanmax(y) - np.nanmin(y)), 1e-12)
    keep = (fit >= np.nanmin(y) - 0.5 * span) & (fit <= np.nanmax(y) + 0.5 * span)
    ax.plot(np.where(keep, dense, np.nan), fit, "--", color="tab:blue",
            label=f"PAL parabola (a={shape.parabola.a:.3g}, b={shape.parabola.b:.3g})")
    ax.plot([0.0, shape.mu], [shape.parabola.l0, shape.loss_mu], "o", color="tab:blue",
            label=f"PAL's points (0, μ={shape.mu:g})")
    ax.axvline(shape.chosen_step, color="tab:red", lw=1.2, label=f"step taken s={shape.chosen_step:.3g}")
    ax.plot([shape.chosen_step], [shape.chosen_loss], "o", color="tab:red")
    if not math.isclose(shape.pal_step, shape.chosen_step, rel_tol=1e-9):
        ax.axvline(shape.pal_step, color="tab:blue", lw=1.0, ls=":", label=f"PAL's step s={shape.pal_step:.3g}")
    if math.isfinite(shape.line_min.s):
        ax.plot([shape.line_min.s], [shape.line_min.loss], "*", color="tab:green", ms=12,
                label=f"line minimum s*={shape.line_min.s:.3g}" + ("" if shape.line_min.bracketed else " (edge)"))
    ax.set_xlabel("s: distance along the update direction")
    ax.set_ylabel("minibatch loss")
    ax.set_title(title or ("locally convex" if shape.locally_convex else "not locally convex"), fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _median(values: Iterable[float]) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.median(finite)) if finite else math.nan


def summarize(probes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate :meth:`LineShape.to_dict` records: how often the line is locally convex, how
    well PAL's parabola fits, and how far the chosen step and the vertex are from the minimum."""
    n = len(probes)

    def fraction(key: str) -> float:
        return sum(bool(p[key]) for p in probes) / n if n else math.nan

    return {
        "num_probes": n,
        "fraction_locally_convex": fraction("locally_convex"),
        "fraction_convex_ahead": fraction("convex_ahead"),
        "fraction_parabola_convex": fraction("parabola_convex"),
        "fraction_min_bracketed": sum(bool(p["line_min"]["bracketed"]) for p in probes) / n if n else math.nan,
        "median_rel_distance_step": _median(p["rel_distance_step"] for p in probes),
        "median_rel_distance_vertex": _median(p["rel_distance_vertex"] for p in probes),
        "median_improvement_ratio": _median(p["improvement_ratio"] for p in probes),
        "median_parabola_r2": _median(p["parabola_r2"] for p in probes),
        "median_quadratic_r2": _median(p["quadratic_r2"] for p in probes),
        "pal_cases": {c: sum(p["pal_case"] == c for p in probes) for c in sorted({p["pal_case"] for p in probes})},
    }


# -- the training-loop callback -----------------------------------------------------------------


def _check(name: str, value: Any, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (must be {rule})")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class LineShapeProbe(Callback):
    """Probe the minibatch loss along the update direction at chosen steps of a run.

    At step ``t`` (the update ``θ_t → θ_{t+1}``, 0-based) it samples the loss of that step's
    minibatch on the line through ``θ_t`` along ``θ_{t+1} − θ_t``, so it works for any optimizer;
    for :class:`metaopt.optim.PAL` the line is PAL's own (``−d/‖d‖`` from its direction buffer,
    defined even when PAL did not move) and the parabola is built from the ``l0``, ``b`` and
    ``l_μ`` PAL measured. For other optimizers PAL's parabola is fitted from the line (exact slope)
    with ``measuring_step``, and the chosen step is the distance ``‖θ_{t+1} − θ_t‖`` actually moved.

    Writes, under ``<run_dir>/<out_dir>/``: ``step_XXXXXXX.png`` per probe, ``probes.jsonl`` as it
    goes, and at the end ``line_shape.json`` (:func:`summarize` plus every probe). Adds
    ``line/*`` scalars to the next metrics record.

    The run is not perturbed: evaluations run in train mode (like the loop) with BatchNorm running
    statistics frozen, each starts from the random state of the step's own forward (same dropout
    mask), and afterwards the parameters are ``θ_{t+1}`` bitwise and the random state is as it
    was. Only ``time`` grows: probing is inside the loop's clock.

    Args:
      line_every: probe steps ``0, line_every, 2·line_every, ...``; null to use ``steps`` only.
      steps: explicit step indices to probe (in addition to ``line_every``).
      out_dir: folder under the run directory.
      measuring_step, update_factor, max_step: PAL's μ, α and s_max for the fitted parabola and
        PAL's rule; null takes PAL's (the optimizer's when it is PAL, else PAL's defaults).
      grid_lo, grid_hi, grid_resolution: the sampled range in units of
        ``R = max(μ, chosen step, PAL's step)``, and points per ``R``.
      refine_iters: golden-section evaluations locating the minimum on the line.
      convex_rtol: rounding tolerance of :func:`is_locally_convex`.
      plot: write the PNGs.
    """

    def __init__(
        self,
        line_every: int | None = 100,
        steps: Sequence[int] | None = None,
        out_dir: str = "line_shape",
        measuring_step: float | None = None,
        update_factor: float | None = None,
        max_step: float | None = None,
        grid_lo: float = -0.25,
        grid_hi: float = 2.0,
        grid_resolution: int = 20,
        refine_iters: int = 30,
        convex_rtol: float = 1e-5,
        plot: bool = True,
    ):
        _check("line_every", line_every, line_every is None or (_is_int(line_every) and line_every > 0),
               "a positive integer or null")
        steps = [] if steps is None else list(steps)
        _check("steps", steps, all(_is_int(s) and s >= 0 for s in steps), "a list of step indices >= 0")
        _check("line_every", line_every, line_every is not None or steps,
               "set when steps is empty: nothing would be probed")
        for name, value in (("measuring_step", measuring_step), ("update_factor", update_factor),
                            ("max_step", max_step)):
            _check(name, value, value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                  and value > 0), "> 0 or null")
        _check("grid_lo", grid_lo, isinstance(grid_lo, (int, float)) and grid_lo <= 0, "<= 0")
        _check("grid_hi", grid_hi, isinstance(grid_hi, (int, float)) and grid_hi > 0, "> 0")
        _check("grid_resolution", grid_resolution, _is_int(grid_resolution) and grid_resolution >= 2, "an integer >= 2")
        _check("refine_iters", refine_iters, _is_int(refine_iters) and refine_iters >= 0, "an integer >= 0")
        _check("convex_rtol", convex_rtol, isinstance(convex_rtol, (int, float)) and convex_rtol >= 0, ">= 0")
        self.line_every = line_every
        self.steps = frozenset(int(s) for s in steps)
        self.out_dir = str(out_dir)
        self.measuring_step, self.update_factor, self.max_step = measuring_step, update_factor, max_step
        self.grid = (float(grid_lo), float(grid_hi))
        self.grid_resolution = int(grid_resolution)
        self.refine_iters = int(refine_iters)
        self.convex_rtol = float(convex_rtol)
        self.plot = bool(plot)
        self.dir: Path | None = None
        self._before: tuple[int, list[Tensor], Any] | None = None

    def wants(self, step: int) -> bool:
        return step in self.steps or (self.line_every is not None and step % self.line_every == 0)

    @staticmethod
    def _params(c: Components) -> list[Tensor]:
        return [p for group in c.optimizer.param_groups for p in group["params"]]

    def on_start(self, c: Components, run_dir: Path) -> None:
        del c
        self.dir = Path(run_dir) / self.out_dir
        self.dir.mkdir(parents=True, exist_ok=True)

    def before_step(self, step: int, batch: Any, c: Components) -> None:
        del batch
        self._before = None
        if not self.wants(step):
            return
        params = self._params(c)
        # The random state the step's first forward will start from: every probe evaluation
        # starts from it too, so dropout sees the mask the optimizer saw.
        self._before = (step, [p.detach().clone(memory_format=torch.preserve_format) for p in params],
                        Line.capture_rng(params))

    def after_step(self, step: int, batch: Any, c: Components) -> dict[str, float] | None:
        if self._before is None or self._before[0] != step:
            return None
        _, theta0, rng = self._before
        self._before = None
        params = self._params(c)
        theta1 = [p.detach().clone(memory_format=torch.preserve_format) for p in params]
        model = c.model
        was_training = model.training
        try:
            with torch.no_grad():
                for p, p0 in zip(params, theta0):
                    p.copy_(p0)
            model.train()
            with frozen_running_stats(model):
                record = self._probe(step, batch, c, params, theta0, theta1, rng)
        finally:
            with torch.no_grad():
                for p, p1 in zip(params, theta1):
                    p.copy_(p1)
            model.train(was_training)
        self._write(record)
        if record.get("skipped"):
            return {"line/skipped": 1.0}
        return {
            "line/locally_convex": float(record["locally_convex"]),
            "line/parabola_convex": float(record["parabola_convex"]),
            "line/step": record["chosen_step"],
            "line/min": record["line_min"]["s"],
            "line/rel_distance_step": record["rel_distance_step"],
        }

    def _pal_line(self, opt: PAL, params: list[Tensor]) -> dict[str, Any] | None:
        """PAL's line and measurements for the step it just took, or None if it had none."""
        diag = opt.diagnostics()
        norm = diag["direction_norm"]
        if diag["case"] == "nonfinite" or not (math.isfinite(norm) and norm > 0.0):
            return None
        # PAL commits d ← βd + g before moving and moves θ − (s/‖d‖)·d; parameters without a
        # gradient this step were not on its line.
        direction = [-opt.state[p]["direction_buffer"] if p.grad is not None and "direction_buffer" in opt.state[p]
                     else None for p in params]
        group = opt.param_groups[0]
        return dict(direction=direction, norm=norm, mu=float(group["measuring_step"]),
                    update_factor=float(group["update_factor"]), max_step=float(group["max_step"]),
                    l0=diag["loss0"], slope=diag["slope"], l_mu=diag["loss_mu"], chosen_step=diag["step"],
                    case=diag["case"])

    def _probe(self, step: int, batch: Any, c: Components, params: list[Tensor], theta0: list[Tensor],
               theta1: list[Tensor], rng: Any) -> dict[str, Any]:
        pal = self._pal_line(c.optimizer, params) if isinstance(c.optimizer, PAL) else None
        if pal is None:
            delta = [p1 - p0 for p0, p1 in zip(theta0, theta1)]
            moved = math.sqrt(math.fsum(float(torch.sum(d.double() ** 2)) for d in delta))
            if not (math.isfinite(moved) and moved > 0.0):
                return {"step": step, "skipped": "the optimizer did not move (or moved to a non-finite point)"}
            pal = dict(direction=delta, norm=moved, chosen_step=moved, case="")
        mu = self.measuring_step or pal.get("mu", _PAL_DEFAULTS["measuring_step"])
        # An explicit measuring_step departs from PAL's own measurement: refit from the line.
        own = self.measuring_step is None and "l0" in pal
        with Line(lambda: c.task.loss(batch), params, pal["direction"], norm=pal["norm"], rng=rng) as line:
            shape = probe_line(
                line,
                mu=mu,
                update_factor=self.update_factor or pal.get("update_factor", _PAL_DEFAULTS["update_factor"]),
                max_step=self.max_step or pal.get("max_step", _PAL_DEFAULTS["max_step"]),
                chosen_step=pal["chosen_step"],
                l0=pal["l0"] if own else None,
                slope=pal["slope"] if own else None,
                l_mu=pal["l_mu"] if own else None,
                grid=self.grid,
                resolution=self.grid_resolution,
                refine_iters=self.refine_iters,
                convex_rtol=self.convex_rtol,
            )
        shape.step = step
        shape.optimizer_case = pal["case"]
        shape.extra["optimizer"] = type(c.optimizer).__name__
        if self.plot and self.dir is not None:
            label = f"{type(c.optimizer).__name__}{' ' + pal['case'] if pal['case'] else ''}"
            try:
                plot_line_shape(shape, self.dir / f"step_{step:07d}.png",
                                title=f"step {step} ({label}): "
                                      f"{'locally convex' if shape.locally_convex else 'not locally convex'}, "
                                      f"|s-s*|/s*={shape.rel_distance_step:.2f}")
            except Exception as exc:  # noqa: BLE001
                # A figure is a view of the record written below; losing one must not end a run.
                log.warning("line_shape: no plot for step %d: %s", step, exc)
        return shape.to_dict()

    def _write(self, record: dict[str, Any]) -> None:
        if self.dir is None:
            return
        with open(self.dir / "probes.jsonl", "a", encoding="utf-8") as fh:
            fh.write(dumps(record) + "\n")

    def on_end(self, c: Components, run_dir: Path) -> None:
        del c
        directory = Path(run_dir) / self.out_dir
        path = directory / "probes.jsonl"
        # A resumed run probes its steps again; the latest record of a step wins.
        by_step: dict[int, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                by_step[int(record["step"])] = record
        records = [by_step[k] for k in sorted(by_step)]
        probes = [r for r in records if not r.get("skipped")]
        report = {
            **summarize(probes),
            "skipped": [{"step": r["step"], "why": r["skipped"]} for r in records if r.get("skipped")],
            "settings": {"line_every": self.line_every, "steps": sorted(self.steps),
                         "measuring_step": self.measuring_step, "update_factor": self.update_factor,
                         "max_step": self.max_step, "grid": list(self.grid),
                         "grid_resolution": self.grid_resolution, "refine_iters": self.refine_iters,
                         "convex_rtol": self.convex_rtol},
            "probes": probes,
        }
        data = (json.dumps(json.loads(dumps(report)), indent=2) + "\n").encode()
        atomic_write_bytes(directory / "line_shape.json", lambda fh: fh.write(data))
