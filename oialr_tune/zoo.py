"""Models from the zoos users already use: ``"torchvision:<name>"`` and ``"timm:<name>"``.

Random weights and the data's number of outputs, or with ``model.args.pretrained: true`` the zoo's
published weights, taken only from the local cache: torch hub's (``$TORCH_HOME/hub/checkpoints``,
torchvision and timm's URL weights) or the Hugging Face hub's (timm's ``timm/...`` repositories).
Nothing is ever downloaded: a missing file is one line saying which file to put where. The output
layer is re-initialised when the data's outputs differ from the zoo's (fine-tuning); every other
weight must fit. Zoo models take RGB images; other channel counts are adapted in front of the model
(see `adapt_channels`), so the same name works on MNIST and on CIFAR.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from oialr_tune import safe_load
from oialr_tune.errors import UserError

_WHERE = "model.args.pretrained"


class Gray2RGB(nn.Module):
    """(N, 1, H, W) -> (N, 3, H, W) as a view: no parameters, so nothing to train or to save."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


def adapt_channels(model: nn.Module, channels: int) -> nn.Module:
    """`model` itself for RGB; grayscale repeated to 3 channels; other counts through a 1×1 conv."""
    if channels == 3:
        return model
    return nn.Sequential(Gray2RGB() if channels == 1 else nn.Conv2d(channels, 3, 1), model)


def torchvision_model(arch: str, in_shape: tuple[int, ...], num_classes: int, pretrained: bool = False,
                      **args: Any) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=None, num_classes=...)``, then with `pretrained`
    the default weights of `arch` from torch hub's cache (its output layer left new where the
    number of outputs differs).

    A ViT is built at the data's image size unless `args` give ``image_size`` (torchvision's ViTs
    default to 224 and refuse any other input).
    """
    from torchvision.models import get_model, get_model_weights, list_models

    _check_flag(pretrained)
    if arch not in list_models():
        raise UserError(f"model.name: torchvision has no model {arch!r} (see torchvision.models.list_models())")
    if arch.startswith("vit_") and "image_size" not in args:
        args = {**args, "image_size": in_shape[-1]}
    model = get_model(arch, weights=None, num_classes=num_classes, **args)
    if pretrained:
        file = _torch_hub_file(get_model_weights(arch).DEFAULT.url, f"torchvision {arch}")
        _load_except_head(model, file, f"torchvision {arch}")
    return adapt_channels(model, in_shape[0])


def _check_flag(pretrained: Any) -> None:
    if not isinstance(pretrained, bool):
        raise UserError(f"{_WHERE}: expected true or false, got {pretrained!r}")


def _load_except_head(model: nn.Module, file: Path, what: str) -> None:
    """Load the state dict in `file` into `model`; only the output layer (the last module with
    parameters) may differ in shape, and keeps its new initialisation then."""
    try:
        state = safe_load.load(file)
    except UserError as e:
        raise UserError(f"{_WHERE}: {e}") from None
    own = model.state_dict()
    head = [name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None][-1]
    differs = {k for k in own if k in state and state[k].shape != own[k].shape}
    missing = [k for k in own if k not in state]
    wrong = sorted(k for k in differs if k.rpartition(".")[0] != head)
    if missing or wrong:
        raise UserError(f"{_WHERE}: {file} does not fit {what}: {', '.join((missing + wrong)[:3])}")
    model.load_state_dict({k: v for k, v in state.items() if k not in differs}, strict=False)


def timm_model(arch: str, in_shape: tuple[int, ...], num_classes: int, pretrained: bool = False,
               **args: Any) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes=..., in_chans=C, **args)``; with
    `pretrained`, timm loads its weights from the cached file `_timm_cached_file` finds (timm drops
    the classifier where the number of outputs differs and adapts the input channels).

    timm adapts the input channels itself; `args` go to the model (a ViT on 28×28 MNIST needs
    e.g. ``img_size: 28, patch_size: 4``).
    """
    try:
        import timm
    except ImportError:
        raise UserError(f"model.name: 'timm:{arch}' needs timm: pip install 'oialr-tune[timm]'") from None
    _check_flag(pretrained)
    if not timm.is_model(arch):
        raise UserError(f"model.name: timm has no model {arch!r} (see timm.list_models())")
    if not pretrained:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_shape[0], **args)
    overlay = {"file": str(_timm_cached_file(arch)), "source": "", "state_dict": None}
    with _offline():
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                                 in_chans=in_shape[0], **args)


def _timm_cached_file(arch: str) -> Path:
    """The local file of timm `arch`'s default weights: in the Hugging Face hub's cache for a
    ``hf_hub_id``, else in torch hub's for a URL. A UserError saying where to put it when absent."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UserError(f"{_WHERE}: timm has no published weights for {arch!r}")
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache  # reads the cache folder only

        for name in ("model.safetensors", "pytorch_model.bin"):  # what timm itself looks for, in its order
            found = try_to_load_from_cache(cfg.hf_hub_id, name)
            if isinstance(found, str):
                return Path(found)
        raise UserError(f"{_WHERE}: timm {arch}'s weights are not in the local Hugging Face cache and are never "
                        f"downloaded: fetch model.safetensors of {cfg.hf_hub_id} where there is network (e.g. "
                        f"huggingface-cli download {cfg.hf_hub_id}) and copy the cache (HF_HUB_CACHE) here")
    return _torch_hub_file(cfg.url, f"timm {arch}")


def _torch_hub_file(url: str, what: str) -> Path:
    """Where torch hub caches the weights at `url` (``$TORCH_HOME/hub/checkpoints``); a UserError
    saying which file to put where when it is not there (it is never downloaded)."""
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not file.is_file():
        raise UserError(f"{_WHERE}: {what}'s weights are not in the local cache and are never "
                        f"downloaded: put {file.name} (from {url}) in {file.parent}")  # fmt: skip
    return file


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The Hugging Face hub's offline switch on while timm builds: should anything still ask the hub,
    it gets a local answer or an error, never a download."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
