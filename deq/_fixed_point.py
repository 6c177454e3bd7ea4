"""`deq.fixed_point`: the one entry point for solving and differentiating `z* = f(z*, args)`."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import _tree
from ._api import strict_kwargs
from ._errors import clean_errors, raise_from_callback
from ._solution import Solution, Stats
from .backward import IFT, AbstractBackward
from .backward._base import report
from .solvers import GMRES, AbstractSolver, Anderson


def _describe(tree) -> str:
    leaves = jax.tree_util.tree_leaves(tree)
    parts = [f"{jnp.dtype(l.dtype).name}{list(l.shape)}" for l in leaves]
    return f"{jax.tree_util.tree_structure(tree)} with leaves {', '.join(parts)}"


def _validate(f, z0, args, solver, backward, batch_axis, throw, check_batch=False):
    if not callable(f):
        raise TypeError(f"fixed_point: `f` must be callable as f(z, args) -> z, got {type(f).__name__}.")
    if isinstance(solver, GMRES):
        raise TypeError(
            "fixed_point: `solver` deq.GMRES solves linear systems and is only available for the "
            "backward pass. Pass solver=deq.Anderson() (or Broyden / FixedPointIteration), and "
            "backward=deq.IFT(solver=deq.GMRES()) for a GMRES adjoint."
        )
    if not isinstance(solver, AbstractSolver):
        raise TypeError(
            f"fixed_point: `solver` must be a deq solver such as deq.Anderson(), got {solver!r}. "
            "For a jaxopt solver, wrap it with deq.JaxoptSolver(...)."
        )
    if not isinstance(backward, AbstractBackward):
        raise TypeError(
            f"fixed_point: `backward` must be a deq backward strategy (deq.IFT(), deq.PhantomGrad(), "
            f"deq.JFB(), deq.Unrolled(), deq.Reversible() or deq.SHINE()), got {backward!r}."
        )
    if batch_axis not in (None, 0) or isinstance(batch_axis, bool):
        raise ValueError(
            f"fixed_point: `batch_axis` must be None (one problem) or 0 (leading axis indexes "
            f"independent problems), got {batch_axis!r}. Move the batch axis to the front and pass 0."
        )
    if not isinstance(throw, bool):
        raise TypeError(f"fixed_point: `throw` must be a bool, got {throw!r}.")
    if not isinstance(check_batch, bool):
        raise TypeError(f"fixed_point: `check_batch` must be a bool, got {check_batch!r}. Pass True or False.")
    if check_batch and batch_axis is None:
        raise ValueError("fixed_point: `check_batch=True` checks that f keeps the samples of batch_axis=0 apart, "
                         "but batch_axis is None. Pass batch_axis=0, or drop check_batch.")
    leaves = jax.tree_util.tree_leaves(z0)
    if not leaves:
        raise ValueError("fixed_point: `z0` has no array leaves. Pass the initial state, e.g. jnp.zeros(n).")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"fixed_point: every leaf of `z0` must be floating point (real, not complex), got {_describe(z0)}. "
                "Cast it, e.g. z0.astype(jnp.float32) (for a complex state, stack its real and "
                "imaginary parts)."
            )
    if batch_axis == 0:
        sizes = {jnp.shape(l)[0] if jnp.ndim(l) else None for l in leaves}
        if None in sizes or len(sizes) != 1:
            raise ValueError(
                f"fixed_point: with batch_axis=0 every leaf of `z0` needs the same leading (batch) "
                f"size, got {_describe(z0)}. Give every leaf a leading batch axis, or pass batch_axis=None."
            )
    out = jax.eval_shape(f, z0, args)
    want = jax.tree_util.tree_map(lambda l: jax.ShapeDtypeStruct(jnp.shape(l), jnp.result_type(l)), z0)
    if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(want) or any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(want))
    ):
        raise ValueError(
            f"fixed_point: `f` must return a pytree shaped like `z0`: got {_describe(out)}, "
            f"expected {_describe(want)}. Make f(z, args) return the same structure, shapes and "
            "dtypes as z0 (cast with .astype if only the dtype differs)."
        )


def _check_budget(max_steps, solver):
    """Validate a runtime step budget; return it as an int32 scalar array (or None)."""
    if max_steps is None:
        return None
    if isinstance(max_steps, bool) or not (isinstance(max_steps, int) or hasattr(max_steps, "dtype")):
        raise TypeError(
            f"fixed_point: `max_steps` (the runtime step budget) must be an integer or an integer "
            f"scalar array, got {max_steps!r}. Pass e.g. max_steps=10, or max_steps=jnp.int32(k) "
            f"inside a jitted function."
        )
    if hasattr(max_steps, "dtype"):
        if not jnp.issubdtype(max_steps.dtype, jnp.integer) or jnp.shape(max_steps) != ():
            raise TypeError(
                f"fixed_point: `max_steps` (the runtime step budget) must be an integer scalar, got "
                f"{jnp.dtype(max_steps.dtype).name}{list(jnp.shape(max_steps))}. Pass e.g. "
                f"jnp.asarray(k, jnp.int32); to sweep budgets, jax.vmap over a vector of them."
            )
    if not isinstance(max_steps, jax.core.Tracer):
        k = int(max_steps)
        if not 0 <= k <= solver.max_steps:
            raise ValueError(
                f"fixed_point: `max_steps` (the runtime step budget) must lie in [0, "
                f"solver.max_steps] = [0, {solver.max_steps}], got {k}. The solver's max_steps is the "
                f"static upper bound (it sizes the residual history): build the solver with "
                f"max_steps={max(k, 1)} or more, e.g. {type(solver).__name__}(max_steps={max(k, 1)}), "
                f"and pass budgets up to it."
            )
    return jnp.asarray(max_steps, jnp.int32)


@dataclasses.dataclass(frozen=True)
class _StatePart:
    """`f(z, args)[0]` for a cell `f` returning `(z, aux)`; hashable (and equal) when `f` is, so
    the compiled solve is reused across calls with the same `f`."""

    f: Callable

    def __call__(self, z, args):
        return self.f(z, args)[0]


def _split_aux(f, z0, args):
    """Check that `f(z, args)` returns a pair `(z, aux)`; return the state part as a map."""
    out = jax.eval_shape(f, z0, args)
    if not (isinstance(out, tuple) and len(out) == 2):
        got = (f"a {type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list))
               else _describe(out))
        raise TypeError(
            f"fixed_point: with has_aux=True `f` must return a pair (z, aux), got {got}. Return "
            "`new_z, aux` from f (aux any pytree), or pass has_aux=False."
        )
    try:
        hash(f)
    except TypeError:
        return lambda z, a: f(z, a)[0]
    return _StatePart(f)


def _check_rows(F, x0):
    """Raise a `deq.SolveError` (from compiled code) if `F` lets rows of its input reach other rows.

    One Jacobian-vector product per probed row `r` (up to 16 of them, spread over the batch),
    with a random tangent in row `r` only: every other row of the output tangent must be exactly
    zero for a map that acts row-wise.
    """
    B = x0.shape[0]
    if B < 2:
        return
    rows = jnp.asarray(np.unique(np.linspace(0, B - 1, min(B, 16)).astype(np.int32)))
    t = jax.random.normal(jax.random.key(0), x0.shape, x0.dtype)

    def leak(r):
        mask = (jnp.arange(B) == r)[:, None]
        _, out = jax.jvp(F, (x0,), (jnp.where(mask, t, 0.0),))
        return jnp.max(jnp.where(mask, 0.0, jnp.abs(out)))

    leaks = jax.lax.stop_gradient(jax.lax.map(leak, rows))

    def fail(leaks, rows):
        i = int(np.argmax(np.asarray(leaks)))
        raise_from_callback(
            "deq: check_batch: f mixes samples along batch_axis=0: perturbing sample "
            f"{int(np.asarray(rows)[i])} changed other samples' outputs (by up to "
            f"{float(np.asarray(leaks)[i]):.3e} per unit perturbation). Per-sample stopping tests and solver "
            "coefficients then describe a different problem than the one solved. Make f act on each "
            "sample alone (no batch means/norms such as nnx.BatchNorm, no attention across the batch), "
            "or pass batch_axis=None to solve the whole batch as one problem."
        )

    jax.lax.cond(jnp.all(leaks == 0), lambda: None, lambda: jax.debug.callback(fail, leaks, rows))


def _empty_solution(z0, solver, dtype):
    zeros = lambda d: jnp.zeros((0,), d)  # noqa: E731
    stats = Stats(
        num_steps=zeros(jnp.int32),
        residual_norm=zeros(dtype),
        converged=zeros(bool),
        result=zeros(jnp.int32),
        residual_history=jnp.zeros((0, solver.max_steps + 1), dtype),
    )
    return Solution(value=z0, stats=stats)


def _check_adjoint_init(adjoint_init, z0, backward):
    """Validate a warm start of the adjoint solve: an IFT backward and a pytree shaped like `z0`."""
    if not isinstance(backward, IFT):
        raise TypeError(
            f"fixed_point: `adjoint_init` warm-starts the adjoint solve of deq.IFT, but got "
            f"backward={backward!r}, which has none. Pass backward=deq.IFT(...) with it, or drop adjoint_init."
        )
    want = jax.tree_util.tree_map(lambda l: (jnp.shape(l), jnp.result_type(l)), z0)
    got = jax.tree_util.tree_map(lambda l: (jnp.shape(l), jnp.result_type(l)), adjoint_init)
    if jax.tree_util.tree_structure(adjoint_init) != jax.tree_util.tree_structure(z0) or want != got:
        raise ValueError(
            f"fixed_point: `adjoint_init` must be a pytree shaped like `z0`: got {_describe(adjoint_init)}, "
            f"expected {_describe(z0)}. Pass the adjoint of the previous step (the gradient with respect to "
            f"adjoint_init), or jax.tree_util.tree_map(jnp.zeros_like, z0) at the first step."
        )


def _impl(f, z0, args, solver, backward, batch_axis, throw, check_batch, backward_stats, budget=None,
          adjoint_init=None, solver_dtype=None):
    _validate(f, z0, args, solver, backward, batch_axis, throw, check_batch)
    if adjoint_init is not None:
        _check_adjoint_init(adjoint_init, z0, backward)
    packer = _tree.make_packer(z0, batch_axis, solver_dtype)
    if packer.rows == 0:  # an empty batch: nothing to solve
        return _empty_solution(z0, solver, packer.dtype)
    try:
        hash(f)
    except TypeError:  # closure_convert memoizes on f: give it a hashable wrapper
        f = (lambda g: lambda z, a: g(z, a))(f)
    f_conv, consts = jax.closure_convert(f, z0, args)

    def fn(x, params):
        a, c = params
        return packer.pack(f_conv(packer.unpack(x), a, *c))

    x0 = packer.pack(z0)
    if check_batch:
        _check_rows(lambda x: fn(x, (args, consts)), x0)
    # Optional arguments are passed only when given, so a user's own backward strategy written
    # against the shorter `solve(fn, solver, x0, params, throw)` keeps working.
    extra = {}
    if backward_stats is not None:
        extra["probe"] = backward_stats
    if budget is not None:
        extra["budget"] = budget
    if adjoint_init is not None:
        extra["adjoint_init"] = packer.pack(jax.tree_util.tree_map(jnp.asarray, adjoint_init))
    x_star, out = backward.solve(fn, solver, x0, (args, consts), throw, **extra)
    if throw:
        x_star = report("the forward solve", out, x_star, throw=True, warn=False)
    squeeze = (lambda a: a[0]) if batch_axis is None else (lambda a: a)
    # Statistics are plain data: no tangent reaches them, so any use of them inside a loss or an
    # auxiliary output (jnp.all(converged) under jax.grad) differentiates as a constant.
    out = jax.lax.stop_gradient(out)
    stats = Stats(
        num_steps=squeeze(out.num_steps),
        residual_norm=squeeze(out.residual),
        converged=squeeze(out.converged),
        result=squeeze(out.result),
        residual_history=squeeze(out.history),
    )
    return Solution(value=packer.unpack(x_star), stats=stats)


_impl_jit = jax.jit(_impl, static_argnums=(0, 3, 4, 5, 6, 7, 11))


@strict_kwargs
def fixed_point(f, z0, args=None, *, solver=None, backward=None, batch_axis=None, throw=False,
                check_batch=False, backward_stats=None, max_steps=None, has_aux=False,
                adjoint_init=None, solver_dtype=None) -> Solution:
    r"""Solve `z* = f(z*, args)` and differentiate `z*` with respect to `args`.

    The forward pass runs `solver` from `z0` until `||f(z) - z|| <= atol + rtol ||f(z)||` (l2
    over all leaves of a sample, overflow-safe; the relative part is measured against at most
    100 times the start's scale `max(||z0||, ||f(z0)||)`, so it cannot be met by letting the
    iterates grow) or `max_steps`, and returns the lowest-residual finite iterate. Iterates that
    run away (`||f(z)||` past the solver's `divergence_limit` times the start's scale) stop with
    result DIVERGED; a NaN or inf stops a sample with NONFINITE. `rtol = atol = 0` runs exactly
    `max_steps` steps (a fixed budget). The backward pass is defined by `backward`: by default
    the implicit function theorem, whose memory does not grow with the number of forward steps.

    Args:
      f: the cell, `f(z, args) -> z`; `z` and `args` are any pytrees, and `f` must return the
        structure, shapes and dtypes of `z0`. Pass parameters through `args` (or close over
        them inside a traced function): `f` is treated as static.
      z0: the starting point, a pytree of floating arrays.
      args: pytree of inputs and parameters; gradients flow to its floating leaves.
      solver: forward solver (default `deq.Anderson()`).
      backward: backward strategy (default `deq.IFT()`).
      batch_axis: None (the whole state is one problem) or 0 (axis 0 of every leaf indexes
        independent problems: per-sample stopping tests, solver coefficients and stats; `f`
        must not mix samples).
      throw: raise a `deq.SolveError` (a `RuntimeError`) when the forward or the backward solve
        does not converge (naming steps, residual and result codes). By default
        non-convergence is only reported in `stats` (forward) and by a
        `deq.NonConvergenceWarning` (IFT backward). Called outside `jax.jit` the error arrives
        as itself; inside your own `jax.jit`, wrap the call in `deq.clean_errors()`.
      check_batch: with `batch_axis=0`, check once, at `z0`, that `f` keeps the samples apart
        (one Jacobian-vector product per probed sample); raise a `deq.SolveError` if one
        sample's perturbation reaches another (a batch mean, batch norm or attention across
        the batch). A debugging aid: it costs up to 16 extra evaluations of `f`.
      backward_stats: a `deq.BackwardStats.probe(...)`; differentiate with respect to it to
        receive the adjoint solve's statistics as its cotangent (see `deq.BackwardStats`).
      max_steps: a runtime step budget for the forward solve: an integer, or an integer scalar
        array that may be traced, in `[0, solver.max_steps]` (a traced value outside is clipped
        to it). The solve stops after at most this many steps; changing it never recompiles,
        since the compiled loop depends only on the solver's static `max_steps`. None (default)
        means `solver.max_steps`. Samples stopped by the budget report result MAX_STEPS. It
        applies to the forward solve only (the IFT adjoint keeps its own solver's limit).
      has_aux: `f` returns a pair `(z, aux)` with `aux` any pytree (attention maps, a
        regularization term of the cell); the solve uses `z`, and `Solution.aux` is
        `f(value, args)[1]`, the auxiliary output at the returned iterate, computed by one more
        evaluation of `f` after the solve and differentiable (through `value` by the backward
        strategy, and through `args` directly).
      adjoint_init: a warm start for the adjoint solve of `deq.IFT` (a pytree shaped like `z0`,
        e.g. the previous training step's adjoint of the same samples). The loss does not depend
        on it; its "gradient" is the newly solved adjoint `u = J_f^T u + dL/dz*`, to pass back in
        at the next step (`jax.grad(loss, argnums=(0, 1))(params, u)` returns `(grads, u_new)`;
        start with zeros, which costs about one adjoint step more than None, whose start is
        `dL/dz*`). It changes where the adjoint solve starts, not what it solves: the gradient
        is IFT's whenever the adjoint converges, in fewer steps when `adjoint_init` is close. Reverse mode only (a custom VJP, as with `backward_stats`); no hidden state.
      solver_dtype: the dtype of the solver's state: its iterates, histories, Anderson's least
        squares, the stopping test and `stats` (None, the default: the widest dtype of `z0`'s
        leaves, at least float32). `f` always runs in its own dtypes: each step the iterate is
        cast to the leaves' dtypes, `f` is evaluated, and its output is cast to `solver_dtype`.
        So a bfloat16 or float16 cell is solved with float32 state by default, and
        `solver_dtype=jnp.float64` (under x64) solves a float32 cell with float64 state. Any
        real floating dtype is accepted, a narrower one too (`jnp.bfloat16` for a float32
        cell: the state and the stopping test then round to it). The returned `value` keeps
        `z0`'s dtypes; the backward strategy packs its vectors in `solver_dtype` too (the
        adjoint solve of `deq.IFT`). See "Mixed precision" below.

    Mixed precision:
      The stopping test `||f(z) - z|| <= atol + rtol ||f(z)||` is evaluated in `solver_dtype`,
      and `converged` reports whether it held there. Since `f`'s output is rounded to the
      cell's dtype at every step, the residual cannot fall much below the cell's rounding
      error, `||f(z) - z|| ~ eps(cell dtype) ||z||` (eps = 7.8e-3 for bfloat16, 9.8e-4 for
      float16, 1.2e-7 for float32), whatever the solver dtype (a small state may instead land
      exactly on a fixed point of the rounded cell, residual 0): ask for `rtol` above that floor
      (`rtol=1e-2` for a bfloat16 cell), or the solve runs to `max_steps` and reports
      MAX_STEPS with the lowest residual reached. A wider solver dtype keeps the iterates,
      the Anderson mixing and the residual itself free of the state's rounding; it does not
      make the fixed point more accurate than the cell. The IFT adjoint's cotangents are
      rounded to the cell's dtype in the same way (its vector-Jacobian products run in it), so
      for a bfloat16 cell give the adjoint a matching tolerance, e.g.
      `backward=deq.IFT(solver=deq.Anderson(rtol=1e-2))`.

    Returns:
      A `Solution` with `value` (shaped like `z0`) and `stats` (`num_steps`, `residual_norm`,
      `converged`, `result`, `residual_history`), per sample when `batch_axis=0`. The stats
      carry no gradient: they may be used in any loss or auxiliary output under `jax.grad`,
      `jax.vmap`, `jax.jit` and `lax.scan`. A batch of size 0 returns an empty solution.

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> f = lambda z, p: jnp.tanh(p["W"] @ z + p["x"])
      >>> p = {"W": 0.5 * jnp.eye(3), "x": jnp.ones(3)}
      >>> sol = deq.fixed_point(f, jnp.zeros(3), p)
      >>> bool(sol.stats.converged), sol.value.shape
      (True, (3,))
      >>> jax.grad(lambda p: deq.fixed_point(f, jnp.zeros(3), p).value.sum())(p)["x"].shape
      (3,)

      An auxiliary output of the cell, at the fixed point:

      >>> g = lambda z, p: (f(z, p), jnp.sum(z ** 2))
      >>> sol = deq.fixed_point(g, jnp.zeros(3), p, has_aux=True)
      >>> bool(jnp.allclose(sol.aux, jnp.sum(sol.value ** 2)))
      True

      A runtime step budget (one compilation serves every budget):

      >>> solve = jax.jit(lambda k: deq.fixed_point(f, jnp.zeros(3), p, max_steps=k).stats.num_steps)
      >>> [int(solve(k)) for k in (1, 2, 3)]
      [1, 2, 3]

      The adjoint warm-started from the previous step's (its gradient is the new adjoint):

      >>> loss = lambda p, u: deq.fixed_point(f, jnp.zeros(3), p, adjoint_init=u).value.sum()
      >>> grads, u = jax.grad(loss, argnums=(0, 1))(p, jnp.zeros(3))
      >>> grads2, _ = jax.grad(loss, argnums=(0, 1))(p, u)  # starts at the solved adjoint
      >>> bool(jnp.allclose(grads["x"], grads2["x"], rtol=1e-4)), u.shape
      (True, (3,))

      A bfloat16 cell with the (default) float32 solver state; the value stays bfloat16:

      >>> pb = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), p)
      >>> sol = deq.fixed_point(f, jnp.zeros(3, jnp.bfloat16), pb, solver=deq.Anderson(rtol=1e-2))
      >>> sol.value.dtype, sol.stats.residual_norm.dtype, bool(sol.stats.converged)
      (dtype(bfloat16), dtype('float32'), True)

    References:
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """
    solver = Anderson() if solver is None else solver
    backward = IFT() if backward is None else backward
    z0 = jax.tree_util.tree_map(jnp.asarray, z0)
    if not isinstance(has_aux, bool):
        raise TypeError(f"fixed_point: `has_aux` must be a bool, got {has_aux!r}. Pass True when f returns (z, aux).")
    if has_aux:
        if not callable(f):
            raise TypeError(f"fixed_point: `f` must be callable as f(z, args) -> (z, aux), got {type(f).__name__}.")
        sol = fixed_point(_split_aux(f, z0, args), z0, args, solver=solver, backward=backward,
                          batch_axis=batch_axis, throw=throw, check_batch=check_batch,
                          backward_stats=backward_stats, max_steps=max_steps, adjoint_init=adjoint_init,
                          solver_dtype=solver_dtype)
        return dataclasses.replace(sol, aux=f(sol.value, args)[1])
    solver_dtype = _tree.check_solver_dtype("fixed_point", solver_dtype)
    budget = _check_budget(max_steps, solver) if isinstance(solver, AbstractSolver) else max_steps
    call = (f, z0, args, solver, backward, batch_axis, throw, check_batch, backward_stats, budget, adjoint_init,
            solver_dtype)
    try:
        hash(f)
        impl = _impl_jit
    except TypeError:
        impl = _impl
    if isinstance(batch_axis, (list, dict)):
        impl = _impl
    if not (throw or check_batch) or not _eager(z0, args):
        return impl(*call)
    with clean_errors():  # called outside a trace: a failure arrives as a deq.SolveError
        return jax.block_until_ready(impl(*call))


def _eager(*trees) -> bool:
    return not any(isinstance(l, jax.core.Tracer) for l in jax.tree_util.tree_leaves(trees))
