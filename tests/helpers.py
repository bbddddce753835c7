"""Test-only helpers that reach into the package: kept here, not in the package, because no user needs them."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from torch import nn

from oialr_tune import data
from oialr_tune.sweep_state import JOURNAL_TEMPLATE
from oialr_tune.tasks import Task

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "custom"


def custom_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, on_path: bool = True,
                    written: tuple[str, ...] = ()) -> Path:
    """A copy of examples/custom as the working directory, first on sys.path if `on_path` (else only
    where `oialr_tune.plugins` puts the working directory, as for a user's run).

    Its modules, and the ones a test `written` into it, are forgotten first, so each test imports the
    copy's, not an earlier test's copy. sys.path is restored after the test."""
    folder = tmp_path / "custom"
    shutil.copytree(EXAMPLES, folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [str(folder), *sys.path] if on_path else list(sys.path))
    for name in (*(module.stem for module in EXAMPLES.glob("*.py")), *written):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return folder


def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a classifier over `loader` (the classification task's evaluation)."""
    metrics = Task().evaluate(model, loader)
    return metrics["val_loss"], metrics["val_acc"]


def journal_path(root: Path, arm: str) -> Path:
    """The journal of `arm` in the sweep folder `root`."""
    return root / JOURNAL_TEMPLATE.format(arm=arm)


def clear_data_cache() -> None:
    """Forget every dataset `oialr_tune.data.load_data` cached in this process."""
    data._CACHE.clear()
