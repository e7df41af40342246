"""Learning-rate schedules as multiplicative factors on each group's initial ``lr``.

Each schedule is a small picklable callable ``factor(step) -> float`` wrapped in ``LambdaLR`` so
its state round-trips through ``state_dict()``. Configs under ``conf/scheduler/`` target the
constructor functions here with ``_partial_: true``; the loop passes the optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR


def _check_lr(optimizer: torch.optim.Optimizer, name: str) -> None:
    if any("lr" not in g for g in optimizer.param_groups):
        raise ValueError(f"scheduler={name}: optimizer {type(optimizer).__name__} has no 'lr' to schedule; "
                         "use scheduler=constant")


def constant(optimizer: torch.optim.Optimizer) -> None:
    """No schedule: every group keeps its ``lr``. Returns ``None`` so the loop does no work."""
    del optimizer
    return None


@dataclass
class CosineFactor:
    """Cosine decay from 1 to ``final_factor`` over ``total_steps`` after ``warmup_steps`` of linear warm-up
    (Loshchilov & Hutter 2017, without restarts)."""

    total_steps: int
    warmup_steps: int = 0
    final_factor: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.final_factor + (1 - self.final_factor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StepFactor:
    """Multiply by ``gamma`` at each step in ``milestones`` (the classic ResNet schedule)."""

    milestones: list[int]
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        return self.gamma ** sum(step >= m for m in self.milestones)


def _validate(total_steps: int, warmup_steps: int = 0, final_factor: float = 0.0) -> None:
    if total_steps <= 0:
        raise ValueError(f"scheduler.total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"scheduler.warmup_steps must be in [0, total_steps), got {warmup_steps}")
    if final_factor < 0:
        raise ValueError(f"scheduler.final_factor must be >= 0, got {final_factor}")


def cosine(optimizer: torch.optim.Optimizer, total_steps: int, final_factor: float = 0.0) -> LambdaLR:
    _check_lr(optimizer, "cosine")
    _validate(total_steps, 0, final_factor)
    return LambdaLR(optimizer, CosineFactor(int(total_steps), 0, float(final_factor)))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05,
                  final_factor: float = 0.0) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of ``total_steps``, then cosine decay."""
    _check_lr(optimizer, "warmup_cosine")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"scheduler.warmup_fraction must be in [0, 1), got {warmup_fraction}")
    warmup_steps = int(round(warmup_fraction * total_steps))
    _validate(total_steps, warmup_steps, final_factor)
    return LambdaLR(optimizer, CosineFactor(int(total_steps), warmup_steps, float(final_factor)))


def step(optimizer: torch.optim.Optimizer, total_steps: int, milestones: list[float],
         gamma: float = 0.1) -> LambdaLR:
    """Multiply ``lr`` by ``gamma`` at each milestone, given as a fraction of ``total_steps``."""
    _check_lr(optimizer, "step")
    _validate(total_steps)
    if not 0 < gamma:
        raise ValueError(f"scheduler.gamma must be > 0, got {gamma}")
    if any(not 0 < m < 1 for m in milestones):
        raise ValueError(f"scheduler.milestones must be fractions of training in (0, 1), got {list(milestones)}")
    steps = sorted(int(round(m * total_steps)) for m in milestones)
    return LambdaLR(optimizer, StepFactor(steps, float(gamma)))
