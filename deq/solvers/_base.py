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

    Solvers act on packed `(B, n)` arrays (one row per independent problem) and keep every leaf
    of their state with leading axis `B`, one row per problem. The driver (`deq._loop.run`) owns
    the stopping test, step counting, freezing rows that have stopped and best-iterate tracking;
    a solver only proposes the next iterate.

    Every solver has `rtol`, `atol` (stopping test `||f(z) - z|| <= atol + rtol * ||f(z)||`) and
    `max_steps`.

    Example: a custom solver (here damped iteration that restarts from the best point whenever
    the residual doubles) is a frozen dataclass with `init` and `step`:

      >>> import dataclasses, jax.numpy as jnp, deq
      >>> @dataclasses.dataclass(frozen=True)
      ... class Careful(deq.AbstractSolver):
      ...     rtol: float = 1e-5
      ...     atol: float = 1e-6
      ...     max_steps: int = 200
      ...     def init(self, F, x, fx):
      ...         return ()
      ...     def step(self, F, x, fx, state, active, best):
      ...         worse = jnp.linalg.norm(fx - x, axis=1) > 2 * best.res
      ...         x, fx = jnp.where(worse[:, None], best.x, x), jnp.where(worse[:, None], best.fx, fx)
      ...         x_new = jnp.where(active[:, None], x + 0.5 * (fx - x), x)
      ...         return x_new, F(x_new), state
      >>> sol = deq.fixed_point(lambda z, a: jnp.cos(z) + a, jnp.zeros(2), jnp.zeros(2), solver=Careful())
      >>> bool(sol.stats.converged), round(float(sol.value[0]), 4)
      (True, 0.7391)
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
