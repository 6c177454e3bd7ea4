"""The interface every forward solver implements."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

PackedMap = Callable[[jax.Array], jax.Array]


class Best(NamedTuple):
    """The driver's lowest-residual iterate so far, per row, handed to every step.

    A solver that restarts from the best point (Anderson's safeguards) reads it here instead
    of tracking its own copy: one `(B, n)` select per tracked array and step saved.
    """

    x: jax.Array  # (B, n)
    fx: jax.Array  # (B, n) F at x
    res: jax.Array  # (B,) ||fx - x||, +inf where no finite iterate was seen


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

    def step(self, F: PackedMap, x: jax.Array, fx: jax.Array, state: Any, active: jax.Array, best: Best):
        """One step from the current iterate `x` (with `fx = F(x)`).

        `best` is the driver's lowest-residual iterate before this step (see `Best`).

        Returns `(x_new, F(x_new), new_state)`. Rows where `active` is False are discarded by
        the driver; a solver may skip work for them (e.g. propose `x` itself).
        """
        raise NotImplementedError
