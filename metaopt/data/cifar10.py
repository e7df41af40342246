"""CIFAR-10 from the python-version pickles (Krizhevsky, "Learning Multiple Layers of Features from
Tiny Images", 2009; https://www.cs.toronto.edu/~kriz/cifar.html).

Layout on disk is torchvision's: ``<root>/cifar-10-batches-py/`` holding ``data_batch_1`` …
``data_batch_5``, ``test_batch`` and ``batches.meta``. Each batch is a pickled dict with ``b"data"``
(uint8, N x 3072, the 1024 red, then green, then blue values of a 32x32 image in row-major order)
and ``b"labels"`` (N ints in 0..9). Nothing is downloaded unless :func:`download_cifar10` is called.

:func:`write_fake_cifar10` writes small random sets in the genuine format so that code reading
CIFAR-10 can be tested offline.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from metaopt.errors import DataNotFoundError, MetaoptError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Per-channel statistics of the 50000 training images, in [0, 1] units.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class ChecksumError(MetaoptError, OSError):
    """A downloaded archive does not have the published checksum (truncated or tampered with)."""


def cifar10_folder(root: str | os.PathLike) -> Path:
    return Path(root) / FOLDER


def missing_files(root: str | os.PathLike) -> list[str]:
    folder = cifar10_folder(root)
    return [name for name in (*TRAIN_FILES, TEST_FILE, META_FILE) if not (folder / name).is_file()]


def missing_note(root: str | os.PathLike) -> str:
    """`` (missing data_batch_4)`` for a partial copy; nothing when the folder is absent."""
    return f" (missing {', '.join(missing_files(root))})" if cifar10_folder(root).is_dir() else ""


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        # The archive was pickled by Python 2: its keys are bytes.
        entry = pickle.load(f, encoding="bytes")
    data = np.asarray(entry[b"data"], dtype=np.uint8)
    labels = np.asarray(entry.get(b"labels", entry.get(b"fine_labels")), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: expected data N x 3072 and N labels, got {data.shape} and {labels.shape}")
    return data, labels


def load_cifar10(root: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the pickles under ``<root>/cifar-10-batches-py``.

    Returns uint8 images ``(N, 3, 32, 32)`` and int64 labels as ``train_x``, ``train_y`` (50000, in
    file order) and ``test_x``, ``test_y`` (10000). Raises :class:`DataNotFoundError` if a file is
    missing.
    """
    folder = cifar10_folder(root)
    missing = missing_files(root)
    if missing:
        raise DataNotFoundError(
            f"no CIFAR-10 at {folder}{missing_note(root)}; call "
            f"metaopt.data.cifar10.download_cifar10({str(root)!r}) or place the python-version "
            f"pickles from {CIFAR10_URL} there"
        )
    parts = [_read_batch(folder / name) for name in TRAIN_FILES]
    test_data, test_labels = _read_batch(folder / TEST_FILE)

    def images(data: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())

    return {
        "train_x": images(np.concatenate([d for d, _ in parts])),
        "train_y": torch.from_numpy(np.concatenate([y for _, y in parts])),
        "test_x": images(test_data),
        "test_y": torch.from_numpy(test_labels),
    }


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _default_opener(url: str) -> BinaryIO:
    return urllib.request.urlopen(url, timeout=60)


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract only regular files and folders under ``cifar-10-batches-py/``.

    A tarball is untrusted input: a member named ``../x`` or ``/etc/x``, or a link, could write
    outside ``dest``. Besides checking names ourselves, Python's ``data`` filter (3.12, backported
    to 3.8.17+) enforces the same rules.
    """
    with tarfile.open(archive, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if m.name.startswith(("/", "\\")) or ".." in parts or not parts or parts[0] != FOLDER:
                raise MetaoptError(f"{archive}: unexpected member {m.name!r}; refusing to extract")
            if not (m.isfile() or m.isdir()):
                raise MetaoptError(f"{archive}: member {m.name!r} is not a regular file; refusing to extract")
            members.append(m)
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kwargs)


def download_cifar10(
    root: str | os.PathLike,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
    opener: Callable[[str], BinaryIO] = _default_opener,
) -> Path:
    """Fetch and unpack CIFAR-10 into ``<root>/cifar-10-batches-py`` unless it is already there.

    The archive is streamed to ``<root>/cifar-10-python.tar.gz.part``, checked against ``md5``
    (a mismatch deletes it and raises :class:`ChecksumError`), renamed, then unpacked into a
    temporary folder that is moved into place, so an interrupted run leaves no half-written
    dataset. A verified archive already in ``root`` is reused. ``url`` and ``opener`` exist for
    mirrors and for tests.
    """
    root = Path(root)
    folder = cifar10_folder(root)
    if not missing_files(root):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    archive = root / ARCHIVE_NAME
    if not archive.is_file() or md5sum(archive) != md5:
        part = archive.with_name(ARCHIVE_NAME + ".part")
        try:
            with opener(url) as response, open(part, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
        # urllib's URLError and socket timeouts are OSErrors; a connection closed early mid-body
        # raises http.client.IncompleteRead, an HTTPException.
        except (OSError, http.client.HTTPException) as e:
            part.unlink(missing_ok=True)
            raise DataNotFoundError(
                f"could not download CIFAR-10 from {url} ({e}); place the python-version pickles in {folder}"
            ) from e
        digest = md5sum(part)
        if digest != md5:
            part.unlink()
            raise ChecksumError(
                f"{url}: MD5 {digest} does not match the published {md5}; the download is corrupt, try again"
            )
        os.replace(part, archive)
    with tempfile.TemporaryDirectory(dir=root, prefix=".cifar10-extract-") as tmp:
        _safe_extract(archive, Path(tmp))
        extracted = Path(tmp) / FOLDER
        if missing_files(tmp):
            raise MetaoptError(f"{archive}: archive lacks {', '.join(missing_files(tmp))}")
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete earlier copy
        os.replace(extracted, folder)
    return folder


# -- fake data in the genuine format, for tests -----------------------------------------------


def _fake_images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    # Class-dependent mean colours under noise: learnable, so tests can check that training helps.
    base = np.linspace(30, 225, 10)[labels][:, None]
    channel = (np.arange(3072) // 1024)[None, :] * 20
    noise = rng.normal(0, 25, size=(len(labels), 3072))
    return np.clip(base + channel + noise, 0, 255).astype(np.uint8)


def write_fake_cifar10(
    root: str | os.PathLike,
    n_train: int = 100,
    n_test: int = 20,
    seed: int = 0,
) -> Path:
    """Write a small random CIFAR-10 in the genuine format under ``<root>/cifar-10-batches-py``.

    ``n_train`` images are spread over the five training batches (the last takes the remainder).
    Images depend on the label, so a model can learn them. Returns the folder.
    """
    rng = np.random.default_rng(seed)
    folder = cifar10_folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [n_train // 5] * 4 + [n_train - 4 * (n_train // 5)]
    for i, (name, size) in enumerate(zip((*TRAIN_FILES, TEST_FILE), (*sizes, n_test))):
        labels = rng.integers(0, 10, size=size)
        label = f"training batch {i + 1} of 5" if name != TEST_FILE else "testing batch 1 of 1"
        entry = {
            b"batch_label": label.encode(),
            b"labels": [int(v) for v in labels],
            b"data": _fake_images(rng, labels),
            b"filenames": [f"fake_{name}_{j}.png".encode() for j in range(size)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {
        b"label_names": [c.encode() for c in CLASSES],
        b"num_cases_per_batch": max(sizes),
        b"num_vis": 3072,
    }
    with open(folder / META_FILE, "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def write_fake_cifar10_archive(
    path: str | os.PathLike, n_train: int = 100, n_test: int = 20, seed: int = 0
) -> str:
    """Write a fake ``cifar-10-python.tar.gz`` at ``path``; returns its MD5 (for download tests)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_fake_cifar10(tmp, n_train, n_test, seed)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(cifar10_folder(tmp), arcname=FOLDER)
    Path(path).write_bytes(buf.getvalue())
    return hashlib.md5(buf.getvalue(), usedforsecurity=False).hexdigest()
