"""Tests for `deq.nn.contractive` (proven contractive cells) and `deq.nn.normalization`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import deq
from deq.nn import SolverConstant
from deq.nn.contractive import ContractiveDense, spectral_norm_upper_bound
from deq.nn.normalization import (
    PowerIterationState,
    SpectralNormDense,
    WeightNormDense,
    spectral_norm_step,
)


@pytest.fixture(scope="module", autouse=True)
def _float64():
    """float64 for this module only (see tests/conftest.py: no global x64 switch)."""
    with jax.enable_x64(True):
        yield


FEATURES = 5
matrices = hnp.arrays(
    np.float64, (FEATURES, FEATURES),
    # No subnormal entries: the reference jnp.linalg.norm(V, 2) (LAPACK's SVD) itself returns NaN
    # on a matrix of subnormals (found by hypothesis: entries of 1.1e-308), so it cannot judge them.
    elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(V=matrices, lipschitz=st.floats(0.01, 0.999), method=st.sampled_from(["min", "frobenius", "holder", "exact"]))
def test_weight_norm_bound_holds(V, lipschitz, method):
    cell = ContractiveDense(FEATURES, 2, rngs=nnx.Rngs(0), lipschitz=lipschitz, norm_bound=method)
    cell.v[...] = jnp.asarray(V)
    W = cell.weight
    assert float(jnp.linalg.norm(W, 2)) <= cell.lipschitz_bound()
    assert float(spectral_norm_upper_bound(jnp.asarray(V), method)) >= float(jnp.linalg.norm(V, 2)) * (1 - 1e-12)


def test_bound_robust_to_extreme_scales_and_zero():
    for scale in (1e-270, 1e-3, 1e250):
        V = scale * jnp.ones((FEATURES, FEATURES))  # rank one: every bound is tight
        for method in ("min", "frobenius", "holder"):
            np.testing.assert_allclose(spectral_norm_upper_bound(V, method), FEATURES * scale, rtol=1e-12)
    cell = ContractiveDense(FEATURES, 2, rngs=nnx.Rngs(0))
    cell.v[...] = jnp.zeros((FEATURES, FEATURES))
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, FEATURES)), jnp.ones((1, 2)))))(cell)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_rank_one_and_scaled_identity_are_tight():
    u = jnp.arange(1.0, FEATURES + 1)
    cell = ContractiveDense(FEATURES, 2, rngs=nnx.Rngs(0), lipschitz=0.9)
    for V in (3.0 * jnp.outer(u, u[::-1]), 7.0 * jnp.eye(FEATURES)):
        cell.v[...] = V
        sn = float(jnp.linalg.norm(cell.weight, 2))
        assert sn <= 0.9 and sn > 0.9 * (1 - 1e-10)
    cell.v[...] = 0.1 * jnp.eye(FEATURES)  # small weights are left alone (no scaling up)
    np.testing.assert_allclose(cell.weight, 0.9 * 0.1 * jnp.eye(FEATURES), rtol=1e-12)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), activation=st.sampled_from(["tanh", "relu"]))
def test_plain_iteration_converges_to_unique_point(seed, activation):
    cell = ContractiveDense(FEATURES, 3, rngs=nnx.Rngs(seed), lipschitz=0.9, activation=activation,
                            norm_bound="exact")
    key = jax.random.key(seed)
    cell.v[...] = 10.0 * jax.random.normal(key, (FEATURES, FEATURES), jnp.float64)
    cell.b[...] = jnp.ones(FEATURES)
    x = jax.random.normal(jax.random.fold_in(key, 1), (2, 3))
    starts = 10.0 * jax.random.normal(jax.random.fold_in(key, 2), (4, 2, FEATURES))
    graphdef, state = nnx.split(cell)

    @jax.jit
    def iterate(z, state):
        c = nnx.merge(graphdef, state)
        return jax.lax.fori_loop(0, 400, lambda _, z: c(z, x), z)

    ends = jnp.stack([iterate(z, state) for z in starts])
    np.testing.assert_allclose(ends, jnp.broadcast_to(ends[0], ends.shape), atol=1e-12)
    np.testing.assert_allclose(cell(ends[0], x), ends[0], atol=1e-12)
    # and contraction holds pointwise for random pairs
    z1, z2 = starts[0], starts[1]
    d_out = jnp.linalg.norm(cell(z1, x) - cell(z2, x), axis=1)
    assert bool(jnp.all(d_out <= 0.9 * jnp.linalg.norm(z1 - z2, axis=1)))


def test_deq_layer_with_contractive_cell():
    cell = ContractiveDense(8, 3, rngs=nnx.Rngs(0), lipschitz=0.9)
    x = jnp.ones((4, 3))
    assert cell.init_state(x).shape == (4, 8)
    layer = deq.nn.DEQ(cell, solver=deq.FixedPointIteration(rtol=0.0, atol=1e-10, max_steps=500))
    sol = layer(x, return_solution=True)
    assert bool(jnp.all(sol.stats.converged))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert grads["cell"]["v"][...].shape == (8, 8)
    assert cell.lipschitz_bound() == 0.9


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(lipschitz=1.0), ValueError, "lipschitz"),
        (dict(lipschitz=0.0), ValueError, "lipschitz"),
        (dict(activation="gelu"), ValueError, "activation"),
        (dict(norm_bound="spectral"), ValueError, "norm_bound"),
        (dict(features=0), ValueError, "features"),
        (dict(use_bias=1), TypeError, "use_bias"),
    ],
)
def test_contractive_validation(kwargs, exc, match):
    a = dict(features=4, in_features=2)
    a.update(kwargs)
    with pytest.raises(exc, match=match):
        ContractiveDense(a.pop("features"), a.pop("in_features"), rngs=nnx.Rngs(0), **a)


def test_contractive_call_shape_errors():
    cell = ContractiveDense(4, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features=2"):
        cell(jnp.zeros((1, 4)), jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match="features=4"):
        cell(jnp.zeros((1, 5)), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="method"):
        spectral_norm_upper_bound(jnp.eye(2), "nuclear")


# ----------------------------------------------------------------------------- normalization


def test_spectral_norm_dense_power_iteration():
    layer = SpectralNormDense(6, 4, rngs=nnx.Rngs(0), coeff=0.7, init_power_iterations=0)
    assert isinstance(layer.u, PowerIterationState) and isinstance(layer.u, SolverConstant)
    assert not isinstance(layer.u, nnx.Param)
    u0 = layer.u[...]
    x = jnp.ones((2, 6))
    layer(x)
    np.testing.assert_array_equal(layer.u[...], u0)  # the call only reads u
    for _ in range(30):
        assert spectral_norm_step(layer) == 1
    assert not np.allclose(layer.u[...], u0)
    np.testing.assert_allclose(jnp.linalg.norm(layer.weight, 2), 0.7, rtol=1e-6)
    # gradient of the sigma estimate = gradient of the true spectral norm once u has converged
    W = layer.kernel[...]
    g_est = jax.grad(lambda W: jnp.linalg.norm(W @ jax.lax.stop_gradient(layer.u[...])))(W)
    np.testing.assert_allclose(g_est, jax.grad(lambda W: jnp.linalg.norm(W, 2))(W), atol=1e-5)
    # nnx.grad differentiates Params only: u gets no gradient
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert "u" not in grads and "kernel" in grads


def test_spectral_norm_clip_and_training_step():
    small = SpectralNormDense(3, 3, rngs=nnx.Rngs(1), coeff=100.0, clip=True)
    np.testing.assert_allclose(small.weight, small.kernel[...], rtol=1e-12)

    class Cell(nnx.Module):
        def __init__(self, rngs):
            self.W = SpectralNormDense(4, 4, rngs=rngs, coeff=0.9, use_bias=False)

        def __call__(self, z, x):
            return jnp.tanh(self.W(z) + x)

    class CellWithHook(Cell):
        def before_solve(self, x):
            spectral_norm_step(self)

    x = jnp.ones((2, 4))
    for cls in (Cell, CellWithHook):
        model = deq.nn.DEQ(cls(nnx.Rngs(0)))
        opt = nnx.Optimizer(model, __import__("optax").sgd(0.1), wrt=nnx.Param)

        @nnx.jit
        def train_step(model, opt):
            spectral_norm_step(model)  # once per step, outside the solve
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 0.3) ** 2))(model)
            opt.update(model, grads)
            return loss

        u0 = model.cell.W.u[...]
        losses = [float(train_step(model, opt)) for _ in range(5)]
        assert losses[-1] < losses[0]
        assert not np.allclose(model.cell.W.u[...], u0)


def test_weight_norm_dense():
    layer = WeightNormDense(3, 5, rngs=nnx.Rngs(0), init_scale=0.5)
    np.testing.assert_allclose(layer.weight, 0.5 * layer.v[...], rtol=1e-6)
    layer.g[...] = jnp.arange(5.0)
    np.testing.assert_allclose(jnp.linalg.norm(layer.weight, axis=0), jnp.arange(5.0), rtol=1e-6)
    layer.v[...] = layer.v[...].at[:, 2].set(0.0)  # a zero direction: zero column, finite grads
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 3)))))(layer)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    np.testing.assert_array_equal(layer.weight[:, 2], 0.0)
    with pytest.raises(ValueError, match="in_features=3"):
        layer(jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="coeff"):
        SpectralNormDense(3, 3, rngs=nnx.Rngs(0), coeff=0.0)
    with pytest.raises(ValueError, match="n_power_iterations"):
        SpectralNormDense(3, 3, rngs=nnx.Rngs(0), n_power_iterations=0)
    with pytest.raises(TypeError, match="nnx.Module"):
        spectral_norm_step(jnp.ones(3))


def _exact_grad(V):
    return jax.grad(lambda A: spectral_norm_upper_bound(A, "exact"))(V)


def test_exact_norm_gradient_with_a_gap_matches_finite_differences():
    V = jax.random.normal(jax.random.key(3), (6, 6), jnp.float64)
    g = _exact_grad(V)
    direction = jax.random.normal(jax.random.key(4), (6, 6), jnp.float64)
    eps = 1e-6
    fd = (spectral_norm_upper_bound(V + eps * direction, "exact")
          - spectral_norm_upper_bound(V - eps * direction, "exact")) / (2 * eps)
    np.testing.assert_allclose(jnp.sum(g * direction), fd, rtol=1e-6)


def test_exact_norm_gradient_finite_with_a_repeated_largest_singular_value():
    q1, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (6, 6), jnp.float64))
    q2, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (6, 6), jnp.float64))
    V = (q1 * jnp.array([2.0, 2.0, 2.0, 1.0, 0.5, 0.1])) @ q2.T
    g = _exact_grad(V)
    assert bool(jnp.all(jnp.isfinite(g)))
    # A valid (sub)gradient of the top singular value: u v^T for a top singular pair, so it has
    # unit spectral norm and <g, V> = sigma_1 (sigma_1 is positively homogeneous of degree one).
    np.testing.assert_allclose(jnp.linalg.norm(g, 2), 1.0, rtol=1e-10)
    np.testing.assert_allclose(jnp.sum(g * V), 2.0, rtol=1e-10)


def test_exact_norm_survives_a_failing_svd(break_svd):
    """A default SVD returning NaN (as LAPACK's gesdd did on a trained 128 x 128 float32 weight
    with a clustered spectrum) is redone by the QR-based algorithm; if that fails too, the
    cheap guaranteed bound is used, so value and gradient stay finite and the value a bound."""
    from jax.lax import linalg as lax_linalg

    V = jax.random.normal(jax.random.key(5), (6, 6), jnp.float64)
    exact = float(jnp.linalg.norm(V, 2))

    for broken, expected in (((None,), exact),
                             ((None, lax_linalg.SvdAlgorithm.QR), float(spectral_norm_upper_bound(V, "min")))):
        break_svd(broken)
        value = float(spectral_norm_upper_bound(V, "exact"))
        g = _exact_grad(V)
        np.testing.assert_allclose(value, expected, rtol=1e-12)
        assert value >= exact * (1 - 1e-12) and bool(jnp.all(jnp.isfinite(g)))
        np.testing.assert_allclose(jnp.sum(g * V), expected, rtol=1e-10)  # homogeneous of degree one
    assert expected > exact  # the last case really fell back to the cheap bound
