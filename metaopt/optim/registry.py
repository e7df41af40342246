"""One registry of every optimizer metaopt offers, baselines included.

The contract test suite (``tests/test_optim_contract.py``) runs every entry; the training loop asks
it whether an optimizer needs a closure. Adding an optimizer is one class, one YAML file under
``conf/optimizer/`` and one :func:`register` line in ``metaopt/optim/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build and test one optimizer.

    Attributes:
      name: registry key, equal to the ``conf/optimizer/<name>.yaml`` file name.
      cls: the ``torch.optim.Optimizer`` subclass.
      kwargs: constructor arguments for the contract tests (small problems, a few hundred steps).
      needs_closure: ``step`` must be given a closure (LBFGS, line searches).
      invalid: ``(kwargs, pattern)`` pairs; each kwargs must make ``__init__`` raise ``ValueError``
        whose message matches ``pattern`` (a regex naming the argument).
      supports_param_groups: per-group hyperparameters are honoured.
    """

    name: str
    cls: type[torch.optim.Optimizer]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    needs_closure: bool = False
    invalid: tuple[tuple[Mapping[str, Any], str], ...] = ()
    supports_param_groups: bool = True


REGISTRY: dict[str, OptimizerSpec] = {}


def register(name: str, cls: type[torch.optim.Optimizer], **spec: Any) -> OptimizerSpec:
    if name in REGISTRY:
        raise ValueError(f"optimizer {name!r} is already registered")
    entry = OptimizerSpec(name=name, cls=cls, **spec)
    REGISTRY[name] = entry
    return entry


def requires_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` must be called with a closure.

    A class can declare it with a ``requires_closure = True`` attribute; classes metaopt does not
    own (``torch.optim.LBFGS``) are looked up in the registry.
    """
    declared = getattr(type(optimizer), "requires_closure", None)
    if declared is not None:
        return bool(declared)
    return any(spec.needs_closure and isinstance(optimizer, spec.cls) for spec in REGISTRY.values())


def set_mode(optimizer: torch.optim.Optimizer, mode: str) -> None:
    """Switch an optimizer that keeps separate training and evaluation weights to ``mode``.

    Schedule-Free optimizers (Defazio et al., NeurIPS 2024) take gradients at an interpolation of
    the iterate and its average but must be evaluated at the average; they expose ``train()`` and
    ``eval()``, which the training loop calls around every evaluation. Optimizers without them are
    left alone. ``mode`` is ``"train"`` or ``"eval"``.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")
    switch = getattr(optimizer, mode, None)
    if callable(switch):
        switch()
