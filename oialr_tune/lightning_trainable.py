"""A LightningModule (+ LightningDataModule) as a sweep's trainable, with no training loop of yours.

A config's ``lightning`` section names the classes; the config then runs `fit` as its trainable
(``trainable: oialr_tune.lightning_trainable:fit``, set by `oialr_tune.config`)::

    lightning: {module: "my_lightning:Classifier", datamodule: "my_lightning:Blobs"}

`fit` builds each class as ``Class(config)``: the `TrainConfig` with the trial's searched values, so
the module reads ``config.optimizer.lr`` (and anything else searched) in its constructor or in
``configure_optimizers``; the ``oialr`` section goes to the callback, not to the module. It builds
the Trainer itself: ``max_epochs`` = ``schedule.epochs``, the trial's device (a GPU when the trial
has one, from ``resources``), ``precision`` and ``grad_clip`` from the config, no logger, no
checkpoint files, and `OIALRCallback(trial=trial)`, which runs OIALR (or full rank in
the baseline arm), reports each epoch's ``val_*`` metrics and keeps Lightning's checkpoint when the
sweep asks. A resumed trial continues from that checkpoint; in a retrain (``trial.evaluate_test``)
``trainer.test`` scores the test split (log ``test_*`` metrics in ``test_step``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden

from oialr_tune import plugins, safe_load
from oialr_tune.config import TrainConfig
from oialr_tune.lightning import OIALRCallback

if TYPE_CHECKING:
    from oialr_tune.loop import Trial

__all__ = ["fit", "trainer_settings"]

# The config's `precision` as Lightning spells it (bf16_on_gpu: bf16 on a GPU, fp32 on the CPU).
_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def trainer_settings(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The ``pl.Trainer`` arguments a trial of `config` on `device` trains with (callbacks aside)."""
    gpu = device.type == "cuda"
    precision = config.precision if config.precision != "bf16_on_gpu" else "bf16" if gpu else "fp32"
    return {
        "max_epochs": config.schedule.epochs, "accelerator": "gpu" if gpu else "cpu",
        "devices": [device.index or 0] if gpu else 1, "precision": _PRECISION[precision],
        "gradient_clip_val": config.grad_clip, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False,
    }  # fmt: skip


def build(config: TrainConfig) -> tuple[pl.LightningModule, pl.LightningDataModule | None]:
    """``lightning.module`` and ``lightning.datamodule`` (None if not given), each built as ``Class(config)``.

    What they raise is one `UserError` line naming the key.
    """
    module = _instance(config, "module")
    return module, _instance(config, "datamodule") if config.lightning.datamodule else None


def _instance(config: TrainConfig, which: str) -> Any:
    name = getattr(config.lightning, which)
    return plugins.call(plugins.resolve(name, f"lightning.{which}"), name, f"lightning.{which}", config)


def fit(config: TrainConfig, trial: Trial) -> None:
    """One trial: Lightning's fit of the configured module, reported through `trial` (module notes)."""
    module, datamodule = build(config)
    callback = OIALRCallback(trial=trial)
    trainer = pl.Trainer(callbacks=[callback], **trainer_settings(config, trial.device))
    with torch.serialization.safe_globals(safe_load.allowed_globals()):  # a resume: no arbitrary pickle
        trainer.fit(module, datamodule=datamodule, ckpt_path=callback.ckpt_path, weights_only=True)
    if trial.evaluate_test and _tests(module, datamodule):
        trainer.test(module, datamodule=datamodule, verbose=False)


def _tests(module: pl.LightningModule, datamodule: pl.LightningDataModule | None) -> bool:
    """Whether the module can score a test split: a ``test_step`` and a ``test_dataloader`` to run it on."""
    loader = is_overridden("test_dataloader", module) or (datamodule is not None and
                                                         is_overridden("test_dataloader", datamodule))
    return is_overridden("test_step", module) and loader
