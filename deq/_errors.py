"""One clean exception for failures found inside compiled code: `deq.SolveError`.

A Python exception raised by a host callback inside a compiled JAX program does not reach the
caller as itself: XLA turns it into a `jax.errors.JaxRuntimeError` ("INTERNAL: CpuCallback error
calling callback: Traceback ...") and JAX logs the traceback on stderr a second time. `deq`
raises its own failures (`throw=True`, a `NonConvergenceWarning` turned into an error, the batch
contract check) as `SolveError`, remembers them, keeps JAX from logging them, and turns the
runtime error back into the `SolveError` wherever it can see the call: `deq.fixed_point`,
`deq.nn.DEQ`, `deq.linen.DEQ` and `deq.train.fit` called outside a trace, and any code wrapped in
`deq.clean_errors`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from typing import Optional

import jax


class SolveError(RuntimeError):
    """A `deq` solve failed in a way the caller asked to be told about by an exception.

    Raised when `throw=True` and a forward or backward solve did not converge, when a
    `deq.NonConvergenceWarning` is turned into an error (``warnings.simplefilter("error",
    deq.NonConvergenceWarning)``), and when `check_batch=True` finds that `f` mixes samples.
    Inside your own `jax.jit`, wrap the call of the jitted function in `deq.clean_errors()` to
    receive it as itself instead of a `jax.errors.JaxRuntimeError`.

    Example:
      >>> import jax.numpy as jnp, deq
      >>> try:
      ...     deq.fixed_point(lambda z, a: 0.999 * z + 1.0, jnp.zeros(2), None,
      ...                     solver=deq.FixedPointIteration(max_steps=3), throw=True)
      ... except deq.SolveError as e:
      ...     print(str(e).split(":")[0])
      deq
    """


SolveError.__module__ = "deq"

_lock = threading.Lock()
_raised: dict[str, SolveError] = {}
_MAX_REMEMBERED = 64


def _tag(exc: SolveError) -> str:
    return f"deq.SolveError#{id(exc):x}"


def raise_from_callback(message: str) -> None:
    """Raise `SolveError(message)` from a host callback, remembering it for `clean_errors`."""
    exc = SolveError(message)
    tag = _tag(exc)
    with _lock:
        if len(_raised) >= _MAX_REMEMBERED:
            _raised.pop(next(iter(_raised)))
        _raised[tag] = exc
    # The tag travels in the runtime error's text, which holds the formatted exception.
    raise SolveError(f"{message} ({tag})")


def _recover(err: BaseException) -> Optional[SolveError]:
    text = str(err)
    with _lock:
        for tag in reversed(list(_raised)):
            if tag in text:
                exc = _raised.pop(tag)
                return SolveError(*exc.args)
    return None


class clean_errors(contextlib.ContextDecorator):
    """Turn a `jax.errors.JaxRuntimeError` that carries a `deq.SolveError` back into it.

    Use it around calls of your own jitted functions that contain `deq` solves with
    `throw=True` (as a context manager or a decorator); other errors pass through unchanged.

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> @jax.jit
      ... def solve(x):
      ...     return deq.fixed_point(lambda z, a: 0.999 * z + a, jnp.zeros(2), x,
      ...                            solver=deq.FixedPointIteration(max_steps=3), throw=True).value
      >>> try:
      ...     with deq.clean_errors():
      ...         solve(jnp.ones(2))
      ... except deq.SolveError:
      ...     print("SolveError")
      SolveError
    """

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and isinstance(exc, jax.errors.JaxRuntimeError):
            clean = _recover(exc)
            if clean is not None:
                raise clean from None
        return False


def warn_or_raise(message: str, category: type[Warning], filename: str, lineno: int, module: str) -> None:
    """Warn, attributed to the user's line `filename:lineno`; where the warning filters turn it
    into an error, raise a `SolveError` instead (from a host callback)."""
    try:
        warnings.warn_explicit(message, category, filename, lineno, module=module)
    except category:
        raise_from_callback(message)


class _DropOwnErrors(logging.Filter):
    """Keep JAX from logging the traceback of a `SolveError` it is about to re-raise anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        return not (info and isinstance(info[1], SolveError))


def _install_log_filter() -> None:
    for name in ("jax._src.debugging", "jax._src.callback"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropOwnErrors) for f in logger.filters):
            logger.addFilter(_DropOwnErrors())


_install_log_filter()


_INTERNAL = ("deq", "jax", "jaxlib", "flax", "optax", "orbax", "contextlib", "functools", "importlib", "runpy")


def user_frame() -> tuple[str, int, str]:
    """`(filename, lineno, module)` of the innermost caller outside deq, JAX and Flax.

    Captured at trace time, so that a warning issued later from compiled code points at the
    user's line rather than at JAX's callback machinery.
    """
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.split(".")[0] not in _INTERNAL:
            return frame.f_code.co_filename, frame.f_lineno, name
        frame = frame.f_back
    return "<unknown>", 0, "deq"
