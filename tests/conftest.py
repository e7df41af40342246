"""Shared fixtures: configs composed with Hydra's compose API, shrunk for fast CPU runs."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from metaopt.config import config_dir

# Tests use small models: one intra-op thread is faster than two and keeps timings stable when
# the machine is shared.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """One data cache for the session (mnist1d is generated once)."""
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture
def make_cfg(data_dir) -> Callable[..., DictConfig]:
    """``make_cfg("task=two_moons", ...)``: the root config with a tiny step budget and no W&B."""

    def _make(*overrides: str, tiny: bool = True) -> DictConfig:
        base = [f"paths.data_dir={data_dir}", "logger=none", "trainer.progress=none"]
        if tiny:
            base += ["trainer.steps=20", "trainer.eval_every=10", "trainer.log_every=5",
                     "trainer.checkpoint_every=10"]
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=base + list(overrides))
        with open_dict(cfg):
            cfg.device = "cpu"
        return cfg

    return _make


def _mnist1d_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))


def training_step_cost_ratio(make_base: Callable, make_other: Callable, rounds: int = 9, steps: int = 100,
                             pairs: int = 5) -> float:
    """Median CPU time of a training step with ``make_other(params)`` over one with ``make_base(params)``.

    The task of ``python -m metaopt.bench steps`` (MNIST-1D's MLP 40-100-100-10, batch 128, fixed
    data), forward + backward + step, timed by this thread's CPU clock (so other processes on a
    shared machine inflate neither side), in interleaved blocks of ``steps``. Each of ``pairs``
    fresh model/optimizer pairs gives the ratio of its medians over ``rounds``; the result is the
    median over pairs, because one pair's ratio can sit ~15% off for the life of its tensors
    (measured: 0.89-1.16 for the same two optimizers over eight pairs).
    """
    import statistics
    import time

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 40, generator=gen), torch.randint(0, 10, (128,), generator=gen)

    def block(model, opt, n):
        start = time.thread_time()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return time.thread_time() - start

    ratios = []
    for _ in range(pairs):
        runs = {}
        for kind, make in (("base", make_base), ("other", make_other)):
            model = _mnist1d_mlp()
            runs[kind] = (model, make(model.parameters()), [])
        for model, opt, _ in runs.values():
            block(model, opt, 20)
        for r in range(rounds):
            for kind in (("base", "other") if r % 2 == 0 else ("other", "base")):
                model, opt, times = runs[kind]
                times.append(block(model, opt, steps))
        ratios.append(statistics.median(runs["other"][2]) / statistics.median(runs["base"][2]))
    return statistics.median(ratios)


def step_cost_ratios(make_base: Callable, make_other: Callable, limit: float, tries: int = 3) -> list[float]:
    """:func:`training_step_cost_ratio` measured up to ``tries`` times, stopping at the first at most
    ``limit``; the caller asserts on the last. On this shared 2-core VM the machine's speed drifts
    between pairs (the base step alone ranged 0.59-0.78 ms in one minute), so one measurement of a
    10% overhead came out at 1.23 once in a full CI run; a real regression fails every try."""
    ratios = [training_step_cost_ratio(make_base, make_other)]
    while ratios[-1] > limit and len(ratios) < tries:
        ratios.append(training_step_cost_ratio(make_base, make_other))
    return ratios


@pytest.fixture
def step_cost_ratio() -> Callable[..., list[float]]:
    """:func:`step_cost_ratios`, for the step-cost tests of the optimizers' issues."""
    return step_cost_ratios


@pytest.fixture
def default_signals():
    """Python's own SIGINT/SIGTERM handling for the test, as on a terminal: a runner started in the
    background (``cmd &``, nohup) hands its processes SIGINT ignored, and the loop's graceful stop
    rightly leaves an ignored signal alone."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def sigint_as_on_a_terminal() -> None:
    """``preexec_fn`` for a subprocess that is sent Ctrl-C: SIGINT at its default, so that Python
    installs its KeyboardInterrupt handler even under a runner that ignores SIGINT."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def resumed_from(caplog) -> Callable[[], list[int]]:
    """The steps (meta-steps) that reruns logged resuming from, in order: a rerun that trained from
    scratch writes the same metrics as a resumed one (batches depend on seed and step only), so the
    equality tests alone cannot tell a resume happened."""
    import logging
    import re

    caplog.set_level(logging.INFO, logger="metaopt")

    def steps() -> list[int]:
        return [int(m.group(1)) for r in caplog.records
                if (m := re.search(r"^resuming .* from (?:meta-)?step (\d+)$", r.getMessage()))]

    return steps
