"""The trust rule for results folders: a folder is data, so what it names runs only when it is trusted.

A sweep's ``sweep.yaml`` may name user code by import path (``model.name: "my_models:build"``);
``retrain``, ``compare`` and ``report`` rebuild trial configs from it, and retraining imports and
calls what they name. A folder from elsewhere (a copy a colleague sent, an archive, a folder
someone else can write) could name ``"os:system"`` instead. So a folder that names user code is
used only when

* this user's oialr-tune wrote it: its ``signature.json`` carries this user's HMAC (the key lives
  outside every folder, see :mod:`oialr_tune.sweep_state`) and ``sweep.yaml`` is the config signed,
  the same check ``sweep --resume`` makes; or
* the caller says so: ``--trust-code`` (``trust_code=True``), the convention of Hugging Face's
  ``trust_remote_code``.

A folder of built-in parts only (catalogue models, ``torchvision:``/``timm:`` names, the packaged
datasets) runs no user code and is always used. Model files follow the same rule
(:func:`oialr_tune.model_io.load_model`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from oialr_tune import plugins
from oialr_tune.errors import UserError
from oialr_tune.space import ARMS
from oialr_tune.sweep_state import SWEEP_FILE, verify_folder

__all__ = ["check_folder", "code_names"]


def code_names(data: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, name) of every string in `data` shaped like an import path ``package.module:attr``.

    Every string, wherever it sits (base config, searched choices, arms): a reader that misses a
    place where code is named would let that place through.
    """
    if isinstance(data, dict):
        for k, v in data.items():
            yield from code_names(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from code_names(v, f"{prefix}[{i}]")
    elif isinstance(data, str) and plugins.is_import_path(data):
        module, _, attr = data.partition(":")
        if all(p.isidentifier() for p in [*module.split("."), *attr.split(".")]):
            yield prefix, data


def check_folder(path: str | Path, trust_code: bool, command: str) -> None:
    """UserError (one line) when the sweep folder `path` names user code and is not trusted (module doc).

    Reads only ``sweep.yaml`` and ``signature.json`` (YAML and JSON): nothing is imported or run.
    """
    path = Path(path)
    try:
        data = yaml.safe_load((path / SWEEP_FILE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path / SWEEP_FILE}: unreadable ({type(e).__name__})") from None
    named = next(code_names(data), None)
    if named is None or trust_code:
        return
    try:
        verify_folder(path, data, ARMS)  # the signature check `sweep --resume` makes
    except UserError as e:
        key, name = named
        raise UserError(
            f"{path}: its {SWEEP_FILE} names user code ({key}: {name!r:.80}) and the folder is not trusted "
            f"({_why(str(e))}); {command} runs a folder's code only with --trust-code"
        ) from None


def _why(message: str) -> str:
    """The reason in a signature refusal, without its advice about --resume."""
    return message.split(";")[0].split(": ", 1)[-1]
