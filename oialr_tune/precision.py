"""Mixed precision: the autocast region and the gradient scaler a config's ``precision`` asks for.

One place for the rule behind ``precision`` (fp32, bf16, fp16, bf16_on_gpu), used by the trainer's
step and by every evaluation (`oialr_tune.tasks.Task.evaluate`). Imports only torch.
"""

from __future__ import annotations

import contextlib

import torch

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for `precision` (bf16/fp16) on `device`; nothing at all for fp32.

    ``bf16_on_gpu`` is bf16 on a CUDA device and fp32 elsewhere (the authors' ``autocast: True``).
    """
    if precision == "bf16_on_gpu":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()  # cheaper per step than a disabled autocast
    return torch.autocast(device.type, dtype=_AMP_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The loss scaler for `precision`: on for fp16 (whose gradients underflow), a pass-through otherwise.

    One backward path for every precision: a disabled scaler passes the loss and the step through.
    """
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
