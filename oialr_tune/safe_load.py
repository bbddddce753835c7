"""Reading checkpoints safely: tensors, plain data, numpy arrays and RNG states; no arbitrary pickle.

``torch.load(weights_only=True)`` refuses every object that is not a tensor or plain data, so a
user loop's checkpoint holding a numpy array or numpy's RNG state (``np.random.get_state()``)
saved fine and then could not be read back. :func:`load` adds an allow-list of exactly the numpy
types an array or scalar unpickles through (``torch.serialization.safe_globals``); anything else
(an arbitrary class, an object array's elements) is still refused, and the message names it.
Python's ``random.getstate()`` and torch's RNG states are plain data and tensors already.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oialr_tune.errors import UserError

__all__ = ["allowed_globals", "load", "refused_globals", "unpickle"]


def allowed_globals() -> list[Any]:
    """The numpy callables and classes an array, a scalar or a dtype unpickles through.

    Not the object dtype: its elements would unpickle arbitrary objects.
    """
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    dtypes = [type(np.dtype(code)) for code in np.typecodes["All"] if code != "O"]
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar, *dtypes]


def unpickle(path: str | Path) -> Any:
    """``torch.load`` of `path` onto the CPU with the allow-list; torch's own errors pass through."""
    with torch.serialization.safe_globals(allowed_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def load(path: str | Path) -> Any:
    """`unpickle` for a checkpoint: every failure a UserError naming the path."""
    path = Path(path)
    try:
        return unpickle(path)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError:
        names = refused_globals(path)
        if names:
            raise UserError(f"{path}: holds {', '.join(names)}, not on the allow-list of what a checkpoint may "
                            f"hold (tensors, plain data, numpy arrays, RNG states)") from None  # fmt: skip
        raise UserError(f"{path}: corrupt or unreadable checkpoint (UnpicklingError)") from None
    except Exception as e:
        raise UserError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__})") from None


def refused_globals(path: str | Path) -> list[str]:
    """The globals in the file that the allow-list refuses (empty when the file cannot be read so far):
    what would make `load` fail, found without unpickling anything."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:
        return []
