"""The interface of backward strategies, and failure reporting shared by forward and backward."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import numpy as np

from .._loop import LoopOutput

PackedFn = Callable[[jax.Array, Any], jax.Array]  # (x (B, n), params) -> (B, n)


class NonConvergenceWarning(RuntimeWarning):
    """Warned when a backward (adjoint) solve did not reach its tolerance.

    Turn it into an error with ``warnings.simplefilter("error", deq.NonConvergenceWarning)``, or
    pass ``throw=True`` to `deq.fixed_point` to raise from compiled code.
    """


class AbstractBackward:
    """How a solve is differentiated. Subclasses implement `solve`.

    `solve(fn, solver, x0, params, throw)` runs the forward solve of the packed map
    `x -> fn(x, params)` from `x0` with `solver` and returns `(x_star, loop_output)`, where
    `x_star` carries the gradient this strategy defines with respect to `params`.
    """

    def solve(self, fn: PackedFn, solver, x0: jax.Array, params: Any, throw: bool):
        raise NotImplementedError


def _message(what: str, steps, residual, converged) -> str:
    steps = np.atleast_1d(np.asarray(steps))
    residual = np.atleast_1d(np.asarray(residual))
    bad = ~np.atleast_1d(np.asarray(converged))
    n_bad = int(bad.sum())
    worst = float(np.nanmax(np.where(bad, residual, -np.inf))) if n_bad else float("nan")
    return (
        f"deq: {what} did not converge for {n_bad} of {bad.size} sample(s): after "
        f"{int(steps.max())} step(s) the largest residual ||f(z) - z|| is {worst:.3e}. "
        "Try: increase `max_steps`, loosen `rtol`/`atol`, switch to Anderson/Broyden, damp the "
        "solver, or use a contractive cell (deq.nn.ContractiveDense) to guarantee convergence."
    )


def report(what: str, out: LoopOutput, *, throw: bool, warn: bool) -> None:
    """Raise (`throw`) or warn (`warn`) from compiled code if any sample of `out` did not converge."""
    if not (throw or warn):
        return

    def callback(steps, residual, converged):
        if np.all(converged):
            return
        msg = _message(what, steps, residual, converged)
        if throw:
            raise RuntimeError(msg)
        warnings.warn(msg, NonConvergenceWarning, stacklevel=2)

    jax.debug.callback(callback, out.num_steps, out.residual, out.converged)


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
