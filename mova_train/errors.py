"""Error types shared across the package, and the field checks the training config groups use (a
ConfigValueError naming the field and what is allowed). This module imports nothing from the project, so any
module (the data group's config included) can raise them without an import cycle through `mova_train.config`."""

from __future__ import annotations

import math
from typing import Any, NoReturn


class ConfigValueError(ValueError):
    """A configuration value that cannot work; the message names the field and what is allowed."""


def fail(name: str, value: Any, allowed: str) -> NoReturn:
    """Raise ConfigValueError: `name=value is not allowed; allowed`."""
    raise ConfigValueError(f"{name}={value!r} is not allowed; {allowed}")


def check_int(name: str, value: Any, low: int, allowed: str | None = None) -> None:
    """`value` is an integer (not a bool) >= `low`; `allowed` replaces the default description."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        fail(name, value, allowed or f"expected an integer >= {low}")


def check_float(name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
    """`value` is a finite number (not a bool) in [low, high], or (low, high] with `open_low`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        upper = "inf)" if math.isinf(high) else f"{high}]"
        fail(name, value, f"expected a number in {bracket}{low}, {upper}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """`value` is one of `choices`."""
    if value not in choices:
        fail(name, value, "allowed: " + ", ".join(choices))
