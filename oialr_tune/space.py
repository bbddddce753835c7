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
    budget: {num_samples: 16, max_epochs: 10, grace_period: 2, reduction_factor: 2}
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
import os
from collections.abc import Mapping
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import yaml

from oialr_tune import plugins
from oialr_tune.config import (
    TrainConfig,
    check_seed,
    parse_yaml,
    reported_metrics,
    train_config_from_dict,
    train_config_to_dict,
    with_overrides,
)
from oialr_tune.errors import UserError
from oialr_tune.files import read_text
from oialr_tune.schema import convert_value, dataclass_from_dict
from oialr_tune.space_types import (
    ARMS,
    BASELINES,
    METRIC_DIRECTIONS,
    NAME_RE,
    OIALR_ONLY_KEYS,
    PARAM_TYPES,
    SIZE_METRIC,
    UNSEARCHABLE,
    Budget,
    CheckpointPolicy,
    Objective,
    Param,
    Resources,
    SearchSpace,
    Strategy,
)

# The parts of a space live in `space_types` (plain data); this module builds them from YAML.
__all__ = [
    "ARMS", "BASELINES", "METRIC_DIRECTIONS", "NAME_RE", "OIALR_ONLY_KEYS", "PARAM_TYPES", "SIZE_METRIC",
    "UNSEARCHABLE", "Budget", "CheckpointPolicy", "Objective", "Param", "Resources", "SearchSpace", "Strategy",
    "dump_space", "load_space", "packaged_spaces", "space_from_dict", "with_settings", "with_user_code",
]  # fmt: skip

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
    kind = _param_type(spec, where)
    if kind == "categorical":
        return _categorical_param(key, spec, where)
    return _range_param(key, kind, spec, where)


def _check_param_key(key: Any, where: str, trainer_keys: list[str]) -> None:
    """A searched key must be a trainer config key (or under model.args / data.args) that may be searched."""
    if not isinstance(key, str) or not key:
        raise UserError(f"search: keys must be dotted trainer config keys, got {key!r}")
    if key in UNSEARCHABLE:
        raise UserError(f"{where}: cannot be searched ({UNSEARCHABLE[key]})")
    if key not in trainer_keys and not key.startswith(("model.args.", "data.args.")):
        raise UserError(f"{where}: not a trainer config key{_suggest(key, trainer_keys)}")


def _param_type(spec: Any, where: str) -> str:
    """The distribution's type, once `spec` is a mapping of a known type with only the keys that type uses."""
    if not isinstance(spec, Mapping):
        raise UserError(f"{where}: expected a mapping like {{type: uniform, low: 0, high: 1}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise UserError(f"{where}.type: expected one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    allowed = {"categorical": {"type", "choices"}}.get(kind, {"type", "low", "high", "step", "log"})
    if kind == "loguniform":
        allowed = {"type", "low", "high"}
    for k in spec:
        if k not in allowed:
            raise UserError(f"{where}.{k}: not used by type {kind} (allowed: {', '.join(sorted(allowed))})")
    return kind


def _categorical_param(key: str, spec: Mapping[str, Any], where: str) -> Param:
    """A categorical entry: a non-empty list of distinct JSON scalars."""
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{where}.choices: expected a non-empty list, got {choices!r}")
    for i, c in enumerate(choices):
        # Optuna stores categorical choices as JSON scalars; anything else cannot be persisted.
        if c is not None and not isinstance(c, (bool, int, float, str)):
            raise UserError(f"{where}.choices[{i}]: must be a number, string, boolean or null, got {c!r}")
    if len({repr(c) for c in choices}) != len(choices):
        raise UserError(f"{where}.choices: has duplicates: {choices!r}")
    return Param(key, "categorical", choices=tuple(choices))


def _range_param(key: str, kind: str, spec: Mapping[str, Any], where: str) -> Param:
    """An int, uniform or loguniform entry: low <= high, positive when logarithmic, an optional step."""
    for k in ("low", "high"):
        if k not in spec:
            raise UserError(f"{where}.{k}: required for type {kind}")
    tp: Any = int if kind == "int" else float
    low = convert_value(spec["low"], tp, f"{where}.low")
    high = convert_value(spec["high"], tp, f"{where}.high")
    if low > high:
        raise UserError(f"{where}.low: must be <= high, got low={low} > high={high}")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{where}.low: loguniform needs low > 0, got {low}")
    log = convert_value(spec.get("log", False), bool, f"{where}.log")
    if log and low <= 0:
        raise UserError(f"{where}.low: log: true needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _range_step(step, tp, low, high, log, where)
    return Param(key, kind, low=low, high=high, step=step, log=log)


def _range_step(step: Any, tp: Any, low: float, high: float, log: bool, where: str) -> float:
    """A range's step: positive, not with log (Optuna cannot), dividing high - low."""
    step = convert_value(step, tp, f"{where}.step")
    if step <= 0:
        raise UserError(f"{where}.step: must be > 0, got {step}")
    if log:
        raise UserError(f"{where}.step: cannot be combined with log: true (Optuna does not support it)")
    span = (high - low) / step
    if abs(span - round(span)) > 1e-9 * max(1.0, abs(span)):
        raise UserError(f"{where}.step: high - low ({high - low}) must be a multiple of step ({step})")
    return step


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
    budget = _parse_budget(data.get("budget"))
    base_cfg, budget = _parse_base(data, budget)
    base = train_config_to_dict(base_cfg)
    params = _parse_search(data["search"], base, base_cfg)
    objective = _parse_objective(data.get("objective"), base_cfg)
    resources = _parse_resources(data.get("resources"), base)
    _check_workers(resources.workers, base_cfg, params)
    baseline = data.get("baseline", "same-budget")
    if baseline not in BASELINES:
        raise UserError(f"baseline: expected one of {', '.join(BASELINES)}, got {baseline!r}")
    seed = check_seed(convert_value(data.get("seed", 0), int, "seed"), "seed")
    checkpoint, strategy = _parse_checkpoint(data.get("checkpoint")), _parse_strategy(data.get("strategy"))
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


def _parse_budget(raw: Any) -> Budget:
    """The ``budget`` section: trials, epochs and the ASHA settings, each in range."""
    budget = dataclass_from_dict(Budget, raw, "budget")
    if budget.num_samples < 1:
        raise UserError(f"budget.num_samples: must be >= 1, got {budget.num_samples}")
    if budget.max_epochs < 1:
        raise UserError(f"budget.max_epochs: must be >= 1, got {budget.max_epochs}")
    if not 1 <= budget.grace_period <= budget.max_epochs:
        raise UserError(
            f"budget.grace_period: must be in [1, max_epochs={budget.max_epochs}], got {budget.grace_period}"
        )
    if budget.reduction_factor <= 1:
        raise UserError(f"budget.reduction_factor: must be > 1, got {budget.reduction_factor}")
    if budget.max_concurrent is not None and budget.max_concurrent < 1:
        raise UserError(f"budget.max_concurrent: must be >= 1 or null, got {budget.max_concurrent}")
    if budget.max_failures < 0:
        raise UserError(f"budget.max_failures: must be >= 0, got {budget.max_failures}")
    return budget


def _parse_base(data: Mapping[str, Any], budget: Budget) -> tuple[TrainConfig, Budget]:
    """The ``base`` trainer config, validated by the trainer (errors re-rooted under ``base.``), with
    the budget's epochs; returns it and the budget (whose max_epochs the base may set)."""
    raw_base = data["base"]
    if not isinstance(raw_base, Mapping):
        raise UserError(f"base: expected a trainer config mapping, got {raw_base!r}")
    raw_base = copy.deepcopy(dict(raw_base))
    schedule = raw_base.get("schedule") or {}
    if not isinstance(schedule, Mapping):
        raise UserError(f"base.schedule: expected a mapping, got {schedule!r}")
    budget_sets_epochs = "max_epochs" in (data.get("budget") or {})
    budget = _budget_epochs(budget, schedule.get("epochs"), budget_sets_epochs=budget_sets_epochs)
    raw_base["schedule"] = {**schedule, "epochs": budget.max_epochs}
    try:
        base_cfg = train_config_from_dict(raw_base)
    except UserError as e:
        raise UserError(f"base.{e}") from None
    if not base_cfg.oialr.enabled:
        raise UserError("base.oialr.enabled: must be true (the sweep makes the full-rank baseline arm itself)")
    return base_cfg, budget


def _budget_epochs(budget: Budget, epochs: Any, *, budget_sets_epochs: bool) -> Budget:
    """The epochs per trial: budget.max_epochs, or base.schedule.epochs when the budget does not say
    (set both and they must agree)."""
    if not budget_sets_epochs:
        if epochs is not None:  # take the epochs from the base when the budget does not say
            budget = dataclasses.replace(budget, max_epochs=convert_value(epochs, int, "base.schedule.epochs"))
            if budget.max_epochs < 1:
                raise UserError(f"base.schedule.epochs: must be >= 1, got {budget.max_epochs}")
            if budget.grace_period > budget.max_epochs:
                raise UserError(f"budget.grace_period: must be <= max_epochs={budget.max_epochs}")
    elif epochs is not None and epochs != budget.max_epochs:
        raise UserError(
            f"base.schedule.epochs: {epochs} differs from budget.max_epochs {budget.max_epochs} (set only one)"
        )
    return budget


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
    """The ``objective`` section: a metric the task reports (val_mae by default for regression), a
    mode that fits its direction, and an optional size budget."""
    objective = dataclass_from_dict(Objective, raw_objective, "objective")
    reported = reported_metrics(base_cfg.task, base_cfg.metrics)
    if base_cfg.task == "regression" and "metric" not in (raw_objective or {}):
        objective = dataclasses.replace(objective, metric="val_mae", mode="multi" if objective.is_multi else "min")
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
    if resources.cpu <= 0:
        raise UserError(f"resources.cpu: must be > 0, got {resources.cpu}")
    if resources.gpu < 0:
        raise UserError(f"resources.gpu: must be >= 0, got {resources.gpu}")
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


def _parse_checkpoint(raw: Any) -> CheckpointPolicy:
    """The ``checkpoint`` policy: every >= 0, num_to_keep >= 1 or null."""
    checkpoint = dataclass_from_dict(CheckpointPolicy, raw, "checkpoint")
    if checkpoint.every < 0:
        raise UserError(f"checkpoint.every: must be >= 0 (0 = only at ASHA rungs and the end), got {checkpoint.every}")
    if checkpoint.num_to_keep is not None and checkpoint.num_to_keep < 1:
        raise UserError(f"checkpoint.num_to_keep: must be >= 1 or null, got {checkpoint.num_to_keep}")
    return checkpoint


def _parse_strategy(raw: Any) -> Strategy:
    """The ``strategy`` section: the sampler and its settings."""
    strategy = dataclass_from_dict(Strategy, raw, "strategy")
    if strategy.startup_trials is not None and strategy.startup_trials < 1:
        raise UserError(f"strategy.startup_trials: must be >= 1 or null, got {strategy.startup_trials}")
    return strategy


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


def dump_space(space: SearchSpace, path: str | os.PathLike[str]) -> None:
    """Write a space as YAML (what the sweep stores as ``sweep.yaml``)."""
    Path(path).write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))


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
    if "budget.max_epochs" in settings:
        data["base"].setdefault("schedule", {})["epochs"] = data["budget"]["max_epochs"]
    return space_from_dict(data, source="search space")

