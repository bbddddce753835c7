"""What a loaded dataset is: `Splits` (train / validation / test) and the loaders that batch them.

Built by `oialr_tune.data` (the built-in datasets) and `oialr_tune.user_data` (a user's data
function), and read by the trainer. Small datasets are `TensorData` held on the training device,
batched by a `TensorLoader` (shuffling and augmentation on the device, no worker process); larger
ones stay torch Datasets and go through a `DeviceLoader` (DataLoader workers, pinned memory).

A batch is ``(inputs, targets)``. The inputs are a tensor, or for a user's dict examples (Hugging
Face style, batched by the data's `collate_fn`) a dict of named input tensors: the collated batch
without its ``labels`` entry, which holds the targets (`LABELS`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from oialr_tune.errors import UserError

Inputs = torch.Tensor | dict[str, torch.Tensor]  # a tensor, or named inputs (the model is called with **inputs)
Batch = tuple[Inputs, torch.Tensor]
LABELS = "labels"  # the entry of a dict batch holding the targets (Hugging Face's name)


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a collated batch: a dict's `LABELS` entry and the rest, or a pair as it is.

    Raises KeyError for a dict without `LABELS` and ValueError for anything but a dict or a pair.
    """
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != LABELS}, batch[LABELS]
    x, y = batch
    return x, y


def to_device(x: Inputs, device: torch.device, non_blocking: bool = False) -> Inputs:
    """Batch inputs (a tensor or a dict of tensors) on `device`."""
    if isinstance(x, Mapping):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in x.items()}
    return x.to(device, non_blocking=non_blocking)


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
    and restore it to replay the same order and crops. With `shard` = (rank, workers), each batch of
    `batch_size` is the global batch and this loader yields only the rank's share of it; every rank
    draws the same order from an identically seeded generator, so the shares never overlap.
    """

    def __init__(self, data: TensorData, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                 drop_last: bool = False, generator: torch.Generator | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format, shard: tuple[int, int] = (0, 1)):
        self.data, self.batch_size, self.shard = data, batch_size, shard
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
                if self.shard[1] > 1:
                    rank, workers = self.shard
                    idx = idx[rank * bs // workers : (rank + 1) * bs // workers]
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

    `collate_fn` batches a list of examples (None: torch's default); a collated dict is split into
    named inputs and its `LABELS` (`split_batch`). With `generator` set, the shuffle order and the
    workers' seeds are drawn from it each epoch, so its state reproduces an epoch (workers are not
    persistent for that reason).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, device: torch.device, shuffle: bool = False,
                 drop_last: bool = False, generator: torch.Generator | None = None, num_workers: int = 2,
                 memory_format: torch.memory_format = torch.contiguous_format, sampler: Sampler | None = None,
                 collate_fn: Callable[[list[Any]], Any] | None = None):
        self.device, self.memory_format, self.generator = device, memory_format, generator
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                 generator=generator, num_workers=num_workers, sampler=sampler,
                                 pin_memory=device.type == "cuda", collate_fn=collate_fn)
        self.batch_size, self.drop_last = batch_size, drop_last

    @property
    def num_examples(self) -> int:
        """Examples yielded per pass."""
        n = len(self.loader.dataset)  # type: ignore[arg-type]
        return len(self) * self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            x, y = split_batch(batch)
            if isinstance(x, Mapping):
                x = to_device(x, self.device, non_blocking=True)
            else:
                x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=True)


Loader = TensorLoader | DeviceLoader


class GlobalBatchShard(Sampler[int]):
    """A DataLoader sampler for one of several workers: each global batch of a shared shuffled order,
    this rank's share of it (as `TensorLoader`'s `shard`). Draws the order from `generator` each pass."""

    def __init__(self, n: int, batch_size: int, shard: tuple[int, int], generator: torch.Generator) -> None:
        self.n, self.batch_size, self.shard, self.generator = n, batch_size, shard, generator

    def __len__(self) -> int:
        return (self.n // self.batch_size) * (self.batch_size // self.shard[1])

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        rank, workers = self.shard
        share = self.batch_size // workers
        for i in range(self.n // self.batch_size):
            start = i * self.batch_size + rank * share
            yield from order[start : start + share]


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
    collate_fn: Callable[[list[Any]], Any] | None = None  # a user's data: batches its Dataset examples

    def num_outputs(self, task: str) -> int:
        """What the model must output for `task`: one score per class, or one value per target entry."""
        if task == "classification":
            return self.num_classes
        if self.target_width is None:
            raise UserError(f"task: regression needs numeric targets; data.name {self.name!r} has class labels")
        return self.target_width

    def loader(self, split: str, batch_size: int, *, train: bool = False, augment: bool = False,
               seed: int = 0, memory_format: torch.memory_format = torch.contiguous_format,
               shard: tuple[int, int] = (0, 1)) -> Loader:
        """Batches of `split` ("train", "val" or "test") on the device.

        `train=True` shuffles (with a generator seeded by `seed`, exposed as `loader.generator`),
        drops the last short batch (so BatchNorm never sees a batch of one and shapes stay fixed)
        and applies augmentation if `augment`. `shard` = (rank, workers) gives one of several
        data-parallel workers its share: of each global batch of `batch_size` in training, else a
        contiguous part of the split.
        """
        data = {"train": self.train, "val": self.val, "test": self.test}[split]
        rank, workers = shard
        if workers > 1 and not train:
            part = contiguous_share(len(data), rank, workers)  # type: ignore[arg-type]
            data = (dataclasses.replace(data, x=data.x[part], y=data.y[part]) if isinstance(data, TensorData)
                    else Subset(data, range(part.start, part.stop)))
            shard = (0, 1)
        drop_last = train and len(data) >= batch_size  # type: ignore[arg-type]
        if isinstance(data, TensorData):
            g = None
            if train:
                g = torch.Generator(device=self.device)
                g.manual_seed(seed)
            return TensorLoader(data, batch_size, shuffle=train, augment=augment and train,
                                drop_last=drop_last, generator=g, memory_format=memory_format, shard=shard)
        g = None
        if train:
            g = torch.Generator()  # DataLoader samplers draw on the CPU
            g.manual_seed(seed)
        ds = data.train_view if (train and augment and isinstance(data, TwoViews)) else data  # type: ignore[union-attr]
        if workers > 1:  # training: each global batch's share, drawn from the shared order
            sampler = GlobalBatchShard(len(ds), batch_size, shard, g)  # type: ignore[arg-type]
            return DeviceLoader(ds, batch_size // workers, device=self.device, sampler=sampler, generator=g,
                                num_workers=self.num_workers, memory_format=memory_format, collate_fn=self.collate_fn)
        return DeviceLoader(ds, batch_size, device=self.device, shuffle=train, drop_last=drop_last, generator=g,
                            num_workers=self.num_workers, memory_format=memory_format, collate_fn=self.collate_fn)


class TwoViews(Dataset):
    """The same examples under an evaluation transform (default) and a training one (`train_view`)."""

    def __init__(self, eval_view: Dataset, train_view: Dataset):
        self.eval_view, self.train_view = eval_view, train_view

    def __len__(self) -> int:
        return len(self.eval_view)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.eval_view[i]


def contiguous_share(n: int, rank: int, workers: int) -> slice:
    """Rank `rank`'s contiguous part of `n` examples (the first ``n % workers`` ranks get one more)."""
    base, extra = divmod(n, workers)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


# --- splitting ---------------------------------------------------------------------------------


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
