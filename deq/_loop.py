"""The one solver-agnostic loop that drives every forward and adjoint solve.

It owns what every solver shares: the per-sample stopping test, step counting, freezing samples
that have stopped, keeping the lowest-residual finite iterate, stopping a sample at once when an
iterate turns non-finite or the iterates run away (DIVERGED), and the residual history. A solver
only says how to take one step.

The stopping test of a forward (nonlinear) solve is

    ||f(z) - z|| <= atol + rtol * min(||f(z)||, GROWTH_CAP * s0),   s0 = max(||z0||, ||f(z0)||),

so the relative part cannot be met by letting the iterates grow (a map with no fixed point would
otherwise "converge" once ||z|| is large enough); a linear (adjoint) solve `u = A u + b` passes
`rhs_norm = ||b||` and is judged as a linear system, `||A u + b - u|| <= atol + rtol ||b||`. A
test whose tolerance is not finite never passes. Norms are overflow-safe (`_tree.row_norm`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ._solution import RESULTS
from ._tree import row_norms, where_rows
from .solvers._base import Best

GROWTH_CAP = 100.0
"""The relative tolerance is measured against at most this multiple of the start's scale."""

DIVERGENCE_LIMIT = 1e4
"""Default `divergence_limit`: a sample whose `||f(z)||` exceeds this multiple of the start's scale
`max(||z0||, ||f(z0)||)` stops with result DIVERGED (a solver may set its own)."""


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
    diverged: jax.Array
    history: jax.Array


def make_verdict(atol, rtol, limit, scale0, rhs_norm=None):
    """The per-sample stopping test: `verdict(res, nf) -> (converged, diverged, nonfinite)` for
    residuals `res` and norms `nf = ||F(x)||` (see the module docstring); `scale0` is the start's
    scale `max(||x0||, ||F(x0)||)`, `rhs_norm` the `||b||` of a linear problem (or None)."""
    ref_cap = GROWTH_CAP * scale0

    def verdict(res, nf):
        ref = rhs_norm if rhs_norm is not None else jnp.minimum(nf, ref_cap)
        tol = atol + rtol * ref
        diverged = nf > limit * scale0
        nonfinite = ~(jnp.isfinite(res) & jnp.isfinite(nf)) & ~diverged
        conv = jnp.isfinite(tol) & jnp.isfinite(res) & (res <= tol) & ~diverged
        return conv, diverged, nonfinite

    return verdict


def result_codes(converged, diverged, nonfinite) -> jax.Array:
    """The `(B,)` int32 `RESULTS` code of each sample from its final flags."""
    return jnp.select(
        [converged, diverged, nonfinite],
        [RESULTS.CONVERGED, RESULTS.DIVERGED, RESULTS.NONFINITE],
        RESULTS.MAX_STEPS,
    ).astype(jnp.int32)


def step_limit(max_steps: int, budget: Optional[jax.Array]):
    """The number of steps a loop may take: the solver's static `max_steps`, or a runtime
    `budget` (a traced or concrete integer) clipped to `[0, max_steps]`."""
    if budget is None:
        return max_steps
    return jnp.clip(jnp.asarray(budget, jnp.int32), 0, max_steps)


def run(solver, F: Callable[[jax.Array], jax.Array], x0: jax.Array, *, unroll: bool = False,
        rhs_norm: Optional[jax.Array] = None, rtol: Optional[jax.Array] = None,
        budget: Optional[jax.Array] = None, return_state: bool = False):
    """Run `solver` on the packed map `F: (B, n) -> (B, n)` from `x0`.

    Args:
      solver: a forward solver (`FixedPointIteration`, `Anderson`, `Broyden`, ...).
      F: the packed map; must act row-wise (row `i` of the output depends on row `i` only).
      x0: `(B, n)` starting point.
      unroll: when True, run exactly `max_steps` masked steps under `lax.scan` so the loop can
        be differentiated by ordinary reverse-mode autodiff (memory grows with steps).
      rhs_norm: for a linear problem `u = A u + b`, the `(B,)` norms `||b||`: the relative
        tolerance is then taken against them (a linear-system test) instead of `||F(x)||`.
      rtol: an optional `(B,)` relative tolerance replacing `solver.rtol` (per sample).
      budget: an optional runtime step budget (an int32 scalar, possibly traced) below the
        solver's static `max_steps`: the loop stops after `min(budget, max_steps)` steps. The
        compiled loop does not depend on its value (the history keeps `max_steps + 1` columns).
      return_state: also return the solver's final state (e.g. Broyden's low-rank inverse-Jacobian
        estimate, which `deq.SHINE` reuses in the backward pass).

    Returns:
      A `LoopOutput`, or `(LoopOutput, state)` with `return_state=True`.
    """
    atol, max_steps = solver.atol, solver.max_steps
    rtol = solver.rtol if rtol is None else rtol
    limit = getattr(solver, "divergence_limit", DIVERGENCE_LIMIT)
    B = x0.shape[0]
    limit_k = step_limit(max_steps, budget)

    fx0 = F(x0)
    res0, nf0, n0 = jax.lax.stop_gradient(row_norms(fx0 - x0, fx0, x0))
    scale0 = jnp.maximum(n0, nf0)
    if rhs_norm is not None:
        rhs_norm = jax.lax.stop_gradient(rhs_norm)
    verdict = make_verdict(atol, rtol, limit, scale0, rhs_norm)

    conv0, div0, nonfinite0 = verdict(res0, nf0)
    finite0 = ~nonfinite0 & ~div0
    history = jnp.full((B, max_steps + 1), jnp.nan, dtype=res0.dtype).at[:, 0].set(res0)
    carry = _Carry(
        k=jnp.zeros((), jnp.int32),
        x=x0,
        fx=fx0,
        state=solver.init(F, x0, fx0),
        best_x=x0,
        best_fx=fx0,
        best_res=jnp.where(finite0 & jnp.isfinite(res0), res0, jnp.inf),
        steps=jnp.zeros((B,), jnp.int32),
        active=finite0 & ~conv0 & (limit_k > 0),
        converged=conv0,
        nonfinite=nonfinite0,
        diverged=div0,
        history=history,
    )

    def body(c: _Carry) -> _Carry:
        best = Best(c.best_x, c.best_fx, c.best_res)
        x_new, fx_new, state_new = solver.step(F, c.x, c.fx, c.state, c.active, best)
        # Residuals steer the loop; they are not differentiated (sqrt has no derivative at 0).
        res, nf = jax.lax.stop_gradient(row_norms(fx_new - x_new, fx_new))
        conv, div, bad = verdict(res, nf)
        upd = c.active & ~bad & ~div
        conv = upd & conv
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
            active=upd & ~conv & (k < limit_k),
            converged=c.converged | conv,
            nonfinite=c.nonfinite | (c.active & bad),
            diverged=c.diverged | (c.active & div),
            history=c.history.at[:, k].set(jnp.where(c.active, res, jnp.nan)),
        )

    if unroll:
        carry, _ = jax.lax.scan(lambda c, _: (body(c), None), carry, None, length=max_steps)
    else:
        carry = jax.lax.while_loop(lambda c: (c.k < limit_k) & jnp.any(c.active), body, carry)

    result = result_codes(carry.converged, carry.diverged, carry.nonfinite)
    # A sample whose start was non-finite has no finite iterate: report it as such.
    best_res = jnp.where(jnp.isfinite(carry.best_res), carry.best_res, jnp.nan)
    out = LoopOutput(carry.best_x, best_res, carry.steps, carry.converged, result, carry.history, carry.best_fx)
    return (out, carry.state) if return_state else out
