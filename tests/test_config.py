"""Every option of every config group composes and instantiates."""

from __future__ import annotations

import importlib
import io
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from metaopt.config import config_dir
from metaopt.optim import REGISTRY, requires_closure, set_mode
from metaopt.train import _build

GROUPS = ("task", "optimizer", "scheduler", "logger", "meta")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def test_config_tree_has_the_required_options():
    assert set(options("task")) >= {"quadratic", "rosenbrock", "linreg", "two_moons", "mnist1d",
                                     "mnist1d_cnn", "digits", "resnet"}
    assert set(options("optimizer")) >= {"sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "lbfgs"}
    assert set(options("scheduler")) >= {"constant", "cosine", "step", "warmup_cosine"}
    assert set(options("logger")) >= {"wandb", "none"}
    assert "none" in options("meta")
    assert (config_dir() / "experiment").is_dir()


def test_required_keys_exist(make_cfg):
    cfg = make_cfg(tiny=False)
    assert cfg.seed == 0 and cfg.device == "cpu"
    for key in ("steps", "eval_every", "log_every", "checkpoint_every"):
        assert cfg.trainer[key] > 0
    assert cfg.optimizer.lr > 0 and cfg.task.batch_size > 0
    assert cfg.optimizer._partial_ is True


@pytest.mark.parametrize("name", options("optimizer"))
def test_every_optimizer_config_instantiates_and_is_registered(make_cfg, name):
    cfg = make_cfg(f"optimizer={name}")
    module = cfg.optimizer._target_.rsplit(".", 1)[0]
    try:
        importlib.import_module(module)
    except ImportError:
        pytest.skip(f"{name}: {module} is not installed (pip install 'metaopt[peers]')")
    assert cfg.optimizer._partial_ is True
    x = torch.zeros(3, requires_grad=True)
    opt = _build(cfg.optimizer, "optimizer")([x])
    assert isinstance(opt, torch.optim.Optimizer)
    assert name in REGISTRY and isinstance(opt, REGISTRY[name].cls), "add one register() line for it"

    # The checkpoint of a run that used this config must load the way resume loads it: a YAML list
    # kept as an OmegaConf ListConfig in param_groups (Prodigy's betas) is refused by weights_only.
    def closure():
        opt.zero_grad()
        loss = (x - 1.0).square().sum()
        loss.backward()
        return loss

    set_mode(opt, "train")
    if requires_closure(opt):
        opt.step(closure)
    else:
        closure()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


def test_every_registered_optimizer_has_a_config():
    assert set(REGISTRY) <= set(options("optimizer"))


@pytest.mark.parametrize("name", options("scheduler"))
def test_every_scheduler_config_instantiates(make_cfg, name):
    cfg = make_cfg(f"scheduler={name}", "trainer.steps=100")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = instantiate(cfg.scheduler)(opt)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    if name == "constant":
        assert sched is None and set(lrs) == {1.0}
    else:
        assert lrs[-1] < 0.05 and max(lrs) == pytest.approx(1.0)
    if name == "warmup_cosine":
        assert lrs[0] < 0.5 and lrs.index(max(lrs)) == 4
    if name == "step":
        assert lrs[49] == 1.0 and lrs[50] == pytest.approx(0.1) and lrs[75] == pytest.approx(0.01)


@pytest.mark.parametrize("name", options("logger"))
def test_every_logger_config_instantiates(make_cfg, name):
    cfg = make_cfg(f"logger={name}")
    logger = instantiate(cfg.logger)
    assert hasattr(logger, "log") and hasattr(logger, "finish")


@pytest.mark.parametrize("name", options("task"))
def test_every_task_config_instantiates(make_cfg, name, tmp_path):
    overrides = [f"task={name}"]
    if name == "resnet":
        from metaopt.data.cifar10 import write_fake_cifar10

        write_fake_cifar10(tmp_path, n_train=64, n_test=32)
        overrides += [f"task.data_dir={tmp_path}", "task.depth=8", "task.n_val=16", "task.batch_size=16"]
    cfg = make_cfg(*overrides)
    task = instantiate(cfg.task, seed=0, device="cpu")
    assert isinstance(task.model, torch.nn.Module)
    assert "validation" in task.splits


def test_meta_none_is_null(make_cfg):
    assert make_cfg().meta is None


def test_config_dir_is_the_top_level_conf_in_a_checkout():
    assert config_dir() == Path(__file__).resolve().parents[1] / "conf"
