"""`deq.linen.DEQ`: the deep equilibrium layer for Flax Linen users.

A thin wrapper: the cell is an ordinary Linen submodule, initialised by calling it once; the
solve applies an unbound copy of it with its variables passed as explicit arguments of
`deq.fixed_point`, so the backward strategy sends gradients to the cell's parameters.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.errors
import flax.linen as nn

from .. import _tree
from .._solution import Solution
from ..backward import IFT, AbstractBackward
from ..nn._layer import _check_solver, check_cell_input, initial_state, solve_with_hints
from ..solvers import Anderson

__all__ = ["DEQ"]

_ALLOWED_COLLECTIONS = ("params",)


def _rng_error(cell, e) -> ValueError:
    return ValueError(
        f"deq.linen.DEQ: the cell {type(cell).__name__} draws random numbers (e.g. nn.Dropout), "
        "which inside the solve would give a different mask at every solver step. Draw the "
        "dropout mask once per forward pass outside the solve and pass it in x (e.g. x = "
        "(features, mask)), or put dropout before or after the DEQ layer, or make it "
        f"deterministic.\nOriginal error: {e}"
    )


class _LinenCellMap:
    """`f(z, (variables, x)) = cell.apply(variables, z, x)`, hashable by the (unbound) cell."""

    __slots__ = ("cell", "__weakref__")
    owner = "deq.linen.DEQ"

    def __init__(self, cell: nn.Module):
        self.cell = cell

    def __hash__(self):
        return hash((_LinenCellMap, self.cell))

    def __eq__(self, other):
        return type(other) is _LinenCellMap and self.cell == other.cell

    def __call__(self, z, args):
        variables, x = args
        try:
            return self.cell.apply(variables, z, x)
        except flax.errors.InvalidRngError as e:
            raise _rng_error(self.cell, e) from e
        except flax.errors.ScopeParamShapeError as e:
            # A parameter created for another input size: a ValueError, so the layer's hint
            # (naming x and the sizes the cell's kernels take) is added to it.
            raise ValueError(str(e)) from e
        except flax.errors.ModifyScopeVariableError as e:
            raise ValueError(
                f"deq.linen.DEQ: the cell {type(self.cell).__name__} writes to a variable inside "
                "the solve; cell variables must be read-only while the solver evaluates the cell "
                f"many times per forward pass.\nOriginal error: {e}"
            ) from e


def _check_collections(cell_name: str, variables) -> None:
    bad = sorted(c for c in variables if c not in _ALLOWED_COLLECTIONS)
    if not bad:
        return
    advice = []
    if "batch_stats" in bad:
        advice.append(
            "Batch statistics would be recomputed (and running averages updated) at every solver "
            "step. Use nn.LayerNorm or nn.GroupNorm inside the cell, or put nn.BatchNorm before "
            "or after the DEQ layer."
        )
    if any(c in ("intermediates", "cache") for c in bad):
        advice.append("Do not sow intermediates or keep a cache inside the cell; return what you need.")
    advice.append("Only the 'params' collection is allowed in a DEQ cell.")
    raise ValueError(
        f"deq.linen.DEQ: the cell {cell_name} holds mutable variable collections {bad} that the "
        "fixed-point solver would need to update while it evaluates the cell many times per "
        "forward pass. " + " ".join(advice)
    )


class DEQ(nn.Module):
    r"""A deep equilibrium layer for Flax Linen (Bai et al. 2019): `z* = cell(z*, x)`.

    The Linen counterpart of `deq.nn.DEQ`, with the same solve and the same gradients. The cell
    is any Linen module with `__call__(z, x) -> z` holding only `params` (modules with
    `batch_stats`, caches or random draws such as `nn.Dropout` inside the solve are refused
    with a `ValueError`). At `init` the cell is called once at `z0` to create its parameters;
    then the fixed point is found by `deq.fixed_point` with the cell's variables as explicit
    arguments, so `jax.grad` of `model.apply` differentiates them through `backward`.

    The initial state, when `z0` is not given, is `cell.init_state(x)` if the cell defines that
    method, else zeros shaped like `x` (the state is assumed to have the input's shape). As in
    `deq.nn.DEQ`, a cell may define `check_input(x, *, batched)` to refuse a wrong input before
    the solve, a given `z0` is checked against `cell.init_state(x)`, an empty batch is refused,
    and a solve that fails on `x` is reported with `x`'s shape and the input sizes of the
    cell's kernels.

    Attributes:
      cell: the Linen cell, `cell(z, x) -> z`.
      solver: forward solver (default `deq.Anderson()`).
      backward: backward strategy (default `deq.IFT()`).
      batch_axis: 0 (axis 0 indexes independent samples) or None (one problem).
      eval_solver: forward solver used when `deterministic` is True; None uses `solver`.
      throw: raise a `deq.SolveError` when a solve does not converge (see `deq.fixed_point`).
      deterministic: default evaluation-mode flag (a call argument overrides it).
      has_aux: the cell returns `(z, aux)`; the layer returns `(z*, aux)` (aux at `z*`,
        differentiable), or `Solution.aux` with `return_solution=True`.
      solver_dtype: the dtype of the solver's state, histories and stopping test (None: the
        widest dtype of the state, at least float32); the cell keeps its own dtype (see
        `deq.fixed_point`).

    Call Args:
      x: the input (any pytree), passed to the cell at every step.
      z0: initial state (warm start); None builds one as above.
      return_solution: return the whole `deq.Solution` instead of `z*`.
      solver: per-call solver override.
      deterministic: evaluation mode for this call (selects `eval_solver`).
      backward_stats: a `deq.BackwardStats.probe(...)`; differentiate with respect to it to
        receive the adjoint's statistics (see `deq.BackwardStats`).
      max_steps: a runtime step budget up to the active solver's `max_steps` (an integer or a
        traced integer scalar; changing it does not recompile, see `deq.fixed_point`).
      adjoint_init: with `deq.IFT`, a warm start for the adjoint solve shaped like the state;
        its gradient is the newly solved adjoint (see `deq.fixed_point`).

    Returns:
      `z*`, or a `deq.Solution` with per-sample stats when `return_solution=True`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import deq
      >>> class Cell(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, z, x):
      ...         return jnp.tanh(0.5 * nn.Dense(4, use_bias=False)(z) + nn.Dense(4)(x))
      ...     def init_state(self, x):
      ...         return jnp.zeros((x.shape[0], 4), x.dtype)
      >>> model = deq.linen.DEQ(cell=Cell())
      >>> x = jnp.ones((2, 3))
      >>> params = model.init(jax.random.key(0), x)
      >>> model.apply(params, x).shape
      (2, 4)
      >>> g = jax.grad(lambda p: model.apply(p, x).sum())(params)
      >>> jax.tree_util.tree_map(jnp.shape, g["params"]["cell"]["Dense_0"])
      {'kernel': (4, 4)}

    References:
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    cell: nn.Module
    solver: Any = None
    backward: Any = None
    batch_axis: Optional[int] = 0
    eval_solver: Any = None
    throw: bool = False
    deterministic: Optional[bool] = None
    has_aux: bool = False
    solver_dtype: Any = None

    def _config(self):
        solver = Anderson() if self.solver is None else self.solver
        backward = IFT() if self.backward is None else self.backward
        _check_solver("solver", solver, allow_none=False)
        _check_solver("eval_solver", self.eval_solver, allow_none=True)
        if not isinstance(self.has_aux, bool):
            raise TypeError(f"deq.linen.DEQ: `has_aux` must be a bool, got {self.has_aux!r}.")
        if not isinstance(backward, AbstractBackward):
            raise TypeError(
                f"deq.linen.DEQ: `backward` must be a deq backward strategy (deq.IFT(), "
                f"deq.PhantomGrad(), deq.JFB() or deq.Unrolled()), got {backward!r}."
            )
        if isinstance(self.batch_axis, bool) or self.batch_axis not in (None, 0):
            raise ValueError(
                f"deq.linen.DEQ: `batch_axis` must be 0 or None, got {self.batch_axis!r}."
            )
        return solver, backward

    @nn.compact
    def __call__(
        self,
        x,
        z0=None,
        *,
        return_solution: bool = False,
        solver: Any = None,
        deterministic: Optional[bool] = None,
        backward_stats: Any = None,
        max_steps: Any = None,
        adjoint_init: Any = None,
    ):
        default_solver, backward = self._config()
        if deterministic is None:
            deterministic = bool(self.deterministic)
        if solver is not None:
            _check_solver("solver", solver, allow_none=False)
        elif deterministic and self.eval_solver is not None:
            solver = self.eval_solver
        else:
            solver = default_solver
        check_cell_input(self.cell, x, self.batch_axis)
        z0, origin = initial_state("deq.linen.DEQ", self.cell, x, z0, self.batch_axis)
        if self.is_initializing():
            try:
                self.cell(z0, x)  # creates the cell's variables
            except flax.errors.InvalidRngError as e:
                raise _rng_error(self.cell, e) from e
        variables = dict(self.cell.variables)
        _check_collections(type(self.cell).__name__, variables)
        f = _LinenCellMap(self.cell.clone(parent=None))
        sol: Solution = solve_with_hints(
            f, z0, (variables, x), origin=origin, solver=solver, backward=backward,
            batch_axis=self.batch_axis, throw=self.throw, backward_stats=backward_stats,
            max_steps=max_steps, has_aux=self.has_aux, adjoint_init=adjoint_init,
            solver_dtype=_tree.check_solver_dtype("deq.linen.DEQ", self.solver_dtype),
        )
        if return_solution:
            return sol
        return (sol.value, sol.aux) if self.has_aux else sol.value

