"""`oialr_tune.metrics`: every column of the files the commands write is named there.

trials.csv (``sweep``), metrics.csv (``retrain``) and comparison.csv (``compare``, whose header
`test_compare.py` checks against `comparison_columns`) are read back from real runs on the session's
tiny sweep and compared with the owner's lists, so a column added in one writer and not in the
owner fails here.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
from tiny_sweep import SPACE, TINY_BASE, tiny_sweep_dir

from oialr_tune.metrics import (
    RETRAIN_COLUMNS,
    RETRAIN_SUMMARY_COLUMNS,
    SIZE_COLUMNS,
    comparison_columns,
    trial_columns,
)
from oialr_tune.models import build_model
from oialr_tune.retrain import retrain
from oialr_tune.space import space_from_dict
from oialr_tune.sweep_state import TRIALS_FILE


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory, ray_session: Any) -> Path:
    return tiny_sweep_dir(tmp_path_factory)


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_trials_csv_has_the_owners_columns_and_the_models_full_size(sweep_dir: Path) -> None:
    space = space_from_dict(SPACE)
    searched = dict.fromkeys(p.key for arm in space.arms() for p in space.arm_params(arm))
    header, rows = _read(sweep_dir / TRIALS_FILE)
    assert header == trial_columns(space.objective.metric, searched)
    assert set(SIZE_COLUMNS) <= set(header)
    # total_params: the model's parameters at full rank, the denominator of trainable_fraction.
    mlp = TINY_BASE["model"]
    full = sum(p.numel() for p in build_model(mlp["name"], (64,), 10, **mlp["args"]).parameters())
    assert rows and {int(r["total_params"]) for r in rows} == {full}
    for r in rows:
        assert float(r["trainable_fraction"]) == pytest.approx(int(r["trainable_params"]) / full)


def test_retrain_writes_the_owners_columns_and_compare_takes_its_own_from_them(sweep_dir: Path, tmp_path: Path) -> None:
    retrain(sweep_dir, out=tmp_path / "final", seeds=1, epochs=1, max_concurrent=1, log=lambda message: None)
    header, rows = _read(tmp_path / "final" / "metrics.csv")
    assert header == list(RETRAIN_COLUMNS)
    assert len(rows) == 2 and all(r["total_params"] and r["val_loss"] for r in rows)
    assert set(RETRAIN_SUMMARY_COLUMNS) <= set(RETRAIN_COLUMNS)
    # comparison.csv is a retrain row per arm and seed, plus the arm's tuning time and source.
    assert set(comparison_columns("test_acc")) - set(header) == {"tuning_wall_time_s", "source"}
