"""Exact gradients of the reversible iteration by reversing it: `deq.Reversible`."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import _loop
from .._api import frozen
from .._tree import row_norms, where_rows
from ..solvers.reversible import ReversibleIteration
from ._base import AbstractBackward

GROWTH_BUDGET = 64.0
"""The derived segment length keeps the worst-case rounding growth of a segment, `|1 - b|^(-2(k - 1))`, within this."""


def derived_checkpoint_every(damping: float) -> int:
    """`Reversible()`'s segment length for damping `b`: the largest `k` with `|1 - b|^(-2(k - 1)) <= 64`.

    4 at `b = 0.5`, 2 at `b = 0.8`, 1 (every step stored) above `b = 0.875`; measured in
    `benchmarks/reversible.py` to keep float32 gradients as accurate as float32 backprop.
    """
    growth = -2.0 * math.log(abs(1.0 - damping))
    return 1 + int(math.floor(math.log(GROWTH_BUDGET) / growth + 1e-9))


@frozen
class Reversible(AbstractBackward):
    r"""The exact gradient of `deq.ReversibleIteration`, by reversing its steps (McCallum et al. 2025).

    The value returned by the solve is the iterate `z_m` the loop returned (per sample: the
    converging or lowest-residual one, after `m` steps). Its gradient is that of the `m` steps
    actually taken, computed backwards one step at a time: each step
    `(y_n, z_n) -> (y_{n+1}, z_{n+1})` is first undone by algebra (see `ReversibleIteration`),
    then the cotangents are carried through it,

    .. math::
        \hat y = \bar y_{n+1} + b\, J_f(y_{n+1})^\top \bar z_{n+1}, \quad
        \bar z_n = (1 - b)\, \bar z_{n+1} + b\, J_f(z_n)^\top \hat y, \quad
        \bar y_n = (1 - b)\, \hat y,

    with `b (df/da)^T` of both products added to the parameters' cotangent. Two vector-Jacobian
    products per step (whose primal outputs `f(y_{n+1})`, `f(z_n)` are the ones the reversal
    needs): the cost of one more forward pass, no adjoint solve, and the gradient of
    `deq.Unrolled()` through the same iteration, up to rounding. The gradient with respect to
    `z0` is exact too.

    Rounding. Reversal is exact in exact arithmetic only: each undone step multiplies rounding
    errors by up to about `|1 - b|^(-2)` (measured: 3.5 at `b = 0.5`, 19 at `b = 0.8`), so
    reversing a long solve in one sweep loses every digit in float32 after about 15 steps at
    `b = 0.5` (in float64 after about 30). Here the reversal restarts, every `checkpoint_every`
    steps, from an exact copy of `(y, z)` stored during the forward pass, so errors grow over at
    most `checkpoint_every - 1` undone steps, however many steps the solve took. By default the
    segment is the longest whose worst-case growth stays within 64
    (`derived_checkpoint_every`: 6 at `b = 0.3`, 4 at `b = 0.5`, 2 at `b = 0.8`, 1 for
    `0.875 < b < 1.125`). Measured on the contractive problem of `benchmarks/solvers.py` in
    float32 against float64 backprop (`python -m benchmarks.reversible --profile quick`): the
    default's relative gradient error is 2.4e-7 / 3.3e-7 / 5.4e-7 at 10 / 50 / 150 steps
    (`b = 0.5`; float32 backprop through the stored steps: 2.3e-7 / 3.2e-7 / 5.0e-7), and
    below 6e-7 at every `b` in 0.3-0.9; reversal in one sweep gives 1.4e-5 / 1.2e-3 / NaN at
    `b = 0.5` and 0.038 / 0.035 / NaN at `b = 0.8`.

    Memory. Besides `z0`, the parameters and the returned `(y_m, z_m)`, the forward pass stores
    `(max_steps - 1) // checkpoint_every` copies of `(y, z)`, each two `(B, n)` arrays: a
    fraction `2 / checkpoint_every` of a state per step, whatever `f` computes inside
    (backpropagation through the steps keeps every intermediate activation of `f`, twice per
    step). `checkpoint_every=0` stores none, so memory does not grow with `max_steps` at all:
    for float64, or short float32 solves at small `b`. Measured (same benchmark, XLA temporaries
    of one gradient at 10 / 100 / 400 steps): default 1.5 / 4.3 / 13.6 MiB, one sweep 1.25 MiB
    flat, backprop 6.2 / 47 / 183 MiB, IFT 1.38 MiB flat.

    Args:
      checkpoint_every: the segment length `k >= 1`: store `(y, z)` after every `k`-th step
        and restart the reversal there; 0 stores nothing and reverses from the returned iterate
        in one sweep; None (default) derives `k` from the solver's damping (see above).

    Returns:
      From `solve` (called by `deq.fixed_point`): the returned iterate, whose cotangent is
      carried back as above, and the loop's output (statistics exactly as for `deq.IFT()`).

    Pairs only with `deq.ReversibleIteration`: any other solver is a `ValueError` when the solve
    is traced (the opposite pairing, `ReversibleIteration` with `deq.IFT()` or any other
    strategy, is fine).

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> f = lambda z, a: jnp.tanh(0.5 * z + a)
      >>> def loss(a, backward):
      ...     solver = deq.ReversibleIteration(rtol=0.0, atol=1e-6, max_steps=50)
      ...     return deq.fixed_point(f, jnp.zeros(2), a, solver=solver, backward=backward).value.sum()
      >>> g = jax.grad(loss)(jnp.ones(2), deq.Reversible())
      >>> bool(jnp.allclose(g, jax.grad(loss)(jnp.ones(2), deq.Unrolled()), rtol=1e-5))
      True
      >>> deq.Reversible().segment(deq.ReversibleIteration(damping=0.8)), deq.Reversible().slots(deq.ReversibleIteration())
      (2, 24)

    References:
      McCallum, Arora & Foster, "Reversible Deep Equilibrium Models", arXiv:2509.12917, 2025.
    """

    checkpoint_every: Optional[int] = None

    def __post_init__(self):
        k = self.checkpoint_every
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(
                f"Reversible: `checkpoint_every` must be None (derived from the damping), 0 (no stored "
                f"copies) or an integer >= 1, got {k!r}. Pass e.g. checkpoint_every=4."
            )

    def segment(self, solver: ReversibleIteration) -> int:
        """The segment length used with `solver` (0: reversal in one sweep)."""
        k = self.checkpoint_every
        return derived_checkpoint_every(solver.damping) if k is None else k

    def slots(self, solver: ReversibleIteration) -> int:
        """How many `(y, z)` copies the forward pass stores with `solver`."""
        k = self.segment(solver)
        return 0 if k == 0 else (solver.max_steps - 1) // k

    def solve(self, fn, solver, x0, params, throw, probe=None, budget=None):
        if not isinstance(solver, ReversibleIteration):
            raise ValueError(
                f"fixed_point: backward=deq.Reversible() reverses the steps of deq.ReversibleIteration, "
                f"but got solver={solver!r}. Pass solver=deq.ReversibleIteration(...) with it, or keep "
                f"this solver and use backward=deq.IFT() (or deq.Unrolled())."
            )
        return _reversible(fn, solver, self.segment(solver), x0, params, budget)


class Record(NamedTuple):
    """What the recording forward pass keeps for the reversal (every leaf has leading axis B, or C then B)."""

    y: jax.Array  # (B, n) y at the returned iterate
    z: jax.Array  # (B, n) the returned iterate
    step: jax.Array  # (B,) int32 its step index m
    ck_y: jax.Array  # (C, B, n) y after steps k, 2k, ..., Ck
    ck_z: jax.Array  # (C, B, n) z after the same steps


class _Carry(NamedTuple):
    k: jax.Array
    x: jax.Array
    fx: jax.Array
    y: jax.Array
    best_x: jax.Array
    best_fx: jax.Array
    best_y: jax.Array
    best_res: jax.Array
    best_step: jax.Array
    steps: jax.Array
    active: jax.Array
    converged: jax.Array
    nonfinite: jax.Array
    diverged: jax.Array
    history: jax.Array
    ck_y: jax.Array
    ck_z: jax.Array


def record(solver: ReversibleIteration, F, x0: jax.Array, every: int, budget=None):
    """Run `solver` on `F` from `x0` as `deq._loop.run` does, keeping what the reversal needs.

    The stopping test and result codes are `deq._loop`'s own (`make_verdict`, `result_codes`);
    freezing and the best-iterate rule follow `deq._loop.run` (`tests/test_reversible.py` checks
    the values and statistics agree);
    in addition it keeps `y` and the step index of the returned iterate and a copy of `(y, z)`
    after every `every`-th step (none for `every=0`). `budget` is the optional runtime step
    budget (`deq._loop.step_limit`). Returns `(LoopOutput, Record)`.
    """
    atol, rtol, max_steps = solver.atol, solver.rtol, solver.max_steps
    limit = solver.divergence_limit
    B, n = x0.shape
    C = 0 if every == 0 else (max_steps - 1) // every
    limit_k = _loop.step_limit(max_steps, budget)

    fx0 = F(x0)
    res0, nf0, n0 = row_norms(fx0 - x0, fx0, x0)
    scale0 = jnp.maximum(n0, nf0)
    verdict = _loop.make_verdict(atol, rtol, limit, scale0)

    conv0, div0, nonfinite0 = verdict(res0, nf0)
    finite0 = ~nonfinite0 & ~div0
    carry = _Carry(
        k=jnp.zeros((), jnp.int32), x=x0, fx=fx0, y=x0,
        best_x=x0, best_fx=fx0, best_y=x0,
        best_res=jnp.where(finite0 & jnp.isfinite(res0), res0, jnp.inf),
        best_step=jnp.zeros((B,), jnp.int32),
        steps=jnp.zeros((B,), jnp.int32),
        active=finite0 & ~conv0 & (limit_k > 0), converged=conv0, nonfinite=nonfinite0, diverged=div0,
        history=jnp.full((B, max_steps + 1), jnp.nan, dtype=res0.dtype).at[:, 0].set(res0),
        ck_y=jnp.zeros((C, B, n), x0.dtype), ck_z=jnp.zeros((C, B, n), x0.dtype),
    )

    def body(c: _Carry) -> _Carry:
        x_new, fx_new, y_new = solver.step(F, c.x, c.fx, c.y, c.active, None)
        res, nf = row_norms(fx_new - x_new, fx_new)
        conv, div, bad = verdict(res, nf)
        upd = c.active & ~bad & ~div
        conv = upd & conv
        better = upd & ((res < c.best_res) | conv)
        k = c.k + 1
        x, y = where_rows(upd, x_new, c.x), where_rows(upd, y_new, c.y)
        ck_y, ck_z = c.ck_y, c.ck_z
        if C:
            slot = jnp.clip(k // every - 1, 0, C - 1)
            keep = (k % every == 0) & (k // every <= C)
            ck_y = ck_y.at[slot].set(jnp.where(keep, y, ck_y[slot]))
            ck_z = ck_z.at[slot].set(jnp.where(keep, x, ck_z[slot]))
        return _Carry(
            k=k, x=x, fx=where_rows(upd, fx_new, c.fx), y=y,
            best_x=where_rows(better, x_new, c.best_x),
            best_fx=where_rows(better, fx_new, c.best_fx),
            best_y=where_rows(better, y_new, c.best_y),
            best_res=jnp.where(better, res, c.best_res),
            best_step=jnp.where(better, k, c.best_step),
            steps=c.steps + c.active.astype(jnp.int32),
            active=upd & ~conv & (k < limit_k),
            converged=c.converged | conv,
            nonfinite=c.nonfinite | (c.active & bad),
            diverged=c.diverged | (c.active & div),
            history=c.history.at[:, k].set(jnp.where(c.active, res, jnp.nan)),
            ck_y=ck_y, ck_z=ck_z,
        )

    c = jax.lax.while_loop(lambda c: (c.k < limit_k) & jnp.any(c.active), body, carry)
    result = _loop.result_codes(c.converged, c.diverged, c.nonfinite)
    best_res = jnp.where(jnp.isfinite(c.best_res), c.best_res, jnp.nan)
    out = _loop.LoopOutput(c.best_x, best_res, c.steps, c.converged, result, c.history, c.best_fx)
    return out, Record(c.best_y, c.best_x, c.best_step, c.ck_y, c.ck_z)


def reverse(solver: ReversibleIteration, fn, params, rec: Record, g: jax.Array, every: int):
    """Backpropagate the cotangent `g` of the returned iterate through the recorded steps.

    Walks the steps back from `max(rec.step)` to 1; a sample joins at its own step index and, at
    every checkpointed step below it, restarts its reconstruction from the stored copy.
    Returns `(x0 cotangent, params cotangent)`.
    """
    b = solver.damping
    C = rec.ck_y.shape[0]
    m = rec.step
    leaves, treedef = jax.tree_util.tree_flatten(params)
    diff = [jnp.issubdtype(jnp.result_type(l), jnp.inexact) for l in leaves]

    def split(tree_leaves):
        return [l for l, d in zip(tree_leaves, diff) if d]

    def vjp_at(x, ct):
        out, vjp = jax.vjp(fn, x, params)
        ct_x, ct_p = vjp(ct)
        return out, ct_x, split(jax.tree_util.tree_leaves(ct_p))

    def body(c):
        t, y, z, ybar, zbar, pbar = c
        if C:
            slot = jnp.clip(t // every - 1, 0, C - 1)
            restart = (t % every == 0) & (t < m)
            y = where_rows(restart, rec.ck_y[slot], y)
            z = where_rows(restart, rec.ck_z[slot], z)
        act = (t <= m)[:, None]
        # z_t = (1 - b) z_{t-1} + b f(y_t)
        fy, a_y, p1 = vjp_at(y, jnp.where(act, b * zbar, 0.0))
        z_prev = jnp.where(act, (z - b * fy) / (1.0 - b), z)
        yhat = ybar + a_y
        # y_t = (1 - b) y_{t-1} + b f(z_{t-1})
        fz, a_z, p2 = vjp_at(z_prev, jnp.where(act, b * yhat, 0.0))
        y_prev = (y - b * fz) / (1.0 - b)
        pbar = [s + u + v for s, u, v in zip(pbar, p1, p2)]
        return (t - 1, jnp.where(act, y_prev, y), z_prev, jnp.where(act, (1.0 - b) * yhat, ybar),
                jnp.where(act, (1.0 - b) * zbar + a_z, zbar), pbar)

    pbar0 = [jnp.zeros_like(l) for l in split(leaves)]
    start = (jnp.max(m), rec.y, rec.z, jnp.zeros_like(g), g, pbar0)
    _, _, _, ybar, zbar, pbar = jax.lax.while_loop(lambda c: c[0] > 0, body, start)
    it = iter(pbar)
    ct = [next(it).astype(jnp.result_type(l)) if d else np.zeros(np.shape(l), jax.dtypes.float0)
          for l, d in zip(leaves, diff)]
    return ybar + zbar, jax.tree_util.tree_unflatten(treedef, ct)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _reversible(fn, solver, every, x0, params, budget):
    out, _ = record(solver, lambda x: fn(x, params), x0, 0, budget)  # no gradient: no checkpoints
    return out.x, out


def _reversible_fwd(fn, solver, every, x0, params, budget):
    out, rec = record(solver, lambda x: fn(x, params), x0, every, budget)
    return (out.x, out), (params, rec)


def _reversible_bwd(fn, solver, every, residuals, cts):
    params, rec = residuals
    g_x0, g_params = reverse(solver, fn, params, rec, cts[0], every)
    return g_x0, g_params, None  # the step budget is an integer: no cotangent


_reversible.defvjp(_reversible_fwd, _reversible_bwd)


__all__ = ["Reversible", "Record", "derived_checkpoint_every", "record", "reverse"]
