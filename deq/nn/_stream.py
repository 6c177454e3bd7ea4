"""`deq.nn.stream`: evaluate a `deq.nn.DEQ` layer, or a model holding some, with streaming solves."""

from __future__ import annotations

import contextvars
from typing import Optional

from flax import nnx

from .._api import check_positive_int, strict_kwargs
from .._solution import Solution
from .._stream import fixed_point_stream
from ._layer import DEQ, _CellMap, check_cell, check_cell_input, initial_state
from .dropout import resample_dropout

__all__ = ["stream"]


class _StreamCell:
    """`f(z, state, x) = merge(graphdef, state)(z, x)`, hashable by `graphdef` (like `_CellMap`,
    whose checks it applies), so streamed solves of one cell structure share a compilation."""

    __slots__ = ("cellmap", "__weakref__")

    def __init__(self, graphdef):
        self.cellmap = _CellMap(graphdef)

    def __hash__(self):
        return hash((_StreamCell, self.cellmap))

    def __eq__(self, other):
        return type(other) is _StreamCell and self.cellmap == other.cellmap

    def __call__(self, z, state, x):
        return self.cellmap(z, (state, x))


def _stream_layer(layer: DEQ, x, *, slots: int, z0=None, solver=None, max_steps=None) -> Solution:
    """What `layer(x, z0, solver=solver, return_solution=True)` does, with a streamed solve."""
    if max_steps is not None:
        raise ValueError(
            "deq.nn.stream: a runtime `max_steps` budget is not supported by streaming solves yet, got "
            f"max_steps={max_steps!r}. Pass solver=<the solver with max_steps=...> instead, or call the layer."
        )
    if getattr(layer, "has_aux", False):
        raise ValueError(
            "deq.nn.stream: the layer was built with has_aux=True (its cell returns (z, aux)), which streaming "
            "solves do not support yet. Call the layer itself, or stream a cell that returns z only."
        )
    if layer.batch_axis != 0:
        raise ValueError(
            f"deq.nn.stream: the layer's `batch_axis` must be 0 (axis 0 of x indexes samples) to stream "
            f"its samples, got {layer.batch_axis!r}. Build the layer with deq.nn.DEQ(cell, batch_axis=0)."
        )
    solver = layer.active_solver(solver)
    check_cell_input(layer.cell, x, layer.batch_axis)
    before_solve = getattr(layer.cell, "before_solve", None)
    if callable(before_solve):
        before_solve(x)
    resample_dropout(layer.cell)  # one new mask per forward pass (none in eval mode), as the layer does
    check_cell(layer.cell)
    z0, _ = initial_state("deq.nn.stream", layer.cell, x, z0, layer.batch_axis)
    graphdef, state = nnx.split(layer.cell)
    return fixed_point_stream(_StreamCell(graphdef), z0, state, x, solver=solver, slots=slots, throw=layer.throw)


_SLOTS: contextvars.ContextVar = contextvars.ContextVar("deq_stream_slots")


class _StreamingDEQ(DEQ):
    """A `DEQ` whose calls stream (the class a model's layers take during `deq.nn.stream`)."""

    def __call__(self, x, z0=None, *, return_solution: bool = False, solver=None, backward_stats=None,
                 max_steps=None, adjoint_init=None):
        if adjoint_init is not None:
            raise TypeError(
                "deq.nn.stream: `adjoint_init` warm-starts the adjoint of a differentiated solve, but "
                "streaming solves are not differentiable. Call the model without deq.nn.stream to train it."
            )
        sol = _stream_layer(self, x, slots=_SLOTS.get(), z0=z0, solver=solver, max_steps=max_steps)
        return sol if return_solution else sol.value


@strict_kwargs
def stream(module: nnx.Module, x, *, slots: int = 64, z0=None, solver: Optional[object] = None):
    """Evaluate a `deq.nn.DEQ` layer, or a model holding such layers, with streaming solves.

    The samples of `x` (axis 0) are solved by `deq.fixed_point_stream`: `slots` rows at a time,
    each slot refilled with the next sample as soon as its own sample stops, so the cost follows
    the mean number of solver steps rather than each batch's slowest sample. Results equal the
    layer's own call on the whole of `x` (the same solver: `eval_solver` in eval mode, same
    per-sample stopping test), up to rounding: `f` evaluated on `slots` rows can round
    differently than on the whole batch, which in float32 can move an Anderson solve that is
    near its tolerance by a step or two (values then differ within the tolerance). For inference only: not differentiable.

    - `module` a `deq.nn.DEQ`: returns the `deq.Solution` of `layer(x, z0, return_solution=True)`.
    - any other `nnx.Module` (e.g. `deq.nn.models.DEQClassifier`): returns `module(x)`, run with
      every `deq.nn.DEQ` inside it streaming its solve over the whole of `x` (the layers around
      it see the whole of `x` at once). `z0` and `solver` apply to layers only.

    Args:
      module: a `deq.nn.DEQ` with `batch_axis=0`, or a module containing some.
      x: the inputs, samples on axis 0 (the whole dataset, or a large part of it).
      slots: rows solved at a time (see `deq.fixed_point_stream`).
      z0: initial states for a layer (default: the cell's `init_state(x)`).
      solver: solver override for a layer (default: the layer's active solver).

    Returns:
      A `deq.Solution` for a layer, else what `module(x)` returns.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deq
      >>> layer = deq.nn.DEQ(deq.nn.DenseCell(4, rngs=nnx.Rngs(0)), solver=deq.FixedPointIteration())
      >>> x = jnp.linspace(-2, 2, 40).reshape(10, 4)
      >>> sol = deq.nn.stream(layer, x, slots=4)
      >>> sol.value.shape, sol.stats.num_steps.shape
      ((10, 4), (10,))
      >>> bool(jnp.allclose(sol.value, layer(x), atol=1e-5))
      True
      >>> # a model holding DEQ layers: deq.nn.stream(model, x, slots=64) returns model(x), streamed
    """
    check_positive_int("deq.nn.stream", "slots", slots, example=64)
    if isinstance(module, DEQ):
        return _stream_layer(module, x, slots=slots, z0=z0, solver=solver)
    if not isinstance(module, nnx.Module) or not callable(module):
        raise TypeError(
            f"deq.nn.stream: `module` must be a deq.nn.DEQ layer or an nnx.Module holding one, got "
            f"{type(module).__name__}. For a plain function use deq.fixed_point_stream."
        )
    if z0 is not None or solver is not None:
        raise ValueError(
            "deq.nn.stream: `z0` and `solver` apply to one deq.nn.DEQ layer, but `module` is a "
            f"{type(module).__name__}. Pass the layer itself (e.g. model.deq), or set the layers' "
            "eval_solver and call model.eval()."
        )
    layers = [m for _, m in nnx.iter_modules(module) if type(m) is DEQ]
    if not layers:
        raise ValueError(
            f"deq.nn.stream: `module` ({type(module).__name__}) holds no deq.nn.DEQ layer, so there is "
            "nothing to stream. Call the module directly."
        )
    token = _SLOTS.set(slots)
    try:
        for layer in layers:
            object.__setattr__(layer, "__class__", _StreamingDEQ)
        return module(x)
    finally:
        for layer in layers:
            object.__setattr__(layer, "__class__", DEQ)
        _SLOTS.reset(token)
