"""The learning rate as a pure function of the optimizer step: no scheduler state to save or resume.

Two shapes: ours (`lr_at` with ``decay="cosine"``: linear warm-up, one cosine to the end of the
run) and timm's `CosineLRScheduler` as the authors step it, once per update (``"timm_cosine"``:
warm-up from a given LR, cosine cycles with k-decay). `timm_cosine_lr` reimplements timm's formula
(timm 1.0's ``CosineLRScheduler._get_lr`` with ``warmup_prefix=True``, no noise) so the trainer
needs no timm and stays stateless; ``tests/test_trainer.py`` checks it against timm itself.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["lr_at", "timm_cosine_args", "timm_cosine_lr"]


def timm_cosine_args(total_steps: int, warmup_steps: int, *, base_lr: float, warmup_lr_fraction: float = 0.0,
                     min_lr_fraction: float = 0.0, k_decay: float = 1.0, cycles: int = 1, cycle_mul: float = 1.0,
                     cycle_decay: float = 1.0) -> dict[str, Any]:
    """timm `CosineLRScheduler` keyword arguments for a run of `total_steps` updates.

    The `cycles` cycles (each `cycle_mul` times the one before) fill the updates after the warm-up,
    so the last cycle ends with the run; ``t_initial`` is the first cycle's length in updates.
    """
    after_warmup = max(1, total_steps - warmup_steps)
    if cycle_mul == 1.0:
        t_initial = after_warmup / cycles
    else:
        t_initial = after_warmup * (cycle_mul - 1.0) / (cycle_mul**cycles - 1.0)
    return {
        "t_initial": max(1, int(t_initial)), "lr_min": min_lr_fraction * base_lr, "cycle_mul": cycle_mul,
        "cycle_decay": cycle_decay, "cycle_limit": cycles, "warmup_t": warmup_steps,
        "warmup_lr_init": warmup_lr_fraction * base_lr, "warmup_prefix": True, "k_decay": k_decay,
    }


def timm_cosine_lr(t: int, *, base_lr: float, t_initial: int, lr_min: float, cycle_mul: float, cycle_decay: float,
                   cycle_limit: int, warmup_t: int, warmup_lr_init: float, warmup_prefix: bool = True,
                   k_decay: float = 1.0) -> float:
    """timm's cosine learning rate after `t` updates (arguments as `timm_cosine_args` gives them)."""
    if t < warmup_t:
        return warmup_lr_init + t * (base_lr - warmup_lr_init) / warmup_t
    if warmup_prefix:
        t = t - warmup_t
    if cycle_mul != 1:
        i = math.floor(math.log(1 - t / t_initial * (1 - cycle_mul), cycle_mul))
        t_i = cycle_mul**i * t_initial
        t_curr = t - (1 - cycle_mul**i) / (1 - cycle_mul) * t_initial
    else:
        i = t // t_initial
        t_i = t_initial
        t_curr = t - (t_initial * i)
    if i >= cycle_limit:
        return lr_min
    lr_max = base_lr * cycle_decay**i
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t_curr**k_decay / t_i**k_decay))


def lr_at(
    step: int,
    total_steps: int,
    *,
    base_lr: float,
    warmup_steps: int = 0,
    decay: str = "cosine",
    min_lr_fraction: float = 0.0,
    last_event_step: int | None = None,
    rewarm_steps: int = 0,
    rewarm_start: float = 0.1,
    **timm_shape: float,
) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    ``cosine``: linear warm-up from base_lr/warmup_steps to base_lr, then cosine decay to
    ``min_lr_fraction * base_lr`` at the last step. ``constant``: base_lr after the warm-up.
    ``timm_cosine``: `timm_cosine_lr`, shaped by `timm_shape` (warmup_lr_fraction, k_decay, cycles,
    cycle_mul, cycle_decay; see `timm_cosine_args`). If OIALR changed the model's form just before
    step `last_event_step` (a factorization resets S's optimizer state; a cut changes its shape),
    the rate is scaled by a linear ramp from `rewarm_start` to 1 over `rewarm_steps`.
    """
    if decay == "timm_cosine":
        args = timm_cosine_args(total_steps, warmup_steps, base_lr=base_lr, min_lr_fraction=min_lr_fraction,
                                **timm_shape)
        lr = timm_cosine_lr(step, base_lr=base_lr, **args)
    elif step < warmup_steps:
        lr = base_lr * (step + 1) / warmup_steps
    elif decay == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps - 1)
        floor = min_lr_fraction * base_lr
        lr = floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    else:
        lr = base_lr
    if last_event_step is not None and rewarm_steps > 0:
        since = step - last_event_step
        if 0 <= since < rewarm_steps:
            lr *= rewarm_start + (1.0 - rewarm_start) * since / rewarm_steps
    return lr
