"""Checks run once before a sweep starts, on its machine: the user code a config names (and the output
check per run), GPUs and CPUs, dataset roots, one example through the model (`preflight`).

A YAML file can only say *where* a user's model, data, loss or training loop is; whether the module
imports, the function exists, the data has the right form and the model fits the data is only
known by running them. `check_user_code` does that on the driver, before Ray starts and before
anything is written, so each mistake is one line (``oialr-tune: error: model.name: ...``) instead
of every trial failing on a worker.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from pathlib import Path

import torch
from torch import nn

from oialr_tune import distributed, plugins
from oialr_tune.config import DATASETS, ROOT_DATASETS, TrainConfig, train_config_from_dict, train_config_to_dict
from oialr_tune.data import load_data
from oialr_tune.errors import UserError
from oialr_tune.models import MODELS, build_model
from oialr_tune.oialr import OIALR
from oialr_tune.space import SearchSpace
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


def _check_lightning(cfg: TrainConfig) -> None:
    """``lightning.module`` must be a LightningModule class and ``lightning.datamodule`` a LightningDataModule
    class; each is built once as ``Class(config)``, and between them they must give training and validation
    batches and a validation step (the tuner needs ``val_*`` metrics every epoch)."""
    try:
        import lightning.pytorch as pl
        from lightning.pytorch.utilities.model_helpers import is_overridden
    except ImportError:
        raise UserError("lightning.module: needs Lightning: pip install 'oialr-tune[lightning]'") from None
    built = {}
    for which, base in (("module", pl.LightningModule), ("datamodule", pl.LightningDataModule)):
        name, key = getattr(cfg.lightning, which), f"lightning.{which}"
        if name is None:
            continue
        cls = plugins.resolve(name, key)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise UserError(f"{key}: {name} is not a {base.__name__} subclass")
        built[which] = plugins.call(cls, name, key, cfg)
    module, datamodule = built["module"], built.get("datamodule")
    for hook in ("train_dataloader", "val_dataloader"):
        if not (is_overridden(hook, module) or (datamodule is not None and is_overridden(hook, datamodule))):
            module_name = cfg.lightning.module
            if datamodule is None:
                raise UserError(f"lightning.datamodule: not set, and lightning.module {module_name} defines no {hook}")
            raise UserError(f"lightning.datamodule: neither {cfg.lightning.datamodule} nor lightning.module "
                            f"{module_name} defines {hook}")  # fmt: skip
    if not is_overridden("validation_step", module):
        raise UserError(f"lightning.module: {cfg.lightning.module} has no validation_step; the tuner needs its "
                        f"val_* metrics every epoch")  # fmt: skip


def check_user_code(cfg: TrainConfig) -> None:
    """Resolve every import path `cfg` names; build its data and model once and check they fit.

    Does nothing for a config of built-in parts only. Raises UserError with one line naming the
    key. Loads the data on the CPU (cached for this process).
    """
    if cfg.lightning.module is not None:  # first: a missing Lightning is said under its own key
        _check_lightning(cfg)
    for key, name in plugins.code_keys(train_config_to_dict(cfg)):
        if isinstance(name, str) and plugins.is_import_path(name):
            plugins.resolve(name, key)
    if cfg.trainable is not None:
        _check_trainable(cfg)
        weights = cfg.model.weights  # loaded (and fitted to the model) by trial.build_model
        if weights is not None and not Path(weights).expanduser().is_file():
            raise UserError(f"model.weights: {Path(weights).expanduser()} does not exist (a state dict saved with "
                            f"torch.save)")  # fmt: skip
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
    model = build_model(cfg.model.name, splits.in_shape, splits.num_outputs(cfg.task), weights=cfg.model.weights,
                        **cfg.model.args)
    check_model_output(model, splits, cfg.task, cfg.model.name)
    check_layer_patterns(cfg, model)


def check_layer_patterns(cfg: TrainConfig, model: nn.Module) -> None:
    """``oialr.include`` / ``oialr.exclude`` patterns must each match a layer of the model (else a typo
    would silently factorize everything, or nothing): UserError naming the key and the pattern."""
    if not (cfg.oialr.include or cfg.oialr.exclude):
        return
    try:
        OIALR(model, torch.optim.SGD(model.parameters(), lr=0.0), include=cfg.oialr.include,
              exclude=cfg.oialr.exclude)  # fmt: skip
    except ValueError as e:
        raise UserError(f"{e}".replace("OIALR ", "oialr.", 1)) from None


# --- checks of a sweep, on the machine it runs on ---------------------------------------------------


def preflight(space: SearchSpace, *, local: bool = True) -> SearchSpace:
    """Checks that need the machine the sweep runs on, before Ray starts; returns the space to run.

    On a local sweep (`local`): GPUs must exist if trials ask for them, per-trial CPUs must fit the
    machine, a dataset root must exist, and the base config's data must load and one example go
    through its model (:func:`_check_one_example`), started from ``model.weights`` when given.
    Trials run in their own working directories, so a relative ``data.root`` or ``model.weights`` is
    made absolute here (on a cluster it is left as given: it names a path on the workers).
    """
    base = copy.deepcopy(space.base)
    if space.resources.workers > 1 and base.get("trainable"):
        distributed.check_loop_runs_distributed(base["trainable"], space.resources.workers, "resources.workers")
    data = base["data"]
    if data["name"] in ROOT_DATASETS and data.get("root"):
        root = Path(data["root"]).expanduser()
        if local:
            if not root.exists() and not data.get("download"):
                raise UserError(f"base.data.root: {root} does not exist (set data.download: true to fetch it)")
            data["root"] = str(root.resolve())
    if local and base["model"].get("weights"):
        base["model"]["weights"] = str(Path(base["model"]["weights"]).expanduser().resolve())
    if local:
        r = space.resources
        each = f" x {r.workers} workers" if r.workers > 1 else ""  # a multi-worker trial needs all at once
        if r.gpu > 0:
            if not torch.cuda.is_available():
                raise UserError(f"resources.gpu: {r.gpu} GPU per trial requested but this machine has no CUDA GPU")
            if r.gpu * r.workers > torch.cuda.device_count():
                raise UserError(f"resources.gpu: {r.gpu} per trial{each} but only {torch.cuda.device_count()} GPU(s)")
        cpus = os.cpu_count() or 1
        if r.cpu * r.workers > cpus:
            raise UserError(f"resources.cpu: {r.cpu} per trial{each} but this machine has {cpus} CPU(s)")
        try:
            check_run(train_config_from_dict(base))
        except UserError as e:  # the keys are the space's: under base.
            raise UserError(f"base.{e}") from None
    return dataclasses.replace(space, base=base)


def check_run(cfg: TrainConfig) -> None:
    """The checks one run gets before it trains, on this machine: the user code `cfg` names (resolved,
    its data and model built once and fitted together, :func:`check_user_code`) or, for built-in parts,
    one example through the model (:func:`_check_one_example`). A sweep runs them on its base config,
    ``oialr-tune train`` on its config: the same mistake is the same one line in both."""
    if plugins.uses_user_code(train_config_to_dict(cfg)):
        check_user_code(cfg)
    else:
        _check_one_example(cfg)


def _check_one_example(cfg: TrainConfig) -> None:
    """Load the config's data and pass one example through its model, on the CPU, in eval mode.

    What only running can tell (a missing optional package such as mlxtend, a model argument that
    does not fit the images, unreadable dataset files) would otherwise fail every trial inside Ray,
    with a traceback each, and leave a sweep of nothing. It costs the data loading and one forward
    pass; the data stay cached in this process.
    """
    splits = load_data(cfg.data, "cpu")
    x, _ = next(iter(dataclasses.replace(splits, num_workers=0).loader("train", 1)))
    model = build_model(cfg.model.name, splits.in_shape, splits.num_classes, weights=cfg.model.weights,
                        **cfg.model.args)
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as e:  # the CLI prints a multi-line message as one line
        raise UserError(
            f"model: one {cfg.data.name} example does not go through {cfg.model.name} ({type(e).__name__}: {e})"
        ) from None
    check_layer_patterns(cfg, model)
