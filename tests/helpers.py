"""Test-only helpers that reach into the package: kept here, not in the package, because no user needs them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from oialr_tune import data
from oialr_tune.sweep_state import JOURNAL_TEMPLATE
from oialr_tune.tasks import Task


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
