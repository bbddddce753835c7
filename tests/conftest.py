"""Shared fixtures: tiny datasets in the real on-disk formats, so torchvision's own loaders run."""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest


def _cifar_images(n: int, offset: int) -> np.ndarray:
    """n CIFAR rows (3·32·32 bytes, channel-major): image i has value i + offset + 50·c in channel c."""
    values = (np.arange(n)[:, None] + offset + 50 * np.arange(3)[None, :]).astype(np.uint8)  # (n, 3)
    return np.repeat(values, 32 * 32, axis=1).reshape(n, 3 * 32 * 32)


@pytest.fixture
def tiny_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 100-train / 20-test CIFAR-10 in the python-pickle batch format; returns its root.

    Image i's pixels encode i (see `_cifar_images`) and its label is i % 10. The real files' MD5
    sums are replaced by these files' on the dataset class for the test's duration only.
    """
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    def write(name: str, obj: object) -> list[str]:
        (folder / name).write_bytes(pickle.dumps(obj))
        return [name, hashlib.md5((folder / name).read_bytes()).hexdigest()]

    train_list = []
    for b in range(5):
        first = 20 * b
        labels = [(first + i) % 10 for i in range(20)]
        train_list.append(write(f"data_batch_{b + 1}", {"data": _cifar_images(20, first), "labels": labels}))
    test_list = [write("test_batch", {"data": _cifar_images(20, 100), "labels": [i % 10 for i in range(20)]})]
    meta_name, meta_md5 = write("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", test_list)
    monkeypatch.setattr(CIFAR10, "meta", {"filename": meta_name, "key": "label_names", "md5": meta_md5})
    return tmp_path


def write_idx_mnist(raw: Path, prefix: str, n: int, seed: int) -> None:
    """Write `prefix`-images-idx3-ubyte and -labels-idx1-ubyte (the real big-endian idx format)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.uint8) % 10
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = labels  # a marker to check that images and labels stay paired
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    """A 60-train / 20-test MNIST under root/MNIST/raw in idx-ubyte format; returns the root."""
    write_idx_mnist(tmp_path / "MNIST" / "raw", "train", 60, seed=0)
    write_idx_mnist(tmp_path / "MNIST" / "raw", "t10k", 20, seed=1)
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def signing_key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sweeps sign their folders with a key in the user's config dir: the tests' own, not the real one.

    Set in the environment, so the sweeps the tests start in subprocesses use the same key.
    """
    import os

    folder = tmp_path_factory.mktemp("config-home")
    os.environ["XDG_CONFIG_HOME"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) for the whole test session, started by the first test that needs it.

    Starting Ray costs seconds; `oialr_tune.tuning.sweep` uses an already initialized Ray and leaves
    it running, so every sweep test shares this one. Tests that need their own Ray (a multi-node
    cluster, a driver to kill) run it in a subprocess.
    """
    import logging

    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    yield ray
    if started:
        ray.shutdown()
