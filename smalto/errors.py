"""Errors a user can cause, and the checks every config layer shares: unknown keys, choices, and a value against
its dataclass field's annotation (`build`, `check_type`). The CLI prints them without a traceback and exits with
status 2. Leaf module: no torch, no smalto imports."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class UserError(Exception):
    """Something the user can fix: the message says what to change."""


class ConfigError(UserError):
    """A configuration key or value is wrong."""


class DataError(UserError):
    """Input data is malformed or missing."""


class CheckpointError(UserError):
    """A checkpoint or model folder cannot be used."""


def check_keys(where: str, given: Iterable[Any], allowed: Sequence[str]) -> None:
    """Refuse the first key of `given` not in `allowed`, naming it by its dotted path (`where` is the path of the
    mapping, "" at the top level) and listing the allowed keys in the order given."""
    for key in given:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"unknown key {path}; allowed keys: {', '.join(allowed)}")


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    """Refuse a `value` of `key` that is not one of `allowed`, listing them."""
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def build(cls: type[T], d: Any, where: str) -> T:
    """`cls(**d)` for a keyword-only dataclass, after refusing a `d` that is not a mapping (None means {}), an
    unknown key, a missing required key and a value of the wrong type, each named by its dotted path."""
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {d!r}")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    check_keys(where, d, [f.name for f in fields])
    for f in fields:
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in d:
            raise ConfigError(f"{where} needs {f.name}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: check_type(f"{where}.{k}" if where else k, v, hints[k]) for k, v in d.items()})


def check_type(key: str, value: Any, annotation: Any) -> Any:
    """`value` checked against a type annotation (int, float, bool, str, None, Any, Literal, unions, list[...],
    dict[...], a dataclass); returns it, with a mapping built into the dataclass (`build`) and an integral float
    given for an int (`1e6`) made an int. Refuses anything else (bool is not a number here; 1.7 is not an int)
    naming `key` and what is expected."""
    for coerce in (False, True):
        ok, out = _match(key, value, annotation, coerce)
        if ok:
            return out
    raise ConfigError(f"{key} = {value!r} has the wrong type; expected {_describe(annotation)}")


def _match(key: str, value: Any, tp: Any, coerce: bool) -> tuple[bool, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True, value
    if tp is None or tp is type(None):
        return value is None, value
    if origin in (Union, types.UnionType):
        for member in args:
            ok, out = _match(key, value, member, coerce)
            if ok:
                return True, out
        return False, value
    if origin is Literal:
        return value in args, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        item = args[0] if args else Any
        return True, [check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        return isinstance(value, Mapping), value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return True, build(tp, value, key)
        return isinstance(value, tp), value
    if isinstance(value, bool):
        return tp is bool, value
    if tp is float:
        return isinstance(value, int | float), value
    if tp is int and coerce and isinstance(value, float) and value.is_integer():
        return True, int(value)
    return isinstance(value, tp), value


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is None or tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of: " + ", ".join(map(str, args))
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))
