"""Argument validation shared by the data loaders (private).

Every error names the argument, what was expected, what was received and
how to fix it, so that misuse is diagnosable from the message alone.
"""

from __future__ import annotations

import numbers

import numpy as np


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Return ``value`` as an ``int`` after checking it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an integer >= {minimum}, got {value!r} "
            f"of type {type(value).__name__}. Fix: pass an int, e.g. {name}={max(minimum, 1)}."
        )
    if value < minimum:
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {value}. "
            f"Fix: pass {name}={minimum} or larger."
        )
    return int(value)


def check_seed(name: str, value: object) -> int:
    """Return a seed after checking it is an integer in [0, 2**32)."""
    seed = check_int(name, value, minimum=0)
    if seed >= 2**32:
        raise ValueError(
            f"{name} must be an integer in [0, 2**32), got {seed}. "
            f"Fix: pass a smaller seed, e.g. {name}={seed % 2**32}."
        )
    return seed


def check_fraction(name: str, value: object) -> float:
    """Return ``value`` as a float after checking 0 <= value < 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a float in [0, 1), got {value!r} of type "
            f"{type(value).__name__}. Fix: pass e.g. {name}=0.2."
        )
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"{name} must be in [0, 1), got {value}. Fix: pass e.g. {name}=0.2."
        )
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return ``value`` after checking it is one of ``choices``."""
    if value not in choices:
        raise ValueError(
            f"{name} must be one of {list(choices)}, got {value!r}. "
            f"Fix: pass {name}={choices[0]!r} (or another listed value)."
        )
    return str(value)


def check_same_length(x_name: str, x: np.ndarray, y_name: str, y: np.ndarray) -> None:
    """Raise ValueError unless ``x`` and ``y`` have the same leading dimension."""
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ValueError(
            f"{x_name} and {y_name} must have the same number of samples "
            f"(leading dimension), got {x_name}.shape={x.shape} and "
            f"{y_name}.shape={y.shape}. Fix: pass arrays with matching first axes."
        )
