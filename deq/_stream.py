"""`deq.fixed_point_stream`: continuous batching of many independent solves (inference).

A plain batched solve (`deq.fixed_point(..., batch_axis=0)`) keeps evaluating `f` on every row
of the batch until its slowest sample has stopped: rows that are done are masked, not skipped.
Streaming keeps `slots` rows busy instead: when a slot's sample stops (converged, `max_steps`,
non-finite or diverged) its result is written out and the next sample of the dataset is loaded
into that slot, inside one compiled `while_loop` with static shapes. A dataset of `N` samples
then costs about `sum_i (steps_i + 1) / slots` evaluations of `f` on `slots` rows, instead of
`sum over batches of (max steps in the batch + 1)`.

The per-row bookkeeping (`Rows`, `start_rows`, `update_rows`) mirrors `deq._loop.run`'s carry
and body, with a per-row step counter so rows may start at different times; the stopping test
and result codes are `deq._loop.make_verdict` / `result_codes`, so a streamed sample is judged
exactly like one of `fixed_point(..., batch_axis=0)`. `deq._compact` reuses the same helpers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import _tree
from ._api import check_positive_int, strict_kwargs
from ._errors import clean_errors
from ._loop import DIVERGENCE_LIMIT, LoopOutput, make_verdict, result_codes
from ._solution import Solution, Stats
from ._tree import row_norms, where_rows
from .backward._base import report
from .solvers import GMRES, AbstractSolver, Anderson
from .solvers._base import Best

__all__ = ["fixed_point_stream"]


# ----------------------------------------------------------------------------------------------
# Per-row solve state shared by streaming and compaction.
# ----------------------------------------------------------------------------------------------


class Rows(NamedTuple):
    """The driver's per-row state (`deq._loop.run`'s carry, every leaf with leading axis `S`).

    `steps` counts each row's own steps, so rows that started at different loop iterations
    (a refilled slot) are judged by their own budget; `scale0` is each row's start scale
    `max(||x0||, ||f(x0)||)` for the stopping test.
    """

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
    scale0: jax.Array


def _verdict(solver, scale0):
    return make_verdict(solver.atol, solver.rtol, getattr(solver, "divergence_limit", DIVERGENCE_LIMIT), scale0)


def start_rows(solver, x0, fx0, res0, nf0, n0, state) -> Rows:
    """Rows at their starting point `x0` (with `fx0 = F(x0)`, `res0 = ||fx0 - x0||`,
    `nf0 = ||fx0||`, `n0 = ||x0||`) and solver `state = solver.init(F, x0, fx0)`: the initial
    carry of `deq._loop.run`."""
    scale0 = jnp.maximum(n0, nf0)
    conv0, div0, nonfinite0 = _verdict(solver, scale0)(res0, nf0)
    finite0 = ~nonfinite0 & ~div0
    history = jnp.full((x0.shape[0], solver.max_steps + 1), jnp.nan, res0.dtype).at[:, 0].set(res0)
    return Rows(
        x=x0, fx=fx0, state=state, best_x=x0, best_fx=fx0,
        best_res=jnp.where(finite0 & jnp.isfinite(res0), res0, jnp.inf),
        steps=jnp.zeros(x0.shape[:1], jnp.int32), active=finite0 & ~conv0, converged=conv0,
        nonfinite=nonfinite0, diverged=div0, history=history, scale0=scale0,
    )


def init_rows(solver, F, x0) -> Rows:
    """`start_rows` at `x0`, evaluating `F(x0)` (one evaluation)."""
    fx0 = F(x0)
    res0, nf0, n0 = jax.lax.stop_gradient(row_norms(fx0 - x0, fx0, x0))
    return start_rows(solver, x0, fx0, res0, nf0, n0, solver.init(F, x0, fx0))


def step_rows(solver, F, r: Rows):
    """One solver step on every row: `(x_new, F(x_new), state)` (inactive rows are left alone by
    the `update_rows` that follows)."""
    x_new, fx_new, state = solver.step(F, r.x, r.fx, r.state, r.active, Best(r.best_x, r.best_fx, r.best_res))
    return x_new, fx_new, state


def update_rows(solver, r: Rows, x_new, fx_new, state, res, nf) -> Rows:
    """The driver's update after a step (`deq._loop.run`'s loop body, per-row step counts)."""
    conv, div, bad = _verdict(solver, r.scale0)(res, nf)
    upd = r.active & ~bad & ~div
    conv = upd & conv
    better = upd & ((res < r.best_res) | conv)
    steps = r.steps + r.active.astype(jnp.int32)
    col = jnp.where(r.active, steps, solver.max_steps + 1)  # out of bounds: dropped
    return Rows(
        x=where_rows(upd, x_new, r.x), fx=where_rows(upd, fx_new, r.fx), state=state,
        best_x=where_rows(better, x_new, r.best_x), best_fx=where_rows(better, fx_new, r.best_fx),
        best_res=jnp.where(better, res, r.best_res), steps=steps,
        active=upd & ~conv & (steps < solver.max_steps), converged=r.converged | conv,
        nonfinite=r.nonfinite | (r.active & bad), diverged=r.diverged | (r.active & div),
        history=r.history.at[jnp.arange(r.x.shape[0]), col].set(res, mode="drop"), scale0=r.scale0,
    )


def final_outputs(r: Rows):
    """`(value rows, residual, num_steps, converged, result, history, fx)` of finished rows, as
    `deq._loop.run` reports them."""
    best_res = jnp.where(jnp.isfinite(r.best_res), r.best_res, jnp.nan)
    return (r.best_x, best_res, r.steps, r.converged, result_codes(r.converged, r.diverged, r.nonfinite),
            r.history, r.best_fx)


def run_buckets(solver, F, r: Rows, idx, xs_rows, sizes, outs):
    """Run `r` to the end through shrinking buckets: on `sizes[0]` rows until at most `sizes[1]`
    are active, then on those gathered into `sizes[1]` rows, and so on; the last bucket runs until
    every row has stopped. `F(x, xs_rows)` evaluates the packed map on any number of rows. After
    each bucket its rows are written into the per-sample `outs` (the first `len(outs)` of
    `final_outputs`) at their sample indices `idx` (an index past the end is dropped)."""
    for j in range(len(sizes)):
        smaller = sizes[j + 1] if j + 1 < len(sizes) else 0

        def body(r, xs_rows=xs_rows):
            x_new, fx_new, state = step_rows(solver, lambda x: F(x, xs_rows), r)
            res, nf = jax.lax.stop_gradient(row_norms(fx_new - x_new, fx_new))
            return update_rows(solver, r, x_new, fx_new, state, res, nf)

        def cond(r, smaller=smaller):
            n_active = jnp.sum(r.active.astype(jnp.int32))
            return (n_active > 0) & (n_active > smaller)

        r = jax.lax.while_loop(cond, body, r)
        outs = tuple(o.at[idx].set(v, mode="drop") for o, v in zip(outs, final_outputs(r)))
        if smaller:
            keep = jnp.argsort(~r.active, stable=True)[:smaller]  # every active row, then stopped ones
            r, idx, xs_rows = take_rows(r, keep), idx[keep], take_rows(xs_rows, keep)
    return outs


def halvings(n: int, k: int, smallest: int = 1) -> tuple:
    """`(n, ceil(n/2), ..., ceil(n/2^k))`, without repeats or sizes below `smallest` (n kept)."""
    out = [n]
    for i in range(1, k + 1):
        b = math.ceil(n / 2 ** i)
        if b < smallest or b >= out[-1]:
            break
        out.append(b)
    return tuple(out)


def convert_per_size(owner: str, f, z0, args, xs, sizes):
    """`jax.closure_convert` of `f(z, args, x)` at each row count of `sizes` (each traces `f` at
    its shape): `({size: f_conv}, consts)`. The conversions must hoist the same closed-over arrays,
    which then travel as explicit inputs (so they are differentiated, or refused, like `args`)."""
    convs, consts = {}, None
    for b in sizes:
        rows = jnp.arange(b)
        conv, c = jax.closure_convert(f, take_rows(z0, rows), args, take_rows(xs, rows))
        if consts is None:
            consts = c
        elif len(c) != len(consts) or any(a is not b_ for a, b_ in zip(c, consts)):
            raise ValueError(f"{owner}: `f` closes over different arrays at different batch sizes. Pass the "
                             "arrays f uses through `args` (shared) or `xs` (per sample) instead.")
        convs[b] = conv
    return convs, tuple(consts)


def packed_map(packer, convs):
    """`fn(x, (args, x_rows, consts))`: the packed map on any of the converted row counts."""
    def fn(x, params):
        a, xr, c = params
        pk = dataclasses.replace(packer, batch=x.shape[0])
        return pk.pack(convs[x.shape[0]](pk.unpack(x), a, xr, *c))

    return fn


# ----------------------------------------------------------------------------------------------
# Argument checks shared with deq._compact.
# ----------------------------------------------------------------------------------------------


def _describe(tree) -> str:
    leaves = jax.tree_util.tree_leaves(tree)
    parts = [f"{jnp.dtype(jnp.result_type(l)).name}{list(jnp.shape(l))}" for l in leaves]
    return f"{jax.tree_util.tree_structure(tree)} with leaves {', '.join(parts)}"


def check_per_sample(owner: str, f, z0, args, xs, solver, throw) -> int:
    """Validate `f(z, args, x)`, `z0` and the per-sample inputs `xs`; return the sample count `N`."""
    if not callable(f):
        raise TypeError(f"{owner}: `f` must be callable as f(z, args, x) -> z (x: the samples' own inputs), "
                        f"got {type(f).__name__}.")
    if isinstance(solver, GMRES) or not isinstance(solver, AbstractSolver):
        raise TypeError(f"{owner}: `solver` must be a forward fixed-point solver such as deq.Anderson(), "
                        f"deq.Broyden() or deq.FixedPointIteration(), got {solver!r}.")
    if not isinstance(throw, bool):
        raise TypeError(f"{owner}: `throw` must be a bool, got {throw!r}. Pass True or False.")
    leaves = jax.tree_util.tree_leaves(z0)
    if not leaves:
        raise ValueError(f"{owner}: `z0` has no array leaves. Pass the initial states, e.g. jnp.zeros((N, n)).")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"{owner}: every leaf of `z0` must be floating point, got {_describe(z0)}. "
                            "Cast it, e.g. z0.astype(jnp.float32).")
    lead = {jnp.shape(l)[0] if jnp.ndim(l) else None for l in leaves}
    if None in lead or len(lead) != 1:
        raise ValueError(f"{owner}: every leaf of `z0` needs the same leading (sample) axis, got {_describe(z0)}. "
                         "Give every leaf a leading axis of length N, the number of samples.")
    (n,) = lead
    x_leaves = jax.tree_util.tree_leaves(xs)
    if not x_leaves:
        raise ValueError(f"{owner}: `xs` has no array leaves: it holds the samples' own inputs with leading "
                         f"axis N = {n}. Pass e.g. xs=x of shape (N, d); shared inputs go in `args`.")
    bad = [l for l in x_leaves if jnp.ndim(l) == 0 or jnp.shape(l)[0] != n]
    if bad:
        raise ValueError(f"{owner}: every leaf of `xs` needs leading axis N = {n} (that of `z0`), got "
                         f"{_describe(xs)}. Put per-sample inputs in `xs` with the samples on axis 0, and "
                         "inputs shared by all samples (parameters) in `args`.")
    return n


def check_output(owner: str, f, z_rows, args, x_rows) -> None:
    out = jax.eval_shape(f, z_rows, args, x_rows)
    want = jax.tree_util.tree_map(lambda l: jax.ShapeDtypeStruct(jnp.shape(l), jnp.result_type(l)), z_rows)
    if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(want) or any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(want))
    ):
        raise ValueError(f"{owner}: `f` must return a pytree shaped like its state `z`: on a batch of rows "
                         f"it returned {_describe(out)}, expected {_describe(want)}. Make f(z, args, x) "
                         "return the structure, shapes and dtypes of z (cast with .astype if only the dtype differs).")


def take_rows(tree, idx):
    """Rows `idx` of every leaf of `tree` (leading axis = samples)."""
    return jax.tree_util.tree_map(lambda l: jnp.take(l, idx, axis=0, mode="clip"), tree)


def hashable(f):
    try:
        hash(f)
        return f
    except TypeError:
        return (lambda g: lambda z, a, x: g(z, a, x))(f)


# ----------------------------------------------------------------------------------------------
# Streaming.
# ----------------------------------------------------------------------------------------------


class _Stream(NamedTuple):
    rows: Rows
    slot: jax.Array  # (S,) sample index held by each slot; N when the slot is empty
    loading: jax.Array  # (S,) the slot's sample was just loaded: its start is evaluated next
    n_load: jax.Array  # (S,) ||x0|| of the loaded sample
    xs_slot: Any  # per-slot rows of xs
    next: jax.Array  # () next sample to load
    out: tuple  # (value (N, n), residual, num_steps, converged, result, history)


def _stream_solve(fn, solver, sizes, z0, params, xs):
    """The compiled streaming loop; returns `(value pytree, LoopOutput over N samples)`.

    `fn(x, (args, x_rows, consts))` is the packed map on any row count of `sizes`, and
    `params = (args, consts)`. Slots are refilled until every sample has been loaded and started;
    the slots still running then finish through the shrinking buckets `sizes` (`run_buckets`),
    so the tail of slow samples does not keep every slot's row busy.
    """
    args, consts = params
    packer = _tree.make_packer(z0, 0)
    N = packer.rows
    S = sizes[0]
    X0 = packer.pack(z0)
    n0_all = row_norms(X0)[0]

    def F(x, x_rows):
        return fn(x, (args, x_rows, consts))

    first = jnp.arange(S)
    x_first = X0[:S]
    xs_first = take_rows(xs, first)
    dtype = X0.dtype
    state0 = solver.init(lambda x: F(x, xs_first), x_first, x_first)
    rows0 = Rows(
        x=x_first, fx=x_first, state=state0, best_x=x_first, best_fx=x_first,
        best_res=jnp.full((S,), jnp.inf, dtype), steps=jnp.zeros((S,), jnp.int32),
        active=jnp.zeros((S,), bool), converged=jnp.zeros((S,), bool), nonfinite=jnp.zeros((S,), bool),
        diverged=jnp.zeros((S,), bool), history=jnp.full((S, solver.max_steps + 1), jnp.nan, dtype),
        scale0=jnp.ones((S,), dtype),
    )
    out0 = (jnp.zeros_like(X0), jnp.zeros((N,), dtype), jnp.zeros((N,), jnp.int32), jnp.zeros((N,), bool),
            jnp.zeros((N,), jnp.int32), jnp.full((N, solver.max_steps + 1), jnp.nan, dtype))
    c0 = _Stream(rows0, first.astype(jnp.int32), jnp.ones((S,), bool), n0_all[:S], xs_first,
                 jnp.asarray(S, jnp.int32), out0)

    def body(c: _Stream) -> _Stream:
        r, load = c.rows, c.loading
        # A loading row is inactive (the solver proposes its x unchanged); substituting its start
        # into every evaluation makes sure that the one evaluation of f this iteration gives
        # f(x0) for it, whatever the solver proposes for inactive rows.
        Fs = lambda x: F(where_rows(load, r.x, x), c.xs_slot)  # noqa: E731
        x_new, fx_new, state = step_rows(solver, Fs, r)
        x_new = where_rows(load, r.x, x_new)
        res, nf = jax.lax.stop_gradient(row_norms(fx_new - x_new, fx_new))
        stepped = update_rows(solver, r, x_new, fx_new, state, res, nf)
        # Loaded rows start here, with a fresh solver state (Anderson's or Broyden's history is
        # per slot and begins again with the new sample).
        state = jax.lax.cond(jnp.any(load), lambda: where_rows(load, solver.init(Fs, x_new, fx_new), state),
                             lambda: state)
        fresh = start_rows(solver, x_new, fx_new, res, nf, c.n_load, state)
        rows = where_rows(load, fresh._replace(state=state), stepped._replace(state=state))
        # Write out the samples that stopped, then load the next ones into their slots.
        valid = c.slot < N
        done = valid & ~rows.active
        dest = jnp.where(done, c.slot, N)
        out = tuple(o.at[dest].set(v, mode="drop") for o, v in zip(c.out, final_outputs(rows)))
        new = (c.next + jnp.cumsum(done.astype(jnp.int32)) - 1).astype(jnp.int32)
        take = done & (new < N)
        idx = jnp.where(take, new, 0)
        slot = jnp.where(done, jnp.where(take, new, N), c.slot).astype(jnp.int32)
        rows = rows._replace(x=where_rows(take, X0[idx], rows.x))
        xs_slot = where_rows(take, take_rows(xs, idx), c.xs_slot)
        n_load = jnp.where(take, n0_all[idx], c.n_load)
        nxt = (c.next + jnp.sum(take.astype(jnp.int32))).astype(jnp.int32)
        return _Stream(rows, slot, take, n_load, xs_slot, nxt, out)

    # Refill while samples are left to load (or a loaded one has not started); every slot that
    # still holds a sample is then active.
    c = jax.lax.while_loop(lambda c: jnp.any(c.slot < N) & ((c.next < N) | jnp.any(c.loading)), body, c0)
    # An empty slot holds an inactive row: run_buckets writes it at index N, which is dropped.
    out = run_buckets(solver, F, c.rows, c.slot, c.xs_slot, sizes, c.out)
    value, residual, steps, converged, result, history = out
    # fx is not kept per sample (no adjoint follows); `report` does not read it.
    loop_out = LoopOutput(value, residual, steps, converged, result, history, value)
    return packer.unpack(value), loop_out


def _refuse_jvp(f, solver, slots, primals, tangents):
    raise TypeError(
        "fixed_point_stream is for inference and is not differentiable: its slots are refilled "
        "in an order that depends on convergence, and it keeps no adjoint. Differentiate "
        "deq.fixed_point(..., batch_axis=0) (or deq.fixed_point_compact for a training batch), or "
        "wrap the inputs of fixed_point_stream in jax.lax.stop_gradient if no gradient is wanted."
    )


_stream_nodiff = jax.custom_jvp(_stream_solve, nondiff_argnums=(0, 1, 2))
_stream_nodiff.defjvp(_refuse_jvp)


def _impl(f, z0, args, xs, solver, slots, tail_buckets, throw):
    N = check_per_sample("fixed_point_stream", f, z0, args, xs, solver, throw)
    if N == 0:
        from ._fixed_point import _empty_solution

        return _empty_solution(z0, solver, _tree.make_packer(z0, 0).dtype)
    S = min(slots, N)
    z_rows, x_rows = take_rows(z0, jnp.arange(S)), take_rows(xs, jnp.arange(S))
    check_output("fixed_point_stream", f, z_rows, args, x_rows)
    sizes = halvings(S, tail_buckets, smallest=min(S, 8))
    # Closed-over arrays become explicit inputs, so differentiating through them is refused too.
    convs, consts = convert_per_size("fixed_point_stream", f, z0, args, xs, sizes)
    fn = packed_map(_tree.make_packer(z0, 0), convs)
    value, out = _stream_nodiff(fn, solver, sizes, z0, (args, consts), xs)
    if throw:
        value_flat = report("the streamed forward solve", out, out.x, throw=True, warn=False)
        value = _tree.make_packer(z0, 0).unpack(value_flat)
    stats = Stats(num_steps=out.num_steps, residual_norm=out.residual, converged=out.converged,
                  result=out.result, residual_history=out.history)
    return Solution(value=value, stats=stats)


_impl_jit = jax.jit(_impl, static_argnums=(0, 4, 5, 6, 7))


@strict_kwargs
def fixed_point_stream(f, z0, args, xs, *, solver=None, slots: int = 64, tail_buckets: int = 4,
                       throw: bool = False) -> Solution:
    r"""Solve `z_i = f(z_i, args, x_i)` for every sample `i` of a dataset, keeping `slots` rows busy.

    Continuous batching for inference: the solver runs on `slots` rows at a time; when a row's
    sample stops (converged, `max_steps`, non-finite or diverged) its result is written out and
    the next sample is loaded into that row, with a fresh solver state (Anderson's and Broyden's
    histories are per row and restart with the new sample), inside one compiled `while_loop`
    with static shapes (once the dataset is exhausted, the last running slots are compacted into
    smaller buckets, see `tail_buckets`). A plain batch of `B` samples costs `max_i steps_i + 1` evaluations of `f`
    on `B` rows; streaming costs about

    .. math:: \frac{1}{\text{slots}} \sum_{i=1}^{N} (\text{steps}_i + 1)

    evaluations of `f` on `slots` rows (plus a tail when fewer than `slots` samples are left),
    so a dataset whose step counts vary is solved at the cost of the mean, not of the slowest
    sample of each batch. Each sample is judged by the stopping test of
    `deq.fixed_point(..., batch_axis=0)` (see there) with the same solver and returns the same
    result: the same step counts for plain iteration and the same converged set, values equal up
    to rounding (a batch of different rows can round differently inside `f`).

    Not differentiable: under `jax.grad`/`jax.jvp` it raises a `TypeError` (use
    `deq.fixed_point` or `deq.fixed_point_compact` to train). `jax.jit` compiles it once per
    shape: datasets of the same shapes reuse the compiled loop.

    Args:
      f: the cell, `f(z, args, x) -> z`, applied to a batch of rows: `z` and `x` are the rows of
        the state and of `xs` held by the slots (leading axis `slots`); it must act on each row
        alone (as under `batch_axis=0`) and return the structure, shapes and dtypes of `z`.
      z0: the initial states, a pytree of floating arrays with leading axis `N`.
      args: inputs shared by every sample (parameters); any pytree.
      xs: the samples' own inputs (the injections), a pytree whose leaves have leading axis `N`.
      solver: forward solver (default `deq.Anderson()`); its `rtol`, `atol`, `max_steps` apply
        to each sample.
      slots: rows solved at a time (at most `N` are used). More slots give more parallel work
        per evaluation of `f`; fewer waste less on the tail of slow samples.
      tail_buckets: once every sample has been loaded, the slots still running are gathered
        into buckets of `slots/2`, `slots/4`, ... rows (at most this many halvings, none below 8
        rows) as they finish, as `deq.fixed_point_compact` does for a training batch, so the
        last slow samples do not keep every row busy. 0 keeps all slots to the end.
      throw: raise a `deq.SolveError` when some sample does not converge.

    Returns:
      A `Solution` with `value` shaped like `z0` and per-sample `stats` of leading axis `N`
      (`num_steps`, `residual_norm`, `converged`, `result`, `residual_history`).

    Example:
      >>> import jax.numpy as jnp, deq
      >>> rate = jnp.array([0.1, 0.5, 0.9, 0.97, 0.3])  # per-sample contraction
      >>> f = lambda z, args, r: r[:, None] * z + 1.0
      >>> sol = deq.fixed_point_stream(f, jnp.zeros((5, 2)), None, rate, slots=2,
      ...                              solver=deq.FixedPointIteration(max_steps=1000))
      >>> sol.stats.num_steps.tolist(), bool(sol.stats.converged.all())
      ([5, 16, 88, 263, 10], True)
      >>> plain = deq.fixed_point(lambda z, r: f(z, None, r), jnp.zeros((5, 2)), rate, batch_axis=0,
      ...                         solver=deq.FixedPointIteration(max_steps=1000))
      >>> (plain.stats.num_steps == sol.stats.num_steps).all().item()
      True

    References:
      Yu et al., "Orca: A distributed serving system for transformer-based generative models"
      (iteration-level scheduling, i.e. continuous batching), OSDI 2022.
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """
    solver = Anderson() if solver is None else solver
    check_positive_int("fixed_point_stream", "slots", slots, example=64)
    if isinstance(tail_buckets, bool) or not isinstance(tail_buckets, int) or tail_buckets < 0:
        raise ValueError(f"fixed_point_stream: `tail_buckets` must be an integer >= 0 (halvings of the slots once "
                         f"every sample is loaded), got {tail_buckets!r}. Pass e.g. tail_buckets=4 (0: no compaction).")
    z0 = jax.tree_util.tree_map(jnp.asarray, z0)
    xs = jax.tree_util.tree_map(jnp.asarray, xs)
    try:
        hash(f)
        impl = _impl_jit
    except TypeError:  # an unhashable f cannot key the compilation cache: trace each call
        impl, f = _impl, hashable(f)
    call = (f, z0, args, xs, solver, slots, tail_buckets, throw)
    if not throw or any(isinstance(l, jax.core.Tracer) for l in jax.tree_util.tree_leaves((z0, args, xs))):
        return impl(*call)
    with clean_errors():
        return jax.block_until_ready(impl(*call))
