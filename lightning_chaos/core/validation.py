"""Argument checks whose errors name the argument and the values it may take.

Every public entry point of the package validates its arguments with these three functions, so that a
bad value fails the same way everywhere. The core raises ``ValueError``; the Lightning callbacks pass
``error=MisconfigurationException`` (Lightning's exception for a misconfigured Trainer).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["check_choice", "check_int", "check_number"]

T = TypeVar("T")


def check_int(name: str, value: Any, minimum: int = 1, error: type[Exception] = ValueError) -> int:
    """Return ``value`` if it is an integer ``>= minimum`` (``bool`` is not an integer here).

    Args:
        name: the argument's name, for the message.
        value: the value given.
        minimum: the smallest allowed value.
        error: the exception type to raise.

    Returns:
        ``value``.

    Raises:
        ValueError: (or the ``error`` type given) naming the argument, the allowed range and the value.

    Example:
        >>> check_int("n_iter", 3)
        3
        >>> check_int("n_iter", 0)
        Traceback (most recent call last):
        ...
        ValueError: `n_iter` must be an integer >= 1, got 0.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return value


def check_number(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    error: type[Exception] = ValueError,
) -> float:
    """Return ``value`` as a float if it is a real number in the given interval (``nan`` never is).

    Args:
        name: the argument's name, for the message.
        value: the value given.
        low: lower end of the interval.
        high: upper end of the interval.
        low_open: exclude ``low``.
        high_open: exclude ``high``.
        error: the exception type to raise.

    Returns:
        ``float(value)``.

    Raises:
        ValueError: (or the ``error`` type given) naming the argument, the interval and the value.

    Example:
        >>> check_number("delta_q", 0.05, 0.0, low_open=True)
        0.05
        >>> check_number("ema", 1.0, 0.0, 1.0, high_open=True)
        Traceback (most recent call last):
        ...
        ValueError: `ema` must be a number in [0.0, 1.0), got 1.0.
    """
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if ok:
        ok = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        raise error(
            f"`{name}` must be a number in {_interval(low, high, low_open, high_open)}, got {value!r}."
        )
    return float(value)


def check_choice(name: str, value: T, allowed: Iterable[T], error: type[Exception] = ValueError) -> T:
    """Return ``value`` if it is one of ``allowed``.

    Args:
        name: the argument's name, for the message.
        value: the value given.
        allowed: the allowed values.
        error: the exception type to raise.

    Returns:
        ``value``.

    Raises:
        ValueError: (or the ``error`` type given) naming the argument and listing the allowed values.

    Example:
        >>> check_choice("method", "exact", ("exact", "lanczos"))
        'exact'
    """
    options = tuple(allowed)
    if value not in options:
        raise error(f"`{name}` must be one of {', '.join(map(repr, options))}; got {value!r}.")
    return value


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or math.isinf(low) else "["
    right = ")" if high_open or math.isinf(high) else "]"
    return f"{left}{low}, {high}{right}"
