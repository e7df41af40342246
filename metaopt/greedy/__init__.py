"""Greedy optimizer design (Lee & Lee, arXiv 2512.06370): optimizers and their hyperparameters
as maximisers of the expected loss-drop rate, given the gradient statistics.

- :mod:`metaopt.greedy.statistics`: gradient autocorrelations at lags 0..K, estimated with EMAs;
  AR(1) streams with known statistics.
- :mod:`metaopt.greedy.problems`: the design problems per family of optimizers, with their closed
  forms or small numeric solves.

The online optimizers that re-solve these problems during training are
:class:`metaopt.optim.GreedySGD` and :class:`metaopt.optim.GreedyAdam`.
"""

from metaopt.greedy.problems import (
    MomentumSolution,
    ar1_optimal_momentum,
    diagonal_optimizer,
    free_filter,
    frobenius_optimizer,
    geometric_tail,
    lyapunov_optimizer,
    momentum_learning_rate,
    momentum_motion_energy,
    momentum_objective,
    momentum_series,
    motion_budget_filter,
    optimal_momentum,
    scalar_optimizer,
    spectral_optimizer,
    whitening_optimizer,
)
from metaopt.greedy.statistics import (
    LagAutocorrelation,
    ar1_autocorrelation,
    ar1_stream,
    ema_debiased,
    lag_order,
    lag_products,
)

__all__ = [
    "LagAutocorrelation",
    "MomentumSolution",
    "ar1_autocorrelation",
    "ar1_optimal_momentum",
    "ar1_stream",
    "diagonal_optimizer",
    "ema_debiased",
    "free_filter",
    "frobenius_optimizer",
    "geometric_tail",
    "lag_order",
    "lag_products",
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
