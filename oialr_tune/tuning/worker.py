"""What runs in a Ray worker process: one trial of the trainer, reporting each epoch to Ray Tune.

Everything a trial depends on comes from the stored base config and its sampled values, so a
reused worker process gives the same result as a fresh one; only the trainer's dataset cache
survives between trials.

A trial with ``resources.workers: N > 1`` is Ray's Train + Tune pattern: the Tune trial (a light
function, 0.01 CPU) starts a Ray Train ``TorchTrainer`` of N workers, each with ``resources.cpu`` and
``resources.gpu``, which Ray places on one node or across the cluster and joins in one process group
(NCCL on GPUs, gloo on CPUs). Every worker runs the trainer (DDP, its share of each global batch);
rank 0's checkpoint goes to storage through ``ray.train.report``, and the trial passes each epoch's
metrics and checkpoint on to Tune with ``tune.report``, so ASHA, resume, best and retrain see the
same trial as with one worker. ASHA stopping the trial ends the Tune trial's actor, which owns the
Train run: its workers end with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
from ray import tune

from oialr_tune import plugins
from oialr_tune.config import train_config_from_dict, with_overrides
from oialr_tune.run_record import Callback
from oialr_tune.space import Resources, SearchSpace
from oialr_tune.trainer import train

__all__ = ["make_trainable", "run_trial"]


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer's epoch metrics in a form Ray logs well: numbers stay, structures are encoded.

    Ray's CSV/TensorBoard loggers and its dataframe want flat scalars; per-layer ranks are kept as
    one JSON string (a ViT has dozens of layers: one column each would swamp the tables).
    """
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if k in ("ranks", "dense_layers"):  # dense_layers: weight layers OIALR leaves dense -> why
            out[k] = json.dumps(v, sort_keys=True)
        elif k == "oialr_events":
            out["oialr_events"] = len(v)
        elif k == "status":
            out["run_status"] = v  # Ray's result dicts have their own notion of done/status
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
    return out


class ReportToRay(Callback):
    """Trainer callback: one report per epoch, with the checkpoint when one was written.

    To Ray Tune (``tune.report``) from a one-worker trial, to Ray Train (``ray.train.report``, which
    every worker calls and only rank 0 with a checkpoint) from a worker of a multi-worker trial.
    `required` are the metrics the sweep needs in every report (its objective; a user loop's first
    report is checked against them).
    """

    def __init__(self, extra: Mapping[str, Any], report: Any = tune.report, required: tuple[str, ...] = ()):
        self.extra, self.report, self.required_metrics = dict(extra), report, tuple(required)

    def on_epoch_end(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        row = _scalar_metrics(metrics)
        row.update(self.extra)
        row["reported_at"] = time.time()  # wall clock, for best-so-far-vs-time curves (Ray's is whole seconds)
        # Ray copies the folder into the trial's storage during `report`, so the trainer may
        # overwrite its checkpoint file afterwards.
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        self.report(row, checkpoint=checkpoint)


def _where() -> dict[str, Any]:
    """Where this process runs: the node, the worker process (reused across trials) and Ray's GPU ids."""
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
    }


def _train_in(work: Path, cfg: Any, checkpoint: tune.Checkpoint | None, reporter: ReportToRay,
              checkpoint_epochs: list[int]) -> None:
    """The trainer in the scratch folder `work`, resumed from `checkpoint` if there is one; `work` is removed."""
    try:
        if checkpoint is not None:
            checkpoint.to_directory(str(work))
        train(cfg, callbacks=[reporter], checkpoint_dir=work, resume=True, checkpoint_epochs=checkpoint_epochs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _trial_config(config: dict[str, Any], base: dict[str, Any], user_code: bytes | None) -> Any:
    """The trainer config of a trial: `base` with the sampled `config`; the sweep decides when to checkpoint."""
    if user_code is not None:
        plugins.install(user_code)
    cfg = with_overrides(train_config_from_dict(base), config) if config else train_config_from_dict(base)
    cfg.checkpoint_every = 0  # the sweep decides when to checkpoint: `checkpoint_epochs`
    return cfg


def run_trial(config: dict[str, Any], *, base: dict[str, Any], checkpoint_epochs: list[int],
              user_code: bytes | None = None, resources: Resources | None = None,
              required_metrics: tuple[str, ...] = ()) -> None:
    """One Ray Tune trial: the trainer on `base` with the sampled `config` (dotted keys).

    `user_code` is the driver's resolved user functions (`oialr_tune.plugins.pickled`), so a
    worker runs the same code even where it could not import it.

    Resumes from the trial's latest Ray checkpoint when there is one (a restored sweep, a retried
    failure). Everything the run depends on comes from `base` and `config`, so a reused worker
    process gives the same result as a fresh one; only the trainer's dataset cache survives.
    With ``resources.workers > 1`` the trial runs on that many Ray Train workers (module notes).
    `required_metrics` are what the sweep's objective reads from every report.
    """
    if resources is not None and resources.workers > 1:
        _run_on_workers(config, base=base, checkpoint_epochs=checkpoint_epochs, user_code=user_code,
                        resources=resources, required_metrics=required_metrics)
        return
    cfg = _trial_config(config, base, user_code)
    reporter = ReportToRay({**_where(), "workers": 1}, required=required_metrics)
    _train_in(Path(tempfile.mkdtemp(prefix="oialr-trial-")), cfg, tune.get_checkpoint(), reporter, checkpoint_epochs)


def _train_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker of a multi-worker trial: the trainer under DDP, reporting to Ray Train."""
    import ray.train
    import torch.distributed as dist

    cfg = _trial_config(loop["config"], loop["base"], loop["user_code"])
    # Every worker's place, so the trial's row names all the nodes and GPUs it used.
    places: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(places, _where())
    extra = {
        "node_id": ",".join(dict.fromkeys(p["node_id"] for p in places)),
        "pid": os.getpid(),
        "gpu_ids": ",".join(p["gpu_ids"] for p in places if p["gpu_ids"]),
        "workers": len(places),
    }
    if dist.get_rank() == 0:  # the trial removes it at the end, should Ray Train leave it behind
        loop["queue"].put(("placement_group", ray.util.get_current_placement_group()))
    reporter = ReportToRay(extra, report=ray.train.report, required=loop["required_metrics"])
    _train_in(Path(tempfile.mkdtemp(prefix="oialr-trial-")), cfg, loop["checkpoint"], reporter,
              loop["checkpoint_epochs"])


class _ForwardToTrial(ray.train.UserCallback):
    """Ray Train controller callback: hands each report (rank 0's metrics, the stored checkpoint) to the trial."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.queue.put((metrics[0], checkpoint))  # blocks while the trial has not passed the last one on


def _run_on_workers(config: dict[str, Any], *, base: dict[str, Any], checkpoint_epochs: list[int],
                    user_code: bytes | None, resources: Resources, required_metrics: tuple[str, ...]) -> None:
    """The Tune side of a multi-worker trial: a TorchTrainer on a thread, its reports passed on to Tune."""
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    # Ray Train gives up on workers that have not started within 60 s by default; on a busy cluster
    # (other trials hold the resources, or start-up is slow) the trial should wait, as a Tune trial does.
    # Ray Train passes the variable from here to its controller.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "1800")
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    storage = tune.get_context().get_storage()
    fs = storage.storage_filesystem
    for old in fs.get_file_info(pyarrow.fs.FileSelector(storage.trial_fs_path, allow_not_found=True)):
        if old.base_name.startswith("train-"):  # an earlier attempt's, killed before it could remove it
            fs.delete_dir(old.path)
    name = f"train-{uuid.uuid4().hex[:8]}"  # a new Train run per attempt; Tune's checkpoint is what resumes
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": config, "base": base, "checkpoint_epochs": checkpoint_epochs,
                           "user_code": user_code, "checkpoint": tune.get_checkpoint(), "queue": queue,
                           "required_metrics": required_metrics},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers, use_gpu=resources.gpu > 0,
            resources_per_worker={"CPU": resources.cpu, "GPU": resources.gpu},
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage.trial_fs_path, storage_filesystem=storage.storage_filesystem,
            callbacks=[_ForwardToTrial(queue)], checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=0),  # Tune retries the trial
        ),
    )
    failed: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # handed to the trial's thread, which raises it
            failed.append(e)
        finally:
            with contextlib.suppress(Exception):  # the trial may be gone already (stopped): do not wait on it
                queue.put(None, timeout=10)

    thread = threading.Thread(target=fit, name="oialr-train-run", daemon=True)
    thread.start()
    workers_group = None
    try:
        while (item := queue.get()) is not None:
            if item[0] == "placement_group":
                workers_group = item[1]
                continue
            row, stored = item  # a ray.train.Checkpoint in the Train run's storage, or None
            checkpoint = tune.Checkpoint(stored.path, stored.filesystem) if stored is not None else None
            tune.report(row, checkpoint=checkpoint)
    finally:
        # Ray Train 2.60 can leave its workers' placement group behind (its cleaner actor looks Ray up by
        # address and fails where several Ray instances run): the next trial would wait for it forever.
        # Removing it also ends the workers if this trial is being stopped (ASHA) while they train.
        # All of this runs first and fast: Tune ends a stopped or finished trial's process soon after.
        if workers_group is not None:
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(workers_group)
        with contextlib.suppress(Exception):
            fs.delete_dir(f"{storage.trial_fs_path}/{name}")  # Tune keeps its own copies of the checkpoints
        thread.join(timeout=None if workers_group is None and not failed else 60)
    if failed:
        raise failed[0]


def make_trainable(space: SearchSpace, arm: str) -> Any:
    """The Ray trainable of one arm, with its per-trial resources (needs Ray initialized).

    Public so tests and benchmarks can drive it with their own ``Tuner``.
    """
    base = space.arm_base(arm)
    user_code = plugins.pickled(base) if plugins.names_in(base) else None
    r = space.resources
    fn = tune.with_parameters(run_trial, base=base, checkpoint_epochs=space.checkpoint_epochs(), user_code=user_code,
                              resources=r, required_metrics=(space.objective.metric,))
    if r.workers > 1:  # the trial only waits on its Ray Train workers, which hold the resources
        return tune.with_resources(fn, {"cpu": 0.01})
    return tune.with_resources(fn, {"cpu": r.cpu, "gpu": r.gpu})
