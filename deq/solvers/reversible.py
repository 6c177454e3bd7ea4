"""The algebraically reversible coupled iteration of Reversible DEQs (McCallum, Arora & Foster 2025)."""

from __future__ import annotations

import math

import jax.numpy as jnp

from .._api import _is_real, check_tolerances, frozen
from ._base import AbstractSolver


@frozen
class ReversibleIteration(AbstractSolver):
    r"""The reversible coupled fixed-point iteration of Reversible DEQs.

    Two states, both started at `z0` (`y_0 = z_0 = z0`), are relaxed in turn, each towards `f`
    of the other's newest value:

    .. math::
        y_{n+1} = (1 - b)\, y_n + b\, f(z_n), \qquad
        z_{n+1} = (1 - b)\, z_n + b\, f(y_{n+1}),

    and `z_n` is the iterate: the stopping test `||f(z) - z|| <= atol + rtol ||f(z)||`, the
    statistics and the returned (lowest-residual) value are those of `z`, exactly as for the
    other solvers. One step costs two evaluations of `f`. Every step can be undone by algebra
    alone (for `b != 1`),

    .. math::
        z_n = \frac{z_{n+1} - b\, f(y_{n+1})}{1 - b}, \qquad
        y_n = \frac{y_{n+1} - b\, f(z_n)}{1 - b},

    which `deq.Reversible()` uses to differentiate the iteration exactly without storing its
    iterates. Any other backward strategy works with it too (`deq.IFT()` treats its limit as a
    fixed point like any other; `deq.Unrolled()` backpropagates through the stored steps).

    Choosing `b`. For a contraction `f` the iteration converges for `b` in `(0, 1)`; `b = 1`
    cannot be reversed; `b` in `(1, 2)` (over-relaxation) may converge faster but is not
    guaranteed to. Every `b` gives float32-accurate gradients with `deq.Reversible()` (its
    segment length shrinks as `b` nears 1: 4 steps at `b = 0.5`, 2 at 0.8, every step stored for
    `0.875 < b < 1.125`, which costs memory); each undone step multiplies rounding errors by up to
    about `|1 - b|^(-2)`. Measured on the contractive problem of `benchmarks/solvers.py`
    (`python -m benchmarks.reversible`) at `b = 0.3 / 0.5 / 0.8 / 0.9 / 1.2 / 1.5`: steps (two
    evaluations of `f` each) to `||f(z) - z|| <= 1e-4` 200 / 114 / 60 / 50 / 26 / 20 (plain
    iteration: 81 evaluations); growth of rounding per undone step 1.9 / 3.5 / 19 / 69 / 15 /
    2.0. The default `b = 0.5` is a safe middle.

    Args:
      rtol: relative tolerance of the stopping test (on `z`).
      atol: absolute tolerance of the same test.
      max_steps: most steps (each two evaluations of `f`).
      damping: `b` in `(0, 2)`, not 1.
      divergence_limit: stop a sample with result DIVERGED once `||f(z)||` exceeds this multiple
        of its start's scale `max(||z0||, ||f(z0)||)`.

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> f = lambda z, a: jnp.tanh(0.5 * z + a)
      >>> solve = lambda a: deq.fixed_point(f, jnp.zeros(2), a, solver=deq.ReversibleIteration(atol=1e-6),
      ...                                   backward=deq.Reversible())
      >>> bool(solve(jnp.ones(2)).stats.converged)
      True
      >>> jax.grad(lambda a: solve(a).value.sum())(jnp.ones(2)).shape
      (2,)

    References:
      McCallum, Arora & Foster, "Reversible Deep Equilibrium Models", arXiv:2509.12917, 2025.
    """

    rtol: float = 1e-5
    atol: float = 1e-6
    max_steps: int = 100
    damping: float = 0.5
    divergence_limit: float = 1e4

    def __post_init__(self):
        check_tolerances(self)
        b = self.damping
        if not _is_real(b) or not math.isfinite(b) or not 0.0 < b < 2.0 or b == 1.0:
            raise ValueError(
                f"ReversibleIteration: `damping` must lie in (0, 2) and differ from 1 (b = 1 cannot be "
                f"reversed), got {b!r}. Pass e.g. damping=0.5."
            )

    def init(self, F, x, fx):
        return x  # y_0 = z_0

    def step(self, F, x, fx, state, active, best):
        b, m = self.damping, active[:, None]
        y = jnp.where(m, state + b * (fx - state), state)
        z = jnp.where(m, x + b * (F(y) - x), x)
        return z, F(z), y

    def unstep(self, F, y, z):
        """Undo one step: from `(y_{n+1}, z_{n+1})` return `(y_n, z_n)` (rows of `(B, n)`)."""
        b = self.damping
        z_prev = (z - b * F(y)) / (1.0 - b)
        return (y - b * F(z_prev)) / (1.0 - b), z_prev
