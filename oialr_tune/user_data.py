"""A user's data by import path: ``data: {name: "package.module:function", args: {...}}``.

The function is called with ``data.args`` as keyword arguments and returns ``(train, val, test)``
``torch.utils.data.Dataset``\\ s yielding ``(input_tensor, target)``; `val` and `test` may be None.

Or, Hugging Face style, ``(train, val, test, collate_fn)``: `collate_fn` turns a list of examples into
one batch, a dict of tensors with the targets under ``labels`` (e.g. ``input_ids``,
``attention_mask``, ``labels``; ``transformers.DataCollatorWithPadding`` is one) or an
``(inputs, targets)`` pair. Datasets of dict examples without a `collate_fn` are batched by torch's
default collate. Such data always go through a DataLoader with the `collate_fn` (their examples
may differ in length, so they are not stacked onto the device); the model is called with the batch's
other entries as keyword arguments, ``model(**inputs)`` (see `oialr_tune.tasks.model_outputs`). The
training labels are read once, in one pass of the `collate_fn`, for the outputs and the split below.

* A missing val is carved from train with ``data.split_seed`` and ``data.val_fraction``
  (stratified when the targets are class labels), the same examples in every trial.
* A missing test leaves an empty test split: retrain says so instead of inventing a score.
* The input shape comes from the first example (of dict examples: its ``input_ids``, else its
  first input), and the outputs from the targets: integer scalar targets are class labels
  (classes = max + 1), float or vector targets are regression values (width = their size).
  ``data.args.in_shape`` / ``data.args.num_outputs`` override the inference and are not passed to
  the function.
* Small datasets of ``(input_tensor, target)`` (up to `MAX_ON_DEVICE_BYTES`) are read once into
  tensors on the training device, like the built-in ones; larger ones stay Datasets and go through
  a DataLoader with ``data.num_workers`` workers. Examples are given to the model as they are (no
  normalisation, no augmentation: that is the dataset's business).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from oialr_tune import plugins
from oialr_tune.config import DataConfig
from oialr_tune.errors import UserError
from oialr_tune.splits import LABELS, Splits, TensorData, split_batch, stratified_split

MAX_ON_DEVICE_BYTES = 512 * 2**20
RESERVED_ARGS = ("in_shape", "num_outputs")


Collate = Callable[[list[Any]], Any]


def _first(ds: Any, name: str, split: str) -> Any:
    """The first example of a split, as the dataset gives it; not a sized Dataset, empty: one line."""
    if not isinstance(ds, Dataset) or not isinstance(ds, Sized):
        raise UserError(f"data.name: {name} returned a {type(ds).__name__} as {split}, not a sized torch Dataset")
    if len(ds) == 0:
        raise UserError(f"data.name: {name} returned an empty {split} dataset")
    try:
        return plugins.call(ds.__getitem__, name, "data.name", 0)
    except UserError as e:
        raise UserError(f"{e} (reading {split}[0])") from None


def _example(ds: Any, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first example of a split as tensors; a wrong form is one line naming data.name."""
    item = _first(ds, name, split)
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


def _first_batch(ds: Dataset, collate: Collate, name: str, split: str) -> tuple[Any, torch.Tensor]:
    """The first example of a split collated into a batch of one, as (inputs, targets); a wrong form is one line."""
    item = _first(ds, name, split)
    try:
        batch = plugins.call(collate, name, "data.name", [item])
    except UserError as e:
        raise UserError(f"{e} (collating {split}[0])") from None
    try:
        x, y = split_batch(batch)
    except KeyError:
        raise UserError(f"data.name: {name}'s {split} batches need a {LABELS!r} entry (the targets), got keys "
                        f"{sorted(batch)}") from None  # fmt: skip
    except (TypeError, ValueError):
        raise UserError(f"data.name: {name}'s collate_fn must return a dict with {LABELS!r} or an (inputs, "
                        f"targets) pair, got {type(batch).__name__}") from None  # fmt: skip
    inputs = x.values() if isinstance(x, Mapping) else [x]
    if not inputs or not all(isinstance(v, torch.Tensor) for v in inputs) or not isinstance(y, torch.Tensor):
        raise UserError(f"data.name: {name}'s {split} batches must hold tensors, got inputs {type(x).__name__} "
                        f"and targets {type(y).__name__}")  # fmt: skip
    return x, y


def _returned(out: Any, name: str) -> tuple[Any, Any, Any, Collate | None]:
    """(train, val, test, collate_fn or None) from what the data function returned; another form is one line."""
    if not isinstance(out, (tuple, list)) or len(out) not in (3, 4):
        got = f"a tuple of {len(out)}" if isinstance(out, (tuple, list)) else f"a {type(out).__name__}"
        raise UserError(f"data.name: {name} must return (train, val, test) datasets or (train, val, test, "
                        f"collate_fn), got {got}")  # fmt: skip
    collate = out[3] if len(out) == 4 else None
    if collate is not None and not callable(collate):
        raise UserError(f"data.name: {name} returned a {type(collate).__name__} as collate_fn, not a function")
    return out[0], out[1], out[2], collate


def load_user_data(cfg: DataConfig, device: torch.device, seed: int) -> Splits:
    """Call the user's data function and turn its datasets into `Splits` (see the module docstring)."""
    args = {k: v for k, v in cfg.args.items() if k not in RESERVED_ARGS}
    fn = plugins.resolve(cfg.name, "data.name")
    train, val, test, collate = _returned(plugins.call(fn, cfg.name, "data.name", **args), cfg.name)
    if collate is not None or isinstance(_first(train, cfg.name, "train"), Mapping):
        return _collated(cfg, device, seed, train, val, test, collate or default_collate)
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


def _collated(cfg: DataConfig, device: torch.device, seed: int, train: Dataset, val: Dataset | None,
              test: Dataset | None, collate: Collate) -> Splits:
    """Splits of data batched by `collate` (dict examples, Hugging Face style): Datasets behind a DataLoader."""
    x0, _ = _first_batch(train, collate, cfg.name, "train")
    for split, ds in (("val", val), ("test", test)):
        if ds is not None:
            _first_batch(ds, collate, cfg.name, split)
    first_input = x0.get("input_ids", next(iter(x0.values()))) if isinstance(x0, Mapping) else x0
    in_shape = tuple(cfg.args.get("in_shape") or first_input.shape[1:])
    loader = DataLoader(train, batch_size=512, collate_fn=collate, num_workers=cfg.num_workers)
    ys = [torch.as_tensor(split_batch(b)[1]) for b in loader]
    if ys[0].ndim > 1 and not ys[0].is_floating_point():
        raise UserError(f"data.name: {cfg.name}'s {LABELS} have shape {tuple(ys[0].shape)} per batch: one class "
                        f"label per example is supported (sequence classification), not one per token")  # fmt: skip
    y = torch.cat(ys)
    classes, width = _outputs(cfg, y)
    if val is None:
        labels = y.numpy() if _is_labels(y) else np.zeros(len(y), dtype=np.int64)
        tr, va = stratified_split(labels, [cfg.val_fraction], seed)
        train, val = Subset(train, tr.tolist()), Subset(train, va.tolist())
    test = test if test is not None else Subset(train, [])
    return Splits(cfg.name, train, val, test, in_shape, classes, device, num_workers=cfg.num_workers,
                  target_width=width, collate_fn=collate)
