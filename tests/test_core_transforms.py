"""Composition with JAX transformations, compilation caching, and dtypes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq
import problems as P

ANDERSON = deq.Anderson(**P.TIGHT)
IFT = deq.IFT(solver=deq.Anderson(**P.TIGHT))


@pytest.fixture(scope="module")
def cell():
    return P.make_tanh_cell(4, P.CELL_N, P.CELL_D, contraction=0.6, batch=3, x_scale=[0.5, 1.0, 2.0])


# ----------------------------------------------------------------------------- transformations


def test_jit_of_vmap_of_grad(cell):
    c = np.random.default_rng(0).normal(size=cell.n)

    def loss(params, x):
        return jnp.dot(c, deq.fixed_point(P.tanh_cell, jnp.zeros(cell.n), (params, x), solver=ANDERSON, backward=IFT).value)

    per_sample = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(cell.params, jnp.asarray(cell.x))
    assert per_sample["W"].shape == (3, cell.n, cell.n)
    for i in range(3):
        want = P.tanh_cell_grad_np(P.TanhCell(cell.params, cell.x[i]), c)
        got = jax.tree_util.tree_map(lambda a: a[i], per_sample)
        assert P.tree_rel_err(got, want) < 1e-8


def test_vmap_over_a_batched_solve_and_grad_of_jit(cell):
    """vmap over an extra leading axis of a batch_axis=0 solve; grad of a user-jitted loss."""
    X = jnp.stack([jnp.asarray(cell.x), 2.0 * jnp.asarray(cell.x)])  # (2, B, d)

    def solve(x):
        return deq.fixed_point(P.batched_tanh_cell, jnp.zeros((3, cell.n)), (cell.params, x), solver=ANDERSON,
                               batch_axis=0)

    sols = jax.vmap(solve)(X)
    assert sols.value.shape == (2, 3, cell.n) and sols.stats.num_steps.shape == (2, 3)
    for k in range(2):
        for i in range(3):
            one = P.TanhCell(cell.params, np.asarray(X[k, i]))
            np.testing.assert_allclose(np.asarray(sols.value[k, i]), P.tanh_cell_solve_np(one), atol=1e-11)

    loss = jax.jit(lambda p: jnp.sum(deq.fixed_point(P.batched_tanh_cell, jnp.zeros((3, cell.n)), (p, jnp.asarray(cell.x)),
                                                     solver=ANDERSON, backward=IFT, batch_axis=0).value))
    g = jax.grad(loss)(cell.params)
    want = jax.tree_util.tree_map(lambda *xs: sum(xs), *[
        P.tanh_cell_grad_np(P.TanhCell(cell.params, cell.x[i]), np.ones(cell.n)) for i in range(3)])
    assert P.tree_rel_err(g, want) < 1e-8


# ----------------------------------------------------------------------------- no retracing


class Counted:
    """A cell that counts how often Python runs it (i.e. how often it is traced)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, z, a):
        self.calls += 1
        return jnp.tanh(0.5 * z + a)


def test_repeated_eager_calls_with_the_same_f_do_not_retrace():
    f = Counted()
    solver = deq.Anderson(rtol=0.0, atol=1e-10)
    deq.fixed_point(f, jnp.zeros(3), jnp.ones(3), solver=solver)
    first = f.calls
    assert first > 0
    for k in range(3):
        # (not jnp.full(3, 0.1 * k): a weakly typed array is a new input type for jit)
        sol = deq.fixed_point(f, jnp.zeros(3), jnp.ones(3) * (0.1 * k), solver=solver)
        np.testing.assert_allclose(np.asarray(sol.value), np.tanh(0.5 * np.asarray(sol.value) + 0.1 * k), atol=1e-9)
    assert f.calls == first
    # gradients: traced once, then reused
    grad = jax.grad(lambda a: deq.fixed_point(f, jnp.zeros(3), a, solver=solver).value.sum())
    grad(jnp.ones(3))
    after_grad = f.calls
    grad(2.0 * jnp.ones(3))
    assert f.calls == after_grad
    # the counter does see new traces: new shapes retrace
    deq.fixed_point(f, jnp.zeros(4), jnp.ones(4), solver=solver)
    assert f.calls > after_grad


def test_repeated_calls_under_a_user_jit_do_not_retrace():
    f = Counted()

    @jax.jit
    def step(a):
        value, g = jax.value_and_grad(lambda a: deq.fixed_point(f, jnp.zeros(3), a, solver=ANDERSON, backward=IFT).value.sum())(a)
        return value, g

    step(jnp.ones(3))
    first = f.calls
    assert first > 0
    v, g = step(jnp.asarray(np.full(3, 0.3)))
    step(jnp.asarray(np.full(3, -0.2)))
    assert f.calls == first
    # and the answer is right: z = tanh(0.5 z + a), dz/da = D / (1 - 0.5 D), D = 1 - z^2
    z = np.zeros(3)
    for _ in range(200):
        z = np.tanh(0.5 * z + 0.3)
    D = 1 - z**2
    np.testing.assert_allclose(np.asarray(g), D / (1 - 0.5 * D), rtol=1e-9)
    assert float(v) == pytest.approx(z.sum(), rel=1e-12)


def test_an_unhashable_f_still_works():
    """(It used to fail inside jax.closure_convert, which memoizes on f.)"""
    @dataclasses.dataclass
    class Cell:  # eq=True and not frozen: unhashable, as dataclasses are by default
        scale: float

        def __call__(self, z, a):
            return jnp.tanh(self.scale * z + a)

    f = Cell(0.5)
    with pytest.raises(TypeError):
        hash(f)
    solver = deq.Anderson(rtol=0.0, atol=1e-12)
    sol = deq.fixed_point(f, jnp.zeros(3), jnp.ones(3), solver=solver)
    assert bool(sol.stats.converged)
    z = np.asarray(sol.value)
    np.testing.assert_allclose(z, np.tanh(0.5 * z + 1.0), atol=1e-11)


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    "name,dtype,tol",
    [("anderson", jnp.float32, 1e-5), ("anderson", jnp.float64, 1e-12), ("anderson", jnp.bfloat16, 1e-2),
     ("broyden", jnp.bfloat16, 1e-2), ("anderson", jnp.float16, 1e-2)],
    ids=["float32", "float64", "bfloat16", "bfloat16-broyden", "float16"],
)
def test_value_dtype_follows_z0(name, dtype, tol):
    cell = P.make_tanh_cell(1, P.CELL_N, P.CELL_D, contraction=0.5)
    cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), t)
    solver = P.solvers(rtol=0.0, atol=tol, max_steps=100)[name]
    sol = deq.fixed_point(P.tanh_cell, jnp.zeros(cell.n, dtype), cast(cell.args), solver=solver)
    assert sol.value.dtype == dtype
    assert bool(sol.stats.converged), sol.stats
    assert jnp.issubdtype(sol.stats.residual_norm.dtype, jnp.floating)
    z_star = P.tanh_cell_solve_np(cell)
    # the answer to the precision of the dtype (bf16: 8 bits of mantissa)
    err = np.max(np.abs(np.asarray(sol.value, np.float64) - z_star))
    assert err < {jnp.float32: 1e-5, jnp.float64: 1e-11, jnp.bfloat16: 5e-2, jnp.float16: 1e-2}[dtype]


def test_float32_gradients_stay_float32():
    cell = P.make_tanh_cell(2, P.CELL_N, P.CELL_D, contraction=0.5)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), cell.params)
    x = jnp.asarray(cell.x, jnp.float32)
    c = np.random.default_rng(0).normal(size=cell.n).astype(np.float32)

    def loss(p):
        sol = deq.fixed_point(P.tanh_cell, jnp.zeros(cell.n, jnp.float32), (p, x),
                              solver=deq.Anderson(rtol=0.0, atol=1e-6))
        return jnp.dot(c, sol.value)

    g = jax.grad(loss)(params)
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(g))
    assert P.tree_rel_err(g, P.tanh_cell_grad_np(cell, c.astype(np.float64))) < 1e-3


# ----------------------------------------------------------------------------- higher order


def _elementwise_cell(z, a):
    return jnp.tanh(0.5 * z + a)


def _dz_da(a):
    """z* = tanh(0.5 z* + a) elementwise: dz*/da = D / (1 - D/2), D = 1 - z*^2 (numpy)."""
    z = np.zeros_like(a)
    for _ in range(300):
        z = np.tanh(0.5 * z + a)
    D = 1 - z**2
    return D / (1 - 0.5 * D)


def test_second_order_gradient_with_a_gmres_adjoint():
    backward = deq.IFT(solver=deq.GMRES(rtol=1e-12, atol=0.0))
    L = lambda a: deq.fixed_point(_elementwise_cell, jnp.zeros(2), a, solver=ANDERSON, backward=backward).value.sum()
    a = np.array([0.3, -0.7])
    gg = jax.grad(lambda a: jax.grad(L)(a).sum())(jnp.asarray(a))
    eps = 1e-5
    want = (_dz_da(a + eps) - _dz_da(a - eps)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(gg), want, rtol=1e-7)


def test_second_order_gradient_with_the_default_adjoint():
    L = lambda a: deq.fixed_point(_elementwise_cell, jnp.zeros(2), a, solver=ANDERSON, backward=IFT).value.sum()
    a = np.array([0.3, -0.7])
    second = jax.grad(lambda a: jax.grad(L)(a).sum())
    jax.eval_shape(second, jnp.asarray(a))
    gg = second(jnp.asarray(a))
    eps = 1e-5
    np.testing.assert_allclose(np.asarray(gg), (_dz_da(a + eps) - _dz_da(a - eps)) / (2 * eps), rtol=1e-6)


def test_forward_mode_jacobian_with_ift():
    a = np.array([0.3, -0.7])
    jacobian = jax.jacfwd(lambda a: deq.fixed_point(_elementwise_cell, jnp.zeros(2), a, solver=ANDERSON, backward=IFT).value)
    jax.eval_shape(jacobian, jnp.asarray(a))
    J = jacobian(jnp.asarray(a))
    np.testing.assert_allclose(np.asarray(J), np.diag(_dz_da(a)), rtol=1e-8, atol=1e-12)
