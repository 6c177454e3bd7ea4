"""Tests of deq.monotone: monotone parametrizations, splitting solvers, implicit gradients, NNX layers.

Everything runs in float64 (switched on for this module only, by the autouse fixture below, as
tests/conftest.py does for the core tests) so that solver agreement and gradients can be checked
to ~1e-8.
"""

from __future__ import annotations

import doctest
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deq
from deq.monotone import (
    ForwardBackward,
    MonDEQ,
    MonDEQClassifier,
    MonDEQConv,
    MonotoneConv,
    MonotoneDense,
    PeacemanRachford,
    conv,
    conv_transpose,
    monotone_fixed_point,
)


@pytest.fixture(scope="module", autouse=True)
def _x64_for_this_module():
    with jax.enable_x64(True):
        yield


F64 = jnp.float64
FEW = settings(max_examples=4, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow])
TIGHT = dict(rtol=1e-12, atol=1e-12)


def rand(seed, shape, scale=1.0):
    """Test data from NumPy: each new shape drawn with jax.random would cost a compilation."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), F64)


def dense_op(seed, n=12, d=4, m=1.0, scale=1.0):
    """`MonotoneDense.init`'s distribution (plus a nonzero bias), drawn with NumPy."""
    s = scale / np.sqrt(3 * n)
    return MonotoneDense(rand(seed, (n, n), s), rand(seed + 1, (n, n), s), rand(seed + 2, (n, d), d**-0.5),
                         rand(seed + 3, (n,), 0.1), m)


def conv_op(seed, cin=2, c=2, m=1.0, scale=1.0, padding="circular", k=3):
    s = scale / np.sqrt(3 * k * k * c)
    return MonotoneConv(rand(seed, (k, k, c, c), s), rand(seed + 1, (k, k, c, c), s),
                        rand(seed + 2, (3, 3, cin, c), (9 * cin) ** -0.5), rand(seed + 3, (c,), 0.1), m, padding)


def dense_matrix(op, shape):
    """The matrix of `op.matvec` on per-sample states of `shape` (rows act on flattened states)."""
    n = int(np.prod(shape))
    basis = jnp.eye(n, dtype=F64).reshape((n,) + tuple(shape))
    return op.matvec(basis).reshape(n, n).T  # column j = W e_j


def relu_residual(op, x, z):
    c = op.inject(x)
    return jnp.linalg.norm((jax.nn.relu(op.matvec(z) + c) - z).reshape(z.shape[0], -1), axis=1)


# ----------------------------------------------------------------------------------------------
# The parametrization
# ----------------------------------------------------------------------------------------------


@FEW
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0), m=st.sampled_from([0.05, 0.5, 2.0]))
def test_dense_is_strongly_monotone(seed, scale, m):
    op = dense_op(seed, n=10, m=m, scale=scale)
    W = op.weight()
    sym = jnp.eye(10) - (W + W.T) / 2
    assert float(jnp.linalg.eigvalsh(sym).min()) >= m - 1e-8
    assert float(op.lipschitz()) == pytest.approx(float(jnp.linalg.norm(jnp.eye(10) - W, 2)), rel=1e-10)


@FEW
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0), padding=st.sampled_from(["circular", "zero"]))
def test_conv_is_strongly_monotone(seed, scale, padding):
    m = 0.5
    op = conv_op(seed, m=m, scale=scale, padding=padding)
    shape = (4, 5, 2)
    W = dense_matrix(op, shape)
    n = W.shape[0]
    sym = jnp.eye(n) - (W + W.T) / 2
    assert float(jnp.linalg.eigvalsh(sym).min()) >= m - 1e-8
    L = float(jnp.linalg.norm(jnp.eye(n) - W, 2))
    if padding == "circular":  # exact from the FFT symbols
        assert float(op.lipschitz(shape)) == pytest.approx(L, rel=1e-9)
    else:  # an upper bound
        assert float(op.lipschitz(shape)) >= L * (1 - 1e-12)
    # W^T from rmatvec is the transpose of W from matvec
    Wt = op.rmatvec(jnp.eye(n, dtype=F64).reshape((n,) + shape)).reshape(n, n).T
    np.testing.assert_allclose(Wt, W.T, atol=1e-12)


def test_lipschitz_survives_a_failing_svd(break_svd):
    """The splitting step size comes from `lipschitz()`: an SVD failure (NaN, as LAPACK's gesdd
    gave on a trained weight) is retried by the QR algorithm, and if that fails too a guaranteed
    upper bound is used, so `L` stays finite and never below the true value."""
    from jax.lax import linalg as lax_linalg

    dense = dense_op(3, n=10, m=0.5, scale=2.0)
    circ = conv_op(3, m=0.5, scale=2.0, padding="circular")
    shape = (4, 5, 2)
    exact = (float(dense.lipschitz()), float(circ.lipschitz(shape)))
    for broken in ((None,), (None, lax_linalg.SvdAlgorithm.QR)):
        break_svd(broken)
        got = (float(dense.lipschitz()), float(circ.lipschitz(shape)))
        assert all(np.isfinite(got)) and all(g >= e * (1 - 1e-12) for g, e in zip(got, exact))
        if broken == (None,):  # the retry recovers the exact values
            np.testing.assert_allclose(got, exact, rtol=1e-10)
        else:  # the fallback bound is looser than the exact norm here
            assert all(g > e * (1 + 1e-6) for g, e in zip(got, exact))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _adjoint_gap(seed, k, hw, ch, padding):
    K = rand(seed, (k, k, ch[0], ch[1]))
    x = rand(seed + 1, (2,) + hw + (ch[0],))
    y = rand(seed + 2, (2,) + hw + (ch[1],))
    Ax = conv(K, x, padding)
    lhs, rhs = jnp.vdot(Ax, y), jnp.vdot(x, conv_transpose(K, y, padding))
    return jnp.abs(lhs - rhs) / (1 + jnp.linalg.norm(Ax) * jnp.linalg.norm(y))


@FEW
@given(
    seed=st.integers(0, 10_000),
    k=st.sampled_from([1, 2, 3, 5]),
    hw=st.tuples(st.integers(3, 7), st.integers(3, 7)),
    ch=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.sampled_from(["circular", "zero"]),
)
def test_conv_adjoint_identity(seed, k, hw, ch, padding):
    """<A x, y> = <x, A^T y> to rounding error, for both paddings and any kernel size."""
    assert float(_adjoint_gap(seed, k, hw, ch, padding)) <= 1e-12


def test_circular_conv_symbol_and_resolvent():
    op = conv_op(3, c=3, scale=2.0)
    shape = (5, 4, 3)
    v = rand(4, (2,) + shape)
    n = int(np.prod(shape))
    W = dense_matrix(op, shape)

    @jax.jit
    def check(op, alpha):
        N = jnp.eye(n) + alpha * (jnp.eye(n) - W)
        R = op.resolvent(alpha, shape)
        want = jnp.linalg.solve(N, v.reshape(2, n).T).T.reshape(v.shape)
        want_T = jnp.linalg.solve(N.T, v.reshape(2, n).T).T.reshape(v.shape)
        return jnp.abs(R.solve(v) - want).max(), jnp.abs(R.solve_T(v) - want_T).max()

    for alpha in (0.3, 1.0):
        assert max(map(float, check(op, alpha))) < 1e-11


def test_zero_padding_cg_resolvent_and_dense_lu():
    op = conv_op(5, scale=2.0, padding="zero")
    shape = (4, 4, 2)
    n = int(np.prod(shape))
    v = rand(6, (3,) + shape)
    N = jnp.eye(n) + 0.7 * (jnp.eye(n) - dense_matrix(op, shape))
    R = op.resolvent(0.7, shape)
    got, got_T = jax.jit(lambda v: (R.solve(v), R.solve_T(v)))(v)
    np.testing.assert_allclose(got, jnp.linalg.solve(N, v.reshape(3, n).T).T.reshape(v.shape), atol=1e-9)
    np.testing.assert_allclose(got_T, jnp.linalg.solve(N.T, v.reshape(3, n).T).T.reshape(v.shape), atol=1e-9)
    dop = dense_op(7, scale=3.0)
    Nd = 1.7 * jnp.eye(12) - 0.7 * dop.weight()  # I + 0.7 (I - W)
    vd = rand(8, (3, 12))
    Rd = dop.resolvent(0.7)
    np.testing.assert_allclose(Rd.solve(vd) @ Nd.T, vd, atol=1e-11)
    np.testing.assert_allclose(Rd.solve_T(vd) @ Nd, vd, atol=1e-11)


# ----------------------------------------------------------------------------------------------
# Splitting solvers: convergence where plain iteration fails, agreement
# ----------------------------------------------------------------------------------------------


def plain_iteration_residual(op, x, steps=300):
    W, c = op.weight(), op.inject(x)
    z = jax.lax.fori_loop(0, steps, lambda _, z: jax.nn.relu(z @ W.T + c), jnp.zeros_like(c))
    return jnp.linalg.norm(jax.nn.relu(z @ W.T + c) - z, axis=1)


@FEW
@given(seed=st.integers(0, 10_000), scale=st.floats(3.0, 5.0))
def test_splitting_converges_where_plain_iteration_fails(seed, scale):
    op = dense_op(seed, m=1.0, scale=scale)
    x = 3.0 * rand(seed + 4, (4, 4))
    plain = plain_iteration_residual(op, x)
    assert bool(jnp.all(~(plain <= 1e-3))), "plain iteration z <- relu(Wz + c) was expected to fail here"
    sols = [
        monotone_fixed_point(op, x, method=ForwardBackward(max_steps=100_000, **TIGHT)),
        monotone_fixed_point(op, x, method=PeacemanRachford(alpha=1.0, max_steps=5_000, **TIGHT)),
        monotone_fixed_point(op, x, method=PeacemanRachford(alpha=None, max_steps=5_000, **TIGHT)),
    ]
    for sol in sols:
        assert bool(sol.stats.converged.all()), sol.stats
        assert (sol.stats.result == deq.RESULTS.CONVERGED).all()
        np.testing.assert_allclose(relu_residual(op, x, sol.value), sol.stats.residual_norm, atol=1e-13)
    scale_z = 1.0 + float(jnp.abs(sols[1].value).max())
    for sol in sols[::2]:
        np.testing.assert_allclose(sol.value, sols[1].value, atol=1e-8 * scale_z)


CONV_FB = ForwardBackward(max_steps=50_000, **TIGHT)  # shared by two tests: one compilation


def test_conv_splitting_methods_agree():
    """Zero padding: FB and PR (with its conjugate-gradient resolvent) reach the same point."""
    op = conv_op(11, cin=1, c=3, m=1.0, scale=3.0, padding="zero")
    x = rand(12, (2, 5, 5, 1))
    fb = monotone_fixed_point(op, x, method=CONV_FB)
    pr = monotone_fixed_point(op, x, method=PeacemanRachford(max_steps=2_000, rtol=1e-10, atol=1e-10))
    assert bool(fb.stats.converged.all()) and bool(pr.stats.converged.all())
    assert int(pr.stats.num_steps.max()) < int(fb.stats.num_steps.min())
    np.testing.assert_allclose(fb.value, pr.value, atol=1e-7)
    assert pr.value.shape == (2, 5, 5, 3)


def test_stats_semantics_unbatched_and_z0():
    op = dense_op(13, scale=2.0)
    x = rand(14, (4,))
    meth = PeacemanRachford(max_steps=300, **TIGHT)
    sol = monotone_fixed_point(op, x, method=meth, batch_axis=None)
    assert sol.value.shape == (12,)
    assert sol.stats.num_steps.shape == () and sol.stats.converged.shape == ()
    assert sol.stats.residual_history.shape == (301,)
    hist = np.asarray(sol.stats.residual_history)
    k = int(sol.stats.num_steps)
    assert np.all(np.isfinite(hist[: k + 1])) and np.all(np.isnan(hist[k + 1:]))
    batched = monotone_fixed_point(op, x[None], method=meth, z0=jnp.zeros((1, 12)))
    np.testing.assert_allclose(batched.value[0], sol.value, atol=1e-13)
    # a warm start at the solution stops at once
    warm = monotone_fixed_point(op, x[None], method=meth, z0=batched.value)
    assert int(warm.stats.num_steps[0]) <= 1
    # too few steps: reported, not silent
    short = monotone_fixed_point(op, x[None], method=ForwardBackward(max_steps=3, **TIGHT))
    assert not bool(short.stats.converged[0])
    assert int(short.stats.result[0]) == deq.RESULTS.MAX_STEPS
    with pytest.raises(Exception, match="did not converge"):
        jax.block_until_ready(
            monotone_fixed_point(op, x[None], method=ForwardBackward(max_steps=3, **TIGHT), throw=True)
        )


# ----------------------------------------------------------------------------------------------
# Gradients: implicit (adjoint splitting) vs unrolled reference and finite differences
# ----------------------------------------------------------------------------------------------


def unrolled_reference(op, x, shape, steps=1_500):
    """Differentiate through `steps` Peaceman-Rachford steps on the dense matrix of `op`."""
    B = x.shape[0]
    n = int(np.prod(shape))
    W = dense_matrix(op, shape)
    c = op.inject(x).reshape(B, n)
    Ninv = jnp.linalg.inv(2.0 * jnp.eye(n) - W)  # alpha = 1

    def body(carry, _):
        z, u = carry
        uh = 2 * z - u
        u = 2 * (uh + c) @ Ninv.T - uh
        return (jax.nn.relu(u), u), None

    (z, _), _ = jax.lax.scan(body, (jnp.zeros_like(c), jnp.zeros_like(c)), None, length=steps)
    return z.reshape((B,) + tuple(shape))


def flat(tree):
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])


def rel_err(a, b):
    a, b = flat(a), flat(b)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


CASES = {
    "dense-PR": (lambda: dense_op(21, scale=2.0), (3, 4), PeacemanRachford(max_steps=3_000, **TIGHT)),
    "dense-FB": (lambda: dense_op(22, scale=1.5), (3, 4), ForwardBackward(max_steps=50_000, **TIGHT)),
    "conv-circular-PR": (lambda: conv_op(23, scale=1.5), (2, 4, 4, 2), PeacemanRachford(max_steps=3_000, **TIGHT)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_implicit_gradient_matches_unrolled_and_finite_differences(case):
    make, x_shape, meth = CASES[case]
    op = make()
    x = rand(30, x_shape)
    shape = op.state_shape(x_shape[1:])
    target = rand(31, (x_shape[0],) + tuple(shape))

    def loss(op, x):
        z = monotone_fixed_point(op, x, method=meth).value
        return jnp.sum(jnp.sin(z) * target)

    def loss_ref(op, x):
        return jnp.sum(jnp.sin(unrolled_reference(op, x, shape)) * target)

    g_op, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(op, x)
    r_op, r_x = jax.jit(jax.grad(loss_ref, argnums=(0, 1)))(op, x)
    assert rel_err(g_op, r_op) < 1e-6
    assert rel_err(g_x, r_x) < 1e-6
    for name in ("A", "B", "U", "b"):  # every parameter gets its own accurate gradient
        assert rel_err(getattr(g_op, name), getattr(r_op, name)) < 1e-6, name

    # central finite differences along a random direction of (op, x)
    d_op = jax.tree_util.tree_map(lambda a: rand(32, a.shape), op)
    d_x = rand(33, x.shape)
    eps = 1e-5
    shift = lambda t: (jax.tree_util.tree_map(lambda a, d: a + t * d, op, d_op), x + t * d_x)
    fd = (loss(*shift(eps)) - loss(*shift(-eps))) / (2 * eps)  # the compiled forward solve, twice
    an = jnp.vdot(flat(g_op), flat(d_op)) + jnp.vdot(g_x, d_x)
    assert abs(float(fd - an)) <= 1e-6 * abs(float(an))


def test_backward_method_can_differ_and_warns_when_adjoint_fails():
    op = dense_op(40, scale=2.0)
    x = rand(41, (2, 4))
    loss = lambda op, meth, bwd: jnp.sum(monotone_fixed_point(op, x, method=meth, backward=bwd).value ** 2)
    pr = PeacemanRachford(max_steps=2_000, **TIGHT)
    grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))
    g1 = grad(op, pr, None)
    g2 = grad(op, pr, ForwardBackward(max_steps=50_000, **TIGHT))
    assert rel_err(g2, g1) < 1e-8
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        jax.block_until_ready(grad(op, pr, ForwardBackward(max_steps=2, **TIGHT)))
    assert any(issubclass(w.category, deq.NonConvergenceWarning) for w in rec)


# ----------------------------------------------------------------------------------------------
# NNX layers
# ----------------------------------------------------------------------------------------------


def test_mondeq_layer_jit_value_and_grad_and_eval_method():
    meth = PeacemanRachford(max_steps=2_000, **TIGHT)
    layer = MonDEQ(4, 10, m=0.5, init_scale=2.0, method=meth, rngs=nnx.Rngs(0), param_dtype=F64)
    x = rand(50, (3, 4))

    sol = layer(x, return_solution=True)
    assert sol.value.shape == (3, 10) and sol.stats.num_steps.shape == (3,)
    assert bool(sol.stats.converged.all())
    loss_fn = lambda layer: jnp.sum(jnp.tanh(layer(x)))
    value, grads = nnx.jit(lambda l: nnx.value_and_grad(loss_fn)(l))(layer)
    assert float(value) == pytest.approx(float(jnp.sum(jnp.tanh(sol.value))), rel=1e-12)
    # the gradient is the functional one of monotone_fixed_point at layer.operator()
    op = layer.operator()
    d = jax.tree_util.tree_map(lambda a: rand(53, a.shape), op)
    f = lambda t: jnp.sum(jnp.tanh(monotone_fixed_point(
        jax.tree_util.tree_map(lambda a, b: a + t * b, op, d), x, method=meth).value))
    fd = (f(1e-5) - f(-1e-5)) / 2e-5
    an = sum(jnp.vdot(grads[k][...], getattr(d, k)) for k in ("A", "B", "U", "b"))
    assert abs(float(fd - an)) <= 1e-6 * abs(float(an))

    # eval mode solves with eval_method; train mode switches back
    layer.eval_method = ForwardBackward(max_steps=5, **TIGHT)
    layer.eval()
    assert int(layer(x, return_solution=True).stats.num_steps.max()) <= 5
    layer.train()
    assert layer.active_method() == meth


def test_mondeq_conv_layer_zero_padding_gradient():
    """MonDEQConv (zero padding, forward-backward) under nnx.jit / nnx.value_and_grad; its
    gradient against central finite differences."""
    layer = MonDEQConv(1, 3, m=1.0, padding="zero", method=CONV_FB, rngs=nnx.Rngs(1), param_dtype=F64)
    x = rand(51, (2, 5, 5, 1))
    sol = layer(x, return_solution=True)
    assert sol.value.shape == (2, 5, 5, 3) and bool(sol.stats.converged.all())
    loss_fn = lambda l: jnp.sum(jnp.sin(l(x)))
    value, grads = nnx.jit(lambda l: nnx.value_and_grad(loss_fn)(l))(layer)
    names = ("A", "B", "U", "b")
    d = {k: rand(52 + i, grads[k][...].shape) for i, k in enumerate(names)}
    an = sum(jnp.vdot(grads[k][...], d[k]) for k in names)
    eps, base = 1e-5, {k: getattr(layer, k)[...] for k in names}

    def at(t):
        for k in names:
            getattr(layer, k)[...] = base[k] + t * d[k]
        return loss_fn(layer)

    fd = (at(eps) - at(-eps)) / (2 * eps)
    at(0.0)
    assert abs(float(fd - an)) <= 1e-6 * abs(float(an))
    assert float(value) == pytest.approx(float(loss_fn(layer)), rel=1e-12)


def test_classifier_contract_and_training_step():
    import optax

    model = MonDEQClassifier(16, 12, 3, m=1.0, rngs=nnx.Rngs(2), param_dtype=F64)
    x = rand(52, (8, 4, 4, 1))
    y = jnp.arange(8) % 3
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(model):
            logits, info = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), info

        (loss, info), g = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, g)
        return loss, info

    losses = []
    for _ in range(15):
        loss, info = step(model, opt)
        losses.append(float(loss))
        assert sorted(info) == ["converged_frac", "forward_steps", "residual"]
        assert float(info["converged_frac"]) == 1.0 and float(info["forward_steps"]) > 0
    assert losses[-1] < losses[0]


def test_helpful_errors():
    op = dense_op(60)
    with pytest.raises(TypeError, match="ForwardBackward"):
        monotone_fixed_point(op, jnp.ones((2, 4)), method=deq.Anderson())
    with pytest.raises(TypeError, match="MonotoneDense"):
        monotone_fixed_point(object(), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="batch"):
        monotone_fixed_point(op, jnp.ones((2, 3, 4)))
    with pytest.raises(TypeError, match="method"):
        monotone_fixed_point(op, jnp.ones((2, 4)), methd=ForwardBackward())
    with pytest.raises(ValueError, match="alpha"):
        PeacemanRachford(alpha=-1.0)
    with pytest.raises(ValueError, match="`m`"):
        MonDEQ(4, 8, m=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="padding"):
        MonDEQConv(1, 2, padding="reflect", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features"):
        MonDEQClassifier(10, 4, 2, rngs=nnx.Rngs(0))(jnp.ones((2, 3)))


@pytest.mark.parametrize("module", ["deq.monotone._operators", "deq.monotone._splitting", "deq.monotone._nn"])
def test_docstring_examples(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
