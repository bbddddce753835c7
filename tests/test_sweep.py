"""Sweeps end to end: real Ray Tune, real Optuna, real training of tiny digits MLPs on CPU.

All in-process sweeps share the session's Ray instance (the `ray_session` fixture); the killed
driver and the two-node cluster need Ray instances of their own and run in subprocesses.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml
from tiny_sweep import TINY_BASE

from oialr_tune.results import open_results, pareto_rows
from oialr_tune.run_record import read_checkpoint
from oialr_tune.space import space_from_dict
from oialr_tune.tuning import make_trainable, sweep
from oialr_tune.tuning.driver import summary_line

SPACE: dict[str, Any] = {
    "name": "unit",
    "base": TINY_BASE,
    "search": {
        "optimizer.lr": {"type": "loguniform", "low": 1.0e-3, "high": 3.0e-2},
        "schedule.rewarm_steps": {"type": "int", "low": 0, "high": 10},
        "oialr.stability_threshold": {"type": "categorical", "choices": [None, 0.9]},
        "oialr.sigma_cutoff_fraction": {"type": "uniform", "low": 0.05, "high": 0.3},
    },
    "objective": {"metric": "val_acc", "mode": "max"},
    # ASHA rungs at epochs 2 and 4: trials checkpoint at 2 and 4 only (not every epoch).
    "budget": {"num_samples": 6, "max_epochs": 4, "grace_period": 2, "reduction_factor": 2},
    "resources": {"cpu": 1},
    "checkpoint": {"every": 0},
    "seed": 0,
}


def make_space(**changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(SPACE)
    d.update(changes)
    return d


def test_sweep_finds_best_and_results_are_consistent(ray_session: Any, tmp_path: Path) -> None:
    result = sweep(space_from_dict(SPACE), name="s", results_dir=tmp_path, verbose=0)
    root = tmp_path / "s"
    assert Path(result.path) == root
    df = result.trials
    assert (df["arm"] == "oialr").sum() == 6 and (df["arm"] == "baseline").sum() == 6
    assert set(df["status"]) == {"TERMINATED"}
    assert df["error"].isna().all()
    # The baseline searched only the non-OIALR keys, at full rank.
    base_rows = df[df["arm"] == "baseline"]
    assert base_rows["config.oialr.sigma_cutoff_fraction"].isna().all()
    assert (base_rows["trainable_fraction"] == 1.0).all()

    # The best trial is the most accurate trial that ended normally, and its checkpoint is its
    # last epoch's state.
    for arm in ("oialr", "baseline"):
        rows = df[df["arm"] == arm]
        best = result.summary["best"][arm]
        assert best["val_acc"] == rows["val_acc"].max()
        assert best["trial_id"] in set(rows[rows["val_acc"] == rows["val_acc"].max()]["trial_id"])
        state = read_checkpoint(root / best["checkpoint"] / "checkpoint.pt")
        assert state["epoch"] == best["training_iteration"]
        assert state["config"]["oialr"]["enabled"] is (arm == "oialr")
        cfg = result.best_config(arm)
        assert cfg["optimizer"]["lr"] == pytest.approx(best["config"]["optimizer.lr"])
    assert result.summary["best"]["oialr"]["trainable_fraction"] < 1.0  # OIALR did cut ranks
    line = summary_line(result)
    assert "best OIALR val_acc=" in line and "best full-rank val_acc=" in line

    # Checkpoints only at the ASHA rungs (2, 4): a finished trial's last is its second (index 1);
    # once the arm is over only each trial's last checkpoint is left.
    finished = df[df["training_iteration"] == 4]
    assert len(finished) and all(Path(c).name == "checkpoint_000001" for c in finished["checkpoint"])
    for arm in ("oialr", "baseline"):
        for trial_dir in (root / arm).glob("trial_*"):
            assert len(list(trial_dir.glob("checkpoint_*"))) == 1, trial_dir

    # Files: trials.csv is the returned table; summary.json has the same best trials.
    assert pd.read_csv(root / "trials.csv")["trial_id"].tolist() == df["trial_id"].tolist()
    summary = json.loads((root / "summary.json").read_text())
    # The folder's files hold checkpoints relative to it (a moved folder still works).
    assert summary == json.loads(json.dumps(result.summary))
    assert not Path(summary["best"]["oialr"]["checkpoint"]).is_absolute()
    assert pd.read_csv(root / "trials.csv")["config.schedule.rewarm_steps"].dropna().map(float.is_integer).all()
    assert yaml.safe_load((root / "sweep.yaml").read_text()) == result.space.to_dict()
    reloaded = open_results(root)
    for arm in ("oialr", "baseline"):  # `best` on the folder names the summary's trial, with a full path
        best = reloaded.best(arm).trial
        assert best.trial_id == summary["best"][arm]["trial_id"]
        assert best.checkpoint == str(root / summary["best"][arm]["checkpoint"])

    # study.db: one Optuna study per arm with the same trials, readable by Optuna's own tools.
    storage = f"sqlite:///{root / 'study.db'}"
    for arm in ("oialr", "baseline"):
        study = optuna.load_study(study_name=arm, storage=storage)
        rows = df[df["arm"] == arm]
        assert len(study.trials) == len(rows)
        by_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
        assert set(by_id) == set(rows["trial_id"])
        for _, r in rows.iterrows():
            assert by_id[r["trial_id"]].value == pytest.approx(r["val_acc"])
            assert by_id[r["trial_id"]].params["optimizer.lr"] == pytest.approx(r["config.optimizer.lr"])
    importances = optuna.importance.get_param_importances(optuna.load_study(study_name="oialr", storage=storage))
    assert importances and set(importances) <= set(SPACE["search"])

    # Ray's own layout: each arm is a restorable Tuner experiment; TensorBoard files are there.
    from ray import tune

    assert tune.Tuner.can_restore(str(root / "oialr")) and tune.Tuner.can_restore(str(root / "baseline"))
    assert list((root / "oialr").glob("trial_*/events.out.tfevents.*"))


def test_multi_objective_returns_a_pareto_set(ray_session: Any, tmp_path: Path) -> None:
    space = make_space(objective={"metric": "val_acc", "mode": "multi"}, baseline="none")
    space["budget"] = {"num_samples": 4, "max_epochs": 3}
    result = sweep(space_from_dict(space), name="m", results_dir=tmp_path, verbose=0)
    df = result.trials
    assert set(df["arm"]) == {"oialr"} and len(df) == 4
    assert (df["training_iteration"] == 3).all()  # FIFO: nothing stopped early
    pareto = pareto_rows(result, "oialr")
    assert pareto is not None and len(pareto) >= 1
    for _, p in pareto.iterrows():  # nobody is at least as good on both and better on one
        better = (df["val_acc"] >= p["val_acc"]) & (df["trainable_fraction"] <= p["trainable_fraction"])
        strictly = (df["val_acc"] > p["val_acc"]) | (df["trainable_fraction"] < p["trainable_fraction"])
        assert not (better & strictly).any()
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert {p["trial_id"] for p in summary["pareto"]} == set(pareto["trial_id"])
    study = optuna.load_study(study_name="oialr", storage=f"sqlite:///{tmp_path / 'm' / 'study.db'}")
    assert len(study.directions) == 2 and len(study.trials) == 4 and study.best_trials


def test_reused_actor_gives_the_same_metrics_as_a_fresh_one(ray_session: Any, tmp_path: Path) -> None:
    """Trial B run after trial A in the same (reused) worker process matches B run alone."""
    from ray import tune

    space = space_from_dict(make_space(baseline="none"))
    a = {"optimizer.lr": 0.03, "oialr.stability_threshold": None, "oialr.sigma_cutoff_fraction": 0.3}
    b = {"optimizer.lr": 0.002, "oialr.stability_threshold": 0.9, "oialr.sigma_cutoff_fraction": 0.05}

    def run(name: str, configs: list[dict[str, Any]]) -> list[pd.DataFrame]:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        tuner = tune.Tuner(
            make_trainable(space, "oialr"),
            # The points are the whole search; the choices only declare the keys they set.
            param_space={k: tune.choice([a[k], b[k]]) for k in a},
            tune_config=tune.TuneConfig(
                search_alg=BasicVariantGenerator(points_to_evaluate=configs, max_concurrent=1),
                num_samples=len(configs),
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0),
        )
        results = tuner.fit()
        assert not results.errors
        by_lr = {r.config["optimizer.lr"]: r.metrics_dataframe for r in results}
        return [by_lr[c["optimizer.lr"]] for c in configs]

    after_a = run("pair", [a, b])
    alone = run("alone", [b])
    assert after_a[0]["pid"].iloc[0] == after_a[1]["pid"].iloc[0], "the actor was not reused"
    assert alone[0]["pid"].iloc[0] != after_a[1]["pid"].iloc[0]
    cols = ["epoch", "train_loss", "val_loss", "val_acc", "trainable_params", "ranks"]
    pd.testing.assert_frame_equal(after_a[1][cols].reset_index(drop=True), alone[0][cols].reset_index(drop=True))


def _finished_trials(exp: Path, epochs: int) -> dict[str, dict[str, Any]]:
    """Trials whose result.json (in the storage folder) already holds their last epoch: id -> record."""
    out = {}
    for f in exp.glob("trial_*/result.json"):
        lines = f.read_text().strip().splitlines()
        if lines:
            last = json.loads(lines[-1])
            if last.get("training_iteration") == epochs:
                out[last["trial_id"]] = last
    return out


def test_killed_sweep_resumes_without_losing_finished_trials(
    ray_session: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    space = make_space(baseline="none", strategy={"scheduler": "fifo"})
    space["base"]["model"]["args"]["hidden"] = [256, 256]
    space["base"]["schedule"]["batch_size"] = 16  # about 2 s per trial: the kill lands mid-sweep
    space["budget"] = {"num_samples": 6, "max_epochs": 6, "max_concurrent": 2}
    space["checkpoint"] = {"every": 1}  # every epoch: trials in flight resume mid-run
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    results = tmp_path / "r"
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "oialr_tune.cli", "sweep", str(tmp_path / "space.yaml"), "--name", "k",
         "--results-dir", str(results)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    exp = results / "k" / "oialr"
    deadline = time.monotonic() + 180
    try:
        while len(_finished_trials(exp, 6)) < 2:
            assert proc.poll() is None, (
                f"the sweep ended before it could be killed:\n{(tmp_path / 'driver.log').read_text()}"
            )
            assert time.monotonic() < deadline, "no two finished trials within 3 minutes"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    done_before = _finished_trials(exp, 6)
    print(f"{len(done_before)} of 6 trials had finished when the driver was killed")
    assert 2 <= len(done_before) < 6, "the kill should land mid-sweep"

    from oialr_tune.cli import main

    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["sweep", "--resume", str(results / "k")]) == 0
    # Our own lines only: no Optuna warning per re-reported epoch, no Ray box or Ray hint.
    assert not [w for w in caught if "is already reported" in str(w.message)]
    printed = capfd.readouterr()
    assert "[oialr]" in printed.out and "Configuration for experiment" not in printed.out + printed.err
    df = pd.read_csv(results / "k" / "trials.csv")
    assert len(df) == 6 and set(df["status"]) == {"TERMINATED"}
    rows = df.set_index("trial_id")
    for trial_id, rec in done_before.items():
        assert trial_id in rows.index, f"finished trial {trial_id} lost on resume"
        assert rows.loc[trial_id, "val_acc"] == rec["val_acc"]
        assert rows.loc[trial_id, "training_iteration"] == rec["training_iteration"] == 6
    study = optuna.load_study(study_name="oialr", storage=f"sqlite:///{results / 'k' / 'study.db'}")
    assert len(study.trials) == 6
    # Resuming a finished sweep reruns nothing.
    again = sweep(resume=results / "k", verbose=0)
    assert again.trials["trial_id"].tolist() == df["trial_id"].tolist()


CLUSTER_SCRIPT = """
import glob, json, sys
from ray.cluster_utils import Cluster
from oialr_tune.space import space_from_dict
from oialr_tune.tuning import sweep

space, root = json.loads(sys.argv[1]), sys.argv[2]
# A head node with one (logical) GPU and a CPU-only worker node, one CPU each.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
    result = sweep(space_from_dict(space), name="c", results_dir=root, address=cluster.address, verbose=0)
    print("NODES", json.dumps(sorted(set(result.trials["node_id"]))), flush=True)
    print("TRIALS", len(result.trials), flush=True)
    # Half a GPU and half a CPU per trial: both trials fit on the head node at once, none elsewhere.
    space["resources"] = {"cpu": 0.5, "gpu": 0.5}
    space["base"]["device"] = "auto"
    result = sweep(space_from_dict(space), name="g", results_dir=root, address=cluster.address, verbose=0)
    spans = []
    for f in glob.glob(f"{root}/g/oialr/trial_*/result.json"):
        rows = [json.loads(line) for line in open(f)]
        spans.append((rows[0]["reported_at"] - rows[0]["time_this_iter_s"], rows[-1]["reported_at"]))
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    print("GPU", json.dumps({"nodes": sorted(set(result.trials["node_id"])), "head": cluster.head_node.node_id,
                             "gpu_ids": sorted(set(result.trials["gpu_ids"].astype(str))), "overlap": overlap}),
          flush=True)
finally:
    cluster.shutdown()
"""


def test_two_node_cluster_runs_trials_on_both_nodes(tmp_path: Path) -> None:
    """Trials spread over both nodes; fractional-GPU trials pack onto the node that has the GPU."""
    space = make_space(baseline="none", strategy={"scheduler": "fifo"})
    space["budget"] = {"num_samples": 4, "max_epochs": 2, "max_concurrent": 2}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CLUSTER_SCRIPT), json.dumps(space), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]

    def line(tag: str) -> Any:
        return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith(tag))[len(tag) + 1 :])

    assert len(line("NODES")) == 2, out[-3000:]
    assert line("TRIALS") == 4
    gpu = line("GPU")
    assert gpu["nodes"] == [gpu["head"]] and gpu["gpu_ids"] == ["0"]
    assert gpu["overlap"] == 2, "two half-GPU trials should share the one GPU at the same time"


def test_a_shrunk_sweep_is_read_back_by_best_and_report(ray_session: Any, tmp_path: Path) -> None:
    """sweep(space, num_samples=, max_epochs=, overrides=): what it writes, the readers accept."""
    from oialr_tune.cli import main
    from oialr_tune.results import best_trial

    result = sweep(space_from_dict(SPACE), name="small", results_dir=tmp_path, verbose=0, num_samples=2, max_epochs=2,
                   overrides={"budget.grace_period": 1, "baseline": "none", "search.optimizer.lr":
                              {"type": "loguniform", "low": 3e-3, "high": 4e-3}})  # fmt: skip
    stored = yaml.safe_load((tmp_path / "small" / "sweep.yaml").read_text())
    assert stored["budget"]["num_samples"] == 2 and stored["budget"]["max_epochs"] == 2
    assert stored["base"]["schedule"]["epochs"] == 2 and stored["search"]["optimizer.lr"]["high"] == 4e-3
    assert len(result.trials) == 2 and (result.trials["training_iteration"] <= 2).all()
    best = best_trial(tmp_path / "small")
    assert best.config["schedule"]["epochs"] == 2 and 3e-3 <= best.config["optimizer"]["lr"] <= 4e-3
    assert main(["report", str(tmp_path / "small")]) == 0


def test_the_cli_sweep_settings_reach_the_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--num-samples / --max-epochs / --set KEY=VALUE (YAML values), and a bad key is one line, exit 2."""
    import oialr_tune.tuning.driver as driver
    from oialr_tune.cli import main

    seen: dict[str, Any] = {}

    def stop(space: Any, store: Any, *args: Any) -> None:  # runs where the sweep would start Ray
        seen["space"] = space
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "_run_sweep", stop)
    with contextlib.suppress(KeyboardInterrupt):
        main(["sweep", "quickstart", "--results-dir", str(tmp_path), "--name", "q", "--num-samples", "3",
              "--max-epochs", "4", "--set", "budget.grace_period=2", "--set", "base.optimizer.weight_decay=0.05"])
    space = seen["space"]
    assert (space.budget.num_samples, space.budget.max_epochs, space.budget.grace_period) == (3, 4, 2)
    assert space.base["schedule"]["epochs"] == 4 and space.base["optimizer"]["weight_decay"] == 0.05
    assert main(["sweep", "quickstart", "--results-dir", str(tmp_path), "--name", "r",
                 "--set", "budget.num_sample=3"]) == 2  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_study_db_holds_what_optuna_add_trials_stores(tmp_path: Path) -> None:
    """write_studies stores the trials in one bulk session, not through ``study.add_trials``: what
    ``optuna.load_study`` reads back must be what Optuna's own add_trials stores, field by field
    (failed trials, infinite values, NaN intermediates, constraints, two arms), and rewriting the
    file must not duplicate a trial."""
    from oialr_tune.tuning.storage import Store
    from oialr_tune.tuning.study import directions, optuna_trials, write_studies

    space = space_from_dict(make_space(objective={"metric": "val_acc", "mode": "multi"}))
    rows_by_arm: dict[str, list[dict[str, Any]]] = {}
    for arm in space.arms():
        rows = []
        for i, (status, acc, history) in enumerate([
            ("TERMINATED", 0.5, [0.1, float("nan"), 0.5]),
            ("TERMINATED", float("inf"), [float("-inf")]),
            ("ERROR", None, []),
            ("TERMINATED", 0.75, [0.75]),
        ]):  # fmt: skip
            row = {"trial_id": f"{arm}{i}", "status": status, "training_iteration": len(history),
                   "_history": history, "val_acc": acc, "trainable_fraction": 0.25 * i}  # fmt: skip
            for p in space.arm_params(arm):
                row[f"config.{p.key}"] = p.choices[i % len(p.choices)] if p.type == "categorical" else p.high
            rows.append(row)
        rows_by_arm[arm] = rows
    store = Store(str(tmp_path / "s"))
    write_studies(space, rows_by_arm, store)
    write_studies(space, rows_by_arm, store)  # rebuilt from scratch, not appended to

    reference = optuna.storages.InMemoryStorage()
    fields = ("number", "state", "values", "params", "distributions", "user_attrs", "system_attrs")
    for arm, rows in rows_by_arm.items():
        expected = optuna.create_study(storage=reference, study_name=arm, directions=directions(space, arm))
        expected.add_trials(optuna_trials(space, arm, rows))
        got = optuna.load_study(study_name=arm, storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
        assert got.directions == expected.directions and got.user_attrs == {"space": space.name}
        assert len(got.trials) == len(rows)
        for g, e in zip(got.trials, expected.trials, strict=True):
            assert {f: getattr(g, f) for f in fields} == {f: getattr(e, f) for f in fields}
            assert str(g.intermediate_values) == str(e.intermediate_values)  # NaN == NaN as text
            assert g.datetime_start is not None and (g.datetime_complete is not None) == e.state.is_finished()
