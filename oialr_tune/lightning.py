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

Under Lightning's DDP strategy (``strategy="ddp"``: NCCL on GPUs, gloo on CPUs) the controller splits
its SVDs across the ranks and keeps them bit-identical (:mod:`oialr_tune.oialr.distributed`).
Lightning wraps the module in DDP before ``on_fit_start``, and DDP's reducer keeps the parameters it
was built with; so whenever the controller replaces parameters (a factorization or check) the
callback has the strategy build a new DDP wrapper around the same module, before the next step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("OIALRCallback needs Lightning: pip install 'oialr-tune[lightning]'") from e

from oialr_tune.config import OIALRConfig, train_config_from_dict
from oialr_tune.oialr import OIALR, FullRank, apply_low_rank_structure
from oialr_tune.oialr.distributed import ddp_ignore_frozen_bases
from oialr_tune.run_record import make_controller


class OIALRCallback(pl.Callback):
    """Run OIALR inside a Lightning fit.

    Args:
        **oialr: the keys of a config's ``oialr`` section (`OIALRConfig`: ``enabled``, ``delay`` as
            a fraction of the fit's optimizer steps (``trainer.estimated_stepping_batches``) or a
            step count, ``preset``, ``include``/``exclude``, ...), checked like the config: a bad
            key or value raises `UserError` naming ``oialr.<key>``.

    The controller is ``callback.controller`` once fitting has started: an `OIALR`, or a `FullRank`
    (no change to the model, ``trainable_fraction`` 1.0) for ``enabled: false``.
    """

    def __init__(self, **oialr: Any) -> None:
        self.settings: OIALRConfig = train_config_from_dict({"oialr": oialr}).oialr
        self.controller: OIALR | FullRank | None = None
        self._last_step = 0
        self._version = 0  # the controller's parameters_version the strategy's DDP wrapper holds
        self._resume: dict[str, Any] | None = None  # the controller state of the checkpoint being resumed
        self._resume_order: list[list[str]] = []  # and the names of its optimizer's parameters, group by group
        self._fitted: tuple[pl.LightningModule, torch.optim.Optimizer] | None = None  # what the controller manages

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
            pl_module.__dict__.pop("on_load_checkpoint", None)  # back to the class's hook

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"OIALRCallback: needs exactly one optimizer, the module has {len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        self._fitted = pl_module, optimizer
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

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.controller is not None:
            pl_module.log("trainable_fraction", self.controller.trainable_fraction)


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
