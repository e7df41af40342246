"""The plain files every run leaves: ``metrics.jsonl``, ``summary.json``, ``checkpoint.pt``.

They are the record of a run; loggers are views on top. Writes are atomic (temp file + rename) so
a run killed at any moment leaves the previous complete version, never a torn file.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
RUN_ID = "run_id.txt"
# Held (flock) by the live run of a directory; it names that run's pid and host.
LOCK = ".lock"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings so every line stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(_clean(record), default=_json_default, allow_nan=False)


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; a data cache in a shared directory must be readable by the
        # group as open() would have made it.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunFiles:
    """The files of one run directory."""

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / METRICS
        self.summary_path = self.dir / SUMMARY
        self.checkpoint_path = self.dir / CHECKPOINT
        self._metrics = None
        self._lock = None

    def lock(self) -> None:
        """Hold ``<dir>/.lock`` until :meth:`close`: a second live run in this directory is refused.

        Two runs started in the same directory (the same second of a default run dir, or one dir
        given twice) would otherwise interleave their metrics and overwrite each other's summary.
        The lock is the kernel's (``flock``), so a killed or requeued run leaves none behind. Where
        the filesystem has no flock, or the platform no fcntl, the run goes on unprotected.
        """
        from metaopt.errors import RunDirInUse

        try:
            import fcntl
        except ImportError:
            return
        fh = open(self.dir / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run's life
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            raise RunDirInUse(f"hydra.run.dir: {self.dir} is in use by another run"
                              + (f" ({holder})" if holder else "")
                              + "; wait for it to end or choose a new run directory") from None
        except OSError:
            fh.close()
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self._lock = fh

    # metrics.jsonl -------------------------------------------------------------------------
    def truncate_metrics(self, after_step: int) -> None:
        """Drop records past ``after_step``: a resumed run re-logs them from its checkpoint."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a killed process
            if record.get("step", 0) <= after_step:
                kept.append(line)
        data = "".join(line + "\n" for line in kept).encode()
        atomic_write_bytes(self.metrics_path, lambda fh: fh.write(data))

    def append_metrics(self, record: dict[str, Any]) -> None:
        if self._metrics is None:
            self._metrics = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        self._metrics.write(dumps(record) + "\n")
        self._metrics.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    # summary.json -------------------------------------------------------------------------
    def write_summary(self, summary: dict[str, Any]) -> None:
        data = (json.dumps(_clean(summary), default=_json_default, indent=2, allow_nan=False) + "\n").encode()
        atomic_write_bytes(self.summary_path, lambda fh: fh.write(data))

    def read_summary(self) -> dict[str, Any] | None:
        if not self.summary_path.exists():
            return None
        return json.loads(self.summary_path.read_text())

    # checkpoint.pt ------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.checkpoint_path, lambda fh: torch.save(state, fh))

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)

    # run id -------------------------------------------------------------------------------
    def run_id(self) -> str:
        """A stable id for this run directory (a resumed run keeps its W&B run)."""
        path = self.dir / RUN_ID
        if path.exists():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:12]
        data = (run_id + "\n").encode()
        atomic_write_bytes(path, lambda fh: fh.write(data))
        return run_id


def rng_state() -> dict[str, Any]:
    """Every random state a step can touch, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
