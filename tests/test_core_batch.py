"""`batch_axis=0`: independent per-sample solves, equal to `jax.vmap` of the unbatched solve."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq
import problems as P

TIGHT = P.solvers(**P.TIGHT)
B = 5
X_SCALES = [0.01, 0.1, 1.0, 3.0, 10.0]  # per-sample input scale: different difficulty


@pytest.fixture(scope="module")
def cell():
    return P.make_tanh_cell(7, P.CELL_N, P.CELL_D, contraction=0.7, batch=B, x_scale=X_SCALES)


def solve_batched(cell, solver, backward=None):
    return deq.fixed_point(P.batched_tanh_cell, jnp.zeros((B, cell.n)), cell.args, solver=solver,
                           backward=backward, batch_axis=0)


def solve_vmapped(cell, solver, backward=None):
    one = lambda x: deq.fixed_point(P.tanh_cell, jnp.zeros(cell.n), (cell.params, x), solver=solver, backward=backward)
    return jax.vmap(one)(jnp.asarray(cell.x))


def assert_stats_equal(a: deq.Stats, b: deq.Stats, atol=1e-10):
    np.testing.assert_array_equal(np.asarray(a.num_steps), np.asarray(b.num_steps))
    np.testing.assert_array_equal(np.asarray(a.converged), np.asarray(b.converged))
    np.testing.assert_array_equal(np.asarray(a.result), np.asarray(b.result))
    np.testing.assert_allclose(np.asarray(a.residual_norm), np.asarray(b.residual_norm), rtol=0, atol=atol)
    np.testing.assert_allclose(np.asarray(a.residual_history), np.asarray(b.residual_history), rtol=0, atol=atol,
                               equal_nan=True)


@pytest.mark.parametrize("name", ["iteration", "anderson", "broyden"])
def test_batch_axis_equals_vmap_of_the_unbatched_solve(cell, name):
    batched = solve_batched(cell, TIGHT[name])
    vmapped = solve_vmapped(cell, TIGHT[name])
    st = batched.stats
    assert batched.value.shape == (B, cell.n)
    for leaf in (st.num_steps, st.residual_norm, st.converged, st.result):
        assert leaf.shape == (B,)
    assert st.residual_history.shape == (B, P.TIGHT["max_steps"] + 1)
    np.testing.assert_allclose(np.asarray(batched.value), np.asarray(vmapped.value), rtol=0, atol=1e-10)
    assert_stats_equal(st, vmapped.stats)
    assert bool(jnp.all(st.converged))
    # samples of different difficulty take different numbers of steps
    steps = np.asarray(st.num_steps)
    assert len(set(steps.tolist())) > 1, steps
    # every row is the fixed point of its own sample (numpy check)
    for i in range(B):
        one = P.TanhCell(cell.params, cell.x[i])
        assert P.tanh_cell_fixed_point_residual(one, batched.value[i]) < 1e-11


@pytest.mark.parametrize("name", ["anderson"])
def test_converged_samples_stop_changing(cell, name):
    """A sample that converges early is frozen: its row equals the solve of that sample alone,
    and its residual history is NaN after its last step, while other samples keep going."""
    batched = solve_batched(cell, TIGHT[name])
    steps = np.asarray(batched.stats.num_steps)
    hist = np.asarray(batched.stats.residual_history)
    easy, hard = int(np.argmin(steps)), int(np.argmax(steps))
    assert steps[easy] < steps[hard]
    assert np.all(np.isnan(hist[easy, steps[easy] + 1:]))
    assert np.all(np.isfinite(hist[hard, : steps[hard] + 1]))
    alone = deq.fixed_point(P.tanh_cell, jnp.zeros(cell.n), (cell.params, cell.x[easy]), solver=TIGHT[name])
    assert int(alone.stats.num_steps) == steps[easy]
    # equal up to rounding (batched and unbatched matmuls may round differently) ...
    np.testing.assert_allclose(np.asarray(batched.value[easy]), np.asarray(alone.value), rtol=0, atol=1e-12)
    # ... and the residual is that of step steps[easy]: had the row kept iterating for the
    # steps[hard] - steps[easy] further steps, it would be orders of magnitude smaller.
    assert steps[hard] - steps[easy] >= 2
    assert float(batched.stats.residual_norm[easy]) == pytest.approx(float(alone.stats.residual_norm), rel=1e-3)


def test_plain_iteration_freezes_converged_rows_bit_for_bit():
    """f(z) = A z + b row-wise, with b = 0 for one row: that row starts converged (0 steps) and
    must stay exactly at z0 while the other row iterates."""
    prob = P.make_linear(0, P.N, norm=0.5, batch=2)
    prob.b[0] = 0.0
    z0 = np.zeros((2, P.N))
    sol = deq.fixed_point(P.batched_linear_map, z0, prob.args, solver=TIGHT["iteration"], batch_axis=0)
    np.testing.assert_array_equal(np.asarray(sol.stats.num_steps) > 0, [False, True])
    np.testing.assert_array_equal(np.asarray(sol.value[0]), np.zeros(P.N))
    np.testing.assert_allclose(np.asarray(sol.value), prob.z_star, atol=1e-10)


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_batch_linear_problem_reaches_each_analytic_fixed_point(name):
    prob = P.make_linear(1, P.N, norm=0.9, batch=4)
    prob.b = prob.b * np.array([1e-3, 1.0, 10.0, 1e3])[:, None]
    sol = deq.fixed_point(P.batched_linear_map, np.zeros((4, P.N)), prob.args, solver=TIGHT[name], batch_axis=0)
    assert bool(jnp.all(sol.stats.converged))
    np.testing.assert_allclose(np.asarray(sol.value), prob.z_star, rtol=1e-10, atol=1e-10)


def test_one_diverging_sample_does_not_spoil_the_others():
    """Row 1 blows up to NaN; row 0 converges exactly as if it were alone."""
    def f(z, a):
        return jnp.where(jnp.abs(z) > 10.0, jnp.nan, a * z + 1.0)

    a = jnp.array([[0.5], [3.0]])
    plain = deq.fixed_point(f, jnp.zeros((2, 3)), a, solver=TIGHT["iteration"], batch_axis=0)
    np.testing.assert_array_equal(np.asarray(plain.stats.result), [deq.RESULTS.CONVERGED, deq.RESULTS.NONFINITE])
    np.testing.assert_array_equal(np.asarray(plain.stats.converged), [True, False])
    assert np.all(np.isfinite(np.asarray(plain.value)))
    np.testing.assert_allclose(np.asarray(plain.value[0]), [2.0] * 3, atol=1e-11)
    alone = deq.fixed_point(f, jnp.zeros((1, 3)), a[:1], solver=TIGHT["iteration"], batch_axis=0)
    np.testing.assert_array_equal(np.asarray(plain.value[0]), np.asarray(alone.value[0]))
    assert int(plain.stats.num_steps[0]) == int(alone.stats.num_steps[0])


# ----------------------------------------------------------------------------- pytree state


def test_batched_dict_state_equals_vmap_and_the_analytic_answer():
    prob = P.make_dict_linear(5, batch=B)
    z0 = {"a": jnp.zeros((B, 3)), "b": jnp.zeros((B, 2, 2))}
    solver = TIGHT["anderson"]
    batched = deq.fixed_point(P.batched_dict_linear_map, z0, prob.args, solver=solver, batch_axis=0)
    one = lambda b: deq.fixed_point(P.dict_linear_map, {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))},
                                    {"A": prob.A, "b": b}, solver=solver)
    vmapped = jax.vmap(one)(jnp.asarray(prob.b))
    assert batched.value["a"].shape == (B, 3) and batched.value["b"].shape == (B, 2, 2)
    assert batched.stats.num_steps.shape == (B,)
    assert P.tree_max_abs_diff(batched.value, vmapped.value) <= 1e-10
    assert_stats_equal(batched.stats, vmapped.stats)
    assert P.tree_max_abs_diff(batched.value, P.dict_z_star(prob)) < 1e-10


def test_batched_dict_state_norm_is_over_all_leaves_of_one_sample():
    scale = jnp.arange(1.0, B + 1.0)
    c = {"a": scale[:, None] * jnp.array([3.0, 0.0, 0.0]),
         "b": scale[:, None, None] * jnp.array([[4.0, 0.0], [0.0, 0.0]])}
    shift = lambda z, c: jax.tree_util.tree_map(jnp.add, z, c)
    z0 = {"a": jnp.zeros((B, 3)), "b": jnp.zeros((B, 2, 2))}
    sol = deq.fixed_point(shift, z0, c, solver=deq.FixedPointIteration(max_steps=2), batch_axis=0)
    want = 5.0 * np.arange(1, B + 1)
    np.testing.assert_allclose(np.asarray(sol.stats.residual_norm), want)
    np.testing.assert_allclose(np.asarray(sol.stats.residual_history), np.repeat(want[:, None], 3, axis=1))


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backward", [deq.IFT(solver=deq.GMRES(rtol=1e-12, atol=0.0))], ids=["ift_gmres"])
def test_batched_ift_gradient_equals_the_sum_of_per_sample_gradients(cell, backward):
    """(IFT with a loop adjoint solver under batch_axis=0: test_core_transforms.)"""
    c = np.random.default_rng(2).normal(size=(B, cell.n))
    solver = TIGHT["anderson"]

    def batched_loss(params):
        sol = deq.fixed_point(P.batched_tanh_cell, jnp.zeros((B, cell.n)), (params, cell.x), solver=solver,
                              backward=backward, batch_axis=0)
        return jnp.sum(c * sol.value)

    g = jax.grad(batched_loss)(cell.params)
    per_sample = [P.tanh_cell_grad_np(P.TanhCell(cell.params, cell.x[i]), c[i]) for i in range(B)]
    want = jax.tree_util.tree_map(lambda *xs: sum(xs), *per_sample)
    assert P.tree_rel_err(g, want) < 1e-8
