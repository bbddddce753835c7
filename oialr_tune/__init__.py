"""oialr-tune: hyperparameter search for OIALR low-rank training with Ray Tune and Optuna.

The OIALR method (``oialr_tune.oialr``) is plain PyTorch; importing this package does not import
Ray or Optuna. The tuning API is loaded on first use.
"""

from typing import Any

from .oialr import OIALR, export_dense

__all__ = ["OIALR", "SweepResult", "export_dense", "load_space", "load_sweep", "sweep"]
__version__ = "0.1.0"

# name -> module that defines it; imported on first access so `import oialr_tune` stays torch-only.
_LAZY = {
    "sweep": "tune",
    "load_sweep": "tune",
    "SweepResult": "tune",
    "load_space": "space",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
