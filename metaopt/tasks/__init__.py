"""Training problems. Each is a :class:`Task` built from ``conf/task/<name>.yaml``."""

from metaopt.tasks.base import Task
from metaopt.tasks.classification import Digits, Mnist1D, Mnist1DCNN, ResNetCIFAR10, TwoMoons
from metaopt.tasks.supervised import SupervisedTask
from metaopt.tasks.synthetic import LinearRegression, NoisyQuadratic, Rosenbrock

__all__ = [
    "Task",
    "SupervisedTask",
    "NoisyQuadratic",
    "Rosenbrock",
    "LinearRegression",
    "TwoMoons",
    "Mnist1D",
    "Mnist1DCNN",
    "Digits",
    "ResNetCIFAR10",
]
