"""metaopt's optimizers and the registry of every optimizer it offers (baselines included).

Each entry's ``kwargs`` are what the contract suite runs on its small problems; ``invalid`` lists
constructor arguments that must be rejected with a ``ValueError`` matching the pattern.
"""

import torch

from metaopt.optim.pal import PAL
from metaopt.optim.registry import REGISTRY, OptimizerSpec, register, requires_closure
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

register("pal", PAL, kwargs={"measuring_step": 0.1, "max_step": 1.0}, needs_closure=True,
         invalid=(({"measuring_step": -1.0}, "measuring_step"), ({"max_step": 0.0}, "max_step"),
                  ({"direction_decay": 1.5}, "direction_decay"), ({"update_factor": 0.0}, "update_factor")))

__all__ = ["PAL", "REGISTRY", "OptimizerSpec", "optimizer_state_bytes", "register", "requires_closure"]
