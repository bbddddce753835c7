"""`sweep --log mlflow`: every trial also goes to MLflow (a local file store in the results folder) through
Ray's own MLflowLoggerCallback, into a local SQLite store in the results folder; read back here with the
MLflow client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tiny_sweep import tiny_space

from oialr_tune import cli
from oialr_tune.errors import UserError
from oialr_tune.space import space_from_dict
from oialr_tune.tuning import driver, sweep


def test_a_sweep_logged_to_mlflow_is_read_back_with_the_mlflow_client(ray_session: Any, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    space = space_from_dict(tiny_space("tracked", baseline="once"))
    result = sweep(space, results_dir=tmp_path, name="s", verbose=0, log=["mlflow"])
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(result.path) / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["arm"] for r in runs) == sorted(result.trials["arm"])  # one run per trial
    by_trial = {str(r.data.tags.get("trial_name", "")).split("_")[-1]: r for r in runs}
    for _, row in result.trials.iterrows():
        run = next(r for name, r in by_trial.items() if name and name in str(row["trial_id"]))
        assert run.data.metrics["val_acc"] == pytest.approx(row["val_acc"])
        assert run.data.metrics["trainable_fraction"] == pytest.approx(row["trainable_fraction"])
        if row["arm"] == "oialr":
            assert float(run.data.params["optimizer.lr"]) == pytest.approx(row["config.optimizer.lr"])


def test_log_choices_and_refusals(tmp_path: Path) -> None:
    assert cli.LOGGERS == driver.LOGGERS
    space = space_from_dict(tiny_space("tracked"))
    with pytest.raises(UserError, match=r"^--log: expected one of mlflow, got 'wandb'"):
        sweep(space, results_dir=tmp_path, name="s", verbose=0, log=["wandb"])
    assert not (tmp_path / "s").exists()
