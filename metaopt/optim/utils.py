"""Helpers that inspect any ``torch.optim.Optimizer``, and small pieces the optimizers share."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        if not obj.numel():
            return 0
        # Views into one flat buffer (MetaOptimize's traces) are counted once, as the whole buffer.
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def shared_hyperparameters(param_groups: list[dict[str, Any]], names: Iterable[str], reason: str) -> dict[str, Any]:
    """Values of optimizer-wide hyperparameters, which every parameter group must agree on.

    Raises ``ValueError("Invalid <name>: ... in parameter group i differs from ... in group 0 (<reason>)")``.
    """
    first = param_groups[0]
    names = tuple(names)
    for i, group in enumerate(param_groups[1:], start=1):
        for name in names:
            if group[name] != first[name]:
                raise ValueError(f"Invalid {name}: {group[name]!r} in parameter group {i} differs from "
                                 f"{first[name]!r} in group 0 ({reason})")
    return {name: first[name] for name in names}


@contextmanager
def rejected_group_removed(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Around ``add_param_group`` plus its checks: a group that fails them is taken out again.

    ``torch.optim.Optimizer.add_param_group`` appends before an optimizer can check a group against
    the others; a ValueError that left the group in place would let the next ``step`` use it.
    """
    count = len(optimizer.param_groups)
    try:
        yield
    except BaseException:
        del optimizer.param_groups[count:]
        raise


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensors held in the optimizer's state (not the parameters themselves).

    Optimizers that keep tensors outside ``optimizer.state`` (a preconditioner network, a
    meta-optimizer) report them through an ``extra_state_bytes()`` method, which is added.
    """
    total = _tensor_bytes(list(optimizer.state.values()), set())
    extra = getattr(optimizer, "extra_state_bytes", None)
    if callable(extra):
        total += int(extra())
    return total


def flat_views(flat: torch.Tensor, like: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Views of consecutive pieces of the 1-D ``flat``, shaped as the tensors of ``like`` in order."""
    views, start = [], 0
    for p in like:
        n = p.numel()
        views.append(flat[start:start + n].view(p.shape))
        start += n
    return views
