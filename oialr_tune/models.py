"""Model registry: networks built by name, so a YAML file can name them.

`build_model(name, in_shape, num_classes, **args)` looks the name up in `MODELS`. Each builder's
keyword arguments (after `in_shape` and `num_classes`) are the model's `args` in the config; their
type hints are what `check_model_args` validates against, so adding a builder needs no other change.

Besides the catalogue, `name` may be a user's builder by import path (``"my_models:build"``, called
like the built-in builders, see `oialr_tune.plugins`), ``"torchvision:<name>"`` (any model of
``torchvision.models.get_model``) or ``"timm:<name>"`` (``timm.create_model``, extra
``oialr-tune[timm]``), with `num_classes` outputs. Their `args` go to the builder unchecked here:
`oialr_tune.checks` builds the model once before a sweep starts instead.

Any of them may start from a local state dict (``model.weights``, `load_weights`); zoo models also
from their published weights (``model.args.pretrained: true``, `oialr_tune.zoo`), but only from the
local cache. Nothing is ever downloaded.

All layers that OIALR should factorize are plain nn.Linear / nn.Conv2d (or torchvision's
nn.MultiheadAttention in `vit_b16`).

torch is imported inside the builders, not at module level: validating a config (which checks
`model.args` here) stays cheap for the sweep driver and the command line, which never build a model.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oialr_tune import plugins
from oialr_tune.errors import UserError
from oialr_tune.schema import InShape, convert_value

if TYPE_CHECKING:
    from torch import nn

# --- MLP and small CNN -------------------------------------------------------------------------


def mlp(
    in_shape: InShape, num_classes: int, hidden: tuple[int, ...] = (256, 256), dropout: float = 0.0
) -> nn.Module:
    """Flatten, then Linear + ReLU (+ dropout) per entry of `hidden`, then a Linear classifier."""
    from torch import nn

    layers: list[nn.Module] = [nn.Flatten()]
    width = 1
    for d in in_shape:
        width *= d
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(
    in_shape: InShape,
    num_classes: int,
    channels: tuple[int, ...] = (32, 64),
    hidden: int = 128,
    dropout: float = 0.0,
) -> nn.Module:
    """Conv3×3 + BN + ReLU + 2×2 max-pool per entry of `channels`, then Linear + ReLU + Linear.

    The feature map is average-pooled to at most 4×4 before the Linear layers so the first of
    them stays small on 32×32 inputs.
    """
    from torch import nn

    c, h, w = in_shape
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    side_h, side_w = min(h, 4), min(w, 4)
    layers += [nn.AdaptiveAvgPool2d((side_h, side_w)), nn.Flatten(), nn.Linear(c * side_h * side_w, hidden)]
    layers.append(nn.ReLU(inplace=True))
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


# --- ResNets (torchvision) ----------------------------------------------------------------------


def _resnet(factory: Callable[..., nn.Module], in_shape: InShape, num_classes: int, cifar_stem: bool | None):
    from torch import nn

    model = factory(weights=None, num_classes=num_classes)
    channels, h, w = in_shape
    if cifar_stem is None:  # small images lose too much to a 7×7/2 conv and a max-pool
        cifar_stem = min(h, w) <= 64
    if cifar_stem:
        model.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def resnet18(in_shape: InShape, num_classes: int, cifar_stem: bool | None = None) -> nn.Module:
    """torchvision ResNet-18, random init. `cifar_stem` (default: images ≤ 64 px): 3×3/1 conv1, no max-pool."""
    from torchvision.models import resnet18 as factory

    return _resnet(factory, in_shape, num_classes, cifar_stem)


def resnet50(in_shape: InShape, num_classes: int, cifar_stem: bool | None = None) -> nn.Module:
    """torchvision ResNet-50, random init; `cifar_stem` as for `resnet18`."""
    from torchvision.models import resnet50 as factory

    return _resnet(factory, in_shape, num_classes, cifar_stem)


# --- a small ViT for small images (the network itself is in oialr_tune/vit.py) ----------------


def vit_small(
    in_shape: InShape,
    num_classes: int,
    patch_size: int = 4,
    dim: int = 192,
    depth: int = 6,
    heads: int = 3,
    mlp_ratio: float = 4.0,
    dropout: float = 0.0,
) -> nn.Module:
    """A small ViT for CIFAR-size images (ViT-Tiny width by default, patch 4 → 64 tokens on 32×32)."""
    from oialr_tune.vit import ViT  # imports torch: only when a ViT is built (see the module docstring)

    _, h, w = in_shape
    if h % patch_size or w % patch_size:
        raise UserError(f"model.args.patch_size: {patch_size} does not divide the {h}x{w} images")
    if dim % heads:
        raise UserError(f"model.args.heads: {heads} does not divide dim {dim}")
    return ViT(in_shape, num_classes, patch_size, dim, depth, heads, mlp_ratio, dropout)


def vit_b16(in_shape: InShape, num_classes: int, dropout: float = 0.0, attention_dropout: float = 0.0) -> nn.Module:
    """torchvision ViT-B/16 (random init) at the data's image size, which must be square and a multiple of 16."""
    from torch import nn
    from torchvision.models import vit_b_16

    c, h, w = in_shape
    if h != w or h % 16:
        raise UserError(f"model.name: vit_b16 needs square images with a side divisible by 16, got {h}x{w}")
    model = vit_b_16(weights=None, image_size=h, num_classes=num_classes, dropout=dropout,
                     attention_dropout=attention_dropout)
    if c != 3:
        model.conv_proj = nn.Conv2d(c, model.hidden_dim, 16, stride=16)
    return model


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vit_small": vit_small,
    "vit_b16": vit_b16,
}


def _builder(name: str) -> Callable[..., nn.Module]:
    if name in MODELS:
        return MODELS[name]
    if name.startswith(plugins.ZOO_PREFIXES):
        from oialr_tune import zoo  # imports torch: only when a zoo model is built or checked

        family, _, arch = name.partition(":")
        return functools.partial(zoo.torchvision_model if family == "torchvision" else zoo.timm_model, arch)
    if plugins.is_import_path(name):
        return plugins.resolve(name, "model.name")
    raise UserError(
        f"model.name: unknown model {name!r} (known: {', '.join(MODELS)}, 'torchvision:<name>', 'timm:<name>' "
        f"or an import path 'package.module:function')"
    )


def check_model_name(name: str) -> None:
    """A catalogue name, a zoo name or a well-formed import path; imports nothing (config validation)."""
    if name in MODELS or (name.startswith(plugins.ZOO_PREFIXES) and name.partition(":")[2]):
        return
    if plugins.is_import_path(name):
        plugins.check_syntax(name, "model.name")
        return
    _builder(name)  # raises the unknown-model error


def check_model_args(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Validate `model.args` against the builder's signature; returns them converted to their types.

    Raises UserError naming ``model.args.X`` for an unknown argument, a wrong type or a bad value.
    Arguments of zoo and import-path models are the user's builder's business: returned as given.
    """
    check_model_name(name)
    if name not in MODELS:
        return dict(args)
    builder = _builder(name)
    params = list(inspect.signature(builder).parameters)[2:]  # after in_shape, num_classes
    # The argument types only: the return annotation (nn.Module) would need torch.
    arguments = {k: v for k, v in builder.__annotations__.items() if k != "return"}
    hints = typing.get_type_hints(types.SimpleNamespace(__annotations__=arguments), globalns=globals())
    out = {}
    for key, value in args.items():
        where = f"model.args.{key}"
        if key not in params:
            raise UserError(f"{where}: unknown argument for model {name!r} (known: {', '.join(params)})")
        value = convert_value(value, hints[key], where)
        sizes = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in sizes):
            raise UserError(f"{where}: sizes must be >= 1, got {value!r}")
        if "dropout" in key and not 0 <= value < 1:
            raise UserError(f"{where}: must be in [0, 1), got {value!r}")
        if key == "mlp_ratio" and value <= 0:
            raise UserError(f"{where}: must be > 0, got {value!r}")
        out[key] = value
    return out


def build_model(name: str, in_shape: InShape, num_classes: int, *, weights: str | None = None,
                **args: Any) -> nn.Module:
    """Build model `name` for inputs of shape `in_shape` (C, H, W, or any example shape for an
    import-path model) and `num_classes` outputs (classes, or the target width of a regression),
    starting from the state dict in the file `weights` when given (``model.weights``, `load_weights`).

    A user's or a zoo's builder that raises, or returns something that is not an ``nn.Module``,
    is a UserError naming ``model.name``.
    """
    from torch import nn

    args = check_model_args(name, args)
    builder = _builder(name)
    if name in MODELS:
        model = builder(tuple(in_shape), num_classes, **args)
    else:
        model = plugins.call(builder, name, "model.name", tuple(in_shape), num_classes, **args)
    if not isinstance(model, nn.Module):
        raise UserError(f"model.name: {name} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights, name)
    return model


def load_weights(model: nn.Module, path: str, name: str, key: str = "model.weights") -> None:
    """Fill `model` (model `name`) with the state dict saved at `path`: fine-tuning from it.

    The file is ``torch.save(model.state_dict(), path)``, or a checkpoint holding the state dict
    under ``model`` or ``state_dict`` (the trainer's checkpoints do), read with an allow-list
    (`oialr_tune.safe_load`: tensors, plain data, numpy arrays; no arbitrary pickle). Every entry
    must fit: a missing, unexpected or differently shaped one is a UserError naming `key` and the
    first few, since a half-loaded network would train silently from a mix of both.
    """
    from oialr_tune import safe_load  # imports torch: only when weights are loaded

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{key}: {file} does not exist (a state dict saved with torch.save)")
    try:
        state = safe_load.load(file)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None
    if isinstance(state, Mapping) and not _is_state_dict(state):
        state = next((state[k] for k in ("model", "state_dict") if _is_state_dict(state.get(k))), state)
    if not _is_state_dict(state):
        raise UserError(f"{key}: {file} holds no state dict (a mapping of parameter names to tensors, "
                        f"or a checkpoint with one under 'model' or 'state_dict')")  # fmt: skip
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k} is {tuple(state[k].shape)}, the model's {tuple(own[k].shape)}"
                 for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]  # fmt: skip
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{key}: {file} does not fit model {name}: {'; '.join(problems[:3])}{more}")
    model.load_state_dict(state)


def _is_state_dict(value: Any) -> bool:
    """A non-empty mapping of names to tensors (what ``nn.Module.state_dict()`` gives)."""
    import torch

    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
