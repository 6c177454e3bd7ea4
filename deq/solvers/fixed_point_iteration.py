"""Plain and damped fixed-point (Picard / Krasnosel'skii-Mann) iteration."""

from __future__ import annotations

import jax.numpy as jnp

from .._api import check_range, check_tolerances, frozen
from ._base import AbstractSolver


@frozen
class FixedPointIteration(AbstractSolver):
    r"""Damped fixed-point iteration.

    .. math:: z_{k+1} = (1 - \beta) z_k + \beta f(z_k)

    Converges linearly for contractive `f` (Banach); damping `beta < 1` (Krasnosel'skii-Mann)
    also converges for non-expansive maps and can tame oscillating ones.

    Args:
      rtol: relative tolerance of the stopping test `||f(z) - z|| <= atol + rtol ||f(z)||`.
      atol: absolute tolerance of the same test.
      max_steps: most steps (evaluations of `f`) before giving up.
      damping: `beta` in `(0, 1]`; 1 is plain iteration.
      divergence_limit: stop a sample with result DIVERGED once `||f(z)||` exceeds this multiple
        of its start's scale `max(||z0||, ||f(z0)||)`.

    `rtol = atol = 0` runs exactly `max_steps` steps (a fixed budget), reported as MAX_STEPS.

    Example:
      >>> import jax.numpy as jnp, deq
      >>> sol = deq.fixed_point(lambda z, a: 0.5 * z + a, jnp.zeros(2), jnp.ones(2),
      ...                       solver=deq.FixedPointIteration(atol=1e-6))
      >>> bool(sol.stats.converged), sol.value.round(4).tolist()
      (True, [2.0, 2.0])
    """

    rtol: float = 1e-5
    atol: float = 1e-6
    max_steps: int = 100
    damping: float = 1.0
    divergence_limit: float = 1e4

    def __post_init__(self):
        check_tolerances(self)
        check_range(type(self).__name__, "damping", self.damping, 0.0, 1.0)

    def init(self, F, x, fx):
        return ()

    def step(self, F, x, fx, state, active, best):
        x_new = x + self.damping * (fx - x)
        x_new = jnp.where(active[:, None], x_new, x)
        return x_new, F(x_new), state
