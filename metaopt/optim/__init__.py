"""metaopt's optimizers and the registry of every optimizer it offers (baselines included).

Each entry's ``kwargs`` are what the contract suite runs on its small problems; ``invalid`` lists
constructor arguments that must be rejected with a ``ValueError`` matching the pattern.
"""

import torch

from metaopt import pretrained
from metaopt.learned import Learned, MLPOptimizer, RNNOptimizer
from metaopt.optim.greedy import GreedyAdam, GreedySGD
from metaopt.optim.lodo import LODO
from metaopt.optim.metaoptimize import MetaOptimize, MetaOptimizeFull
from metaopt.optim.pal import PAL
from metaopt.optim.peers import register_installed
from metaopt.optim.registry import REGISTRY, OptimizerSpec, register, requires_closure, set_mode
from metaopt.optim.utils import optimizer_state_bytes

_BAD_LR = ({"lr": -1.0}, "learning rate")

register("sgd", torch.optim.SGD, kwargs={"lr": 2e-3}, invalid=(_BAD_LR,))
register("momentum", torch.optim.SGD, kwargs={"lr": 3e-4, "momentum": 0.9},
         invalid=(_BAD_LR, ({"lr": 0.1, "momentum": -0.5}, "momentum")))
register("nesterov", torch.optim.SGD, kwargs={"lr": 3e-4, "momentum": 0.9, "nesterov": True},
         invalid=(_BAD_LR, ({"lr": 0.1, "momentum": 0.0, "nesterov": True}, "Nesterov")))
register("adam", torch.optim.Adam, kwargs={"lr": 2e-2},
         invalid=(_BAD_LR, ({"betas": (1.5, 0.999)}, "beta parameter at index 0"),
                  ({"eps": -1.0}, "epsilon")))
register("adamw", torch.optim.AdamW, kwargs={"lr": 2e-2, "weight_decay": 1e-4},
         invalid=(_BAD_LR, ({"weight_decay": -1.0}, "weight_decay")))
register("rmsprop", torch.optim.RMSprop, kwargs={"lr": 1e-2},
         invalid=(_BAD_LR, ({"alpha": -0.1}, "alpha")))
register("lbfgs", torch.optim.LBFGS, kwargs={"lr": 0.5, "max_iter": 5, "history_size": 10},
         needs_closure=True, supports_param_groups=False, invalid=(_BAD_LR,))

_BAD_GREEDY = (({"lags": 0}, "lags"), ({"horizon": 0.5}, "horizon"), ({"update_every": 0}, "update_every"),
               ({"max_momentum": 1.0}, "max_momentum"), ({"min_momentum": -0.1}, "min_momentum"))
register("greedy_sgd", GreedySGD, kwargs={"lr": 2e-3},
         invalid=(_BAD_LR, *_BAD_GREEDY, ({"lr_rule": "adaptive"}, "lr_rule")))
register("greedy_adam", GreedyAdam, kwargs={"lr": 5e-2},
         invalid=(_BAD_LR, *_BAD_GREEDY, ({"beta2": 1.0}, "beta2"), ({"eps": -1.0}, "eps")))

register("pal", PAL, kwargs={"measuring_step": 0.1, "max_step": 1.0}, needs_closure=True,
         invalid=(({"measuring_step": -1.0}, "measuring_step"), ({"max_step": 0.0}, "max_step"),
                  ({"direction_decay": 1.5}, "direction_decay"), ({"update_factor": 0.0}, "update_factor"),
                  ({"measuring_step": float("inf")}, "measuring_step")))

# seed fixed: two LODO instances built in a row must share permutations for the group tests.
register("lodo", LODO, kwargs={"lr": 0.03, "seed": 0},
         invalid=(({"lr": -1.0}, "lr"), ({"meta_lr": -1.0}, "meta_lr"), ({"beta": 1.0}, "beta"),
                  ({"n_layers": 0}, "n_layers"), ({"block_size": 0}, "block_size"),
                  ({"hidden_factor": 0.5}, "hidden_factor"), ({"preconditioner": "dense"}, "preconditioner"),
                  ({"meta_optimizer": "rmsprop"}, "meta_optimizer"), ({"seed": -1}, "seed"),
                  ({"hidden_factor": float("inf")}, "hidden_factor"), ({"lr": float("inf")}, "lr")))
# The paper's ablations (each has a conf/optimizer file); small networks keep the suite fast.
register("lodo_diagonal", LODO, kwargs={"lr": 0.03, "seed": 0, "preconditioner": "diagonal"},
         invalid=(({"lr": -1.0}, "lr"),))
register("lodo_nomomentum", LODO, kwargs={"lr": 2e-3, "seed": 0, "beta": 0.0, "n_layers": 4},
         invalid=(({"beta": -0.1}, "beta"),))
register("lodo_sgd", LODO, kwargs={"lr": 0.03, "seed": 0, "meta_optimizer": "sgd", "meta_lr": 1e-5,
                                   "n_layers": 4}, invalid=(({"meta_lr": -1.0}, "meta_lr"),))

# meta_lr 1e-2 so that α moves within the suite's 500 steps; the full (HVP) trace around SGD needs
# a closure, and a slower meta_lr keeps α below Rosenbrock's stability limit near the minimum.
register("metaoptimize", MetaOptimize, kwargs={"alpha0": 1e-2, "meta_lr": 1e-2, "trace_term": "gradient"},
         invalid=(({"alpha0": 0.0}, "alpha0"), ({"meta_lr": -1.0}, "meta_lr"), ({"gamma": 1.5}, "gamma"),
                  ({"base": "adagrad"}, "base"), ({"meta": "sgd"}, "meta"), ({"blocks": [2]}, "blocks"),
                  ({"variant": "full"}, "variant"), ({"momentum": 0.9}, "momentum"),
                  ({"betas": (1.5, 0.999)}, "betas parameter at index 0"), ({"weight_decay": -1.0}, "weight_decay"),
                  ({"base": "sgd"}, "trace_term")))
register("metaoptimize_full", MetaOptimize, needs_closure=True,
         kwargs={"base": "sgd", "variant": "full", "alpha0": 2e-3, "meta_lr": 3e-3},
         invalid=(({"base": "lion"}, "variant"), ({"alpha0": -1.0}, "alpha0")))
register("metaoptimize_full_adam", MetaOptimize, needs_closure=True,
         kwargs={"base": "adam", "variant": "full", "alpha0": 1e-2, "meta_lr": 3e-3},
         invalid=(({"trace_term": "gradient"}, "trace_term"),))
register("metaoptimize_sgdm", MetaOptimize, kwargs={"base": "sgdm", "alpha0": 3e-4, "meta_lr": 3e-3},
         invalid=(({"base": "sgdm", "momentum": 1.0}, "momentum"),))
register("metaoptimize_blockwise", MetaOptimize, kwargs={"blocks": "layerwise", "alpha0": 1e-2, "meta_lr": 1e-2},
         invalid=(({"blocks": "rowwise"}, "blocks"),))

# Learned optimizers (metaopt.learned). An untrained one is idle (zero readout) by design, so the
# contract runs them hand-set to known rules: the GRU to clipped heavy-ball momentum, the MLP to
# Adam (lr 0.02); `learned` without a checkpoint falls back to that momentum GRU (lr 0.01 × 0.1).
# Meta-trained weights are tested in tests/test_learned*.py and tests/test_outer*.py.

_LEARNED_INVALID = (_BAD_LR, ({"checkpoint": "/nonexistent/lopt.pt"}, "checkpoint"), ({"lopt": 3}, "lopt"))
register("learned", Learned, kwargs={"lr": 0.1}, invalid=_LEARNED_INVALID)
register("learned_rnn", Learned, invalid=_LEARNED_INVALID,
         kwargs={"lr": 1e-3, "lopt": RNNOptimizer(hidden_size=8, input_encoding="scaled", init="momentum")})
register("learned_mlp", Learned, invalid=_LEARNED_INVALID,
         kwargs={"lr": 1.0, "lopt": MLPOptimizer(init="adam", step_mult=0.02)})
# The GRU meta-trained on linear regression that ships with metaopt (metaopt/pretrained); the
# contract's Rosenbrock is far outside its meta-training range, where lr 1 does not reduce it.
register("learned_rnn_linreg", Learned, invalid=_LEARNED_INVALID,
         kwargs={"lr": 0.1, "checkpoint": str(pretrained.path("gru_linreg"))})

# Prodigy, D-Adaptation, Schedule-Free: only when `pip install 'metaopt[peers]'` brought them.
PEERS = register_installed()

__all__ = ["LODO", "PAL", "REGISTRY", "GreedyAdam", "GreedySGD", "Learned", "MetaOptimize", "MetaOptimizeFull",
           "OptimizerSpec", "optimizer_state_bytes", "PEERS", "register", "requires_closure", "set_mode"]
