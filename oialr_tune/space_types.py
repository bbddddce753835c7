"""The parts of a search space (see :mod:`oialr_tune.space` for its YAML form): what is searched,
the objective, the budget, the resources, and the space as a whole.

Plain data, already validated: :func:`oialr_tune.space.space_from_dict` builds them. No Ray, no torch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from oialr_tune.config import TrainConfig, train_config_from_dict, with_overrides

PARAM_TYPES = ("uniform", "loguniform", "int", "categorical")
BASELINES = ("same-budget", "once", "none")
ARMS = ("oialr", "baseline")
# Metric name -> the direction that makes it better. Which ones a trial reports depends on its
# task (`config.reported_metrics`); a user metric's direction is the objective's mode.
METRIC_DIRECTIONS = {"val_acc": "max", "val_loss": "min", "val_mae": "min"}
# Second objective of ``mode: multi``: fewer trainable parameters is better.
SIZE_METRIC = "trainable_fraction"
# Schedule keys that only act after an OIALR rank event: the full-rank baseline does not search them.
OIALR_ONLY_KEYS = ("schedule.rewarm_steps", "schedule.rewarm_start")
# Keys the sweep itself decides, so searching them would silently fight the sweep.
UNSEARCHABLE = {
    "schedule.epochs": "set budget.max_epochs instead",
    "oialr.enabled": "the sweep runs the OIALR arm with it on and the baseline arm with it off",
    "checkpoint_every": "set checkpoint.every instead",
}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --- the parts of a space ----------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One searched trainer key and the distribution its values are drawn from.

    `uniform`/`loguniform` draw floats in [low, high] (`step` quantizes uniform), `int` draws
    integers in [low, high] (`step`, or `log: true` for a log scale), `categorical` picks one of
    `choices` (numbers, strings, booleans or null).
    """

    key: str
    type: Literal["uniform", "loguniform", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def endpoints(self) -> list[tuple[str, Any]]:
        """(field name, value) of every extreme value a trial can get, for validation."""
        if self.type == "categorical":
            return [(f"choices[{i}]", c) for i, c in enumerate(self.choices or ())]
        return [("low", self.low), ("high", self.high)]

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (only the fields this type uses)."""
        out: dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            out["choices"] = list(self.choices or ())
            return out
        out["low"], out["high"] = self.low, self.high
        if self.step is not None:
            out["step"] = self.step
        if self.log:
            out["log"] = True
        return out


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
class Budget:
    """How much to spend per arm. `max_epochs` is the trainer's ``schedule.epochs``; ASHA's rungs are
    at ``grace_period * reduction_factor**i`` epochs. `max_concurrent` None lets the per-trial
    resources decide; `max_failures` is how often a failing trial is retried (from its checkpoint)."""

    num_samples: int = 16
    max_epochs: int = 10
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_concurrent: int | None = None
    max_failures: int = 0


@dataclass(frozen=True)
class Resources:
    """Per-trial resources for Ray. Fractions of a GPU pack several trials onto one device."""

    cpu: float = 1.0
    gpu: float = 0.0


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

    every: int = 0
    num_to_keep: int | None = None


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
    startup_trials: int | None = None


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
        """Epochs at which ASHA may stop a trial (empty under FIFO), as Ray computes them:
        ``grace_period * reduction_factor**k`` below ``max_epochs``, rounded up to whole epochs."""
        if self.scheduler() != "asha":
            return []
        b = self.budget
        count = int(math.log(b.max_epochs / b.grace_period) / math.log(b.reduction_factor) + 1)
        return sorted({math.ceil(b.grace_period * b.reduction_factor**k) for k in range(count)})

    def checkpoint_epochs(self) -> list[int]:
        """1-based epochs at which a trial saves a checkpoint: every `checkpoint.every`, the ASHA
        rungs and the last epoch."""
        last = self.budget.max_epochs
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
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["base"] = copy.deepcopy(self.base)
        out["search"] = {p.key: p.to_dict() for p in self.search}
        out["objective"] = dataclasses.asdict(self.objective)
        out["budget"] = dataclasses.asdict(self.budget)
        out["resources"] = dataclasses.asdict(self.resources)
        out["baseline"] = self.baseline
        out["seed"] = self.seed
        out["checkpoint"] = dataclasses.asdict(self.checkpoint)
        out["strategy"] = dataclasses.asdict(self.strategy)
        return out
