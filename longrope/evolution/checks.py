"""Argument checks shared by the search's configurations and candidates: each failure names the field it is about."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np

from longrope.errors import LongRopeError


def fail(message: str) -> NoReturn:
    raise LongRopeError(message)


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def require_int(name: str, value: Any, minimum: int, hint: str = "") -> None:
    if not is_int(value) or value < minimum:
        fail(f"{name} = {value!r}: must be an integer >= {minimum}{hint}")


def require_number(name: str, value: Any, low: float, high: float = math.inf, hint: str = "") -> None:
    if not is_number(value) or not math.isfinite(value) or not (low <= value <= high):
        span = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        fail(f"{name} = {value!r}: must be a finite number {span}{hint}")


def require_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        fail(f"{name} = {value!r}: must be one of {', '.join(repr(c) for c in choices)}")
