"""MNIST-1D (Greydanus, "Scaling down deep learning", 2020, arXiv 2011.14439), generated locally.

The ``mnist1d`` package's ``get_dataset`` first tries a download (with no timeout) and writes into
the working directory; here the dataset is always produced by its generator ``make_dataset`` and
cached under ``<data_dir>/mnist1d/``, keyed by a hash of the generator's arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaopt.runfiles import atomic_write_bytes

# Keys of get_dataset_args() that do not change the data.
_NOT_DATA = ("url",)


def dataset_args(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The package's default generator arguments (4000 train / 1000 test, seed 42) with overrides."""
    from mnist1d.data import get_dataset_args

    args = dict(get_dataset_args(as_dict=True))
    for key, value in dict(overrides or {}).items():
        if key not in args:
            raise ValueError(f"dataset_args: unknown MNIST-1D argument {key!r}; known: {sorted(args)}")
        # Hydra hands lists over as ListConfig; plain lists keep the cache key JSON-serialisable.
        args[key] = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
    return args


def cache_path(data_dir: str | os.PathLike, args: Mapping[str, Any]) -> Path:
    key = json.dumps({k: v for k, v in args.items() if k not in _NOT_DATA}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(data_dir) / "mnist1d" / f"mnist1d_{digest}.pt"


def _generate(args: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    # make_dataset reseeds the global numpy and random generators; put them back afterwards.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": torch.as_tensor(d["x"], dtype=torch.float32),
        "y": torch.as_tensor(d["y"], dtype=torch.int64),
        "x_test": torch.as_tensor(d["x_test"], dtype=torch.float32),
        "y_test": torch.as_tensor(d["y_test"], dtype=torch.int64),
    }


def load_mnist1d(
    data_dir: str | os.PathLike | None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """MNIST-1D as float32 ``x``/``x_test`` (N, 40) and int64 ``y``/``y_test``.

    With a ``data_dir`` the generated tensors are cached there (written to a temporary file and
    renamed, so concurrent jobs of a sweep never read a half-written cache); ``None`` regenerates
    every time (about a second).
    """
    args = dataset_args(overrides)
    if data_dir is None:
        return _generate(args)
    path = cache_path(data_dir, args)
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a corrupt or foreign cache file is regenerated, not fatal
            pass
    data = _generate(args)
    try:
        atomic_write_bytes(path, lambda fh: torch.save(data, fh))
    except OSError as exc:
        from metaopt.errors import ConfigError

        raise ConfigError(f"task.data_dir: cannot write the MNIST-1D cache under {data_dir} "
                          f"({exc.strerror or exc}); set paths.data_dir (or METAOPT_DATA_DIR) to a writable "
                          "directory") from exc
    return data
