"""Tests for `deq.interop.JaxoptSolver`: jaxopt fixed-point solvers inside deq.fixed_point."""

import dataclasses

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np
import pytest

import deq
from deq.interop import JaxoptSolver


@pytest.fixture(scope="module", autouse=True)
def _float64():
    """float64 for this module only (see tests/conftest.py: no global x64 switch)."""
    with jax.enable_x64(True):
        yield


N = 5
with jax.enable_x64(True):  # module constants in float64 too
    W = 0.6 * jax.random.normal(jax.random.key(0), (N, N)) / np.sqrt(N)
    X = jax.random.normal(jax.random.key(1), (3, N))
TIGHT = dict(rtol=0.0, atol=1e-12, max_steps=300)
ADJOINT = deq.IFT(solver=deq.Anderson(rtol=0.0, atol=1e-13, max_steps=300))


def cell(z, p):
    """tanh cell, row-wise on a (B, N) batch or on one (N,) vector."""
    W, x = p
    return jnp.tanh(z @ W.T + x)


def solve(solver, x, batch_axis, backward=ADJOINT):
    z0 = jnp.zeros_like(x)
    return deq.fixed_point(cell, z0, (W, x), solver=solver, batch_axis=batch_axis, backward=backward)


@pytest.mark.parametrize(
    "cls, opts",
    [(jaxopt.AndersonAcceleration, dict(history_size=5, ridge=1e-10)), (jaxopt.FixedPointIteration, {})],
)
@pytest.mark.parametrize("batch_axis", [None, 0])
def test_same_fixed_point_as_anderson(cls, opts, batch_axis):
    x = X if batch_axis == 0 else X[0]
    sol_ref = solve(deq.Anderson(**TIGHT), x, batch_axis)
    sol = solve(JaxoptSolver(cls, **TIGHT, **opts), x, batch_axis)
    assert bool(jnp.all(sol.stats.converged))
    np.testing.assert_allclose(sol.value, sol_ref.value, atol=1e-8)


def test_same_ift_gradients_as_anderson():
    def loss(solver):
        def f(W_, x_):
            z = deq.fixed_point(cell, jnp.zeros_like(x_), (W_, x_), solver=solver, batch_axis=0,
                                backward=ADJOINT).value
            return jnp.sum(jnp.sin(z) * jnp.arange(N))

        return jax.grad(f, argnums=(0, 1))

    g_ref = loss(deq.Anderson(**TIGHT))(W, X)
    g = loss(JaxoptSolver(jaxopt.AndersonAcceleration, ridge=1e-10, **TIGHT))(W, X)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-8)


def test_per_sample_stopping():
    # Sample 1 starts at its fixed point: it takes no step while the others iterate.
    solver = JaxoptSolver(jaxopt.AndersonAcceleration, history_size=5, ridge=1e-10, **TIGHT)
    ref = solve(deq.Anderson(**TIGHT), X, 0).value
    z0 = jnp.zeros_like(X).at[1].set(ref[1])
    sol = deq.fixed_point(cell, z0, (W, X), solver=solver, batch_axis=0, backward=ADJOINT)
    assert sol.stats.converged.tolist() == [True, True, True]
    assert int(sol.stats.num_steps[1]) == 0 < int(sol.stats.num_steps[0])
    np.testing.assert_allclose(sol.value, ref, atol=1e-9)


def test_float32_state_with_x64_enabled():
    # jaxopt builds part of its Anderson state in the default (float64) dtype; the adapter runs
    # jaxopt in that dtype and keeps deq's float32 state.
    solver = JaxoptSolver(jaxopt.AndersonAcceleration, rtol=1e-5, atol=1e-6)
    x32 = X.astype(jnp.float32)
    sol = deq.fixed_point(cell, jnp.zeros_like(x32), (W.astype(jnp.float32), x32), solver=solver, batch_axis=0)
    assert sol.value.dtype == jnp.float32 and bool(jnp.all(sol.stats.converged))
    np.testing.assert_allclose(sol.value, solve(deq.Anderson(**TIGHT), X, 0).value, atol=1e-4)


def test_unrolled_and_outer_vmap():
    solver = JaxoptSolver(jaxopt.FixedPointIteration, rtol=0.0, atol=1e-12, max_steps=40)
    g_unrolled = jax.grad(lambda x: jnp.sum(solve(solver, x, 0, backward=deq.Unrolled()).value ** 2))(X)
    g_ift = jax.grad(lambda x: jnp.sum(solve(solver, x, 0).value ** 2))(X)
    np.testing.assert_allclose(g_unrolled, g_ift, atol=1e-5)
    batched = jax.vmap(lambda x: solve(solver, x, 0).value)(jnp.stack([X, X + 1.0]))
    np.testing.assert_allclose(batched[1], solve(solver, X + 1.0, 0).value, atol=1e-10)


def test_frozen_hashable_replace():
    a = JaxoptSolver(jaxopt.AndersonAcceleration, history_size=4, beta=0.9)
    b = JaxoptSolver(jaxopt.AndersonAcceleration, beta=0.9, history_size=4)
    assert a == b and hash(a) == hash(b)
    assert a.options == (("beta", 0.9), ("history_size", 4))
    c = dataclasses.replace(a, max_steps=7)
    assert c.max_steps == 7 and c.options == a.options and c.jaxopt_cls is jaxopt.AndersonAcceleration
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.max_steps = 3
    assert isinstance(a, deq.AbstractSolver)


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((jaxopt.AndersonAcceleration(fixed_point_fun=lambda z: z),), {}, TypeError, "class itself"),
        (("anderson",), {}, TypeError, "jaxopt_cls"),
        ((jaxopt.GradientDescent,), {}, TypeError, "fixed_point_fun"),
        ((jaxopt.AndersonAcceleration,), dict(maxiter=10), ValueError, "max_steps"),
        ((jaxopt.AndersonAcceleration,), dict(tol=1e-3), ValueError, "rtol"),
        ((jaxopt.AndersonAcceleration,), dict(implicit_diff=False), ValueError, "backward"),
        ((jaxopt.AndersonAcceleration,), dict(histroy_size=3), TypeError, "history_size"),
        ((jaxopt.AndersonAcceleration,), dict(history_size=1), ValueError, "history_size"),
        ((jaxopt.AndersonAcceleration,), dict(beta=[1.0]), TypeError, "hashable"),
        ((jaxopt.FixedPointIteration,), dict(atol=-1.0), ValueError, "atol"),
    ],
)
def test_validation(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        JaxoptSolver(*args, **kwargs)


def test_a_fixed_budget_is_accepted():
    s = JaxoptSolver(jaxopt.FixedPointIteration, atol=0.0, rtol=0.0, max_steps=4)  # exactly 4 steps
    assert (s.rtol, s.atol, s.max_steps) == (0.0, 0.0, 4)
