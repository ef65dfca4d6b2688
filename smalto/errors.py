"""Errors a user can cause, and the two checks every config layer shares. The CLI prints them without a traceback
and exits with status 2. Leaf module: no torch, no smalto imports."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


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
