"""A sweep folder survives any kill: the kill-point matrix, a full disk, SIGTERM, the lock, a moved
folder, an edited config, an unsigned or tampered state, and final writes cut short.

Kills use the driver's own hook (`OIALR_TUNE_TEST_KILL_AT`, see `oialr_tune.sweep_state.kill_point`):
the driver SIGKILLs its whole process group (itself and the Ray it started) at a named point, so
each phase is hit exactly. Resumes run in-process on the session's Ray.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from helpers import journal_path
from tiny_sweep import SPACE as TINY_SPACE
from tiny_sweep import tiny_sweep_dir

from oialr_tune import sweep_state
from oialr_tune.cli import main
from oialr_tune.tuning import sweep

# Two arms of 2 trials x 2 epochs (ASHA may stop a trial after epoch 1).
SPACE: dict[str, Any] = {**copy.deepcopy(TINY_SPACE), "objective": {"metric": "val_acc", "mode": "max"}}
SPACE["budget"] = {"num_samples": 2, "max_epochs": 2, "max_concurrent": 1}
DONE = re.compile(r"^\[(\w+)\] \d+/\d+ (\w+) done\s+epochs=(\d+) val_acc=(\S+)", re.M)


def _driver(tmp_path: Path, name: str, kill_at: str | None = None) -> subprocess.Popen:
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    env = {**os.environ, "RAY_ADDRESS": ""}
    if kill_at:
        env[sweep_state.KILL_ENV] = kill_at
    return subprocess.Popen(
        [sys.executable, "-m", "oialr_tune.cli", "sweep", str(tmp_path / "space.yaml"), "--name", name,
         "--results-dir", str(tmp_path / "r")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
    )  # fmt: skip


def _assert_done_trials_kept(folder: Path, printed: str) -> None:
    """Every trial printed done is in trials.csv with the printed metric and epochs; the sweep is whole."""
    df = pd.read_csv(folder / "trials.csv").set_index("trial_id")
    assert (df["arm"] == "oialr").sum() == 2 and (df["arm"] == "baseline").sum() == 2, df
    assert set(df["status"]) == {"TERMINATED"}
    for arm, trial_id, epochs, val_acc in DONE.findall(printed):
        assert trial_id in df.index, f"trial {trial_id} was printed done but is not in trials.csv"
        row = df.loc[trial_id]
        assert row["arm"] == arm and row["training_iteration"] == int(epochs)
        assert f"{row['val_acc']:.4g}" == val_acc
    assert (folder / "study.db").is_file() and (folder / "summary.json").is_file()


# Each phase boundary of a two-arm sweep: the second arm's Tuner made (tuner.pkl, no experiment state
# yet; the first arm finished), mid-trial (an epoch reported), right after a done line, the final writes.
KILL_POINTS = ["arm-start:baseline", "epoch:oialr:3", "done:oialr:1", "final-writes"]


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_kill_at_each_phase_then_resume_loses_no_trial_printed_done(
    ray_session: Any, tmp_path: Path, kill_at: str
) -> None:
    proc = _driver(tmp_path, "k", kill_at)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, f"the driver was not killed at {kill_at}:\n{out}\n{err[-2000:]}"
    # Our progress lines only: Ray's boxed experiment header and its /tmp TensorBoard hint need -v.
    assert "Configuration for experiment" not in out and "tensorboard --logdir /tmp/ray" not in out
    folder = tmp_path / "r" / "k"
    if kill_at == "done:oialr:1":  # also: a moved folder resumes (its files hold relative paths)
        folder = folder.rename(tmp_path / "moved")
    assert main(["sweep", "--resume", str(folder), "-q"]) == 0
    _assert_done_trials_kept(folder, out)
    assert not (folder / sweep_state.LOCK_FILE).exists()


def test_sigterm_stops_like_ctrl_c_and_the_sweep_resumes(ray_session: Any, tmp_path: Path) -> None:
    proc = _driver(tmp_path, "t")
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:  # SIGTERM right after the first done line
        lines.append(line)
        if DONE.match(line):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    printed = "".join(lines) + out
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "--resume" in err.splitlines()[-1]
    assert main(["sweep", "--resume", str(tmp_path / "r" / "t"), "-q"]) == 0
    _assert_done_trials_kept(tmp_path / "r" / "t", printed)


def test_full_disk_stops_the_sweep_and_resume_completes_it(
    ray_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills when the 2nd trial ends: its journal line fails, so it is not printed done; Ray's
    own files are left as a full disk leaves them (experiment state cut short, searcher state empty)."""
    append, ends = sweep_state.Journal.append, []

    def filling(self: sweep_state.Journal, record: Any, durable: bool) -> None:
        if durable:
            ends.append(record["trial_id"])
            if len(ends) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        append(self, record, durable)

    monkeypatch.setattr(sweep_state.Journal, "append", filling)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    # Its own exit status and message: not 130, as if Ctrl-C had been pressed.
    assert main(["sweep", str(tmp_path / "space.yaml"), "--name", "d", "--results-dir", str(tmp_path)]) == 74
    printed, err = capsys.readouterr()
    assert len(err.splitlines()) == 1
    assert err.startswith("oialr-tune: sweep stopped: disk full (No space left on device)"), err
    assert f"--resume {tmp_path / 'd'}" in err
    assert len(DONE.findall(printed)) == 1
    arm = tmp_path / "d" / "oialr"
    for f in arm.glob("experiment_state-*.json"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    for f in arm.glob("search*_state-*"):
        f.write_bytes(b"")
    monkeypatch.setattr(sweep_state.Journal, "append", append)
    sweep(resume=tmp_path / "d", verbose=0)
    _assert_done_trials_kept(tmp_path / "d", printed)


def test_rays_experiment_state_lists_the_ended_trials_of_the_journal(sweep_copy: Path) -> None:
    """`_internals.ended_trial_ids` reads the layout of Ray's experiment state, a private format: when a
    Ray upgrade changes it, this fails (a resume would otherwise quietly rebuild every arm)."""
    from oialr_tune.sweep_state import ended_trials
    from oialr_tune.tuning._internals import ended_trial_ids

    (state,) = sorted((sweep_copy / "oialr").glob("experiment_state-*.json"))[-1:]
    assert ended_trial_ids(state.read_text()) == set(ended_trials(journal_path(sweep_copy, "oialr"), key=None))


def test_a_restored_tuner_runs_the_callbacks_given_after_restore(ray_session: Any, tmp_path: Path) -> None:
    """The journal callback is pickled into tuner.pkl without the driver's run (an open journal,
    stdout); a restored arm runs the callback given to it through `_internals.restored_callbacks`,
    which journals the resumed trial. Fails when a Ray upgrade moves the restored tuner's run config."""
    from ray import tune

    from oialr_tune.tuning import hooks
    from oialr_tune.tuning._internals import restored_callbacks

    failed_once = tmp_path / "failed-once"

    def trainable(config: dict[str, Any]) -> None:
        if not failed_once.exists():
            failed_once.touch()
            raise RuntimeError("the first attempt fails")
        tune.report({"val_acc": 0.5})

    journal = sweep_state.Journal(tmp_path / "journal.jsonl", b"key")

    def arm_run() -> hooks.ArmRun:
        return hooks.ArmRun("oialr", 1, ["val_acc"], journal, None, str, print_progress=False, out=sys.stdout)

    first = arm_run()
    run_config = tune.RunConfig(name="arm", storage_path=str(tmp_path), callbacks=[hooks.SweepCallback(first)],
                                verbose=0)
    tune.Tuner(trainable, run_config=run_config).fit()  # pickling the callback into tuner.pkl must work
    (trial_id,) = first.ended

    tuner = tune.Tuner.restore(str(tmp_path / "arm"), trainable, resume_errored=True)
    callbacks = restored_callbacks(tuner)
    assert [type(c) for c in callbacks] == [hooks.SweepCallback] and callbacks[0].run is None
    resumed = arm_run()
    callbacks[:] = [hooks.SweepCallback(resumed)]
    tuner.fit()
    assert resumed.ended == {trial_id} and resumed.epochs_seen == 1
    journal.close()
    ended = sweep_state.ended_trials(tmp_path / "journal.jsonl", b"key")
    assert ended[trial_id]["status"] == "TERMINATED" and ended[trial_id]["result"]["val_acc"] == 0.5


@pytest.fixture
def sweep_copy(ray_session: Any, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """A copy of the session's finished tiny sweep (signed with the tests' key), to change freely."""
    return Path(shutil.copytree(tiny_sweep_dir(tmp_path_factory), tmp_path / "copy"))


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("oialr-tune: error: "), err
    return err[0]


def test_a_locked_folder_is_refused_and_a_stale_lock_taken_over(
    sweep_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = sweep_copy / sweep_state.LOCK_FILE
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "now"}))
        assert main(["sweep", "--resume", str(sweep_copy), "-q"]) == 2
        assert f"in use by oialr-tune pid {holder.pid}" in _one_error_line(capsys)
        assert main(["sweep", "--resume", str(sweep_copy), "-q"]) == 2  # the lock is not taken over
        _one_error_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert main(["sweep", "--resume", str(sweep_copy), "-q"]) == 0  # its holder is dead: stale
    assert not lock.exists()


def test_a_copied_folder_resumes_and_reports_its_own_paths(
    sweep_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sweep", "--resume", str(sweep_copy), "-q"]) == 0
    assert main(["best", str(sweep_copy), "--format", "json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["checkpoint"].startswith(str(sweep_copy)) and Path(best["checkpoint_file"]).is_file()
    assert not pd.read_csv(sweep_copy / "trials.csv")["checkpoint"].str.startswith("/").any()


def test_an_edited_sweep_yaml_is_refused_naming_the_key(sweep_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = sweep_copy / "sweep.yaml"
    data = yaml.safe_load(path.read_text())
    data["budget"]["num_samples"] = 8
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    before = sorted(p.name for p in sweep_copy.iterdir())
    assert main(["sweep", "--resume", str(sweep_copy), "-q"]) == 2
    assert "budget.num_samples: 3 -> 8" in _one_error_line(capsys)
    assert sorted(p.name for p in sweep_copy.iterdir()) == before


class _Payload:
    """Unpickling this creates a marker file: what a crafted folder would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_unpickles_an_unsigned_or_tampered_state(
    sweep_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "payload-ran"
    (sweep_copy / "oialr" / "tuner.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    # The arm looks unfinished: its last trial's end is cut from the journal, so a resume runs it.
    journal = journal_path(sweep_copy, "oialr")
    lines = journal.read_text().splitlines(keepends=True)
    last_end = max(i for i, line in enumerate(lines) if '"kind": "end"' in line)
    journal.write_text("".join(lines[:last_end]))
    (sweep_copy / "state.json").write_text(json.dumps({"arms_done": []}))
    for name in ("trials.csv", "summary.json", "study.db"):
        (sweep_copy / name).unlink()

    # Another user's folder (no key here for it), then a folder without a signature: refused.
    with monkeypatch.context() as m:
        m.setenv("XDG_CONFIG_HOME", str(tmp_path / "someone-else"))
        assert main(["sweep", "--resume", str(sweep_copy), "-q"]) == 2
    assert "not signed by this user's key" in _one_error_line(capsys)
    signature = sweep_copy / sweep_state.SIGNATURE_FILE
    saved = signature.read_bytes()
    signature.unlink()
    assert main(["sweep", "--resume", str(sweep_copy), "-q"]) == 2
    assert "not signed by this user's key" in _one_error_line(capsys)
    assert not marker.exists()

    # Signed folder, tampered tuner.pkl: not unpickled; the arm is rebuilt from its journal.
    signature.write_bytes(saved)
    assert main(["sweep", "--resume", str(sweep_copy)]) == 0
    assert not marker.exists()
    assert "rebuilding from its journal" in capsys.readouterr().out
    df = pd.read_csv(sweep_copy / "trials.csv")
    assert (df["arm"] == "oialr").sum() == 3 and set(df["status"]) == {"TERMINATED"}


def test_final_writes_cut_short_are_rebuilt_from_the_journals(
    sweep_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["best", str(sweep_copy), "--format", "json"]) == 0
    expected = json.loads(capsys.readouterr().out)["trial_id"]
    # Killed during the final writes: trials.csv but no study.db, no summary.json.
    (sweep_copy / "study.db").unlink()
    (sweep_copy / "summary.json").unlink()
    assert main(["best", str(sweep_copy), "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["trial_id"] == expected
    assert "(study.db, summary.json missing); rebuilt from the journals" in captured.err
    assert (sweep_copy / "study.db").is_file() and (sweep_copy / "summary.json").is_file()
    # trials.csv cut mid-row: the best trial's row loses its metrics.
    trials = sweep_copy / "trials.csv"
    text = trials.read_text()
    trials.write_text(text[: text.index(f",{expected},") + 30])
    assert main(["best", str(sweep_copy), "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["trial_id"] == expected and "rebuilt from the journals" in captured.err
    assert trials.read_text() == text


def test_a_state_pickled_by_an_older_version_is_rebuilt_from_the_journal(
    sweep_copy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's state names the classes it pickled by module path: one that moved since (an older
    oialr-tune's ``oialr_tune.sweep_hooks``) fails to load; the arm is rebuilt, nothing is lost."""
    from ray import tune

    import oialr_tune.tuning.arm as arm_module

    journal = journal_path(sweep_copy, "oialr")
    lines = journal.read_text().splitlines(keepends=True)
    last_end = max(i for i, line in enumerate(lines) if '"kind": "end"' in line)
    journal.write_text("".join(lines[:last_end]))  # the arm looks unfinished: one trial left to run
    (sweep_copy / "state.json").write_text(json.dumps({"arms_done": []}))

    def old_pickle(*args: Any, **kwargs: Any) -> Any:
        raise ModuleNotFoundError("No module named 'oialr_tune.sweep_hooks'")

    monkeypatch.setattr(arm_module, "_why_not_restore", lambda *args: None)  # signed and agreeing: restorable
    monkeypatch.setattr(tune.Tuner, "restore", old_pickle)
    assert main(["sweep", "--resume", str(sweep_copy)]) == 0
    out = capsys.readouterr().out
    assert "rebuilding from its journal" in out and "does not load here" in out
    df = pd.read_csv(sweep_copy / "trials.csv")
    assert (df["arm"] == "oialr").sum() == 3 and set(df["status"]) == {"TERMINATED"}


def test_a_search_rebuilt_from_the_journal_repeats_no_finished_trials_settings(
    sweep_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two of the three OIALR trials' ends are cut from the journal and Ray's state is gone, so the arm is
    rebuilt with one trial told: the seeded sampler must not draw that trial's settings again."""
    journal = journal_path(sweep_copy, "oialr")
    lines = journal.read_text().splitlines(keepends=True)
    ends = [i for i, line in enumerate(lines) if '"kind": "end"' in line]
    journal.write_text("".join(line for i, line in enumerate(lines) if i not in ends[1:]))
    (sweep_copy / "oialr" / "tuner.pkl").unlink()
    (sweep_copy / "state.json").write_text(json.dumps({"arms_done": []}))
    for name in ("trials.csv", "summary.json", "study.db"):
        (sweep_copy / name).unlink()
    assert main(["sweep", "--resume", str(sweep_copy)]) == 0
    assert "rebuilding from its journal (1 trials ended)" in capsys.readouterr().out
    df = pd.read_csv(sweep_copy / "trials.csv")
    oialr = df[df["arm"] == "oialr"]
    searched = oialr[[c for c in df.columns if c.startswith("config.")]].astype(str)
    assert len(oialr) == 3 and len(set(map(tuple, searched.to_numpy()))) == 3, searched


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_a_sweep_killed_mid_run_then_moved_and_copied_resumes_inside_the_copy(ray_session: Any, tmp_path: Path) -> None:
    """Ray's saved state names the folder it was written in: restored as is (killed at the first epoch,
    Ray's state agrees with the journal, so it is restorable), the unfinished trial failed ("Unable to set
    up cluster storage") or wrote into the original. The resumed copy must write only inside itself."""
    proc = _driver(tmp_path, "k", "epoch:oialr:1")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    moved = (tmp_path / "r" / "k").rename(tmp_path / "moved")
    copy = Path(shutil.copytree(moved, tmp_path / "copy"))
    before = _files(moved)
    assert main(["sweep", "--resume", str(copy), "-q"]) == 0
    _assert_done_trials_kept(copy, out)
    assert _files(moved) == before and not (tmp_path / "r" / "k").exists()
    for checkpoint in pd.read_csv(copy / "trials.csv")["checkpoint"].dropna():
        assert not checkpoint.startswith(("..", "/")) and (copy / checkpoint).is_dir(), checkpoint
