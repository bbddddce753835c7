"""A metric of your own: what `metrics: {f1: "my_metrics:f1"}` names.

oialr-tune calls it on a whole split's model outputs and targets and reports it as ``val_f1``
(``test_f1`` in a retrain); ``objective: {metric: val_f1, mode: max}`` tunes for it.
"""

from __future__ import annotations

import torch


def f1(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """F1 score of class 1 (binary classification: outputs are the two classes' logits)."""
    predicted = outputs.argmax(dim=1)
    true_pos = ((predicted == 1) & (targets == 1)).sum().item()
    false_pos = ((predicted == 1) & (targets != 1)).sum().item()
    false_neg = ((predicted != 1) & (targets == 1)).sum().item()
    return 2 * true_pos / max(2 * true_pos + false_pos + false_neg, 1)
