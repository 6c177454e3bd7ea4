"""`deq.GMRES(max_steps=k)` counts matrix-vector products, as `max_steps` does in every solver."""

import jax.numpy as jnp
import numpy as np
import pytest

import deq


def _minimal_residual(A, b, x0, k):
    """min ||b - A x|| over x in x0 + span{r0, A r0, ..., A^(k-1) r0}: what k GMRES products reach."""
    r0 = b - A @ x0
    K = np.stack([np.linalg.matrix_power(A, j) @ r0 for j in range(k)], axis=1)
    Q, _ = np.linalg.qr(K)
    c, *_ = np.linalg.lstsq(A @ Q, r0, rcond=None)
    return np.linalg.norm(r0 - A @ Q @ c)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_gmres_max_steps_counts_products(k):
    rng = np.random.default_rng(0)
    n = 8
    M = 0.6 * rng.standard_normal((n, n)) / np.sqrt(n)
    g = rng.standard_normal(n)
    fn = lambda x, p: x @ jnp.asarray(M).T  # noqa: E731  - packed (1, n) rows: f(z) = M z
    x_star = jnp.zeros((1, n))
    backward = deq.IFT(solver=deq.GMRES(rtol=0.0, atol=0.0, max_steps=k, restart=20), warn=False)
    u, out = backward.adjoint(fn, x_star, None, jnp.asarray(g)[None], False)
    A = np.eye(n) - M.T  # the adjoint system (I - J^T) u = g, started from u0 = g
    want = _minimal_residual(A, g, g, k)
    np.testing.assert_allclose(float(out.residual[0]), want, rtol=1e-8)
    if k < n:  # not the residual of k restart cycles (the old meaning), which is smaller
        assert want > 1.5 * _minimal_residual(A, g, g, min(n, 2 * k))


def test_gmres_cycles_round_up():
    assert deq.GMRES(max_steps=45, restart=20).cycles() == (20, 3)
    assert deq.GMRES(max_steps=3, restart=20).cycles() == (3, 1)
    assert deq.GMRES().max_steps == 400  # the old default, 20 cycles of 20, in products
