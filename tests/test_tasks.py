"""Contract tests of every task, built from its YAML as the training loop builds it, plus the
task-specific behaviour (moving centre, Hessians, caches, splits)."""

from __future__ import annotations

import inspect
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from metaopt.data import mnist1d as mnist1d_data
from metaopt.data import write_fake_cifar10
from metaopt.tasks import (
    Digits,
    LinearRegression,
    Mnist1D,
    NoisyQuadratic,
    Rosenbrock,
    SupervisedTask,
    Task,
    TwoMoons,
)
from metaopt.tasks._common import derive_seed

CONF = Path(__file__).resolve().parents[1] / "conf" / "task"

SMALL_MNIST1D = {"dataset_args": {"num_samples": 1000}, "n_val": 100, "batch_size": 32}

# name -> (small overrides for tests, Adam learning rate that makes progress in a few steps)
TASKS: dict[str, tuple[dict, float]] = {
    "quadratic": ({"dim": 10}, 0.1),
    "rosenbrock": ({}, 0.01),
    "linreg": ({"dim": 5, "n_train": 64, "n_val": 32, "n_test": 32, "batch_size": 16}, 0.05),
    "two_moons": ({"n_train": 128, "n_val": 64, "n_test": 64, "batch_size": 32}, 0.01),
    "mnist1d": (SMALL_MNIST1D, 0.01),
    "mnist1d_cnn": ({**SMALL_MNIST1D, "channels": [8, 8]}, 0.01),
    "digits": ({"batch_size": 32}, 0.01),
    "resnet": ({"depth": 8, "width": 4, "n_val": 20, "batch_size": 16, "eval_batch_size": 16}, 0.01),
}
STOCHASTIC = {"linreg", "two_moons", "mnist1d", "mnist1d_cnn", "digits", "resnet"}
NAMES = sorted(TASKS)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar10(root, n_train=100, n_test=40)
    return root


def task_config(name: str, root: Path, **overrides):
    cfg = OmegaConf.create({"paths": {"data_dir": str(root)}, "task": OmegaConf.load(CONF / f"{name}.yaml")})
    for key, value in {**TASKS[name][0], **overrides}.items():
        cfg.task[key] = value
    return cfg.task


def build(name: str, root: Path, seed: int = 0, device: str = "cpu", **overrides) -> Task:
    """Instantiate ``conf/task/<name>.yaml`` as the loop does, with the test's small overrides."""
    return instantiate(task_config(name, root, **overrides), seed=seed, device=device)


def as_tensors(batch) -> list[torch.Tensor]:
    return [] if batch is None else list(batch)


def params(task: Task) -> list[torch.Tensor]:
    return [p.detach().clone() for p in task.model.parameters()]


# -- the contract, for every task -------------------------------------------------------------


def test_every_yaml_is_tested():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_yaml_lists_every_constructor_argument(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cls = get_class(cfg._target_)
    args = set(inspect.signature(cls).parameters) - {"seed", "device"}
    assert args == set(cfg) - {"_target_"}


@pytest.mark.parametrize("name", NAMES)
def test_builds_from_yaml(name, data_dir):
    task = build(name, data_dir)
    assert isinstance(task, Task)
    assert task.splits in (("validation",), ("validation", "test"))
    assert sum(p.numel() for p in task.model.parameters()) > 0
    assert all(p.device.type == "cpu" for p in task.model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_batch_is_a_pure_function_of_seed_and_step(name, data_dir):
    a, b = build(name, data_dir, seed=3), build(name, data_dir, seed=3)
    steps = [0, 1, 7, 40, 1000]
    # b is asked out of order: a cached epoch permutation must not leak into other steps.
    batches_b = {t: as_tensors(b.batch(t)) for t in reversed(steps)}
    for t in steps:
        for x, y in zip(as_tensors(a.batch(t)), batches_b[t]):
            assert torch.equal(x, y)
    if name in STOCHASTIC:
        b0, b1 = as_tensors(a.batch(0)), as_tensors(a.batch(1))
        assert not torch.equal(b0[0], b1[0])
        other = as_tensors(build(name, data_dir, seed=4).batch(0))
        assert not torch.equal(b0[0], other[0])


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_a_finite_scalar_with_grad_to_every_parameter(name, data_dir):
    task = build(name, data_dir)
    loss = task.loss(task.batch(0))
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in task.model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_returns_floats_and_restores_mode(name, data_dir):
    task = build(name, data_dir)
    expected = {"loss", "accuracy"} if task.is_classifier else {"loss"}
    for training in (True, False):
        task.model.train(training)
        for split in task.splits:
            metrics = task.evaluate(split)
            assert set(metrics) == expected
            assert all(type(v) is float and math.isfinite(v) for v in metrics.values())
            if "accuracy" in metrics:
                assert 0.0 <= metrics["accuracy"] <= 1.0
        assert task.model.training is training
    with pytest.raises(ValueError, match="split"):
        task.evaluate("nonexistent")


@pytest.mark.parametrize("name", NAMES)
def test_a_few_adam_steps_reduce_the_loss(name, data_dir):
    overrides = {"noise": 0.0} if name == "quadratic" else {}
    task = build(name, data_dir, **overrides)
    probe = task.batch(0)
    before = task.loss(probe).item()
    opt = torch.optim.Adam(task.model.parameters(), lr=TASKS[name][1])
    for t in range(30):
        opt.zero_grad()
        task.loss(task.batch(t)).backward()
        opt.step()
        task.advance(t)
    assert task.loss(probe).item() < before


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_init_regardless_of_global_rng(name, data_dir):
    torch.manual_seed(1)
    a = build(name, data_dir, seed=5)
    torch.manual_seed(2)
    b = build(name, data_dir, seed=5)
    for p, q in zip(params(a), params(b)):
        assert torch.equal(p, q)
    if isinstance(a, SupervisedTask):
        for split, (x, y) in a.data.items():
            assert torch.equal(x, b.data[split][0]) and torch.equal(y, b.data[split][1])


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"rosenbrock"}))
def test_different_seed_different_init(name, data_dir):
    a, b = build(name, data_dir, seed=0), build(name, data_dir, seed=1)
    assert any(not torch.equal(p, q) for p, q in zip(params(a), params(b)))


@pytest.mark.parametrize("name", ["linreg", "two_moons", "digits"])
def test_different_seed_different_data(name, data_dir):
    a, b = build(name, data_dir, seed=0), build(name, data_dir, seed=1)
    assert not torch.equal(a.data["train"][0], b.data["train"][0])


def test_building_leaves_global_rngs_alone(data_dir):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    expected = (torch.rand(1), np.random.rand(), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    for name in NAMES:
        build(name, data_dir)
    mnist1d_data._generate(mnist1d_data.dataset_args({"num_samples": 100}))
    assert (torch.rand(1), np.random.rand(), random.random()) == expected


INVALID = [
    ("quadratic", {"dim": 0}, "dim"),
    ("quadratic", {"eig_min": -1.0}, "eig_min"),
    ("quadratic", {"eig_max": 1e-4}, "eig_max"),
    ("quadratic", {"noise": -0.5}, "noise"),
    ("quadratic", {"rotate": "yes"}, "rotate"),
    ("rosenbrock", {"start": [1.0]}, "start"),
    ("rosenbrock", {"b_weight": float("nan")}, "b_weight"),
    ("linreg", {"n_train": 0}, "n_train"),
    ("linreg", {"batch_size": 0}, "batch_size"),
    ("linreg", {"batch_size": 65}, "batch_size"),
    ("two_moons", {"batch_size": True}, "batch_size"),
    ("two_moons", {"batch_size": None}, "batch_size"),
    ("two_moons", {"hidden": [32, 0]}, "hidden"),
    ("two_moons", {"noise": -1.0}, "noise"),
    ("digits", {"activation": "swish"}, "activation"),
    ("digits", {"n_val": 1000, "n_test": 1000}, "n_val"),
    ("digits", {"eval_batch_size": 0}, "eval_batch_size"),
    ("mnist1d", {"n_val": 800}, "n_val"),
    ("mnist1d", {"dataset_args": {"bogus": 1}}, "dataset_args"),
    ("mnist1d_cnn", {"kernel_size": 4}, "kernel_size"),
    ("mnist1d_cnn", {"channels": []}, "channels"),
    ("resnet", {"depth": 10}, "depth"),
    ("resnet", {"width": 0}, "width"),
    ("resnet", {"subset": 1000}, "subset"),
    ("resnet", {"n_val": 0}, "n_val"),
    ("resnet", {"augment": "no"}, "augment"),
    ("resnet", {"data_dir": None}, "data_dir"),
]


@pytest.mark.parametrize(("name", "overrides", "argument"), INVALID)
def test_invalid_arguments_raise_value_error_naming_them(name, overrides, argument, data_dir):
    # Called directly: hydra.utils.instantiate would wrap the ValueError in its own exception.
    kwargs = OmegaConf.to_container(task_config(name, data_dir, **overrides), resolve=True)
    cls = get_class(kwargs.pop("_target_"))
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        cls(seed=0, device="cpu", **kwargs)


# -- minibatching ------------------------------------------------------------------------------


def test_epochs_are_permutations_with_drop_last():
    task = TwoMoons(n_train=100, n_val=10, n_test=10, batch_size=32)
    assert task.steps_per_epoch == 3
    x_train = task.data["train"][0]
    for epoch in range(2):
        seen = torch.cat([task.batch(epoch * 3 + i)[0] for i in range(3)])
        assert seen.shape == (96, 2)
        # Rows of one epoch are distinct training points: no repeats within an epoch.
        assert torch.unique(seen, dim=0).shape[0] == 96
        assert all((x_train == row).all(1).any() for row in seen[:5])
    assert not torch.equal(task.batch(0)[0], task.batch(3)[0])


def test_chunked_evaluation_matches_one_chunk():
    small = Digits(eval_batch_size=7)
    large = Digits(eval_batch_size=4096)
    for split in small.splits:
        a, b = small.evaluate(split), large.evaluate(split)
        assert a["accuracy"] == b["accuracy"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_derived_seeds_separate_neighbouring_runs():
    assert derive_seed(0, "epoch", 1) != derive_seed(1, "epoch", 0)
    assert derive_seed(0, "epoch", 1) == derive_seed(0, "epoch", 1)
    assert 0 <= derive_seed(123, "x") < 2**63


# -- synthetic tasks ---------------------------------------------------------------------------


def test_quadratic_hessian_spectrum_and_gradient():
    task = NoisyQuadratic(dim=8, eig_min=1e-2, eig_max=1.0, seed=2)
    h = task.hessian
    assert torch.allclose(h, h.T)
    expected = torch.logspace(-2, 0, 8)
    assert torch.allclose(torch.linalg.eigvalsh(h.double()).float(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(h, torch.diag(torch.diagonal(h)))  # rotated
    task.centre.normal_()
    loss = task.loss(task.batch(0))
    loss.backward()
    d = task.model.theta.detach() - task.centre
    assert loss.item() == pytest.approx(0.5 * (d @ h @ d).item(), rel=1e-5)
    assert torch.allclose(task.model.theta.grad, h @ d, atol=1e-5)
    assert task.evaluate("validation")["loss"] == pytest.approx(loss.item(), rel=1e-6)
    unrotated = NoisyQuadratic(dim=8, rotate=False)
    assert torch.equal(unrotated.hessian, torch.diag(torch.diagonal(unrotated.hessian)))


def test_quadratic_centre_random_walk_and_state_round_trip():
    a = NoisyQuadratic(dim=6, noise=0.5, seed=1)
    assert torch.equal(a.centre, torch.zeros(6))
    for t in range(5):
        a.advance(t)
    saved = a.state_dict()
    assert not torch.equal(saved["centre"], torch.zeros(6))
    b = NoisyQuadratic(dim=6, noise=0.5, seed=1)
    b.load_state_dict(saved)
    assert torch.equal(b.centre, a.centre)
    a.advance(5)
    assert not torch.equal(saved["centre"], a.centre)  # state_dict is a copy, not a view
    b.advance(5)
    assert torch.equal(b.centre, a.centre)  # resumed run continues the same walk
    # Each step's increment has the configured scale.
    c = NoisyQuadratic(dim=2000, noise=0.5, rotate=False, seed=0)
    c.advance(0)
    assert c.centre.std().item() == pytest.approx(0.5, rel=0.1)


def test_quadratic_without_noise_is_stationary():
    task = NoisyQuadratic(dim=5, noise=0.0)
    task.advance(0)
    assert torch.equal(task.centre, torch.zeros(5))


def test_rosenbrock_values():
    task = Rosenbrock()
    assert task.loss(None).item() == pytest.approx(24.2)
    assert task.evaluate("validation")["loss"] == pytest.approx(24.2)
    with torch.no_grad():
        task.model.theta.copy_(torch.tensor([1.0, 1.0]))
    assert task.loss(None).item() == 0.0
    lodo = Rosenbrock(a_weight=0.01, b_weight=1.0, start=[-0.5, 2.0])
    assert lodo.loss(None).item() == pytest.approx(0.01 * 1.5**2 + 1.75**2)


def test_linreg_full_batch_and_hessian():
    task = LinearRegression(dim=4, n_train=50, n_val=10, n_test=0, eig_min=0.01, eig_max=1.0)
    assert task.splits == ("validation",)
    x0, y0 = task.batch(0)
    x1, _ = task.batch(17)
    assert x0.shape == (50, 4) and torch.equal(x0, x1)
    w = task.model.weight.detach().clone().requires_grad_()
    hess = torch.autograd.functional.hessian(lambda v: task.criterion(x0 @ v.T, y0), w)
    assert torch.allclose(hess.reshape(4, 4), task.hessian, atol=1e-5)
    assert ((task.eigenvalues >= 0.01 - 1e-6) & (task.eigenvalues <= 1.0 + 1e-6)).all()


def test_linreg_input_covariance_has_the_drawn_spectrum():
    task = LinearRegression(dim=3, n_train=20000, n_val=10, n_test=10, eig_min=0.1, eig_max=1.0)
    got = torch.linalg.eigvalsh(task.hessian.double()).sort().values
    want = task.eigenvalues.double().sort().values
    assert torch.allclose(got, want, rtol=0.1)


# -- MNIST-1D cache ----------------------------------------------------------------------------


def test_mnist1d_standard_split_and_cache(tmp_path, monkeypatch):
    task = Mnist1D(data_dir=str(tmp_path), batch_size=128)
    assert task.data["train"][0].shape == (3500, 40)
    assert task.data["validation"][0].shape == (500, 40)
    assert task.data["test"][0].shape == (1000, 40)
    cached = list((tmp_path / "mnist1d").glob("mnist1d_*.pt"))
    assert len(cached) == 1
    umask = os.umask(0)
    os.umask(umask)
    assert cached[0].stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes it: shareable
    assert not [p for p in (tmp_path / "mnist1d").iterdir() if p.suffix == ".tmp"]

    def no_generation(args):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(mnist1d_data, "_generate", no_generation)
    again = Mnist1D(data_dir=str(tmp_path))
    for split in task.data:
        assert torch.equal(task.data[split][0], again.data[split][0])
    # Different generator arguments are a different cache file.
    assert mnist1d_data.cache_path(tmp_path, mnist1d_data.dataset_args({"seed": 1})) != cached[0]


def test_mnist1d_corrupt_cache_is_regenerated(tmp_path):
    args = mnist1d_data.dataset_args({"num_samples": 200})
    path = mnist1d_data.cache_path(tmp_path, args)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    data = mnist1d_data.load_mnist1d(tmp_path, {"num_samples": 200})
    assert data["x"].shape == (160, 40)
    assert torch.equal(torch.load(path, weights_only=True)["x"], data["x"])


def test_an_unwritable_mnist1d_cache_dir_is_a_config_error_naming_the_key(tmp_path):
    from metaopt.errors import ConfigError

    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match=r"^task.data_dir: cannot write the MNIST-1D cache under .*afile/sub.*"
                                          r"set paths.data_dir \(or METAOPT_DATA_DIR\)"):
        mnist1d_data.load_mnist1d(tmp_path / "afile" / "sub", {"num_samples": 200})
