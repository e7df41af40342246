"""Seeding and argument checks shared by the tasks.

Every random choice a task makes (its data, its initial parameters, the order of minibatches, the
augmentation of a batch, the drift of a moving optimum) comes from its own generator seeded by
:func:`derive_seed` from the run seed and a tag. Streams then never share state, so adding a random
choice in one place cannot shift another, and step ``t`` needs nothing but ``(seed, t)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def derive_seed(seed: int, *tags: Any) -> int:
    """A 63-bit seed for the stream named by ``tags`` (e.g. ``("epoch", 3)``) of run ``seed``.

    A cryptographic hash rather than ``seed + step``: neighbouring runs would otherwise share
    streams shifted by one (run 0 at step 1 equal to run 1 at step 0).
    """
    text = repr((int(seed),) + tuple(tags)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(seed: int, *tags: Any, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh generator on ``device`` seeded with :func:`derive_seed`.

    Drawing on the device keeps the training loop free of host-to-device copies; the price is that
    CPU and CUDA runs of one seed see different (equally valid) batch orders.
    """
    return torch.Generator(device=torch.device(device)).manual_seed(derive_seed(seed, *tags))


@contextlib.contextmanager
def seeded_init(seed: int, *tags: Any) -> Iterator[None]:
    """Build modules under a private CPU seed, leaving the global RNG as it was.

    The loop seeds the global RNG before building a task, but a task built directly (tests,
    notebooks) should still get the same initial weights for the same seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *tags))
        yield


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value: Any, minimum: int = 1) -> int | None:
    return None if value is None else check_int(name, value, minimum)


def check_float(name: str, value: Any, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    return float(value)


def check_int_list(name: str, value: Any, *, allow_empty: bool = True) -> list[int]:
    """Layer widths from a YAML list (Hydra passes a ``ListConfig``)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        try:
            value = list(value)
        except TypeError:
            raise ValueError(f"{name} must be a list of positive integers, got {value!r}") from None
    widths = list(value)
    if not allow_empty and not widths:
        raise ValueError(f"{name} must be a non-empty list of positive integers, got []")
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"{name} must be a list of positive integers, got {list(value)!r}")
    return [int(w) for w in widths]
