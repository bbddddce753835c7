"""The distribution of one ``search`` entry of a search space, checked (see `oialr_tune.space`).

Private to `oialr_tune.space`, which builds each `Param` with these checks; import from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from oialr_tune.errors import UserError
from oialr_tune.schema import convert_value

PARAM_TYPES = ("uniform", "loguniform", "int", "categorical")


@dataclass(frozen=True)
class Param:
    """One searched trainer key and the distribution its values are drawn from.

    `uniform`/`loguniform` draw floats in [low, high] (`step` quantizes uniform), `int` draws
    integers in [low, high] (`step`, or `log: true` for a log scale), `categorical` picks one of
    `choices` (numbers, strings, booleans or null).
    """

    key: str
    type: Literal["uniform", "loguniform", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def endpoints(self) -> list[tuple[str, Any]]:
        """(field name, value) of every extreme value a trial can get, for validation."""
        if self.type == "categorical":
            return [(f"choices[{i}]", c) for i, c in enumerate(self.choices or ())]
        return [("low", self.low), ("high", self.high)]

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (only the fields this type uses)."""
        out: dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            out["choices"] = list(self.choices or ())
            return out
        out["low"], out["high"] = self.low, self.high
        if self.step is not None:
            out["step"] = self.step
        if self.log:
            out["log"] = True
        return out


def distribution_type(spec: Any, where: str) -> str:
    """The distribution's type, once `spec` is a mapping of a known type with only the keys that type uses."""
    if not isinstance(spec, Mapping):
        raise UserError(f"{where}: expected a mapping like {{type: uniform, low: 0, high: 1}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise UserError(f"{where}.type: expected one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    allowed = {"categorical": {"type", "choices"}}.get(kind, {"type", "low", "high", "step", "log"})
    if kind == "loguniform":
        allowed = {"type", "low", "high"}
    for k in spec:
        if k not in allowed:
            raise UserError(f"{where}.{k}: not used by type {kind} (allowed: {', '.join(sorted(allowed))})")
    return kind


def categorical_choices(spec: Mapping[str, Any], where: str) -> tuple[Any, ...]:
    """A categorical entry's choices: a non-empty list of distinct JSON scalars."""
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{where}.choices: expected a non-empty list, got {choices!r}")
    for i, c in enumerate(choices):
        # Optuna stores categorical choices as JSON scalars; anything else cannot be persisted.
        if c is not None and not isinstance(c, (bool, int, float, str)):
            raise UserError(f"{where}.choices[{i}]: must be a number, string, boolean or null, got {c!r}")
    if len({repr(c) for c in choices}) != len(choices):
        raise UserError(f"{where}.choices: has duplicates: {choices!r}")
    return tuple(choices)


def range_bounds(kind: str, spec: Mapping[str, Any], where: str) -> tuple[Any, Any, Any, bool]:
    """(low, high, step, log) of an int, uniform or loguniform entry: low <= high, positive when
    logarithmic, an optional step."""
    for k in ("low", "high"):
        if k not in spec:
            raise UserError(f"{where}.{k}: required for type {kind}")
    tp: Any = int if kind == "int" else float
    low = convert_value(spec["low"], tp, f"{where}.low")
    high = convert_value(spec["high"], tp, f"{where}.high")
    if low > high:
        raise UserError(f"{where}.low: must be <= high, got low={low} > high={high}")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{where}.low: loguniform needs low > 0, got {low}")
    log = convert_value(spec.get("log", False), bool, f"{where}.log")
    if log and low <= 0:
        raise UserError(f"{where}.low: log: true needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _range_step(step, tp, low, high, log, where)
    return low, high, step, log


def _range_step(step: Any, tp: Any, low: float, high: float, log: bool, where: str) -> float:
    """A range's step: positive, not with log (Optuna cannot), dividing high - low."""
    step = convert_value(step, tp, f"{where}.step")
    if step <= 0:
        raise UserError(f"{where}.step: must be > 0, got {step}")
    if log:
        raise UserError(f"{where}.step: cannot be combined with log: true (Optuna does not support it)")
    span = (high - low) / step
    if abs(span - round(span)) > 1e-9 * max(1.0, abs(span)):
        raise UserError(f"{where}.step: high - low ({high - low}) must be a multiple of step ({step})")
    return step
