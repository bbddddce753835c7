"""Trials ASHA stops are told to the sampler, and written to study.db, as PRUNED (Optuna's convention)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from tiny_sweep import tiny_space

from oialr_tune.metrics import SIZE_METRIC
from oialr_tune.space import space_from_dict
from oialr_tune.tuning import sweep
from oialr_tune.tuning.search import scheduler, searcher

BUDGET = 0.5


def _asha_space() -> dict[str, Any]:
    """Single objective with a size budget, ASHA from epoch 1 with a steep cut: some trials stop early."""
    return tiny_space(
        "pruned",
        search={
            "optimizer.lr": {"type": "loguniform", "low": 1.0e-4, "high": 3.0e-2},
            "oialr.sigma_cutoff_fraction": {"type": "uniform", "low": 0.05, "high": 0.3},
        },
        objective={"metric": "val_acc", "mode": "max", "max_trainable_fraction": BUDGET},
        budget={"num_samples": 8, "max_epochs": 3, "grace_period": 1, "reduction_factor": 4},
        baseline="none",
        seed=0,
    )


def _told(arm_dir: Path) -> dict[str, optuna.trial.FrozenTrial]:
    """Ray trial id -> the trial as the searcher's own in-memory study holds it (saved with Ray's
    experiment state when the arm ended)."""
    (state,) = arm_dir.glob("searcher-state-*.pkl")
    saved = pickle.loads(state.read_bytes())
    trials = saved["_ot_study"].trials
    return {ray_id: trials[t.number] for ray_id, t in saved["_ot_trials"].items()}


def test_trials_asha_stops_are_pruned_for_the_sampler_and_in_study_db(ray_session: Any, tmp_path: Path) -> None:
    result = sweep(space_from_dict(_asha_space()), name="p", results_dir=tmp_path, verbose=0)
    df = result.trials.set_index("trial_id")
    stopped = df[df["stopped_early"]]
    assert len(stopped) and (~df["stopped_early"]).any()  # the test needs both kinds
    assert (stopped["training_iteration"] < 3).all() and (df[~df["stopped_early"]]["training_iteration"] == 3).all()

    told = _told(tmp_path / "p" / "oialr")
    assert set(told) == set(df.index)
    stored = optuna.load_study(study_name="oialr", storage=f"sqlite:///{tmp_path / 'p' / 'study.db'}").trials
    stored_by_id = {t.user_attrs["ray_trial_id"]: t for t in stored}
    assert set(stored_by_id) == set(df.index)
    for trial_id, row in df.iterrows():
        want = TrialState.PRUNED if row["stopped_early"] else TrialState.COMPLETE
        epochs = int(row["training_iteration"])
        for trial in (stored_by_id[trial_id], told[trial_id]):
            assert trial.state == want, (trial_id, trial.state)
            # Per-epoch values as intermediate values; the value is the last one (Optuna's for PRUNED).
            assert sorted(trial.intermediate_values) == list(range(1, epochs + 1))
            assert trial.value == pytest.approx(row["val_acc"])
            # The size budget's constraint reaches the sampler for pruned and complete trials alike.
            assert trial.constraints[SIZE_METRIC] == pytest.approx(row[SIZE_METRIC] - BUDGET)


def test_a_rebuilt_searcher_learns_stopped_trials_as_pruned() -> None:
    """Rows of ended trials (a rebuilt arm's prior) go into the searcher's study as they were told."""
    space = space_from_dict(_asha_space())
    base = {"config.optimizer.lr": 1e-3, "config.oialr.sigma_cutoff_fraction": 0.1, "status": "TERMINATED",
            SIZE_METRIC: 0.4, "training_iteration": 1, "_history": [0.8], "val_acc": 0.8}
    rows = [{**base, "trial_id": "a", "stopped_early": True},
            {**base, "trial_id": "b", "stopped_early": False, "training_iteration": 3, "_history": [0.8, 0.85, 0.9],
             "val_acc": 0.9}]
    trials = searcher(space, "oialr", rows)._ot_study.trials
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.COMPLETE]
    assert [t.value for t in trials] == [0.8, 0.9]
    assert [t.constraints[SIZE_METRIC] for t in trials] == pytest.approx([0.4 - BUDGET] * 2)


def test_the_searcher_takes_another_sampler_and_asha_takes_brackets() -> None:
    space = space_from_dict(_asha_space())
    gp = optuna.samplers.GPSampler(seed=0)
    assert searcher(space, "oialr", [], sampler=gp)._sampler is gp
    assert isinstance(searcher(space, "oialr", [])._sampler, optuna.samplers.TPESampler)
    assert len(scheduler(space, brackets=3)._brackets) == 3 and len(scheduler(space)._brackets) == 1
