"""Argument checks, run before any work: a wrong type or a value out of range is one ValueError naming
the argument, never an error from inside JAX (or, worse, a NaN that trains into the weights)."""

from __future__ import annotations

import math
import numbers
from typing import Any

INT32_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1  # jax.random.key keeps 32 bits: larger seeds would alias smaller ones


def integer(name: str, value: Any, low: int | None = None, high: int = INT32_MAX) -> int:
    """An int (numpy's included, bool excluded) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if (low is not None and value < low) or value > high:
        bounds = f">= {low}" if value <= high else f"<= {high}"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")
    return int(value)


def optional_integer(name: str, value: Any, low: int | None = None, high: int = INT32_MAX) -> int | None:
    return None if value is None else integer(name, value, low, high)


def number(name: str, value: Any, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (bool excluded) within the bounds, each closed unless said open."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{'-inf' if low is None else low}, "
                         f"{'inf' if high is None else high}{right}, got {value!r}")
    return float(value)


def optional_number(name: str, value: Any, **bounds) -> float | None:
    return None if value is None else number(name, value, **bounds)


def seed(value: Any) -> int:
    return integer("seed", value, 0, SEED_MAX)


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
