"""`deq.nn.DEQ`: a deep equilibrium layer for Flax NNX.

The layer solves `z* = cell(z*, x)` with `deq.fixed_point`. The cell's variables are split off
(`graphdef, state = nnx.split(cell)`) and passed to the solver as explicit arguments, so the
backward strategy (implicit differentiation by default) sends gradients to the cell's
parameters, and `nnx.grad`, `nnx.jit` and plain `jax.jit` on split state all work.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from .. import _tree
from .._api import strict_kwargs
from .._fixed_point import fixed_point
from .._solution import BackwardStats, Solution
from ..backward import IFT, AbstractBackward
from ..solvers import GMRES, AbstractSolver, Anderson
from ._checks import check_nonempty_batch, check_state_like, describe

__all__ = ["DEQ", "SolverConstant", "BackwardProbe", "backward_stats", "enable_backward_stats", "solution_info"]


class SolverConstant(nnx.Variable):
    """A non-trainable variable that a DEQ cell reads, but never writes, during the solve.

    A `deq.nn.DEQ` refuses cells holding variables that change while a cell is evaluated
    (`nnx.BatchStat`, `nnx.Rngs` streams, `nnx.Cache`, `nnx.Intermediate`): the solver calls the
    cell many times per forward pass, so such state would make `z*` the fixed point of a
    different function at every step. `nnx.Param` and `SolverConstant` (and their subclasses)
    are allowed.

    Use `SolverConstant` (or a subclass) for buffers that are constant during one solve but may
    change between forward passes, such as the power-iteration vector `u` of spectral
    normalization. Update them *outside* the solve, in the cell's optional
    `before_solve(self, x)` method, which `DEQ` calls once per forward pass with the real
    (mutable) module before solving; writes made inside `__call__` during the solve raise a
    `ValueError`. `nnx.grad` does not differentiate them (it differentiates `nnx.Param` by
    default), and `nnx.jit` carries their updates out like any other state.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deq
      >>> u = deq.nn.SolverConstant(jnp.ones(3))
      >>> isinstance(u, nnx.Variable), isinstance(u, nnx.Param)
      (True, False)
    """


class BackwardProbe(nnx.Variable):
    """A `deq.nn.DEQ`'s zero probe whose gradient is its last backward solve's statistics.

    Added to every `deq.nn.DEQ` of a model by `deq.nn.enable_backward_stats(model)` (layers
    have none by default, so a model's state is its parameters only). Holds 4 zeros; differentiating a loss with respect to it (`nnx.grad(loss, argnums=
    nnx.DiffState(0, nnx.Any(nnx.Param, deq.nn.BackwardProbe)))`) gives, in its place in the
    gradient state, `[mean adjoint steps, largest adjoint residual, fraction converged, largest
    result code]` over the batch (summed if the layer is called several times in one loss).
    `deq.nn.backward_stats(grads)` reads them as `deq.BackwardStats`; `deq.train.fit` records
    them at every step. The value is never updated by an optimizer (it is not an `nnx.Param`).
    """


def backward_stats(grads) -> dict:
    """The `deq.BackwardStats` of every `deq.nn.DEQ` in a gradient state, by path.

    Args:
      grads: the gradient state of a model, taken with respect to (at least) its
        `deq.nn.BackwardProbe` variables, e.g. `nnx.grad(loss, argnums=nnx.DiffState(0,
        nnx.Any(nnx.Param, deq.nn.BackwardProbe)))(model)`.

    Returns:
      `{path: deq.BackwardStats}` with scalar fields (batch aggregates, see `BackwardProbe`); empty
      if `grads` holds no probe.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deq
      >>> model = deq.nn.DEQ(deq.nn.DenseCell(4, rngs=nnx.Rngs(0)))
      >>> deq.nn.enable_backward_stats(model)
      1
      >>> wrt = nnx.DiffState(0, nnx.Any(nnx.Param, deq.nn.BackwardProbe))
      >>> grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((3, 4))) ** 2), argnums=wrt)(model)
      >>> stats = deq.nn.backward_stats(grads)
      >>> list(stats), float(stats[("backward_probe",)].converged)
      ([('backward_probe',)], 1.0)
    """
    found = {}
    for path, leaf in nnx.to_flat_state(nnx.state(grads, BackwardProbe)) if _is_state(grads) else []:
        v = jnp.asarray(leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf)
        found[tuple(path)] = BackwardStats(num_steps=v[0], residual_norm=v[1], converged=v[2], result=v[3])
    return found


def enable_backward_stats(model, enable: bool = True) -> int:
    """Give every `deq.nn.DEQ` in `model` a `BackwardProbe` variable (or remove them).

    With a probe, each layer passes it as `backward_stats` to its solve, so the gradient with
    respect to `deq.nn.BackwardProbe` variables holds every layer's adjoint statistics (read
    them with `deq.nn.backward_stats`). `deq.train.fit` enables them for the run.

    Args:
      model: an `nnx.Module` containing `deq.nn.DEQ` layers (or one itself).
      enable: add the probes (True) or remove them (False).

    Returns:
      The number of `deq.nn.DEQ` layers found.
    """
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, DEQ)]
    for layer in layers:
        has = isinstance(getattr(layer, "backward_probe", None), BackwardProbe)
        if enable and not has:
            layer.backward_probe = BackwardProbe(_probe_value())
        elif not enable and has:
            del layer.backward_probe
    return len(layers)


def _is_state(x) -> bool:
    return isinstance(x, (nnx.State, nnx.Module))


def _probe_value():
    return jnp.zeros((4,), jnp.float32)


_ADVICE_BATCHSTAT = (
    "Batch statistics would be recomputed (and the running averages updated) at every solver "
    "step, so there is no single function to find the fixed point of. Use nnx.LayerNorm or "
    "nnx.GroupNorm inside the cell, or put nnx.BatchNorm before or after the DEQ layer."
)
_ADVICE_RNG = (
    "Random draws inside the cell (e.g. nnx.Dropout with nnx.Rngs) would give a different mask "
    "at every solver step. Use deq.nn.VariationalDropout(rate, rngs=...) in the cell instead: "
    "one mask per forward pass, held fixed over all solver steps (DEQ resamples it before each "
    "training-mode solve). Or draw the dropout mask once per forward pass outside the solve and "
    "pass it in x, or put nnx.Dropout before or after the DEQ layer; do not store nnx.Rngs in "
    "the cell."
)
_ADVICE_CACHE = (
    "Caches and intermediates written during the call (nnx.Cache, nnx.Intermediate, sow) are "
    "discarded by the solver. Return what you need from the cell's state, or compute it from "
    "the fixed point after the DEQ layer."
)
_ADVICE_OTHER = (
    "Only nnx.Param (trainable) and deq.nn.SolverConstant (read-only during the solve) variables "
    "are allowed. Declare a non-trainable constant as deq.nn.SolverConstant and update it, if "
    "needed, in the cell's before_solve(x) method."
)


def _advice(var_type: type) -> str:
    if issubclass(var_type, nnx.BatchStat):
        return _ADVICE_BATCHSTAT
    if issubclass(var_type, nnx.RngState):
        return _ADVICE_RNG
    if issubclass(var_type, (nnx.Cache, nnx.Intermediate)):
        return _ADVICE_CACHE
    return _ADVICE_OTHER


def _path_str(path) -> str:
    return ".".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def check_cell(cell: nnx.Module, owner: str = "DEQ") -> None:
    """Raise a `ValueError` if `cell` holds variables other than `nnx.Param`/`SolverConstant`.

    Args:
      cell: the candidate DEQ cell.
      owner: name used in the error message.

    Raises:
      ValueError: naming the offending variables, their type, and what to use instead.
    """
    allowed = (nnx.Param, SolverConstant)
    bad: dict[type, list[str]] = {}
    for path, var in nnx.to_flat_state(nnx.state(cell)):
        t = type(var)
        if not issubclass(t, allowed):
            bad.setdefault(t, []).append(".".join(str(p) for p in path))
    if not bad:
        return
    lines = [
        f"{owner}: the cell {type(cell).__name__} holds mutable state that the fixed-point solver "
        "would need to update while it evaluates the cell many times per forward pass:"
    ]
    advice: list[str] = []
    for t, paths in bad.items():
        shown = ", ".join(paths[:4]) + (", ..." if len(paths) > 4 else "")
        lines.append(f"  - nnx.{t.__name__} at {shown}")
        a = _advice(t)
        if a not in advice:
            advice.append(a)
    raise ValueError("\n".join(lines + advice))


class _CellStateError(ValueError):
    """A refusal raised from inside the solve; never rewrapped."""


class _CellMap:
    """`f(z, (state, x)) = merge(graphdef, state)(z, x)`, hashable by `graphdef`.

    Hashability lets `deq.fixed_point` reuse its compiled solve across eager calls with the
    same cell structure. Each evaluation merges a fresh module and checks that the cell did not
    write to any of its variables.
    """

    __slots__ = ("graphdef", "__weakref__")
    owner = "DEQ"

    def __init__(self, graphdef):
        self.graphdef = graphdef

    def __hash__(self):
        return hash((_CellMap, self.graphdef))

    def __eq__(self, other):
        return type(other) is _CellMap and self.graphdef == other.graphdef

    def __call__(self, z, args):
        state, x = args
        before = jax.tree_util.tree_flatten_with_path(state)
        cell = nnx.merge(self.graphdef, state)
        out = cell(z, x)
        after = jax.tree_util.tree_flatten_with_path(nnx.state(cell))
        if after[1] != before[1]:
            raise _CellStateError(
                f"DEQ: the cell {type(cell).__name__} added or removed variables while being "
                f"evaluated inside the solve (e.g. with sow / nnx.Intermediate). {_ADVICE_CACHE}"
            )
        changed = [_path_str(p) for (p, a), (_, b) in zip(before[0], after[0]) if a is not b]
        if changed:
            raise _CellStateError(
                f"DEQ: the cell {type(cell).__name__} wrote to its variables "
                f"{', '.join(changed)} while being evaluated inside the solve; the solver calls "
                "the cell many times per forward pass and discards such writes. Variables must be "
                "read-only inside __call__: update deq.nn.SolverConstant buffers in the cell's "
                "before_solve(x) method, which DEQ calls once per forward pass outside the solve."
            )
        return out


def _check_solver(name: str, solver: Any, allow_none: bool) -> None:
    if solver is None and allow_none:
        return
    if isinstance(solver, GMRES) or not isinstance(solver, AbstractSolver):
        raise TypeError(
            f"DEQ: `{name}` must be a forward fixed-point solver such as deq.Anderson(), "
            f"deq.Broyden() or deq.FixedPointIteration(), got {solver!r}."
        )


def _float_dtype(a) -> Any:
    dt = jnp.result_type(a)
    return dt if jnp.issubdtype(dt, jnp.inexact) else jnp.result_type(float)


def default_initial_state(cell, x):
    """The initial state when none is given: `cell.init_state(x)` if defined, else zeros like `x`.

    Returns `(z0, guessed)` where `guessed` says the zeros-like-`x` fallback was used.
    """
    init_state = getattr(cell, "init_state", None)
    if callable(init_state):
        return init_state(x), False
    z0 = jax.tree_util.tree_map(lambda a: jnp.zeros(jnp.shape(a), _float_dtype(a)), x)
    return z0, True


def check_cell_input(cell, x, batch_axis) -> None:
    """Run the cell's own input check, `cell.check_input(x, batched=...)`, if it defines one.

    The cells of `deq.nn.cells` and `deq.nn.ContractiveDense` define it: a wrong width, rank or
    dtype of `x` is then refused with a message naming the sizes the cell expects, before the
    solve.
    """
    check = getattr(cell, "check_input", None)
    if callable(check):
        check(x, batched=batch_axis == 0)


def initial_state(owner: str, cell, x, z0, batch_axis):
    """The checked initial state of a layer call, and where it came from.

    Returns `(z0, origin)`: `origin` is "given" (passed by the user), "init_state" (from
    `cell.init_state(x)`) or "zeros" (zeros shaped like `x`: the cell has no `init_state`).
    A given `z0` is compared with `cell.init_state(x)` when the cell defines it; with
    `batch_axis=0` an empty batch is refused.
    """
    if z0 is None:
        z0, guessed = default_initial_state(cell, x)
        origin = "zeros" if guessed else "init_state"
        bad = [l for l in jax.tree_util.tree_leaves(z0) if not jnp.issubdtype(jnp.result_type(l), jnp.floating)]
        if bad and origin == "init_state":
            raise TypeError(
                f"{owner}: the cell's initial state cell.init_state(x) is {describe(z0)} for the input "
                f"`x` ({describe(x)}), but a state must be floating point. Pass a floating x (e.g. "
                "x.astype(jnp.float32)), or make init_state(x) return a floating state."
            )
    else:
        origin = "given"
        init_state = getattr(cell, "init_state", None)
        if callable(init_state):
            try:
                expected = jax.eval_shape(init_state, x)
            except Exception:  # noqa: BLE001 - an init_state that fails on x is reported by the solve
                expected = None
            if expected is not None:
                check_state_like(owner, z0, expected, "cell's state cell.init_state(x)")
    if batch_axis == 0:
        check_nonempty_batch(owner, x, z0)
    return z0, origin


def _probe(f, z0, args):
    """`f(z0, args)` abstractly: None if it fails, else its output's shapes."""
    try:
        return jax.eval_shape(f, z0, args)
    except _CellStateError:
        raise
    except Exception:  # noqa: BLE001 - any failure of the cell counts
        return None


def _same_shapes(a, b) -> bool:
    same_tree = jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return same_tree and [jnp.shape(l) for l in jax.tree_util.tree_leaves(a)] == [
        jnp.shape(l) for l in jax.tree_util.tree_leaves(b)
    ]


def _input_sizes(params) -> str:
    """The input sizes the cell's dense/conv layers take, read off their kernels (a hint)."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        keys = [k for k in keys if k not in ("value", "params")]
        if keys and keys[-1] == "kernel" and jnp.ndim(leaf) >= 2:
            found.append(f"{'.'.join(keys[:-1]) or 'kernel'}: {jnp.shape(leaf)[-2]}")
    if not found:
        return ""
    shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
    return f" (the input sizes of the cell's layers, from their kernels: {shown})"


def _cell_of(f, params):
    """The cell a layer's map `f` applies (an unbound Linen module, or the merged nnx module)."""
    if hasattr(f, "cell"):
        return f.cell
    try:
        return nnx.merge(f.graphdef, params)
    except Exception:  # noqa: BLE001 - only used in a message
        return None


def _hint(f, z0, args, origin: str, has_aux: bool = False) -> Optional[str]:
    """The message explaining a failed solve by the input or the initial state, or None."""
    owner = getattr(f, "owner", "DEQ")
    params, x = args
    out = _probe(f, z0, args)
    if has_aux and isinstance(out, tuple) and len(out) == 2:
        out = out[0]  # the state part of a cell returning (z, aux)
    if out is not None and _same_shapes(out, z0):
        return None  # the cell maps z0 to a state of its shape: not an input problem
    if origin == "zeros":
        return (
            f"{owner}: solving from the default initial state failed. The cell has no "
            f"init_state(x) method, so {owner} assumed the state has the same shape as the input "
            f"x and started from zeros shaped like x ({describe(z0)}), but the cell does not "
            f"map that to a state of the same shape. Define cell.init_state(x) returning the "
            f"initial state (e.g. zeros of shape (batch, hidden)), or pass z0 to the layer."
        )
    cell = _cell_of(f, params)
    name = type(cell).__name__ if cell is not None else "cell"
    expects = f"x must have the shape and dtype the cell expects{_input_sizes(params)}"
    if origin == "init_state":
        if out is None:
            return (
                f"{owner}: the cell {name} failed on the input `x` ({describe(x)}), started from "
                f"its initial state cell.init_state(x) ({describe(z0)}). {expects}: pass x shaped "
                "as the cell's input, or build the cell for this input size."
            )
        return (
            f"{owner}: cell.init_state(x) returned {describe(z0)} for the input `x` ({describe(x)}), "
            f"but the cell {name} maps it to {describe(out)}. Make init_state(x) return a state "
            "shaped like the cell's output."
        )
    if out is not None:
        return (
            f"{owner}: the given `z0` ({describe(z0)}) does not match the cell's state: the cell "
            f"{name} maps it to {describe(out)}. Pass z0 shaped like the cell's output "
            "(cell.init_state(x) returns one, if defined), or omit z0."
        )
    if callable(getattr(cell, "init_state", None)):
        culprit = f"the given `z0` ({describe(z0)}) is shaped like cell.init_state(x), so `x` is the suspect"
    else:
        culprit = (
            f"either `x` or the given `z0` ({describe(z0)}, which must be shaped like the cell's "
            "output) does not match the cell"
        )
    return (
        f"{owner}: the cell {name} failed on the input `x` ({describe(x)}): {culprit}. {expects}; "
        "pass x shaped as the cell's input, and z0 shaped like the cell's output (or omit z0)."
    )


def solve_with_hints(f, z0, args, *, origin: str, **kwargs) -> Solution:
    """`deq.fixed_point` with DEQ-specific hints added to errors caused by the input or the state.

    `origin` says where `z0` came from ("given", "init_state" or "zeros", see `initial_state`),
    so the message blames `z0` only when the user passed it.
    """
    try:
        return fixed_point(f, z0, args, **kwargs)
    except _CellStateError:
        raise
    except (ValueError, TypeError) as e:
        hint = _hint(f, z0, args, origin, kwargs.get("has_aux", False))
        if hint is None:
            raise
        raise ValueError(f"{hint}\nOriginal error: {e}") from e


def solution_info(sol: Solution) -> dict:
    """Summarise a solve as batch means, for models that return `(output, info)`.

    Args:
      sol: a `deq.Solution`, e.g. from `layer(x, return_solution=True)`.

    Returns:
      A dict of scalar arrays: `forward_steps` (mean of `stats.num_steps`), `residual` (mean of
      `stats.residual_norm`) and `converged_frac` (fraction of samples with `stats.converged`).
      Works under `jax.jit`; the values carry no gradient.

    Example:
      >>> import jax.numpy as jnp
      >>> import deq
      >>> f = lambda z, x: jnp.tanh(0.5 * z + x)
      >>> sol = deq.fixed_point(f, jnp.zeros((4, 2)), jnp.ones((4, 2)), batch_axis=0,
      ...                       solver=deq.FixedPointIteration())
      >>> info = deq.nn.solution_info(sol)
      >>> sorted(info), float(info["converged_frac"])
      (['converged_frac', 'forward_steps', 'residual'], 1.0)
    """
    s = jax.lax.stop_gradient(sol.stats)
    return {
        "forward_steps": jnp.mean(jnp.asarray(s.num_steps).astype(jnp.result_type(float))),
        "residual": jnp.mean(s.residual_norm),
        "converged_frac": jnp.mean(jnp.asarray(s.converged).astype(jnp.result_type(float))),
    }


class DEQ(nnx.Module):
    r"""A deep equilibrium layer (Bai et al. 2019): returns `z*` with `z* = cell(z*, x)`.

    The forward pass finds the fixed point with `solver` (Anderson acceleration by default);
    the backward pass follows `backward` (implicit differentiation by default, whose memory does
    not grow with the number of solver steps). Gradients reach the cell's `nnx.Param`\ s: the
    layer splits the cell (`graphdef, state = nnx.split(cell)`) and solves
    `z = merge(graphdef, state)(z, x)` with `(state, x)` as the explicit arguments of
    `deq.fixed_point`.

    **The cell.** Any `nnx.Module` whose `__call__(z, x)` returns a state shaped like `z` (a
    pytree, with the batch on axis 0 when `batch_axis=0`; the cell must not mix samples). It
    may hold only `nnx.Param` and `deq.nn.SolverConstant` variables, read-only during the solve;
    cells with `nnx.BatchNorm`, `nnx.Dropout`/`nnx.Rngs`, `nnx.Cache` or intermediates are
    refused with a `ValueError` (at construction and at each call) saying what to use instead
    (`nnx.LayerNorm`/`nnx.GroupNorm`; `deq.nn.VariationalDropout`, whose mask is drawn once
    per forward pass: the layer resamples every `VariationalDropout` in the cell before each
    solve, outside it, and eval mode turns them off). Two optional methods are used if the cell
    defines them:

    - `init_state(x) -> z0`: the initial state for input `x` (e.g. zeros of shape
      `(batch, hidden)`). Without it, when `z0` is not given, the layer assumes the state has
      the same shape as `x` (input injection already projected to the state's shape) and
      starts from zeros shaped like `x`; if that guess is wrong the error says to define
      `init_state` or pass `z0`.
    - `before_solve(x)`: called once per forward pass on the real module before solving;
      the place to update `SolverConstant` buffers (e.g. a spectral-norm power iteration).
    - `check_input(x, *, batched)`: called first, once per forward pass (`batched` is
      `batch_axis == 0`); raise a `ValueError`/`TypeError` naming what the cell expects if `x`
      is not an input it accepts. The cells of `deq.nn.cells` and `deq.nn.ContractiveDense`
      check the width, rank and dtype of `x` this way. For other cells, a solve that fails on
      `x` is reported with `x`'s shape and the input sizes of the cell's kernels.

    A given `z0` is checked against `cell.init_state(x)` (when defined), and with `batch_axis=0`
    an empty batch (axis 0 of size 0) is refused with a `ValueError`.

    **Training and evaluation.** `layer.eval()` (or `model.eval()` on a model containing it, or
    `nnx.view(model, deterministic=True)`) sets `deterministic=True`, and the layer then solves
    with `eval_solver` (when given) instead of `solver`; `layer.train()` switches back. A
    `solver=` argument to the call overrides both. Warm-start a solve by passing the previous
    fixed point as `z0`.

    Args:
      cell: the `nnx.Module` `f` with `f(z, x) -> z`.
      solver: forward solver for training mode (default `deq.Anderson()`).
      backward: backward strategy (default `deq.IFT()`; also `deq.PhantomGrad()`, `deq.JFB()`,
        `deq.Unrolled()`).
      batch_axis: 0 (axis 0 of `x` and of every state leaf indexes independent samples, each
        with its own stopping test and stats) or None (the whole state is one problem).
      eval_solver: forward solver used when `deterministic` is True (eval mode); None uses
        `solver`.
      throw: raise a `deq.SolveError` when a solve does not converge (see `deq.fixed_point`).
      has_aux: the cell returns `(z, aux)` (attention maps, a regularization term); the layer
        then returns `(z*, aux)` with `aux` the cell's auxiliary output at `z*` (differentiable),
        or `Solution.aux` with `return_solution=True`.
      solver_dtype: the dtype of the solver's state, histories, stopping test and Anderson's
        least squares (None: the widest dtype of the state, at least float32), e.g. float32 for
        a bfloat16 cell; the cell keeps its own dtype (see `deq.fixed_point`).

    Call Args:
      x: the input (any pytree), passed to the cell unchanged at every step.
      z0: initial state (warm start); None builds one as described above.
      return_solution: return the whole `deq.Solution` (`.value`, `.stats`) instead of `z*`.
      solver: per-call solver override.
      backward_stats: a `deq.BackwardStats.probe(...)` to receive this call's adjoint
        statistics as its cotangent; None uses the layer's `backward_probe` variable if
        `deq.nn.enable_backward_stats` gave it one (batch aggregates; `deq.train.fit` does).
      max_steps: a runtime step budget up to the active solver's `max_steps`: an integer or a
        traced integer scalar; changing it does not recompile a jitted model (see
        `deq.fixed_point`). None runs up to the solver's `max_steps`.
      adjoint_init: with the `deq.IFT` backward, a warm start for the adjoint solve, shaped like
        the state (e.g. the previous training step's adjoint for the same samples); its
        gradient is the newly solved adjoint (see `deq.fixed_point`). None starts from `dL/dz*`,
        IFT's cold start.

    Returns:
      `z*` shaped like the state, or a `deq.Solution` when `return_solution=True` (stats per
      sample, shape `(B,)`, when `batch_axis=0`; see `deq.nn.solution_info` for batch means).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import deq
      >>> class Cell(nnx.Module):
      ...     def __init__(self, dim, hidden, rngs):
      ...         self.W = nnx.Linear(hidden, hidden, use_bias=False, rngs=rngs)
      ...         self.U = nnx.Linear(dim, hidden, rngs=rngs)
      ...     def init_state(self, x):
      ...         return jnp.zeros((x.shape[0], self.W.in_features), x.dtype)
      ...     def __call__(self, z, x):
      ...         return jnp.tanh(0.5 * self.W(z) + self.U(x))
      >>> layer = deq.nn.DEQ(Cell(3, 8, nnx.Rngs(0)), eval_solver=deq.Anderson(max_steps=10))
      >>> x = jnp.ones((5, 3))
      >>> layer(x).shape
      (5, 8)
      >>> sol = layer(x, return_solution=True)
      >>> sol.value.shape, sol.stats.num_steps.shape, bool(sol.stats.converged.all())
      ((5, 8), (5,), True)
      >>> grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
      >>> grads["cell"]["W"]["kernel"].shape
      (8, 8)
      >>> layer.eval(); layer.deterministic
      True

    References:
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    @strict_kwargs
    def __init__(
        self,
        cell: nnx.Module,
        *,
        solver: Optional[AbstractSolver] = None,
        backward: Optional[AbstractBackward] = None,
        batch_axis: Optional[int] = 0,
        eval_solver: Optional[AbstractSolver] = None,
        throw: bool = False,
        has_aux: bool = False,
        solver_dtype: Any = None,
    ):
        if not isinstance(cell, nnx.Module) or not callable(cell):
            raise TypeError(
                f"DEQ: `cell` must be an nnx.Module with __call__(z, x) -> z, got "
                f"{type(cell).__name__}. For a Linen cell use deq.linen.DEQ; for a plain function "
                "use deq.fixed_point."
            )
        solver = Anderson() if solver is None else solver
        backward = IFT() if backward is None else backward
        _check_solver("solver", solver, allow_none=False)
        _check_solver("eval_solver", eval_solver, allow_none=True)
        if not isinstance(backward, AbstractBackward):
            raise TypeError(
                f"DEQ: `backward` must be a deq backward strategy (deq.IFT(), deq.PhantomGrad(), "
                f"deq.JFB() or deq.Unrolled()), got {backward!r}."
            )
        if isinstance(batch_axis, bool) or batch_axis not in (None, 0):
            raise ValueError(
                f"DEQ: `batch_axis` must be 0 (leading axis indexes samples) or None (one "
                f"problem), got {batch_axis!r}."
            )
        if not isinstance(throw, bool):
            raise TypeError(f"DEQ: `throw` must be a bool, got {throw!r}.")
        if not isinstance(has_aux, bool):
            raise TypeError(f"DEQ: `has_aux` must be a bool, got {has_aux!r}. Pass True when the cell returns (z, aux).")
        solver_dtype = _tree.check_solver_dtype("DEQ", solver_dtype)
        check_cell(cell)
        self.cell = cell
        self.has_aux = has_aux
        self.solver_dtype = solver_dtype
        self.solver = solver
        self.backward = backward
        self.batch_axis = batch_axis
        self.eval_solver = eval_solver
        self.throw = throw
        self.deterministic = False

    def set_view(self, deterministic: Optional[bool] = None):
        """Used by `nnx.view`.

        Args:
          deterministic: if True, solve with `eval_solver` (evaluation mode).
        """
        if deterministic is not None:
            self.deterministic = deterministic

    def active_solver(self, solver: Optional[AbstractSolver] = None) -> AbstractSolver:
        """The solver a call uses: `solver` if given, else `eval_solver` in eval mode, else `solver`."""
        if solver is not None:
            _check_solver("solver", solver, allow_none=False)
            return solver
        if self.deterministic and self.eval_solver is not None:
            return self.eval_solver
        return self.solver

    @strict_kwargs
    def __call__(self, x, z0=None, *, return_solution: bool = False, solver: Optional[AbstractSolver] = None,
                 backward_stats=None, max_steps=None, adjoint_init=None):
        solver = self.active_solver(solver)
        check_cell_input(self.cell, x, self.batch_axis)
        before_solve = getattr(self.cell, "before_solve", None)
        if callable(before_solve):
            before_solve(x)
        from .dropout import resample_dropout  # deq.nn.dropout imports this module

        resample_dropout(self.cell)  # one new mask per forward pass (none in eval mode)
        check_cell(self.cell)
        z0, origin = initial_state("DEQ", self.cell, x, z0, self.batch_axis)
        graphdef, state = nnx.split(self.cell)
        probe = getattr(self, "backward_probe", None)
        if backward_stats is None and isinstance(probe, BackwardProbe):
            v = probe.get_value()
            backward_stats = BackwardStats(num_steps=v[0], residual_norm=v[1], converged=v[2], result=v[3])
        sol = solve_with_hints(
            _CellMap(graphdef), z0, (state, x), origin=origin, solver=solver,
            backward=self.backward, batch_axis=self.batch_axis, throw=self.throw,
            backward_stats=backward_stats, max_steps=max_steps, has_aux=self.has_aux,
            adjoint_init=adjoint_init, solver_dtype=self.solver_dtype,
        )
        if return_solution:
            return sol
        return (sol.value, sol.aux) if self.has_aux else sol.value

    def stream(self, x, z0=None, *, slots: int = 64, solver: Optional[AbstractSolver] = None):
        """Solve every sample of `x` with continuous batching (`deq.fixed_point_stream`).

        `slots` samples are solved at a time and a slot is refilled with the next sample as soon as
        its own stops, so a dataset costs about the mean number of solver steps instead of each
        batch's slowest sample. Returns the `deq.Solution` (per-sample stats) of the layer's
        solve; values and step counts equal those of the layer's own call (`batch_axis=0` only).
        For inference: the result is not differentiable. See `deq.nn.stream` for whole models.
        """
        from ._stream import _stream_layer  # deq.nn._stream imports this module

        return _stream_layer(self, x, slots=slots, z0=z0, solver=solver)


def _own_signature(cls) -> None:
    """Show `cls(...)`'s real arguments in `inspect.signature` and `help` (NNX's metaclass hides them)."""
    import inspect

    sig = inspect.signature(cls.__init__)
    cls.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])


_own_signature(DEQ)
