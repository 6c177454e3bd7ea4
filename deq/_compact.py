"""`deq.fixed_point_compact`: a training batch whose still-active rows shrink into smaller buckets.

A training batch cannot be refilled (every sample's fixed point is needed for this step's
loss), but once most of its samples have converged the rest can be gathered into a smaller
static shape: the forward loop runs on `B` rows until at most `B/2` are active, gathers those
(with their solver state, best iterate and statistics) into `B/2` rows, and so on down the
bucket sizes, so late steps evaluate `f` on a fraction of the batch. Each bucket is a
`while_loop` of static shape, so the whole forward is one compiled program. The gradient is the
implicit function theorem's, through the same adjoint as `deq.IFT` (`IFT.adjoint`), solved on
the full batch at `z*`: the forward value, statistics and gradients equal those of
`deq.fixed_point(..., batch_axis=0, backward=deq.IFT(...))`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import _tree
from ._api import strict_kwargs
from ._errors import clean_errors
from ._loop import LoopOutput
from ._solution import Solution, Stats
from ._stream import (check_output, check_per_sample, convert_per_size, final_outputs, halvings, hashable,
                      init_rows, packed_map, run_buckets)
from ._tree import row_norm
from .backward import IFT
from .backward._base import report
from .solvers import Anderson

__all__ = ["fixed_point_compact"]


def bucket_sizes(owner: str, B: int, buckets) -> tuple:
    """The static row counts `(B, b_1, b_2, ...)`, strictly decreasing, from `buckets`."""
    if isinstance(buckets, bool) or not isinstance(buckets, (int, tuple, list)):
        raise TypeError(f"{owner}: `buckets` must be an int (the number of halvings of the batch) or a tuple of "
                        f"bucket sizes, got {buckets!r}. Pass e.g. buckets=3 (B, B/2, B/4, B/8) or buckets=(32, 8).")
    if isinstance(buckets, int):
        if buckets < 0:
            raise ValueError(f"{owner}: `buckets` must be >= 0 halvings, got {buckets}. Pass e.g. buckets=3 "
                             "(0 runs the whole solve on the full batch).")
        return halvings(B, buckets)
    else:
        sizes = list(buckets)
        bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s < B]
        if bad or any(a <= b for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"{owner}: `buckets` sizes must be integers strictly decreasing within [1, B) for "
                             f"a batch of B = {B}, got {tuple(buckets)!r}. Pass e.g. buckets=({max(B // 2, 1)},).")
        sizes = [B] + sizes
    return tuple(sizes)


def _forward(fn, solver, sizes, x0, params):
    """The compacted forward loop: a `LoopOutput` over the `B` rows of `x0`."""
    args, xs, consts = params
    B = x0.shape[0]
    r = init_rows(solver, lambda x: fn(x, params), x0)
    outs = tuple(jnp.zeros((B,) + v.shape[1:], v.dtype) for v in final_outputs(r))
    F = lambda x, x_rows: fn(x, (args, x_rows, consts))  # noqa: E731
    return LoopOutput(*run_buckets(solver, F, r, jnp.arange(B), xs, sizes, outs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _compact_ift(fn, solver, sizes, backward, throw, x0, params):
    out = _forward(fn, solver, sizes, x0, params)
    return out.x, out


def _compact_ift_fwd(fn, solver, sizes, backward, throw, x0, params):
    x_star, out = _compact_ift(fn, solver, sizes, backward, throw, x0, params)
    return (x_star, out), (x_star, params, row_norm(out.fx))


def _compact_ift_bwd(fn, solver, sizes, backward, throw, residuals, cts):
    # The adjoint of deq.IFT, on the full batch at z* (as deq.backward.ift's _ift_bwd).
    x_star, params, fx_norm = residuals
    _, vjp = jax.vjp(fn, x_star, params)
    u, _ = backward.adjoint(fn, x_star, params, cts[0], throw, vjp=vjp, forward=solver, fx_norm=fx_norm)
    return jnp.zeros_like(x_star), vjp(u)[1]


_compact_ift.defvjp(_compact_ift_fwd, _compact_ift_bwd)


def _impl(f, z0, args, xs, solver, backward, buckets, throw):
    owner = "fixed_point_compact"
    B = check_per_sample(owner, f, z0, args, xs, solver, throw)
    if not isinstance(backward, IFT):
        raise TypeError(f"{owner}: `backward` must be a deq.IFT (implicit differentiation at z*, which does not "
                        f"depend on how the forward loop ran), got {backward!r}. For phantom gradients, JFB or "
                        "unrolling use deq.fixed_point(..., batch_axis=0).")
    sizes = bucket_sizes(owner, B, buckets)
    packer = _tree.make_packer(z0, 0)
    if B == 0:
        from ._fixed_point import _empty_solution

        return _empty_solution(z0, solver, packer.dtype)
    check_output(owner, f, z0, args, xs)
    convs, consts = convert_per_size(owner, f, z0, args, xs, sizes)
    fn = packed_map(packer, convs)

    x_star, out = _compact_ift(fn, solver, sizes, backward, throw, packer.pack(z0), (args, xs, consts))
    if throw:
        x_star = report("the forward solve", out, x_star, throw=True, warn=False)
    out = jax.lax.stop_gradient(out)
    stats = Stats(num_steps=out.num_steps, residual_norm=out.residual, converged=out.converged,
                  result=out.result, residual_history=out.history)
    return Solution(value=packer.unpack(x_star), stats=stats)


_impl_jit = jax.jit(_impl, static_argnums=(0, 4, 5, 6, 7))


@strict_kwargs
def fixed_point_compact(f, z0, args, xs, *, solver=None, backward=None, buckets=3, throw: bool = False) -> Solution:
    r"""Solve a training batch `z_i = f(z_i, args, x_i)`, compacting still-active rows as samples converge.

    The forward loop runs on the whole batch of `B` rows until at most `b_1` samples are still
    active, gathers those into a bucket of `b_1` rows (their iterates, solver state, best
    iterate and statistics move with them), runs until at most `b_2` are active, and so on; the
    last bucket runs until every sample has stopped. With `buckets=k` the sizes are
    `B, ceil(B/2), ..., ceil(B/2^k)`. A step on a bucket of `b` rows costs about `b/B` of a step
    on the batch, so when a few samples need many more steps than the rest, the late steps are
    cheap. Each sample's steps, stopping test and result are those of
    `deq.fixed_point(..., batch_axis=0)`; the gradient is the implicit function theorem's (the
    adjoint of `deq.IFT`, solved on the full batch at `z*`), equal to that of the plain solve.

    `xs` tells the library which inputs are per sample (like `jax.vmap`'s `in_axes=0`): their
    rows are gathered with the samples; `args` is shared by all rows. Gradients reach both.

    Args:
      f: the cell, `f(z, args, x) -> z` on a batch of rows (`z` and `x` with the same leading
        axis, `B` or a bucket size); it must act on each row alone.
      z0: the initial states, a pytree of floating arrays with leading axis `B`.
      args: inputs shared by every sample (parameters); any pytree.
      xs: the samples' own inputs (the injections), a pytree with leading axis `B`.
      solver: forward solver (default `deq.Anderson()`).
      backward: a `deq.IFT` (the default `deq.IFT()`): its adjoint solver and warnings apply.
      buckets: the number of halvings (an int, default 3), or the tuple of bucket sizes below
        `B`, strictly decreasing. 0 runs every step on the full batch.
      throw: raise a `deq.SolveError` when a forward solve does not converge.

    Returns:
      A `Solution`: `value` shaped like `z0`, per-sample `stats` of leading axis `B` (no gradient).

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> f = lambda z, w, x: jnp.tanh(w * z + x)
      >>> x = jnp.linspace(-1.0, 1.0, 8)[:, None] * jnp.ones((8, 3))
      >>> solver = deq.FixedPointIteration()
      >>> sol = deq.fixed_point_compact(f, jnp.zeros((8, 3)), 0.5, x, solver=solver, buckets=1)
      >>> plain = deq.fixed_point(lambda z, a: f(z, *a), jnp.zeros((8, 3)), (0.5, x), solver=solver, batch_axis=0)
      >>> sol.stats.num_steps.tolist() == plain.stats.num_steps.tolist(), bool(jnp.allclose(sol.value, plain.value))
      (True, True)
      >>> # jax.grad of a loss of sol.value gives the plain solve's IFT gradient (tests/test_compact.py)

    References:
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """
    solver = Anderson() if solver is None else solver
    backward = IFT() if backward is None else backward
    if isinstance(buckets, list):
        buckets = tuple(buckets)
    z0 = jax.tree_util.tree_map(jnp.asarray, z0)
    xs = jax.tree_util.tree_map(jnp.asarray, xs)
    try:
        hash(f)
        impl = _impl_jit
    except TypeError:
        impl, f = _impl, hashable(f)
    call = (f, z0, args, xs, solver, backward, buckets, throw)
    if not throw or any(isinstance(l, jax.core.Tracer) for l in jax.tree_util.tree_leaves((z0, args, xs))):
        return impl(*call)
    with clean_errors():
        return jax.block_until_ready(impl(*call))
