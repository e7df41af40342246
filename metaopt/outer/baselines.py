"""Hand-designed optimizers in the functional form of the inner runs, tuned over a learning-rate grid.

Meta-evaluation compares a learned optimizer with these on the same held-out tasks and the same
normalised-loss objective. Each is the textbook rule with torch.optim's conventions (checked
against ``torch.optim`` in the tests), written over ``[P, n]`` tensors so a whole set of tasks runs
as one batch. ``phi = {"lr": tensor}`` carries the learning rate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from metaopt.outer.families import TaskFamily
from metaopt.outer.unroll import State, evaluate

log = logging.getLogger("metaopt")


class Baseline:
    """A hand-designed optimizer and its learning-rate grid (``num_lrs`` log-spaced in [lr_min, lr_max])."""

    name = "baseline"

    def __init__(self, lr_min: float = 1e-3, lr_max: float = 1.0, num_lrs: int = 7):
        if not 0 < lr_min <= lr_max:
            raise ValueError(f"need 0 < lr_min <= lr_max, got {lr_min}, {lr_max}")
        if isinstance(num_lrs, bool) or not isinstance(num_lrs, int) or num_lrs < 1:
            raise ValueError(f"num_lrs must be a positive integer, got {num_lrs!r}")
        self.lrs = torch.logspace(math.log10(lr_min), math.log10(lr_max), num_lrs, dtype=torch.float64).tolist()

    def init_state(self, phi: dict[str, Tensor], theta: Tensor) -> State:
        del phi, theta
        return {}

    def update(self, phi: dict[str, Tensor], state: State, theta: Tensor, grad: Tensor) -> tuple[Tensor, State]:
        raise NotImplementedError


class SGD(Baseline):
    """θ ← θ − α g."""

    name = "sgd"

    def update(self, phi, state, theta, grad):
        return -phi["lr"] * grad, state


class Momentum(Baseline):
    """Heavy-ball momentum (Polyak 1964), torch.optim.SGD's form: b ← β b + g; θ ← θ − α b."""

    name = "momentum"

    def __init__(self, beta: float = 0.9, **grid: Any):
        super().__init__(**grid)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)

    def init_state(self, phi, theta):
        return {"b": torch.zeros_like(theta)}

    def update(self, phi, state, theta, grad):
        b = self.beta * state["b"] + grad
        return -phi["lr"] * b, {"b": b}


class Adam(Baseline):
    """Adam (Kingma & Ba 2015) with bias correction, ε outside the square root (torch.optim.Adam)."""

    name = "adam"

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, **grid: Any):
        super().__init__(**grid)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)

    def init_state(self, phi, theta):
        return {"m": torch.zeros_like(theta), "v": torch.zeros_like(theta), "step": theta.new_zeros(theta.shape[0])}

    def update(self, phi, state, theta, grad):
        t = state["step"] + 1
        m = self.beta1 * state["m"] + (1 - self.beta1) * grad
        v = self.beta2 * state["v"] + (1 - self.beta2) * grad.square()
        m_hat = m / (1 - self.beta1 ** t).unsqueeze(-1)
        v_hat = v / (1 - self.beta2 ** t).unsqueeze(-1)
        return -phi["lr"] * m_hat / (v_hat.sqrt() + self.eps), {"m": m, "v": v, "step": t}


class RMSProp(Baseline):
    """RMSProp (Tieleman & Hinton 2012), torch.optim.RMSprop's form: v ← α v + (1−α) g²; θ ← θ − lr g/(√v + ε)."""

    name = "rmsprop"

    def __init__(self, alpha: float = 0.99, eps: float = 1e-8, **grid: Any):
        super().__init__(**grid)
        self.alpha, self.eps = float(alpha), float(eps)

    def init_state(self, phi, theta):
        return {"v": torch.zeros_like(theta)}

    def update(self, phi, state, theta, grad):
        v = self.alpha * state["v"] + (1 - self.alpha) * grad.square()
        return -phi["lr"] * grad / (v.sqrt() + self.eps), {"v": v}


def tune(baseline: Baseline, family: TaskFamily, seeds: Sequence[int], horizon: int, cap: float) -> dict[str, Any]:
    """Evaluate every learning rate of the grid on the tasks; keep the best by mean normalised loss.

    The grid is searched on the evaluation tasks themselves, the most favourable tuning a baseline
    can get. A best value at an edge of the grid is logged: the grid should be widened.
    """
    grid = []
    best: dict[str, Any] | None = None
    for lr in baseline.lrs:
        result = evaluate(family, baseline, {"lr": torch.tensor(lr, device=family.device)}, list(seeds),
                          horizon, cap)
        grid.append({"lr": lr, "mean": result["mean"], "final": result["final"]})
        if best is None or result["mean"] < best["mean"]:
            best = {"lr": lr, **result}
    assert best is not None
    if len(baseline.lrs) > 1 and best["lr"] in (baseline.lrs[0], baseline.lrs[-1]):
        log.warning("baseline %s: best learning rate %.3g is at the edge of its grid [%.3g, %.3g]; widen it",
                    baseline.name, best["lr"], baseline.lrs[0], baseline.lrs[-1])
    best.pop("per_task", None)
    return {**best, "grid": grid}
