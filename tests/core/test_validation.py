"""Argument checks: the messages name the argument, the allowed values and the value given."""

import math

import pytest

from lightning_chaos.core.validation import check_choice, check_int, check_number


def test_check_int():
    assert check_int("n_iter", 3) == 3 and check_int("skip", 0, minimum=0) == 0
    with pytest.raises(ValueError, match=r"^`n_iter` must be an integer >= 1, got 0\.$"):
        check_int("n_iter", 0)
    for value in (True, 2.0, "2", None):
        with pytest.raises(ValueError, match="`k` must be an integer"):
            check_int("k", value)

    class Custom(Exception):
        pass

    with pytest.raises(Custom, match="`k`"):
        check_int("k", -1, error=Custom)


def test_check_number():
    assert check_number("delta_q", 0.05, 0.0, low_open=True) == 0.05
    assert isinstance(check_number("x", 2, 0.0, 2.0), float)
    with pytest.raises(ValueError, match=r"^`ema` must be a number in \[0\.0, 1\.0\), got 1\.0\.$"):
        check_number("ema", 1.0, 0.0, 1.0, high_open=True)
    with pytest.raises(ValueError, match=r"^`x` must be a number in \(0\.0, inf\), got 0\.0\.$"):
        check_number("x", 0.0, 0.0, low_open=True)
    with pytest.raises(ValueError, match=r"\(-inf, 1\.0\]"):
        check_number("x", 2.0, high=1.0)
    for value in (math.nan, True, "1", None):
        with pytest.raises(ValueError, match="`x` must be a number"):
            check_number("x", value)


def test_check_choice():
    assert check_choice("method", "exact", ("exact", "lanczos")) == "exact"
    with pytest.raises(ValueError, match=r"^`method` must be one of 'a', 'b'; got 'c'\.$"):
        check_choice("method", "c", ("a", "b"))
    assert check_choice("k", 2, iter([1, 2])) == 2  # any iterable of allowed values
