"""One tiny real sweep, run at most once per test session and shared by the results/retrain/report tests.

A session-scoped fixture defined in several test modules would run once per module, so the sweep
is cached here, in the process: the first test that asks runs it into a session temp folder, the
others reuse the folder (tests copy it before changing anything in it). Callers depend on the
``ray_session`` fixture (conftest.py), so the sweep runs on the session's one Ray instance.

`tiny_space(...)` builds the tiny search spaces the other test files sweep or break, each with its
own sizes and budget, so the shared parts are written once.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

# The trainer config every tiny test sweep starts from: a small MLP on digits, a few seconds a trial.
# Tests that change it work on a deep copy.
TINY_BASE = {
    "device": "cpu",
    "model": {"name": "mlp", "args": {"hidden": [32, 32]}},
    "data": {"name": "digits"},
    "schedule": {"batch_size": 64},
    "oialr": {"delay": 0.2, "stability_frequency": 5},
}


def tiny_space(name: str = "tiny", *, hidden: list[int] | None = None, batch_size: int | None = None,
               base: Mapping[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A tiny search space on TINY_BASE: the learning rate searched in [1e-3, 3e-2], two trials of
    two epochs, one CPU each. Returns a new dict (deep copies), which the caller may change.

    `hidden` and `batch_size` set the MLP's hidden widths and the batch size; `base` replaces
    TINY_BASE's sections ("model", "schedule", "oialr", ...); other keyword arguments replace the
    space's own sections ("search", "budget", "strategy", "seed", ...). None removes a section.
    """
    trainer = copy.deepcopy(TINY_BASE)
    if hidden is not None:
        trainer["model"]["args"]["hidden"] = list(hidden)
    if batch_size is not None:
        trainer["schedule"]["batch_size"] = batch_size
    space: dict[str, Any] = {
        "name": name,
        "base": trainer,
        "search": {"optimizer.lr": {"type": "loguniform", "low": 1.0e-3, "high": 3.0e-2}},
        "budget": {"num_samples": 2, "max_epochs": 2},
        "resources": {"cpu": 1},
    }
    for into, changes in ((trainer, base or {}), (space, sections)):
        for key, value in changes.items():
            if value is None:
                into.pop(key, None)
            else:
                into[key] = copy.deepcopy(value)
    return space


# Multi-objective, with a same-budget baseline: exercises the Pareto set, both arms and ASHA-free
# FIFO scheduling, on digits in a few seconds of training. Two epochs so OIALR cuts ranks.
SPACE = tiny_space(
    search={
        "optimizer.lr": {"type": "loguniform", "low": 2.0e-3, "high": 1.0e-2},
        "oialr.stability_threshold": {"type": "categorical", "choices": [None, 0.9]},
        "oialr.sigma_cutoff_fraction": {"type": "uniform", "low": 0.05, "high": 0.3},
    },
    objective={"metric": "val_acc", "mode": "multi"},
    budget={"num_samples": 3, "max_epochs": 2},
    seed=0,
)

_CACHE: dict[str, Path] = {}


def tiny_sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The results folder of the session's tiny sweep (run on first use). Treat it as read-only."""
    if "dir" not in _CACHE:
        from oialr_tune.space import space_from_dict
        from oialr_tune.tuning import sweep

        root = tmp_path_factory.mktemp("tiny-sweep")
        result = sweep(space_from_dict(SPACE), name="tiny", results_dir=root, verbose=0)
        _CACHE["dir"] = Path(result.path)
    return _CACHE["dir"]
