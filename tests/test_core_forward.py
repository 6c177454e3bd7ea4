"""Forward solves of `deq.fixed_point`: accuracy against analytic answers, solver ranking, stats."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deq
import problems as P

N = P.N
TIGHT = P.solvers(**P.TIGHT)
LOOSE = P.solvers(rtol=1e-3, atol=1e-5, max_steps=60)
NAMES = list(TIGHT)


def residual(f, z, args) -> float:
    """||f(z) - z|| over all leaves, recomputed outside the library."""
    fz = f(z, args)
    return float(np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2)
                             for a, b in zip(jax.tree_util.tree_leaves(fz), jax.tree_util.tree_leaves(z)))))


# ----------------------------------------------------------------------------- the zoo itself


def test_zoo_problems_have_the_advertised_properties():
    lin = P.make_linear(0, 6, norm=0.5)
    assert lin.spectral_norm == pytest.approx(0.5)
    np.testing.assert_allclose(lin.A @ lin.z_star + lin.b, lin.z_star, atol=1e-12)

    batched = P.make_linear(1, 4, norm=0.3, batch=3)
    zs = batched.z_star
    assert zs.shape == (3, 4)
    np.testing.assert_allclose(zs @ batched.A.T + batched.b, zs, atol=1e-12)

    slow = P.make_slow(0)
    assert slow.spectral_radius == pytest.approx(0.95) and slow.spectral_norm == pytest.approx(0.95)

    div = P.make_divergent(0)
    # plain iteration diverges: an eigenvalue of A lies below -1 ...
    assert min(np.linalg.eigvalsh(div.A)) == pytest.approx(-1.5)
    assert div.spectral_radius > 1.0
    # ... but I - A is well conditioned (spectrum [0.5, 2.5]), so the fixed point exists.
    ev = np.linalg.eigvalsh(np.eye(div.A.shape[0]) - div.A)
    assert ev.min() == pytest.approx(0.5) and ev.max() == pytest.approx(2.5)
    np.testing.assert_allclose(div.A @ div.z_star + div.b, div.z_star, atol=1e-12)

    cell = P.make_tanh_cell(0, 5, 3, contraction=0.5)
    assert cell.contraction == pytest.approx(0.5)
    assert set(cell.params) == {"W", "inner"} and set(cell.params["inner"]) == {"U", "b"}

    d = P.make_dict_linear(0)
    zd = P.dict_z_star(d)
    assert {k: v.shape for k, v in zd.items()} == P.LEAF_SHAPES
    out = P.dict_linear_map(jax.tree_util.tree_map(jnp.asarray, zd), d.args)
    assert P.tree_max_abs_diff(out, zd) < 1e-12


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("name", NAMES)
def test_every_solver_reaches_the_analytic_fixed_point_of_a_linear_contraction(name):
    solver, n = TIGHT[name], N

    @settings(max_examples=6, deadline=None, derandomize=True)
    @given(seed=st.integers(0, 2**16), norm=st.floats(0.05, 0.9))
    def check(seed, norm):
        prob = P.make_linear(seed, n, norm)
        sol = deq.fixed_point(P.linear_map, jnp.zeros(n), prob.args, solver=solver)
        assert sol.value.dtype == jnp.float64
        assert bool(sol.stats.converged)
        assert int(sol.stats.result) == deq.RESULTS.CONVERGED
        np.testing.assert_allclose(np.asarray(sol.value), prob.z_star, rtol=0, atol=1e-10)
        # the reported residual is the true residual of the returned value
        assert float(sol.stats.residual_norm) == pytest.approx(residual(P.linear_map, sol.value, prob.args), abs=1e-14)
        assert float(sol.stats.residual_norm) <= 1e-12

    check()


@pytest.mark.parametrize("name", ["iteration", "broyden_ls"])  # Anderson, Broyden: test_core_gradients
def test_nonzero_start_and_tanh_cell(name):
    """From a random start, the solution satisfies the fixed-point equation (checked in numpy)."""
    cell = P.make_tanh_cell(3, P.CELL_N, P.CELL_D, contraction=0.8)
    z0 = np.random.default_rng(1).normal(size=P.CELL_N) * 3
    sol = deq.fixed_point(P.tanh_cell, z0, cell.args, solver=TIGHT[name])
    assert bool(sol.stats.converged)
    assert P.tanh_cell_fixed_point_residual(cell, sol.value) < 1e-11


@pytest.mark.parametrize("name", NAMES)
def test_start_at_the_fixed_point_takes_no_step(name):
    prob = P.make_linear(2, N)
    z0 = jnp.asarray(prob.z_star)
    sol = deq.fixed_point(P.linear_map, z0, prob.args, solver=TIGHT[name])
    assert int(sol.stats.num_steps) == 0
    assert bool(sol.stats.converged)
    np.testing.assert_array_equal(np.asarray(sol.value), prob.z_star)
    hist = np.asarray(sol.stats.residual_history)
    assert hist[0] <= 1e-12 and np.all(np.isnan(hist[1:]))


# ----------------------------------------------------------------------------- stopping test and stats


@pytest.mark.parametrize("name", NAMES)
def test_stopping_test_and_residual_history(name):
    prob = P.make_linear(4, N, norm=0.8)
    solver = LOOSE[name]
    z0 = jnp.zeros(N)
    sol = deq.fixed_point(P.linear_map, z0, prob.args, solver=solver)
    st_ = sol.stats
    k = int(st_.num_steps)
    hist = np.asarray(st_.residual_history)
    assert hist.shape == (61,)
    assert 0 < k < 60
    # entry 0 is the residual at z0; entries 1..k are finite, later ones NaN
    assert hist[0] == pytest.approx(np.linalg.norm(prob.b))
    assert np.all(np.isfinite(hist[: k + 1])) and np.all(np.isnan(hist[k + 1:]))
    # the stopping test ||f(z) - z|| <= atol + rtol ||f(z)|| holds at the returned value ...
    fz = np.asarray(P.linear_map(sol.value, prob.args))
    r = residual(P.linear_map, sol.value, prob.args)
    assert r <= 1e-5 + 1e-3 * np.linalg.norm(fz)
    assert float(st_.residual_norm) == pytest.approx(r, rel=1e-10)
    # ... and it is also the smallest residual seen, which the last step reached.
    assert float(st_.residual_norm) == pytest.approx(np.nanmin(hist), rel=1e-12)
    # a tighter tolerance takes more steps
    tight = deq.fixed_point(P.linear_map, z0, prob.args, solver=TIGHT[name])
    assert k < int(tight.stats.num_steps)


def test_relative_tolerance_alone_stops_the_solve():
    prob = P.make_linear(5, N, norm=0.5)
    prob.b = prob.b * 1e6  # large fixed point: the relative test is the one that bites
    sol = deq.fixed_point(P.linear_map, jnp.zeros(N), prob.args,
                          solver=deq.FixedPointIteration(rtol=1e-6, atol=0.0, max_steps=200))
    assert bool(sol.stats.converged)
    r = residual(P.linear_map, sol.value, prob.args)
    assert r <= 1e-6 * np.linalg.norm(np.asarray(P.linear_map(sol.value, prob.args)))
    assert r > 1e-3  # far above any absolute tolerance one would pick


# ----------------------------------------------------------------------------- solver ranking


def test_anderson_and_broyden_need_fewer_steps_on_a_slow_contraction():
    prob = P.make_slow(0, n=N, rate=0.95)
    z0 = jnp.zeros(N)
    steps = {}
    for name, solver in TIGHT.items():
        sol = deq.fixed_point(P.linear_map, z0, prob.args, solver=solver)
        assert bool(sol.stats.converged), name
        np.testing.assert_allclose(np.asarray(sol.value), prob.z_star, atol=1e-10)
        steps[name] = int(sol.stats.num_steps)
    # plain iteration contracts by 0.95 per step: hundreds of steps
    assert steps["iteration"] > 300
    for name in ("anderson", "broyden", "broyden_ls"):
        assert steps[name] < steps["iteration"] / 4, steps


@pytest.mark.parametrize("name", ["anderson", "broyden", "broyden_ls"])
def test_accelerated_solvers_converge_where_iteration_diverges(name):
    prob = P.make_divergent(0, n=N)
    z0 = jnp.zeros(N)
    plain = deq.fixed_point(P.linear_map, z0, prob.args, solver=deq.FixedPointIteration(max_steps=200))
    assert not bool(plain.stats.converged)
    assert int(plain.stats.result) == deq.RESULTS.DIVERGED  # the iterates run away
    assert np.all(np.isfinite(np.asarray(plain.value)))
    assert np.all(np.isfinite(np.asarray(plain.stats.residual_norm)))

    sol = deq.fixed_point(P.linear_map, z0, prob.args, solver=TIGHT[name])
    assert bool(sol.stats.converged)
    np.testing.assert_allclose(np.asarray(sol.value), prob.z_star, atol=1e-10)


def test_damping_rescues_plain_iteration_on_an_oscillating_map():
    """z -> -1.5 z + b diverges undamped; with damping 0.5 the iteration is z -> -0.25 z + b/2."""
    args = {"A": -1.5 * jnp.eye(2), "b": jnp.array([1.0, -2.0])}
    z0 = jnp.zeros(2)
    undamped = deq.fixed_point(P.linear_map, z0, args, solver=deq.FixedPointIteration(max_steps=50))
    damped = deq.fixed_point(P.linear_map, z0, args, solver=deq.FixedPointIteration(damping=0.5, rtol=0.0, atol=1e-12))
    assert int(damped.stats.num_steps) < 40  # contraction 0.25 per step
    assert not bool(undamped.stats.converged)
    assert bool(damped.stats.converged)
    np.testing.assert_allclose(np.asarray(damped.value), np.array([1.0, -2.0]) / 2.5, atol=1e-11)


# ----------------------------------------------------------------------------- pytree state


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_dict_state_with_leaves_of_different_shapes(name):
    prob = P.make_dict_linear(0)
    z0 = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    sol = deq.fixed_point(P.dict_linear_map, z0, prob.args, solver=TIGHT[name])
    assert isinstance(sol.value, dict) and set(sol.value) == {"a", "b"}
    assert sol.value["a"].shape == (3,) and sol.value["b"].shape == (2, 2)
    assert bool(sol.stats.converged) and sol.stats.num_steps.shape == ()
    assert P.tree_max_abs_diff(sol.value, P.dict_z_star(prob)) < 1e-10


def test_dict_state_residual_is_the_l2_norm_over_all_leaves():
    # f(z) = z + c with c = {"a": [3, 0, 0], "b": [[4, 0], [0, 0]]}: residual 5 everywhere,
    # not 7 (sum of leaf norms) nor 4 (max) nor 3 (first leaf).
    c = {"a": jnp.array([3.0, 0.0, 0.0]), "b": jnp.array([[4.0, 0.0], [0.0, 0.0]])}
    shift = lambda z, c: jax.tree_util.tree_map(jnp.add, z, c)
    z0 = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    sol = deq.fixed_point(shift, z0, c, solver=deq.FixedPointIteration(max_steps=3))
    np.testing.assert_allclose(np.asarray(sol.stats.residual_history), [5.0] * 4)
    assert float(sol.stats.residual_norm) == pytest.approx(5.0)
    assert not bool(sol.stats.converged)


def test_mixed_dtype_dict_state_keeps_each_leaf_dtype():
    prob = P.make_dict_linear(1)
    z0 = {"a": jnp.zeros(3, jnp.float32), "b": jnp.zeros((2, 2), jnp.float64)}

    def f(z, p):
        out = P.dict_linear_map({"a": z["a"].astype(jnp.float64), "b": z["b"]}, p)
        return {"a": out["a"].astype(jnp.float32), "b": out["b"]}

    sol = deq.fixed_point(f, z0, prob.args, solver=deq.Anderson(rtol=0.0, atol=1e-5))  # float32 accuracy
    assert sol.value["a"].dtype == jnp.float32 and sol.value["b"].dtype == jnp.float64
    assert bool(sol.stats.converged)
    assert P.tree_max_abs_diff(sol.value, P.dict_z_star(prob)) < 1e-4


def test_args_may_be_omitted_and_contain_non_float_leaves():
    sol = deq.fixed_point(lambda z, a: 0.5 * z + 1.0, jnp.zeros(2))
    np.testing.assert_allclose(np.asarray(sol.value), [2.0, 2.0], atol=1e-5)

    def f(z, a):
        scale, shift = a
        return scale * z + shift.astype(z.dtype)

    g = jax.grad(lambda s: deq.fixed_point(f, jnp.zeros(2), (s, jnp.arange(2)),
                                           solver=deq.Anderson(rtol=0.0, atol=1e-12)).value.sum())(0.5)
    # z* = shift / (1 - s): d/ds sum = sum(shift) / (1 - s)^2 = 1 / 0.25 (the default adjoint
    # tolerance is loose, rtol=1e-4)
    assert float(g) == pytest.approx(4.0, rel=1e-4)
