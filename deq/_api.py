"""Small helpers shared by the public API: keyword checking and argument validation.

Every error raised here names the argument, what was expected, what was got and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import numbers
from typing import Any, Callable, TypeVar

import jax
import numpy as np

T = TypeVar("T")


def _unknown_kwarg_error(owner: str, name: str, valid: list[str]) -> TypeError:
    if not valid:
        return TypeError(f"{owner} got an unexpected keyword argument `{name}`: it takes no arguments. Call {owner} as it is.")
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return TypeError(
        f"{owner} got an unexpected keyword argument `{name}`. "
        f"Expected one of: {', '.join(valid)}.{hint}"
    )


def strict_kwargs(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap `fn` so that an unknown keyword argument raises a `TypeError` with a suggestion."""
    sig = inspect.signature(fn)
    params = sig.parameters
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    valid = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "self"]
    owner = f"{fn.__qualname__.replace('.__init__', '')}()"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not has_var_kw:
            for name in kwargs:
                if name not in params:
                    raise _unknown_kwarg_error(owner, name, valid)
        return fn(*args, **kwargs)

    return wrapper


def frozen(cls: type[T]) -> type[T]:
    """Make `cls` a frozen, hashable dataclass registered as a static pytree.

    All fields are configuration (floats, ints, other frozen objects), so instances have no
    array leaves: they can be passed through `jax.jit` and compared/hashed by value. Unknown
    keyword arguments to the constructor give a helpful `TypeError`.
    """
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    cls.__init__ = strict_kwargs(cls.__init__)  # type: ignore[method-assign]
    jax.tree_util.register_static(cls)
    return cls


def _is_real(value: Any) -> bool:
    """A real number (Python or NumPy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and _is_real(value)


def check_nonneg(owner: str, name: str, value: Any) -> None:
    if not _is_real(value) or not math.isfinite(value) or not value >= 0:
        raise ValueError(
            f"{owner}: `{name}` must be a finite non-negative number, got {value!r}. "
            f"Pass e.g. {name}=1e-6 (0 disables this part of the stopping test)."
        )


def check_positive_int(owner: str, name: str, value: Any, example: int = 10) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(
            f"{owner}: `{name}` must be an integer >= 1, got {value!r}. Pass e.g. {name}={example}."
        )


def check_range(owner: str, name: str, value: Any, lo: float, hi: float, *, lo_open: bool = True) -> None:
    ok = _is_real(value) and not math.isnan(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ValueError(
            f"{owner}: `{name}` must lie in {bracket}{lo}, {hi}], got {value!r}. "
            f"Pass a value in that range, e.g. {name}={hi}."
        )


def check_tolerances(obj: Any) -> None:
    """Validate the shared `rtol`, `atol`, `max_steps` (and `divergence_limit`) fields of a solver.

    `rtol = atol = 0` is allowed: a fixed budget of exactly `max_steps` steps (unless a residual
    is exactly zero), reported as MAX_STEPS.
    """
    owner = type(obj).__name__
    check_nonneg(owner, "rtol", obj.rtol)
    check_nonneg(owner, "atol", obj.atol)
    check_positive_int(owner, "max_steps", obj.max_steps, example=50)
    if hasattr(obj, "divergence_limit"):
        check_range(owner, "divergence_limit", obj.divergence_limit, 1.0, float("inf"))


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}: `{name}` must be a bool, got {value!r}. Pass True or False.")
