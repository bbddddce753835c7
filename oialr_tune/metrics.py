"""What a run reports, by name: the metrics of each task, which way each one is better, and the
columns of the files the commands write (trials.csv, metrics.csv, comparison.csv).

The one owner of these names for the config, the search space, the tasks, results, tuning,
retrain and compare. Plain data: it imports nothing, so any module may import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# The second objective of ``mode: multi`` and the size budget: fewer trainable parameters is better.
SIZE_METRIC = "trainable_fraction"
# Metric name -> the direction that makes it better. Which ones a trial reports depends on its task
# (`reported_metrics`); a user metric's direction is the objective's mode.
METRIC_DIRECTIONS = {"val_acc": "max", "val_loss": "min", "val_mae": "min"}
# What `best`, `report` and the CLI's ``--objective`` may rank trials by, and which way is better.
SELECTABLE_DIRECTIONS = {**METRIC_DIRECTIONS, SIZE_METRIC: "min"}


def main_metric(task: str) -> str:
    """The task's score beside its loss: ``acc`` (accuracy) for classification, ``mae`` for regression."""
    return "acc" if task == "classification" else "mae"


def reported_metrics(task: str = "classification", metrics: Mapping[str, str] | None = None,
                     split: str = "val") -> list[str]:
    """The metrics a run of `task` reports per split (see `oialr_tune.tasks`): loss, acc or mae, user ones."""
    return [f"{split}_loss", f"{split}_{main_metric(task)}", *(f"{split}_{k}" for k in metrics or {})]


# --- the columns of the files the commands write --------------------------------------------------
# trials.csv (``sweep``), metrics.csv (``retrain``) and comparison.csv (``compare``) take every column
# name from here, and share the pieces below, so one quantity has one name in all three files.

# Prefix of a trials.csv column holding a searched value: ``config.<dotted key>``.
CONFIG_PREFIX = "config."
# The size of the model a run ended with (see `oialr_tune.run_record.epoch_row`).
SIZE_COLUMNS = (SIZE_METRIC, "trainable_params", "total_params")
# Where a sweep's trial ran (its worker adds these to every report).
PLACEMENT_COLUMNS = ("node_id", "gpu_ids", "workers")
# What trials.csv takes from a trial's last report beside its objective and `PLACEMENT_COLUMNS`; the
# sweep's journal keeps all of them for every ended trial (`oialr_tune.tuning.hooks`).
TRIAL_RESULT_COLUMNS = ("val_acc", *SIZE_COLUMNS, "training_iteration", "time_total_s")
# metrics.csv's first columns: both tasks' test metrics (classification's accuracy columns are empty
# for regression and the reverse), each again for the reloaded model file and its dense export.
RETRAIN_COLUMNS = (
    "arm", "seed", "status", "test_acc", "test_loss", "reloaded_test_acc", "dense_test_acc", "val_acc", "val_loss",
    *SIZE_COLUMNS, "epochs", "wall_time_s", "model", "model_dense",
    "test_mae", "reloaded_test_mae", "dense_test_mae", "val_mae",
)  # fmt: skip
# The metrics.csv columns retrain's summary.json gives mean ± std of, per arm.
RETRAIN_SUMMARY_COLUMNS = ("test_acc", "test_mae", "test_loss", "dense_test_acc", "dense_test_mae", SIZE_METRIC,
                           "trainable_params", "wall_time_s")


def trial_columns(metric: str, searched: Iterable[str]) -> list[str]:
    """trials.csv's columns, in order, for a sweep by objective `metric` that searched the dotted
    keys `searched` (every arm's): one row per trial of every arm.

    Ray's status (TERMINATED or ERROR), the trainer's verdict (finished, diverged, error, or running
    when ASHA stopped it) and whether ASHA stopped it; the searched values; the objective's last and
    best value over the epochs; the last report's `TRIAL_RESULT_COLUMNS`, the seconds spent in
    training steps and validation (`train_time_s`, all epochs), where it ran; the checkpoint folder
    and the error, if any.
    """
    return list(dict.fromkeys([
        "arm", "trial_id", "status", "trainer_status", "stopped_early", *(CONFIG_PREFIX + k for k in searched),
        metric, f"best_{metric}", *trial_metric_columns(metric), *PLACEMENT_COLUMNS, "checkpoint", "error",
    ]))  # fmt: skip


def trial_metric_columns(metric: str) -> list[str]:
    """The trials.csv columns that hold a trial's final metrics (`best` shows them): the last
    report's `TRIAL_RESULT_COLUMNS`, the seconds trained (`train_time_s`) and the objective `metric`."""
    return list(dict.fromkeys([*TRIAL_RESULT_COLUMNS, "train_time_s", metric]))


def retrain_columns(metrics: Iterable[str] = ()) -> list[str]:
    """metrics.csv's columns (one row per arm and seed): `RETRAIN_COLUMNS`, then every other
    metric a run reported (`metrics`: a user metric's ``test_f1`` and ``val_f1``, the reloaded and
    dense ``test_f1``)."""
    return list(dict.fromkeys([*RETRAIN_COLUMNS, *metrics]))


def comparison_columns(metric: str) -> list[str]:
    """comparison.csv's columns for a comparison by test `metric` (test_acc, test_mae, test_f1, ...):
    per arm and seed its metric and the val_ counterpart, size, and the retrain's and the tuning's seconds."""
    val = "val_" + metric.removeprefix("test_")
    return list(dict.fromkeys(["arm", "seed", "status", metric, val, "test_loss", *SIZE_COLUMNS, "wall_time_s",
                               "tuning_wall_time_s", "source"]))
