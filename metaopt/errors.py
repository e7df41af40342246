"""Errors a user can act on. The entry point prints them as one line, without a traceback."""


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``: how summaries, manifests and warnings record an error."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class MetaoptError(Exception):
    """Base class for errors caused by input (config values, missing data), not by bugs."""


class ConfigError(MetaoptError, ValueError):
    """An invalid config value. The message starts with the config key, e.g. ``optimizer.lr: ...``."""


class RunDirInUse(ConfigError):
    """The run directory is held by another live run; nothing of this run was written there."""


class DataNotFoundError(MetaoptError, FileNotFoundError):
    """A dataset is absent and cannot be downloaded; the message names the directory and a remedy."""
