"""`best` and `oialr_tune.results` on a real tiny sweep: JSON/YAML/table output, Pareto, budgets, bad dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from tiny_sweep import tiny_sweep_dir

from oialr_tune.cli import main
from oialr_tune.results import best_trial, open_results, pareto_mask


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory, ray_session: Any) -> Path:
    return tiny_sweep_dir(tmp_path_factory)


def _copy_tables(src: Path, dst: Path) -> Path:
    """A results folder with only the files `best` reads, safe to edit."""
    dst.mkdir()
    for name in ("sweep.yaml", "trials.csv"):
        shutil.copy(src / name, dst / name)
    return dst


def test_best_json_names_an_existing_checkpoint(sweep_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["best", str(sweep_dir), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["arm"] == "oialr" and out["objective"]["multi"] is True
    assert Path(out["checkpoint"]).exists()
    assert out["checkpoint_file"] == str(Path(out["checkpoint"]) / "checkpoint.pt")
    assert Path(out["checkpoint_file"]).is_file()
    # The same trial the sweep's own summary calls best, with the config the trial really ran.
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert out["trial_id"] == summary["best"]["oialr"]["trial_id"]
    params = json.loads((sweep_dir / "oialr" / f"trial_{out['trial_id']}" / "params.json").read_text())
    assert out["params"] == params
    assert out["config"]["optimizer"]["lr"] == params["optimizer.lr"]
    assert out["config"]["oialr"]["stability_threshold"] == params["oialr.stability_threshold"]
    # Multi-objective: the Pareto set is there, non-dominated, and holds the chosen trial.
    pareto = out["pareto"]
    assert out["trial_id"] in {p["trial_id"] for p in pareto}
    accs = [p["metrics"]["val_acc"] for p in pareto]
    fracs = [p["trainable_fraction"] for p in pareto]
    assert pareto_mask(accs, fracs).all()
    assert out["metrics"]["val_acc"] == max(accs)


def test_best_yaml_is_a_trainer_config_that_trains(
    sweep_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["best", str(sweep_dir), "--format", "yaml"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# best oialr trial")
    config = tmp_path / "best.yaml"
    config.write_text(text)
    assert yaml.safe_load(text)["oialr"]["enabled"] is True
    assert main(["train", str(config)]) == 0
    assert "status=finished" in capsys.readouterr().out


def test_best_table_baseline_and_budget(sweep_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["best", str(sweep_dir)]) == 0
    table = capsys.readouterr().out
    assert "Pareto set" in table and "<- chosen" in table

    base = best_trial(sweep_dir, arm="baseline")
    assert base.trial.trainable_fraction == 1.0 and not base.multi
    assert base.config["oialr"]["enabled"] is False

    best = best_trial(sweep_dir)
    smallest = min(p.trainable_fraction for p in best.pareto)
    under = best_trial(sweep_dir, max_trainable_fraction=smallest)
    assert under.trial.trainable_fraction == smallest

    assert main(["best", str(sweep_dir), "--max-trainable-fraction", str(smallest / 2)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("oialr-tune: error: --max-trainable-fraction") and "\n" not in err


def test_failed_and_diverged_trials_are_ignored(sweep_dir: Path, tmp_path: Path) -> None:
    copy = _copy_tables(sweep_dir, tmp_path / "edited")
    trials = pd.read_csv(copy / "trials.csv", dtype={"error": object, "trainer_status": object})
    oialr = trials[trials["arm"] == "oialr"].sort_values("val_acc", ascending=False)
    first, second = oialr.index[0], oialr.index[1]
    # The best trial errored, the runner-up diverged (but looks great): neither may be chosen.
    trials.loc[first, ["status", "error"]] = ["ERROR", "RuntimeError: boom"]
    trials.loc[second, ["trainer_status", "val_acc"]] = ["diverged", 0.999]
    trials.to_csv(copy / "trials.csv", index=False)
    best = best_trial(copy, objective="val_acc")
    assert best.trial.trial_id not in {trials.loc[first, "trial_id"], trials.loc[second, "trial_id"]}
    assert best.ignored_trials == 2 and best.finished_trials == len(oialr) - 2


def test_sampled_null_comes_back_as_null(sweep_dir: Path) -> None:
    res = open_results(sweep_dir)
    for _, row in res.trials[res.trials["arm"] == "oialr"].iterrows():
        info = res.trial_info(row.to_dict())
        assert info.params["oialr.stability_threshold"] in (None, 0.9)
        assert info.config["oialr"]["stability_threshold"] == info.params["oialr.stability_threshold"]


def test_pareto_mask() -> None:
    acc = np.array([0.9, 0.8, 0.95, 0.85, 0.9])
    frac = np.array([0.5, 0.3, 0.9, 0.6, 0.5])
    # 0.85@0.6 is beaten by 0.9@0.5; duplicates of a front point both stay.
    assert pareto_mask(acc, frac).tolist() == [True, True, True, False, True]


@pytest.mark.parametrize("command", [["best"], ["retrain", "--seeds", "1"], ["report"]])
def test_a_folder_without_an_experiment_is_one_line_exit_2_nothing_written(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "not-a-sweep"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    for target in (empty, tmp_path / "missing"):
        assert main([command[0], str(target), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(target) in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["not-a-sweep", "notes.txt"]


def test_best_piped_into_a_reader_that_leaves_early_is_quiet(sweep_dir: Path) -> None:
    """`oialr-tune best DIR | head -1`: no BrokenPipeError traceback once `head` has its line."""
    import subprocess
    import sys

    code = "import sys; from oialr_tune.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "best", str(sweep_dir), "--format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def _tensorboard_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from a TensorBoard event file (TFRecord framing of Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    data, i, out = path.read_bytes(), 0, {}
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i : i + 8])
        event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
        i += 12 + length + 4
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_every_trial_has_tensorboard_events_matching_its_results(sweep_dir: Path) -> None:
    """TensorBoard reads the sweep: one event file per trial (ours, written at the trial's end, not
    also Ray's per-epoch one) with every epoch's metrics and the trial's hyperparameters."""
    trials = sorted((sweep_dir / "oialr").glob("trial_*"))
    assert trials
    for trial in trials:
        files = list(trial.glob("events.out.tfevents.*"))
        assert len(files) == 1, f"{trial.name}: {files}"
        scalars = _tensorboard_scalars(files[0])
        reports = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        logged = scalars["ray/tune/val_acc"]
        assert [step for step, _ in logged] == [r["training_iteration"] for r in reports]
        assert np.allclose([v for _, v in logged], [r["val_acc"] for r in reports], atol=1e-6)
        assert "ray/tune/trainable_fraction" in scalars and "_hparams_/experiment" in scalars


def test_a_bare_name_is_found_under_results(sweep_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`oialr-tune best NAME` from the project root, as the README's user path types it."""
    shutil.copytree(sweep_dir, tmp_path / "results" / "my-sweep")
    monkeypatch.chdir(tmp_path)
    assert main(["best", "my-sweep", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["arm"] == "oialr"
    assert main(["best", "no-such-sweep"]) == 2
    assert "no-such-sweep: no such results directory" in capsys.readouterr().err


def _journal_sweep(folder: Path, trials: list[tuple[Any, ...]], budget: float | None) -> Path:
    """A sweep folder as a sweep leaves it before its final writes: sweep.yaml and the OIALR arm's
    journal, one ended trial per (id, val_acc, trainable fraction or None when never reported[, the
    epochs it ran: 2 of 2 unless given, fewer when ASHA stopped it])."""
    from helpers import journal_path
    from tiny_sweep import TINY_BASE

    from oialr_tune.space import space_from_dict

    space = space_from_dict({
        "name": "ties", "base": TINY_BASE, "baseline": "none",
        "search": {"optimizer.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
        "objective": {"metric": "val_acc", "mode": "max", "max_trainable_fraction": budget},
        "budget": {"num_samples": len(trials), "max_epochs": 2},
    })  # fmt: skip
    folder.mkdir()
    (folder / "sweep.yaml").write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
    lines = []
    for i, (trial_id, acc, fraction, *ran) in enumerate(trials):
        epochs = ran[0] if ran else 2
        result = {"val_acc": acc, "training_iteration": epochs, "run_status": "finished" if epochs == 2 else "running"}
        if fraction is not None:
            result["trainable_fraction"] = fraction
        lines.append({"kind": "end", "trial_id": trial_id, "status": "TERMINATED", "result": result,
                      "config": {"optimizer.lr": 1e-3 * (i + 1)}, "checkpoint": None, "dir": None})  # fmt: skip
    journal_path(folder, "oialr").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        # Three tied at the top: the smaller model wins; a missing fraction counts as full size.
        (None, "b"),
        # The most accurate trial never reported its fraction: full size, so over any budget.
        (0.4, "b"),
    ],
)
def test_the_sweep_summary_and_best_agree_on_ties_and_missing_fractions(
    tmp_path: Path, budget: float | None, expected: str
) -> None:
    from oialr_tune.tuning.collect import rebuild_results

    trials = [("a", 0.9, 0.5), ("b", 0.9, 0.3), ("c", 0.9, None), ("d", 0.85, 0.1)]
    if budget is not None:
        trials.append(("e", 0.95, None))
    folder = _journal_sweep(tmp_path / "s", trials, budget)
    rebuild_results(folder)  # what the sweep runs once its arms are done: trials.csv, summary.json, study.db
    summary = json.loads((folder / "summary.json").read_text())
    best = best_trial(folder)
    assert summary["best"]["oialr"]["trial_id"] == best.trial.trial_id == expected
    assert best.max_trainable_fraction == budget


def test_the_checkpoint_file_name_is_the_trainers() -> None:
    """results reads without torch, so it reads the trainer's file name from sweep_state, as the run record does."""
    from oialr_tune import results
    from oialr_tune.config import TrainConfig
    from oialr_tune.run_record import Checkpoints

    assert Checkpoints.of(TrainConfig(), "ckpt").path == Path("ckpt") / results.CHECKPOINT_FILE


def test_a_sweep_with_no_trial_under_its_budget_says_so_and_is_not_an_error(tmp_path: Path) -> None:
    """Trials finished, none small enough: the summary line names the budget; the sweep still ends 0."""
    from oialr_tune.tuning.collect import rebuild_results
    from oialr_tune.tuning.driver import _check_every_arm_finished, summary_line
    from oialr_tune.tuning.storage import Store

    folder = _journal_sweep(tmp_path / "s", [("a", 0.9, 0.5), ("b", 0.8, 0.3)], budget=0.1)
    rebuild_results(folder)
    res = open_results(folder)
    assert "oialr" not in res.summary["best"]
    assert summary_line(res) == "best OIALR: no finished trial at or under trainable fraction 0.1"
    _check_every_arm_finished(res, Store(str(folder)))  # raises for an arm with no finished trial at all


@pytest.mark.parametrize(("trials", "expected"), [
    # The most accurate trial was stopped by ASHA after epoch 1, before any cut: not a candidate.
    ([("a", 0.99, 1.0, 1), ("b", 0.90, 0.4), ("c", 0.92, 0.3)], "c"),
    # Only when no trial ran every epoch does the pick fall back to the stopped ones.
    ([("a", 0.99, 1.0, 1), ("b", 0.90, 0.4, 1)], "a"),
])
def test_best_picks_among_trials_that_ran_every_epoch(tmp_path: Path, trials: list[tuple[Any, ...]],
                                                      expected: str) -> None:
    from oialr_tune.best_format import format_best
    from oialr_tune.tuning.collect import rebuild_results

    folder = _journal_sweep(tmp_path / "s", trials, None)
    rebuild_results(folder)
    best = best_trial(folder)
    assert best.trial.trial_id == json.loads((folder / "summary.json").read_text())["best"]["oialr"]["trial_id"]
    assert best.trial.trial_id == expected
    assert (best.finished_trials, best.completed_trials) == (len(trials), sum(len(t) == 3 for t in trials))
    assert ("stopped early by ASHA" in format_best(best)) == (expected == "c")


def test_the_summary_line_says_better_or_worse_for_a_minimized_metric(tmp_path: Path) -> None:
    """val_mae 0.4990 vs 0.4950 used to print as "OIALR +0.00": now worse, by 0.004."""
    from tiny_sweep import TINY_BASE

    from oialr_tune.results import SweepResults
    from oialr_tune.space import space_from_dict
    from oialr_tune.tuning.driver import summary_line

    space = space_from_dict({
        "name": "mae", "base": {**TINY_BASE, "task": "regression", "data": {"name": "synthetic"}},
        "search": {"optimizer.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
        "objective": {"metric": "val_mae", "mode": "min"}, "budget": {"num_samples": 2, "max_epochs": 2},
    })  # fmt: skip
    best = {"oialr": {"trial_id": "o", "val_mae": 0.4990, "trainable_fraction": 0.3},
            "baseline": {"trial_id": "f", "val_mae": 0.4950, "trainable_fraction": 1.0}}  # fmt: skip
    line = summary_line(SweepResults(tmp_path, space, pd.DataFrame(), {"best": best}))
    assert line.endswith("OIALR worse by 0.004 with 30.0% of the trainable parameters"), line
    best["oialr"]["val_mae"] = 0.4900
    assert "OIALR better by 0.005 " in summary_line(SweepResults(tmp_path, space, pd.DataFrame(), {"best": best}))
