"""Meta-gradient estimators behind one interface: full BPTT, truncated BPTT, antithetic ES, PES.

Each estimates ∇φ of the meta-objective (the mean normalised loss of inner runs, see
:mod:`metaopt.outer.unroll`) averaged over a meta-batch of tasks; the outer trainer adds the L2
term, clips, and steps. Estimators that truncate keep their inner runs between calls in a state
dict of tensors (checkpointed by the trainer), replace a run by a fresh task when it reaches the
horizon, and, with ``stagger=True``, give each slot a random first-run length so that the runs of
a meta-batch are spread over the horizon instead of all restarting together (as learned_optimization
does).

- :class:`FullBPTT`: backprop through whole inner runs (the paper's choice; exact).
- :class:`TruncatedBPTT`: backprop through K-step truncations, state carried across them; biased,
  since what a truncation does to later truncations is ignored.
- :class:`ES`: antithetic evolution strategies over whole runs (Salimans et al. 2017); unbiased for
  the Gaussian-smoothed objective, no backprop, no differentiability needed.
- :class:`PES`: persistent evolution strategies (Vicol, Metz, Sohl-Dickstein, "Unbiased Gradient
  Estimation in Unrolled Computation Graphs with Persistent Evolution Strategies", ICML 2021):
  truncated, yet unbiased over a run, because each particle accumulates the perturbations of all
  the truncations of its run and the estimate weights the truncation's loss by that sum.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaopt.learned.base import LearnedOptimizer
from metaopt.outer.families import TaskFamily
from metaopt.outer.unroll import Runs, start_runs, unroll
from metaopt.tasks._common import derive_seed, generator


@dataclass
class MetaContext:
    """What every estimator works with: the learned optimizer, the task family and the budgets."""

    lopt: LearnedOptimizer
    family: TaskFamily
    tasks_per_step: int
    horizon: int
    unroll: int  # steps per truncation (== horizon for whole-run estimators)
    cap: float = 10.0
    seed: int = 0

    def draw_seeds(self, state: dict[str, Any], k: int) -> list[int]:
        """Seeds of ``k`` new training tasks (a counter in ``state``: resumes draw the same tasks)."""
        first = int(state.get("tasks_drawn", 0))
        state["tasks_drawn"] = first + k
        return [derive_seed(self.seed, "meta-train-task", first + i) for i in range(k)]

    def noise(self, tag: str, meta_step: int, rows: int) -> Tensor:
        dim = sum(p.numel() for p in self.lopt.parameters())
        z = torch.randn(rows, dim, generator=generator(self.seed, tag, meta_step), dtype=torch.float64)
        return z.to(device=self.family.device, dtype=torch.float32)


def _params(ctx: MetaContext) -> list[Tensor]:
    return list(ctx.lopt.parameters())


def perturbed(ctx: MetaContext, offsets: Tensor) -> dict[str, Tensor]:
    """φ + offsets: one φ per row of ``offsets`` ``[P, D]``, as the per-run dict the optimizers take."""
    out, start = {}, 0
    for name, p in ctx.lopt.named_parameters():
        n = p.numel()
        out[name] = p.detach().unsqueeze(0) + offsets[:, start:start + n].reshape(-1, *p.shape)
        start += n
    return out


def unflat(ctx: MetaContext, flat: Tensor) -> list[Tensor]:
    out, start = [], 0
    for p in ctx.lopt.parameters():
        out.append(flat[start:start + p.numel()].reshape(p.shape).to(p.dtype))
        start += p.numel()
    return out


def _backward(ctx: MetaContext, loss: Tensor) -> list[Tensor]:
    params = _params(ctx)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _first_lengths(ctx: MetaContext, n: int, stagger: bool) -> Tensor:
    """First-run lengths: the horizon, or with staggering a random multiple of the truncation."""
    if not stagger:
        return torch.full((n,), ctx.horizon, dtype=torch.int64)
    truncations = ctx.horizon // ctx.unroll
    offsets = torch.randint(truncations, (n,), generator=generator(ctx.seed, "stagger"))
    return ctx.horizon - offsets * ctx.unroll


def _finished(runs: Runs) -> Tensor:
    return (runs.step >= runs.length) | ~torch.isfinite(runs.theta).all(dim=1)


class GradientEstimator(abc.ABC):
    """``estimate(ctx, state, meta_step) -> (grads, metrics, state)``.

    ``grads`` is aligned with ``ctx.lopt.parameters()``; ``metrics["loss"]`` is the meta-objective
    the estimate saw (mean normalised loss over the steps it unrolled; for ES/PES, of the perturbed
    particles). ``state`` holds only tensors and plain values, and all randomness comes from
    generators seeded by (run seed, meta step), so a resumed run repeats an uninterrupted one.
    """

    truncated = False

    def init_state(self, ctx: MetaContext) -> dict[str, Any]:
        del ctx
        return {"tasks_drawn": 0}

    @abc.abstractmethod
    def estimate(self, ctx: MetaContext, state: dict[str, Any], meta_step: int
                 ) -> tuple[list[Tensor], dict[str, float], dict[str, Any]]:
        ...


class FullBPTT(GradientEstimator):
    """Backprop through whole inner runs of ``horizon`` steps on freshly drawn tasks.

    Args:
      second_order: keep ∂g/∂θ (the dependence of each inner gradient on θ) in the meta-gradient;
        exact, about twice the cost. ``False`` is the common first-order approximation.
    """

    def __init__(self, second_order: bool = True):
        self.second_order = bool(second_order)

    def estimate(self, ctx, state, meta_step):
        del meta_step
        phi = ctx.lopt.meta_params()
        runs = start_runs(ctx.family, ctx.lopt, phi, ctx.draw_seeds(state, ctx.tasks_per_step), ctx.horizon)
        _, seg, _ = unroll(ctx.family, ctx.lopt, phi, runs, ctx.horizon, differentiable=True,
                           second_order=self.second_order, cap=ctx.cap)
        loss = seg.mean()
        return _backward(ctx, loss), {"loss": float(loss.detach())}, state


class TruncatedBPTT(GradientEstimator):
    """Backprop through ``unroll``-step truncations of persistent inner runs.

    Args:
      second_order: as in :class:`FullBPTT`.
      stagger: spread the runs' restarts over the horizon.
    """

    truncated = True

    def __init__(self, second_order: bool = True, stagger: bool = True):
        self.second_order = bool(second_order)
        self.stagger = bool(stagger)

    def init_state(self, ctx):
        return {"tasks_drawn": 0, "runs": None}

    def estimate(self, ctx, state, meta_step):
        del meta_step
        phi = ctx.lopt.meta_params()
        if state["runs"] is None:
            seeds = ctx.draw_seeds(state, ctx.tasks_per_step)
            runs = start_runs(ctx.family, ctx.lopt, phi, seeds, _first_lengths(ctx, len(seeds), self.stagger))
        else:
            runs = Runs.from_state_dict(state["runs"])
            rows = _finished(runs).nonzero().squeeze(1)
            if len(rows):
                fresh = start_runs(ctx.family, ctx.lopt, phi, ctx.draw_seeds(state, len(rows)), ctx.horizon)
                runs = runs.replace_rows(rows, fresh)
        after, seg, _ = unroll(ctx.family, ctx.lopt, phi, runs, ctx.unroll, differentiable=True,
                               second_order=self.second_order, cap=ctx.cap)
        loss = seg.mean()
        grads = _backward(ctx, loss)
        state["runs"] = after.detach().state_dict()
        return grads, {"loss": float(loss.detach())}, state


class ES(GradientEstimator):
    """Antithetic evolution strategies over whole runs: one pair φ ± σε per task.

    ĝ = 1/(2σB) Σ_b ε_b (M(φ + σε_b) − M(φ − σε_b)), ε ~ N(0, I), the pair sharing task b.

    Args:
      sigma: perturbation scale σ.
    """

    def __init__(self, sigma: float = 0.01):
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        self.sigma = float(sigma)

    def estimate(self, ctx, state, meta_step):
        b = ctx.tasks_per_step
        z = ctx.noise("es-noise", meta_step, b)
        with torch.no_grad():
            phi_pm = perturbed(ctx, self.sigma * torch.cat([z, -z]))
            runs = start_runs(ctx.family, ctx.lopt, ctx.lopt.meta_params(), ctx.draw_seeds(state, b), ctx.horizon)
            runs = runs.repeat(2)
            runs.state = ctx.lopt.init_state(phi_pm, runs.theta)
            _, seg, _ = unroll(ctx.family, ctx.lopt, phi_pm, runs, ctx.horizon, cap=ctx.cap)
            g = ((seg[:b] - seg[b:]) / (2 * self.sigma)) @ z / b
        return unflat(ctx, g), {"loss": float(seg.mean())}, state


class PES(GradientEstimator):
    """Persistent ES over ``unroll``-step truncations: unbiased across truncations.

    Each task slot holds an antithetic pair of inner runs, φ + σε_τ and φ − σε_τ with a fresh ε_τ
    at every truncation τ, and the sum ξ = Σ_{τ' ≤ τ} ε_τ' since the run started. The estimate
    from truncation τ is ĝ = 1/(2σB) Σ_b ξ_b (M⁺_b − M⁻_b), M± the pair's mean normalised loss over
    the truncation. Because ξ carries the perturbations that shaped the state the truncation
    starts from, the average of a run's truncation estimates is unbiased for the gradient of its
    whole (smoothed) meta-objective, the mean over the run (each truncation estimates the gradient
    of its own K-step mean), which truncated BPTT is not.

    Args:
      sigma: perturbation scale σ.
      stagger: spread the runs' restarts over the horizon.
    """

    truncated = True

    def __init__(self, sigma: float = 0.01, stagger: bool = True):
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        self.sigma = float(sigma)
        self.stagger = bool(stagger)

    def init_state(self, ctx):
        return {"tasks_drawn": 0, "runs": None, "xi": None}

    def estimate(self, ctx, state, meta_step):
        b = ctx.tasks_per_step
        z = ctx.noise("pes-noise", meta_step, b)
        with torch.no_grad():
            phi_pm = perturbed(ctx, self.sigma * torch.cat([z, -z]))
            phi = ctx.lopt.meta_params()
            if state["runs"] is None:
                seeds = ctx.draw_seeds(state, b)
                runs = start_runs(ctx.family, ctx.lopt, phi, seeds, _first_lengths(ctx, b, self.stagger)).repeat(2)
                runs.state = ctx.lopt.init_state(phi_pm, runs.theta)
                xi = torch.zeros_like(z)
            else:
                runs = Runs.from_state_dict(state["runs"])
                xi = state["xi"]
                done = _finished(runs)
                rows = (done[:b] | done[b:]).nonzero().squeeze(1)
                if len(rows):
                    fresh = start_runs(ctx.family, ctx.lopt, phi, ctx.draw_seeds(state, len(rows)), ctx.horizon)
                    both = torch.cat([rows, rows + b])
                    pair = fresh.repeat(2)
                    pair.state = ctx.lopt.init_state({k: v[both] for k, v in phi_pm.items()}, pair.theta)
                    runs = runs.replace_rows(both, pair)
                    xi = xi.index_put((rows,), torch.zeros_like(xi[rows]))
            xi = xi + z
            after, seg, _ = unroll(ctx.family, ctx.lopt, phi_pm, runs, ctx.unroll, cap=ctx.cap)
            g = ((seg[:b] - seg[b:]) / (2 * self.sigma)) @ xi / b
        state["runs"] = after.state_dict()
        state["xi"] = xi
        return unflat(ctx, g), {"loss": float(seg.mean())}, state
