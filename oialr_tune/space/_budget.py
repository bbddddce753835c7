"""The ``budget`` of a search space: trials per arm, the run length, and ASHA's rungs (see `oialr_tune.space`).

Private to `oialr_tune.space`, which re-exports :class:`Budget`; import from there.

A run's length is counted in epochs (``max_epochs``, the trainer's ``schedule.epochs``), or, for a
user loop that reports by optimizer step (``trial.report(step=...)``, one long epoch), in steps:
``max_steps`` (the trainer's ``schedule.steps``). Whichever is the unit, ASHA's grace period,
rungs and ``max_t`` are in it, and it is what each report is placed by (Ray's time attribute).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from oialr_tune.errors import UserError
from oialr_tune.schema import convert_value, dataclass_from_dict, ge, gt, rule


@dataclass(frozen=True)
class Budget:
    """How much to spend per arm. `max_epochs` is the trainer's ``schedule.epochs``; ASHA's rungs are
    at ``grace_period * reduction_factor**i`` epochs. `max_concurrent` None lets the per-trial
    resources decide; `max_failures` is how often a failing trial is retried (from its checkpoint).

    `max_steps` (the trainer's ``schedule.steps``) makes the run length and ASHA's rungs optimizer
    steps instead, for a loop that reports by step: `grace_period` is then in steps too."""

    num_samples: int = rule(ge(1), 16)
    max_epochs: int = rule(ge(1), 10)
    max_steps: int | None = rule(ge(1), None)
    grace_period: int = 1  # in [1, max_epochs or max_steps]: checked with them (`parse_budget`)
    reduction_factor: float = rule(gt(1), 2.0)
    max_concurrent: int | None = rule(ge(1), None)
    max_failures: int = rule(ge(0), 0)

    @property
    def unit(self) -> str:
        """What a trial's progress is counted in: ``steps`` with `max_steps`, else ``epochs``."""
        return "epochs" if self.max_steps is None else "steps"

    @property
    def horizon(self) -> int:
        """The length of a whole trial in its `unit` (ASHA's ``max_t``)."""
        return self.max_epochs if self.max_steps is None else self.max_steps


def parse_budget(raw: Any, schedule: Mapping[str, Any]) -> Budget:
    """The ``budget`` section, with the run length the base's `schedule` gives where the budget does
    not say (``schedule.epochs`` → ``max_epochs``, ``schedule.steps`` → ``max_steps``; set both and
    they must agree), and a grace period within the run."""
    budget = dataclass_from_dict(Budget, raw, "budget")
    given = raw if isinstance(raw, Mapping) else {}
    for field, key in (("max_epochs", "epochs"), ("max_steps", "steps")):
        budget = _from_base(budget, field, schedule.get(key), f"base.schedule.{key}", set_here=field in given)
    if not 1 <= budget.grace_period <= budget.horizon:
        bound = "max_epochs" if budget.max_steps is None else "max_steps"
        raise UserError(f"budget.grace_period: must be in [1, {bound}={budget.horizon}], got {budget.grace_period}")
    return budget


def _from_base(budget: Budget, field: str, value: Any, where: str, *, set_here: bool) -> Budget:
    """`budget` with `field` taken from the base's `value` (at `where`) when the budget does not set it."""
    if value is None:
        return budget
    if set_here:
        if value != getattr(budget, field):
            raise UserError(f"{where}: {value} differs from budget.{field} {getattr(budget, field)} (set only one)")
        return budget
    value = convert_value(value, int, where)
    if value < 1:
        raise UserError(f"{where}: must be >= 1, got {value}")
    return dataclasses.replace(budget, **{field: value})
