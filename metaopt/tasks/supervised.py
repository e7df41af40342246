"""A base for tasks that learn from a fixed dataset held as tensors on the device.

It owns what every such task shares: the splits, minibatching as a pure function of
``(seed, step)``, chunked evaluation, and the cross-entropy/accuracy of classifiers. Subclasses load
their data, build their model, and override :meth:`SupervisedTask.prepare` (input transforms,
augmentation) or :meth:`SupervisedTask.criterion` (regression losses) where they differ.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from metaopt.tasks._common import check_int, check_optional_int, generator
from metaopt.tasks.base import Task

Split = tuple[torch.Tensor, torch.Tensor]


class SupervisedTask(Task):
    """Minibatch training on ``(inputs, targets)`` pairs.

    Batching: each epoch is a permutation of the training set drawn from a generator seeded by
    ``(seed, "epoch", epoch)``; step ``t`` takes the ``t mod steps_per_epoch``-th slice of
    ``batch_size`` indices, dropping the last incomplete batch so every batch has the same size.
    ``batch_size=None`` means full batch: every step sees the whole training set in a fixed order.

    Subclasses call ``super().__init__(...)``, then :meth:`set_data` and set ``self.model``.
    """

    is_classifier = True

    def __init__(
        self,
        batch_size: int | None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        eval_batch_size: int = 1024,
        allow_full_batch: bool = False,
    ):
        super().__init__(seed=seed, device=device)
        if batch_size is None and not allow_full_batch:
            raise ValueError("batch_size must be a positive integer, got None")
        self.batch_size = check_optional_int("batch_size", batch_size)
        self.eval_batch_size = check_int("eval_batch_size", eval_batch_size)
        self.data: dict[str, Split] = {}
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    # -- data --------------------------------------------------------------------------------

    def set_data(self, train: Split, validation: Split, test: Split | None = None) -> None:
        """Install the splits (moved to the device); ``test=None`` for tasks without one."""
        self.data = {"train": train, "validation": validation}
        if test is not None:
            self.data["test"] = test
        self.data = {k: (x.to(self.device), y.to(self.device)) for k, (x, y) in self.data.items()}
        self.splits = ("validation", "test") if test is not None else ("validation",)
        n = self.num_train
        if self.batch_size is not None and self.batch_size > n:
            raise ValueError(f"batch_size must be at most the training set size {n}, got {self.batch_size}")
        self._perm_epoch, self._perm = -1, None

    @property
    def num_train(self) -> int:
        return int(self.data["train"][0].shape[0])

    @property
    def steps_per_epoch(self) -> int:
        return 1 if self.batch_size is None else self.num_train // self.batch_size

    def _epoch_permutation(self, epoch: int) -> torch.Tensor:
        # One randperm per epoch, cached: consecutive steps of an epoch reuse it.
        if epoch != self._perm_epoch:
            g = generator(self.seed, "epoch", epoch, device=self.device)
            self._perm = torch.randperm(self.num_train, generator=g, device=self.device)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def batch(self, step: int) -> Split:
        x, y = self.data["train"]
        if self.batch_size is None:
            return self.prepare(x, step), y
        epoch, within = divmod(int(step), self.steps_per_epoch)
        idx = self._epoch_permutation(epoch)[within * self.batch_size:(within + 1) * self.batch_size]
        return self.prepare(x[idx], step), y[idx]

    def prepare(self, x: torch.Tensor, step: int | None) -> torch.Tensor:
        """Turn stored inputs into model inputs; ``step`` is None at evaluation (no augmentation)."""
        del step
        return x

    # -- loss and metrics --------------------------------------------------------------------

    def criterion(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of ``output`` against ``target``: cross-entropy for classifiers."""
        return F.cross_entropy(output, target)

    def loss(self, batch: Split) -> torch.Tensor:
        x, y = batch
        return self.criterion(self.model(x), y)

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        if split not in self.splits:
            raise ValueError(f"split must be one of {self.splits}, got {split!r}")
        x_all, y_all = self.data[split]
        n = int(x_all.shape[0])
        model: nn.Module = self.model
        was_training = model.training
        model.eval()
        try:
            # Sums stay on the device; one transfer at the end instead of one per chunk.
            loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
            correct = torch.zeros((), device=self.device, dtype=torch.int64)
            for start in range(0, n, self.eval_batch_size):
                x = self.prepare(x_all[start:start + self.eval_batch_size], None)
                y = y_all[start:start + self.eval_batch_size]
                out = model(x)
                loss_sum += self.criterion(out, y).double() * y.shape[0]
                if self.is_classifier:
                    correct += (out.argmax(dim=-1) == y).sum()
        finally:
            model.train(was_training)
        metrics = {"loss": loss_sum.item() / n}
        if self.is_classifier:
            metrics["accuracy"] = correct.item() / n
        return metrics
