"""A model builder outside the package: what `model.name: "my_models:mlp"` names.

oialr-tune calls it as ``mlp(in_shape, num_outputs, **model.args)``: `in_shape` is one example's
shape (here ``(num_features,)``) and `num_outputs` the classes (classification) or the target width
(regression). Any ``torch.nn.Module`` will do; its Linear / Conv layers are what OIALR factorizes.
"""

from __future__ import annotations

import math

from torch import nn


def mlp(in_shape: tuple[int, ...], num_outputs: int, hidden: int = 128, depth: int = 2,
        dropout: float = 0.0) -> nn.Module:
    """`depth` hidden Linear + GELU layers of width `hidden` on flattened features."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(in_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
        width = hidden
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)
