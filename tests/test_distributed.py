"""OIALR and the trainer under data parallelism: real torch.distributed (gloo, 2 CPU processes), tiny models.

The controller tests spawn two processes with torch.multiprocessing (no Ray); each writes what it
saw to a JSON file that the test reads back.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from _ddp_ranks import BATCH, _data, _ddp_worker, _free_port, _model, _train, refuse_on_every_rank
from tiny_sweep import tiny_space
from torch import nn

from oialr_tune import distributed
from oialr_tune.config import train_config_from_dict
from oialr_tune.distributed import current, launch
from oialr_tune.errors import LoopMistake, UserError
from oialr_tune.model_io import load_model
from oialr_tune.oialr import low_rank_structure
from oialr_tune.oialr.distributed import state_digest
from oialr_tune.results import SweepResults
from oialr_tune.retrain import retrain
from oialr_tune.run_record import Callback, TrainResult, read_checkpoint
from oialr_tune.space import space_from_dict
from oialr_tune.sweep_state import CHECKPOINT_FILE
from oialr_tune.trainer import train
from oialr_tune.tuning import sweep
from oialr_tune.tuning.cluster import check_cluster_fits


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_every_rank_is_bit_identical_after_each_factorization_and_cut(two_ranks: list[dict[str, Any]]) -> None:
    r0, r1 = two_ranks
    assert r0["events"] and any(e[2] == "cut" for e in r0["events"]), "the run must factorize and cut"
    assert r0["events"] == r1["events"] and r0["ranks"] == r1["ranks"]
    # One digest per step with events: model (U, S, Vᵀ, biases), optimizer state and ranks.
    assert len(r0["digests"]) == 3 and r0["digests"] == r1["digests"]
    assert r0["weights"] == r1["weights"]


def test_each_rank_runs_only_its_share_of_the_svds(two_ranks: list[dict[str, Any]]) -> None:
    # 5 SVDs at the factorization (step 4) and 5 at each of the checks at steps 7 and 10; layer i
    # goes to rank i % 2, so rank 0 runs 3 and rank 1 runs 2 of each batch (one process: 15).
    assert {r["split_rank"]: r["computed"] for r in two_ranks} == {0: 9, 1: 6}


def test_two_ranks_take_the_same_steps_as_one_process_on_the_whole_batch(two_ranks: list[dict[str, Any]]) -> None:
    """DDP's averaged gradient of two half batches is the whole batch's gradient up to float rounding,
    so the one-process run reaches the same events and ranks, and weights within 1e-4 (rounding of
    sums in another order, amplified by 12 Adam steps; measured max difference ~1e-6)."""
    single = json.loads(json.dumps(_train(0, 1)))
    assert single["events"] == two_ranks[0]["events"] and single["ranks"] == two_ranks[0]["ranks"]
    diff = max(abs(a - b) for wa, wb in zip(single["weights"], two_ranks[0]["weights"], strict=True)
               for a, b in zip(wa, wb, strict=True))
    print(f"max |weight difference|, 1 process vs 2 ranks: {diff:.2e}")
    assert diff < 1e-4


# --- the built-in trainer on 2 workers ------------------------------------------------------------------

TRAINER_CFG = {
    "device": "cpu",
    "model": {"name": "mlp", "args": {"hidden": [64, 64], "dropout": 0.0}},
    "schedule": {"epochs": 2, "batch_size": 64}, "checkpoint_every": 1,
    "oialr": {"delay": 10, "stability_frequency": 5, "stability_threshold": None, "sigma_cutoff_fraction": 0.2},
}


class _Stop(Exception):
    pass


class _StopAfterFirstEpoch(Callback):
    def on_epoch_end(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if metrics["epoch"] == 1:
            raise _Stop  # what a killed trial looks like to the loop, on every worker


def _summary(result: TrainResult) -> dict[str, Any]:
    events = [e for m in result.history for e in m["oialr_events"]]
    return {
        "events": [(e["step"], e["layer"], e["kind"], e["new_rank"]) for e in events],
        "ranks": result.final["ranks"], "val_acc": [m["val_acc"] for m in result.history],
        "test_acc": result.test_acc, "digest": state_digest(result.model),
    }


def _trainer_worker(out_dir: str) -> None:
    """On each worker: an uninterrupted run, then a run stopped after epoch 1 and resumed from its checkpoint."""
    workers = current()
    cfg = train_config_from_dict(TRAINER_CFG)
    full = train(cfg, evaluate_test=True)
    ckpt = Path(out_dir, "ckpt")
    with contextlib.suppress(_Stop):
        train(cfg, checkpoint_dir=ckpt, callbacks=[_StopAfterFirstEpoch()])
    dist.barrier()  # rank 0 has written its checkpoint
    saved_epoch = read_checkpoint(ckpt / CHECKPOINT_FILE)["epoch"]
    resumed = train(cfg, checkpoint_dir=ckpt, evaluate_test=True)
    out = {"full": _summary(full), "resumed": _summary(resumed), "saved_epoch": saved_epoch,
           "rank": workers.rank, "world": workers.world_size}
    Path(out_dir, f"trainer{workers.rank}.json").write_text(json.dumps(out))


def test_bad_input_found_in_a_worker_is_raised_by_launch_as_one_line() -> None:
    """A UserError raised while training on N workers reaches the caller as itself (the CLI's one line,
    exit 2), not as torch.multiprocessing's ProcessRaisedException with the worker's traceback."""
    with pytest.raises(LoopMistake, match=r"^trainable: never calls trial\.report \(rank 0\)$") as e:
        launch(refuse_on_every_rank, 2, "trainable: never calls trial.report")
    assert "\n" not in str(e.value)


def test_two_workers_match_one_process_and_resume_from_rank_0s_checkpoint(tmp_path: Path) -> None:
    """Same global batch and seed on 1 and 2 workers: the same factorization and cut steps and ranks, and
    validation/test accuracy within 0.01. Why so close: each step, DDP averages the two workers' mean
    gradients over their halves of the same global batch, which is the 1-worker gradient up to the order
    of float sums (~1e-7 relative); the sharded evaluation adds the same per-example terms. An accuracy
    can differ only where a rounding-level weight change flips an example's prediction: 0.01 is 3 of the
    ~360 validation examples (measured: equal to 4 decimals)."""
    launch(_trainer_worker, 2, str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"trainer{r}.json").read_text()) for r in range(2))
    assert r0["world"] == 2 and r0["full"]["digest"] == r1["full"]["digest"]  # bit-identical workers
    assert r0["full"]["val_acc"] == r1["full"]["val_acc"]  # every worker reports the whole split's metric
    single = json.loads(json.dumps(_summary(train(train_config_from_dict(TRAINER_CFG), evaluate_test=True))))
    assert any(e[2] == "cut" for e in single["events"])
    assert r0["full"]["events"] == single["events"] and r0["full"]["ranks"] == single["ranks"]
    for a, b in zip(r0["full"]["val_acc"] + [r0["full"]["test_acc"]], single["val_acc"] + [single["test_acc"]],
                    strict=True):
        assert abs(a - b) <= 0.01
    # Stopped after epoch 1, resumed by both workers from the checkpoint rank 0 wrote: nothing lost.
    assert r0["saved_epoch"] == 1
    assert r0["resumed"] == r0["full"] and r1["resumed"] == r1["full"]


# --- Lightning's DDP strategy ---------------------------------------------------------------------------


def _lightning_worker(out_dir: str) -> None:
    """A Lightning fit with strategy="ddp" on the 2 launched processes (Lightning joins their process group)."""
    import lightning.pytorch as pl

    from oialr_tune.lightning import OIALRCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=0.02)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=BATCH // 2)
    callback = OIALRCallback(delay=4, stability_frequency=3, stability_threshold=None, sigma_cutoff_fraction=0.3)
    trainer = pl.Trainer(max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=2,
                         strategy="ddp")
    module = Module()
    trainer.fit(module, loader)
    c = callback.controller
    out = {"events": [(e.step, e.layer, e.kind, e.new_rank) for e in c.history], "steps": trainer.global_step,
           "digest": state_digest(module, trainer.optimizers[0], c.layer_ranks()), "computed": c.split.computed}
    Path(out_dir, f"lightning{current().rank}.json").write_text(json.dumps(out))


def test_the_lightning_callback_under_lightnings_ddp_strategy(tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch", reason="Lightning is an optional extra")
    launch(_lightning_worker, 2, str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"lightning{r}.json").read_text()) for r in range(2))
    # 8 of the 192 examples per rank and step: 12 steps; factorize at 4, checks at 7 and 10.
    assert r0["steps"] == 12 and any(e[2] == "cut" for e in r0["events"])
    assert r0["events"] == r1["events"] and r0["digest"] == r1["digest"]  # bit-identical after DDP rebuilds
    assert sorted([r0["computed"], r1["computed"]]) == [6, 9]  # each rank ran its share of the 15 SVDs


# --- a sweep of 2-worker trials (Ray Tune trial -> Ray Train TorchTrainer), killed and resumed; retrain ---------

# Three trials of 2 Ray Train workers at 0.5 CPU each (the session's Ray, like the driver's, has 2 CPUs: one
# trial at a time); ASHA's rungs at epochs 1 and 2. OIALR factorizes at step 10 and cuts every 5 steps after
# it (digits: 17 steps an epoch). The seeded TPE proposes lr 0.02 first, then 3e-4 (always, from this seed):
# the second trial is far behind the first at epoch 1, and ASHA stops it there.
TWO_WORKER_SPACE = tiny_space(
    "ddp", resources={"cpu": 0.5, "workers": 2}, baseline="none", seed=0,
    base={"oialr": TRAINER_CFG["oialr"]},
    search={"optimizer.lr": {"type": "categorical", "choices": [3.0e-4, 2.0e-2]}},
    budget={"num_samples": 3, "max_epochs": 2, "grace_period": 1, "reduction_factor": 2},
)  # fmt: skip


@dataclass
class KilledSweep:
    """The sweep folder and what it held when its driver was killed."""

    path: Path
    done: list[str]  # the trial ids the driver had printed done
    in_flight: str  # the trial that had reported epoch 1 of 2
    before: dict[str, list[dict[str, Any]]]  # each trial's reported epochs (result.json rows)
    resumed: SweepResults


def _done_trials(log: Path) -> list[str]:
    """The trials the driver has printed done (``[oialr] 1/3 <trial_id> done ...``), in order."""
    return [line.split()[2] for line in log.read_text().splitlines() if line.startswith("[oialr]") and " done " in line]


def _epochs_reported(arm: Path) -> dict[str, list[dict[str, Any]]]:
    """Each trial's reported epochs so far (Ray's result.json rows)."""
    out = {}
    for f in arm.glob("trial_*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[-1]["trial_id"]] = rows
    return out


@pytest.fixture(scope="module")
def killed_sweep(ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> KilledSweep:
    """One sweep of 2-worker trials, read by several tests (each must leave the folder as it is).

    Its driver (``oialr-tune sweep`` in a process of its own, with its own Ray) is SIGKILLed with that
    Ray once two trials are done (the first finished, the second stopped by ASHA) and the third has
    reported its first epoch, so the stopped trial's workers had let the next trial's start. Then
    ``sweep --resume`` runs in this process, on the session's Ray.
    """
    tmp = tmp_path_factory.mktemp("ddp-sweep")
    (tmp / "space.yaml").write_text(yaml.safe_dump(TWO_WORKER_SPACE))
    log, arm = tmp / "driver.log", tmp / "r" / "d" / "oialr"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "oialr_tune.cli", "sweep", str(tmp / "space.yaml"), "--name", "d",
             "--results-dir", str(tmp / "r")], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        deadline = time.monotonic() + 600

        def in_flight() -> list[str]:
            done = _done_trials(log)
            return [t for t in _epochs_reported(arm) if t not in done] if len(done) == 2 else []

        try:
            while not in_flight():
                assert proc.poll() is None, f"the sweep ended before it could be killed:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"not killed within 10 minutes:\n{log.read_text()[-3000:]}"
                time.sleep(0.1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
            proc.wait()
    before, (running,) = _epochs_reported(arm), in_flight()
    return KilledSweep(tmp / "r" / "d", _done_trials(log), running, before, sweep(resume=tmp / "r" / "d", verbose=0))


def test_a_killed_sweep_of_two_worker_trials_resumes_with_nothing_lost(killed_sweep: KilledSweep) -> None:
    """The trials printed done are kept as they were (not rerun), and the sweep ends with its 3 trials
    each finished once. The trial in flight at the kill is continued from its checkpoint when Ray's
    experiment snapshot (written every few seconds) had caught up with it, and else replaced by a new
    trial (the journal holds ended trials only); either way it is finished once."""
    k = killed_sweep
    assert len(k.done) == 2 and k.in_flight not in k.done and len(k.before[k.in_flight]) == 1
    df = k.resumed.trials.set_index("trial_id")
    assert len(df) == 3 and df.index.is_unique and set(k.done) <= set(df.index)
    assert set(df["status"]) == {"TERMINATED"} and (df["workers"] == 2).all()
    after = _epochs_reported(k.path / "oialr")
    for trial_id in k.done:  # not rerun: the same rows, from the same processes
        assert after[trial_id] == k.before[trial_id]
        assert df.loc[trial_id, "val_acc"] == k.before[trial_id][-1]["val_acc"]
    (third,) = set(df.index) - set(k.done)
    assert df.loc[third, "training_iteration"] == 2 and [r["epoch"] for r in after[third]][-1] == 2


def test_asha_stops_whole_two_worker_trials(killed_sweep: KilledSweep) -> None:
    df = killed_sweep.resumed.trials.set_index("trial_id")
    first, second = killed_sweep.done
    assert df.loc[first, "config.optimizer.lr"] == 2.0e-2 and not df.loc[first, "stopped_early"]
    assert df.loc[second, "config.optimizer.lr"] == 3.0e-4 and df.loc[second, "stopped_early"], df
    assert df.loc[second, "training_iteration"] == 1 and df.loc[first, "training_iteration"] == 2
    # Rank 0's checkpoint reached Tune: the best trial's last one is its final epoch's, readable as usual.
    best = killed_sweep.resumed.summary["best"]["oialr"]
    assert read_checkpoint(killed_sweep.path / best["checkpoint"] / CHECKPOINT_FILE)["epoch"] == 2


def test_a_retrain_on_two_workers_matches_one_worker(
    killed_sweep: KilledSweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`retrain` runs each seed on the sweep's resources.workers (2; `workers=1` overrides), and the
    2-worker run is the 1-worker run: the same ranks per layer and, in the dense export, the same
    weights within 1e-4 (DDP's mean of two half-batch gradients is the global batch's up to float
    rounding; a factorization or cut at another step would move them far more; measured ~5e-6), val and
    test accuracy within 0.01 (as in the trainer test above: measured equal). metrics.csv has the same columns."""
    launched: list[int] = []
    real_launch = distributed.launch

    def launch(fn: Any, workers: int, *args: Any, **kwargs: Any) -> Any:
        launched.append(workers)
        return real_launch(fn, workers, *args, **kwargs)

    monkeypatch.setattr(distributed, "launch", launch)
    lines: list[str] = []
    retrain(killed_sweep.path, seeds=[1000], out=tmp_path / "two", log=lines.append)
    assert launched == [2] and any("on 2 workers each" in line for line in lines), lines
    retrain(killed_sweep.path, seeds=[1000], workers=1, out=tmp_path / "one", log=lines.append)
    assert launched == [2]
    two, one = (pd.read_csv(tmp_path / out / "metrics.csv") for out in ("two", "one"))
    assert list(two.columns) == list(one.columns) and len(two) == len(one) == 1
    for col in ("status", "epochs", "trainable_params", "total_params", "model", "model_dense"):
        assert two.loc[0, col] == one.loc[0, col], col
    for col in ("val_acc", "test_acc", "reloaded_test_acc", "dense_test_acc"):
        assert abs(two.loc[0, col] - one.loc[0, col]) <= 0.01, col
    models = {out: load_model(tmp_path / out / one.loc[0, "model"]) for out in ("two", "one")}
    ranks = low_rank_structure(models["two"])
    assert ranks and ranks == low_rank_structure(models["one"])
    dense = {out: load_model(tmp_path / out / one.loc[0, "model_dense"]).state_dict() for out in ("two", "one")}
    assert max(float((dense["two"][k] - dense["one"][k]).abs().max()) for k in dense["one"]) < 1e-4


def test_a_retrain_asking_more_workers_than_this_machine_has_is_one_line(
    killed_sweep: KilledSweep, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from oialr_tune.cli import main

    too_many = (os.cpu_count() or 1) + 1
    assert main(["retrain", str(killed_sweep.path), "--workers", str(too_many), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"oialr-tune: error: --workers: {too_many} workers need {too_many} CPU cores, this machine has " \
                  f"{os.cpu_count()}", err
    assert not (tmp_path / "r").exists()


def test_a_compare_asking_more_workers_than_this_machine_has_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`compare --workers N` sets the space's resources.workers (checked with its batch sizes, as in the
    YAML), and a local compare refuses more workers than this machine has before any sweep starts."""
    from oialr_tune.cli import main

    too_many, space, out = (os.cpu_count() or 1) + 1, str(tmp_path / "space.yaml"), str(tmp_path / "c")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(batch_size=8 * too_many)))
    assert main(["compare", space, "--workers", str(too_many), "--out", out]) == 2
    assert capsys.readouterr().err.strip() == (f"oialr-tune: error: --workers: {too_many} workers need {too_many} CPU "
                                               f"cores, this machine has {os.cpu_count()}")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(batch_size=8 * too_many + 1)))
    assert main(["compare", space, "--workers", "2", "--out", out]) == 2
    assert "must be a multiple of the 2 workers (resources.workers)" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_trial_of_n_workers_that_fills_the_cluster_is_refused_for_its_own_cpu(ray_session: Any,
                                                                               tmp_path: Path) -> None:
    """{cpu: 1, workers: 2} on the session's 2 CPUs: the workers fill them and the Tune trial that owns
    them holds 0.01 more, so the trial would wait forever for its workers (it did). A retrain run of the
    same resources (a Ray task of 2 CPUs that starts its 2 processes) fits."""
    space = space_from_dict(tiny_space("full", resources={"cpu": 1, "workers": 2}, baseline="none"))
    with pytest.raises(UserError, match=r"^resources\.cpu: 1(\.0)? per trial x 2 workers \(\+ 0\.01 for the trial "
                                        r"itself\) but the Ray cluster has 2(\.0)? CPU"):
        sweep(space, name="f", results_dir=tmp_path, verbose=0)
    assert not (tmp_path / "f").exists()
    check_cluster_fits(space.resources, trial=False)
