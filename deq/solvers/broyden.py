"""Limited-memory "good" Broyden's method on g(z) = f(z) - z, with optional backtracking."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._api import check_bool, check_positive_int, check_tolerances, frozen
from .._tree import row_norm
from ._base import AbstractSolver


@frozen
class Broyden(AbstractSolver):
    r"""Limited-memory "good" Broyden's method for the root of `g(z) = f(z) - z`.

    Keeps an approximation `H = -I + sum_i u_i v_i^T` of the inverse Jacobian of `g` (starting
    from `-I`, i.e. a plain fixed-point step) and updates it with the Sherman-Morrison form of
    Broyden's "good" update:

    .. math::
        z_{k+1} = z_k - s_k H_k g_k, \qquad
        H_{k+1} = H_k + \frac{(\Delta z - H_k \Delta g)\, \Delta z^\top H_k}
                             {\Delta z^\top H_k \Delta g}.

    At most `history_size` pairs `(u_i, v_i)` are kept (a ring buffer: the oldest is
    overwritten), so memory is `O(history_size * n)` per sample whatever `max_steps` is. An
    update whose denominator is zero or non-finite is skipped. With `line_search=True` the step
    length `s_k` backtracks (halving, at most `max_backtracks` times) until
    `||g(z_{k+1})|| <= (1 - 1e-4 s_k) ||g(z_k)||`, keeping the best trial otherwise.

    Args:
      rtol: relative tolerance of the stopping test `||f(z) - z|| <= atol + rtol ||f(z)||`.
      atol: absolute tolerance of the same test.
      max_steps: most steps (one evaluation of `f` each, plus backtracking evaluations).
      history_size: most rank-one updates kept.
      line_search: backtrack on the step length.
      max_backtracks: most halvings per step when `line_search=True`.

    Example:
      >>> import jax.numpy as jnp, deq
      >>> f = lambda z, a: jnp.cos(z) + a
      >>> sol = deq.fixed_point(f, jnp.zeros(3), jnp.zeros(3), solver=deq.Broyden(atol=1e-6))
      >>> bool(sol.stats.converged), round(float(sol.value[0]), 4)
      (True, 0.7391)

    References:
      Broyden, "A class of methods for solving nonlinear simultaneous equations", Math. Comp. 1965.
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    rtol: float = 1e-5
    atol: float = 1e-6
    max_steps: int = 100
    history_size: int = 20
    line_search: bool = False
    max_backtracks: int = 4

    def __post_init__(self):
        owner = type(self).__name__
        check_tolerances(self)
        check_positive_int(owner, "history_size", self.history_size, example=20)
        check_positive_int(owner, "max_backtracks", self.max_backtracks, example=4)
        check_bool(owner, "line_search", self.line_search)

    def init(self, F, x, fx):
        B, n = x.shape
        m = self.history_size
        z = jnp.zeros((B, m, n), x.dtype)
        return (z, z, jnp.zeros((B,), jnp.int32))

    @staticmethod
    def _apply_H(U, V, y):
        """`H y = -y + sum_i u_i (v_i . y)`."""
        return -y + jnp.einsum("bmn,bm->bn", U, jnp.einsum("bmn,bn->bm", V, y))

    @staticmethod
    def _apply_HT(U, V, y):
        """`H^T y = -y + sum_i v_i (u_i . y)`."""
        return -y + jnp.einsum("bmn,bm->bn", V, jnp.einsum("bmn,bn->bm", U, y))

    def _line_search(self, F, x, g, p, x_new, fx_new, active):
        g_norm = row_norm(g)

        def residual(xt, fxt):
            r = row_norm(fxt - xt)
            return jnp.where(jnp.isfinite(r), r, jnp.inf)

        r = residual(x_new, fx_new)
        accepted = ~active | (r <= (1.0 - 1e-4) * g_norm)

        def trial(c):
            s, xb, fxb, acc, rb = c
            s = jnp.where(acc, s, 0.5 * s)
            xt = jnp.where(acc[:, None], xb, x + s[:, None] * p)
            fxt = F(xt)
            rt = residual(xt, fxt)
            take = ~acc & (rt < rb)
            xb = jnp.where(take[:, None], xt, xb)
            fxb = jnp.where(take[:, None], fxt, fxb)
            rb = jnp.where(take, rt, rb)
            acc = acc | (rt <= (1.0 - 1e-4 * s) * g_norm)
            return s, xb, fxb, acc, rb

        # A static number of guarded trials (lax.cond, not while_loop), so that the search can
        # be differentiated when the solve is unrolled; a trial runs only if some row needs it.
        c = (jnp.ones_like(g_norm), x_new, fx_new, accepted, r)
        for _ in range(self.max_backtracks):
            c = jax.lax.cond(jnp.all(c[3]), lambda c: c, trial, c)
        _, x_new, fx_new, _, _ = c
        return x_new, fx_new

    def step(self, F, x, fx, state, active, best):
        U, V, count = state
        g = fx - x
        p = -self._apply_H(U, V, g)
        p = jnp.where(active[:, None], p, 0.0)
        x_new = x + p
        fx_new = F(x_new)
        if self.line_search:
            x_new, fx_new = self._line_search(F, x, g, p, x_new, fx_new, active)
        dx = x_new - x
        dg = (fx_new - x_new) - g
        Hdg = self._apply_H(U, V, dg)
        vT = self._apply_HT(U, V, dx)
        denom = jnp.sum(vT * dg, axis=1)
        scale = row_norm(dx) * row_norm(dg)
        ok = jnp.isfinite(denom) & (jnp.abs(denom) > 1e-12 * scale) & (scale > 0)
        u = (dx - Hdg) / jnp.where(ok, denom, 1.0)[:, None]
        # Rows whose update is skipped scatter out of bounds, which `mode="drop"` ignores.
        pos = jnp.where(ok, count % self.history_size, self.history_size)
        rows = jnp.arange(x.shape[0])
        U = U.at[rows, pos].set(u, mode="drop")
        V = V.at[rows, pos].set(vT, mode="drop")
        return x_new, fx_new, (U, V, count + ok.astype(jnp.int32))
