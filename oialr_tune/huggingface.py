"""OIALR for a Hugging Face ``transformers.Trainer``, without changing its model or training code:
``Trainer(..., callbacks=[OIALRTrainerCallback(**best["oialr"])])``.

Needs the extra ``oialr-tune[hf]`` (transformers, and accelerate, which the Trainer needs). The
callback takes a sweep config's ``oialr`` section as it is, validated like the config. It builds the
OIALR controller on the Trainer's model and optimizer when training starts (the full-rank `FullRank`
when the section says ``enabled: false``), steps it after every optimizer step, and adds
``trainable_fraction`` to each of the Trainer's logs, like a learning-rate scheduler the Trainer drives.

Why ``on_train_begin``: the Trainer creates its optimizer lazily, inside ``train()``
(``Trainer._prepare_for_training`` calls ``create_optimizer`` and wraps the result in accelerate's
``AcceleratedOptimizer``), so at ``on_init_end`` there is no optimizer yet. ``on_train_begin`` is the
first event after it exists, and it is given the model and the optimizer. The controller works on
the torch optimizer inside the wrapper: it recognises AdamW or SGD by type to carry their moments
through a rotation and a cut, and the wrapper shares its ``param_groups`` and ``state`` anyway. The
learning-rate scheduler, built over the same groups, follows the swapped parameters as they are.

Why ``on_optimizer_step``: the Trainer calls it right after ``optimizer.step()`` and before the
scheduler step and ``zero_grad``, once per optimizer step also with gradient accumulation: where
``controller.step()`` belongs.

Saving: the Trainer's checkpoints and ``save_model`` hold the low-rank layers as they are (factors
U, S, Vᵀ), which ``from_pretrained`` cannot read into a fresh model; fold them back first:
``export_dense(model).save_pretrained(path)`` (`oialr_tune.oialr.export_dense`) is a plain model again.

Not supported, refused in one line: several processes (``world_size`` > 1: DDP's reducer would keep
the parameters the controller replaces) and resuming from a Trainer checkpoint (its weights are the
low-rank layers', which the freshly built model does not have).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("OIALRTrainerCallback needs transformers: pip install 'oialr-tune[hf]'") from e

from oialr_tune.config import OIALRConfig, train_config_from_dict
from oialr_tune.oialr import OIALR, FullRank
from oialr_tune.run_record import make_controller


class OIALRTrainerCallback(TrainerCallback):
    """Run OIALR inside a ``transformers.Trainer`` fit.

    Args:
        **oialr: the keys of a config's ``oialr`` section (`OIALRConfig`: ``enabled``, ``delay`` as a
            fraction of the run's optimizer steps (``state.max_steps``) or a step count, ``preset``,
            ``include``/``exclude``, ...), checked like the config: a bad key or value raises
            `UserError` naming ``oialr.<key>``.

    The controller is ``callback.controller`` once training has started: an `OIALR`, or a `FullRank`
    (no change to the model, ``trainable_fraction`` 1.0) for ``enabled: false``.
    """

    def __init__(self, **oialr: Any) -> None:
        self.settings: OIALRConfig = train_config_from_dict({"oialr": oialr}).oialr
        self.controller: OIALR | FullRank | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
                       model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                       **kwargs: Any) -> None:
        if args.world_size > 1:
            raise ValueError(f"OIALRTrainerCallback: runs on one process, this Trainer has {args.world_size}")
        if state.global_step > 0:
            raise ValueError("OIALRTrainerCallback: resuming a Trainer checkpoint is not supported (its weights "
                             "are low-rank layers the fresh model lacks); start the run again")
        if model is None or optimizer is None:
            raise ValueError("OIALRTrainerCallback: the Trainer gave no model or optimizer at on_train_begin")
        optimizer = _torch_optimizer(optimizer)
        self.controller = (make_controller(model, optimizer, self.settings, state.max_steps)
                           or FullRank(model, optimizer))  # fmt: skip

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        if self.controller is not None:
            self.controller.step()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # The Trainer appended this log to state.log_history just before: add the fraction to both.
        # (Integrations named in `report_to` are called before the user's callbacks and miss it.)
        if self.controller is None or logs is None:
            return
        fraction = self.controller.trainable_fraction
        logs["trainable_fraction"] = fraction
        if state.log_history:
            state.log_history[-1]["trainable_fraction"] = fraction


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer
