"""oialr-tune: hyperparameter search for OIALR low-rank training with Ray Tune and Optuna.

The OIALR method (``oialr_tune.oialr``) is plain PyTorch; importing this package imports neither
torch, Ray nor Optuna: each name below is loaded on first use, so the command line reads a config,
a results folder or an error message without paying for imports it does not need.
"""

from typing import Any

__all__ = ["OIALR", "SweepResults", "best_trial", "export_dense", "load_space", "open_results", "sweep"]
__version__ = "0.1.0"

# name -> module that defines it, imported on first access.
_LAZY = {
    "OIALR": "oialr",
    "export_dense": "oialr",
    "sweep": "tuning",
    "SweepResults": "results",
    "open_results": "results",
    "best_trial": "results",
    "load_space": "space",
}


def __getattr__(name: str) -> Any:
    import importlib.util

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    # The documented submodules (`oialr_tune.results.best_trial(...)`, ...) after a bare
    # `import oialr_tune`; importing one also binds it here, so this runs once per name.
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
