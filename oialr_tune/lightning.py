"""OIALR for a PyTorch Lightning module, without changing its code: ``Trainer(callbacks=[OIALRCallback()])``.

Needs the extra ``oialr-tune[lightning]``. The callback takes a sweep config's ``oialr`` section as
it is (``OIALRCallback(**best["oialr"])``), validated like the config. It builds the OIALR controller
on the module and its (first) optimizer when fitting starts (the full-rank `FullRank` when the section
says ``enabled: false``), steps it after every optimizer step, and logs ``trainable_fraction`` each
epoch, like a learning-rate scheduler that Lightning drives.

Resume (``trainer.fit(..., ckpt_path=...)``): the callback's `state_dict` is the controller's, saved
in Lightning's checkpoint. Lightning loads the module's weights before any callback sees its state,
and the low-rank weights only fit low-rank layers; so the callback rebuilds the low-rank layers from
the checkpoint in the module's ``on_load_checkpoint`` hook, which Lightning calls with the checkpoint
just before it loads the weights. The optimizer, built afterwards over the rebuilt module, has its
parameters put in the checkpoint's order (by name) and then gets its state from the checkpoint, and
the controller continues its schedule.

Inside a sweep's trial (``OIALRCallback(trial=trial)`` in a ``trainable: "module:function"`` loop, or
the ``lightning:`` section, `oialr_tune.lightning_trainable`) the settings are the trial's searched
``oialr`` section, and at the end of each training epoch the callback reports that epoch's validation
metrics (every ``val_*`` key of ``trainer.callback_metrics``, and ``train_loss``) through
``trial.report``, so ASHA, the baseline arm, best and retrain see the trial like any other. When the
sweep keeps a checkpoint of that epoch, it is Lightning's own (``trainer.save_checkpoint``, as
``ModelCheckpoint(save_on_train_epoch_end=True)`` writes it) and the RNG states; a resumed trial
gets it back as ``callback.ckpt_path`` for ``trainer.fit(..., ckpt_path=...)``. A ``trainer.test`` with
the callback hands its ``test_*`` metrics to the trial (retrain's scores). The callback knows the
trial only through that `Trial` API: nothing here imports Ray.

Under Lightning's DDP strategy (``strategy="ddp"``: NCCL on GPUs, gloo on CPUs) the controller splits
its SVDs across the ranks and keeps them bit-identical (:mod:`oialr_tune.oialr.distributed`).
Lightning wraps the module in DDP before ``on_fit_start``, and DDP's reducer keeps the parameters it
was built with; so whenever the controller replaces parameters (a factorization or check) the
callback has the strategy build a new DDP wrapper around the same module, before the next step.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("OIALRCallback needs Lightning: pip install 'oialr-tune[lightning]'") from e

from oialr_tune import safe_load
from oialr_tune.config import OIALRConfig, train_config_from_dict
from oialr_tune.errors import UserError
from oialr_tune.oialr import OIALR, FullRank, apply_low_rank_structure
from oialr_tune.oialr.distributed import ddp_ignore_frozen_bases
from oialr_tune.run_record import make_controller

if TYPE_CHECKING:
    from oialr_tune.loop import Trial


class OIALRCallback(pl.Callback):
    """Run OIALR inside a Lightning fit.

    Args:
        trial: the `oialr_tune.loop.Trial` of a sweep's trial: its ``config.oialr`` are the settings,
            and each epoch is reported to it (module notes). Give either `trial` or `oialr` keys.
        **oialr: the keys of a config's ``oialr`` section (`OIALRConfig`: ``enabled``, ``delay`` as
            a fraction of the fit's optimizer steps (``trainer.estimated_stepping_batches``) or a
            step count, ``preset``, ``include``/``exclude``, ...), checked like the config: a bad
            key or value raises `UserError` naming ``oialr.<key>``.

    The controller is ``callback.controller`` once fitting has started: an `OIALR`, or a `FullRank`
    (no change to the model, ``trainable_fraction`` 1.0) for ``enabled: false``.
    """

    def __init__(self, *, trial: Trial | None = None, **oialr: Any) -> None:
        if trial is not None and oialr:
            raise UserError(f"OIALRCallback: with trial= the settings are the trial's oialr section; got "
                            f"{', '.join(sorted(oialr))} as well")  # fmt: skip
        self.settings: OIALRConfig = trial.config.oialr if trial else train_config_from_dict({"oialr": oialr}).oialr
        self.trial = trial
        self.controller: OIALR | FullRank | None = None
        self._last_step = 0
        self._version = 0  # the controller's parameters_version the strategy's DDP wrapper holds
        self._resume: dict[str, Any] | None = None  # the controller state of the checkpoint being resumed
        self._resume_order: list[list[str]] = []  # and the names of its optimizer's parameters, group by group
        self._fitted: tuple[pl.LightningModule, torch.optim.Optimizer] | None = None  # what the controller manages
        self._validated_epoch = -1  # the (0-based) epoch whose validation ran last, outside the sanity check
        self._resume_dir: Path | None = None  # holds the trial's Lightning checkpoint while a fit resumes from it

    @property
    def ckpt_path(self) -> str | None:
        """The Lightning checkpoint a resumed trial continues from, for ``trainer.fit(..., ckpt_path=...)``;
        None for a fresh trial or without a trial."""
        if self.trial is None or self.trial.checkpoint is None:
            return None
        if self._resume_dir is None:
            self._resume_dir = Path(tempfile.mkdtemp(prefix="oialr-lightning-"))
            (self._resume_dir / "resume.ckpt").write_bytes(self.trial.checkpoint["lightning"])
        return str(self._resume_dir / "resume.ckpt")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The module's own hook runs before Lightning loads its weights (the callbacks' hooks run
        # after): wrap it, for this fit only, to rebuild the low-rank layers the weights need.
        if stage == "fit":
            pl_module.on_load_checkpoint = self._rebuilding_first(pl_module, pl_module.on_load_checkpoint)

    def _rebuilding_first(self, pl_module: pl.LightningModule,
                          hook: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        """`hook`, preceded by giving `pl_module` the low-rank layers of the checkpoint's controller."""

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            state = checkpoint.get("callbacks", {}).get(self.state_key)
            if state and state["controller"] is not None:
                apply_low_rank_structure(pl_module, state["controller"]["ranks"])
            hook(checkpoint)

        return on_load_checkpoint

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._end_fit(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end_fit(pl_module)  # Lightning skips `teardown` when the fit raises (a diverged or stopped trial)

    def _end_fit(self, pl_module: pl.LightningModule) -> None:
        pl_module.__dict__.pop("on_load_checkpoint", None)  # back to the class's hook
        if self._resume_dir is not None:
            shutil.rmtree(self._resume_dir, ignore_errors=True)
            self._resume_dir = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"OIALRCallback: needs exactly one optimizer, the module has {len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        self._fitted = pl_module, optimizer
        if self._resume is not None and self.trial is not None and self.trial.checkpoint is not None:
            # The RNG states of the checkpointed epoch's end, put back before anything draws: the step
            # count below sets up the train loader, whose iterator takes its seed from torch's RNG.
            self.trial.restore_rng_state(self.trial.checkpoint["rng"])
        total = int(trainer.estimated_stepping_batches)
        self.controller = make_controller(pl_module, optimizer, self.settings, total) or FullRank(pl_module, optimizer)
        if self._resume is not None:
            # The controller rebuilds its layers with placeholder factors (it expects a fresh
            # model); the module already holds the checkpoint's weights, so keep and put them back.
            weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.controller.load_state_dict(self._resume)
            pl_module.load_state_dict(weights)
            _reorder(optimizer, pl_module, self._resume_order)
            self._resume = None
            self._sync_wrapper(trainer)
        self._last_step = trainer.global_step
        if self.trial is not None:
            self.trial.attach(pl_module, self.controller)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has restored its loops by now: the fit must continue the trial, and end with it.
        trial = self.trial
        if trial is None:
            return
        epochs = trial.config.schedule.epochs
        if trainer.max_epochs != epochs:
            raise UserError(f"OIALRCallback: Trainer(max_epochs={trainer.max_epochs}) but the trial's "
                            f"schedule.epochs is {epochs} (config.schedule.epochs)")  # fmt: skip
        if trainer.current_epoch != trial.start_epoch:
            raise UserError(f"OIALRCallback: the trial resumes after epoch {trial.start_epoch} but the fit starts at "
                            f"epoch {trainer.current_epoch}: pass trainer.fit(..., ckpt_path=callback.ckpt_path)")

    def _sync_wrapper(self, trainer: pl.Trainer) -> None:
        """Rewrap the module in DDP if the controller replaced parameters since the wrapper was built."""
        if self.controller is not None and self.controller.parameters_version != self._version:
            self._version = self.controller.parameters_version
            _rewrap(trainer.strategy)

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (schedule position, layer ranks, history) and its optimizer's parameter
        order by name, saved in Lightning's checkpoint."""
        if self.controller is None or self._fitted is None:
            return {"controller": None, "optimizer_order": []}
        module, optimizer = self._fitted
        names = {id(p): n for n, p in module.named_parameters()}
        order = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        return {"controller": self.controller.state_dict(), "optimizer_order": order}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's state for `on_fit_start`, where the controller is built."""
        self._resume, self._resume_order = state_dict["controller"], state_dict["optimizer_order"]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Once per optimizer step: with gradient accumulation several batches make one step.
        if self.controller is not None and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.controller.step()
            self._sync_wrapper(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.controller is not None:
            pl_module.log("trainable_fraction", self.controller.trainable_fraction)
        if self.trial is not None:
            self._report(trainer)

    def _report(self, trainer: pl.Trainer) -> None:
        """This epoch's validation metrics (and its checkpoint when the sweep keeps one) to the trial."""
        epoch = trainer.current_epoch + 1
        if self._validated_epoch != trainer.current_epoch:
            raise UserError(f"OIALRCallback: epoch {epoch} ran no validation; the tuner needs val_* metrics every "
                            f"epoch (a val dataloader, check_val_every_n_epoch=1)")  # fmt: skip
        logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics = {k: v for k, v in logged.items() if k.startswith("val_")}
        if not metrics:
            raise UserError("OIALRCallback: the module logged no val_* metric; log them in validation_step, "
                            "e.g. self.log('val_loss', loss)")  # fmt: skip
        train_loss = logged.get("train_loss", logged.get("train_loss_epoch", math.nan))
        checkpoint = self._checkpoint(trainer) if self.trial.checkpoint_due(epoch) else None
        self.trial.report(epoch=epoch, train_loss=train_loss, checkpoint=checkpoint, **metrics)

    def _checkpoint(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Lightning's checkpoint file (its bytes: the trial's checkpoint holds plain data) and the RNG states."""
        with tempfile.TemporaryDirectory(prefix="oialr-lightning-") as folder:
            path = Path(folder, "epoch.ckpt")
            trainer.save_checkpoint(path, weights_only=False)  # all of it; every rank calls this, rank 0 writes
            if not path.exists():
                return {"lightning": b"", "rng": self.trial.rng_state()}
            _check_loadable(path)
            return {"lightning": path.read_bytes(), "rng": self.trial.rng_state()}

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.trial is not None:  # retrain's scores on the test split
            self.trial.test_metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()
                                            if k.startswith("test_")})


def _check_loadable(path: Path) -> None:
    """Refuse, when it is written, a checkpoint that a resumed trial could not load safely.

    A resume loads it with ``weights_only=True`` and `safe_load`'s allow-list (tensors, plain data,
    numpy arrays): an object of another class, typically the `config` a module's
    ``save_hyperparameters()`` stored, would fail only then, after the trial had run.
    """
    refused = safe_load.refused_globals(path)
    if refused:
        raise UserError(f"OIALRCallback: Lightning's checkpoint holds {', '.join(sorted(refused))}, which a "
                        f"resumed trial cannot load safely (only tensors, plain data, numpy arrays); e.g. "
                        f"self.save_hyperparameters(ignore=['config'])")  # fmt: skip


def _reorder(optimizer: torch.optim.Optimizer, module: nn.Module, order: list[list[str]]) -> None:
    """Put the optimizer's parameters in the checkpoint's `order` (names), which its saved state follows.

    The resumed module's optimizer is built over the rebuilt low-rank layers, and a parametrized
    weight's factor is listed after the module's other parameters, whereas the controller put it
    where the dense weight was: without this, Lightning would give it another tensor's state.
    """
    params = dict(module.named_parameters())
    for group, names in zip(optimizer.param_groups, order, strict=True):
        if {id(p) for p in group["params"]} != {id(params[n]) for n in names}:
            raise ValueError("OIALRCallback: the optimizer's parameters are not those of the checkpoint being resumed")
        group["params"] = [params[n] for n in names]


def _rewrap(strategy: Any) -> None:
    """A new DDP wrapper (Lightning's own ``_setup_model``) around the strategy's module, if it uses DDP."""
    if isinstance(strategy.model, DistributedDataParallel):
        module = strategy.model.module
        ddp_ignore_frozen_bases(module)
        strategy.model = strategy._setup_model(module)
