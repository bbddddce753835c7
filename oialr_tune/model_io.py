"""Save and load a trained model as one self-describing file, loadable with only torch and this package.

A model file is a ``torch.save`` of plain data (so ``torch.load(..., weights_only=True)`` reads it):

* ``spec``: what :func:`oialr_tune.models.build_model` needs (model name and args, input shape
  (C, H, W), number of classes), and the rank of every low-rank layer (empty for a dense export);
* ``state_dict``: the weights (low-rank layers as their U, S, Vᵀ factors, or folded to dense);
* ``config``: the full trainer config the model was trained with (for the record, and to retrain);
* ``meta``: free-form extras, e.g. the input normalisation and the test metrics.

Loading rebuilds the architecture by name, gives the low-rank layers their saved ranks, then
loads the weights strictly, so the loaded model computes exactly what was saved.

**A model file is data** (the rule of Hugging Face's ``trust_remote_code``): loading one builds only
a built-in model, a ``torchvision:``/``timm:`` registry name, or a builder the caller passes; a file
that names user code by import path (``"my_models:build"``, or ``"subprocess:run"`` in a crafted
file) is refused unless the caller says ``trust_code=True``. Every value read from the file is
type-checked before use, so a crafted file is one ``ValueError`` line, never a call.

This module must stay importable without Ray or Optuna (a deployed model needs neither): it
imports only torch, numpy and the model registry, OIALR layers and run record (the checkpoint
format) of this package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oialr_tune import plugins
from oialr_tune.errors import UserError, one_line
from oialr_tune.files import write_atomic
from oialr_tune.models import MODELS, build_model
from oialr_tune.oialr import apply_low_rank_structure, export_dense, low_rank_structure
from oialr_tune.run_record import CHECKPOINT_FORMAT
from oialr_tune.safe_load import unpickle

__all__ = ["FORMAT", "ModelFile", "check_trusted_model", "load_model", "read_model_file", "save_model"]

FORMAT = "oialr-tune-model/1"


@dataclass
class ModelFile:
    """The parsed contents of a model file (see the module docstring)."""

    model_name: str
    model_args: dict[str, Any]
    in_shape: tuple[int, ...]
    num_classes: int
    ranks: dict[str, int]
    dense: bool
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    """Only the types ``torch.load(weights_only=True)`` accepts: numpy scalars and arrays become Python/tensors."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Path):
        return str(value)
    return value


def save_model(
    path: str | Path,
    model: nn.Module,
    cfg_dict: Mapping[str, Any],
    *,
    dense: bool = False,
    in_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and how to rebuild it) to ``path``; returns the path.

    Args:
        path: the file to write (parent folders are created).
        model: a network built by ``build_model`` from ``cfg_dict['model']``, possibly made
            partly low-rank by the OIALR controller.
        cfg_dict: the trainer config as plain data (``train_config_to_dict``); its ``model.name``
            and ``model.args`` name the architecture.
        dense: fold every low-rank layer into a plain dense weight first (``export_dense``): the
            file then holds the architecture as built, loadable into ``build_model``'s output or
            any copy of it without this package's layers.
        in_shape, num_classes: the data's (C, H, W) and class count. When omitted they are read
            from the dataset that ``cfg_dict['data']`` describes (which loads it: pass them when
            you have them).
        meta: extra plain data to keep beside the weights (normalisation, metrics, seed, ...).
    """
    model_cfg = cfg_dict.get("model") or {}
    if "name" not in model_cfg:
        raise ValueError("save_model: cfg_dict has no model.name; pass the trainer config the model was built from")
    if in_shape is None or num_classes is None:
        in_shape, num_classes = _data_shapes(cfg_dict, in_shape, num_classes)
    if dense:
        model = export_dense(model)
    ranks = low_rank_structure(model)
    spec = {
        "model_name": str(model_cfg["name"]),
        "model_args": _plain(dict(model_cfg.get("args") or {})),
        "in_shape": [int(d) for d in in_shape],
        "num_classes": int(num_classes),
        "ranks": {k: int(v) for k, v in ranks.items()},
        "dense": bool(dense or not ranks),
    }
    payload = {
        "format": FORMAT,
        "spec": spec,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": _plain(dict(cfg_dict)),
        "meta": _plain(dict(meta or {})),
    }
    path = Path(path)
    write_atomic(path, lambda f: torch.save(payload, f))  # never leave a half-written model file behind
    return path


def _data_shapes(cfg_dict: Mapping[str, Any], in_shape: Sequence[int] | None, num_classes: int | None
                 ) -> tuple[Sequence[int], int]:
    """`in_shape` and `num_classes`, the missing ones read from the dataset ``cfg_dict['data']`` describes."""
    # Lazy: reading the data pulls in the dataset code, which a caller with the shapes never needs.
    from oialr_tune.config import train_config_from_dict
    from oialr_tune.data import load_data

    cfg = train_config_from_dict(dict(cfg_dict))
    splits = load_data(cfg.data)
    return (splits.in_shape if in_shape is None else in_shape,
            splits.num_outputs(cfg.task) if num_classes is None else num_classes)


def read_model_file(path: str | Path) -> ModelFile:
    """Read a model file, or a trainer checkpoint, without building the model.

    Safe on any file: ``torch.load(weights_only=True)`` unpickles only tensors and plain data, and
    every value is then type-checked (a ``ValueError`` naming the path and the key otherwise).
    Nothing the file names is imported or called here.

    A checkpoint of the built-in trainer (``checkpoint.pt``, see :mod:`oialr_tune.run_record`) is read
    as the model file of its model at that epoch: its config names the architecture, its OIALR
    controller state the ranks, and ``meta`` holds the epoch.
    """
    path = Path(path)
    try:
        payload = unpickle(path)  # the allow-list: a user loop's checkpoint may hold numpy arrays
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such model file") from None
    except Exception as e:  # a crafted pickle weights_only refuses, a truncated file
        raise ValueError(f"{path}: not an oialr-tune model file ({one_line(e)})") from None
    if _is_checkpoint(payload):
        return _checkpoint_model_file(payload, path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an oialr-tune model file (expected format {FORMAT!r})")
    spec = _typed(payload, "spec", dict, path)
    dense = _typed(spec, "dense", bool, path, "spec.")
    return ModelFile(
        model_name=_typed(spec, "model_name", str, path, "spec."),
        model_args=_plain_data(_typed(spec, "model_args", dict, path, "spec."), path, "spec.model_args"),
        in_shape=_in_shape(spec.get("in_shape"), path, "spec.in_shape"),
        num_classes=_count(spec.get("num_classes"), path, "spec.num_classes"),
        ranks=_ranks(spec.get("ranks"), path, "spec.ranks"),
        dense=dense,
        state_dict=_tensors(payload.get("state_dict"), path, "state_dict"),
        config=_plain_data(payload.get("config", {}), path, "config"),
        meta=_plain_data(payload.get("meta", {}), path, "meta"),
    )


# --- type checks of what a file holds: a crafted file is one ValueError line, never a call ---------


def _typed(data: Mapping[str, Any], key: str, kind: type, path: Path, prefix: str = "") -> Any:
    """``data[key]``, which must be a `kind` (a bool is not an int here)."""
    value = data.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{path}: {prefix}{key} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _count(value: Any, path: Path, key: str) -> int:
    """A positive int (a size, a class count)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{path}: {key} must be a positive int, got {value!r:.60}")
    return value


def _in_shape(value: Any, path: Path, key: str) -> tuple[int, ...]:
    """A non-empty list of positive ints."""
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in value):
        raise ValueError(f"{path}: {key} must be a list of positive ints, got {value!r:.60}")
    return tuple(value)


def _ranks(value: Any, path: Path, key: str) -> dict[str, int]:
    """Layer name -> positive rank."""
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {key} must be a dict of layer -> rank, got {type(value).__name__}")
    if not all(isinstance(k, str) for k in value):
        raise ValueError(f"{path}: {key} must be keyed by layer names (strings)")
    return {k: _count(v, path, f"{key}.{k}") for k, v in value.items()}


def _tensors(value: Any, path: Path, key: str) -> dict[str, torch.Tensor]:
    """Parameter name -> tensor."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in value.items()):
        raise ValueError(f"{path}: {key} must map names to tensors")
    return value


_PLAIN = (str, int, float, bool, type(None))


def _plain_data(value: Any, path: Path, key: str) -> Any:
    """`value` if it is plain data (str, numbers, bool, None, tensors, and lists and str-keyed dicts of them)."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _plain_data(v, path, f"{key}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path}: {key} has a non-string key {k!r:.60}")
            _plain_data(v, path, f"{key}.{k}")
    elif not isinstance(value, (*_PLAIN, torch.Tensor)):
        raise ValueError(f"{path}: {key} must be plain data, got {type(value).__name__}")
    return value


def _is_checkpoint(payload: Any) -> bool:
    """Whether `payload` is a trainer checkpoint (its format, with its config and history)."""
    return (isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT
            and {"config", "history"} <= payload.keys())


def _checkpoint_model_file(state: dict[str, Any], path: Path) -> ModelFile:
    """The model in a trainer checkpoint, as a `ModelFile` (a user loop's checkpoint holds none)."""
    if "model" not in state or "in_shape" not in state:
        raise ValueError(f"{path}: a checkpoint of a user's training loop (trainable): it holds no model to load")
    config = _plain_data(_typed(state, "config", dict, path), path, "config")
    model_cfg = _typed(config, "model", dict, path, "config.")
    controller = state.get("controller") or {}
    if not isinstance(controller, dict):
        raise ValueError(f"{path}: controller must be a dict, got {type(controller).__name__}")
    ranks = _ranks(controller.get("ranks") or {}, path, "controller.ranks")
    return ModelFile(
        model_name=_typed(model_cfg, "name", str, path, "config.model."),
        model_args=_plain_data(model_cfg.get("args") or {}, path, "config.model.args"),
        in_shape=_in_shape(state["in_shape"], path, "in_shape"),
        num_classes=_count(state.get("num_classes"), path, "num_classes"),
        ranks=ranks,
        dense=not ranks,
        state_dict=_tensors(state["model"], path, "model"),
        config=config,
        meta={"epoch": _typed(state, "epoch", int, path)},
    )


def load_model(path: str | Path, device: str | torch.device = "cpu", *,
               builder: Callable[..., nn.Module] | None = None, trust_code: bool = False) -> nn.Module:
    """Rebuild the saved model exactly (low-rank layers included), in eval mode, on ``device``.

    `path` is a model file (`save_model`) or a checkpoint of the built-in trainer (``checkpoint.pt``).
    Needs only torch and this package (no Ray, no Optuna).

    The file is data (see the module docstring): the architecture is built by `builder` when given
    (called as ``builder(in_shape, num_classes, **model_args)``, like the built-in builders), else
    by name, which must be a built-in model, a ``torchvision:``/``timm:`` name, or a callable this
    process registered (`oialr_tune.plugins.register`). A file naming any other import path is
    refused (UserError, one line) unless `trust_code` is True: then the named code is imported and
    run, so pass it only for files you made or trust.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for a file that is neither or
    holds values of the wrong type, UserError for user code not trusted, and ``RuntimeError``
    when the weights do not fit the architecture.
    """
    mf = read_model_file(path)
    if builder is not None:
        name = plugins.name_of(builder)
        model = plugins.call(builder, name, "model.name", mf.in_shape, mf.num_classes, **mf.model_args)
        if not isinstance(model, nn.Module):
            raise UserError(f"model.name: {name} returned a {type(model).__name__}, not a torch.nn.Module")
    else:
        check_trusted_model(mf.model_name, path, trust_code)
        # The file's weights replace any a zoo model started from: no need for them in the local cache.
        zoo = mf.model_name.startswith(plugins.ZOO_PREFIXES)
        args = {k: v for k, v in mf.model_args.items() if not (zoo and k == "pretrained")}
        model = build_model(mf.model_name, mf.in_shape, mf.num_classes, **args)
    if mf.ranks:
        apply_low_rank_structure(model, mf.ranks)
    model.load_state_dict(mf.state_dict, strict=True)
    return model.to(device).eval()


def check_trusted_model(name: str, path: str | Path, trust_code: bool) -> None:
    """UserError (one line) unless `name` may be built from a file: see :func:`load_model`."""
    if trust_code or name in MODELS or name.startswith(plugins.ZOO_PREFIXES) or plugins.is_registered(name):
        return
    raise UserError(
        f"{path}: names model {name!r:.80}, which is not a built-in or torchvision:/timm: model; a model file is "
        f"data, so its code is not run: pass builder= (or trust_code=True / --trust-code if you trust the file)"
    )
