"""Argument checks for constructors: each names the argument, the rule and the value it got.

The pretraining hyper-parameters are checked where they are used (as MONAI's constructors do), so a bundle
config and a Python caller meet the same rule and the same message. JSON has one number type, so integers
are checked as real ``int`` (never ``bool``, never ``3.0``): a float batch size breaks ``range`` much later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["check_bool", "check_choice", "check_int", "check_number", "check_size"]


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` if it is an integer ``>= minimum``; else ``ValueError`` naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        rule = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> float:
    """``value`` as a float if it is a finite number in the range; else ``ValueError`` naming ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if exclusive_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        parts = []
        if minimum is not None:
            parts.append(f"{'>' if exclusive_minimum else '>='} {minimum:g}")
        if maximum is not None:
            parts.append(f"<= {maximum:g}")
        raise ValueError(
            f"{name} must be a number{' ' + ' and '.join(parts) if parts else ''}, got {value!r}"
        )
    return float(value)


def check_choice(name: str, value: Any, options: Sequence[Any]) -> Any:
    """``value`` if it is one of ``options``; else ``ValueError`` naming ``name`` and the options."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (not ``"yes"``, not ``1``); else ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_size(name: str, value: Any, length: int = 2) -> tuple[int, ...]:
    """``value`` as a tuple if it is a list of ``length`` integers ``>= 1``; else ``ValueError`` naming
    ``name`` (a spatial size such as ``[128, 128]``)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != length:
        raise ValueError(f"{name} must be a list of {length} integers >= 1, got {value!r}")
    return tuple(check_int(name, v, 1) for v in value)
