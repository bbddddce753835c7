"""The full-rank arm's controller: the OIALR controller's whole interface, and no change to the model.

A training loop written for :class:`~oialr_tune.oialr.OIALR` (``controller.step()`` after each
``optimizer.step()``, logging ``trainable_fraction`` or ``layer_ranks()``, saving ``state_dict()``)
runs unchanged with :class:`FullRank`, so the same loop trains both arms of a comparison. Its
values are those of a model that stays full rank: no events, no low-rank layers, all parameters
trainable.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .controller import OIALR, PRESETS, RankEvent, count_trainable

__all__ = ["FullRank"]

Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]

# OIALR's keyword arguments and their defaults: FullRank takes and shows the same knobs.
_KNOBS = {
    name: p.default for name, p in inspect.signature(OIALR.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}  # fmt: skip


class FullRank:
    """Same constructor, attributes and methods as :class:`~oialr_tune.oialr.OIALR`; never acts.

    The knobs (``delay``, ``stability_frequency``, ...) are accepted and kept as given, so code
    that reads them works; `step` only counts optimizer steps. `layer_ranks` and `dense_layers`
    are empty (no layer is managed), `history` stays empty and `trainable_fraction` is the share
    of the model's trainable parameters at construction that is still trainable (1.0 unless the
    loop freezes some).
    """

    def __init__(self, model: nn.Module, optimizer: Optimizers | None = None, **knobs: Any) -> None:
        unknown = set(knobs) - set(_KNOBS)
        if unknown:
            raise TypeError(f"FullRank: unexpected keyword argument(s) {sorted(unknown)}")
        values = {**_KNOBS, **knobs}
        if values["preset"] not in PRESETS:
            raise ValueError(f"FullRank preset: must be one of {sorted(PRESETS)}, got {values['preset']!r}")
        self.model, self.optimizer = model, optimizer
        self.optimizers = list(optimizer) if isinstance(optimizer, list | tuple) else [optimizer]
        self.rules = PRESETS[values["preset"]]
        if values["layer_step_fraction"] is None:
            values["layer_step_fraction"] = self.rules.layer_step_fraction
        for name, value in values.items():
            setattr(self, name, value)
        self.full_rank_parameters = count_trainable(model)
        self.history: list[RankEvent] = []
        self._step = 0

    @property
    def step_count(self) -> int:
        return self._step

    def step(self) -> list[RankEvent]:
        """Count one optimizer step; nothing else happens in the full-rank arm."""
        self._step += 1
        return []

    def layer_ranks(self) -> dict[str, int]:
        return {}

    def dense_layers(self) -> dict[str, str]:
        return {}

    def trainable_parameters(self) -> int:
        return count_trainable(self.model)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_parameters() / self.full_rank_parameters

    def state_dict(self) -> dict[str, Any]:
        """The same keys as OIALR's, so checkpoint code reads either; ``ranks`` is empty."""
        return {"step": self._step, "converted": 0, "checked": 0, "ranks": {}, "stability": {}, "history": [],
                "full_rank_parameters": self.full_rank_parameters}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step count; refuses an OIALR state with low-rank layers (it is not full rank)."""
        if state.get("ranks"):
            raise ValueError(f"FullRank: the state has low-rank layers {sorted(state['ranks'])}; load it into OIALR")
        self._step = state["step"]
        self.full_rank_parameters = state["full_rank_parameters"]
