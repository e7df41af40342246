"""Peer methods from other packages, registered when the optional extra is installed.

``pip install 'metaopt[peers]'`` brings Prodigy (Mishchenko & Defazio, ICML 2024), D-Adaptation
(Defazio & Mishchenko, ICML 2023) and Schedule-Free AdamW (Defazio et al., NeurIPS 2024). They run
unchanged (each ``conf/optimizer/<name>.yaml`` targets the package's class); registering them puts
them through the same contract suite as metaopt's own optimizers. Schedule-Free's ``train()`` /
``eval()`` switch is made by the loop through :func:`metaopt.optim.registry.set_mode`.
"""

from __future__ import annotations

import importlib
from typing import Any

from metaopt.optim.registry import register

# name -> (module, class, contract kwargs, invalid cases, supports_param_groups)
_PEERS: dict[str, tuple[str, str, dict[str, Any], tuple, bool]] = {
    # Prodigy and D-Adaptation estimate one step size from all groups together and refuse groups
    # whose lr differ unless one is 0 (a RuntimeError at the first step, not in __init__).
    "prodigy": ("prodigyopt", "Prodigy", {"lr": 1.0}, (({"lr": -1.0}, "learning rate"),), True),
    "dadapt_adam": ("dadaptation", "DAdaptAdam", {"lr": 1.0}, (({"lr": -1.0}, "learning rate"),), True),
    # The package checks no argument: metaopt's subclass adds the contract's ValueErrors.
    "schedulefree_adamw": ("metaopt.optim.schedulefree_adamw", "ScheduleFreeAdamW", {"lr": 0.05},
                           (({"lr": -1.0}, "learning rate"), ({"betas": (1.0, 0.999)}, "beta parameter at index 0"),
                            ({"warmup_steps": -1}, "warmup_steps")), True),
}


def register_installed() -> list[str]:
    """Register every peer whose package imports; return their names."""
    registered = []
    for name, (module, cls_name, kwargs, invalid, groups) in _PEERS.items():
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except ImportError:
            continue
        register(name, cls, kwargs=kwargs, invalid=invalid, supports_param_groups=groups)
        registered.append(name)
    return registered
