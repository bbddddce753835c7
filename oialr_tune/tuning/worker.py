"""What runs in a Ray worker process: one trial of the trainer, reporting each epoch to Ray Tune.

Everything a trial depends on comes from the stored base config and its sampled values, so a
reused worker process gives the same result as a fresh one; only the trainer's dataset cache
survives between trials.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray import tune

from oialr_tune import plugins
from oialr_tune.config import train_config_from_dict, with_overrides
from oialr_tune.run_record import Callback
from oialr_tune.space import SearchSpace
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
    """Trainer callback: one ``ray.tune.report`` per epoch, with the checkpoint when one was written."""

    def __init__(self, extra: Mapping[str, Any]):
        self.extra = dict(extra)

    def on_epoch_end(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        row = _scalar_metrics(metrics)
        row.update(self.extra)
        row["reported_at"] = time.time()  # wall clock, for best-so-far-vs-time curves (Ray's is whole seconds)
        # Ray copies the folder into the trial's storage during `report`, so the trainer may
        # overwrite its checkpoint file afterwards.
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        tune.report(row, checkpoint=checkpoint)


def run_trial(config: dict[str, Any], *, base: dict[str, Any], checkpoint_epochs: list[int],
              user_code: bytes | None = None) -> None:
    """One Ray Tune trial: the trainer on `base` with the sampled `config` (dotted keys).

    `user_code` is the driver's resolved user functions (`oialr_tune.plugins.pickled`), so a
    worker runs the same code even where it could not import it.

    Resumes from the trial's latest Ray checkpoint when there is one (a restored sweep, a retried
    failure). Everything the run depends on comes from `base` and `config`, so a reused worker
    process gives the same result as a fresh one; only the trainer's dataset cache survives.
    """
    if user_code is not None:
        plugins.install(user_code)
    cfg = with_overrides(train_config_from_dict(base), config) if config else train_config_from_dict(base)
    cfg.checkpoint_every = 0  # the sweep decides when to checkpoint: `checkpoint_epochs`
    # Where the trial ran: the node, the worker process (reused across trials) and Ray's GPU ids.
    extra = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
    }
    reporter = ReportToRay(extra)
    work = Path(tempfile.mkdtemp(prefix="oialr-trial-"))
    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            checkpoint.to_directory(str(work))
        train(cfg, callbacks=[reporter], checkpoint_dir=work, resume=True, checkpoint_epochs=checkpoint_epochs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_trainable(space: SearchSpace, arm: str) -> Any:
    """The Ray trainable of one arm, with its per-trial resources (needs Ray initialized).

    Public so tests and benchmarks can drive it with their own ``Tuner``.
    """
    base = space.arm_base(arm)
    user_code = plugins.pickled(base) if plugins.names_in(base) else None
    fn = tune.with_parameters(run_trial, base=base, checkpoint_epochs=space.checkpoint_epochs(), user_code=user_code)
    return tune.with_resources(fn, {"cpu": space.resources.cpu, "gpu": space.resources.gpu})
