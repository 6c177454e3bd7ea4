"""Tests for the safeguarded solver chain `deq.solvers.fallback.Fallback`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq
from deq._tree import row_norm
from deq.solvers.fallback import Fallback, FallbackState


@pytest.fixture(scope="module", autouse=True)
def _float64():
    """float64 for this module only (see tests/conftest.py: no global x64 switch)."""
    with jax.enable_x64(True):
        yield


PLAIN = deq.FixedPointIteration()
DAMPED = deq.FixedPointIteration(damping=0.5)


def linear(z, p):
    """Row-wise affine map z -> A z + b (per-sample A with batch_axis=0)."""
    A, b = p
    if z.ndim == 1:
        return A @ z + b
    return jnp.einsum("bij,bj->bi", A, z) + b


def manual_run(solver, F, x0, steps):
    """Drive `solver` by hand (compiled) on the packed map F (B, n) to inspect its state."""

    @jax.jit
    def go(x0):
        fx = F(x0)
        active = jnp.ones((x0.shape[0],), bool)

        # The driver's best point is not tracked here: Fallback hands its own to its stages.
        best = deq.Best(x0, fx, jnp.full((x0.shape[0],), jnp.inf, fx.dtype))

        def body(_, c):
            return solver.step(F, *c, active, best)

        return jax.lax.fori_loop(0, steps, body, (x0, fx, solver.init(F, x0, fx)))

    return go(x0)


def test_diverging_start_hands_over_and_converges():
    # Plain iteration on z <- -1.5 z + 1 diverges; damped iteration (beta = 0.5) contracts.
    A, b = -1.5 * jnp.eye(3), jnp.ones(3)
    chain = Fallback(solvers=(PLAIN, DAMPED), rtol=0.0, atol=1e-10, max_steps=300)
    sol = deq.fixed_point(linear, jnp.zeros(3), (A, b), solver=chain)
    assert bool(sol.stats.converged)
    np.testing.assert_allclose(sol.value, 0.4 * np.ones(3), atol=1e-9)
    # Plain iteration alone fails cleanly (no NaN in the value).
    alone = deq.fixed_point(linear, jnp.zeros(3), (A, b), solver=deq.FixedPointIteration(max_steps=300))
    assert not bool(alone.stats.converged)
    assert bool(jnp.all(jnp.isfinite(alone.value)))


def test_default_chain_and_gradient():
    A, b = -1.5 * jnp.eye(2), jnp.array([1.0, 2.0])
    chain = Fallback(rtol=0.0, atol=1e-10)
    assert isinstance(chain.solvers[0], deq.Anderson) and len(chain.solvers) == 3
    sol = deq.fixed_point(linear, jnp.zeros(2), (A, b), solver=chain)
    assert bool(sol.stats.converged)
    np.testing.assert_allclose(sol.value, b / 2.5, atol=1e-9)
    # IFT gradient of sum(z*) w.r.t. b: (I - A)^{-T} 1 = 1 / 2.5.
    g = jax.grad(lambda b: deq.fixed_point(linear, jnp.zeros(2), (A, b), solver=chain).value.sum())(b)
    np.testing.assert_allclose(g, np.full(2, 0.4), atol=1e-7)


def test_nonfinite_residual_hands_over_without_nan():
    def f(z, b):  # diverges under plain iteration, then becomes NaN for |z| > 5
        out = -1.5 * z + b
        return jnp.where(jnp.abs(z) > 5, jnp.nan, out)

    b = jnp.ones(2)
    chain = Fallback(solvers=(PLAIN, DAMPED), rtol=0.0, atol=1e-10, max_steps=200)
    sol = deq.fixed_point(f, jnp.zeros(2), b, solver=chain)
    assert bool(sol.stats.converged)
    np.testing.assert_allclose(sol.value, 0.4 * np.ones(2), atol=1e-9)
    # A chain whose last solver meets NaN stops cleanly with the best finite iterate.
    sol = deq.fixed_point(f, jnp.zeros(2), b, solver=Fallback(solvers=(PLAIN,), max_steps=50))
    assert not bool(sol.stats.converged)
    assert int(sol.stats.result) == deq.RESULTS.NONFINITE
    assert bool(jnp.all(jnp.isfinite(sol.value)))


def test_identical_residuals_no_fixed_point():
    # f(z) = z + c has no fixed point and every residual equals c: the Anderson Gram matrix is
    # singular (rank one). The chain must end with converged=False and a finite value.
    f = lambda z, c: z + c
    chain = Fallback(rtol=0.0, atol=1e-8, max_steps=80, patience=5)
    sol = deq.fixed_point(f, jnp.zeros(3), jnp.ones(3), solver=chain)
    assert not bool(sol.stats.converged)
    assert int(sol.stats.result) == deq.RESULTS.MAX_STEPS
    assert bool(jnp.all(jnp.isfinite(sol.value)))
    np.testing.assert_allclose(sol.stats.residual_norm, np.sqrt(3.0), rtol=1e-12)
    # Every solver of the chain was tried: stagnation moves each sample to the last stage.
    F = lambda x: x + 1.0
    _, _, state = manual_run(chain, F, jnp.zeros((1, 3)), 40)
    assert int(state.stage[0]) == 2


def test_identity_coordinates_and_exact_start():
    # f is the identity in the first coordinate (residual exactly zero there) and a contraction
    # in the others; and a batch sample that starts exactly at a fixed point (zero residual).
    def f(z, x):
        return jnp.concatenate([z[..., :1], jnp.tanh(0.5 * z[..., 1:] + x)], axis=-1)

    x = jnp.ones((2, 2))
    z_star1 = deq.fixed_point(f, jnp.zeros((1, 3)), x[:1], batch_axis=0,
                              solver=deq.Anderson(rtol=0.0, atol=1e-13)).value[0]
    z0 = jnp.stack([jnp.array([0.3, 0.0, 0.0]), z_star1])
    chain = Fallback(rtol=0.0, atol=1e-10)
    sol = deq.fixed_point(f, z0, x, solver=chain, batch_axis=0)
    assert bool(jnp.all(sol.stats.converged))
    assert int(sol.stats.num_steps[1]) == 0
    assert abs(float(sol.value[0, 0]) - 0.3) < 1e-12  # the identity coordinate stays put
    np.testing.assert_allclose(sol.value[0, 1:], z_star1[1:], atol=1e-9)
    assert not bool(jnp.any(jnp.isnan(sol.value)))


def test_batch_samples_on_different_stages():
    # Sample 0 contracts under plain iteration; sample 1 (eigenvalue -1.5) diverges and hands over.
    A = jnp.stack([0.5 * jnp.eye(2), -1.5 * jnp.eye(2)])
    b = jnp.ones((2, 2))
    chain = Fallback(solvers=(PLAIN, DAMPED), rtol=0.0, atol=1e-10, max_steps=300)
    F = lambda x: linear(x, (A, b))
    x, _, state = manual_run(chain, F, jnp.zeros((2, 2)), 12)
    assert isinstance(state, FallbackState)
    assert state.stage.tolist() == [0, 1]
    for leaf in jax.tree_util.tree_leaves(state):
        assert leaf.shape[0] == 2
    sol = deq.fixed_point(linear, jnp.zeros((2, 2)), (A, b), solver=chain, batch_axis=0)
    assert sol.stats.converged.tolist() == [True, True]
    np.testing.assert_allclose(sol.value, np.array([[2.0, 2.0], [0.4, 0.4]]), atol=1e-9)


def test_growth_rule_hands_over_from_best_iterate():
    # One plain step on the diverging map grows the residual by 2.5x > growth=2: the next
    # iterate is the best one so far (the start), with the next solver.
    A, b = -1.5 * jnp.eye(2), jnp.ones((1, 2))
    chain = Fallback(solvers=(PLAIN, DAMPED), growth=2.0)
    F = lambda x: x @ A.T + b
    x0 = jnp.zeros((1, 2))
    x, fx, state = manual_run(chain, F, x0, 1)
    assert state.stage.tolist() == [0]  # 1.5x growth: not yet
    x, fx, state = manual_run(chain, F, x0, 2)
    assert state.stage.tolist() == [1]
    np.testing.assert_allclose(x, x0)
    np.testing.assert_allclose(row_norm(fx - x), state.best_res)


def test_jit_hash_unrolled():
    chain = Fallback(solvers=[PLAIN, DAMPED], rtol=0.0, atol=1e-10, max_steps=60)
    assert isinstance(chain.solvers, tuple)
    assert hash(chain) == hash(Fallback(solvers=(PLAIN, DAMPED), rtol=0.0, atol=1e-10, max_steps=60))
    A, b = -1.5 * jnp.eye(2), jnp.ones(2)
    g_unrolled = jax.jit(jax.grad(lambda b: deq.fixed_point(
        linear, jnp.zeros(2), (A, b), solver=chain, backward=deq.Unrolled()).value.sum()))(b)
    np.testing.assert_allclose(g_unrolled, np.full(2, 0.4), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(solvers=()), TypeError, "non-empty tuple"),
        (dict(solvers=deq.Anderson()), TypeError, "tuple of solvers"),
        (dict(solvers=(deq.Anderson(), "broyden")), TypeError, r"solvers\[1\]"),
        (dict(solvers=(deq.GMRES(),)), TypeError, r"solvers\[0\]"),
        (dict(patience=0), ValueError, "patience"),
        (dict(growth=0.5), ValueError, "growth"),
        (dict(stall_factor=1.5), ValueError, "stall_factor"),
        (dict(max_step=3), TypeError, "max_steps"),
    ],
)
def test_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Fallback(**kwargs)
