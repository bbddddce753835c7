"""The search: Optuna's sampler inside Ray's OptunaSearch, and ASHA to stop weak trials early.

**A trial ASHA stops is told as PRUNED.** Ray's scheduler stops a trial through
``TuneController.stop_trial``, which calls ``on_trial_complete`` with the trial's last result, so
Ray's OptunaSearch would tell Optuna that a trial stopped at epoch 4 is COMPLETE with its epoch-4
value, and TPE would model it as a finished configuration. Optuna's convention is PRUNED, with the
per-epoch values as intermediate values: TPE then ranks pruned trials by how far they got, below
the complete ones. :class:`BudgetedOptunaSearch` tells a trial as PRUNED when its last result says
the trainer was still running (``run_status``); a trial that finished its schedule (or diverged,
which ends it) is COMPLETE.

**A trainable-parameter budget inside the search.** With ``objective.max_trainable_fraction``
the OIALR arm's trials carry an Optuna constraint, ``trainable_fraction − budget`` (≤ 0 is
feasible). Optuna's TPESampler reads every told trial's constraints and models infeasible trials
apart from feasible ones, so the search spends its trials under the budget instead of finding out
after the sweep that few of them are. The value must be on the Optuna trial before the trial is
told: :class:`BudgetedOptunaSearch` sets it just before Ray's OptunaSearch tells the study.

The trial being told, and whether it was told already, are read through Ray's private records of
them (`oialr_tune.tuning._internals`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from oialr_tune.metrics import SIZE_METRIC
from oialr_tune.space import SearchSpace
from oialr_tune.tuning._internals import optuna_trial, told
from oialr_tune.tuning.study import (
    directions,
    optuna_distribution,
    optuna_trials,
    size_budget,
    size_constraint,
    stopped_early,
)

__all__ = ["BudgetedOptunaSearch", "default_sampler", "scheduler", "searcher", "startup_trials"]


class BudgetedOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch that tells a trial stopped early as PRUNED and sets each trial's size
    constraint before the trial is told.

    With ``max_trainable_fraction=None`` no constraint is set (the baseline arm, or a space without
    a budget). A trial ASHA stops early carries the fraction of its last reported epoch: one stopped
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
        if not error and result and not told(self, trial_id):
            self._report_last_epoch(trial_id, result)
            if stopped_early(result):
                # OptunaSearch tells a trial without a result as PRUNED; Optuna then takes its
                # value from the last intermediate value, the epoch the trial was stopped at.
                result = None
        super().on_trial_complete(trial_id, result, error)

    def _report_last_epoch(self, trial_id: str, result: dict[str, Any]) -> None:
        """Record the trial's last result as an intermediate value, as for its other epochs.

        Ray hands the searcher a result only when the scheduler lets the trial go on, so the epoch
        ASHA stops a trial at (or the last epoch, where ASHA stops every trial) would be missing.
        Optuna's several-objective studies have no intermediate values.
        """
        if isinstance(self.metric, list) or self.metric not in result or TRAINING_ITERATION not in result:
            return
        with warnings.catch_warnings():  # a trial that ended by itself may have reported it already
            warnings.simplefilter("ignore")
            self.on_trial_result(trial_id, result)


def startup_trials(space: SearchSpace) -> int:
    """Random trials before TPE models the results: `strategy.startup_trials`, or by default a
    quarter of the budget within [4, 10] (Optuna's 10 would leave little for TPE in 16 trials)."""
    if space.strategy.startup_trials is not None:
        return space.strategy.startup_trials
    return min(10, max(4, space.budget.num_samples // 4))


def _rebuilt_seed(seed: int | None, told: int) -> int | None:
    """The sampler's seed for a search that starts with `told` ended trials.

    A fresh search (none told) uses the space's seed. A search rebuilt from the journal must not:
    the same seed draws the same sequence again, so its first new trials would repeat the settings
    of the trials already told (Optuna's seeded sampler holds its RNG state only in memory). A seed
    derived from (seed, told) keeps the rebuild reproducible and its draws new.
    """
    if seed is None or not told:
        return seed
    return int(np.random.SeedSequence([seed, told]).generate_state(1)[0])


def default_sampler(space: SearchSpace, told: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler the space's strategy names, seeded from the space's seed and the `told` trials
    it starts with (see `_rebuilt_seed`)."""
    seed = _rebuilt_seed(space.seed, told)
    if space.strategy.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(space))


def searcher(space: SearchSpace, arm: str, prior: Sequence[dict[str, Any]],
             sampler: optuna.samplers.BaseSampler | None = None) -> Any:
    """OptunaSearch with a seeded TPE (or random) sampler, or None when the arm searches nothing.

    `prior` are trial rows of the arm that already ended (a rebuilt arm, see `arm._tuner`): the
    searcher's study starts with them, so the sampler learns from them and proposes only new points.
    `sampler` replaces the one the space's strategy names (benchmarks/search_replay.py compares
    Optuna's other samplers inside the same searcher).
    The study stays in memory (pickled with Ray's state), never in a database: see :mod:`oialr_tune.tuning`.
    """
    params = space.arm_params(arm)
    if not params:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sampler is None:
        sampler = default_sampler(space, told=len(prior))
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


def scheduler(space: SearchSpace, brackets: int = 1) -> Any:
    """ASHA on the main metric, or FIFO.

    ASHA's time is the budget's unit: epochs are Ray's count of reports (training_iteration, one
    report per epoch); with ``budget.max_steps`` it is the optimizer step each report carries (``step``,
    `oialr_tune.loop.Trial.report`), so rungs and `max_t` are steps.
    `brackets` > 1 gives asynchronous Hyperband: trials spread over brackets whose first rung is
    `grace_period` × `reduction_factor`**k epochs (benchmarks/search_replay.py compares it)."""
    if space.scheduler() != "asha":
        return FIFOScheduler()
    b = space.budget
    return ASHAScheduler(
        time_attr=TRAINING_ITERATION if b.unit == "epochs" else "step",
        metric=space.objective.metric,
        mode=space.objective.direction,
        max_t=b.horizon,
        grace_period=b.grace_period,
        reduction_factor=b.reduction_factor,
        brackets=brackets,
    )

