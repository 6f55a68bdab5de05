"""Value checks shared by the config and the public builders: each rule is written once.

:func:`byol3d.config.validate_config` checks config values with these functions (turning the
``ValueError`` into a :class:`~byol3d.errors.ConfigError` that names the config key), and the
builders that take the same values as arguments (``view_transforms``, ``frame_views``,
``split_train_val``, ``build_dataset``, ``build_optimizer``, the handlers, ...) call the same
function, so a value means the same thing and fails with the same message either way.
Every message names the argument, the value and what it must be:

>>> check_number("train.momentum", 1.0, 0, 1, high_open=True)
Traceback (most recent call last):
...
ValueError: invalid train.momentum 1.0: must be in [0, 1)
>>> per_view("blur_prob", [1.0, 0.1])
(1.0, 0.1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["check_number", "check_pair", "is_number", "non_negative", "per_view"]


def is_number(value: Any) -> bool:
    """An int or a float, but not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(bound: float) -> str:
    """A bound as it reads best: ``0``, ``0.5``, ``4294967296``."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _fail(name: str, value: Any, must: str) -> ValueError:
    return ValueError(f"invalid {name} {value!r}: must be {must}")


def check_number(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> float:
    """``value`` as a number in the interval from ``low`` to ``high``; ValueError otherwise.

    Args:
        name: the argument or config key named in the message.
        value: the value to check.
        low, high: the bounds (infinite: unbounded on that side).
        low_open, high_open: exclude the bound itself (``(low`` / ``high)``).
        integer: require an int.

    Returns:
        ``value`` unchanged.
    """
    if not is_number(value) or (integer and not isinstance(value, int)):
        raise _fail(name, value, "an integer" if integer else "a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(name, value, "finite (no NaN or Inf)")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        if math.isinf(high):
            must = f"{'>' if low_open else '>='} {_show(low)}"
        elif math.isinf(low):
            must = f"{'<' if high_open else '<='} {_show(high)}"
        else:
            must = f"in {'(' if low_open else '['}{_show(low)}, {_show(high)}{')' if high_open else ']'}"
        raise _fail(name, value, must)
    return value


def non_negative(name: str, value: Any) -> float:
    """``value`` as a float >= 0 (an amplitude, a weight, a factor range)."""
    return float(check_number(name, value, 0.0))


def check_pair(
    name: str, value: Any, low: float = 0.0, high: float = math.inf, strict: bool = True
) -> tuple[float, float]:
    """A ``(min, max)`` pair with ``low < min <= max <= high`` (``low <= min`` if not strict)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise _fail(name, value, "a pair (min, max) of numbers") from None
    if not (lo <= hi and (lo > low if strict else lo >= low) and hi <= high):
        raise _fail(name, value, f"(min, max) with {_show(low)} <{'' if strict else '='} min <= max <= {high:g}")  # fmt: skip
    return lo, hi


def per_view(name: str, value: Any) -> tuple[float, float]:
    """A probability for both views, or a pair ``[view1, view2]``; each in [0, 1]."""
    if is_number(value):
        pair = (float(value), float(value))
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(is_number(v) for v in value)
    ):
        pair = (float(value[0]), float(value[1]))
    else:
        raise _fail(name, value, "a probability or a pair [view1, view2] of them")
    if not all(0.0 <= p <= 1.0 for p in pair):
        raise _fail(name, value, "a probability in [0, 1] or a pair [view1, view2] of them")
    return pair
