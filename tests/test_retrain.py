"""`retrain` on a real tiny sweep: seeds, files, exact reload, fine-tuning, train+val, bad arguments."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import evaluate
from tiny_sweep import tiny_sweep_dir

from oialr_tune.cli import main
from oialr_tune.config import train_config_from_dict
from oialr_tune.data import load_data
from oialr_tune.model_io import load_model, read_model_file
from oialr_tune.oialr import LowRankLayer, low_rank_structure
from oialr_tune.results import best_trial
from oialr_tune.retrain import _write_start_checkpoint, merge_train_val, retrain
from oialr_tune.run_record import read_checkpoint


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory, ray_session: Any) -> Path:
    return tiny_sweep_dir(tmp_path_factory)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_retrain_two_seeds_reloads_to_the_reported_test_accuracy(
    sweep_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "final"
    assert main(["retrain", str(sweep_dir), "--seeds", "2", "--epochs", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    # one line per finished seed, in the order they finish
    assert re.search(r"\[retrain\] oialr seed 1000 \([1-4]/4 done\): status=finished", captured.err)
    assert "OIALR - full rank test_acc" in captured.out

    rows = _rows(out / "metrics.csv")
    assert [(r["arm"], r["seed"]) for r in rows] == [
        ("oialr", "1000"), ("oialr", "1001"), ("baseline", "1000"), ("baseline", "1001")
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [1000, 1001]
    assert summary["arms"]["oialr"]["trial_id"] == best_trial(sweep_dir).trial.trial_id
    for arm in ("oialr", "baseline"):
        accs = [float(r["test_acc"]) for r in rows if r["arm"] == arm]
        stats = summary["arms"][arm]["test_acc"]
        assert stats["values"] == accs
        assert stats["mean"] == pytest.approx(sum(accs) / 2)
        assert stats["std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))

    for r in rows:
        seed_dir = out / r["arm"] / f"seed_{r['seed']}"
        cfg = train_config_from_dict(yaml.safe_load((seed_dir / "config.yaml").read_text()))
        assert cfg.seed == int(r["seed"]) and cfg.schedule.epochs == 2
        assert cfg.oialr.enabled == (r["arm"] == "oialr")
        # The file alone (not the trainer's in-memory model) reproduces the reported test accuracy.
        model = load_model(out / r["model"])
        splits = load_data(cfg.data, "cpu")
        _, acc = evaluate(model, splits.loader("test", 2 * cfg.schedule.batch_size))
        assert acc == float(r["test_acc"]) == float(r["reloaded_test_acc"])
        assert read_model_file(out / r["model"]).meta["seed"] == int(r["seed"])
        if r["arm"] == "oialr":
            assert low_rank_structure(model), "the OIALR model file keeps its low-rank layers"
            dense = load_model(out / r["model_dense"])
            assert not any(isinstance(m, LowRankLayer) for m in dense.modules())
            assert abs(float(r["dense_test_acc"]) - acc) <= 1 / len(splits.test)  # float rounding at most
        else:
            assert r["model_dense"] == "" and float(r["trainable_fraction"]) == 1.0


def test_parallel_retrain_gives_the_sequential_metrics(sweep_dir: Path, tmp_path: Path) -> None:
    """The same (arm, seed) runs as Ray tasks side by side, or one after another in this process."""
    quiet = {"seeds": 2, "epochs": 2, "log": lambda message: None}
    retrain(sweep_dir, out=tmp_path / "sequential", max_concurrent=1, **quiet)
    retrain(sweep_dir, out=tmp_path / "parallel", max_concurrent=4, **quiet)
    keys = ("arm", "seed", "status", "test_acc", "test_loss", "val_acc", "trainable_fraction", "trainable_params")
    sequential = [tuple(r[k] for k in keys) for r in _rows(tmp_path / "sequential" / "metrics.csv")]
    parallel = [tuple(r[k] for k in keys) for r in _rows(tmp_path / "parallel" / "metrics.csv")]
    assert len(sequential) == 4 and parallel == sequential


def test_fine_tune_a_chosen_trial_from_its_checkpoint_on_train_and_val(
    sweep_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    best = best_trial(sweep_dir)
    # Not the best: the smallest Pareto point (a user trading accuracy for size).
    chosen = min(best.pareto, key=lambda t: t.trainable_fraction)
    out = tmp_path / "ft"
    argv = ["retrain", str(sweep_dir), "--seeds", "1", "--epochs", "1", "--arm", "oialr", "--from-checkpoint",
            "--from-trial", chosen.trial_id, "--train-on", "train+val", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "no val metrics" in err and "fine-tuning from" in err
    (row,) = _rows(out / "metrics.csv")
    assert row["arm"] == "oialr" and row["status"] == "finished"
    assert row["val_acc"] == "nan"  # val is part of training now
    # Fine-tuning starts from the trial's low-rank weights: never more trainable parameters.
    assert float(row["trainable_fraction"]) <= chosen.trainable_fraction + 1e-9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["oialr"]["trial_id"] == chosen.trial_id

    # What the fine-tune starts from: the trial's weights and ranks, with a fresh schedule and seed.
    source = Path(chosen.checkpoint_file)
    cfg = train_config_from_dict({**chosen.config, "seed": 1000})
    _write_start_checkpoint(source, cfg, tmp_path / "start")
    start = read_checkpoint(tmp_path / "start" / "checkpoint.pt")
    trial = read_checkpoint(source)
    assert (start["epoch"], start["step"], start["history"]) == (0, 0, [])
    assert start["controller"]["step"] == 0 and start["controller"]["ranks"] == trial["controller"]["ranks"]
    assert start["config"]["seed"] == 1000
    assert all(torch.equal(start["model"][k], v) for k, v in trial["model"].items())
    assert summary["train_on"] == "train+val" and summary["from_checkpoint"] is True
    assert "baseline" not in summary["arms"]


def test_merge_train_val_moves_val_into_train(sweep_dir: Path) -> None:
    cfg = train_config_from_dict(best_trial(sweep_dir).config)
    splits = load_data(cfg.data, "cpu")
    merged = merge_train_val(splits)
    assert len(merged.train) == len(splits.train) + len(splits.val)
    assert len(merged.val) == 0
    assert merged.test is splits.test
    assert torch.equal(merged.train.x[len(splits.train):], splits.val.x)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--seeds", "0"], "--seeds"), (["--epochs", "0"], "--epochs"), (["--from-trial", "nope"], "--from-trial")],
)
def test_bad_arguments_write_nothing(
    sweep_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    assert main(["retrain", str(sweep_dir), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"oialr-tune: error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_merge_train_val_for_an_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    from oialr_tune.config import DataConfig

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / cls / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, num_workers=0, val_fraction=0.2,
                     test_fraction=0.2)
    splits = load_data(cfg, "cpu")
    merged = merge_train_val(splits)
    assert (len(merged.train), len(merged.val)) == (len(splits.train) + len(splits.val), 0)
    # Training batches come from the augmented view of train and val examples alike.
    batches = list(merged.loader("train", 2, train=True, augment=True, seed=0))
    assert sum(len(y) for _, y in batches) == len(merged.train)
    assert batches[0][0].shape == (2, 3, 8, 8)
