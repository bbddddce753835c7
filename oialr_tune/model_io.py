"""Save and load a trained model as one self-describing file, loadable with only torch and this package.

A model file is a ``torch.save`` of plain data (so ``torch.load(..., weights_only=True)`` reads it):

* ``spec``: what :func:`oialr_tune.models.build_model` needs (model name and args, input shape
  (C, H, W), number of classes), and the rank of every low-rank layer (empty for a dense export);
* ``state_dict``: the weights (low-rank layers as their U, S, Vᵀ factors, or folded to dense);
* ``config``: the full trainer config the model was trained with (for the record, and to retrain);
* ``meta``: free-form extras, e.g. the input normalisation and the test metrics.

Loading rebuilds the architecture by name, gives the low-rank layers their saved ranks, then
loads the weights strictly, so the loaded model computes exactly what was saved.

This module must stay importable without Ray or Optuna (a deployed model needs neither): it
imports only torch, numpy and the model registry and OIALR layers of this package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oialr_tune.files import write_atomic
from oialr_tune.models import build_model
from oialr_tune.oialr import apply_low_rank_structure, export_dense, low_rank_structure
from oialr_tune.safe_load import allowed_globals

__all__ = ["FORMAT", "ModelFile", "load_model", "read_model_file", "save_model"]

FORMAT = "oialr-tune-model/1"
# The format of `oialr_tune.trainer`'s checkpoints, which `load_model` reads too; kept here so that
# this module need not import the trainer (and its data code).
TRAINER_CHECKPOINT_FORMAT = 1


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
    """Read a model file, or a trainer checkpoint, without building the model (safe: ``weights_only=True``).

    A checkpoint of the built-in trainer (``checkpoint.pt``, see :mod:`oialr_tune.trainer`) is read
    as the model file of its model at that epoch: its config names the architecture, its OIALR
    controller state the ranks, and ``meta`` holds the epoch.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):  # a user loop's checkpoint may hold numpy arrays
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such model file") from None
    if _is_checkpoint(payload):
        return _checkpoint_model_file(payload, path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an oialr-tune model file (expected format {FORMAT!r})")
    spec = payload["spec"]
    return ModelFile(
        model_name=spec["model_name"],
        model_args=dict(spec["model_args"]),
        in_shape=tuple(spec["in_shape"]),
        num_classes=int(spec["num_classes"]),
        ranks=dict(spec["ranks"]),
        dense=bool(spec["dense"]),
        state_dict=payload["state_dict"],
        config=payload.get("config", {}),
        meta=payload.get("meta", {}),
    )


def _is_checkpoint(payload: Any) -> bool:
    """Whether `payload` is a trainer checkpoint (its format, with its config and history)."""
    return (isinstance(payload, dict) and payload.get("format") == TRAINER_CHECKPOINT_FORMAT
            and {"config", "history"} <= payload.keys())


def _checkpoint_model_file(state: dict[str, Any], path: Path) -> ModelFile:
    """The model in a trainer checkpoint, as a `ModelFile` (a user loop's checkpoint holds none)."""
    if "model" not in state or "in_shape" not in state:
        raise ValueError(f"{path}: a checkpoint of a user's training loop (trainable): it holds no model to load")
    model_cfg = state["config"]["model"]
    ranks = dict((state.get("controller") or {}).get("ranks") or {})
    return ModelFile(
        model_name=model_cfg["name"],
        model_args=dict(model_cfg.get("args") or {}),
        in_shape=tuple(state["in_shape"]),
        num_classes=int(state["num_classes"]),
        ranks=ranks,
        dense=not ranks,
        state_dict=state["model"],
        config=state["config"],
        meta={"epoch": state["epoch"]},
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the saved model exactly (low-rank layers included), in eval mode, on ``device``.

    `path` is a model file (`save_model`) or a checkpoint of the built-in trainer (``checkpoint.pt``).
    Needs only torch and this package (no Ray, no Optuna). Raises ``FileNotFoundError`` for a
    missing file, ``ValueError`` for a file that is neither, and ``RuntimeError`` when the weights
    do not fit the architecture the file names.
    """
    mf = read_model_file(path)
    model = build_model(mf.model_name, mf.in_shape, mf.num_classes, **mf.model_args)
    if mf.ranks:
        apply_low_rank_structure(model, mf.ranks)
    model.load_state_dict(mf.state_dict, strict=True)
    return model.to(device).eval()
