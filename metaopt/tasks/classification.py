"""Classification tasks: thin subclasses of :class:`SupervisedTask` that load data and build a model.

Sizes are chosen so that the small tasks run 2000 steps in seconds on two CPU cores.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from metaopt.data import cifar10
from metaopt.data.mnist1d import load_mnist1d
from metaopt.errors import DataNotFoundError
from metaopt.models import CNN1D, MLP, ResNetCIFAR
from metaopt.models.mlp import ACTIVATIONS
from metaopt.tasks._common import (
    check_float,
    check_int,
    check_int_list,
    check_optional_int,
    derive_seed,
    generator,
    seeded_init,
)
from metaopt.tasks.supervised import SupervisedTask


def _check_activation(activation: Any) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return activation


def _check_data_dir(data_dir: Any, required: bool) -> str | None:
    if data_dir is None:
        if required:
            raise ValueError("data_dir must be a directory path, got None")
        return None
    if not isinstance(data_dir, (str, os.PathLike)):
        raise ValueError(f"data_dir must be a directory path, got {data_dir!r}")
    return os.fspath(data_dir)


class TwoMoons(SupervisedTask):
    """Two interleaved half-circles (scikit-learn ``make_moons``) classified by a small MLP.

    A task of Maheswaranathan et al., "Reverse engineering learned optimizers reveals known and
    novel mechanisms" (NeurIPS 2021), who used noise 0.1. The points are drawn per seed (a fresh
    problem for every run), then split into train/validation/test in that order.
    """

    def __init__(
        self,
        n_train: int = 1024,
        n_val: int = 512,
        n_test: int = 512,
        noise: float = 0.2,
        hidden: Sequence[int] = (32, 32),
        activation: str = "relu",
        batch_size: int = 128,
        eval_batch_size: int = 4096,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        super().__init__(batch_size, seed=seed, device=device, eval_batch_size=eval_batch_size)
        from sklearn.datasets import make_moons

        n_train = check_int("n_train", n_train)
        n_val = check_int("n_val", n_val)
        n_test = check_int("n_test", n_test)
        self.noise = check_float("noise", noise, nonnegative=True)
        hidden = check_int_list("hidden", hidden)
        activation = _check_activation(activation)
        x, y = make_moons(n_samples=n_train + n_val + n_test, noise=self.noise,
                          random_state=derive_seed(self.seed, "moons") % 2**32)
        x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
        a, b = n_train, n_train + n_val
        self.set_data(train=(x[:a], y[:a]), validation=(x[a:b], y[a:b]), test=(x[b:], y[b:]))
        with seeded_init(self.seed, "init"):
            self.model = MLP(2, hidden, 2, activation).to(self.device)


def _mnist1d_splits(data_dir: str | None, dataset_args: Mapping[str, Any] | None, n_val: int):
    data = load_mnist1d(data_dir, dataset_args)
    n = data["x"].shape[0]
    if n_val >= n:
        raise ValueError(f"n_val must be smaller than the {n} MNIST-1D training examples, got {n_val}")
    # The package's split is 4000 train / 1000 test; validation is carved from the end of train so
    # the test set stays the one published results use.
    train = (data["x"][: n - n_val], data["y"][: n - n_val])
    validation = (data["x"][n - n_val:], data["y"][n - n_val:])
    return train, validation, (data["x_test"], data["y_test"])


class Mnist1D(SupervisedTask):
    """MNIST-1D (Greydanus, "Scaling down deep learning", 2020) with an MLP.

    The dataset is the package's default (generator seed 42, unchanged by the run seed) unless
    ``dataset_args`` overrides generator arguments (e.g. ``{num_samples: 10000}``). It is generated
    locally, never downloaded, and cached under ``<data_dir>/mnist1d/`` (``data_dir=None``:
    regenerate, about a second). Splits: the first 4000 − n_val generated training examples train,
    the last ``n_val`` validate, the 1000 test examples test.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (100, 100),
        activation: str = "relu",
        batch_size: int = 128,
        n_val: int = 500,
        data_dir: str | None = None,
        dataset_args: Mapping[str, Any] | None = None,
        eval_batch_size: int = 4096,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        super().__init__(batch_size, seed=seed, device=device, eval_batch_size=eval_batch_size)
        hidden = check_int_list("hidden", hidden)
        activation = _check_activation(activation)
        n_val = check_int("n_val", n_val)
        self.data_dir = _check_data_dir(data_dir, required=False)
        self.set_data(*_mnist1d_splits(self.data_dir, dataset_args, n_val))
        length = self.data["train"][0].shape[1]
        with seeded_init(self.seed, "init"):
            self.model = MLP(length, hidden, 10, activation).to(self.device)


class Mnist1DCNN(SupervisedTask):
    """MNIST-1D with a small 1-D CNN (:class:`metaopt.models.CNN1D`); data as in :class:`Mnist1D`."""

    def __init__(
        self,
        channels: Sequence[int] = (32, 32, 32),
        kernel_size: int = 5,
        batch_size: int = 128,
        n_val: int = 500,
        data_dir: str | None = None,
        dataset_args: Mapping[str, Any] | None = None,
        eval_batch_size: int = 4096,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        super().__init__(batch_size, seed=seed, device=device, eval_batch_size=eval_batch_size)
        channels = check_int_list("channels", channels, allow_empty=False)
        kernel_size = check_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        n_val = check_int("n_val", n_val)
        self.data_dir = _check_data_dir(data_dir, required=False)
        self.set_data(*_mnist1d_splits(self.data_dir, dataset_args, n_val))
        length = self.data["train"][0].shape[1]
        with seeded_init(self.seed, "init"):
            self.model = CNN1D(length, channels, 10, kernel_size).to(self.device)


class Digits(SupervisedTask):
    """scikit-learn's 8x8 handwritten digits (1797 images, from the UCI optical recognition set)
    with an MLP.

    Split per seed into train/validation/test; each pixel is standardised with the training
    split's mean and standard deviation (pixels that are constant in training are only centred).
    """

    def __init__(
        self,
        hidden: Sequence[int] = (64,),
        activation: str = "relu",
        batch_size: int = 64,
        n_val: int = 300,
        n_test: int = 300,
        eval_batch_size: int = 4096,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        super().__init__(batch_size, seed=seed, device=device, eval_batch_size=eval_batch_size)
        from sklearn.datasets import load_digits

        hidden = check_int_list("hidden", hidden)
        activation = _check_activation(activation)
        n_val = check_int("n_val", n_val)
        n_test = check_int("n_test", n_test)
        digits = load_digits()
        n = len(digits.target)
        if n_val + n_test >= n:
            raise ValueError(
                f"n_val + n_test must leave training examples out of {n}, got {n_val} + {n_test}"
            )
        order = np.random.default_rng(derive_seed(self.seed, "digits", "split")).permutation(n)
        x = torch.as_tensor(digits.data[order], dtype=torch.float32)
        y = torch.as_tensor(digits.target[order], dtype=torch.int64)
        a, b = n - n_val - n_test, n - n_test
        mean, std = x[:a].mean(0), x[:a].std(0)
        x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
        self.set_data(train=(x[:a], y[:a]), validation=(x[a:b], y[a:b]), test=(x[b:], y[b:]))
        with seeded_init(self.seed, "init"):
            self.model = MLP(64, hidden, 10, activation).to(self.device)


class ResNetCIFAR10(SupervisedTask):
    """CIFAR-10 with the CIFAR ResNet of He et al. 2016 (:class:`metaopt.models.ResNetCIFAR`).

    Data: the python-version pickles under ``<data_dir>/cifar-10-batches-py`` (torchvision's
    layout), held on the device as uint8 and converted per batch. The last ``n_val`` of the 50000
    training images validate; ``subset`` keeps only the first ``subset`` of the rest for training
    (quick experiments); the 10000 test images test. ``download=True`` fetches the official archive
    and checks its MD5; otherwise missing data raises :class:`DataNotFoundError`.

    Augmentation (``augment=True``), as in the paper: pad 4 pixels, random 32x32 crop, random
    horizontal flip, drawn on the device from a generator seeded by (seed, step). Padding happens
    after normalisation, so padded pixels are the mean colour rather than black.
    """

    PAD = 4

    def __init__(
        self,
        depth: int = 20,
        width: int = 16,
        batch_size: int = 128,
        n_val: int = 5000,
        subset: int | None = None,
        augment: bool = True,
        data_dir: str | None = None,
        download: bool = False,
        eval_batch_size: int = 1000,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        super().__init__(batch_size, seed=seed, device=device, eval_batch_size=eval_batch_size)
        depth = check_int("depth", depth)
        width = check_int("width", width)
        n_val = check_int("n_val", n_val)
        subset = check_optional_int("subset", subset)
        for name, flag in (("augment", augment), ("download", download)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        self.augment = augment
        self.data_dir = _check_data_dir(data_dir, required=True)
        # Built before the data is read so that a bad depth fails fast (the model checks 6n+2).
        with seeded_init(self.seed, "init"):
            self.model = ResNetCIFAR(depth, width, 10).to(self.device)

        if download:
            try:
                cifar10.download_cifar10(self.data_dir)
            except DataNotFoundError as e:
                raise DataNotFoundError(f"task.download: {e}") from None
        try:
            data = cifar10.load_cifar10(self.data_dir)
        except DataNotFoundError:
            folder = cifar10.cifar10_folder(self.data_dir)
            raise DataNotFoundError(
                f"task.data_dir: no CIFAR-10 at {folder}{cifar10.missing_note(self.data_dir)}; run with "
                f"task.download=true or place the python-version pickles ({cifar10.CIFAR10_URL}) there"
            ) from None
        n = data["train_x"].shape[0]
        if n_val >= n:
            raise ValueError(f"n_val must be smaller than the {n} training images, got {n_val}")
        n_fit = n - n_val
        if subset is not None:
            if subset > n_fit:
                raise ValueError(
                    f"subset must be at most the {n_fit} training images left after n_val, got {subset}"
                )
            n_fit = subset
        tx, ty = data["train_x"], data["train_y"]
        self.set_data(
            train=(tx[:n_fit], ty[:n_fit]),
            validation=(tx[n - n_val:], ty[n - n_val:]),
            test=(data["test_x"], data["test_y"]),
        )
        self.mean = torch.tensor(cifar10.MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cifar10.STD, device=self.device).view(1, 3, 1, 1)

    def prepare(self, x: torch.Tensor, step: int | None) -> torch.Tensor:
        x = (x.float().div_(255) - self.mean) / self.std
        if step is None or not self.augment:
            return x
        return self._crop_and_flip(x, step)

    def _crop_and_flip(self, x: torch.Tensor, step: int) -> torch.Tensor:
        # One gather does crop and flip for the whole batch: per-image offsets become flat indices
        # into the padded image, and a flip reverses the column order. torch.gather is several
        # times faster than the equivalent four-tensor advanced indexing.
        n, c, h, w = x.shape
        p = self.PAD
        dev = x.device
        g = generator(self.seed, "augment", int(step), device=dev)
        dy = torch.randint(0, 2 * p + 1, (n, 1), generator=g, device=dev)
        dx = torch.randint(0, 2 * p + 1, (n, 1), generator=g, device=dev)
        flip = torch.rand(n, 1, generator=g, device=dev) < 0.5
        ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
        rows = dy + ar_h
        cols = dx + torch.where(flip, ar_w.flip(0), ar_w)
        padded = F.pad(x, (p, p, p, p)).flatten(2)
        index = (rows.view(n, h, 1) * (w + 2 * p) + cols.view(n, 1, w)).view(n, 1, h * w)
        return torch.gather(padded, 2, index.expand(n, c, h * w)).view(n, c, h, w)
