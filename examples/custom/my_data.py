"""Data functions outside the package: what `data.name: "my_data:breast_cancer"` names.

oialr-tune calls them with ``data.args`` as keyword arguments. Each returns ``(train, val, test)``
torch Datasets of ``(input_tensor, target)``; here val is None, so oialr-tune carves it from train
with ``data.split_seed`` (the same examples for every trial). Both datasets ship inside
scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, y_dtype: torch.dtype):
    """A fixed train/test split, features standardised with the training part's statistics."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = round(test_fraction * len(x))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-8
    x = ((x - mean) / std).astype(np.float32)

    def part(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x[idx]), torch.as_tensor(y[idx], dtype=y_dtype))

    return part(train), None, part(test)


def breast_cancer(test_fraction: float = 0.2, seed: int = 0):
    """569 tumours, 30 features, 2 classes (classification: integer labels)."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    return _split(x, y, test_fraction, seed, torch.long)


def diabetes(test_fraction: float = 0.2, seed: int = 0):
    """442 patients, 10 features, disease progression after a year (regression: a standardised float)."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    y = (y - y.mean()) / y.std()
    return _split(x, y, test_fraction, seed, torch.float32)
