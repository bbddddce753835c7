"""Models from the zoos users already use: ``"torchvision:<name>"`` and ``"timm:<name>"``.

Always random weights (nothing is downloaded) and the data's number of outputs. Zoo models take
RGB images; other channel counts are adapted in front of the model (see `adapt_channels`), so the
same name works on MNIST and on CIFAR.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from oialr_tune.errors import UserError


class Gray2RGB(nn.Module):
    """(N, 1, H, W) -> (N, 3, H, W) as a view: no parameters, so nothing to train or to save."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


def adapt_channels(model: nn.Module, channels: int) -> nn.Module:
    """`model` itself for RGB; grayscale repeated to 3 channels; other counts through a 1×1 conv."""
    if channels == 3:
        return model
    return nn.Sequential(Gray2RGB() if channels == 1 else nn.Conv2d(channels, 3, 1), model)


def torchvision_model(arch: str, in_shape: tuple[int, ...], num_classes: int, **args: Any) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=None, num_classes=...)``.

    A ViT is built at the data's image size unless `args` give ``image_size`` (torchvision's ViTs
    default to 224 and refuse any other input).
    """
    from torchvision.models import get_model, list_models

    if arch not in list_models():
        raise UserError(f"model.name: torchvision has no model {arch!r} (see torchvision.models.list_models())")
    if arch.startswith("vit_") and "image_size" not in args:
        args = {**args, "image_size": in_shape[-1]}
    return adapt_channels(get_model(arch, weights=None, num_classes=num_classes, **args), in_shape[0])


def timm_model(arch: str, in_shape: tuple[int, ...], num_classes: int, **args: Any) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes=..., in_chans=C, **args)``.

    timm adapts the input channels itself; `args` go to the model (a ViT on 28×28 MNIST needs
    e.g. ``img_size: 28, patch_size: 4``).
    """
    try:
        import timm
    except ImportError:
        raise UserError(f"model.name: 'timm:{arch}' needs timm: pip install 'oialr-tune[timm]'") from None
    if not timm.is_model(arch):
        raise UserError(f"model.name: timm has no model {arch!r} (see timm.list_models())")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_shape[0], **args)
