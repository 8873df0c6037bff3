"""Argument checks shared by the callbacks: errors name the argument and the allowed values."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer ``>= minimum``, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MisconfigurationException(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return value


def positive_float(name: str, value: Any, upper: float = math.inf) -> float:
    """Return ``value`` as a float if it lies in ``(0, upper]``, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= upper:
        bound = f"in (0, {upper}]" if math.isfinite(upper) else "a finite number > 0"
        raise MisconfigurationException(f"`{name}` must be {bound}, got {value!r}.")
    return float(value)


def choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise listing them."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise MisconfigurationException(
            f"`{name}` must be one of {', '.join(map(repr, allowed))}; got {value!r}."
        )
    return value
