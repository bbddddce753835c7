"""`report` on a real tiny sweep: decodable PNGs referenced by report.md; graceful with too few trials."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import matplotlib.image
import pandas as pd
import pytest
from tiny_sweep import tiny_sweep_dir

from oialr_tune.cli import main
from oialr_tune.report import PLOTS
from oialr_tune.sweep_state import REPORT_FILE


@pytest.fixture(scope="module")
def sweep_copy(tmp_path_factory: pytest.TempPathFactory, ray_session: Any) -> Path:
    """A private copy of the shared sweep: the report writes into the results folder."""
    dst = tmp_path_factory.mktemp("report") / "tiny"
    shutil.copytree(tiny_sweep_dir(tmp_path_factory), dst)
    return dst


def _images(report: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())


def test_report_writes_decodable_plots_referenced_by_the_markdown(
    sweep_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(sweep_copy)]) == 0
    report = sweep_copy / REPORT_FILE
    assert capsys.readouterr().out.strip() == str(report)
    linked = _images(report)
    assert sorted(linked) == sorted(PLOTS.values())  # every plot drawn: ranks, importances included
    for name in linked:
        png = sweep_copy / name
        assert png.stat().st_size > 5_000
        pixels = matplotlib.image.imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
        assert pixels.std() > 0  # not a blank canvas
    text = report.read_text()
    trials = pd.read_csv(sweep_copy / "trials.csv")
    assert "## Top 10 trials by val_acc" in text and "Pareto set (OIALR)" in text
    for trial_id in trials["trial_id"]:
        assert str(trial_id) in text  # 6 trials: all in the top-10 table


def test_report_with_one_finished_trial_explains_what_it_left_out(sweep_copy: Path, tmp_path: Path) -> None:
    import optuna

    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(sweep_copy / "sweep.yaml", few / "sweep.yaml")
    trials = pd.read_csv(sweep_copy / "trials.csv")
    trials[trials["arm"] == "oialr"].head(1).to_csv(few / "trials.csv", index=False)
    # A study with a single finished trial: Optuna cannot rank importances from it.
    study = optuna.create_study(study_name="oialr", storage=f"sqlite:///{few / 'study.db'}", directions=["maximize"])
    study.add_trial(optuna.trial.create_trial(
        params={"x": 0.5}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)}, values=[0.9]))
    del study
    assert main(["report", str(few)]) == 0
    text = (few / REPORT_FILE).read_text()
    assert "importances need at least 2" in text
    assert PLOTS["importance"] not in _images(few / REPORT_FILE)
    assert not (few / PLOTS["importance"]).exists()
    # No per-epoch files in this copy (Ray's trial folders were not copied): said, not crashed.
    assert "Not plotted" in text
    for name in _images(few / REPORT_FILE):
        assert (few / name).stat().st_size > 0
