"""Small argument checks shared by the public constructors (raise, never assert)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import ConfigError


def positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, or a :class:`ConfigError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int,)) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def size_pair(name: str, value: Any) -> tuple[int, int]:
    """An int or a ``(width, height)`` pair of positive ints, as ``(width, height)``."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return positive_int(f"{name}[0] (width)", value[0]), positive_int(f"{name}[1] (height)", value[1])
    if isinstance(value, int) and not isinstance(value, bool):
        n = positive_int(name, value)
        return n, n
    raise ConfigError(f"{name} must be a positive int or a (width, height) pair, got {value!r}")


T = TypeVar("T")


def optional_callable(name: str, value: T) -> T:
    """``value`` when it is callable or None, else a :class:`ConfigError` naming ``name``."""
    if value is not None and not callable(value):
        raise ConfigError(f"{name} must be callable or None, got {value!r}")
    return value


def choice(name: str, value: Any, kind: Callable[[Any], T]) -> T:
    """``kind(value)`` for a str-valued Enum ``kind``, or a :class:`ConfigError` listing what is allowed."""
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in kind)  # type: ignore[attr-defined]
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}") from None


def renamed(owner: str, new: str, new_value: Any, old: str, old_value: Any, *, stacklevel: int = 3) -> Any:
    """The value of keyword ``new``, accepting its deprecated former name ``old`` (with a
    ``DeprecationWarning``); a :class:`ConfigError` when both or neither are given."""
    if old_value is None:
        if new_value is None:
            raise ConfigError(f"{owner}: {new} is required")
        return new_value
    if new_value is not None:
        raise ConfigError(f"{owner}: pass {new} only ({old} is its former name), not both")
    warnings.warn(
        f"{owner}({old}=...) is deprecated; use {new}=... (the same meaning)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return old_value
