"""`deq.IFT` under every transformation: forward mode, reverse mode and second order, with
every adjoint solver, against float64 finite differences."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq

TIGHT = deq.Anderson(rtol=1e-13, atol=1e-14, max_steps=300)
# The default adjoint is Anderson at a derived tolerance: an explicit Anderson adjoint runs the same code.
ADJOINTS = {
    "default": deq.IFT(),
    "broyden": deq.IFT(solver=deq.Broyden(rtol=1e-13, atol=0.0, max_steps=300)),
    "iteration": deq.IFT(solver=deq.FixedPointIteration(rtol=1e-13, atol=0.0, max_steps=2000)),
    "gmres": deq.IFT(solver=deq.GMRES(rtol=1e-13, atol=0.0)),
}


def cell(z, p):
    return jnp.tanh(z @ p["W"].T + p["x"] + 0.3 * jnp.sin(z))


def _params(n=3, batch=None):
    k1, k2 = jax.random.split(jax.random.key(3))
    W = jax.random.normal(k1, (n, n))
    W = 0.5 * W / jnp.linalg.norm(W, 2)
    x = jax.random.normal(k2, (n,) if batch is None else (batch, n))
    return W, x


def _loss(backward, W, batch_axis=None):
    def L(x):
        z = deq.fixed_point(cell, jnp.zeros_like(x), {"W": W, "x": x}, solver=TIGHT, backward=backward,
                            batch_axis=batch_axis).value
        return jnp.sum(z ** 3 + jnp.cos(z))
    return L


def _fd_grad(L, x, eps=1e-4):
    """Central differences of `L` (scalar or array valued) at the vector `x`: row i is d L / d x_i."""
    x = np.asarray(x, np.float64)
    rows = []
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = eps
        rows.append((np.asarray(L(jnp.asarray(x + e))) - np.asarray(L(jnp.asarray(x - e)))) / (2 * eps))
    return np.stack(rows)


@pytest.mark.parametrize("name", list(ADJOINTS))
def test_forward_and_second_order_match_finite_differences(name):
    W, x = _params()
    backward = ADJOINTS[name]
    sol = lambda x: deq.fixed_point(cell, jnp.zeros(3), {"W": W, "x": x}, solver=TIGHT,  # noqa: E731
                                    backward=backward).value
    v = jnp.array([0.3, -1.0, 0.5])
    # Central differences: truncation ~eps^2, solve noise ~1e-13 / eps.
    eps = 1e-4
    _, t = jax.jvp(sol, (x,), (v,))
    np.testing.assert_allclose(t, (sol(x + eps * v) - sol(x - eps * v)) / (2 * eps), rtol=1e-6, atol=1e-8)
    # Second order, forward over reverse: the Hessian-vector product against differences of
    # the gradient.
    g = jax.grad(_loss(backward, W))
    _, hv = jax.jvp(g, (x,), (v,))
    np.testing.assert_allclose(hv, (g(x + eps * v) - g(x - eps * v)) / (2 * eps), rtol=1e-5, atol=1e-8)


@pytest.mark.slow  # the Hessian-vector products above cover second order for every adjoint
def test_full_jacobians_and_hessian_with_the_default_adjoint():
    W, x = _params()
    sol = lambda x: deq.fixed_point(cell, jnp.zeros(3), {"W": W, "x": x}, solver=TIGHT).value  # noqa: E731
    np.testing.assert_allclose(jax.jacfwd(sol)(x), jax.jacrev(sol)(x), rtol=1e-10, atol=1e-13)
    L = _loss(deq.IFT(), W)
    H = jax.hessian(L)(x)
    np.testing.assert_allclose(H, _fd_grad(jax.grad(L), x), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(H, H.T, rtol=1e-9, atol=1e-12)  # a Hessian is symmetric
    np.testing.assert_allclose(jax.jacrev(jax.grad(L))(x), H, rtol=1e-9, atol=1e-12)  # reverse over reverse


def test_forward_mode_per_sample_and_under_vmap():
    W, x = _params(batch=4)
    sol = lambda x: deq.fixed_point(cell, jnp.zeros_like(x), {"W": W, "x": x}, solver=TIGHT,  # noqa: E731
                                    batch_axis=0).value
    v = jax.random.normal(jax.random.key(5), x.shape)
    _, t = jax.jvp(sol, (x,), (v,))
    one = lambda xi, vi: jax.jvp(lambda y: deq.fixed_point(cell, jnp.zeros(3), {"W": W, "x": y},  # noqa: E731
                                                           solver=TIGHT).value, (xi,), (vi,))[1]
    np.testing.assert_allclose(t, jax.vmap(one)(x, v), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(t[2], one(x[2], v[2]), rtol=1e-9, atol=1e-12)


def test_gradient_is_unchanged_by_the_linear_solve_form():
    # The reverse-mode gradient through the transposed tangent solve equals the custom-VJP path
    # (taken when a backward-statistics probe is given) and finite differences.
    W, x = _params()
    L = _loss(deq.IFT(), W)
    g = jax.grad(L)(x)
    probe = deq.BackwardStats.probe(None)

    def with_probe(x, probe):
        z = deq.fixed_point(cell, jnp.zeros(3), {"W": W, "x": x}, solver=TIGHT, backward_stats=probe).value
        return jnp.sum(z ** 3 + jnp.cos(z))

    g_vjp, stats = jax.grad(with_probe, argnums=(0, 1))(x, probe)
    np.testing.assert_allclose(g, g_vjp, rtol=1e-11)
    assert float(stats.converged) == 1.0
    np.testing.assert_allclose(g, _fd_grad(L, x), rtol=1e-7)


def test_tangent_solve_failure_warns_with_its_own_residual():
    W, x = _params()
    W = 3.0 * W / jnp.linalg.norm(W, 2)  # I - J singular-ish: the tangent solve cannot converge fast
    backward = deq.IFT(solver=deq.FixedPointIteration(rtol=1e-12, atol=0.0, max_steps=3))
    sol = lambda x: deq.fixed_point(cell, jnp.zeros(3), {"W": W, "x": x}, backward=backward).value  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.block_until_ready(jax.jvp(sol, (x,), (jnp.ones(3),)))
    msgs = [str(w.message) for w in caught if issubclass(w.category, deq.NonConvergenceWarning)]
    assert msgs and "forward-mode (tangent) solve" in msgs[0] and "||J t + b - t||" in msgs[0]


def test_tangent_solve_raises_with_throw():
    W, x = _params()
    W = 3.0 * W / jnp.linalg.norm(W, 2)
    backward = deq.IFT(solver=deq.FixedPointIteration(rtol=1e-12, atol=0.0, max_steps=3))
    sol = lambda x: deq.fixed_point(cell, jnp.zeros(3), {"W": W, "x": x}, backward=backward,  # noqa: E731
                                    solver=deq.Anderson(max_steps=300), throw=True).value
    # under a transformation the call is traced: deq.clean_errors() delivers the error as itself
    with pytest.raises(deq.SolveError, match="forward-mode"), deq.clean_errors():
        jax.block_until_ready(jax.jvp(sol, (x,), (jnp.ones(3),)))
