"""A user's data by import path: ``data: {name: "package.module:function", args: {...}}``.

The function is called with ``data.args`` as keyword arguments and returns ``(train, val, test)``
``torch.utils.data.Dataset``\\ s yielding ``(input_tensor, target)``; `val` and `test` may be None.

* A missing val is carved from train with ``data.split_seed`` and ``data.val_fraction``
  (stratified when the targets are class labels), the same examples in every trial.
* A missing test leaves an empty test split: retrain says so instead of inventing a score.
* The input shape comes from the first example, and the outputs from the targets: integer scalar
  targets are class labels (classes = max + 1), float or vector targets are regression values
  (width = their size). ``data.args.in_shape`` / ``data.args.num_outputs`` override the inference
  and are not passed to the function.
* Small datasets (up to `MAX_ON_DEVICE_BYTES`) are read once into tensors on the training device,
  like the built-in ones; larger ones stay Datasets and go through a DataLoader with
  ``data.num_workers`` workers. Examples are given to the model as they are (no normalisation, no
  augmentation: that is the dataset's business).
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from oialr_tune import plugins
from oialr_tune.config import DataConfig
from oialr_tune.errors import UserError
from oialr_tune.splits import Splits, TensorData, stratified_split

MAX_ON_DEVICE_BYTES = 512 * 2**20
RESERVED_ARGS = ("in_shape", "num_outputs")


def _example(ds: Any, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first example of a split as tensors; a wrong form is one line naming data.name."""
    if not isinstance(ds, Dataset) or not isinstance(ds, Sized):
        raise UserError(f"data.name: {name} returned a {type(ds).__name__} as {split}, not a sized torch Dataset")
    if len(ds) == 0:
        raise UserError(f"data.name: {name} returned an empty {split} dataset")
    try:
        item = plugins.call(ds.__getitem__, name, "data.name", 0)
    except UserError as e:
        raise UserError(f"{e} (reading {split}[0])") from None
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise UserError(f"data.name: {name}'s {split}[0] must be (input_tensor, target), got {type(item).__name__}")
    x, y = item
    if not isinstance(x, torch.Tensor):
        raise UserError(f"data.name: {name}'s {split} inputs must be tensors, got {type(x).__name__}")
    try:
        return x, torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"data.name: {name}'s {split} targets must be numbers or tensors, got {y!r}") from None


def _materialize(ds: Dataset, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All examples of a small dataset as two stacked tensors (one pass of a DataLoader)."""
    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=512, num_workers=num_workers):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys)


def _is_labels(y: torch.Tensor) -> bool:
    """Integer scalar targets are class labels (anything else is a regression target)."""
    return y.ndim == 1 and not y.is_floating_point() and not y.is_complex()


def load_user_data(cfg: DataConfig, device: torch.device, seed: int) -> Splits:
    """Call the user's data function and turn its datasets into `Splits` (see the module docstring)."""
    args = {k: v for k, v in cfg.args.items() if k not in RESERVED_ARGS}
    fn = plugins.resolve(cfg.name, "data.name")
    out = plugins.call(fn, cfg.name, "data.name", **args)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        got = f"a tuple of {len(out)}" if isinstance(out, (tuple, list)) else f"a {type(out).__name__}"
        raise UserError(f"data.name: {cfg.name} must return (train, val, test) datasets, got {got}")
    train, val, test = out
    x0, _ = _example(train, cfg.name, "train")
    for split, ds in (("val", val), ("test", test)):
        if ds is not None:
            _example(ds, cfg.name, split)
    in_shape = tuple(cfg.args.get("in_shape") or x0.shape)

    per_example = x0.element_size() * x0.numel()
    total = sum(len(d) for d in (train, val, test) if d is not None)  # type: ignore[arg-type]
    if per_example * total <= MAX_ON_DEVICE_BYTES:
        return _on_device(cfg, device, seed, train, val, test, in_shape)
    return _through_loader(cfg, device, seed, train, val, test, in_shape)


def _outputs(cfg: DataConfig, y: torch.Tensor) -> tuple[int, int]:
    """(classes, target width) from all training targets; ``data.args.num_outputs`` overrides both."""
    given = cfg.args.get("num_outputs")
    if given is not None:
        return int(given), int(given)
    width = int(np.prod(y.shape[1:])) if y.ndim > 1 else 1
    if _is_labels(y):
        if y.min() < 0:
            raise UserError(f"data.name: {cfg.name}'s class labels must be >= 0, got {int(y.min())}")
        return int(y.max()) + 1, width
    return 0, width


def _on_device(cfg: DataConfig, device: torch.device, seed: int, train: Dataset, val: Dataset | None,
               test: Dataset | None, in_shape: tuple[int, ...]) -> Splits:
    x, y = _materialize(train, cfg.num_workers)
    classes, width = _outputs(cfg, y)
    one, zero = torch.ones((), device=device), torch.zeros((), device=device)

    def pack(xs: torch.Tensor, ys: torch.Tensor) -> TensorData:
        return TensorData(xs.to(device), ys.to(device), one, zero, normalize=False)

    if val is None:
        labels = y.numpy() if _is_labels(y) else np.zeros(len(y), dtype=np.int64)
        tr, va = stratified_split(labels, [cfg.val_fraction], seed)
        tr_t, va_t = torch.as_tensor(tr), torch.as_tensor(va)
        train_d, val_d = pack(x[tr_t], y[tr_t]), pack(x[va_t], y[va_t])
    else:
        train_d, val_d = pack(x, y), pack(*_materialize(val, cfg.num_workers))
    test_d = pack(*_materialize(test, cfg.num_workers)) if test is not None else pack(x[:0], y[:0])
    return Splits(cfg.name, train_d, val_d, test_d, in_shape, classes, device, target_width=width)


def _through_loader(cfg: DataConfig, device: torch.device, seed: int, train: Dataset, val: Dataset | None,
                    test: Dataset | None, in_shape: tuple[int, ...]) -> Splits:
    targets = getattr(train, "targets", None)
    if cfg.args.get("num_outputs") is None and targets is None:
        raise UserError(
            f"data.args.num_outputs: required for {cfg.name}: its train set is too large to read its targets "
            f"and has no .targets attribute"
        )
    y = torch.as_tensor(np.asarray(targets)) if targets is not None else torch.zeros(0)
    classes, width = _outputs(cfg, y)
    if val is None:
        n = len(train)  # type: ignore[arg-type]
        order = np.random.default_rng(seed).permutation(n)
        k = max(1, round(cfg.val_fraction * n))
        val, train = Subset(train, np.sort(order[:k]).tolist()), Subset(train, np.sort(order[k:]).tolist())
    test = test if test is not None else Subset(train, [])
    return Splits(cfg.name, train, val, test, in_shape, classes, device, num_workers=cfg.num_workers,
                  target_width=width)
