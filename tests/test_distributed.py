"""OIALR and the trainer under data parallelism: real torch.distributed (gloo, 2 CPU processes), tiny models.

The controller tests spawn two processes with torch.multiprocessing (no Ray); each writes what it
saw to a JSON file that the test reads back.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _ddp_ranks import BATCH, _data, _ddp_worker, _free_port, _model, _train
from tiny_sweep import tiny_space
from torch import nn

from oialr_tune.config import train_config_from_dict
from oialr_tune.distributed import current, launch
from oialr_tune.oialr.distributed import state_digest
from oialr_tune.run_record import Callback, TrainResult, read_checkpoint
from oialr_tune.space import space_from_dict
from oialr_tune.sweep_state import CHECKPOINT_FILE
from oialr_tune.trainer import train
from oialr_tune.tuning import sweep


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


# --- a sweep of 2-worker trials (Ray Tune trial -> Ray Train TorchTrainer) ----------------------------------


def test_a_sweep_of_two_worker_trials_runs_on_ray_train_and_asha_stops_whole_trials(
    ray_session: Any, tmp_path: Path
) -> None:
    """Each trial is 2 Ray Train workers at 0.5 CPU (the session's Ray has 2 CPUs: one trial at a time).
    ASHA (rungs at epochs 1, 2 and 4) stops the two weaker trials after epoch 1: their workers end with
    them and the next trial gets their CPUs. (Seeded TPE, one trial at a time and bit-identical CPU
    training make the stops deterministic: trials 3 and 4 of this space.)"""
    space = tiny_space("ddp", resources={"cpu": 0.5, "workers": 2}, baseline="none",
                       budget={"num_samples": 4, "max_epochs": 4, "grace_period": 1, "reduction_factor": 2})
    result = sweep(space_from_dict(space), name="d", results_dir=tmp_path, verbose=0)
    df = result.trials
    assert len(df) == 4 and set(df["status"]) == {"TERMINATED"} and (df["workers"] == 2).all()
    stopped = df[df["stopped_early"]]
    assert len(stopped) and (stopped["training_iteration"] == 1).all(), df[["trial_id", "training_iteration"]]
    finished = df[~df["stopped_early"]]
    assert len(finished) and (finished["training_iteration"] == 4).all()
    # Rank 0's checkpoint reached Tune: the best trial's last one is its final epoch's, readable as usual.
    best = result.summary["best"]["oialr"]
    assert read_checkpoint(tmp_path / "d" / best["checkpoint"] / CHECKPOINT_FILE)["epoch"] == 4
