"""deq.fixed_point_compact: compacting a training batch changes neither values, stats nor IFT gradients.

References: `deq.fixed_point(..., batch_axis=0)` with `deq.IFT()` (the shared loop and custom
VJP) and central finite differences of the solve, in float64.
"""

from __future__ import annotations

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq
from test_stream import SOLVERS, assert_same, cell, plain, problem, slow_sample

pytestmark = pytest.mark.usefixtures("x64")

B = 40


BUCKETS = (10, 3)  # 40 -> 10 -> 3 rows; the plain-iteration tests share these compilations


def test_value_stats_and_gradients_equal_the_plain_ift_solve_and_finite_differences():
    solver = SOLVERS[1]  # Anderson at atol 1e-12: the derived IFT adjoint is as tight
    z0, W, (x, s) = problem(N=B)
    sol = deq.fixed_point_compact(cell, z0, W, (x, s), solver=solver, buckets=(10,))
    assert_same(sol, plain(solver, z0, W, (x, s)))
    steps = np.sort(sol.stats.num_steps)
    assert steps[-1] > steps[-11]  # the bucket of 10 rows took steps

    def loss(solve, W, x):
        return jnp.sum(jnp.sin(solve(W, x).value))

    compact = lambda W, x: deq.fixed_point_compact(cell, z0, W, (x, s), solver=solver, buckets=(10,))  # noqa: E731
    ref = lambda W, x: plain(solver, z0, W, (x, s))  # noqa: E731
    g = jax.grad(lambda W, x: loss(compact, W, x), (0, 1))(W, x)
    g_ref = jax.grad(lambda W, x: loss(ref, W, x), (0, 1))(W, x)
    for a, b in zip(g, g_ref):  # gradients w.r.t. the shared W and the per-sample x
        np.testing.assert_allclose(a, b, atol=1e-12, rtol=1e-10)
    # and against central differences along a random direction
    dW = jax.random.normal(jax.random.key(7), W.shape)
    dx = jax.random.normal(jax.random.key(8), x.shape)
    eps = 1e-5
    loss_c = jax.jit(lambda W, x: loss(compact, W, x))  # one compilation for both evaluations
    fd = (loss_c(W + eps * dW, x + eps * dx) - loss_c(W - eps * dW, x - eps * dx)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(g[0], dW) + jnp.vdot(g[1], dx), fd, rtol=1e-7)


TRACES = []


def counted_cell(z, W, xs):
    TRACES.append(1)  # runs once per trace of f
    return cell(z, W, xs)


def test_edge_cases_stop_alone():
    solver = SOLVERS[0]
    z0, W, (x, s) = problem(N=B)
    x = x.at[4].set(jnp.nan)
    z0, x, s = slow_sample(z0, x, s, 17)  # plain iteration: MAX_STEPS, alone in the last bucket
    sol = deq.fixed_point_compact(counted_cell, z0, W, (x, s), solver=solver, buckets=BUCKETS)
    assert_same(sol, plain(solver, z0, W, (x, s)))
    steps = np.sort(sol.stats.num_steps)
    assert steps[-1] > steps[-4] > steps[-11]  # the buckets of 10 and of 3 rows both took steps
    assert sol.stats.result[4] == deq.RESULTS.NONFINITE and sol.stats.result[17] == deq.RESULTS.MAX_STEPS
    # every sample converged at the start; a batch of one
    x = jnp.arange(12.0).reshape(6, 2)
    sol = deq.fixed_point_compact(lambda z, a, x: x, x, None, x, solver=solver, buckets=2)
    assert sol.stats.num_steps.tolist() == [0] * 6 and bool(sol.stats.converged.all())
    z0, W, xs = problem(N=1)
    assert_same(deq.fixed_point_compact(cell, z0, W, xs, solver=solver), plain(solver, z0, W, xs))


def test_compiles_once_per_shape():
    solver = SOLVERS[0]
    deq.fixed_point_compact(counted_cell, *problem(0, N=B), solver=solver, buckets=BUCKETS)
    count = len(TRACES)
    for seed in (1, 2):
        z0, W, xs = problem(seed, N=B)
        assert_same(deq.fixed_point_compact(counted_cell, z0, W, xs, solver=solver, buckets=BUCKETS),
                    plain(solver, z0, W, xs))
    assert len(TRACES) == count


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(backward=deq.JFB()), TypeError, "`backward` must be a deq.IFT"),
    (dict(buckets=-1), ValueError, "`buckets` must be >= 0 halvings"),
    (dict(buckets="3"), TypeError, "`buckets` must be an int"),
    (dict(buckets=True), TypeError, "`buckets` must be an int"),
    (dict(buckets=(8, 16)), ValueError, "strictly decreasing within \\[1, B\\) for a batch of B = 40"),
    (dict(buckets=(40,)), ValueError, "strictly decreasing within \\[1, B\\)"),
    (dict(solver=deq.GMRES()), TypeError, "`solver` must be a forward fixed-point solver"),
    (dict(xs=jnp.ones((3, 2))), ValueError, "every leaf of `xs` needs leading axis N = 40"),
    (dict(bogus=1), TypeError, "unexpected keyword argument `bogus`"),
])
def test_errors(kwargs, err, match):
    z0, W, xs = problem(N=B)
    xs = kwargs.pop("xs", xs)
    with pytest.raises(err, match=match):
        deq.fixed_point_compact(cell, z0, W, xs, **kwargs)


def test_closure_over_different_arrays_is_refused():
    z0, W, xs = problem(N=B)
    with pytest.raises(ValueError, match="closes over different arrays at different batch sizes"):
        jax.jit(lambda W, V: deq.fixed_point_compact(
            lambda z, a, x: cell(z, W if z.shape[0] == B else V, x), z0, None, xs).value)(W, 2 * W)


def test_docstring_examples_run():
    with jax.enable_x64(False):
        result = doctest.testmod(importlib.import_module("deq._compact"), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
