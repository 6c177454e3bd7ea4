"""The one solver-agnostic loop that drives every forward and adjoint solve.

It owns what every solver shares: the per-sample stopping test
`||f(z) - z|| <= atol + rtol * ||f(z)||`, step counting, freezing samples that have stopped,
keeping the lowest-residual finite iterate, stopping a sample at once when its residual turns
non-finite, and the residual history. A solver only says how to take one step.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ._solution import RESULTS
from ._tree import row_norm, where_rows
from .solvers._base import Best


class LoopOutput(NamedTuple):
    x: jax.Array  # (B, n) lowest-residual iterate
    residual: jax.Array  # (B,)
    num_steps: jax.Array  # (B,) int32
    converged: jax.Array  # (B,) bool
    result: jax.Array  # (B,) int32
    history: jax.Array  # (B, max_steps + 1)
    fx: jax.Array  # (B, n) f at the returned iterate


class _Carry(NamedTuple):
    k: jax.Array
    x: jax.Array
    fx: jax.Array
    state: Any
    best_x: jax.Array
    best_fx: jax.Array
    best_res: jax.Array
    steps: jax.Array
    active: jax.Array
    converged: jax.Array
    nonfinite: jax.Array
    history: jax.Array


def run(solver, F: Callable[[jax.Array], jax.Array], x0: jax.Array, *, unroll: bool = False) -> LoopOutput:
    """Run `solver` on the packed map `F: (B, n) -> (B, n)` from `x0`.

    Args:
      solver: a forward solver (`FixedPointIteration`, `Anderson`, `Broyden`, ...).
      F: the packed map; must act row-wise (row `i` of the output depends on row `i` only).
      x0: `(B, n)` starting point.
      unroll: when True, run exactly `max_steps` masked steps under `lax.scan` so the loop can
        be differentiated by ordinary reverse-mode autodiff (memory grows with steps).

    Returns:
      A `LoopOutput`.
    """
    rtol, atol, max_steps = solver.rtol, solver.atol, solver.max_steps
    B = x0.shape[0]

    def tolerance(fx):
        # With rtol == 0 (static) the norm of f(z) is not needed: one pass over (B, n) saved.
        if rtol == 0:
            return jnp.full(fx.shape[:1], atol, fx.dtype)
        return atol + rtol * row_norm(fx)

    fx0 = F(x0)
    res0 = jax.lax.stop_gradient(row_norm(fx0 - x0))
    finite0 = jnp.isfinite(res0)
    conv0 = finite0 & (res0 <= tolerance(fx0))
    history = jnp.full((B, max_steps + 1), jnp.nan, dtype=res0.dtype).at[:, 0].set(res0)
    carry = _Carry(
        k=jnp.zeros((), jnp.int32),
        x=x0,
        fx=fx0,
        state=solver.init(F, x0, fx0),
        best_x=x0,
        best_fx=fx0,
        best_res=jnp.where(finite0, res0, jnp.inf),
        steps=jnp.zeros((B,), jnp.int32),
        active=finite0 & ~conv0,
        converged=conv0,
        nonfinite=~finite0,
        history=history,
    )

    def body(c: _Carry) -> _Carry:
        best = Best(c.best_x, c.best_fx, c.best_res)
        x_new, fx_new, state_new = solver.step(F, c.x, c.fx, c.state, c.active, best)
        # Residuals steer the loop; they are not differentiated (sqrt has no derivative at 0).
        res = jax.lax.stop_gradient(row_norm(fx_new - x_new))
        finite = jnp.isfinite(res)
        upd = c.active & finite
        conv = upd & (res <= tolerance(fx_new))
        # The converging iterate is returned even if an earlier one had a lower residual, so a
        # converged sample's value always passes the stopping test.
        better = upd & ((res < c.best_res) | conv)
        k = c.k + 1
        return _Carry(
            k=k,
            x=where_rows(upd, x_new, c.x),
            fx=where_rows(upd, fx_new, c.fx),
            # Rows never restart once inactive, so their solver state need not be frozen
            # (saving a copy of the whole history per step); x, fx and best are.
            state=state_new,
            best_x=where_rows(better, x_new, c.best_x),
            best_fx=where_rows(better, fx_new, c.best_fx),
            best_res=jnp.where(better, res, c.best_res),
            steps=c.steps + c.active.astype(jnp.int32),
            active=upd & ~conv & (k < max_steps),
            converged=c.converged | conv,
            nonfinite=c.nonfinite | (c.active & ~finite),
            history=c.history.at[:, k].set(jnp.where(c.active, res, jnp.nan)),
        )

    if unroll:
        carry, _ = jax.lax.scan(lambda c, _: (body(c), None), carry, None, length=max_steps)
    else:
        carry = jax.lax.while_loop(lambda c: (c.k < max_steps) & jnp.any(c.active), body, carry)

    result = jnp.where(
        carry.converged,
        RESULTS.CONVERGED,
        jnp.where(carry.nonfinite, RESULTS.NONFINITE, RESULTS.MAX_STEPS),
    ).astype(jnp.int32)
    # A sample whose start was non-finite has no finite iterate: report it as such.
    best_res = jnp.where(jnp.isfinite(carry.best_res), carry.best_res, jnp.nan)
    return LoopOutput(carry.best_x, best_res, carry.steps, carry.converged, result, carry.history, carry.best_fx)
