"""Checks of the user code a config names, run once before a sweep starts (and the output check per run).

A YAML file can only say *where* a user's model, data, loss or training loop is; whether the module
imports, the function exists, the data has the right form and the model fits the data is only
known by running them. `check_user_code` does that on the driver, before Ray starts and before
anything is written, so each mistake is one line (``oialr-tune: error: model.name: ...``) instead
of every trial failing on a worker.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from oialr_tune import plugins
from oialr_tune.config import DATASETS, TrainConfig, train_config_to_dict
from oialr_tune.data import load_data
from oialr_tune.errors import UserError
from oialr_tune.models import MODELS, build_model
from oialr_tune.splits import Splits


def check_model_output(model: nn.Module, splits: Splits, task: str, name: str) -> None:
    """One forward pass on one training example: the output must be (1, num_outputs).

    Run in eval mode (BatchNorm cannot train on one example) without gradients, on the model's
    device; the model's mode is restored.
    """
    x, _ = next(iter(splits.loader("train", 1)))
    expected = splits.num_outputs(task)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = plugins.call(model, name, "model.name", x.to(next(model.parameters(), x).device))
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise UserError(f"model.name: {name} returned a {type(out).__name__} from forward, not a tensor")
    if out.ndim < 2 or out.shape[0] != 1 or out[0].numel() != expected:
        what = "classes" if task == "classification" else "target values"
        raise UserError(
            f"model.name: {name} outputs shape {tuple(out.shape)} for one example of shape {tuple(x.shape[1:])}, "
            f"but the data has {expected} {what} (expected (1, {expected}))"
        )


def _check_trainable(cfg: TrainConfig) -> None:
    fn = plugins.resolve(cfg.trainable, "trainable")
    try:
        inspect.signature(fn).bind(cfg, None)
    except TypeError:
        raise UserError(f"trainable: {cfg.trainable} must take (config, trial)") from None
    except ValueError:  # no signature to read (a builtin): let the call tell
        pass


def check_user_code(cfg: TrainConfig) -> None:
    """Resolve every import path `cfg` names; build its data and model once and check they fit.

    Does nothing for a config of built-in parts only. Raises UserError with one line naming the
    key. Loads the data on the CPU (cached for this process).
    """
    names = plugins.names_in(train_config_to_dict(cfg))
    for name in names:
        plugins.resolve(name, _key_of(cfg, name))
    if cfg.trainable is not None:
        _check_trainable(cfg)
        return
    builtin = cfg.model.name in MODELS and cfg.data.name in DATASETS and cfg.task == "classification"
    if builtin:
        return
    splits = load_data(cfg.data, "cpu")
    if cfg.task == "classification" and splits.num_classes < 2:
        raise UserError(
            f"task: classification needs integer class labels (at least 2 classes) but data.name {cfg.data.name}'s "
            f"targets are not; use task: regression for numeric targets"
        )
    model = build_model(cfg.model.name, splits.in_shape, splits.num_outputs(cfg.task), **cfg.model.args)
    check_model_output(model, splits, cfg.task, cfg.model.name)


def _key_of(cfg: TrainConfig, name: str) -> str:
    """The config key that names `name` (for the error message)."""
    if cfg.model.name == name:
        return "model.name"
    if cfg.data.name == name:
        return "data.name"
    if cfg.trainable == name:
        return "trainable"
    if cfg.loss == name:
        return "loss"
    return next(f"metrics.{k}" for k, v in cfg.metrics.items() if v == name)
