"""OIALR as a plain-PyTorch library (no Ray, no Optuna): drop it into any training loop.

    controller = OIALR(model, optimizer, delay=1000, stability_frequency=100)
    ...
    optimizer.step()
    controller.step()
"""

from .controller import (
    OIALR,
    PRESETS,
    RankEvent,
    Rules,
    apply_low_rank_structure,
    count_trainable,
    low_rank_structure,
)
from .export import export_dense
from .full_rank import FullRank
from .lowrank import LowRankLayer, LowRankWeight, factorized_is_cheaper

__all__ = [
    "OIALR",
    "PRESETS",
    "FullRank",
    "LowRankLayer",
    "LowRankWeight",
    "RankEvent",
    "Rules",
    "apply_low_rank_structure",
    "count_trainable",
    "export_dense",
    "factorized_is_cheaper",
    "low_rank_structure",
]
