"""Where the config tree is, and the checks a config passes before any training starts."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from metaopt.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a device is resolved: config_dir() stays cheap
    import torch

_PROGRESS_CHOICES = ("auto", "bar", "lines", "none")


def _pretrained(name: str) -> str:
    from metaopt import pretrained

    return str(pretrained.path(name))


# `${pretrained:<name>}` in a config: the path of learned-optimizer weights shipped with metaopt.
OmegaConf.register_new_resolver("pretrained", _pretrained, replace=True)


@cache
def config_dir() -> Path:
    """The directory holding ``config.yaml``: the one place the config tree is resolved.

    An installed wheel carries the tree as package data (``metaopt/conf``); a source checkout
    (editable install, or ``python -m metaopt`` from the repository) has it at the top level.
    """
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"metaopt's config tree (config.yaml) is in neither {package / 'conf'} "
                            f"nor {package.parent / 'conf'}; reinstall metaopt")


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; otherwise the named device, which must exist."""
    import torch

    valid = "auto, cpu, cuda, cuda:N, mps"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: unknown device {name!r}; valid: {valid}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} requested but CUDA is not available; use device=auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name!r} but only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("device: 'mps' requested but MPS is not available; use device=auto or cpu")
    elif device.type != "cpu":
        raise ConfigError(f"device: unsupported device {name!r}; valid: {valid}")
    return device


def _positive_int(cfg: DictConfig, key: str, *, allow_none: bool = False) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}: must be a positive integer, got {value!r}")


def validate(cfg: DictConfig) -> None:
    """Reject invalid values with a one-line :class:`ConfigError` that names the key.

    Only checks that hold for every task and optimizer live here; each constructor validates its
    own arguments and the loop reports those with the group's key (see ``metaopt.train``).
    """
    for key in ("trainer.steps", "trainer.eval_every", "trainer.log_every", "trainer.checkpoint_every"):
        _positive_int(cfg, key)
    _positive_int(cfg, "trainer.threads", allow_none=True)
    progress = OmegaConf.select(cfg, "trainer.progress", default="auto")
    if progress not in _PROGRESS_CHOICES:
        raise ConfigError(f"trainer.progress: {progress!r} is not one of {', '.join(_PROGRESS_CHOICES)}")
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")
    optimizer = cfg.get("optimizer")
    if optimizer is None or "_target_" not in optimizer:
        raise ConfigError("optimizer: no optimizer selected; pick one with optimizer=<name>")
    lr = optimizer.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0):
        raise ConfigError(f"optimizer.lr: must be a non-negative number, got {lr!r}")
    task = cfg.get("task")
    if task is None or "_target_" not in task:
        raise ConfigError("task: no task selected; pick one with task=<name>")
    if "batch_size" in task:
        _positive_int(cfg, "task.batch_size", allow_none=True)
    resolve_device(str(cfg.get("device", "auto")))
