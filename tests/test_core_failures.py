"""Failure handling: non-convergence, non-finite iterates, `throw=True`, backward (adjoint) failure."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq
import problems as P

SOLVERS = P.solvers(rtol=0.0, atol=1e-12, max_steps=40)
ERRORS = (jax.errors.JaxRuntimeError, RuntimeError)


def true_residual(f, z, args=None) -> float:
    return float(np.linalg.norm(np.asarray(f(jnp.asarray(z), args)) - np.asarray(z)))


def check_lowest_residual_iterate(sol, f, args=None):
    hist = np.asarray(sol.stats.residual_history)
    finite = hist[np.isfinite(hist)]
    assert finite.size >= 1
    r = float(sol.stats.residual_norm)
    assert r == pytest.approx(finite.min(), rel=1e-12)
    assert r == pytest.approx(true_residual(f, sol.value, args), rel=1e-9)


# ----------------------------------------------------------------------------- non-convergence


def saddle_map(z, args):
    """Eigenvalues 0.1 and -1.3 along the axes: the residual first shrinks (0.1 direction), then
    grows (-1.3 direction), so the best iterate is neither the first nor the last."""
    return jnp.array([0.1, -1.3]) * z + args


def test_max_steps_reports_and_returns_the_lowest_residual_iterate():
    args = jnp.zeros(2)
    z0 = jnp.array([1.0, 1e-6])
    sol = deq.fixed_point(saddle_map, z0, args, solver=SOLVERS["iteration"])
    st = sol.stats
    assert not bool(st.converged)
    assert int(st.result) == deq.RESULTS.MAX_STEPS
    assert int(st.num_steps) == 40
    hist = np.asarray(st.residual_history)
    assert np.all(np.isfinite(hist))
    best = int(np.argmin(hist))
    assert 0 < best < 40
    assert hist[-1] > 100 * hist[best]
    check_lowest_residual_iterate(sol, saddle_map, args)
    # it is the iterate number `best` of plain iteration
    want = np.array([0.1, -1.3]) ** best * np.asarray(z0)
    np.testing.assert_allclose(np.asarray(sol.value), want, rtol=1e-10)


@pytest.mark.parametrize("name", ["anderson", "broyden"])  # iteration: test_a_blow_up_stops_at_once
def test_accelerated_solvers_return_their_lowest_residual_iterate_when_they_fail(name):
    """z**2 + 2 has no real fixed point: no solver can converge."""
    sol = deq.fixed_point(P.square_plus_two, jnp.ones(1), None, solver=SOLVERS[name])
    assert not bool(sol.stats.converged)
    assert int(sol.stats.result) in (deq.RESULTS.MAX_STEPS, deq.RESULTS.NONFINITE, deq.RESULTS.DIVERGED)
    assert np.all(np.isfinite(np.asarray(sol.value)))
    check_lowest_residual_iterate(sol, P.square_plus_two)


def test_forward_failure_is_silent_by_default():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = deq.fixed_point(saddle_map, jnp.ones(2), jnp.zeros(2), solver=SOLVERS["iteration"])
        jax.block_until_ready(sol)
    assert not bool(sol.stats.converged)


# ----------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("f,steps,code", [(P.square_plus_two, 4, "DIVERGED"), (P.nan_beyond_ten, 3, "NONFINITE")],
                         ids=["runaway", "nan"])
def test_a_blow_up_stops_at_once_with_a_finite_value(f, steps, code):
    sol = deq.fixed_point(f, jnp.ones(2), None, solver=deq.FixedPointIteration(max_steps=100))
    st = sol.stats
    assert deq.RESULTS.name(st.result) == code
    assert not bool(st.converged)
    hist = np.asarray(st.residual_history)
    k = int(st.num_steps)
    # runaway: 1 -> 3 -> 11 -> 123 -> 15131 > 1e4 * ||f(z0)||: DIVERGED long before an overflow;
    # nan: 1 -> 3 -> 7 -> 15 (NaN)
    assert k == steps
    # history: finite up to the step before the blow-up, the stopping step, then nothing
    assert np.all(np.isfinite(hist[:k])) and np.all(np.isnan(hist[k + 1:]))
    assert np.isfinite(hist[k]) == (code == "DIVERGED")
    assert k < 20  # it stopped at once, not at max_steps
    assert np.all(np.isfinite(np.asarray(sol.value)))
    assert np.isfinite(float(st.residual_norm))
    # the best iterate is z0 (residuals only grow): value 1, residual ||f(1) - 1||
    np.testing.assert_array_equal(np.asarray(sol.value), np.ones(2))
    check_lowest_residual_iterate(sol, f)


def nan_off_start(z, args):
    """Finite at z = 0 only: any step away from the start gives NaN."""
    return jnp.where(jnp.all(z == 0.0), jnp.ones_like(z), jnp.full_like(z, jnp.nan))


@pytest.mark.parametrize("name", ["anderson", "broyden", "broyden_ls"])
def test_every_solver_stops_on_the_first_non_finite_step(name):
    sol = deq.fixed_point(nan_off_start, jnp.zeros(3), None, solver=SOLVERS[name])
    assert int(sol.stats.result) == deq.RESULTS.NONFINITE
    assert int(sol.stats.num_steps) == 1
    np.testing.assert_array_equal(np.asarray(sol.value), np.zeros(3))
    assert float(sol.stats.residual_norm) == pytest.approx(np.sqrt(3))


def test_non_finite_start_is_reported_with_nan_residual():
    sol = deq.fixed_point(lambda z, a: z + jnp.nan, jnp.zeros(2), None, solver=SOLVERS["anderson"])
    assert int(sol.stats.result) == deq.RESULTS.NONFINITE
    assert int(sol.stats.num_steps) == 0
    assert np.isnan(float(sol.stats.residual_norm))
    np.testing.assert_array_equal(np.asarray(sol.value), np.zeros(2))


# ----------------------------------------------------------------------------- throw=True


def test_throw_raises_naming_steps_and_residual():
    solver = deq.FixedPointIteration(max_steps=3)
    with pytest.raises(ERRORS, match=r"did not converge") as info:
        sol = deq.fixed_point(lambda z, a: 0.99 * z + 1.0, jnp.zeros(2), None, solver=solver, throw=True)
        jax.block_until_ready(sol)
    msg = str(info.value)
    assert "after 3 step(s)" in msg
    # ||f(z) - z|| after 3 steps of z -> 0.99 z + 1 from 0: sqrt(2) * 0.99**3
    assert f"{np.sqrt(2) * 0.99**3:.3e}" in msg
    assert "forward" in msg


def test_throw_raises_on_a_non_finite_solve_and_in_a_batch():
    with pytest.raises(ERRORS, match=r"did not converge for 1 of 2 sample\(s\)"):
        f = lambda z, a: jnp.where(jnp.abs(z) > 10.0, jnp.nan, a * z + 1.0)
        sol = deq.fixed_point(f, jnp.zeros((2, 3)), jnp.array([[0.5], [3.0]]),
                              solver=deq.FixedPointIteration(), batch_axis=0, throw=True)
        jax.block_until_ready(sol)


def test_throw_raises_under_a_user_jit_and_for_unrolled():
    g = jax.jit(lambda a: deq.fixed_point(saddle_map, jnp.ones(2), a, solver=SOLVERS["iteration"], throw=True).value)
    with pytest.raises(ERRORS, match="did not converge"):
        jax.block_until_ready(g(jnp.zeros(2)))
    with pytest.raises(ERRORS, match="did not converge"):
        jax.block_until_ready(deq.fixed_point(saddle_map, jnp.ones(2), jnp.zeros(2), solver=SOLVERS["iteration"],
                                              backward=deq.Unrolled(), throw=True))


def test_throw_is_silent_when_the_solve_converges():
    prob = P.make_linear(0, P.N)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = deq.fixed_point(P.linear_map, jnp.zeros(P.N), prob.args, solver=deq.Anderson(**P.TIGHT), throw=True)
        jax.block_until_ready(sol)
    assert bool(sol.stats.converged)


# ----------------------------------------------------------------------------- backward failure


SLOW = P.make_slow(1, n=P.N, rate=0.95)
STARVED = {
    "iteration": deq.IFT(solver=deq.FixedPointIteration(max_steps=1)),
    "gmres": deq.IFT(solver=deq.GMRES(max_steps=1, restart=1)),
}


def slow_loss(args, backward, throw=False):
    sol = deq.fixed_point(P.linear_map, jnp.zeros(P.N), args, solver=deq.Anderson(**P.TIGHT), backward=backward,
                          throw=throw)
    return jnp.sum(sol.value)


@pytest.mark.parametrize("name", list(STARVED))
def test_a_starved_adjoint_solve_warns(name):
    with pytest.warns(deq.NonConvergenceWarning, match=r"backward \(adjoint\) solve did not converge") as rec:
        g = jax.grad(slow_loss)(SLOW.args, STARVED[name])
        jax.block_until_ready(g)
    msg = str(rec[0].message)
    assert "residual" in msg
    assert "after -1 step" not in msg  # GMRES reports no step count: the message must not invent one
    assert ("GMRES iterations" in msg) == (name == "gmres")
    assert all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree_util.tree_leaves(g))


def test_grad_with_throw_works_when_everything_converges():
    """(Regression test: after 590d41d, the failure report's lax.cond on the differentiated output
    failed with "Differentiation rule for 'reduce_and' not implemented"; fixed in 8a71aa8.)"""
    good = deq.IFT(solver=deq.Anderson(**P.TIGHT))
    g = jax.grad(slow_loss)(SLOW.args, good, True)
    want = np.linalg.solve((np.eye(P.N) - SLOW.A).T, np.ones(P.N))
    np.testing.assert_allclose(np.asarray(g["b"]), want, rtol=1e-9)


def test_a_starved_adjoint_solve_raises_with_throw():
    with pytest.raises(ERRORS, match=r"backward \(adjoint\) solve did not converge"):
        jax.block_until_ready(jax.grad(slow_loss)(SLOW.args, STARVED["iteration"], True))


def test_warn_false_silences_the_adjoint_warning():
    """(That a converged adjoint is silent is checked by every test in test_core_gradients, which
    turns NonConvergenceWarning into an error.)"""
    quiet = deq.IFT(solver=deq.FixedPointIteration(max_steps=1), warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = jax.grad(slow_loss)(SLOW.args, quiet)
        jax.block_until_ready(g)
    # one adjoint step from u = 1: u = A^T 1 + 1, so dL/db = u
    np.testing.assert_allclose(np.asarray(g["b"]), SLOW.A.T @ np.ones(P.N) + np.ones(P.N), rtol=1e-12)


def test_nonconvergence_warning_is_a_runtime_warning():
    assert issubclass(deq.NonConvergenceWarning, RuntimeWarning)
    codes = {deq.RESULTS.CONVERGED, deq.RESULTS.MAX_STEPS, deq.RESULTS.NONFINITE, deq.RESULTS.DIVERGED}
    assert set(deq.RESULTS.messages) == codes and len(codes) == 4
    assert [deq.RESULTS.name(c) for c in sorted(codes)] == ["CONVERGED", "MAX_STEPS", "NONFINITE", "DIVERGED"]
    assert "max_steps" in deq.RESULTS.describe(deq.RESULTS.MAX_STEPS)
