"""Small helpers on ``nn.Module`` shared by the loop and by closure optimizers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Run forwards in train mode without moving BatchNorm running statistics.

    Line searches evaluate the loss at a trial point on the same minibatch; in train mode each such
    forward would update the running mean/var again. Inside this context the statistics and
    ``num_batches_tracked`` are restored on exit, so they move once per optimizer step.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, _NORM_TYPES) and m.track_running_stats and m.training:
            saved.append((m, [b.detach().clone() if b is not None else None
                              for b in (m.running_mean, m.running_var, m.num_batches_tracked)]))
    try:
        yield
    finally:
        for m, (mean, var, count) in saved:
            for buf, val in ((m.running_mean, mean), (m.running_var, var), (m.num_batches_tracked, count)):
                if buf is not None and val is not None:
                    buf.copy_(val)
