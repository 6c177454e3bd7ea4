"""Gradients of `deq.fixed_point`: IFT (with every adjoint solver), Unrolled, PhantomGrad, JFB.

References are independent of the library: the exact implicit gradient of a tanh cell in numpy
(`problems.tanh_cell_grad_np`) and central finite differences of the loss.

Every gradient here is taken by `grads`, w.r.t. the params, the input x and z0 at once, so tests
with the same solver and backward strategy share one compilation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deq
import problems as P

# Every adjoint solve here is meant to converge: a NonConvergenceWarning is a failure.
pytestmark = pytest.mark.filterwarnings("error::deq.NonConvergenceWarning")

TIGHT = P.TIGHT
FORWARD = P.solvers(**TIGHT)
BACKWARD = {
    "ift_iteration": deq.IFT(solver=deq.FixedPointIteration(**TIGHT)),
    "ift_anderson": deq.IFT(solver=deq.Anderson(**TIGHT)),
    "ift_broyden": deq.IFT(solver=deq.Broyden(**TIGHT)),
    "ift_gmres": deq.IFT(solver=deq.GMRES(rtol=1e-12, atol=0.0)),
    "unrolled": deq.Unrolled(),
}
APPROXIMATE = {
    "phantom": deq.PhantomGrad(),  # steps=5, damping=0.5
    "phantom2": deq.PhantomGrad(steps=2, damping=1.0),
    "phantom1": deq.PhantomGrad(steps=1, damping=1.0),
    "jfb": deq.JFB(),
}

# (Broyden(line_search=True) with Unrolled used to fail: its backtracking was a lax.while_loop,
# which reverse-mode autodiff rejects.)
COMBOS = [pytest.param(f, b, id=f"{f}-{b}") for f in FORWARD for b in BACKWARD]


def loss_and_value(params, x, z0, c, solver, backward):
    sol = deq.fixed_point(P.tanh_cell, z0, (params, x), solver=solver, backward=backward)
    return jnp.dot(c, sol.value), sol.value


_value_and_grads = jax.value_and_grad(loss_and_value, argnums=(0, 1, 2), has_aux=True)


def grads(cell, c, solver, backward, z0=None):
    """(z*, dL/dparams, dL/dx, dL/dz0) for L = c . z*."""
    z0 = jnp.zeros(cell.n) if z0 is None else jnp.asarray(z0)
    (_, value), (gp, gx, gz0) = _value_and_grads(cell.params, jnp.asarray(cell.x), z0, c, solver, backward)
    return value, gp, gx, gz0


@pytest.fixture(scope="module")
def setup():
    """A contractive (0.5) tanh cell with nested-dict params, a loss direction and references."""
    cell = P.make_tanh_cell(0, P.CELL_N, P.CELL_D, contraction=0.5)
    c = np.random.default_rng(10).normal(size=P.CELL_N)
    v = P.random_like(11, cell.params)
    exact = P.tanh_cell_grad_np(cell, c)
    # central differences of the library's own forward solve, along a random direction v
    fwd = lambda p: loss_and_value(p, cell.x, jnp.zeros(cell.n), c, FORWARD["anderson"], BACKWARD["ift_anderson"])[0]
    fd = P.central_difference(fwd, cell.params, v, eps=1e-5)
    _, unrolled, _, _ = grads(cell, c, FORWARD["iteration"], BACKWARD["unrolled"])
    return cell, c, v, exact, fd, unrolled


def test_the_references_agree_with_each_other(setup):
    """The analytic gradient, numpy finite differences and library finite differences agree."""
    cell, c, v, exact, fd, _ = setup
    fd_np = P.central_difference(lambda p: P.tanh_cell_loss_np(P.with_params(cell, p), c), cell.params, v, eps=1e-5)
    along = float(P.tree_vdot(exact, v))
    assert abs(fd_np - along) <= 1e-8 * abs(along)
    assert abs(fd - along) <= 1e-8 * abs(along)


@pytest.mark.parametrize("fwd,bwd", COMBOS)
def test_gradient_matches_finite_differences_and_unrolling(setup, fwd, bwd):
    cell, c, v, exact, fd, unrolled = setup
    value, g, gx, gz0 = grads(cell, c, FORWARD[fwd], BACKWARD[bwd])
    # the forward value is the fixed point
    np.testing.assert_allclose(np.asarray(value), P.tanh_cell_solve_np(cell), rtol=0, atol=1e-12)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(cell.params)
    assert P.tree_rel_err(g, exact) < 1e-6
    assert P.tree_rel_err(g, unrolled) < 1e-6
    along = float(P.tree_vdot(g, v))
    assert abs(along - fd) < 1e-6 * abs(fd)
    # dL/dx = U^T dL/db
    np.testing.assert_allclose(np.asarray(gx), cell.params["inner"]["U"].T @ exact["inner"]["b"], rtol=1e-6)
    if bwd.startswith("ift"):
        np.testing.assert_array_equal(np.asarray(gz0), np.zeros(cell.n))  # z* does not depend on z0
    else:
        assert np.max(np.abs(np.asarray(gz0))) < 1e-8  # unrolled: 0.5**steps, tiny


@settings(max_examples=5, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 6),
    d=st.integers(1, 4),
    seed=st.integers(0, 1000),
    combo=st.sampled_from([(f, b) for f in FORWARD for b in BACKWARD]),
)
def test_gradient_property_over_shapes(n, d, seed, combo):
    fwd, bwd = combo
    cell = P.make_tanh_cell(seed, n, d, contraction=0.6)
    c = np.random.default_rng(seed + 1).normal(size=n)
    value, g, _, _ = grads(cell, c, FORWARD[fwd], BACKWARD[bwd])
    np.testing.assert_allclose(np.asarray(value), P.tanh_cell_solve_np(cell), rtol=0, atol=1e-11)
    exact = P.tanh_cell_grad_np(cell, c)
    assert P.tree_rel_err(g, exact) < 1e-6
    v = P.random_like(seed + 2, cell.params)
    fd = P.central_difference(lambda p: P.tanh_cell_loss_np(P.with_params(cell, p), c), cell.params, v)
    assert abs(float(P.tree_vdot(g, v)) - fd) <= 1e-6 * max(abs(fd), 1e-8)


def test_gradient_through_closed_over_parameters_equals_gradient_through_args(setup):
    cell, c, _, exact, _, _ = setup
    solver, backward = FORWARD["anderson"], BACKWARD["ift_anderson"]

    def loss_closed(W):
        def f(z, a):
            params, x = a
            return jnp.tanh(W @ z + params["inner"]["U"] @ x + params["inner"]["b"])
        return jnp.dot(c, deq.fixed_point(f, jnp.zeros(cell.n), cell.args, solver=solver, backward=backward).value)

    gW = jax.grad(loss_closed)(jnp.asarray(cell.params["W"]))
    np.testing.assert_allclose(np.asarray(gW), exact["W"], rtol=1e-7, atol=1e-12)


def test_default_ift_is_accurate_enough_for_training(setup):
    """The default adjoint tolerance is loose (float32 training), but still a close gradient."""
    cell, c, _, exact, _, _ = setup
    _, g, _, gz0 = grads(cell, c, deq.Anderson(), deq.IFT())
    assert P.tree_rel_err(g, exact) < 1e-3
    np.testing.assert_array_equal(np.asarray(gz0), np.zeros(cell.n))


# ----------------------------------------------------------------------------- approximate gradients


@pytest.mark.parametrize("name", list(APPROXIMATE))
def test_approximate_gradients_keep_the_exact_forward_value_and_ignore_z0(setup, name):
    cell, c, _, exact, _, _ = setup
    z0 = np.random.default_rng(3).normal(size=cell.n)
    value, g, _, gz0 = grads(cell, c, FORWARD["anderson"], APPROXIMATE[name], z0=z0)
    np.testing.assert_allclose(np.asarray(value), P.tanh_cell_solve_np(cell), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(gz0), np.zeros(cell.n))
    assert all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree_util.tree_leaves(g))
    # a descent direction on this 0.5-contractive cell, but not the exact gradient
    assert P.cosine(g, exact) > 0.5
    assert P.tree_rel_err(g, exact) > 1e-4


def test_jfb_is_the_vjp_of_one_step_at_the_fixed_point(setup):
    cell, c, _, _, _, _ = setup
    _, g, _, _ = grads(cell, c, FORWARD["anderson"], APPROXIMATE["jfb"])
    assert P.tree_rel_err(g, P.tanh_cell_jfb_grad_np(cell, c)) < 1e-10


def test_phantom_grad_with_one_undamped_step_is_jfb(setup):
    cell, c, _, _, _, _ = setup
    _, g1, _, _ = grads(cell, c, FORWARD["anderson"], APPROXIMATE["phantom1"])
    _, g2, _, _ = grads(cell, c, FORWARD["anderson"], APPROXIMATE["jfb"])
    assert P.tree_rel_err(g1, g2) < 1e-12


def test_phantom_grad_approaches_the_implicit_gradient_with_many_steps(setup):
    cell, c, _, exact, _, _ = setup
    _, few, _, _ = grads(cell, c, FORWARD["anderson"], APPROXIMATE["phantom2"])
    _, many, _, _ = grads(cell, c, FORWARD["anderson"], deq.PhantomGrad(steps=50, damping=1.0))
    _, ift, _, _ = grads(cell, c, FORWARD["anderson"], BACKWARD["ift_anderson"])
    assert P.cosine(many, ift) > 0.999
    # the error shrinks like contraction**steps: 0.5**50 is below float64 precision
    assert P.tree_rel_err(many, exact) < 1e-10
    assert P.tree_rel_err(few, exact) > 10 * P.tree_rel_err(many, exact)


# ----------------------------------------------------------------------------- other states


def test_ift_gradient_of_a_dict_state_linear_problem():
    """z* = (I - A)^{-1} b for a dict state: dL/db = (I - A)^{-T} c and dL/dA = dL/db z*^T."""
    prob = P.make_dict_linear(3)
    c = {"a": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray([[0.3, 0.0], [-1.0, 2.0]])}
    z0 = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}

    def L(args):
        sol = deq.fixed_point(P.dict_linear_map, z0, args, solver=FORWARD["broyden"], backward=BACKWARD["ift_gmres"])
        return P.tree_vdot(c, sol.value)

    cflat = np.asarray(P.flatten_state(c))
    gb = np.linalg.solve((np.eye(P.STATE_SIZE) - prob.A).T, cflat)
    g = jax.grad(L)(prob.args)
    np.testing.assert_allclose(np.asarray(g["b"]), gb, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(g["A"]), np.outer(gb, prob.z_star), rtol=1e-8, atol=1e-12)
