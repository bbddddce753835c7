"""What a run reports, by name: the metrics of each task, and which way each one is better.

The one owner of these names for the config, the search space, the tasks, results, tuning and
retrain. Plain data: it imports nothing, so any module may import it.
"""

from __future__ import annotations

from collections.abc import Mapping

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
