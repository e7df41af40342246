"""Meta-training of learned optimizers: task families, gradient estimators, the outer trainer.

- :mod:`metaopt.outer.families`: :class:`TaskFamily` (``sample`` a batch of tasks; loss vectorised
  over the task axis), chosen by the configured task's class.
- :mod:`metaopt.outer.unroll`: batched inner runs and the normalised-loss meta-objective.
- :mod:`metaopt.outer.estimators`: :class:`FullBPTT`, :class:`TruncatedBPTT`, :class:`ES`,
  :class:`PES` behind one interface.
- :mod:`metaopt.outer.baselines`: tuned hand-designed optimizers for meta-evaluation.
- :mod:`metaopt.outer.trainer`: :class:`MetaTrainer`, the ``meta=`` config group's target.
"""

from metaopt.outer.baselines import SGD, Adam, Baseline, Momentum, RMSProp, tune
from metaopt.outer.estimators import (
    ES,
    PES,
    FullBPTT,
    GradientEstimator,
    MetaContext,
    TruncatedBPTT,
)
from metaopt.outer.families import (
    FunctionFamily,
    SupervisedFamily,
    TaskFamily,
    build_family,
    register_family,
)
from metaopt.outer.trainer import MetaTrainer
from metaopt.outer.unroll import Runs, evaluate, start_runs, unroll

__all__ = [
    "ES", "PES", "SGD", "Adam", "Baseline", "FullBPTT", "FunctionFamily", "GradientEstimator", "MetaContext",
    "MetaTrainer", "Momentum", "RMSProp", "Runs", "SupervisedFamily", "TaskFamily", "TruncatedBPTT",
    "build_family", "evaluate", "register_family", "start_runs", "tune", "unroll",
]
