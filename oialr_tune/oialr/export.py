"""Turn a (partly) low-rank model back into ordinary dense layers."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import parametrize

from .lowrank import LowRankLayer, LowRankWeight

__all__ = ["export_dense"]


def export_dense(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every U S Vᵀ weight is folded into a plain dense weight.

    The copy has the architecture the model was built with (``nn.Linear``, ``nn.Conv2d``, plain
    ``nn.MultiheadAttention``), so it loads and runs anywhere without this package. The factorized
    model itself is already an export of the low-rank form (``torch.save(model.state_dict())``).
    """
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, LowRankLayer):
            parent_name, _, attr = name.rpartition(".")
            setattr(dense.get_submodule(parent_name), attr, module.to_dense())
        elif parametrize.is_parametrized(module):
            # deepcopy shares the dynamically made Parametrized* class with the original, and
            # remove_parametrizations deletes the tensor's property from that class: give the copy
            # a class of its own first, or the original model loses its weight.
            shared = type(module)
            module.__class__ = type(shared.__name__, shared.__bases__, dict(shared.__dict__))
            for tensor_name in list(module.parametrizations.keys()):
                if isinstance(module.parametrizations[tensor_name][0], LowRankWeight):
                    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return dense
