"""Meta-trained learned-optimizer weights shipped with metaopt.

A config names one with the ``pretrained`` resolver, ``checkpoint: ${pretrained:gru_linreg}``
(registered in :mod:`metaopt.config`), so benchmarks can run a learned optimizer without a
meta-training run first. Each file is a ``lopt.pt`` as meta-training writes it (architecture + weights).
"""

from __future__ import annotations

from pathlib import Path

from metaopt.errors import ConfigError

# name -> how it was made (the command reproduces the file as <run dir>/lopt.pt)
WEIGHTS = {
    "gru_linreg": "component-wise GRU (Maheswaranathan et al. 2021), meta-trained by "
                  "`python -m metaopt experiment=lopt_linreg` (truncated BPTT, 800 meta-steps × 16 noiseless 5-d "
                  "linear regressions, horizon 200, seed 0; held-out mean normalised loss 0.0107 vs tuned Adam "
                  "0.0161)",
}


def path(name: str) -> Path:
    """The shipped ``lopt.pt`` called ``name``; a ConfigError naming the valid choices otherwise."""
    if name not in WEIGHTS:
        raise ConfigError(f"pretrained: no shipped weights {name!r}; valid choices: {', '.join(sorted(WEIGHTS))}")
    return Path(__file__).resolve().parent / f"{name}.pt"
