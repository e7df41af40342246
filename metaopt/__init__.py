"""metaopt: an experiment framework for optimizer meta-learning research.

Run experiments with ``python -m metaopt task=... optimizer=...``; import optimizers from
:mod:`metaopt.optim` for your own loops; call :func:`metaopt.train.train` with a composed config.
"""

__version__ = "0.1.0"
