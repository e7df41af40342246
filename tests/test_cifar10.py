"""CIFAR-10 reading, download checks and augmentation, all offline (fake data in the real format)."""

from __future__ import annotations

import http.client
import io
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from metaopt.data import cifar10
from metaopt.data.cifar10 import (
    ChecksumError,
    download_cifar10,
    load_cifar10,
    write_fake_cifar10,
    write_fake_cifar10_archive,
)
from metaopt.errors import DataNotFoundError, MetaoptError
from metaopt.tasks import ResNetCIFAR10


def small_resnet(root: Path, **kwargs) -> ResNetCIFAR10:
    args = {"depth": 8, "width": 4, "batch_size": 8, "n_val": 10, "eval_batch_size": 16, "data_dir": str(root)}
    return ResNetCIFAR10(**{**args, **kwargs})


def test_reads_the_genuine_format(tmp_path):
    write_fake_cifar10(tmp_path, n_train=23, n_test=7)
    folder = tmp_path / "cifar-10-batches-py"
    # Overwrite one batch by hand, as the original Python 2 pickles are laid out.
    pixels = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072) % 256
    entry = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 9],
             b"data": pixels.astype(np.uint8), b"filenames": [b"a.png", b"b.png"]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(entry, protocol=2))
    meta = pickle.loads((folder / "batches.meta").read_bytes(), encoding="bytes")
    assert meta[b"label_names"][0] == b"airplane" and meta[b"num_vis"] == 3072

    data = load_cifar10(tmp_path)
    assert data["train_x"].dtype == torch.uint8 and data["train_x"].shape == (2 + 4 + 4 + 4 + 7, 3, 32, 32)
    assert data["train_y"].dtype == torch.int64 and data["train_y"][:2].tolist() == [3, 9]
    assert data["test_x"].shape == (7, 3, 32, 32) and data["test_y"].shape == (7,)
    # Row-major 32x32 planes, red then green then blue.
    image = data["train_x"][0]
    assert image[0, 0, 1].item() == 1
    assert image[0, 1, 0].item() == 32
    assert image[1, 0, 0].item() == 1024 % 256


def test_missing_data_is_a_one_line_error_naming_the_directory(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        small_resnet(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "task.data_dir" in message and "task.download=true" in message
    # A partial copy names what is missing.
    write_fake_cifar10(tmp_path, n_train=20, n_test=5)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataNotFoundError, match="missing data_batch_4"):
        load_cifar10(tmp_path)
    with pytest.raises(DataNotFoundError, match=r"^task\.data_dir: .*missing data_batch_4"):
        small_resnet(tmp_path)


def test_failed_download_is_a_one_line_data_error(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("Temporary failure in name resolution")

    with pytest.raises(DataNotFoundError) as info:
        download_cifar10(tmp_path, opener=offline)
    assert "\n" not in str(info.value) and cifar10.CIFAR10_URL in str(info.value)
    assert not list(tmp_path.glob("*.part"))

    # The task's own path to the network, cut at urllib so nothing is ever fetched.
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataNotFoundError, match=r"^task\.download: could not download"):
        small_resnet(tmp_path, download=True)


def test_download_cut_off_mid_stream_is_a_one_line_data_error(tmp_path):
    class CutOff(io.BytesIO):
        def read(self, *args):
            if self.tell():
                raise http.client.IncompleteRead(b"", 100)
            return super().read(*args)

    with pytest.raises(DataNotFoundError, match=r"could not download .*IncompleteRead"):
        download_cifar10(tmp_path, opener=lambda url: CutOff(b"x" * 10))
    assert not list(tmp_path.glob("*.part"))


def test_download_extracts_a_verified_archive(tmp_path):
    source = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    source.parent.mkdir()
    md5 = write_fake_cifar10_archive(source, n_train=30, n_test=10)
    root = tmp_path / "data"
    folder = download_cifar10(root, url=source.as_uri(), md5=md5)
    assert folder == root / "cifar-10-batches-py"
    assert load_cifar10(root)["train_x"].shape[0] == 30
    assert (root / "cifar-10-python.tar.gz").is_file()
    assert not list(root.glob(".cifar10-extract-*")) and not list(root.glob("*.part"))

    def no_network(url):
        raise AssertionError("the dataset is present; nothing should be fetched")

    download_cifar10(root, url="https://invalid.example", md5=md5, opener=no_network)


def test_task_download_flag_uses_download(tmp_path, monkeypatch):
    md5 = write_fake_cifar10_archive(tmp_path / "archive.tar.gz", n_train=40, n_test=10)
    payload = (tmp_path / "archive.tar.gz").read_bytes()
    requested = []

    def opener(url):
        requested.append(url)
        return io.BytesIO(payload)

    def fake_download(root):
        return download_cifar10(root, md5=md5, opener=opener)

    monkeypatch.setattr(cifar10, "download_cifar10", fake_download)
    task = small_resnet(tmp_path / "data", download=True)
    assert requested == [cifar10.CIFAR10_URL]
    assert task.num_train == 30


def test_checksum_mismatch_is_rejected(tmp_path):
    source = tmp_path / "archive.tar.gz"
    write_fake_cifar10_archive(source, n_train=10, n_test=5)
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match="MD5"):
        download_cifar10(root, url=source.as_uri())  # the genuine MD5 cannot match a fake
    assert not (root / "cifar-10-batches-py").exists()
    assert list(root.iterdir()) == []  # the bad download is deleted
    assert issubclass(ChecksumError, MetaoptError)


def _tarball(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> str:
    import hashlib

    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink", "outside-folder"])
def test_unsafe_archives_are_not_extracted(tmp_path, kind):
    info = tarfile.TarInfo({"traversal": "cifar-10-batches-py/../../evil",
                            "absolute": "/tmp/evil",
                            "symlink": "cifar-10-batches-py/data_batch_1",
                            "outside-folder": "evil.txt"}[kind])
    data: bytes | None = b"x"
    if kind == "symlink":
        info.type, info.linkname, data = tarfile.SYMTYPE, "/etc/passwd", None
    else:
        info.size = 1
    archive = tmp_path / "bad.tar.gz"
    md5 = _tarball(archive, [(info, data)])
    root = tmp_path / "data"
    with pytest.raises(MetaoptError, match="refusing"):
        download_cifar10(root, url=archive.as_uri(), md5=md5)
    assert not (tmp_path / "evil").exists() and not (root / "cifar-10-batches-py").exists()


# -- the task --------------------------------------------------------------------------------


@pytest.fixture()
def fake_root(tmp_path) -> Path:
    write_fake_cifar10(tmp_path, n_train=60, n_test=20)
    return tmp_path


def test_splits_and_subset(fake_root):
    task = small_resnet(fake_root)
    data = load_cifar10(fake_root)
    assert torch.equal(task.data["train"][0], data["train_x"][:50])
    assert torch.equal(task.data["validation"][0], data["train_x"][50:])
    assert torch.equal(task.data["test"][0], data["test_x"])
    assert task.splits == ("validation", "test")
    assert small_resnet(fake_root, subset=16).num_train == 16


def test_evaluation_normalises_without_augmenting(fake_root):
    task = small_resnet(fake_root)
    raw = task.data["validation"][0][:4]
    x = task.prepare(raw, None)
    mean = torch.tensor(cifar10.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cifar10.STD).view(1, 3, 1, 1)
    assert torch.allclose(x, (raw.float() / 255 - mean) / std)


def test_augmentation_is_a_crop_and_flip_deterministic_in_step(fake_root):
    task = small_resnet(fake_root)
    raw = task.data["train"][0][:6]
    clean = task.prepare(raw, None)
    out = task.prepare(raw, 5)
    assert out.shape == clean.shape
    assert torch.equal(out, task.prepare(raw, 5))
    assert not torch.equal(out, task.prepare(raw, 6))
    padded = torch.nn.functional.pad(clean, (4, 4, 4, 4))

    def crops(img):
        for dy in range(9):
            for dx in range(9):
                window = img[:, dy:dy + 32, dx:dx + 32]
                yield window
                yield window.flip(-1)

    for i in range(len(raw)):
        assert any(torch.equal(out[i], c) for c in crops(padded[i])), f"image {i} is not a crop/flip"
    no_aug = small_resnet(fake_root, augment=False)
    assert torch.equal(no_aug.prepare(raw, 5), clean)


def test_batchnorm_and_resnet_shapes(fake_root):
    task = small_resnet(fake_root)
    x, y = task.batch(0)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    assert task.model(x).shape == (8, 10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in task.model.modules())
