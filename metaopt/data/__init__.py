"""Dataset readers and caches. Nothing here touches the network unless asked to download."""

from metaopt.data.cifar10 import (
    ChecksumError,
    download_cifar10,
    load_cifar10,
    write_fake_cifar10,
    write_fake_cifar10_archive,
)
from metaopt.data.mnist1d import load_mnist1d

__all__ = [
    "ChecksumError",
    "download_cifar10",
    "load_cifar10",
    "load_mnist1d",
    "write_fake_cifar10",
    "write_fake_cifar10_archive",
]
