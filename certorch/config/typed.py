"""Typed dataclasses from plain dicts (YAML), with dotted ``key=value`` overrides.

The one generic converter here turns nested dicts into nested dataclasses, checking
every value against the field's type hint and rejecting unknown keys. Errors are one
line and name the dotted key (``optim.lr``), so the CLI can print them as they are.

Supported field types: ``bool``, ``int``, ``float`` (ints accepted, and strings such as
``"1e-3"`` that YAML 1.1 leaves as strings), ``str``, ``Literal[...]``, ``X | None``,
``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``Any`` and nested dataclasses.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from certorch.errors import CertorchError

T = TypeVar("T")

__all__ = ["from_dict", "to_dict", "parse_override", "apply_overrides", "set_dotted", "check_size"]

INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # config integers must fit torch's int64
MAX_NODES = 100_000  # values in one config, counting each use of a YAML alias
MAX_DEPTH = 64


def check_size(data: Any, where: str = "config") -> None:
    """Refuse configs with more than :data:`MAX_NODES` values or nesting deeper than
    :data:`MAX_DEPTH` (YAML aliases can make a small file expand exponentially or refer to
    itself; both would otherwise hang or exhaust memory in the converter)."""
    count = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise CertorchError(f"{where} is too large: more than {MAX_NODES} values (YAML aliases expanded)")
        if depth > MAX_DEPTH:
            raise CertorchError(f"{where} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, dict):
            for k in node:
                if not isinstance(k, (str, bool, float, type(None))) and not (isinstance(k, int) and INT_MIN <= k <= INT_MAX):
                    raise CertorchError(f"{where} has a key that is not a string: {_short(k)}")
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` of a value cut to ``limit`` characters (error messages stay one short line)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against type hint ``tp`` and return the converted value."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise CertorchError(f"config key {path!r} must not be null")
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _convert(value, opt, path)
            except CertorchError as e:
                errors.append(str(e))
        raise CertorchError(errors[0] if len(errors) == 1 else f"config key {path!r} has an invalid value {_short(value)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise CertorchError(f"config key {path!r} must be one of {', '.join(map(str, allowed))}; got {_short(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise CertorchError(f"config key {path!r} must be a mapping, got {_type_name(type(value))}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise CertorchError(f"config key {path!r} must be a list, got {_short(value)}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise CertorchError(f"config key {path!r} must have {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise CertorchError(f"config key {path!r} must be a mapping, got {_short(value)}")
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise CertorchError(f"config key {path!r} must be true or false, got {_short(value)}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise CertorchError(f"config key {path!r} must be an integer, got {_short(value)}")
        if not INT_MIN <= value <= INT_MAX:
            raise CertorchError(f"config key {path!r} is out of range (must fit in 64 bits), got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string
                out = float(value)
            except ValueError:
                raise CertorchError(f"config key {path!r} must be a number, got {_short(value)}") from None
        else:
            raise CertorchError(f"config key {path!r} must be a number, got {_short(value)}")
        if math.isnan(out):
            raise CertorchError(f"config key {path!r} must not be NaN")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise CertorchError(f"config key {path!r} must be a string, got {_short(value)}")
    raise CertorchError(f"config key {path!r}: unsupported field type {_type_name(tp)}")  # pragma: no cover


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, type-checking values; unknown keys raise.

    Missing keys take the field defaults; a partial mapping for a nested dataclass field
    updates that field's default (so ``kappa: {ramp_epochs: 2}`` keeps the default start
    and end); a missing key without a default raises. The
    dataclass's own ``__post_init__`` may raise :class:`CertorchError` for bad values.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise CertorchError(f"config {path or 'root'!r} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise CertorchError(
                f"unknown config key {_join(path, str(key))!r}; valid keys: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
            if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
                if dataclasses.is_dataclass(default):  # a partial mapping updates the default
                    value = {**to_dict(default), **value}
            kwargs[name] = _convert(value, hints[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise CertorchError(f"missing required config key {_join(path, name)!r}")
    try:
        return cls(**kwargs)
    except CertorchError as e:
        msg = str(e)
        raise CertorchError(msg if not path or path in msg else f"{path}: {msg}") from None


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-ready structure of a (nested) dataclass; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.01"`` -> ``("optim.lr", 0.01)``; the value is parsed as YAML."""
    if "=" not in text:
        raise CertorchError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise CertorchError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key == "a.b.c"``, creating mappings as needed."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise CertorchError(f"cannot set {key!r}: {'.'.join(parts[: i + 1])!r} is not a mapping")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings to a nested dict in place and return it."""
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    return data
