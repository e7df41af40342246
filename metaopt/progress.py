"""Progress reporting: a bar on a terminal, plain periodic lines when output goes to a file (SLURM)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("metaopt")


def _fmt(metrics: dict[str, Any]) -> str:
    keys = ("train/loss", "val/loss", "val/accuracy")
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float)))


class Progress:
    """``mode``: ``bar`` (tqdm), ``lines`` (a log line about every 10% and at each evaluation),
    ``none``, or ``auto`` (bar when stderr is a terminal, else lines)."""

    def __init__(self, mode: str, total: int, start: int = 0):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.total, self.start = mode, total, start
        self._t0 = time.perf_counter()
        self._next_line = start
        self._bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=True)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if "train/loss" in metrics:
                self._bar.set_postfix_str(_fmt(metrics), refresh=False)
        elif self.mode == "lines" and (step >= self._next_line or "val/loss" in metrics or step == self.total):
            elapsed = time.perf_counter() - self._t0
            rate = (step - self.start) / elapsed if elapsed > 0 else float("nan")
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            log.info("step %d/%d (%d%%) %s | %.1f steps/s, eta %.0fs", step, self.total,
                     100 * step // self.total, _fmt(metrics), rate, eta)
            self._next_line = step + max(1, self.total // 10)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
