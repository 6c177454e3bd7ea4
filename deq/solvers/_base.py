"""The interface every forward solver implements."""

from __future__ import annotations

from typing import Any, Callable

import jax

PackedMap = Callable[[jax.Array], jax.Array]


class AbstractSolver:
    """A fixed-point solver: a frozen configuration with `init` and `step` over a state.

    Solvers act on packed `(B, n)` arrays (one row per independent problem) and must keep every
    leaf of their state with leading axis `B`, so the driver (`deq._loop.run`) can freeze rows
    that have stopped. The driver owns the stopping test, step counting and best-iterate
    tracking; a solver only proposes the next iterate.

    Every solver has `rtol`, `atol` (stopping test `||f(z) - z|| <= atol + rtol * ||f(z)||`) and
    `max_steps`.
    """

    rtol: float
    atol: float
    max_steps: int

    def init(self, F: PackedMap, x: jax.Array, fx: jax.Array) -> Any:
        """The solver state at the starting point `x` with `fx = F(x)`."""
        raise NotImplementedError

    def step(self, F: PackedMap, x: jax.Array, fx: jax.Array, state: Any, active: jax.Array):
        """One step from the current iterate `x` (with `fx = F(x)`).

        Returns `(x_new, F(x_new), new_state)`. Rows where `active` is False are discarded by
        the driver; a solver may skip work for them (e.g. propose `x` itself).
        """
        raise NotImplementedError
