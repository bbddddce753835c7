"""Search spaces: what a sweep searches, against which objective, with which budget.

A search space is one YAML file (see ``search_spaces/`` at the repository root and the packaged
copies in ``oialr_tune/search_spaces/``)::

    name: quickstart
    base: {...}                  # a full trainer config (``oialr_tune.config``), validated as such
    search:                      # dotted trainer keys -> distributions
      optimizer.lr: {type: loguniform, low: 1.0e-4, high: 3.0e-2}
      oialr.delay: {type: uniform, low: 0.05, high: 0.5}
      oialr.stability_threshold: {type: categorical, choices: [null, 0.9, 0.99]}
    objective: {metric: val_acc, mode: max}      # or mode: multi (+ minimize trainable_fraction)
    budget: {num_samples: 16, max_epochs: 10, grace_period: 2, reduction_factor: 2}   # or max_steps: a loop
                                 # reporting by optimizer step (trial.report(step=...)): rungs in steps
    resources: {cpu: 1, gpu: 0}  # per trial; {workers: 4, gpu: 1}: each trial on 4 DDP workers of one GPU
    baseline: same-budget        # same-budget | once | none
    seed: 0
    checkpoint: {every: 0, num_to_keep: 2}
    strategy: {sampler: tpe, scheduler: auto}

Everything is checked here, before Ray starts, and a mistake raises
:class:`~oialr_tune.errors.UserError` naming the dotted key (``search.optimizer.lr.low: ...``).
Each range endpoint is also applied to the base config and validated by the trainer's own config
rules, so a trial can never fail on a value the space allowed at its ends.

This module imports neither Ray nor Optuna: the tuning layer (``oialr_tune.tuning``) turns a
:class:`SearchSpace` into their objects.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any, Literal

import yaml

from oialr_tune import plugins
from oialr_tune.config import (
    TrainConfig,
    check_seed,
    parse_yaml,
    train_config_from_dict,
    train_config_to_dict,
    with_overrides,
)
from oialr_tune.errors import UserError
from oialr_tune.files import read_text
from oialr_tune.metrics import METRIC_DIRECTIONS, SIZE_METRIC, main_metric, reported_metrics
from oialr_tune.schema import convert_value, dataclass_from_dict, ge, gt, rule
from oialr_tune.space._budget import Budget, parse_budget
from oialr_tune.space._distributions import Param, categorical_choices, distribution_type, range_bounds

BASELINES = ("same-budget", "once", "none")
ARMS = ("oialr", "baseline")
# Schedule keys that only act after an OIALR rank event: the full-rank baseline does not search them.
OIALR_ONLY_KEYS = ("schedule.rewarm_steps", "schedule.rewarm_start")
# Keys the sweep itself decides, so searching them would silently fight the sweep.
UNSEARCHABLE = {
    "schedule.epochs": "set budget.max_epochs instead",
    "schedule.steps": "set budget.max_steps instead",
    "oialr.enabled": "the sweep runs the OIALR arm with it on and the baseline arm with it off",
    "checkpoint_every": "set checkpoint.every instead",
}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --- the parts of a space ----------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """What a trial is judged by: one metric, or (``multi``) that metric and the trainable fraction.

    `metric` is one the trials report: val_loss, val_acc (classification), val_mae (regression) or
    val_<name> of a user metric (whose direction is `mode`). Default: the task's own metric.

    `max_trainable_fraction` is a size budget inside the search: the OIALR arm's sampler treats a
    trial whose final trainable fraction is above it as infeasible (Optuna's constrained TPE), and
    ``best`` picks among the trials under it. A trial ASHA stops early counts with the fraction of
    its last reported epoch: one stopped before its cuts is infeasible, which is what it is as a
    candidate model.
    """

    metric: str = "val_acc"
    mode: Literal["max", "min", "multi"] = "max"
    max_trainable_fraction: float | None = None

    @property
    def is_multi(self) -> bool:
        return self.mode == "multi"

    @property
    def direction(self) -> str:
        """'max' or 'min' for the main metric (in multi mode too)."""
        return METRIC_DIRECTIONS.get(self.metric, self.mode)

    @property
    def test_metric(self) -> str:
        """The metric on the test split (val_mae -> test_mae, val_f1 -> test_f1): what retrain and
        compare report, so the final numbers measure what the search optimized."""
        return "test_" + self.metric.removeprefix("val_")

    def metrics(self, arm: str = "oialr") -> list[str]:
        """Metric names handed to the searcher; the baseline arm is always single-objective
        (its trainable fraction is 1 by construction)."""
        return [self.metric, SIZE_METRIC] if self.is_multi and arm == "oialr" else [self.metric]

    def modes(self, arm: str = "oialr") -> list[str]:
        return [self.direction, "min"] if self.is_multi and arm == "oialr" else [self.direction]


@dataclass(frozen=True)
class Resources:
    """Per-trial resources for Ray. Fractions of a GPU pack several trials onto one device.

    `workers` > 1 runs each trial as that many data-parallel workers (Ray Train, DDP), each with
    `cpu` CPUs and `gpu` GPUs: ``{workers: 4, gpu: 1}`` is a trial on 4 GPUs.
    """

    cpu: float = rule(gt(0), 1.0)
    gpu: float = rule(ge(0), 0.0)
    workers: int = 1  # >= 1: checked with the batch size (`_check_workers`)


@dataclass(frozen=True)
class CheckpointPolicy:
    """When trials save state. Besides every `every` epochs (0 = no periodic checkpoints), a trial
    always checkpoints at the ASHA rungs (where it may be stopped) and at its last epoch, which is
    what resuming and retrieving the best model need; more would only cost time and disk.

    `num_to_keep` None (the default) keeps every checkpoint while an arm runs and only each trial's
    last one once the arm is over. That is what makes a killed sweep resumable: Ray deletes a
    trial's older checkpoints a moment before it saves the experiment state that stops naming
    them, so a driver killed in between leaves a state naming a deleted checkpoint and that trial
    cannot resume. A number bounds the disk during the run at that risk.
    """

    every: int = rule(ge(0), 0)  # 0: only at the ASHA rungs and the end
    num_to_keep: int | None = rule(ge(1), None)


@dataclass(frozen=True)
class Strategy:
    """Which sampler proposes configs and which scheduler stops trials early.

    ``scheduler: auto`` is ASHA for a single objective and FIFO (every trial runs to `max_epochs`)
    for ``mode: multi``: ASHA ranks trials by one metric only, and stopping on accuracy alone would
    cut the small-but-slower-to-converge trials the Pareto front is about. ``asha`` with multi
    stops on the accuracy metric anyway, if asked. ``random`` exists for the efficiency benchmark.
    """

    sampler: Literal["tpe", "random"] = "tpe"
    scheduler: Literal["auto", "asha", "fifo"] = "auto"
    # Random trials before TPE starts modelling; null = a quarter of num_samples, within [4, 10]
    # (Optuna's own default, 10, would leave little to TPE in a 16-trial sweep).
    startup_trials: int | None = rule(ge(1), None)


@dataclass
class SearchSpace:
    """A validated search space. Build it with :func:`load_space` or :func:`space_from_dict`.

    `base` is the full, normalized trainer config (every default filled in, ``schedule.epochs`` =
    ``budget.max_epochs``), so a sweep stored as ``sweep.yaml`` reruns identically even if defaults
    change later.
    """

    name: str
    base: dict[str, Any]
    search: tuple[Param, ...]
    objective: Objective = field(default_factory=Objective)
    budget: Budget = field(default_factory=Budget)
    resources: Resources = field(default_factory=Resources)
    baseline: Literal["same-budget", "once", "none"] = "same-budget"
    seed: int = 0
    checkpoint: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    strategy: Strategy = field(default_factory=Strategy)
    description: str = ""

    # -- per arm --

    def arms(self) -> list[str]:
        """The arms this sweep runs, in order: always ``oialr``, plus ``baseline`` unless disabled."""
        return ["oialr"] if self.baseline == "none" else ["oialr", "baseline"]

    def arm_base(self, arm: str) -> dict[str, Any]:
        """The base trainer config of an arm: the baseline arm is the same run with OIALR off."""
        base = copy.deepcopy(self.base)
        if arm == "baseline":
            base["oialr"]["enabled"] = False
        return base

    def arm_params(self, arm: str) -> tuple[Param, ...]:
        """Searched keys of an arm. The baseline searches the same non-OIALR ranges (LR, schedule,
        ...) under the same budget with ``baseline: same-budget``, and nothing with ``once``. Keys that
        only act on OIALR events (``oialr.*``, the re-warm after a rank cut) are left out."""
        if arm == "oialr":
            return self.search
        if self.baseline == "once":
            return ()
        return tuple(p for p in self.search if not (p.key.startswith("oialr.") or p.key in OIALR_ONLY_KEYS))

    def arm_num_samples(self, arm: str) -> int:
        """Trials in an arm: the budget's, or 1 where there is nothing to search."""
        return self.budget.num_samples if self.arm_params(arm) else 1

    def scheduler(self) -> str:
        """'asha' or 'fifo', with ``auto`` resolved (see :class:`Strategy`)."""
        if self.strategy.scheduler != "auto":
            return self.strategy.scheduler
        return "fifo" if self.objective.is_multi else "asha"

    def rungs(self) -> list[int]:
        """Epochs (steps, with ``budget.max_steps``) at which ASHA may stop a trial (empty under FIFO),
        as Ray computes them: ``grace_period * reduction_factor**k`` below the run's length, rounded up."""
        if self.scheduler() != "asha":
            return []
        b = self.budget
        count = int(math.log(b.horizon / b.grace_period) / math.log(b.reduction_factor) + 1)
        return sorted({math.ceil(b.grace_period * b.reduction_factor**k) for k in range(count)})

    def checkpoint_epochs(self) -> list[int]:
        """1-based epochs (steps, with ``budget.max_steps``) at which a trial saves a checkpoint: every
        `checkpoint.every`, the ASHA rungs and the end of the run."""
        last = self.budget.horizon
        every = self.checkpoint.every
        epochs = {e for e in self.rungs() if e <= last} | {last}
        if every:
            epochs |= set(range(every, last + 1, every))
        return sorted(epochs)

    def trial_config(self, arm: str, params: Mapping[str, Any]) -> TrainConfig:
        """The validated trainer config of one trial: the arm's base with the sampled values."""
        base = train_config_from_dict(self.arm_base(arm))
        return with_overrides(base, dict(params)) if params else base

    # -- (de)serialization --

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :func:`space_from_dict` reads back to an equal space (``sweep.yaml``)."""
        out: dict[str, Any] = {"name": self.name, **({"description": self.description} if self.description else {}),
                               "base": copy.deepcopy(self.base), "search": {p.key: p.to_dict() for p in self.search}}
        out.update({k: dataclasses.asdict(getattr(self, k)) for k in ("objective", "budget", "resources")})
        out.update(baseline=self.baseline, seed=self.seed, checkpoint=dataclasses.asdict(self.checkpoint),
                   strategy=dataclasses.asdict(self.strategy))
        return out


# --- parsing -----------------------------------------------------------------------------------

_TOP_KEYS = (
    "name", "description", "base", "search", "objective", "budget", "resources", "baseline", "seed",
    "checkpoint", "strategy",
)  # fmt: skip


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _flat_keys(d: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of every leaf of a nested mapping (``optimizer.lr``, ...)."""
    out = []
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping) and k != "args":
            out += _flat_keys(v, path + ".")
        else:
            out.append(path)
    return out


def _parse_param(key: str, spec: Any, trainer_keys: list[str]) -> Param:
    """One ``search`` entry; checks the key names a trainer setting and the distribution is sound."""
    where = f"search.{key}"
    _check_param_key(key, where, trainer_keys)
    kind = distribution_type(spec, where)
    if kind == "categorical":
        return Param(key, "categorical", choices=categorical_choices(spec, where))
    low, high, step, log = range_bounds(kind, spec, where)
    return Param(key, kind, low=low, high=high, step=step, log=log)


def _check_param_key(key: Any, where: str, trainer_keys: list[str]) -> None:
    """A searched key must be a trainer config key (or under model.args / data.args / loop) that may be searched."""
    if not isinstance(key, str) or not key:
        raise UserError(f"search: keys must be dotted trainer config keys, got {key!r}")
    if key in UNSEARCHABLE:
        raise UserError(f"{where}: cannot be searched ({UNSEARCHABLE[key]})")
    if key not in trainer_keys and not key.startswith(("model.args.", "data.args.", "loop.")):
        raise UserError(f"{where}: not a trainer config key{_suggest(key, trainer_keys)}")


def _check_endpoints(param: Param, base: TrainConfig) -> None:
    """Apply each extreme value to the base config and run the trainer's validation on it."""
    for name, value in param.endpoints():
        try:
            with_overrides(base, {param.key: value})
        except UserError as e:
            msg = str(e)
            # The trainer names the key too; keep one name, the one in the space file.
            msg = msg.removeprefix(f"{param.key}: ")
            raise UserError(f"search.{param.key}.{name}: {msg}") from None


def space_from_dict(data: Any, *, source: str = "search space") -> SearchSpace:
    """Build and validate a :class:`SearchSpace` from plain data (parsed YAML).

    Raises UserError naming the dotted key for an unknown key, a wrong type, an inconsistent
    budget, a searched key the trainer does not have, or a range endpoint the trainer rejects.
    """
    _check_top_level(data, source)
    name = data["name"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UserError(f"name: expected letters, digits, '_', '-' or '.', got {name!r}")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise UserError(f"description: expected a string, got {description!r}")
    base_cfg, budget = _parse_base(data)
    base = train_config_to_dict(base_cfg)
    params = _parse_search(data["search"], base, base_cfg)
    objective = _parse_objective(data.get("objective"), base_cfg)
    resources = _parse_resources(data.get("resources"), base)
    _check_workers(resources.workers, base_cfg, params)
    baseline = data.get("baseline", "same-budget")
    if baseline not in BASELINES:
        raise UserError(f"baseline: expected one of {', '.join(BASELINES)}, got {baseline!r}")
    seed = check_seed(convert_value(data.get("seed", 0), int, "seed"), "seed")
    checkpoint = dataclass_from_dict(CheckpointPolicy, data.get("checkpoint"), "checkpoint")
    strategy = dataclass_from_dict(Strategy, data.get("strategy"), "strategy")
    return SearchSpace(
        name=name, base=base, search=params, objective=objective, budget=budget, resources=resources,
        baseline=baseline, seed=seed, checkpoint=checkpoint, strategy=strategy, description=description,
    )  # fmt: skip


def _check_top_level(data: Any, source: str) -> None:
    """A mapping of known top-level keys, with name, base and search."""
    if not isinstance(data, Mapping):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    for k in data:
        if k not in _TOP_KEYS:
            raise UserError(f"{k}: unknown key{_suggest(str(k), list(_TOP_KEYS))} (known: {', '.join(_TOP_KEYS)})")
    for k in ("name", "base", "search"):
        if k not in data:
            raise UserError(f"{k}: required")


def _parse_base(data: Mapping[str, Any]) -> tuple[TrainConfig, Budget]:
    """The ``base`` trainer config, validated by the trainer (errors re-rooted under ``base.``), with
    the budget's epochs and steps; returns it and the budget (whose run length the base may set)."""
    raw_base = data["base"]
    if not isinstance(raw_base, Mapping):
        raise UserError(f"base: expected a trainer config mapping, got {raw_base!r}")
    raw_base = copy.deepcopy(dict(raw_base))
    schedule = raw_base.get("schedule") or {}
    if not isinstance(schedule, Mapping):
        raise UserError(f"base.schedule: expected a mapping, got {schedule!r}")
    budget = parse_budget(data.get("budget"), schedule)
    raw_base["schedule"] = {**schedule, "epochs": budget.max_epochs, "steps": budget.max_steps}
    try:
        base_cfg = train_config_from_dict(raw_base)
    except UserError as e:
        raise UserError(f"base.{e}") from None
    if not base_cfg.oialr.enabled:
        raise UserError("base.oialr.enabled: must be true (the sweep makes the full-rank baseline arm itself)")
    return base_cfg, budget


def _parse_search(search_data: Any, base: dict[str, Any], base_cfg: TrainConfig) -> tuple[Param, ...]:
    """The ``search`` section: one `Param` per dotted trainer key, each endpoint accepted by the trainer."""
    if not isinstance(search_data, Mapping) or not search_data:
        raise UserError("search: expected a non-empty mapping of dotted trainer keys to distributions")
    trainer_keys = _flat_keys(base)
    params = tuple(_parse_param(k, v, trainer_keys) for k, v in search_data.items())
    for p in params:
        _check_endpoints(p, base_cfg)
    return params


def _parse_objective(raw_objective: Any, base_cfg: TrainConfig) -> Objective:
    """The ``objective`` section: a metric the task reports (by default the task's own score), a
    mode that fits its direction, and an optional size budget."""
    objective = dataclass_from_dict(Objective, raw_objective, "objective")
    reported = reported_metrics(base_cfg.task, base_cfg.metrics)
    task_metric = f"val_{main_metric(base_cfg.task)}"  # the default: the task's own score
    if "metric" not in (raw_objective or {}) and objective.metric != task_metric:
        mode = "multi" if objective.is_multi else METRIC_DIRECTIONS[task_metric]
        objective = dataclasses.replace(objective, metric=task_metric, mode=mode)
    if objective.metric not in reported and base_cfg.trainable is None:  # a user's loop reports its own
        raise UserError(
            f"objective.metric: {objective.metric} is not reported by task {base_cfg.task} "
            f"(reported: {', '.join(reported)})"
        )
    if objective.is_multi and objective.metric not in METRIC_DIRECTIONS:
        raise UserError(
            f"objective.mode: multi needs a metric of known direction ({', '.join(METRIC_DIRECTIONS)}); "
            f"for {objective.metric} use mode: max or min"
        )
    budget_fraction = objective.max_trainable_fraction
    if budget_fraction is not None and not 0 < budget_fraction <= 1:
        raise UserError(f"objective.max_trainable_fraction: must be in (0, 1], got {budget_fraction}")
    if objective.mode != "multi" and objective.mode != objective.direction:
        raise UserError(
            f"objective.mode: {objective.metric} is better when {objective.direction}imized; "
            f"use mode: {objective.direction} (or multi), got {objective.mode}"
        )
    return objective


def _parse_resources(raw: Any, base: dict[str, Any]) -> Resources:
    """The ``resources`` per trial, consistent with the base's device (a GPU trial needs a GPU device)."""
    resources = dataclass_from_dict(Resources, raw, "resources")
    if resources.gpu > 1 and resources.gpu != int(resources.gpu):
        raise UserError(f"resources.gpu: above 1 it must be a whole number of GPUs, got {resources.gpu}")
    if resources.gpu == 0 and base["device"].startswith("cuda"):
        raise UserError(
            f"base.device: {base['device']!r} needs resources.gpu > 0 (Ray hides GPUs from a trial without one)"
        )
    if resources.gpu > 0 and base["device"] == "cpu":
        raise UserError("resources.gpu: trials would run on base.device 'cpu'; set base.device to auto or cuda")
    return resources


def _check_workers(workers: int, base_cfg: TrainConfig, params: tuple[Param, ...]) -> None:
    """``resources.workers``: >= 1; above 1, a built-in trainer run whose global batches split evenly."""
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"resources.workers: must be an int >= 1, got {workers!r}")
    if workers == 1:
        return
    batch = base_cfg.schedule.batch_size
    if batch % workers:
        raise UserError(f"base.schedule.batch_size: {batch} is the global batch and must be a multiple of the "
                        f"{workers} workers (resources.workers)")
    for p in params:
        if p.key == "schedule.batch_size" and (p.type != "categorical" or any(c % workers for c in p.choices or ())):
            raise UserError(f"search.schedule.batch_size: with resources.workers {workers}, give categorical "
                            f"choices that are multiples of {workers}")


# --- files -------------------------------------------------------------------------------------


def packaged_spaces() -> list[str]:
    """Names of the search spaces that ship with the package (``quickstart``, ...)."""
    root = importlib_resources.files("oialr_tune") / "search_spaces"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _resolve_path(path: str | os.PathLike[str] | None) -> tuple[str, Path | None]:
    """(YAML text, its path): a file, or a packaged space by name (``quickstart``); None = quickstart."""
    if path is None:
        path = "quickstart"
    p = Path(path)
    # A folder may share a packaged space's name (`compare quickstart --out quickstart`): only a
    # file of that name shadows the packaged space.
    if not p.is_file() and p.suffix == "" and str(path) in packaged_spaces():
        resource = importlib_resources.files("oialr_tune") / "search_spaces" / f"{path}.yaml"
        return resource.read_text(), None
    if not p.exists():
        raise UserError(f"{p}: cannot read search space (no such file; packaged: {', '.join(packaged_spaces())})")
    return read_text(p, "search space"), p


def load_space(path: str | os.PathLike[str] | None = None) -> SearchSpace:
    """Read and validate a search-space YAML file.

    `path` may also name a packaged space (``"cifar10_resnet18"``); None is the packaged
    ``quickstart``. A relative ``base.data.root`` is taken relative to the current directory, as the
    user typed it on the command line; :func:`preflight` makes it absolute for the trials.
    """
    text, p = _resolve_path(path)
    where = str(p) if p else f"packaged space {path or 'quickstart'}"
    return space_from_dict(parse_yaml(text, where, "search space file"), source=where)


def space_yaml(space: SearchSpace) -> str:
    """A space as YAML text, in its own key order: what the sweep stores as ``sweep.yaml``."""
    return yaml.safe_dump(space.to_dict(), sort_keys=False)


def with_user_code(space: SearchSpace, **named: Any) -> SearchSpace:
    """`space` with ``model``, ``data``, ``trainable``, ``loss`` given as import paths or callables.

    A callable is registered (`oialr_tune.plugins.register`) under its ``module:qualname`` name,
    which the configs then carry; the sweep ships it to the workers. None leaves a key as it is.
    """

    data = space.to_dict()
    base = data["base"]
    for key, value in named.items():
        if value is None:
            continue
        name = plugins.name_of(value)
        if key in ("model", "data"):
            base[key] = {**base[key], "name": name}
        else:
            base[key] = name
    return space_from_dict(data, source="search space")


def with_settings(
    space: SearchSpace,
    *,
    num_samples: int | None = None,
    max_epochs: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SearchSpace:
    """`space` with another number of trials per arm, another epoch budget, or other values by
    dotted key (``budget.grace_period``, ``base.optimizer.weight_decay``, ``seed``, or
    ``search.<searched key>`` with a range mapping), validated as a whole, as its YAML would be.

    The result is a space like any other: what a sweep stores of it, `best`, `report` and
    `retrain` read back. (Changing ``budget.max_epochs`` also changes the trainer's epochs, which
    the space keeps equal to it: ``dataclasses.replace`` on the budget alone would not.)
    """
    data = space.to_dict()
    settings: dict[str, Any] = dict(overrides or {})
    if num_samples is not None:
        settings["budget.num_samples"] = num_samples
    if max_epochs is not None:
        settings["budget.max_epochs"] = max_epochs
    for key, value in settings.items():
        section, _, rest = key.partition(".")
        if section not in _TOP_KEYS:
            raise UserError(f"--set {key}: unknown section {section!r} (one of {', '.join(_TOP_KEYS)})")
        if not rest:
            data[section] = value
            continue
        # Searched keys are dotted themselves ("optimizer.lr"): the search section is one level deep.
        path = [rest] if section == "search" else rest.split(".")
        node = data.setdefault(section, {})
        for part in path[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise UserError(f"--set {key}: {part!r} holds a value, not a mapping")
            node = node.setdefault(part, {})
        node[path[-1]] = value
    for budget_key, schedule_key in (("max_epochs", "epochs"), ("max_steps", "steps")):  # kept equal (see above)
        if f"budget.{budget_key}" in settings:
            data["base"].setdefault("schedule", {})[schedule_key] = data["budget"][budget_key]
    return space_from_dict(data, source="search space")

