"""Which eligible weights the OIALR controller takes on: include/exclude patterns, and the weights it must
leave dense (frozen, tied, in no optimizer); GPT-2's ``Conv1D`` recognised by its weight layout.

Kept apart from :mod:`.controller`, which finds the eligible weights (``_find_slots``) and runs the
schedule; this module only decides among them and says why, for ``OIALR.dense_layers()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

if TYPE_CHECKING:
    from .controller import _Slot

__all__ = ["check_patterns", "is_gpt2_conv1d", "left_dense"]


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """A GPT-2-style ``Conv1D`` (``transformers.pytorch_utils.Conv1D``): a Linear whose weight is stored
    ``[in, out]`` (``x @ W + b``). Recognised by its shape, not imported: this package needs only torch."""
    # Once factorized, parametrize has swapped its class for "ParametrizedConv1D".
    named = type(module).__name__.removeprefix("Parametrized") == "Conv1D"
    if not named or not isinstance(getattr(module, "nf", None), int):
        return False
    if parametrize.is_parametrized(module, "weight"):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[1] == module.nf


def _names_of(slot: _Slot) -> tuple[str, ...]:
    """What include/exclude patterns match: the slot's name and, for a parametrized tensor, its module's."""
    module_name = slot.name.rpartition(".")[0] if slot.name.endswith(f".{slot.attr}") else slot.name
    return (slot.name, module_name)


def _matching(patterns: Sequence[str], names: Sequence[str]) -> str | None:
    """The first of `patterns` (globs, e.g. ``"*.attn.*"``) that one of `names` matches, else None."""
    return next((p for p in patterns if any(fnmatchcase(n, p) for n in names)), None)


def left_dense(model: nn.Module, slots: Sequence[_Slot], optimizers: Sequence[torch.optim.Optimizer],
                   include: Sequence[str] | None, exclude: Sequence[str]) -> dict[str, str]:
    """Which of `slots` stay dense although eligible, and why: left out by ``include``/``exclude``, or a
    weight whose S would never train (frozen, in no optimizer) or that another module shares (tied)."""
    optimized = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    out: dict[str, str] = {}
    for s in slots:
        names = _names_of(s)
        hit = _matching(exclude, names)
        if hit is not None:
            out[s.name] = f"excluded by oialr.exclude pattern {hit!r}"
        elif include is not None and _matching(include, names) is None:
            out[s.name] = f"matches no oialr.include pattern {list(include)}"
        elif s.low_rank:
            continue
        elif not s.dense_weight().requires_grad:
            out[s.name] = "frozen (requires_grad=False): its S would never train"
        elif len(owners.get(id(s.dense_weight()), ())) > 1:
            out[s.name] = f"tied: the same tensor as {', '.join(owners[id(s.dense_weight())])}"
        elif id(s.dense_weight()) not in optimized:
            out[s.name] = "in no optimizer's parameters: its S would never train"
    return out


def check_patterns(slots: Sequence[_Slot], include: Sequence[str] | None, exclude: Sequence[str]) -> None:
    """A pattern that matches no eligible layer is a typo: refuse it, naming it and a few layer names."""
    for key, patterns in (("include", include or ()), ("exclude", exclude)):
        for p in patterns:
            if not any(_matching([p], _names_of(s)) for s in slots):
                shown = ", ".join(s.name for s in slots[:4]) + (", ..." if len(slots) > 4 else "")
                raise ValueError(f"OIALR {key}: pattern {p!r} matches no eligible layer (layers: {shown})")
