"""The task contract: what the training loop needs from a problem.

A task owns its model (``task.model``, an ``nn.Module`` whose parameters are optimised), its data
on the target device, and its evaluation. Minibatches are a pure function of ``(seed, step)`` so a
resumed run sees exactly the batches an uninterrupted one would, without saving iterator state.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

Batch = Any


class Task(abc.ABC):
    """A training problem.

    Subclasses set ``self.model`` in ``__init__`` and implement :meth:`batch`, :meth:`loss` and
    :meth:`evaluate`. ``splits`` lists the evaluation splits the task has, in the order
    ``("validation", "test")``; the loop evaluates ``validation`` periodically and ``test`` once at
    the end when present. ``is_classifier`` tasks report ``accuracy`` besides ``loss``.
    """

    model: nn.Module
    splits: tuple[str, ...] = ("validation",)
    is_classifier: bool = False

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu"):
        self.seed = int(seed)
        self.device = torch.device(device)

    @abc.abstractmethod
    def batch(self, step: int) -> Batch:
        """The training minibatch for ``step``, on ``self.device``; deterministic in (seed, step)."""

    @abc.abstractmethod
    def loss(self, batch: Batch) -> torch.Tensor:
        """Scalar training loss of ``self.model`` on ``batch`` (model in train mode)."""

    @abc.abstractmethod
    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of ``self.model`` on a split: ``{"loss": ..., "accuracy": ...}`` (no grad, eval mode)."""

    def advance(self, step: int) -> None:  # noqa: B027 - optional hook, no-op by default
        """Called after optimizer step ``step``; non-stationary tasks move their problem here."""

    def state_dict(self) -> dict[str, Any]:
        """Task state beyond the model's parameters (e.g. a moving optimum); tensors and plain types."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
