"""Mixed precision: the cell runs in its own dtype, the solver state in `solver_dtype`.

x64 is on in this module (conftest.py): float64 is the reference; float32 and bfloat16 cells are
built explicitly. Problems are small (n = 8) so each case compiles quickly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import flax.linen as nn

import deq

N = 8
_W = 0.5 * np.linalg.qr(np.random.default_rng(0).standard_normal((N, N)))[0]  # ||W|| = 0.5
_X = np.random.default_rng(1).standard_normal(N)


def cell(z, p):
    return jnp.tanh(p[0] @ z + p[1])


def params(dtype):
    return (jnp.asarray(_W, dtype), jnp.asarray(_X, dtype))


def reference():
    """The float64 fixed point, to 1e-14."""
    sol = deq.fixed_point(cell, jnp.zeros(N), params(jnp.float64), solver=deq.Anderson(rtol=1e-14, max_steps=100))
    assert bool(sol.stats.converged)
    return np.asarray(sol.value)


def test_bfloat16_cell_float32_state_reaches_the_cell_floor_and_reports_it_honestly():
    z0, p = jnp.zeros(N, jnp.bfloat16), params(jnp.bfloat16)
    z_ref = reference()
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    loose = deq.fixed_point(cell, z0, p, solver=deq.Anderson(rtol=2e-2))
    tight = deq.fixed_point(cell, z0, p, solver=deq.Anderson(rtol=1e-6, max_steps=30))
    assert loose.value.dtype == jnp.bfloat16 and loose.stats.residual_norm.dtype == jnp.float32
    assert bool(loose.stats.converged)
    # the stopping test held in float32: residual <= rtol ||f(z)||, with ||f(z)|| ~ ||z*||
    assert float(loose.stats.residual_norm) <= 2e-2 * np.linalg.norm(z_ref) * 1.05
    # Below the cell's rounding the tight test holds only at an exact fixed point of the rounded
    # cell (a point of the bfloat16 grid, residual 0); otherwise MAX_STEPS at a floor ~ eps ||z||.
    floor = float(tight.stats.residual_norm) / np.linalg.norm(z_ref)
    if bool(tight.stats.converged):
        assert floor == 0.0 and bool(jnp.all(cell(tight.value, p) == tight.value))
    else:
        assert int(tight.stats.result) == int(deq.Result.MAX_STEPS) and 1e-5 < floor < 2 * eps
    err = np.linalg.norm(np.asarray(tight.value, np.float64) - z_ref) / np.linalg.norm(z_ref)
    assert err < 2 * eps


def test_float64_state_for_a_float32_cell_matches_the_float64_solve_to_float32_rounding():
    z_ref = reference()
    sol = deq.fixed_point(cell, jnp.zeros(N, jnp.float32), params(jnp.float32),
                          solver=deq.Anderson(rtol=1e-6), solver_dtype=jnp.float64)
    assert sol.value.dtype == jnp.float32
    assert sol.stats.residual_norm.dtype == jnp.float64 and sol.stats.residual_history.dtype == jnp.float64
    assert bool(sol.stats.converged)
    # error <= rtol ||z|| / (1 - ||J||) = 1e-6 * 1.6 / 0.5 from the stopping test, plus the cell's rounding
    np.testing.assert_allclose(np.asarray(sol.value, np.float64), z_ref, rtol=0, atol=4e-6)
    # the default for a float32 cell is float32 state
    assert deq.fixed_point(cell, jnp.zeros(N, jnp.float32), params(jnp.float32)).stats.residual_norm.dtype == jnp.float32


def test_ift_gradient_with_solver_dtype_matches_finite_differences():
    def loss(x, dtype, solver_dtype):
        p = (jnp.asarray(_W, dtype), x.astype(dtype))
        z = deq.fixed_point(cell, jnp.zeros(N, dtype), p, solver=deq.Anderson(rtol=1e-10 if dtype == jnp.float64 else 1e-6),
                            solver_dtype=solver_dtype).value
        return jnp.sum(jnp.sin(z.astype(jnp.float64)))

    x = jnp.asarray(_X)
    g = jax.jit(jax.grad(loss), static_argnums=(1, 2))(x.astype(jnp.float32), jnp.float32, jnp.float64)
    assert g.dtype == jnp.float32
    h, fd = 1e-5, np.zeros(N)
    for i in range(N):
        e = np.zeros(N)
        e[i] = h
        fd[i] = (loss(x + e, jnp.float64, None) - loss(x - e, jnp.float64, None)) / (2 * h)
    np.testing.assert_allclose(np.asarray(g, np.float64), fd, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backward", [
    deq.Unrolled(), deq.JFB(), deq.PhantomGrad(), deq.SHINE(), deq.Reversible(),  # IFT: the gradient test
], ids=lambda b: type(b).__name__)
def test_every_backward_strategy_packs_in_the_solver_dtype(backward):
    solver = {deq.SHINE: deq.Broyden(rtol=1e-6, max_steps=30), deq.Unrolled: deq.FixedPointIteration(rtol=1e-6, max_steps=25),
              deq.Reversible: deq.ReversibleIteration(rtol=1e-6, max_steps=60)}.get(
        type(backward), deq.Anderson(rtol=1e-6, max_steps=15))

    def loss(x):
        p = (jnp.asarray(_W, jnp.float32), x)
        return jnp.sum(deq.fixed_point(cell, jnp.zeros(N, jnp.float32), p, solver=solver, backward=backward,
                                       solver_dtype=jnp.float64).value ** 2)

    g = jax.grad(loss)(jnp.asarray(_X, jnp.float32))
    assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
    z = reference()
    u = np.linalg.solve(np.eye(N) - ((1 - z ** 2)[:, None] * _W).T, 2 * z)
    exact_g = (1 - z ** 2) * u
    if isinstance(backward, (deq.Unrolled, deq.Reversible)):  # the exact gradient, to float32
        np.testing.assert_allclose(np.asarray(g, np.float64), exact_g, rtol=0, atol=1e-4)


def test_has_aux_budget_adjoint_init_and_batches_use_the_solver_dtype():
    pb = params(jnp.bfloat16)
    aux_cell = lambda z, p: (cell(z, p), jnp.sum(z))  # noqa: E731
    sol = deq.fixed_point(aux_cell, jnp.zeros(N, jnp.bfloat16), pb, has_aux=True, max_steps=3,
                          solver_dtype=jnp.float64)
    assert sol.stats.residual_norm.dtype == jnp.float64 and int(sol.stats.num_steps) == 3
    assert sol.value.dtype == jnp.bfloat16 and sol.aux.dtype == jnp.bfloat16

    def loss(x, u):
        p = (jnp.asarray(_W, jnp.float32), x)
        return jnp.sum(deq.fixed_point(cell, jnp.zeros(N, jnp.float32), p, adjoint_init=u,
                                       solver=deq.Anderson(rtol=1e-6), solver_dtype=jnp.float64).value)

    x = jnp.asarray(_X, jnp.float32)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    g, u = grad(x, jnp.zeros(N, jnp.float32))
    assert g.dtype == jnp.float32 and u.dtype == jnp.float32
    g2, _ = grad(x, u)
    np.testing.assert_allclose(g2, g, atol=1e-5)

    # batch_axis=0 inside jit(vmap(...)) agrees with the unbatched solves
    xs = jnp.stack([x, -x, 0.5 * x])

    def solve(xb, batch_axis):
        z0 = jnp.zeros(xb.shape, jnp.float32)
        f = (lambda z, a: jnp.tanh(z @ a[0].T + a[1])) if batch_axis == 0 else cell
        return deq.fixed_point(f, z0, (jnp.asarray(_W, jnp.float32), xb), batch_axis=batch_axis,
                               solver_dtype=jnp.float64).value

    batched = jax.jit(lambda xb: solve(xb, 0))(xs)
    mapped = jax.jit(jax.vmap(lambda xi: solve(xi, None)))(xs)
    assert batched.dtype == mapped.dtype == jnp.float32
    np.testing.assert_allclose(batched, mapped, atol=1e-6)


def test_layers_pass_the_solver_dtype():
    class Cell(nnx.Module):
        def __init__(self, rngs):
            self.W = nnx.Linear(N, N, rngs=rngs, param_dtype=jnp.float32)

        def __call__(self, z, x):
            return jnp.tanh(0.5 * self.W(z) + x)

    x = jnp.asarray(np.tile(_X, (2, 1)), jnp.float32)
    layer = deq.nn.DEQ(Cell(nnx.Rngs(0)), solver_dtype=jnp.float64)
    sol = layer(x, return_solution=True)
    assert sol.value.dtype == jnp.float32 and sol.stats.residual_norm.dtype == jnp.float64

    class LinenCell(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            return jnp.tanh(0.5 * nn.Dense(N, param_dtype=jnp.float32)(z) + x)

    model = deq.linen.DEQ(cell=LinenCell(), solver_dtype=jnp.float64)
    variables = model.init(jax.random.key(0), x)
    sol = model.apply(variables, x, return_solution=True)
    assert sol.value.dtype == jnp.float32 and sol.stats.residual_norm.dtype == jnp.float64
    with pytest.raises(TypeError, match=r"DEQ: `solver_dtype`.*got int32"):
        deq.nn.DEQ(Cell(nnx.Rngs(0)), solver_dtype=jnp.int32)
    with pytest.raises(TypeError, match=r"deq.linen.DEQ: `solver_dtype`.*got complex64"):
        deq.linen.DEQ(cell=LinenCell(), solver_dtype=jnp.complex64).init(jax.random.key(0), x)


@pytest.mark.parametrize("bad, got", [(jnp.int32, "int32"), (bool, "bool"), (jnp.complex64, "complex64"),
                                      ("float3", "'float3'")])
def test_a_non_floating_solver_dtype_is_a_type_error(bad, got):
    with pytest.raises(TypeError, match=rf"fixed_point: `solver_dtype`.*must be a real floating dtype, got {got}\. "
                                        r"Pass e.g. solver_dtype=jnp.float32"):
        deq.fixed_point(cell, jnp.zeros(N), params(jnp.float64), solver_dtype=bad)


def test_float64_solver_dtype_without_x64_is_a_value_error():
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match=r"`solver_dtype=float64` needs 64-bit mode.*jax_enable_x64"):
            deq.fixed_point(cell, jnp.zeros(N, jnp.float32), params(jnp.float32), solver_dtype=jnp.float64)
