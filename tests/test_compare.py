"""`oialr-tune compare`: the protocol end to end at a tiny budget, and its files agree with each other."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.image import imread
from tiny_sweep import TINY_BASE

from oialr_tune.cli import main
from oialr_tune.compare import ARMS, compare, gate_off_space, summarize, untuned_config, write_comparison
from oialr_tune.metrics import comparison_columns
from oialr_tune.model_io import load_model
from oialr_tune.space import space_from_dict
from oialr_tune.stats import welch_interval

SPACE = {
    "name": "tinycmp",
    "base": TINY_BASE,
    "search": {
        "optimizer.lr": {"type": "loguniform", "low": 2.0e-3, "high": 1.0e-2},
        "oialr.stability_threshold": {"type": "categorical", "choices": [0.5, 0.9]},
        "oialr.sigma_cutoff_fraction": {"type": "uniform", "low": 0.05, "high": 0.3},
    },
    "objective": {"metric": "val_acc", "mode": "max"},
    "budget": {"num_samples": 2, "max_epochs": 3, "grace_period": 1},
    "resources": {"cpu": 1},
    "seed": 0,
}


def test_gate_off_and_untuned_variants() -> None:
    space = space_from_dict(SPACE)
    off = gate_off_space(space)
    assert off.base["oialr"]["stability_threshold"] is None
    assert "oialr.stability_threshold" not in {p.key for p in off.search}
    assert off.arms() == ["oialr"]
    untuned = untuned_config(space)
    assert untuned["oialr"] == {"enabled": True}
    assert untuned["optimizer"] == space.base["optimizer"]


@pytest.fixture(scope="module")
def compared(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "cmp"
    compare(space_from_dict(SPACE), seeds=2, out=out)
    return out


def test_compare_files_agree_with_the_per_seed_results(compared: Path) -> None:
    table = pd.read_csv(compared / "comparison.csv")
    assert sorted(table["arm"].unique()) == sorted(arm for arm, _ in ARMS)
    assert (table.groupby("arm").size() == 2).all()
    # Every per-seed accuracy is what its saved model scores again after a reload.
    for arm in table["arm"].unique():
        for seed in table.loc[table["arm"] == arm, "seed"]:
            model_file = compared / "retrain" / arm / f"seed_{seed}" / "model.pt"
            assert model_file.exists()
            assert load_model(model_file) is not None
    # Every figure in comparison.md is recomputed here from comparison.csv.
    md = (compared / "comparison.md").read_text()
    assert list(table.columns) == comparison_columns("test_acc")
    ref = table.loc[table["arm"] == "full_rank_tuned", "test_acc"].tolist()
    for arm, label in ARMS:
        accs = table.loc[table["arm"] == arm, "test_acc"].tolist()
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        mean, std = statistics.fmean(accs), statistics.stdev(accs)
        assert f"{mean:.4f} ± {std:.4f}" in row
        frac = table.loc[table["arm"] == arm, "trainable_fraction"].mean()
        assert f"| {frac:.3f} |" in row
        if arm != "full_rank_tuned":
            iv = welch_interval(accs, ref)
            if math.isfinite(iv.low):
                assert f"[{iv.low:+.4f}, {iv.high:+.4f}]" in row
    assert [s["arm"] for s in summarize(table)] == [arm for arm, _ in ARMS]
    # OIALR arms end with fewer trainable parameters than the full-rank arm.
    fracs = table.groupby("arm")["trainable_fraction"].mean()
    assert fracs["full_rank_tuned"] == 1.0 and fracs["oialr_tuned"] < 1.0
    png = compared / "comparison.png"
    assert png.stat().st_size > 5000 and imread(png).ndim == 3
    assert re.search(r"!\[.*\]\(comparison\.png\)", md)


def test_compare_refuses_a_used_folder(compared: Path, capsys) -> None:
    before = sorted(p.name for p in compared.iterdir())
    assert main(["compare", "quickstart", "--out", str(compared), "--seeds", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(compared) in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in compared.iterdir()) == before
    assert main(["compare", "quickstart", "--seeds", "1", "--out", str(compared / "x")]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_a_regression_comparison_is_by_test_mae_and_lower_is_better(tmp_path: Path) -> None:
    """The table, the verdict and the plot follow the sweep's objective: test_mae, minimized."""
    maes = {"full_rank_tuned": [0.50, 0.51, 0.49], "oialr_tuned": [0.40, 0.41, 0.39],
            "oialr_untuned": [0.60, 0.61, 0.59], "oialr_gate_off": [0.50, 0.52, 0.48]}  # fmt: skip
    rows = [{"arm": arm, "seed": seed, "status": "finished", "test_mae": v, "val_mae": v, "test_loss": v * v,
             "trainable_fraction": 1.0 if arm == "full_rank_tuned" else 0.3, "trainable_params": 10,
             "total_params": 10, "wall_time_s": 1.0, "tuning_wall_time_s": 2.0, "source": "-"}
            for arm, values in maes.items() for seed, v in enumerate(values)]  # fmt: skip
    table = pd.DataFrame(rows, columns=comparison_columns("test_mae"))
    verdicts = {s["arm"]: s.get("verdict") for s in summarize(table, "test_mae", "min")}
    assert verdicts == {"full_rank_tuned": None, "oialr_tuned": "better", "oialr_untuned": "worse",
                        "oialr_gate_off": "no detectable difference"}  # fmt: skip
    write_comparison(tmp_path, table, title="t", metric="test_mae", mode="min")
    md = (tmp_path / "comparison.md").read_text()
    assert "| test_mae (mean ± std) |" in md and "lower is better" in md
    assert next(line for line in md.splitlines() if line.startswith("| tuned OIALR |")).endswith("| better |")
    assert imread(tmp_path / "comparison.png").ndim == 3
