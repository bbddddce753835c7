"""How an optimizer's state for a replaced tensor follows OIALR: the rules behind ``Rules.optimizer_state``.

See the controller's module docstring for the two rules (``"rotate"``, ours; ``"slice"``, the
authors'). The controller calls these when it swaps a dense weight for S, and at every check.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["TRANSFORMABLE_STATE", "StateCarry", "state_at_check", "state_at_factorization"]

# The state entries the rules can carry (SGD, Adam, AdamW, RAdam); any other state is reset.
TRANSFORMABLE_STATE = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"}
_SECOND_MOMENTS = {"exp_avg_sq", "max_exp_avg_sq"}
# Maps one optimizer-state entry (its key and matrix) of the replaced tensor to the new tensor's.
StateCarry = Callable[[str, torch.Tensor], torch.Tensor]


def state_at_factorization(rule: str, S: torch.Tensor) -> StateCarry | None:
    """How W's optimizer state becomes S's: dropped (``"rotate"``), or zero moments and the same step
    (``"slice"``). None drops all state."""
    if rule == "rotate":
        return None
    return lambda key, value: torch.zeros_like(S, memory_format=torch.contiguous_format)


def state_at_check(rule: str, Ru: torch.Tensor, Rv: torch.Tensor, k: int) -> StateCarry:
    """How S's optimizer state follows a check's rotation by (Ru, Rv) and cut to rank k.

    ``"rotate"``: moments transform like S's gradient (second moments with the squared rotations);
    ``"slice"``: moments stay in the old basis, cut to ``[:k, :k]``.
    """
    if rule == "slice":
        return lambda key, value: value[:k, :k].clone()

    def rotate(key: str, value: torch.Tensor) -> torch.Tensor:
        if key in _SECOND_MOMENTS:
            return ((Ru * Ru).T @ value @ (Rv * Rv)).clamp_min(0)
        return Ru.T @ value @ Rv

    return rotate
