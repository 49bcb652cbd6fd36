"""The lab's argument checks (the library keeps its own private). Each returns the value or raises ValueError
'{name}: expected {expected}, got {value!r}'."""

from __future__ import annotations

import math
from typing import Callable

__all__ = ["is_int", "check_number", "check_int"]


def is_int(value) -> bool:
    """An ``int`` that is not a ``bool`` (a size or a count is never ``True``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_number(name: str, value, ok: Callable[[float], bool], expected: str):
    """``value`` if it is a finite int or float (not a bool) for which ``ok(value)`` holds."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and ok(value)):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def check_int(name: str, value, minimum: int = 1, expected: str | None = None) -> int:
    """``value`` if it is an int >= ``minimum`` (``expected`` defaults to 'a positive integer' for 1, else 'an
    integer >= minimum')."""
    expected = expected or ("a positive integer" if minimum == 1 else f"an integer >= {minimum}")
    return check_number(name, value, lambda v: is_int(v) and v >= minimum, expected)
