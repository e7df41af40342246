"""Schedule-Free AdamW (Defazio et al., "The Road Less Scheduled", NeurIPS 2024), strictly checked.

The ``schedulefree`` package (optional extra: ``pip install 'metaopt[peers]'``) accepts any
argument; this subclass only adds the ``ValueError`` checks of metaopt's optimizer contract. The
update is the package's, unchanged: gradients at y = (1−β₁)z + β₁x, z ← z − γ·g/√v̂, x the running
average of z weighted by γ^weight_lr_power; evaluation must see x (``eval()``), training y
(``train()``), which the loop switches (:func:`metaopt.optim.registry.set_mode`).
"""

from __future__ import annotations

from schedulefree import AdamWScheduleFree


class ScheduleFreeAdamW(AdamWScheduleFree):
    def __init__(self, params, lr: float = 2.5e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 foreach: bool | None = True):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps value: {warmup_steps}")
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power, foreach=foreach)
