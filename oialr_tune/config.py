"""Typed training configuration: dataclasses loaded from YAML and validated once, at the edge.

One `TrainConfig` describes one training run (a Ray Tune trial, a retrain, a test). It is built
only through `train_config_from_dict` / `load_train_config`, which check every key, type and range
and raise `UserError` naming the dotted key (``optimizer.lr: must be > 0, got -1``), so the trainer
can trust what it is given. `train_config_to_dict` gives back plain YAML-dumpable data, and
``train_config_from_dict(train_config_to_dict(cfg)) == cfg``.

The rules live next to the fields (``field(metadata=...)``) so a new option is one line here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from oialr_tune import plugins
from oialr_tune.errors import UserError
from oialr_tune.files import read_text
from oialr_tune.models import check_model_args
from oialr_tune.schema import dataclass_from_dict, ge, gt, rule, within

# Seeds reach NumPy's and Optuna's generators, which take [0, 2**32 - 1] (torch takes more). One
# range for every seed (trainer, split, sweep, retrain) means a seed the config accepted cannot
# fail later, inside a trial or after Ray has started.
MAX_SEED = 2**32 - 1
_seed_range = within(0, MAX_SEED)


def check_seed(seed: int, key: str) -> int:
    """`seed` if it is in [0, MAX_SEED]; else UserError naming `key` (for seeds set outside a config)."""
    problem = _seed_range(seed)
    if problem:
        raise UserError(f"{key}: {problem}, got {seed}")
    return seed


# --- the schema --------------------------------------------------------------------------------

# The built-in datasets. Written out here because reading a config must not import torch, which
# `oialr_tune.data` (their loaders, `data._LOADERS`) does; tests/test_data.py pins the two together.
DATASETS = ("digits", "mnist5k", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "synthetic")
# Datasets read from `data.root` (the others ship inside installed packages or are generated).
ROOT_DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder")


@dataclass
class ModelConfig:
    """Which network to build; `args` go to its builder in `oialr_tune.models` (checked there).

    `name` is a catalogue name (a key of `oialr_tune.models.MODELS`: mlp, cnn, ...),
    ``"torchvision:<name>"``, ``"timm:<name>"`` or a user's ``"package.module:function"``.

    `weights` is a local state dict (``torch.save(model.state_dict(), PATH)``, or a checkpoint
    holding one under ``model``/``state_dict``) that any of them starts from instead of its
    initialisation: fine-tuning. Read with an allow-list (`oialr_tune.safe_load`); every key must
    fit the model (`oialr_tune.models.load_weights`).
    """

    name: str = "mlp"
    args: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None


@dataclass
class SyntheticConfig:
    """Random images and labels, for throughput benchmarks only (nothing to learn)."""

    num_examples: int = rule(ge(8), 4096)
    image_size: int = rule(ge(4), 32)
    channels: int = rule(ge(1), 3)
    num_classes: int = rule(ge(2), 10)


@dataclass
class DataConfig:
    """Where the examples come from and how they are split.

    The split seed is fixed (`split_seed`, not the run's `seed`) so every trial of a sweep and every
    retrain sees the same validation and test examples.

    `name` is a built-in dataset or a user's ``"package.module:function"``, called with `args` as
    keyword arguments and returning ``(train, val, test)`` Datasets (see `oialr_tune.user_data`).
    """

    name: str = "digits"
    args: dict[str, Any] = field(default_factory=dict)
    root: str | None = None
    download: bool = False
    val_fraction: float = rule(within(0, 1, lo_open=True, hi_open=True), 0.15)
    test_fraction: float = rule(within(0, 1, lo_open=True, hi_open=True), 0.15)
    augment: bool = True
    num_workers: int = rule(ge(0), 2)
    split_seed: int = rule(_seed_range, 0)
    image_size: int = rule(ge(8), 224)  # imagefolder only: side of the square crops
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimizerConfig:
    """AdamW or SGD. `momentum`/`nesterov` apply to SGD, `betas` to AdamW.

    `weight_decay_on`: ``matrices`` (ours: weights and kernels only, not biases or norm scales) or
    ``all`` (the authors': every parameter, in one group).
    """

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = rule(gt(0), 1e-3)
    weight_decay: float = rule(ge(0), 0.01)
    weight_decay_on: Literal["matrices", "all"] = "matrices"
    momentum: float = rule(within(0, 1, hi_open=True), 0.9)
    betas: tuple[float, float] = (0.9, 0.999)
    nesterov: bool = False


@dataclass
class ScheduleConfig:
    """Epochs, batch size and the per-step learning-rate curve (see `trainer.lr_at`).

    ``decay: timm_cosine`` is timm's `CosineLRScheduler` stepped per update, as the authors train:
    warm-up from ``warmup_lr_fraction × lr``, then `cycles` cosine cycles (each `cycle_mul` times
    longer and peaking `cycle_decay` times lower than the one before) that fill the rest of the
    run down to ``min_lr_fraction × lr``, shaped by `k_decay`. Those four keys are read by
    ``timm_cosine`` only.

    `steps`: a user's loop that reports by optimizer step (``trial.report(step=...)``, a run of one
    long epoch) runs this many steps; it is done at step `steps`. A sweep sets it from
    ``budget.max_steps`` (its ASHA rungs are then steps).
    """

    epochs: int = rule(ge(1), 20)
    steps: int | None = rule(ge(1), None)
    batch_size: int = rule(ge(1), 64)
    warmup_fraction: float = rule(within(0, 1, hi_open=True), 0.05)
    decay: Literal["cosine", "constant", "timm_cosine"] = "cosine"
    min_lr_fraction: float = rule(within(0, 1), 0.0)
    rewarm_steps: int = rule(ge(0), 0)
    rewarm_start: float = rule(within(0, 1), 0.1)
    warmup_lr_fraction: float = rule(within(0, 1), 0.0)
    k_decay: float = rule(gt(0), 1.0)
    cycles: int = rule(ge(1), 1)
    cycle_mul: float = rule(gt(0), 1.0)
    cycle_decay: float = rule(within(0, 1, lo_open=True), 1.0)


@dataclass
class MixupConfig:
    """Mixup / CutMix on training batches through timm's `Mixup` (needs timm); on when an alpha > 0.

    `prob`: share of batches mixed; `switch_prob`: share of those that use CutMix when both alphas
    are > 0. Targets become soft (with the config's `label_smoothing` folded in).
    """

    mixup_alpha: float = rule(ge(0), 0.0)
    cutmix_alpha: float = rule(ge(0), 0.0)
    prob: float = rule(within(0, 1), 1.0)
    switch_prob: float = rule(within(0, 1), 0.5)

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclass
class OIALRConfig:
    """Arguments of the OIALR controller. `delay` < 1 is a fraction of all optimizer steps, else steps.

    Defaults were measured on digits (20 epochs, AdamW 1e-3, 5 seeds, CPU): with them an OIALR MLP
    ends at the full-rank test accuracy (98.1 %) with 25 % of its trainable parameters, a CNN at
    99.3 % with 31 %. `sigma_cutoff_fraction` is 0.2 rather than the paper's 0.1: short runs leave
    flat singular-value spectra, and at 0.1 the CNN's ranks never dropped (42 % from factorizing
    alone) and the MLP kept 48 %, with the same accuracy.

    `preset` picks the controller's rules (`oialr_tune.oialr.Rules`): ``oialr-tune`` (ours) or
    ``authors`` (the authors' final code; it has no stability gate, so `stability_threshold` is
    not used). `layer_step_fraction` None means the preset's: 1.0 for ours, 0.1 for the authors'.

    `include` / `exclude` are glob patterns on layer names (``["*.attn.*"]``, ``["head"]``): only
    matching layers (default: all eligible) and none excluded are factorized; see `OIALR`.
    """

    enabled: bool = True
    preset: Literal["oialr-tune", "authors"] = "oialr-tune"
    delay: int | float = 0.25
    stability_frequency: int = rule(ge(1), 20)
    stability_threshold: float | None = rule(within(0, 1, lo_open=True), 0.9)
    sigma_cutoff_fraction: float = rule(within(0, 1, hi_open=True), 0.2)
    min_rank: int = rule(ge(1), 1)
    keep_first_layer: bool = False
    keep_last_layer: bool = True
    layer_step_fraction: float | None = rule(within(0, 1, lo_open=True), None)
    skip_ratio: float = rule(within(0, 1, hi_open=True), 0.1)
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)


# The trainable a `lightning` section runs: Lightning's own loop around the user's module, reporting
# to the tuner through `oialr_tune.lightning.OIALRCallback`. Named by import path, not imported: reading a
# config must not import Lightning or torch.
LIGHTNING_TRAINABLE = "oialr_tune.lightning_trainable:fit"


@dataclass
class LightningConfig:
    """A LightningModule (and optionally a LightningDataModule) as the run's trainable, with no loop of yours.

    Both are ``"package.module:Class"`` import paths; each class is built as ``Class(config)``, the
    `TrainConfig` with the trial's searched values (``config.optimizer.lr``, ``config.schedule``, ...).
    Without a datamodule the module's own ``train_dataloader`` / ``val_dataloader`` are used.
    """

    module: str | None = None
    datamodule: str | None = None


@dataclass
class TrainConfig:
    """Everything one training run needs; see the module docstring for how it is built."""

    seed: int = rule(_seed_range, 0)
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    label_smoothing: float = rule(within(0, 1, hi_open=True), 0.0)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    # bf16_on_gpu: bf16 autocast on a GPU, fp32 on the CPU (the authors' `autocast: True`).
    precision: Literal["fp32", "bf16", "fp16", "bf16_on_gpu"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    checkpoint_every: int = rule(ge(0), 1)
    grad_clip: float | None = rule(gt(0), None)
    oialr: OIALRConfig = field(default_factory=OIALRConfig)
    # What is learned and how it is scored (`oialr_tune.tasks`): the default loss and metrics of
    # the task, or a user's loss ``"module:fn"`` and extra metrics ``{name: "module:fn"}``.
    task: Literal["classification", "regression"] = "classification"
    loss: str | None = None
    metrics: dict[str, str] = field(default_factory=dict)
    # A user's own training loop ``"module:function"`` f(config, trial) (`oialr_tune.loop`), run
    # instead of the built-in one.
    trainable: str | None = None
    # That loop's own settings (dropout, warm-up, ...), read as ``config.loop["dropout"]`` and
    # searched like any key (``loop.dropout``); `oialr_tune.loop` warns about one never read.
    loop: dict[str, Any] = field(default_factory=dict)
    # A LightningModule + DataModule trained by Lightning's loop: sets `trainable` to LIGHTNING_TRAINABLE.
    lightning: LightningConfig = field(default_factory=LightningConfig)
    # A trainer-level preset (`RECIPES`): it fills in the keys of the config that are not given.
    recipe: Literal["default", "authors"] = "default"


# The authors' training recipe (Helmholtz-AI-Energy/OIALR, configs/experiment/cifar10-minivit.yaml on
# top of configs/training/oialr_trainer.yaml, trainers/ortho_fix_train.py): timm's cosine schedule
# stepped per update (warm-up 10 of 300 epochs from warmup_lr 1e-5 to lr 3e-4, min_lr 1e-5, k_decay
# 0.34, cycle_decay 0.4, one cycle over the run), weight decay on every parameter in one AdamW group,
# label smoothing 0.1, bf16 autocast on the GPU. Mixup/CutMix is off, as in their ViT runs (their
# ResNet-RS run turns it on: `search_spaces/imagenet_resnetrs.yaml`). LRs are fractions of `lr` here,
# so the recipe keeps its shape at any learning rate; `lr` itself and `weight_decay` stay the config's.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "authors": {
        "optimizer": {"weight_decay_on": "all"},
        "schedule": {"decay": "timm_cosine", "warmup_fraction": 10 / 300, "warmup_lr_fraction": 1 / 30,
                     "min_lr_fraction": 1 / 30, "k_decay": 0.34, "cycles": 1, "cycle_mul": 1.0, "cycle_decay": 0.4},
        "label_smoothing": 0.1,
        "precision": "bf16_on_gpu",
    },
}


def _with_recipe(data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with its recipe's keys filled in where `data` does not set them (nested mappings merged)."""
    recipe = data.get("recipe", "default")
    if recipe not in RECIPES:
        raise UserError(f"recipe: must be one of {', '.join(RECIPES)}, got {recipe!r}")

    def merge(under: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(under)
        for k, v in over.items():
            out[k] = merge(under[k], v) if isinstance(under.get(k), Mapping) and isinstance(v, Mapping) else v
        return out

    return merge(RECIPES[recipe], data)


# --- validation --------------------------------------------------------------------------------

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _lightning_trainable(cfg: TrainConfig) -> None:
    """A `lightning` section makes the run's trainable `LIGHTNING_TRAINABLE`; anything else is refused."""
    module, trainable = cfg.lightning.module, cfg.trainable
    if module is None:
        if cfg.lightning.datamodule is not None:
            raise UserError("lightning.datamodule: needs lightning.module (the LightningModule it feeds)")
        if trainable == LIGHTNING_TRAINABLE:
            raise UserError(f"trainable: {LIGHTNING_TRAINABLE} trains lightning.module, which is not set")
    elif trainable not in (None, LIGHTNING_TRAINABLE):
        raise UserError(f"lightning.module: runs Lightning's own loop; remove trainable {trainable!r} or the "
                        f"lightning section")  # fmt: skip
    else:
        cfg.trainable = LIGHTNING_TRAINABLE


def _cross_checks(cfg: TrainConfig) -> None:
    """Rules that involve more than one field, or another module's registry."""
    _lightning_trainable(cfg)
    if not _DEVICE_RE.match(cfg.device):
        raise UserError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    d = cfg.data
    if d.val_fraction + d.test_fraction >= 1:
        raise UserError(
            f"data.val_fraction: val_fraction + test_fraction must be < 1, got {d.val_fraction} + "
            f"{d.test_fraction}"
        )
    if d.name in ROOT_DATASETS and not d.root:
        raise UserError(f"data.root: required for data.name {d.name!r} (a local folder)")
    if d.name not in DATASETS:
        if not plugins.is_import_path(d.name):
            raise UserError(
                f"data.name: unknown dataset {d.name!r} (known: {', '.join(DATASETS)} or an import path "
                f"'package.module:function')"
            )
        plugins.check_syntax(d.name, "data.name")
    elif d.args:
        raise UserError(f"data.args: only for a dataset given by import path, not {d.name!r}")
    for key, name in plugins.code_keys(dataclasses.asdict(cfg), catalogue=False):
        if name is not None:
            plugins.check_syntax(name, key)
    for k in cfg.metrics:
        if not k.isidentifier():
            raise UserError(f"metrics.{k}: metric names must be identifiers (reported as val_{k})")
    if cfg.mixup.enabled:
        if cfg.task != "classification" or cfg.loss is not None:
            raise UserError("mixup: mixes class labels, so only for task classification with its own loss")
        if cfg.schedule.batch_size % 2:
            raise UserError(f"mixup: needs an even schedule.batch_size, got {cfg.schedule.batch_size}")
        if importlib.util.find_spec("timm") is None:
            raise UserError("mixup: needs timm (timm's Mixup): pip install 'oialr-tune[timm]'")
    o = cfg.optimizer
    if o.name == "sgd" and o.nesterov and o.momentum <= 0:
        raise UserError("optimizer.nesterov: needs optimizer.momentum > 0")
    for i, b in enumerate(o.betas):
        if not 0 <= b < 1:
            raise UserError(f"optimizer.betas[{i}]: must be in [0, 1), got {b}")
    delay = cfg.oialr.delay
    if isinstance(delay, float) and not 0 <= delay < 1:
        raise UserError(
            f"oialr.delay: a float must be a fraction of the run in [0, 1); use an integer for a step "
            f"count, got {delay}"
        )
    if isinstance(delay, int) and delay < 1:
        raise UserError(f"oialr.delay: a step count must be >= 1, got {delay}")
    cfg.model.args = check_model_args(cfg.model.name, cfg.model.args)
    if cfg.trainable is None and (cfg.loop or cfg.schedule.steps is not None):
        key = "loop" if cfg.loop else "schedule.steps"
        raise UserError(f"{key}: only for a user's own training loop (trainable); the built-in trainer ignores it")
    for k in cfg.loop:
        if not isinstance(k, str) or not k.isidentifier():
            raise UserError(f"loop.{k}: loop setting names must be identifiers")


def train_config_from_dict(data: Mapping[str, Any] | None) -> TrainConfig:
    """Build and validate a `TrainConfig` from plain data (parsed YAML); missing keys take defaults.

    Raises UserError with a one-line message naming the dotted key for an unknown key, a wrong type
    or a value out of range.
    """
    if isinstance(data, Mapping):
        data = _with_recipe(data)
    cfg = dataclass_from_dict(TrainConfig, data, "")
    _cross_checks(cfg)
    return cfg


def train_config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain, YAML-dumpable data (tuples become lists) that `train_config_from_dict` reads back."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def with_overrides(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """A new, validated config with dotted keys replaced, e.g. ``{"optimizer.lr": 0.01}``.

    Meant for the tuning layer, which samples flat dotted keys. An unknown key raises UserError.
    """
    data = train_config_to_dict(cfg)
    for dotted, value in overrides.items():
        if dotted == "recipe":  # its keys are already filled in: switching it would leave them behind
            raise UserError("recipe: set it in the base config; search the keys it sets instead")
        node = data
        *parents, last = dotted.split(".")
        for i, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                raise UserError(f"{'.'.join(parents[: i + 1])}: unknown key")
            node = node[part]
        if last not in node and parents not in (["model", "args"], ["data", "args"], ["loop"]):  # their users check
            raise UserError(f"{dotted}: unknown key")
        node[last] = value
    return train_config_from_dict(data)


def parse_yaml(text: str, where: str, what: str) -> Any:
    """Parse YAML text; a syntax error or an empty document is a UserError naming `where`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{where}: invalid YAML{line}") from None
    if data is None:
        raise UserError(f"{where}: empty {what}")
    return data


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML training config. Errors name the file or the dotted key."""
    path = Path(path)
    data = parse_yaml(read_text(path, "config"), str(path), "config file")
    if not isinstance(data, Mapping):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return train_config_from_dict(data)


def resolve_device(device: str) -> Any:
    """Turn the `device` setting into a torch.device; 'auto' picks CUDA when there is one.

    Checked when a run starts rather than when the config is read, because a sweep's driver may
    run on a machine without the GPUs its workers have. Raises UserError naming `device`.
    """
    import torch  # here, not at module level: the sweep driver and the command line read configs without torch

    if not _DEVICE_RE.match(device):
        raise UserError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device: {device!r} requested but no CUDA GPU is available")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"device: {device!r} requested but only {torch.cuda.device_count()} GPU(s)")
    return torch.device(device)
