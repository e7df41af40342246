"""The learned-optimizer contract: meta-parameters φ that define an update rule.

A learned optimizer is an ``nn.Module`` whose parameters are the meta-parameters φ. Its update rule
is a plain function of explicit tensors, so an inner training run written with it is an ordinary
differentiable computation of φ (backprop through the unroll) and can be evaluated for many φ at
once (evolution strategies):

    state = opt.init_state(phi, theta)
    delta, state = opt.update(phi, state, theta, grad)      # θ ← θ + Δθ

Shapes. ``theta`` and ``grad`` are ``[P, n]``: P independent inner runs (tasks, perturbed
particles), each a flat vector of n coordinates. Every entry of ``phi`` has either its parameter's
own shape (one φ shared by all runs) or one extra leading axis of size P (one φ per run). State
tensors are ``[P]`` (one value per run, e.g. a step counter) or ``[P, n, ...]`` (per coordinate);
the drop-in ``torch.optim`` wrapper (:class:`metaopt.learned.Learned`) relies on that convention
to split state by parameter.

The structure follows learned_optimization (Metz et al., "Practical tradeoffs between memory,
compute, and performance in learned optimizers", CoLLAs 2022): a learned optimizer maps
meta-parameters to an ordinary optimizer; here that ordinary optimizer is the pair of functions
above with φ bound.
"""

from __future__ import annotations

import abc
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metaopt.runfiles import atomic_write_bytes

State = dict[str, Tensor]
Phi = dict[str, Tensor]

LOPT_FILE = "lopt.pt"
_FORMAT = "metaopt.lopt/1"


class LearnedOptimizer(nn.Module, abc.ABC):
    """Meta-parameters φ (this module's parameters) and the update rule they define."""

    def meta_params(self) -> Phi:
        """φ by name: the tensors :meth:`update` reads (this module's own parameters)."""
        return dict(self.named_parameters())

    def config(self) -> dict[str, Any]:
        """Constructor arguments (plain types): with the class name they rebuild the architecture."""
        return dict(self._config)

    def batched(self, phi: Phi, name: str) -> bool:
        """Whether ``phi[name]`` carries a leading per-run axis."""
        return phi[name].dim() == getattr(self, name).dim() + 1

    @abc.abstractmethod
    def init_state(self, phi: Phi, theta: Tensor) -> State:
        """Optimizer state for runs starting at ``theta`` ``[P, n]``."""

    @abc.abstractmethod
    def update(self, phi: Phi, state: State, theta: Tensor, grad: Tensor) -> tuple[Tensor, State]:
        """``(Δθ, next state)`` for the runs at ``theta`` with gradient ``grad`` (both ``[P, n]``)."""


class RecurrentLearnedOptimizer(LearnedOptimizer):
    """A learned optimizer whose per-coordinate state is the hidden state h of a recurrent cell.

    Every coordinate runs the same dynamics, ``x = encode(g)``, ``h ← cell(h, x)``,
    ``Δθ = readout(h)``, from ``h = initial_state()``. The four public methods use this module's
    current meta-parameters and take any leading batch shape (a single coordinate: ``h`` ``[H]``,
    ``x`` ``[D]``, update a scalar), so analysis tools can treat them as plain functions (fixed
    points, linearisation; Maheswaranathan et al., "Reverse engineering learned optimizers reveals
    known and novel mechanisms", NeurIPS 2021). Subclasses implement the ``_cell``, ``_readout``
    and ``_initial_state`` forms that take φ explicitly; :meth:`update` is built from them.
    """

    hidden_size: int
    input_size: int

    @abc.abstractmethod
    def encode(self, g: Tensor) -> Tensor:
        """Network input of each coordinate from its gradient: ``[...]`` → ``[..., input_size]``."""

    @abc.abstractmethod
    def _cell(self, phi: Phi, h: Tensor, x: Tensor) -> Tensor:
        """``h_next`` ``[P, n, H]`` (or unbatched ``[..., H]`` with shared φ)."""

    @abc.abstractmethod
    def _readout(self, phi: Phi, h: Tensor) -> Tensor:
        """Δθ ``[P, n]`` from ``h`` ``[P, n, H]`` (or ``[...]`` from ``[..., H]`` with shared φ)."""

    @abc.abstractmethod
    def _initial_state(self, phi: Phi) -> Tensor:
        """h_0: ``[H]``, or ``[P, H]`` with per-run φ."""

    def cell(self, h: Tensor, x: Tensor) -> Tensor:
        """``h_next = F(h, x)`` with the current meta-parameters."""
        return self._cell(self.meta_params(), h, x)

    def readout(self, h: Tensor) -> Tensor:
        """The coordinate's update Δθ read from its (new) hidden state."""
        return self._readout(self.meta_params(), h)

    def initial_state(self) -> Tensor:
        """h_0, ``[H]``."""
        return self._initial_state(self.meta_params())

    def init_state(self, phi: Phi, theta: Tensor) -> State:
        h0 = self._initial_state(phi)
        p, n = theta.shape
        h0 = h0.unsqueeze(-2) if h0.dim() == 2 else h0
        return {"h": h0.expand(p, n, self.hidden_size).to(theta.dtype)}

    def update(self, phi: Phi, state: State, theta: Tensor, grad: Tensor) -> tuple[Tensor, State]:
        del theta
        h = self._cell(phi, state["h"], self.encode(grad))
        return self._readout(phi, h), {"h": h}


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` that also takes per-run weights: ``x`` ``[P, ..., in]``, ``weight`` ``[P, out, in]``."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    p = weight.shape[0]
    flat = x.reshape(p, -1, x.shape[-1])
    y = torch.bmm(flat, weight.transpose(1, 2)) if bias is None else \
        torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return y.reshape(*x.shape[:-1], weight.shape[1])


def lopt_path(path: str | os.PathLike) -> Path:
    """A ``lopt.pt`` file, or a run directory that holds one."""
    path = Path(path).expanduser()
    return path / LOPT_FILE if path.is_dir() else path


def save_lopt(lopt: LearnedOptimizer, path: str | os.PathLike, **info: Any) -> Path:
    """Write meta-trained weights with what rebuilds the architecture (class path + config)."""
    path = Path(path)
    cls = type(lopt)
    state = {
        "format": _FORMAT,
        "target": f"{cls.__module__}.{cls.__qualname__}",
        "config": lopt.config(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in lopt.state_dict().items()},
        "info": info,
    }
    atomic_write_bytes(path, lambda fh: torch.save(state, fh))
    return path


def read_lopt(path: str | os.PathLike) -> dict[str, Any]:
    """The raw contents of a ``lopt.pt`` (``target``, ``config``, ``state_dict``, ``info``)."""
    file = lopt_path(path)
    if not file.is_file():
        raise ValueError(f"checkpoint: no learned-optimizer weights at {file} (expected a lopt.pt "
                         "written by meta-training, or the run directory holding it)")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:  # a text file, a torn write, ...
        raise ValueError(f"checkpoint: {file} is not a learned-optimizer file ({_FORMAT}): "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"checkpoint: {file} is not a learned-optimizer file ({_FORMAT}); "
                         "a training checkpoint.pt holds no meta-trained weights")
    return data


def load_into(lopt: LearnedOptimizer, path: str | os.PathLike) -> LearnedOptimizer:
    """A copy of ``lopt`` with the weights of ``lopt.pt``, whose architecture must be ``lopt``'s."""
    import copy

    data = read_lopt(path)
    cls = type(lopt)
    target = f"{cls.__module__}.{cls.__qualname__}"
    if data["target"] != target or data["config"] != lopt.config():
        raise ValueError(f"checkpoint: {lopt_path(path)} holds {data['target']}({data['config']}), not the "
                         f"configured {target}({lopt.config()}); use optimizer=learned to take the "
                         "architecture from the checkpoint")
    lopt = copy.deepcopy(lopt)
    lopt.load_state_dict(data["state_dict"])
    return lopt


def load_lopt(path: str | os.PathLike) -> LearnedOptimizer:
    """Rebuild a learned optimizer from ``lopt.pt`` (or a run directory holding one)."""
    from hydra.utils import get_class

    data = read_lopt(path)
    cls = get_class(data["target"])
    if not (isinstance(cls, type) and issubclass(cls, LearnedOptimizer)):
        raise ValueError(f"checkpoint: {data['target']} is not a LearnedOptimizer")
    lopt = cls(**data["config"])
    lopt.load_state_dict(data["state_dict"])
    return lopt
