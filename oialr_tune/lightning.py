"""OIALR for a PyTorch Lightning module, without changing its code: ``Trainer(callbacks=[OIALRCallback()])``.

Needs the extra ``oialr-tune[lightning]``. The callback builds the OIALR controller on the module
and its (first) optimizer when fitting starts, steps it after every optimizer step, and logs
``trainable_fraction`` each epoch, like a learning-rate scheduler that Lightning drives.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("OIALRCallback needs Lightning: pip install 'oialr-tune[lightning]'") from e

from oialr_tune.oialr import OIALR
from oialr_tune.run_record import make_controller


class OIALRCallback(pl.Callback):
    """Run OIALR inside a Lightning fit.

    Args:
        delay: full-rank warm-up: a float < 1 is a fraction of the fit's optimizer steps
            (``trainer.estimated_stepping_batches``), an int a step count.
        **knobs: the other arguments of :class:`~oialr_tune.oialr.OIALR` (stability_frequency,
            stability_threshold, sigma_cutoff_fraction, preset, ...).

    The controller is ``callback.controller`` once fitting has started. Resuming a fit from a
    Lightning checkpoint taken after the first factorization is not supported (Lightning restores
    the weights before the callback could rebuild the low-rank layers).
    """

    def __init__(self, delay: int | float = 0.25, **knobs: Any) -> None:
        self.delay, self.knobs = delay, knobs
        self.controller: OIALR | None = None
        self._last_step = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"OIALRCallback: needs exactly one optimizer, the module has {len(trainer.optimizers)}")
        total = int(trainer.estimated_stepping_batches)
        self.controller = make_controller(pl_module, trainer.optimizers[0], {"delay": self.delay, **self.knobs},
                                          total)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Once per optimizer step: with gradient accumulation several batches make one step.
        if self.controller is not None and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.controller.step()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.controller is not None:
            pl_module.log("trainable_fraction", self.controller.trainable_fraction)
