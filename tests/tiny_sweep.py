"""One tiny real sweep, run at most once per test session and shared by the results/retrain/report tests.

A session-scoped fixture defined in several test modules would run once per module, so the sweep
is cached here, in the process: the first test that asks runs it into a session temp folder, the
others reuse the folder (tests copy it before changing anything in it). Callers depend on the
``ray_session`` fixture (conftest.py), so the sweep runs on the session's one Ray instance.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Multi-objective, with a same-budget baseline: exercises the Pareto set, both arms and ASHA-free
# FIFO scheduling, on digits in a few seconds of training. Two epochs so OIALR cuts ranks.
# The trainer config every tiny test sweep starts from: a small MLP on digits, a few seconds a trial.
# Tests that change it work on a deep copy.
TINY_BASE = {
    "device": "cpu",
    "model": {"name": "mlp", "args": {"hidden": [32, 32]}},
    "data": {"name": "digits"},
    "schedule": {"batch_size": 64},
    "oialr": {"delay": 0.2, "stability_frequency": 5},
}

SPACE = {
    "name": "tiny",
    "base": TINY_BASE,
    "search": {
        "optimizer.lr": {"type": "loguniform", "low": 2.0e-3, "high": 1.0e-2},
        "oialr.stability_threshold": {"type": "categorical", "choices": [None, 0.9]},
        "oialr.sigma_cutoff_fraction": {"type": "uniform", "low": 0.05, "high": 0.3},
    },
    "objective": {"metric": "val_acc", "mode": "multi"},
    "budget": {"num_samples": 3, "max_epochs": 2},
    "resources": {"cpu": 1},
    "seed": 0,
}

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
