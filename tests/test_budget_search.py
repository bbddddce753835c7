"""A trainable-parameter budget inside the search (objective.max_trainable_fraction): constrained TPE."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import optuna
import pytest
import yaml
from tiny_sweep import SPACE, tiny_sweep_dir

from oialr_tune.errors import UserError
from oialr_tune.metrics import SIZE_METRIC
from oialr_tune.results import best_trial, open_results
from oialr_tune.space import load_space, space_from_dict
from oialr_tune.tuning.search import BudgetedOptunaSearch, searcher
from oialr_tune.tuning.study import optuna_trials

BUDGET = 0.3


def _toy(config: dict) -> dict:
    """A stand-in for training: a harder σ cutoff gives a smaller model, and bigger models score higher."""
    cutoff = (config["oialr.sigma_cutoff_fraction"] - 0.02) / (0.3 - 0.02)
    fraction = 1.0 - 0.9 * cutoff
    return {"val_acc": 0.9 + 0.05 * fraction - 0.01 * abs(config["optimizer.lr"] - 3e-3) * 100,
            SIZE_METRIC: fraction}


def _run(searcher, trials: int) -> list[dict]:
    results = []
    for i in range(trials):
        config = searcher.suggest(f"t{i}")
        result = _toy(config)
        searcher.on_trial_complete(f"t{i}", result)
        results.append(result)
    return results


def _quickstart(budget: float | None):
    space = load_space("quickstart")
    return dataclasses.replace(space, objective=dataclasses.replace(space.objective, max_trainable_fraction=budget))


def test_budget_in_search_finds_more_feasible_trials_than_pick_after() -> None:
    """Same seed, same toy objective: the constrained sampler spends its trials under the budget."""
    with_budget = searcher(_quickstart(BUDGET), "oialr", [])
    pick_after = searcher(_quickstart(None), "oialr", [])
    assert with_budget.max_trainable_fraction == BUDGET and pick_after.max_trainable_fraction is None
    results = {"budget": _run(with_budget, 40), "after": _run(pick_after, 40)}
    feasible = {name: sum(r[SIZE_METRIC] <= BUDGET for r in rs) for name, rs in results.items()}
    assert feasible["budget"] > feasible["after"]
    # The sampler received each told trial's constraint, fraction - budget; without a budget, none.
    told = with_budget._ot_study.trials
    assert [t.constraints[SIZE_METRIC] for t in told] == pytest.approx(
        [r[SIZE_METRIC] - BUDGET for r in results["budget"]])
    assert all(t.constraints == {} for t in pick_after._ot_study.trials)


def test_the_baseline_arm_gets_no_constraint() -> None:
    assert searcher(_quickstart(BUDGET), "baseline", []).max_trainable_fraction is None


def test_trials_recreated_from_the_journal_carry_their_constraint() -> None:
    space = _quickstart(BUDGET)
    params = {f"config.{p.key}": p.choices[0] if p.choices else p.low for p in space.arm_params("oialr")}
    row = {**params, "status": "TERMINATED", "val_acc": 0.95, SIZE_METRIC: 0.5, "_history": [0.9, 0.95],
           "trial_id": "abc", "training_iteration": 2}
    (trial,) = optuna_trials(space, "oialr", [row])
    assert trial.constraints == pytest.approx({SIZE_METRIC: 0.5 - BUDGET})


def test_ray_private_map_of_optuna_trials_is_still_there() -> None:
    """BudgetedOptunaSearch reaches the Optuna trial through OptunaSearch._ot_trials
    (`_internals.optuna_trial`): fail loudly if Ray changes it."""
    from oialr_tune.tuning._internals import optuna_trial

    search = searcher(_quickstart(BUDGET), "oialr", [])
    assert isinstance(search, BudgetedOptunaSearch)
    search.suggest("x")
    assert isinstance(search._ot_trials["x"], optuna.trial.Trial)
    assert optuna_trial(search, "x") is search._ot_trials["x"] and optuna_trial(search, "y") is None


def test_a_bad_budget_names_the_key() -> None:
    data = {**SPACE, "objective": {"metric": "val_acc", "mode": "max", "max_trainable_fraction": 1.5}}
    with pytest.raises(UserError, match=r"^objective\.max_trainable_fraction"):
        space_from_dict(data)


def test_best_applies_the_space_budget_by_default(ray_session, tmp_path_factory, tmp_path: Path) -> None:
    source = tiny_sweep_dir(tmp_path_factory)
    copy = tmp_path / "tiny"
    shutil.copytree(source, copy)
    fractions = sorted(open_results(copy).usable("oialr", "val_acc")[SIZE_METRIC])
    budget = fractions[0]
    sweep_yaml = copy / "sweep.yaml"
    data = yaml.safe_load(sweep_yaml.read_text())
    data["objective"]["max_trainable_fraction"] = float(budget)
    sweep_yaml.write_text(yaml.safe_dump(data))
    best = best_trial(copy)
    assert best.max_trainable_fraction == budget and best.trial.trainable_fraction <= budget
    assert best_trial(copy, arm="baseline").trial.trainable_fraction == 1.0  # the budget is the OIALR arm's
