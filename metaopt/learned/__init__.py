"""Learned optimizers: meta-parameters φ that define an update rule.

- :class:`LearnedOptimizer`: the contract (functional ``init_state``/``update`` over flat tensors);
  :class:`RecurrentLearnedOptimizer` adds ``encode``/``cell``/``readout``/``initial_state``.
- :class:`RNNOptimizer`: the component-wise GRU of Maheswaranathan et al. (NeurIPS 2021).
- :class:`MLPOptimizer`: a per-parameter MLP on momentum/RMS features (learned_optimization style).
- :class:`Learned`: any of them as a drop-in ``torch.optim`` optimizer (``optimizer=learned*``).
- :func:`save_lopt` / :func:`load_lopt` / :func:`load_into`: the ``lopt.pt`` file meta-training writes.

Meta-training lives in :mod:`metaopt.outer`.
"""

from metaopt.learned.base import (
    LOPT_FILE,
    LearnedOptimizer,
    RecurrentLearnedOptimizer,
    load_into,
    load_lopt,
    read_lopt,
    save_lopt,
)
from metaopt.learned.mlp import MLPOptimizer
from metaopt.learned.rnn import RNNOptimizer
from metaopt.learned.torch_optim import Learned

__all__ = [
    "LOPT_FILE",
    "Learned",
    "LearnedOptimizer",
    "MLPOptimizer",
    "RNNOptimizer",
    "RecurrentLearnedOptimizer",
    "load_into",
    "load_lopt",
    "read_lopt",
    "save_lopt",
]
