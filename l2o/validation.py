"""Argument checks shared by rules, tasks and trainers.

Each check returns the value it accepted (so ``self.lr = check_hyperparameter("lr", lr)`` reads as
one line) and otherwise raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind,
out of range) whose message names the argument, what was given and what is allowed. Booleans are
never accepted as numbers, and strings never as booleans.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

__all__ = ["is_number", "check_hyperparameter", "check_positive_int", "check_bool", "check_float_dtype", "check_path"]


def is_number(value: Any) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` (a ``bool`` is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_hyperparameter(name: str, value: Any, *, low: float = 0.0, high: float = math.inf,
                         low_inclusive: bool = True, high_inclusive: bool = True) -> float:
    """Validate a numeric hyperparameter and return it as ``float``.

    Raises ``TypeError`` for non-numbers and ``ValueError`` (naming the parameter, the value and
    the allowed range) for values outside ``[low, high]`` (bounds inclusive unless told otherwise).
    """
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    v = float(value)
    ok_low = v >= low if low_inclusive else v > low
    ok_high = v <= high if high_inclusive else v < high
    if not (math.isfinite(v) and ok_low and ok_high):
        lo = "[" if low_inclusive and math.isfinite(low) else "("
        hi = "]" if high_inclusive and math.isfinite(high) else ")"
        raise ValueError(f"{name} must be a finite number in {lo}{low}, {high}{hi}, got {value!r}")
    return v


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an ``int`` >= 1 (not a bool); else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool``; else ``TypeError`` naming ``name`` (no truthiness of strings)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def check_float_dtype(name: str, value: Any) -> torch.dtype:
    """Return ``value`` if it is a floating-point ``torch.dtype``; else ``TypeError`` naming ``name``."""
    if not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(f"{name} must be a floating torch.dtype such as torch.float32, got {value!r}")
    return value


def check_path(name: str, value: Any) -> str | os.PathLike[str]:
    """Return ``value`` if it is a file path (``str`` or ``os.PathLike``); else ``TypeError`` naming ``name``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path (str or os.PathLike), got {type(value).__name__} ({value!r})")
    return value
