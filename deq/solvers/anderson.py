"""Type-II Anderson acceleration in difference form, with column dropping and safeguards."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._api import check_nonneg, check_positive_int, check_range, check_tolerances, frozen
from .._tree import row_norm
from ._base import AbstractSolver

# A column of the (unit-diagonal) Gram matrix of residual differences is dropped when the part of
# it not explained by the newer columns has squared relative size below this many machine
# epsilons: its coefficient would be set by rounding error. 100 eps keeps the condition number of
# the kept columns below about 1/sqrt(100 eps) per column (300 in float32, 7e6 in float64).
_DROP_EPS = 100.0

# Up to this history size the least squares is an unrolled factorization with column dropping;
# above it, a regularized LAPACK solve (`_ridge_solve`).
_UNROLLED_MAX = 8


class AndersonState(NamedTuple):
    """Anderson's per-row state (every leaf has leading axis `B`).

    The `m` columns of `dF`/`dG` are differences `f(z_{i+1}) - f(z_i)` and `g(z_{i+1}) - g(z_i)`
    (`g = f - id`) of consecutive points, in a ring buffer: slot `(pos - 1 - j) % m` holds the
    `j`-th newest column; the newest `count` columns are valid. The small `gram` and `rhs` are
    kept in age order (index 0 the newest), so the least squares needs no reordering.
    """

    dF: jax.Array  # (B, m, n)
    dG: jax.Array  # (B, m, n)
    gram: jax.Array  # (B, m, m) dG^T dG, age order
    rhs: jax.Array  # (B, m) dG^T g at the current point, age order
    count: jax.Array  # (B,) int32 valid columns
    pos: jax.Array  # (B,) int32 next slot written
    stale: jax.Array  # (B,) int32 steps without a 1% improvement of the best residual
    to_best: jax.Array  # (B,) bool: the next step restarts from the driver's best point


def _slots(pos: jax.Array, m: int) -> jax.Array:
    """`(B, m)` ring slot of each row's `j`-th newest column, given the next slot `pos`."""
    return (pos[:, None] - 1 - jnp.arange(m)[None, :]) % m


def _permute(v: jax.Array, src: jax.Array) -> jax.Array:
    """`out[:, j] = v[:, src[:, j]]` for small static `m`, as `m` fusible selects (a gather, or a
    one-hot reduction, is a kernel of its own on the CPU and cost more than the rest of a step)."""
    m = v.shape[1]
    out = jnp.zeros_like(v)
    for s in range(m):
        out = jnp.where(src == s, v[:, s:s + 1], out)
    return out


def _unpermute(v: jax.Array, src: jax.Array) -> jax.Array:
    """The inverse of `_permute`: `out[:, src[:, j]] = v[:, j]`."""
    m = v.shape[1]
    out = jnp.zeros_like(v)
    for j in range(m):
        out = jnp.where(jnp.arange(m)[None, :] == src[:, j:j + 1], v[:, j:j + 1], out)
    return out


def _ridge_solve(A: jax.Array, b: jax.Array, valid: jax.Array, ridge) -> jax.Array:
    """For histories above `_UNROLLED_MAX`: one LAPACK solve of `A + ridge I` (invalid columns
    replaced by identity rows), the unrolled factorization's work growing as `m^3` kernels.
    Dependent columns are regularized at the dropping level instead of dropped."""
    m = A.shape[-1]
    both = valid[:, :, None] & valid[:, None, :]
    eye = jnp.eye(m, dtype=A.dtype)
    A = jnp.where(both, A, 0.0) + jnp.where(valid[:, :, None], ridge, 1.0) * eye
    y = jnp.linalg.solve(A, jnp.where(valid, b, 0.0)[:, :, None])[:, :, 0]
    return jnp.where(valid, y, 0.0)


def _ldl_drop(A: jax.Array, b: jax.Array, valid: jax.Array, drop_tol) -> tuple[jax.Array, jax.Array]:
    """Least-squares coefficients from a unit-diagonal Gram matrix, dropping dependent columns.

    An LDL^T factorization of `A` (B, m, m) in the given column order, unrolled over the static
    size `m` in elementwise ops on `(B,)` arrays that XLA fuses into a few kernels (a LAPACK/cuSOLVER call for a
    5 x 5 system costs more than the rest of a step on a GPU: about 100 us per call on an H100,
    against about 30 us for one evaluation of a 256-wide dense cell). Column `j` is kept when it
    is valid and its pivot, the squared sine of its angle to the kept earlier columns, exceeds
    `drop_tol`; a dropped column gets coefficient 0 and does not enter later pivots, so the kept
    columns are well conditioned in any precision (the effect of Walker & Ni's QR with column
    deletion, at `O(m^3)` work per row, independent of the state size).

    Returns `(x, kept)`: the `(B, m)` solution of `A x = b` restricted to the kept columns, and
    the `(B, m)` kept mask. Differentiable: the keep decisions carry no derivative.
    """
    m = A.shape[-1]
    L = [[None] * m for _ in range(m)]
    d, kept = [], []
    for j in range(m):
        dj = A[:, j, j]
        for k in range(j):
            dj = dj - L[j][k] * L[j][k] * d[k]
        sdj = jax.lax.stop_gradient(dj)
        keep = valid[:, j] & jnp.isfinite(sdj) & (sdj > drop_tol)
        dj = jnp.where(keep, dj, 1.0)
        d.append(dj)
        kept.append(keep)
        for i in range(j + 1, m):
            lij = A[:, i, j]
            for k in range(j):
                lij = lij - L[i][k] * L[j][k] * d[k]
            L[i][j] = jnp.where(keep, lij / dj, 0.0)
    y = []
    for i in range(m):  # L y = b, zero on dropped columns
        yi = b[:, i]
        for k in range(i):
            yi = yi - L[i][k] * y[k]
        y.append(jnp.where(kept[i], yi, 0.0))
    x = [None] * m
    for i in reversed(range(m)):  # D L^T x = y
        xi = y[i] / d[i]
        for k in range(i + 1, m):
            xi = xi - L[k][i] * x[k]
        x[i] = jnp.where(kept[i], xi, 0.0)
    return jnp.stack(x, axis=1), jnp.stack(kept, axis=1)


@frozen
class Anderson(AbstractSolver):
    r"""Type-II Anderson acceleration (Anderson 1965; Walker & Ni 2011), in difference form.

    With residuals `g_i = f(z_i) - z_i` and the last `m = history_size` differences of
    consecutive points `\Delta g_i = g_{i+1} - g_i`, `\Delta f_i = f(z_{i+1}) - f(z_i)`, each step
    solves the unconstrained least-squares problem and mixes

    .. math::
        \gamma = \arg\min_\gamma \|g_k - \Delta G\, \gamma\|^2 + \lambda \|D^{1/2}\gamma\|^2,
        \qquad z_{k+1} = z_k + \beta g_k - (\Delta Z + \beta \Delta G)\,\gamma,

    (`D` the diagonal of `\Delta G^\top \Delta G`), which equals the classical form
    `z_{k+1} = \sum_i \alpha_i ((1 - \beta) z_i + \beta f(z_i))` with `\sum_i \alpha_i = 1`
    over the last `m + 1` points. With `beta = 1` the step is `f(z_k) - \Delta F \gamma`.
    One difference (`history_size=1`) is already a secant method: a scalar affine map is solved
    in two steps.

    The least squares is solved through the Gram matrix of the differences, updated by one row
    per step (`O(m n)`), scaled to unit diagonal and factored newest column first; a column whose
    part not explained by newer ones is below `100 eps` of its size (squared) is dropped, so
    collinear, scalar or stale histories do not produce garbage weights in float32 or float64
    (the role of the QR with column deletion of Walker & Ni). Each sample of a batch has its own
    weights.

    Safeguards, all inside the compiled loop and per sample:

    1. Non-finite weights, or classical weights `alpha` larger than `max_coefficient` in
       magnitude: the step falls back to a damped fixed-point step `z + beta (f(z) - z)` and the
       history restarts from that step.
    2. Growing residual: when a new residual exceeds `growth_limit` times the lowest residual
       this solver has seen, the next step restarts from the lowest-residual point (a damped
       fixed-point step from there, with a fresh history).
    3. Stagnation: when the lowest residual has not dropped by 1% for `patience` consecutive
       steps, the history likewise restarts from the lowest-residual point (`patience=0` turns
       this off).

    Args:
      rtol: relative tolerance of the stopping test `||f(z) - z|| <= atol + rtol ||f(z)||`.
      atol: absolute tolerance of the same test.
      max_steps: most steps (one evaluation of `f` each).
      history_size: `m`, the number of differences kept (`m + 1` points are mixed).
      damping: `beta` in `(0, 1]`, the mixing parameter.
      ridge: `lambda >= 0`, optional Tikhonov regularization relative to each column's size. The
        default 0 leaves conditioning to column dropping; a ridge above `100 eps` also keeps
        (regularized) columns that dropping would remove, which slows convergence.
      max_coefficient: safeguard threshold on `max_i |alpha_i|`.
      growth_limit: restart when the residual grows past this multiple of the best one.
      patience: restart after this many steps without a 1% improvement (0: never).

    Example:
      >>> import jax.numpy as jnp, deq
      >>> f = lambda z, a: jnp.cos(z) + a
      >>> sol = deq.fixed_point(f, jnp.zeros(3), jnp.zeros(3), solver=deq.Anderson(atol=1e-6))
      >>> bool(sol.stats.converged), round(float(sol.value[0]), 4)
      (True, 0.7391)
      >>> sol = deq.fixed_point(lambda z, a: 0.5 * z + a, 0.0, 1.0, solver=deq.Anderson(history_size=1))
      >>> int(sol.stats.num_steps), round(float(sol.value), 6)
      (2, 2.0)

    References:
      Anderson, "Iterative procedures for nonlinear integral equations", J. ACM 1965.
      Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011.
    """

    rtol: float = 1e-5
    atol: float = 1e-6
    max_steps: int = 100
    history_size: int = 5
    damping: float = 1.0
    ridge: float = 0.0
    max_coefficient: float = 1e4
    growth_limit: float = 1e2
    patience: int = 30

    def __post_init__(self):
        owner = type(self).__name__
        check_tolerances(self)
        check_positive_int(owner, "history_size", self.history_size, example=5)
        check_range(owner, "damping", self.damping, 0.0, 1.0)
        check_nonneg(owner, "ridge", self.ridge)
        check_range(owner, "max_coefficient", self.max_coefficient, 1.0, float("inf"), lo_open=False)
        check_range(owner, "growth_limit", self.growth_limit, 1.0, float("inf"), lo_open=False)
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"{owner}: `patience` must be an integer >= 0, got {self.patience!r}. Pass e.g. patience=30 (0 disables).")

    def init(self, F, x, fx):
        B, n = x.shape
        m = self.history_size
        hist = jnp.zeros((B, m, n), x.dtype)
        zi = jnp.zeros((B,), jnp.int32)
        return AndersonState(hist, hist, jnp.zeros((B, m, m), x.dtype), jnp.zeros((B, m), x.dtype),
                             zi, zi, zi, jnp.zeros((B,), bool))

    def mix(self, state: AndersonState):
        """`(gamma, alpha, ok)`: the difference weights `gamma` (B, m), by ring slot; the classical
        weights `alpha` (B, m + 1) over the current point and the `m` before it, newest first
        (zero beyond the history, summing to 1); and whether they passed the safeguard (B,)."""
        m = self.history_size
        valid = jnp.arange(m)[None, :] < state.count[:, None]
        gram, rhs = state.gram, state.rhs
        diag = jnp.diagonal(gram, axis1=1, axis2=2)
        usable = valid & (diag > 0) & jnp.isfinite(diag)
        inv = jnp.where(usable, jax.lax.rsqrt(jnp.where(usable, diag, 1.0)), 0.0)
        A = gram * inv[:, :, None] * inv[:, None, :]
        A = A + self.ridge * jnp.eye(m, dtype=A.dtype)
        drop_tol = _DROP_EPS * jnp.finfo(A.dtype).eps
        if m <= _UNROLLED_MAX:
            y, _ = _ldl_drop(A, rhs * inv, usable, drop_tol)
        else:
            y = _ridge_solve(A, rhs * inv, usable, drop_tol)
        gamma_new_first = y * inv
        # Classical weights over points p_0 (current), p_1, ...: alpha_0 = 1 - gamma_0,
        # alpha_j = gamma_{j-1} - gamma_j, alpha_m = gamma_{m-1}.
        padded = jnp.pad(gamma_new_first, ((0, 0), (1, 1)))
        alpha = padded[:, :-1] - padded[:, 1:]
        alpha = alpha.at[:, 0].add(1.0)
        sg = jax.lax.stop_gradient(alpha)
        ok = jnp.all(jnp.isfinite(sg), axis=1) & (jnp.max(jnp.abs(sg), axis=1) <= self.max_coefficient)
        gamma_new_first = jnp.where(ok[:, None], gamma_new_first, 0.0)
        gamma = _unpermute(gamma_new_first, _slots(state.pos, m))  # back to ring slots
        return gamma, jnp.where(ok[:, None], alpha, 0.0), ok

    def step(self, F, x, fx, state: AndersonState, active, best):
        beta = self.damping
        m = self.history_size
        gamma, _, ok = self.mix(state)
        ok = ok & ~state.to_best
        g = fx - x
        # z + beta g - (dZ + beta dG) gamma, with dZ = dF - dG.
        mixed = jnp.einsum("bm,bmn->bn", gamma, state.dF)
        if beta != 1.0:
            mixed = mixed - (1.0 - beta) * jnp.einsum("bm,bmn->bn", gamma, state.dG)
        x_aa = x + beta * g - mixed
        # A damped fixed-point step: the safeguard's fallback, and a restart's step from the
        # lowest-residual point (the driver's, read before it is updated, so XLA need not copy it).
        x_base = jnp.where(state.to_best[:, None], best.x, x)
        fx_base = jnp.where(state.to_best[:, None], best.fx, fx)
        x_fp = x_base + beta * (fx_base - x_base)
        x_new = jnp.where((ok & active)[:, None], x_aa, jnp.where(active[:, None], x_fp, x))
        # The point the new difference column starts from (a failed safeguard or a restart
        # starts the history from this column alone), materialized before F is evaluated: read
        # after it, the loop-carried x and fx (which the driver then overwrites in place) would
        # be copied every step.
        restart = ~ok
        x_new, f_from, g_from = jax.lax.optimization_barrier(
            (x_new, jnp.where(restart[:, None], fx_base, fx), jnp.where(restart[:, None], fx_base - x_base, g)))
        fx_new = F(x_new)
        g_new = fx_new - x_new
        # The driver computes the same norm; XLA merges the two.
        r_new = jax.lax.stop_gradient(row_norm(g_new))
        r_new = jnp.where(jnp.isfinite(r_new), r_new, jnp.inf)
        # On growth or stagnation the next step restarts from the lowest-residual point.
        stale = jnp.where(r_new < 0.99 * best.res, 0, state.stale + 1)
        back = r_new > self.growth_limit * best.res
        if self.patience > 0:
            back = back | (stale >= self.patience)
        stale = jnp.where(back, 0, stale)
        df = fx_new - f_from
        dg = g_new - g_from
        # The new column's products with the old columns (ring order, turned into age order)
        # and with itself, and the next right-hand side.
        src = _slots(state.pos, m)
        dots = _permute(jnp.einsum("bmn,bn->bm", state.dG, dg), src)
        rhs = _permute(jnp.einsum("bmn,bn->bm", state.dG, g_new), src)
        # As dots: written as sums, XLA fused them with a broadcast into an m-times larger
        # reduction that cost half a step.
        dd = jnp.einsum("bn,bn->b", dg, dg)[:, None]
        dr = jnp.einsum("bn,bn->b", dg, g_new)[:, None]
        # A term that is exactly zero but depends on those products orders the history write
        # after the reads, so XLA updates the history in place instead of copying it every step.
        order = jnp.minimum(jnp.abs(jax.lax.stop_gradient(dots[:, :1] + rhs[:, :1])), 0.0)
        pos = jnp.where(restart, 0, state.pos)
        rows = jnp.arange(x.shape[0])
        dF = state.dF.at[rows, pos].set(df)
        dG = state.dG.at[rows, pos].set(dg + order)
        # Age order shifts by one: the new column first, the oldest falls off.
        top = jnp.concatenate([dd, dots[:, :m - 1]], axis=1)
        rest = jnp.concatenate([dots[:, :m - 1, None], state.gram[:, :m - 1, :m - 1]], axis=2)
        gram = jnp.concatenate([top[:, None, :], rest], axis=1)
        rhs = jnp.concatenate([dr, rhs[:, :m - 1]], axis=1)
        count = jnp.where(restart, 1, jnp.minimum(state.count + 1, m))
        return x_new, fx_new, AndersonState(dF, dG, gram, rhs, count, (pos + 1) % m, stale, back)
