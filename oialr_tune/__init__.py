"""oialr-tune: hyperparameter search for OIALR low-rank training with Ray Tune and Optuna.

The OIALR method (``oialr_tune.oialr``) is plain PyTorch; importing this package does not import
Ray or Optuna. The tuning API is loaded on first use.
"""

from .oialr import OIALR, export_dense

__all__ = ["OIALR", "export_dense"]
__version__ = "0.1.0"
