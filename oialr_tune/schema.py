"""Strict conversion of plain data (parsed YAML) to annotated Python types, the range checks a dataclass
field declares, and shared type aliases.

The layer under `oialr_tune.config` (training configs), `oialr_tune.models` (model builder
arguments) and `oialr_tune.space` (search spaces): it imports nothing
from the package but `errors`, and no third-party module, so each of them can import it at module
level without a cycle or a torch import.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any, Literal, Union

from oialr_tune.errors import UserError

InShape = tuple[int, ...]  # (C, H, W) of one example: what a model builder is given as `in_shape`


# --- range checks, used as dataclass field metadata (`dataclass_from_dict` applies them) ---------

Check = Callable[[Any], "str | None"]  # returns an error text ("must be > 0") or None when fine


def gt(lo: float) -> Check:
    return lambda v: None if v > lo else f"must be > {lo}"


def ge(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def within(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Check:
    def check(v: float) -> str | None:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    return check


def rule(check: Check | None = None, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with an optional range check in its metadata."""
    return field(default=default, metadata={"check": check} if check else {}, **kw)


def _type_name(tp: Any) -> str:
    """A short human name of a type annotation, for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if tp is float:
        return "a number"
    return {int: "an integer", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


class _Bad(Exception):
    """Internal: a conversion failure; turned into a UserError naming the key by the caller."""


def convert_value(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` from YAML to annotation `tp`, strictly (no bool for int, no 1.5 for int).

    Numeric strings are accepted for floats because YAML 1.1 reads ``1e-3`` (no dot) as a string.
    Raises UserError naming `key`. Used for config fields and for model builder arguments.
    """
    try:
        return _convert(value, tp, key)
    except _Bad:
        raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}") from None


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return dataclass_from_dict(tp, value, key)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Bad
        # bool is tried first so `true` is not read as 1; int before float keeps 3 an int.
        order = {bool: 0, int: 1, float: 2}
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: order.get(a, 3)):
            try:
                return _convert(value, arg, key)
            except _Bad:
                continue
        raise _Bad
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
        raise _Bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Bad
    if tp is float:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise _Bad from None
        else:
            raise _Bad
        if not math.isfinite(out):
            raise UserError(f"{key}: must be a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Bad
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{key}: expected a list of {len(args)} values, got {list(value)!r}")
            return tuple(convert_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        items = [convert_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Bad
        return dict(value)
    raise TypeError(f"unsupported annotation {tp!r} at {key}")  # a bug in the schema, not user input


def dataclass_from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types and ranges; errors name ``prefix.key``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UserError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else str(k)
            known = ", ".join(fields)
            raise UserError(f"{where}: unknown key (known: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        value = convert_value(data[name], hints[name], key)
        check = f.metadata.get("check")
        if check is not None and value is not None and not isinstance(value, bool):
            problem = check(value)
            if problem:
                raise UserError(f"{key}: {problem}, got {data[name]!r}")
        kwargs[name] = value
    return cls(**kwargs)
