"""A trainable-parameter budget inside the search: constrained TPE, fed through Ray's OptunaSearch.

With ``objective.max_trainable_fraction`` the OIALR arm's trials carry an Optuna constraint,
``trainable_fraction − budget`` (≤ 0 is feasible). Optuna's TPESampler reads every told trial's
constraints and models infeasible trials apart from feasible ones, so the search spends its trials
under the budget instead of finding out after the sweep that few of them are. The value must be on
the Optuna trial before the trial is told: :class:`BudgetedOptunaSearch` sets it just before Ray's
OptunaSearch tells the study.

Ray's ``OptunaSearch._ot_trials`` (Ray trial id → Optuna trial) is the one private name used here,
to reach the trial being told; ``tests/test_budget_search.py`` fails loudly if Ray changes it.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

from oialr_tune.space import SIZE_METRIC

__all__ = ["BudgetedOptunaSearch", "size_constraint"]


def size_constraint(fraction: float | None, max_trainable_fraction: float) -> dict[str, float]:
    """A trial's constraints (Optuna's ``constraints=`` form): its final trainable fraction minus the budget.

    A trial that reported no fraction counts as full size.
    """
    return {SIZE_METRIC: (1.0 if fraction is None else float(fraction)) - max_trainable_fraction}


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
        ot_trial = self._ot_trials.get(trial_id) if self.max_trainable_fraction is not None else None
        if ot_trial is not None:
            fraction = (result or {}).get(SIZE_METRIC)
            for key, value in size_constraint(fraction, self.max_trainable_fraction).items():
                ot_trial.set_constraint(key, value)
        super().on_trial_complete(trial_id, result, error)
