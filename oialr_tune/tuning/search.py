"""The search: Optuna's sampler inside Ray's OptunaSearch, and ASHA to stop weak trials early.

**A trainable-parameter budget inside the search.** With ``objective.max_trainable_fraction``
the OIALR arm's trials carry an Optuna constraint, ``trainable_fraction − budget`` (≤ 0 is
feasible). Optuna's TPESampler reads every told trial's constraints and models infeasible trials
apart from feasible ones, so the search spends its trials under the budget instead of finding out
after the sweep that few of them are. The value must be on the Optuna trial before the trial is
told: :class:`BudgetedOptunaSearch` sets it just before Ray's OptunaSearch tells the study.

The trial being told is reached through Ray's private map of them
(`oialr_tune.tuning._internals.optuna_trial`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from oialr_tune.metrics import SIZE_METRIC
from oialr_tune.space import SearchSpace
from oialr_tune.tuning._internals import optuna_trial
from oialr_tune.tuning.study import directions, optuna_distribution, optuna_trials, size_budget, size_constraint

__all__ = ["BudgetedOptunaSearch", "scheduler", "searcher"]


class BudgetedOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch that sets each trial's size constraint before the trial is told.

    With ``max_trainable_fraction=None`` it is Ray's OptunaSearch unchanged (the baseline arm, or
    a space without a budget).

    A trial ASHA stops early is told with the fraction of its last reported epoch: one stopped
    before its cuts is infeasible, which is what it is as a candidate model.
    """

    def __init__(self, *args: Any, max_trainable_fraction: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_trainable_fraction = max_trainable_fraction

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        ot_trial = optuna_trial(self, trial_id) if self.max_trainable_fraction is not None else None
        if ot_trial is not None:
            fraction = (result or {}).get(SIZE_METRIC)
            for key, value in size_constraint(fraction, self.max_trainable_fraction).items():
                ot_trial.set_constraint(key, value)
        super().on_trial_complete(trial_id, result, error)


def _startup_trials(space: SearchSpace) -> int:
    """Random trials before TPE models the results: `strategy.startup_trials`, or by default a
    quarter of the budget within [4, 10] (Optuna's 10 would leave little for TPE in 16 trials)."""
    if space.strategy.startup_trials is not None:
        return space.strategy.startup_trials
    return min(10, max(4, space.budget.num_samples // 4))


def searcher(space: SearchSpace, arm: str, prior: Sequence[dict[str, Any]]) -> Any:
    """OptunaSearch with a seeded TPE (or random) sampler, or None when the arm searches nothing.

    `prior` are trial rows of the arm that already ended (a rebuilt arm, see `arm._tuner`): the
    searcher's study starts with them, so the sampler learns from them and proposes only new points.
    The study stays in memory (pickled with Ray's state), never in a database: see :mod:`oialr_tune.tuning`.
    """
    params = space.arm_params(arm)
    if not params:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if space.strategy.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=space.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=_startup_trials(space))
    metrics, modes = space.objective.metrics(arm), space.objective.modes(arm)
    multi = len(metrics) > 1
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name=arm, directions=directions(space, arm))
    study.add_trials(optuna_trials(space, arm, prior))
    # With a size budget every told trial carries its constraint and TPE models the infeasible ones
    # apart (a random sampler ignores it: the budget then acts at the pick only).
    return BudgetedOptunaSearch(
        space={p.key: optuna_distribution(p) for p in params},
        metric=metrics if multi else metrics[0],
        mode=modes if multi else modes[0],
        sampler=sampler,
        storage=storage,
        study_name=arm,
        max_trainable_fraction=size_budget(space, arm),
    )


def scheduler(space: SearchSpace) -> Any:
    """ASHA on the main metric (per epoch = training_iteration), or FIFO."""
    if space.scheduler() != "asha":
        return FIFOScheduler()
    b = space.budget
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=space.objective.metric,
        mode=space.objective.direction,
        max_t=b.max_epochs,
        grace_period=b.grace_period,
        reduction_factor=b.reduction_factor,
    )

