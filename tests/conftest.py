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
