"""The runtime step budget: `fixed_point(..., max_steps=k)` and the layers' `max_steps=`.

A budget `k` must give exactly what a solver built with `max_steps=k` gives (value, stats,
gradient, for every solver and backward strategy), and a jitted sweep over many budgets must
compile once.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq

CAP = 12


def cell(z, p):
    return jnp.tanh(z @ p["W"].T + p["x"])


def problem(dtype=jnp.float64, batch=3, n=4, scale=0.9):
    k1, k2 = jax.random.split(jax.random.key(0))
    W = jax.random.normal(k1, (n, n), dtype)
    W = scale * W / jnp.linalg.norm(W, 2)
    x = jax.random.normal(k2, (batch, n), dtype)
    return {"W": W, "x": x}, jnp.zeros((batch, n), dtype)


SOLVERS = [
    lambda m: deq.FixedPointIteration(rtol=1e-10, atol=1e-12, max_steps=m),
    lambda m: deq.FixedPointIteration(rtol=1e-10, atol=1e-12, max_steps=m, damping=0.7),
    lambda m: deq.Anderson(rtol=1e-10, atol=1e-12, max_steps=m, history_size=3),
    lambda m: deq.Broyden(rtol=1e-10, atol=1e-12, max_steps=m),
]
# Unrolled differentiates the budgeted loop itself; IFT, JFB and PhantomGrad differentiate at the
# returned value, whose equality with the static solve is checked above.
BACKWARDS = [deq.Unrolled()]


def _solve(solver, p, z0, budget=None, backward=None, batch_axis=0):
    return deq.fixed_point(cell, z0, p, solver=solver, backward=backward, batch_axis=batch_axis,
                           max_steps=budget)


CASES = [(0, 0), (1, 3), (2, 0), (2, 5), (2, CAP), (3, 1), (3, 6)]


@pytest.mark.parametrize("which, k", CASES, ids=[f"{['iteration', 'damped', 'anderson', 'broyden'][i]}-{k}"
                                                 for i, k in CASES])
def test_budget_equals_static_max_steps(which, k):
    make = SOLVERS[which]
    p, z0 = problem()
    got = _solve(make(CAP), p, z0, k)
    if k == 0:  # no step: the start is returned, unconverged
        np.testing.assert_array_equal(got.value, z0)
        np.testing.assert_array_equal(got.stats.num_steps, 0)
        assert not np.any(got.stats.converged)
        assert np.all(got.stats.result == deq.RESULTS.MAX_STEPS)
        return
    want = _solve(make(k), p, z0)
    # Two different compiled programs: equal to rounding (float64), step counts exactly.
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    close(got.value, want.value)
    np.testing.assert_array_equal(got.stats.num_steps, want.stats.num_steps)
    np.testing.assert_array_equal(got.stats.converged, want.stats.converged)
    np.testing.assert_array_equal(got.stats.result, want.stats.result)
    close(got.stats.residual_norm, want.stats.residual_norm)
    close(got.stats.residual_history[:, : k + 1], want.stats.residual_history)
    assert np.all(np.isnan(got.stats.residual_history[:, k + 1:]))
    assert got.stats.residual_history.shape == (z0.shape[0], CAP + 1)  # the static cap sizes it


@pytest.mark.parametrize("backward", BACKWARDS, ids=lambda b: type(b).__name__)
def test_budget_gradient_equals_static(backward):
    p, z0 = problem()
    k = 4

    def loss(p, solver, budget):
        return jnp.sum(_solve(solver, p, z0, budget, backward).value ** 2)

    got = jax.grad(loss)(p, deq.Anderson(rtol=1e-10, atol=1e-12, max_steps=CAP, history_size=3), k)
    want = jax.grad(loss)(p, deq.Anderson(rtol=1e-10, atol=1e-12, max_steps=k, history_size=3), None)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_budget_unrolled_gradient_is_finite_difference_of_budgeted_map():
    # The exact derivative of the k-step map: central differences of the budgeted solve.
    p, z0 = problem(batch=1)
    k = 3
    solver = deq.FixedPointIteration(rtol=0.0, atol=0.0, max_steps=CAP)
    loss = lambda x: jnp.sum(_solve(solver, {"W": p["W"], "x": x}, z0, k, deq.Unrolled()).value)
    g = jax.grad(loss)(p["x"])
    eps = 1e-6
    for j in range(p["x"].shape[1]):
        e = jnp.zeros_like(p["x"]).at[0, j].set(eps)
        fd = (loss(p["x"] + e) - loss(p["x"] - e)) / (2 * eps)
        np.testing.assert_allclose(g[0, j], fd, rtol=1e-7)


def test_budget_reversible_equals_unrolled():
    p, z0 = problem()
    k = 5
    solver = deq.ReversibleIteration(damping=0.8, rtol=1e-10, atol=1e-12, max_steps=CAP)

    def loss(p, backward, solver, budget):
        return jnp.sum(_solve(solver, p, z0, budget, backward).value ** 2)

    got = jax.grad(loss)(p, deq.Reversible(), solver, k)
    want = jax.grad(loss)(p, deq.Unrolled(), deq.ReversibleIteration(damping=0.8, rtol=1e-10, atol=1e-12,
                                                                       max_steps=k), None)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-8)
    sol = _solve(solver, p, z0, k, deq.Reversible())
    np.testing.assert_array_equal(sol.stats.num_steps, k)


def test_sweep_of_50_budgets_compiles_once():
    p, z0 = problem(jnp.float32)
    traces = []

    @jax.jit
    def solve(k):
        traces.append(1)
        sol = _solve(deq.Anderson(rtol=0.0, atol=0.0, max_steps=50), p, z0, k)
        return sol.value, sol.stats.num_steps

    steps = [int(solve(jnp.int32(k))[1][0]) for k in range(1, 51)]
    assert steps == list(range(1, 51))  # rtol = atol = 0: exactly the budget
    assert len(traces) == 1
    assert solve._cache_size() == 1
    # Python integers are turned into arrays before the inner jit: no retrace there either.
    before = deq._fixed_point._impl_jit._cache_size()
    for k in (2, 9, 31):
        _solve(deq.Anderson(rtol=0.0, atol=0.0, max_steps=50), p, z0, k)
    assert deq._fixed_point._impl_jit._cache_size() <= before + 1


def test_budget_under_vmap_and_scan():
    p, z0 = problem()
    solver = deq.FixedPointIteration(rtol=0.0, atol=0.0, max_steps=CAP)
    ks = jnp.array([1, 4, 9], jnp.int32)
    steps = jax.vmap(lambda k: _solve(solver, p, z0, k).stats.num_steps)(ks)
    np.testing.assert_array_equal(steps, np.repeat(np.array([[1], [4], [9]]), z0.shape[0], axis=1))
    vals = jax.vmap(lambda k: _solve(solver, p, z0, k).value)(ks)
    for i, k in enumerate([1, 4, 9]):
        np.testing.assert_allclose(vals[i], _solve(solver, p, z0, k).value, rtol=1e-13, atol=1e-15)

    def body(c, k):
        return c, _solve(solver, p, z0, k).stats.num_steps[0]

    _, out = jax.lax.scan(body, 0, ks)
    np.testing.assert_array_equal(out, [1, 4, 9])


def test_traced_budget_above_cap_is_clipped():
    p, z0 = problem()
    solver = deq.FixedPointIteration(rtol=0.0, atol=0.0, max_steps=CAP)
    steps = jax.jit(lambda k: _solve(solver, p, z0, k).stats.num_steps)(jnp.int32(10 * CAP))
    np.testing.assert_array_equal(steps, CAP)
    steps = jax.jit(lambda k: _solve(solver, p, z0, k).stats.num_steps)(jnp.int32(-3))
    np.testing.assert_array_equal(steps, 0)


def test_budget_with_whole_batch_and_fallback():
    p, z0 = problem()
    solver = deq.Fallback(solvers=(deq.Anderson(max_steps=CAP), deq.FixedPointIteration(max_steps=CAP)),
                          rtol=0.0, atol=0.0, max_steps=CAP)
    sol = _solve(solver, p, z0, 5, batch_axis=None)
    assert int(sol.stats.num_steps) == 5


@pytest.mark.parametrize("bad, kind, text", [
    (CAP + 1, ValueError, "must lie in [0, solver.max_steps] = [0, 12], got 13"),
    (-1, ValueError, "got -1"),
    (2.5, TypeError, "must be an integer or an integer scalar array, got 2.5"),
    (True, TypeError, "got True"),
    ("5", TypeError, "got '5'"),
    (jnp.float32(3), TypeError, "must be an integer scalar, got float32[]"),
    (jnp.array([3, 4]), TypeError, "got int32[2]"),
    (np.int64(CAP + 5), ValueError, "got 17"),
])
def test_bad_budget_errors(bad, kind, text):
    p, z0 = problem()
    with pytest.raises(kind) as e:
        _solve(deq.Anderson(max_steps=CAP), p, z0, bad)
    msg = str(e.value)
    assert text in msg and "max_steps" in msg


def test_bad_budget_under_jit_is_a_type_error():
    p, z0 = problem()
    with pytest.raises(TypeError, match="integer scalar, got float32"):
        jax.jit(lambda k: _solve(deq.Anderson(max_steps=CAP), p, z0, k).value)(jnp.float32(3))


class _Cell(nnx.Module):
    def __init__(self, n, rngs):
        self.W = nnx.Linear(n, n, use_bias=False, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(0.5 * self.W(z) + x)


def test_nnx_layer_budget_compiles_once():
    layer = deq.nn.DEQ(_Cell(4, nnx.Rngs(0)), solver=deq.FixedPointIteration(rtol=0.0, atol=0.0, max_steps=20))
    x = jnp.ones((2, 4))
    traces = []

    @nnx.jit
    def run(layer, x, k):
        traces.append(1)
        return layer(x, return_solution=True, max_steps=k).stats.num_steps

    got = [int(run(layer, x, jnp.int32(k))[0]) for k in (1, 5, 20)]
    assert got == [1, 5, 20] and len(traces) == 1
    # equal to the layer built with that budget as its static max_steps
    same = deq.nn.DEQ(layer.cell, solver=deq.FixedPointIteration(rtol=0.0, atol=0.0, max_steps=5))
    np.testing.assert_array_equal(layer(x, max_steps=5), same(x))


def test_linen_layer_budget():
    class Cell(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            return jnp.tanh(0.5 * nn.Dense(4, use_bias=False)(z) + x)

    mk = lambda m: deq.linen.DEQ(Cell(), solver=deq.FixedPointIteration(rtol=0.0, atol=0.0, max_steps=m))
    x = jnp.ones((2, 4))
    variables = mk(20).init(jax.random.key(0), x)
    run = jax.jit(lambda v, k: mk(20).apply(v, x, return_solution=True, max_steps=k).stats.num_steps)
    assert [int(run(variables, jnp.int32(k))[0]) for k in (2, 7)] == [2, 7]
    assert run._cache_size() == 1
    np.testing.assert_array_equal(mk(20).apply(variables, x, max_steps=7), mk(7).apply(variables, x))
