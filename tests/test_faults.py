"""Faults a sweep must survive, caused for real on CPU with small budgets.

* trials that raise, and trials whose loss becomes NaN: recorded with their status, the sweep goes on,
  `best` ignores them;
* a trial's worker process killed (SIGKILL) mid-trial: retried from its last checkpoint (budget.max_failures);
* a worker node of a two-node Ray cluster removed mid-sweep (tests/_worker_loss.py, its own Ray);
* a checkpoint write interrupted halfway: the previous checkpoint stays usable and the run resumes exactly.

A killed driver is covered by tests/test_sweep.py::test_killed_sweep_resumes_without_losing_finished_trials,
a failed SVD by tests/test_oialr.py::test_failed_svd_falls_back_and_training_continues and determinism by
tests/test_trainer.py::test_same_seed_same_metrics_other_seed_differs (see tests/README.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from tiny_sweep import tiny_space

from oialr_tune.cli import main
from oialr_tune.config import train_config_from_dict
from oialr_tune.errors import UserError
from oialr_tune.run_record import read_checkpoint
from oialr_tune.sweep_state import CHECKPOINT_FILE
from oialr_tune.trainer import train

HERE = Path(__file__).parent

# --- trials that raise or diverge ------------------------------------------------------------------

# A ViT on 8x8 digits: patch_size 3 does not divide the images, which only the model builder can see (the
# space cannot know the image size), so such a trial raises inside Ray; lr 1e5 with SGD makes the loss NaN
# in the first epoch. With seed 0 the four trials Optuna samples are (4, 0.1) fine, (4, 1e5) diverged,
# (3, 0.1) error and (4, 1e5) diverged; the test checks each trial by its own config, whatever was sampled.
FAILING_SPACE: dict[str, Any] = {
    "name": "faults",
    "base": {
        "device": "cpu",
        "model": {"name": "vit_small", "args": {"patch_size": 4, "dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 1.0}},
        "data": {"name": "digits"},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "schedule": {"batch_size": 128, "warmup_fraction": 0.0},
        "oialr": {"delay": 0.3, "stability_frequency": 5},
    },
    "search": {
        "model.args.patch_size": {"type": "categorical", "choices": [3, 4]},
        "optimizer.lr": {"type": "categorical", "choices": [0.1, 1.0e5]},
    },
    "objective": {"metric": "val_acc", "mode": "max"},
    "budget": {"num_samples": 4, "max_epochs": 2, "max_concurrent": 2},
    "strategy": {"scheduler": "fifo"},
    "resources": {"cpu": 1},
    "baseline": "none",
    "seed": 0,
}


# What the failing sweep printed (its progress lines), for the tests of its output.
PRINTED: dict[str, str] = {}


@pytest.fixture(scope="module")
def failing_sweep(ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The results folder of FAILING_SPACE, swept once through the CLI on the session's Ray."""
    root = tmp_path_factory.mktemp("failing")
    (root / "space.yaml").write_text(yaml.safe_dump(FAILING_SPACE))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["sweep", str(root / "space.yaml"), "--results-dir", str(root), "--name", "f"])
    assert code == 0, "a sweep whose trials fail or diverge still completes"
    PRINTED["out"] = out.getvalue()
    return root / "f"


def _kind(row: pd.Series) -> str:
    """What a trial with this config must have done."""
    if row["config.model.args.patch_size"] == 3:
        return "error"
    return "diverged" if row["config.optimizer.lr"] > 1 else "finished"


def test_failing_and_diverging_trials_are_recorded_and_the_sweep_goes_on(failing_sweep: Path) -> None:
    df = pd.read_csv(failing_sweep / "trials.csv", dtype={"error": object, "trainer_status": object})
    assert len(df) == FAILING_SPACE["budget"]["num_samples"]
    kinds = df.apply(_kind, axis=1)
    assert set(kinds) == {"error", "diverged", "finished"}, f"seed 0 no longer samples every case:\n{df}"
    for (_, row), kind in zip(df.iterrows(), kinds, strict=True):
        if kind == "error":
            assert row["status"] == "ERROR" and row["trainer_status"] == "error"
            assert "model.args.patch_size" in row["error"], row["error"]  # the cause, in one line
        elif kind == "diverged":
            assert row["status"] == "TERMINATED" and row["trainer_status"] == "diverged"
            assert row["training_iteration"] == 1 and row["val_acc"] == 0.0  # stopped at the first NaN epoch
            assert pd.isna(row["error"])
        else:
            assert row["status"] == "TERMINATED" and row["trainer_status"] == "finished"
            assert row["training_iteration"] == 2 and row["val_acc"] > 0.1 and pd.isna(row["error"])


def test_each_ended_trial_is_one_line_an_error_with_its_traceback_file(failing_sweep: Path) -> None:
    """Said once: an errored trial's line is its error and the path of its traceback; a diverged one's says so."""
    df = pd.read_csv(failing_sweep / "trials.csv")
    lines = PRINTED["out"].splitlines()
    for (_, row), kind in zip(df.iterrows(), df.apply(_kind, axis=1), strict=True):
        (line,) = [line for line in lines if line.startswith("[oialr] ") and row["trial_id"] in line]
        if kind == "error":
            match = re.search(r" ERROR (.*) \(traceback: (.*)\)$", line)
            assert match and "model.args.patch_size" in match[1] and "UserError" not in match[1], line
            full = Path(match[2]).read_text()  # Ray's traceback, stack frames and all
            assert 'File "' in full and "model.args.patch_size" in full, full
        else:
            assert (" diverged " in line) == (kind == "diverged") and (" done " in line) == (kind == "finished"), line


def test_a_sweep_of_only_diverged_trials_points_at_no_error_files(failing_sweep: Path) -> None:
    from oialr_tune.results import open_results
    from oialr_tune.tuning.driver import _check_every_arm_finished
    from oialr_tune.tuning.storage import Store

    res = open_results(failing_sweep)
    res.trials = res.trials[res.trials.apply(_kind, axis=1) == "diverged"]
    res.summary = {"best": {}}
    with pytest.raises(UserError, match="no trial finished") as e:
        _check_every_arm_finished(res, Store(str(failing_sweep)))
    assert "0 of" in str(e.value) and "error.txt" not in str(e.value) and "non-finite" in str(e.value)


def test_best_ignores_failed_and_diverged_trials(failing_sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.read_csv(failing_sweep / "trials.csv")
    kinds = df.apply(_kind, axis=1)
    fine = df[kinds == "finished"]
    capsys.readouterr()
    assert main(["best", str(failing_sweep), "--format", "json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["trial_id"] == fine.loc[fine["val_acc"].idxmax(), "trial_id"]
    assert best["finished_trials"] == len(fine) and best["ignored_trials"] == len(df) - len(fine)
    summary = json.loads((failing_sweep / "summary.json").read_text())
    assert summary["best"]["oialr"]["trial_id"] == best["trial_id"]


def test_a_sweep_whose_trials_all_fail_exits_2_and_says_where_the_errors_are(
    ray_session: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The base passes the pre-flight (patch_size 4), but every trial draws patch_size 3 and fails inside Ray."""
    space = {**FAILING_SPACE, "search": {"model.args.patch_size": {"type": "categorical", "choices": [3]}},
             "budget": {"num_samples": 2, "max_epochs": 1, "max_concurrent": 2}}  # fmt: skip
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    capfd.readouterr()
    code = main(["sweep", str(tmp_path / "space.yaml"), "--results-dir", str(tmp_path), "--name", "f"])
    out, err = capfd.readouterr()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err  # Ray's traceback per trial is in error.txt only (-v shows it)
    assert len([line for line in out.splitlines() if " ERROR " in line]) == 2, out
    line = err.splitlines()[0]
    assert line.startswith("oialr-tune: error: ") and "no trial finished" in line, err
    assert "arm oialr: 2 of 2 trials errored" in line and str(tmp_path / "f" / "trials.csv") in line, line
    df = pd.read_csv(tmp_path / "f" / "trials.csv")  # the results are written: they hold the errors
    assert list(df["status"]) == ["ERROR", "ERROR"] and df["error"].str.contains("model.args.patch_size").all()
    assert len(list((tmp_path / "f" / "oialr").glob("trial_*/error.txt"))) == 2


# --- a trial's process killed mid-trial --------------------------------------------------------------


def _result_lines(exp: Path) -> dict[str, list[dict[str, Any]]]:
    """trial id -> its reported results so far (Ray's result.json in the storage folder)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for f in exp.glob("trial_*/result.json"):
        rows = []
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                break
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def test_a_killed_trial_process_is_retried_from_its_last_checkpoint(ray_session: Any, tmp_path: Path) -> None:
    """SIGKILL the Ray worker running a trial once it has checkpointed; with max_failures 1 the trial is
    restarted in a new process from that checkpoint (its epochs go on, they do not start over at 1)."""
    from oialr_tune.space import space_from_dict
    from oialr_tune.tuning import sweep

    epochs = 5
    space = space_from_dict(tiny_space(
        "killed", hidden=[256, 256], batch_size=16,
        search={"optimizer.lr": {"type": "loguniform", "low": 1.0e-3, "high": 1.0e-2}},
        budget={"num_samples": 2, "max_epochs": epochs, "max_concurrent": 1, "max_failures": 1},
        strategy={"scheduler": "fifo"},
        checkpoint={"every": 1, "num_to_keep": 1},
        baseline="none",
    ))  # fmt: skip
    exp = tmp_path / "k" / "oialr"
    killed: dict[str, Any] = {}

    def kill_once() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for trial_id, rows in _result_lines(exp).items():
                last = rows[-1]
                if 1 <= last["epoch"] <= epochs - 3:  # checkpointed, with epochs left to run
                    os.kill(last["pid"], signal.SIGKILL)
                    killed.update(trial_id=trial_id, pid=last["pid"], epoch=last["epoch"])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_once, daemon=True)
    killer.start()
    result = sweep(space, name="k", results_dir=tmp_path, verbose=0)
    killer.join(timeout=1)
    assert killed, "no trial was caught between its first checkpoint and its last epochs"

    df = result.trials.set_index("trial_id")
    assert len(df) == 2 and set(df["status"]) == {"TERMINATED"}, df
    assert (df["trainer_status"] == "finished").all() and (df["training_iteration"] == epochs).all()
    rows = _result_lines(exp)[killed["trial_id"]]
    pids = [r["pid"] for r in rows]
    before = [r["epoch"] for r in rows if r["pid"] == killed["pid"]]
    after = [r["epoch"] for r in rows if r["pid"] != killed["pid"]]
    assert after, f"trial {killed['trial_id']} was not restarted in a new process: pids {pids}"
    # Restarted from the checkpoint of the last epoch it reported, not from scratch.
    assert after == list(range(max(before) + 1, epochs + 1)), f"epochs before the kill {before}, after {after}"
    assert max(before) >= killed["epoch"] >= 1
    assert [r["training_iteration"] for r in rows] == list(range(1, epochs + 1))


# --- a worker node lost ----------------------------------------------------------------------------


def test_removing_a_worker_node_loses_no_finished_trial(tmp_path: Path) -> None:
    """Two-node local cluster (its own Ray, in a subprocess): the worker node is removed while it runs a
    trial; finished trials stay with their metrics, the lost trial reruns on the head, the sweep completes."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "_worker_loss.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    df = pd.read_csv(Path(report["results"]) / "trials.csv").set_index("trial_id")
    epochs = report["epochs"]

    assert report["removed"], f"the worker node was never removed mid-trial:\n{out[-4000:]}"
    assert len(df) == report["num_samples"] and set(df["status"]) == {"TERMINATED"}, df
    assert (df["training_iteration"] == epochs).all()
    for trial_id, val_acc in report["finished_before"].items():  # nothing finished was lost or rerun
        assert df.loc[trial_id, "val_acc"] == val_acc
    lost = report["running_on_worker"]
    assert lost, "no trial was running on the removed node"
    for trial_id in lost:  # the lost trials were retried elsewhere and finished there
        assert df.loc[trial_id, "node_id"] == report["head"]
    assert report["worker"] not in set(df.loc[lost, "node_id"])
    for trial_id in lost:  # ... from its last checkpoint: the epochs go on where they were
        rows = [json.loads(line) for line in (Path(report["results"]) / "oialr" / f"trial_{trial_id}" /
                                              "result.json").read_text().splitlines()]  # fmt: skip
        assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
        nodes = [r["node_id"] for r in rows]
        assert nodes[0] == report["worker"] and nodes[-1] == report["head"]


# --- a checkpoint write interrupted ---------------------------------------------------------------


def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second checkpoint's torch.save writes half its bytes and fails (a full disk, a kill): the file
    on disk is still the first one, no partial file is left, and resuming gives the uninterrupted run."""
    cfg = train_config_from_dict({
        "device": "cpu", "model": {"name": "mlp", "args": {"hidden": [32]}},
        "schedule": {"epochs": 3, "batch_size": 128}, "oialr": {"delay": 5, "stability_frequency": 3},
    })  # fmt: skip
    full = train(cfg)

    real_save = torch.save
    calls = []

    def failing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) != 2:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, checkpoint_dir=tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE], "a partial file was left behind"
    assert read_checkpoint(tmp_path / CHECKPOINT_FILE)["epoch"] == 1

    # A process killed mid-write cannot clean up: its stray temp file must not disturb the resume.
    (tmp_path / f".{CHECKPOINT_FILE}.crash.tmp").write_bytes(b"half a checkpoint")
    resumed = train(cfg, checkpoint_dir=tmp_path)
    timing = {"examples_per_s", "train_time_s"}
    assert [{k: v for k, v in m.items() if k not in timing} for m in resumed.history] == [
        {k: v for k, v in m.items() if k not in timing} for m in full.history
    ]
    assert read_checkpoint(tmp_path / CHECKPOINT_FILE)["epoch"] == 3
