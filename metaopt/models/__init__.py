"""Models of the tasks, written for the small problems optimizer research runs many times."""

from metaopt.models.cnn1d import CNN1D
from metaopt.models.mlp import MLP
from metaopt.models.resnet import BasicBlock, ResNetCIFAR

__all__ = ["MLP", "CNN1D", "ResNetCIFAR", "BasicBlock"]
