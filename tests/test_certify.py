"""Tests for `deq.certify`: Lipschitz estimates and error certificates."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deq
from deq.certify import (
    Certificate,
    certify,
    certify_estimate,
    lipschitz_estimate,
    spectral_radius_estimate,
)
from deq.nn.contractive import ContractiveDense


@pytest.fixture(scope="module", autouse=True)
def _float64():
    """float64 for this module only (see tests/conftest.py: no global x64 switch)."""
    with jax.enable_x64(True):
        yield


KEY = jax.random.key(0)


def linear(z, A):
    return A @ z


def batched_linear(z, A):
    return jnp.einsum("bij,bj->bi", A, z)


def test_lipschitz_estimate_linear_and_batched():
    A = jax.random.normal(jax.random.key(1), (5, 5))
    est = lipschitz_estimate(linear, jnp.zeros(5), A, key=KEY, num_iters=200)
    np.testing.assert_allclose(est, jnp.linalg.norm(A, 2), rtol=1e-8)
    As = jax.random.normal(jax.random.key(2), (3, 4, 4)) * jnp.array([0.1, 1.0, 10.0])[:, None, None]
    est_b = lipschitz_estimate(batched_linear, jnp.zeros((3, 4)), As, key=KEY, num_iters=200, batch_axis=0)
    assert est_b.shape == (3,)
    np.testing.assert_allclose(est_b, [jnp.linalg.norm(a, 2) for a in As], rtol=1e-8)


def test_lipschitz_estimate_nonlinear_and_gradient():
    W = 0.9 * jax.random.normal(jax.random.key(3), (4, 4)) / 2
    x = jnp.ones(4)
    f = lambda z, W: jnp.tanh(W @ z + x)
    z = deq.fixed_point(f, jnp.zeros(4), W, solver=deq.Anderson(atol=1e-12, rtol=0.0)).value
    J = jax.jacfwd(f)(z, W)
    est = jax.jit(lambda z, W: lipschitz_estimate(f, z, W, key=KEY, num_iters=300))(z, W)
    np.testing.assert_allclose(est, jnp.linalg.norm(J, 2), rtol=1e-8)
    # The gradient is that of sigma_max (simple top singular value).
    A = jax.random.normal(jax.random.key(4), (4, 4))
    g = jax.grad(lambda A: lipschitz_estimate(linear, jnp.zeros(4), A, key=KEY, num_iters=300))(A)
    np.testing.assert_allclose(g, jax.grad(lambda A: jnp.linalg.norm(A, 2))(A), atol=1e-7)


def test_spectral_radius_estimate():
    c, s = np.cos(0.7), np.sin(0.7)
    A = jnp.zeros((3, 3)).at[:2, :2].set(0.8 * jnp.array([[c, -s], [s, c]])).at[2, 2].set(0.3)
    A = A.at[0, 2].set(2.0)  # non-normal: ||A||_2 > 2 but rho = 0.8 (a complex pair)
    est = spectral_radius_estimate(linear, jnp.zeros(3), A, key=KEY, num_iters=400)
    np.testing.assert_allclose(est, 0.8, rtol=1e-2)
    assert float(jnp.linalg.norm(A, 2)) > 2
    As = jnp.stack([0.5 * jnp.eye(2), jnp.diag(jnp.array([-0.9, 0.2]))])
    est_b = spectral_radius_estimate(batched_linear, jnp.zeros((2, 2)), As, key=KEY, batch_axis=0)
    np.testing.assert_allclose(est_b, [0.5, 0.9], rtol=1e-6)


# ------------------------------------------------------------------------------ certificates


def contractive_f(z, p):
    """The functional form of ContractiveDense (tanh), for any batch shape."""
    return jnp.tanh(z @ p["W"] + p["x"] @ p["U"] + p["b"])


def random_cell_params(seed, features=6, in_features=3, batch=4, lipschitz=0.9):
    cell = ContractiveDense(features, in_features, rngs=nnx.Rngs(seed), lipschitz=lipschitz,
                            norm_bound="exact")
    key = jax.random.key(seed + 1)
    # Make the weights large so the cell is close to its Lipschitz bound.
    cell.v[...] = 5.0 * jax.random.normal(key, (features, features), jnp.float64)
    p = {
        "W": cell.weight,
        "U": cell.u[...].astype(jnp.float64),
        "b": 0.1 * jnp.ones(features),
        "x": jax.random.normal(jax.random.fold_in(key, 1), (batch, in_features)),
    }
    return cell, p


REFERENCE = deq.FixedPointIteration(rtol=0.0, atol=1e-14, max_steps=2000)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), lipschitz=st.sampled_from([0.5, 0.9, 0.99]))
def test_certified_bound_holds_against_reference(seed, lipschitz):
    cell, p = random_cell_params(seed, lipschitz=lipschitz)
    assert float(jnp.linalg.norm(p["W"], 2)) <= lipschitz
    z0 = jax.random.normal(jax.random.key(seed), (4, 6))
    ref = deq.fixed_point(contractive_f, z0, p, solver=REFERENCE, batch_axis=0)
    assert bool(jnp.all(ref.stats.converged))
    for steps in (1, 2, 3, 5, 8):
        sol = deq.fixed_point(contractive_f, z0, p, batch_axis=0,
                              solver=deq.FixedPointIteration(max_steps=steps, rtol=0.0, atol=1e-14))
        cert = certify(contractive_f, sol, p, lipschitz=cell, batch_axis=0)
        err = jnp.linalg.norm(sol.value - ref.value, axis=1)
        assert cert.guaranteed and cert.error_bound.shape == (4,)
        assert bool(jnp.all(err <= cert.error_bound * (1 + 1e-9) + 2e-12)), (steps, err, cert.error_bound)
        assert bool(jnp.all(jnp.isfinite(cert.error_bound)))


def test_certify_with_deq_layer_and_attach():
    cell = ContractiveDense(5, 2, rngs=nnx.Rngs(0), lipschitz=0.8)
    layer = deq.nn.DEQ(cell, solver=deq.FixedPointIteration(max_steps=4))
    x = jnp.ones((3, 2))
    sol = layer(x, return_solution=True)
    graphdef, state = nnx.split(cell)
    f = lambda z, a: nnx.merge(graphdef, a[0])(z, a[1])
    cert = certify(f, sol, (state, x), lipschitz=cell.lipschitz_bound(), batch_axis=0)
    ref = deq.nn.DEQ(cell, solver=deq.Anderson(rtol=0.0, atol=1e-7, max_steps=200))(x)
    err = jnp.linalg.norm(sol.value - ref, axis=1)
    assert bool(jnp.all(err <= cert.error_bound + 1e-6))
    out = cert.attach(sol)
    assert out.stats.error_bound is cert.error_bound and out.stats.lipschitz is cert.lipschitz
    assert sol.stats.error_bound is None  # the original is untouched
    np.testing.assert_allclose(cert.residual_norm, sol.stats.residual_norm, rtol=1e-5)


def test_certificate_is_a_pytree_through_jit():
    f = lambda z, a: 0.5 * jnp.tanh(z) + a
    a = jnp.ones(3)
    cert = jax.jit(lambda a: certify(f, jnp.zeros(3), a, lipschitz=0.5))(a)
    assert isinstance(cert, Certificate) and cert.guaranteed is True
    expected = jnp.linalg.norm(f(jnp.zeros(3), a)) / 0.5
    np.testing.assert_allclose(cert.error_bound, expected, rtol=1e-12)
    leaves = jax.tree_util.tree_leaves(cert)
    assert len(leaves) == 3
    # An array L >= 1 gives no bound.
    cert = certify(f, jnp.zeros(3), a, lipschitz=jnp.array(1.5))
    assert float(cert.error_bound) == float("inf")
    assert dataclasses.is_dataclass(cert)


def test_certify_estimate():
    W = 0.6 * jnp.eye(3)
    f = lambda z, W: jnp.tanh(W @ z + 1.0)
    sol = deq.fixed_point(f, jnp.zeros(3), W, solver=deq.FixedPointIteration(max_steps=3))
    cert = certify_estimate(f, sol, W, key=KEY)
    assert cert.guaranteed is False
    J = jax.jacfwd(f)(sol.value, W)
    np.testing.assert_allclose(cert.lipschitz, jnp.linalg.norm(J, 2), rtol=1e-6)
    np.testing.assert_allclose(cert.error_bound, cert.residual_norm / (1 - cert.lipschitz), rtol=1e-12)
    safer = certify_estimate(f, sol, W, key=KEY, safety=1.2)
    assert float(safer.error_bound) > float(cert.error_bound)
    # Expanding map: no bound.
    g = lambda z, a: 2.0 * z + a
    assert float(certify_estimate(g, jnp.zeros(2), jnp.ones(2), key=KEY).error_bound) == float("inf")


@pytest.mark.parametrize(
    "fn, kwargs, exc, match",
    [
        (certify, dict(lipschitz=1.2), ValueError, r"\[0, 1\)"),
        (certify, dict(lipschitz=True), TypeError, "lipschitz"),
        (certify, dict(lipschitz=0.5, batch_axis=2), ValueError, "batch_axis"),
        (certify, dict(lipschitz="0.5"), TypeError, "lipschitz"),
        (certify_estimate, dict(key=0), TypeError, "key"),
        (certify_estimate, dict(key=KEY, safety=0.5), ValueError, "safety"),
        (certify_estimate, dict(key=KEY, num_iters=0), ValueError, "num_iters"),
        (lipschitz_estimate, dict(key=KEY, num_iter=3), TypeError, "num_iters"),
        (spectral_radius_estimate, dict(key=KEY, num_iters=1), ValueError, "num_iters"),
    ],
)
def test_validation(fn, kwargs, exc, match):
    f = lambda z, a: 0.5 * z + a
    with pytest.raises(exc, match=match):
        fn(f, jnp.zeros(2), jnp.ones(2), **kwargs)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), bound=st.floats(0.0, 2.0))
def test_certified_argmax_is_exact_for_a_linear_head(seed, bound):
    """Certified <=> no state within the bound changes the prediction (the worst case for each
    rival class j is the step of length `bound` along V_j - V_t)."""
    key = jax.random.key(seed)
    z = jax.random.normal(key, (16, 5))
    V = jax.random.normal(jax.random.fold_in(key, 1), (5, 4))
    c = jax.random.normal(jax.random.fold_in(key, 2), (4,))
    logits = z @ V + c
    certified = deq.certified_argmax(logits, V, jnp.full((16,), bound))
    top = jnp.argmax(logits, -1)
    for b in range(16):
        t = int(top[b])
        worst = []
        for j in range(4):
            if j == t:
                continue
            d = V[:, j] - V[:, t]
            z_adv = z[b] + bound * d / jnp.linalg.norm(d)  # ||z_adv - z|| = bound
            worst.append(float((z_adv @ V + c)[t] - (z_adv @ V + c)[j]))
        # certified: every worst case keeps t strictly ahead; not certified: some rival catches up
        assert bool(certified[b]) == (min(worst) > 1e-9 * (1 + abs(min(worst)))) or abs(min(worst)) < 1e-9


def test_certified_argmax_errors():
    with pytest.raises(ValueError, match=r"`logits` must have shape \(B, classes\)"):
        deq.certified_argmax(jnp.zeros(3), jnp.zeros((2, 3)), 0.1)
    with pytest.raises(ValueError, match=r"`kernel` must have shape \(features, 3\).*head.kernel"):
        deq.certified_argmax(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 0.1)


def test_certified_argmax_zero_and_non_finite_bounds():
    logits = jnp.array([[2.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the second sample is a tie
    V = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    assert deq.certified_argmax(logits, V, 0.0).tolist() == [True, False]  # exact state: ties stay uncertified
    for bad in (jnp.inf, jnp.nan):
        assert deq.certified_argmax(logits, V, jnp.array([bad, 0.0])).tolist() == [False, False]
