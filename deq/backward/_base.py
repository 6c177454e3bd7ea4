"""The interface of backward strategies, and failure reporting shared by forward and backward."""

from __future__ import annotations

import collections
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import raise_from_callback, user_frame, warn_or_raise
from .._loop import LoopOutput

PackedFn = Callable[[jax.Array, Any], jax.Array]  # (x (B, n), params) -> (B, n)


class NonConvergenceWarning(RuntimeWarning):
    """Warned when a backward (adjoint) solve did not reach its tolerance.

    The warning is attributed to the line of your code that called the solve (traced it).
    Turn it into an error with ``warnings.simplefilter("error", deq.NonConvergenceWarning)`` (it
    is then raised as a `deq.SolveError`), or pass ``throw=True`` to `deq.fixed_point`. To keep training logs
    readable only the first few (`deq.backward._base.WARN_LIMIT`) are shown unless a filter asks
    for ``"always"`` or ``"error"``.
    """


class AbstractBackward:
    """How a solve is differentiated. Subclasses implement `solve`.

    `solve(fn, solver, x0, params, throw, probe=None, budget=None)` runs the forward solve of the
    packed map `x -> fn(x, params)` from `x0` with `solver` and returns `(x_star, loop_output)`,
    where `x_star` carries the gradient this strategy defines with respect to `params`. `probe`, a
    `deq.BackwardStats` (only passed when the user gave one), receives the backward solve's
    statistics as its cotangent; a strategy without a backward solve ignores it (zero cotangent).
    `budget` (only passed when the user gave one) is the runtime step budget of the forward
    solve, an int32 scalar that may be traced: hand it to `deq._loop.run(..., budget=budget)`.
    """

    def solve(self, fn: PackedFn, solver, x0: jax.Array, params: Any, throw: bool, probe=None, budget=None):
        raise NotImplementedError


def _message(what: str, residual_name: str, steps, residual, converged, result) -> str:
    from .._solution import RESULTS

    steps = np.atleast_1d(np.asarray(steps))
    residual = np.atleast_1d(np.asarray(residual, dtype=np.float64))
    result = np.atleast_1d(np.asarray(result))
    bad = ~np.atleast_1d(np.asarray(converged))
    n_bad = int(bad.sum())
    codes = ", ".join(f"{int((result[bad] == c).sum())} {RESULTS.name(c)}" for c in np.unique(result[bad]))
    finite = bad & np.isfinite(residual)
    n_nonfinite = n_bad - int(finite.sum())
    # GMRES (jax.scipy) does not report its iteration count: its steps arrive as -1.
    taken = f"{int(steps.max())} step(s)" if steps.max() >= 0 else "its GMRES iterations"
    if finite.any():
        worst = f"the largest residual {residual_name} is {float(residual[finite].max()):.3e}"
    else:
        worst = f"no finite residual {residual_name} was reached"
    if n_nonfinite and finite.any():
        worst += f" ({n_nonfinite} sample(s) had no finite residual)"
    return (
        f"deq: {what} did not converge for {n_bad} of {bad.size} sample(s) ({codes}): after "
        f"{taken} {worst}. "
        "Try: increase `max_steps`, loosen `rtol`/`atol`, switch to Anderson/Broyden, damp the "
        "solver, or use a contractive cell (deq.nn.ContractiveDense) to guarantee convergence. "
        "Read deq.RESULTS.describe(code) for each result code."
    )


# How many non-convergence warnings of each kind were shown: after WARN_LIMIT of them the rest are
# dropped (training loops would otherwise flood stderr, since each message has new numbers),
# unless the user asked to see all ("always") or to fail ("error").
WARN_LIMIT = 5
_shown: collections.Counter = collections.Counter()


def _user_wants_all() -> bool:
    return any(
        action in ("always", "error") and issubclass(NonConvergenceWarning, category)
        for action, _, category, _, _ in warnings.filters
    )


def _warn(what: str, msg: str, where: tuple) -> None:
    if not _user_wants_all():
        _shown[what] += 1
        if _shown[what] > WARN_LIMIT:
            return
        if _shown[what] == WARN_LIMIT:
            msg += (
                f" (This is the last of {WARN_LIMIT} such warnings; see them all with "
                "warnings.simplefilter('always', deq.NonConvergenceWarning).)"
            )
    warn_or_raise(msg, NonConvergenceWarning, *where)


FORWARD_RESIDUAL = "||f(z) - z||"
ADJOINT_RESIDUAL = "||J^T u + g - u||"


def report(what: str, out: LoopOutput, value: jax.Array, *, throw: bool, warn: bool,
           residual_name: str = FORWARD_RESIDUAL) -> jax.Array:
    """Raise (`throw`) or warn (`warn`) from compiled code if any sample of `out` did not converge.

    Returns `value`, which the caller must use in place of its own: a warning-only report ties
    itself to it. Only the branch for failed samples calls back to the host. A raise is a
    `deq.SolveError`; a warning is attributed to the user's line that traced the solve.

    Warnings go through `jax.pure_callback`, whose (zero) result is added to `value`, rather than
    `jax.debug.callback`: an executable with a debug callback has an effect, and JAX dispatches
    effectful executables through its Python path instead of the C++ fast path, which cost
    0.1-0.4 ms on every call of a jitted step on a 2-core CPU, failures or not. `throw=True`
    keeps the debug callback: the raise must happen, and it is opt-in.
    """
    if not (throw or warn):
        return value
    stats = jax.lax.stop_gradient((out.num_steps, out.residual, out.converged, out.result))
    where = user_frame()

    if throw:
        def raise_if_failed(steps, residual, converged, result):
            if not np.all(converged):
                raise_from_callback(_message(what, residual_name, steps, residual, converged, result))

        jax.lax.cond(
            jnp.all(stats[2]),
            lambda: None,
            lambda: jax.debug.callback(raise_if_failed, *stats),
        )
        return value

    def warn_if_failed(steps, residual, converged, result):
        # Under vmap both branches of the cond run; the check keeps converged calls silent.
        if not np.all(converged):
            _warn(what, _message(what, residual_name, steps, residual, converged, result), where)
        # Under vmap ("broadcast_all") the inputs carry leading batch axes, and so must the result.
        # int32: the callback runs on a runtime thread, where a thread-local `jax.enable_x64`
        # does not apply, so a float64 result would come back canonicalized to float32.
        return np.zeros(np.shape(converged)[:-1], np.int32)

    zero = jax.lax.cond(
        jnp.all(stats[2]),
        lambda: jnp.zeros((), jnp.int32),
        lambda: jax.pure_callback(warn_if_failed, jax.ShapeDtypeStruct((), jnp.int32), *stats,
                                  vmap_method="broadcast_all"),
    )
    return value + jax.lax.stop_gradient(zero).astype(jnp.result_type(value))


def stop(tree):
    return jax.tree_util.tree_map(jax.lax.stop_gradient, tree)


def damped_steps(fn: PackedFn, x: jax.Array, params: Any, steps: int, damping: float) -> jax.Array:
    """`steps` differentiable damped iterations `x <- x + damping (f(x) - x)` from `x`."""
    for _ in range(steps):
        x = x + damping * (fn(x, params) - x)
    return x


def value_with_grad_of(value: jax.Array, surrogate: jax.Array) -> jax.Array:
    """`value` in the forward pass, the gradient of `surrogate` in the backward pass."""
    return value + (surrogate - jax.lax.stop_gradient(surrogate))


__all__ = ["AbstractBackward", "NonConvergenceWarning", "report", "stop", "damped_steps", "value_with_grad_of"]
