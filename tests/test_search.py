"""Trials ASHA stops are told to the sampler, and written to study.db, as PRUNED (Optuna's convention)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from tiny_sweep import tiny_space

from oialr_tune.space import SIZE_METRIC, space_from_dict
from oialr_tune.tuning import sweep

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
