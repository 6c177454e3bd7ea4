"""`deq.ReversibleIteration` with `deq.Reversible()`: the exact gradient of the computed output.

References: ordinary backpropagation through the same iteration (`deq.Unrolled()`) in float64,
and central finite differences. float32: the contractive problem of `benchmarks/solvers.py`
(`benchmarks/results/solvers_problem.npz`) against float64 backprop. Memory: XLA's temporary
buffers of the compiled gradient.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.flatten_util  # noqa: F401
import jax.numpy as jnp
import numpy as np
import pytest

import deq
from deq.backward.reversible import derived_checkpoint_every, record

import problems as P

PROBLEM_NPZ = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "solvers_problem.npz"

FIXED = deq.ReversibleIteration(rtol=0.0, atol=0.0, max_steps=40, damping=0.6)  # a fixed budget
CONVERGED = deq.ReversibleIteration(rtol=0.0, atol=1e-11, max_steps=400, damping=0.6)


def _rel(a, b) -> float:
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(b)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _cell(batch=None):
    c = P.make_tanh_cell(3, P.CELL_N, P.CELL_D, contraction=0.8, batch=batch,
                         x_scale=1.0 if batch is None else np.array([0.02, 0.3, 1.0, 3.0]))
    return jax.tree_util.tree_map(jnp.asarray, c.args)


def _loss(args, solver, backward, z0=None, batch_axis=None):
    f = P.tanh_cell if batch_axis is None else P.batched_tanh_cell
    z0 = jnp.zeros(P.CELL_N) if z0 is None else z0
    sol = deq.fixed_point(f, z0, args, solver=solver, backward=backward, batch_axis=batch_axis)
    return jnp.sum(jnp.sin(sol.value) * jnp.arange(1.0, 1.0 + sol.value.shape[-1]))


# ------------------------------------------------------------------------------------ float64


@pytest.mark.parametrize("solver", [FIXED, CONVERGED], ids=["fixed_budget", "converged"])
@pytest.mark.parametrize("checkpoint_every", [None, 1, 3])
def test_gradient_equals_unrolled_backprop_in_float64(x64, solver, checkpoint_every):
    args = _cell()
    ref = jax.grad(_loss)(args, solver, deq.Unrolled())
    got = jax.grad(_loss)(args, solver, deq.Reversible(checkpoint_every=checkpoint_every))
    assert _rel(got, ref) < 1e-8


def test_reversal_in_one_sweep_is_exact_for_short_solves_only(x64):
    args = _cell()
    short = deq.ReversibleIteration(rtol=0.0, atol=0.0, max_steps=10, damping=0.6)
    plain = deq.Reversible(checkpoint_every=0)
    assert _rel(jax.grad(_loss)(args, short, plain), jax.grad(_loss)(args, short, deq.Unrolled())) < 1e-8
    ref = jax.grad(_loss)(args, FIXED, deq.Unrolled())  # 40 steps: rounding grows in the reversal
    assert _rel(jax.grad(_loss)(args, FIXED, plain), ref) > 100 * _rel(jax.grad(_loss)(args, FIXED, deq.Reversible()), ref)


def test_gradient_with_respect_to_z0_equals_unrolled_backprop(x64):
    args, z0 = _cell(), 0.3 * jnp.ones(P.CELL_N)
    ref = jax.grad(lambda z: _loss(args, FIXED, deq.Unrolled(), z))(z0)
    got = jax.grad(lambda z: _loss(args, FIXED, deq.Reversible(), z))(z0)
    assert _rel(got, ref) < 1e-8


def test_gradient_matches_central_finite_differences(x64):
    args = _cell()
    g = jax.grad(_loss)(args, FIXED, deq.Reversible())
    flat, unravel = jax.flatten_util.ravel_pytree(args)
    gflat = jax.flatten_util.ravel_pytree(g)[0]
    v = jax.random.normal(jax.random.key(0), flat.shape, flat.dtype)
    h = 1e-6
    fd = (_loss(unravel(flat + h * v), FIXED, deq.Reversible()) - _loss(unravel(flat - h * v), FIXED, deq.Reversible())) / (2 * h)
    assert abs(float(fd) - float(gflat @ v)) < 1e-7 * abs(float(gflat @ v))


def test_forward_value_and_stats_are_those_of_the_shared_loop(x64):
    args = _cell(batch=4)
    z0 = jnp.zeros((4, P.CELL_N))
    kw = dict(solver=CONVERGED, batch_axis=0)
    a = deq.fixed_point(P.batched_tanh_cell, z0, args, backward=deq.Reversible(), **kw)
    b = deq.fixed_point(P.batched_tanh_cell, z0, args, backward=deq.IFT(), **kw)  # deq._loop.run
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert len(set(np.asarray(a.stats.num_steps).tolist())) > 1  # the samples really differ


def test_batch_axis_0_reverses_each_sample_its_own_steps(x64):
    params, x = _cell(batch=4)
    z0 = jnp.zeros((4, P.CELL_N))

    def loss(params, x, backward):
        return _loss((params, x), CONVERGED, backward, z0, batch_axis=0)

    steps = deq.fixed_point(P.batched_tanh_cell, z0, (params, x), solver=CONVERGED, batch_axis=0).stats.num_steps
    assert len(set(np.asarray(steps).tolist())) == 4, steps
    got = jax.grad(loss, argnums=(0, 1))(params, x, deq.Reversible())
    assert _rel(got, jax.grad(loss, argnums=(0, 1))(params, x, deq.Unrolled())) < 1e-8
    # each sample alone: its row of dL/dx, and its share of dL/dW
    total = jax.tree_util.tree_map(jnp.zeros_like, params)
    for i in range(4):
        one = lambda p, xi: _loss((p, xi[None]), CONVERGED, deq.Reversible(), z0[:1], batch_axis=0)  # noqa: E731
        gp, gx = jax.grad(one, argnums=(0, 1))(params, x[i])
        assert _rel(gx, got[1][i]) < 1e-8
        total = jax.tree_util.tree_map(jnp.add, total, gp)
    assert _rel(total, got[0]) < 1e-8


def test_a_sample_converged_at_the_start_gets_the_identity(x64):
    # z0 is the fixed point of f(z) = a for the first sample: it takes no step
    f = lambda z, a: jnp.broadcast_to(a, z.shape) + 0.5 * jnp.tanh(z - a)  # noqa: E731
    a = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    z0 = jnp.array([[1.0, 2.0], [3.0, -1.0]])
    loss = lambda a, z0, bw: deq.fixed_point(f, z0, a, solver=CONVERGED, backward=bw, batch_axis=0).value.sum()  # noqa: E731
    got = jax.grad(loss, argnums=(0, 1))(a, z0, deq.Reversible())
    ref = jax.grad(loss, argnums=(0, 1))(a, z0, deq.Unrolled())
    assert _rel(got, ref) < 1e-8
    np.testing.assert_array_equal(np.asarray(got[1][0]), [1.0, 1.0])


def test_pytree_state(x64):
    def f(z, p):
        return {"a": jnp.tanh(0.5 * z["b"][:3] + p), "b": jnp.concatenate([jnp.tanh(0.3 * z["a"] - p), z["a"][:1] * 0.2])}

    def loss(p, bw):
        sol = deq.fixed_point(f, {"a": jnp.zeros(3), "b": jnp.zeros(4)}, p, solver=FIXED, backward=bw)
        return jnp.sum(sol.value["a"] ** 2) + jnp.sum(sol.value["b"])

    p = jnp.array([0.3, -1.0, 2.0])
    assert _rel(jax.grad(loss)(p, deq.Reversible()), jax.grad(loss)(p, deq.Unrolled())) < 1e-8


def test_jit_vmap_grad_compose(x64):
    params, x = _cell(batch=4)
    z0 = jnp.zeros((4, P.CELL_N))
    grad = jax.grad(lambda p, x: _loss((p, x), CONVERGED, deq.Reversible(), z0, batch_axis=0))
    xs = jnp.stack([x, 0.5 * x, 2.0 * x])
    batched = jax.jit(jax.vmap(grad, in_axes=(None, 0)))(params, xs)
    for i in range(3):
        assert _rel(jax.tree_util.tree_map(lambda l: l[i], batched), grad(params, xs[i])) < 1e-12


def test_ift_pairs_with_the_reversible_iteration(x64):
    args = _cell()
    got = jax.grad(_loss)(args, CONVERGED, deq.IFT())
    assert _rel(got, jax.grad(_loss)(args, CONVERGED, deq.Reversible())) < 1e-8


def test_derived_segment_length():
    assert [derived_checkpoint_every(b) for b in (0.3, 0.5, 0.8, 0.95, 1.5)] == [6, 4, 2, 1, 4]
    assert deq.Reversible().slots(deq.ReversibleIteration(max_steps=100)) == 24
    assert deq.Reversible(checkpoint_every=0).slots(deq.ReversibleIteration()) == 0


def test_record_stores_the_checkpoints_of_the_trajectory(x64):
    args = _cell()
    F = lambda x: P.tanh_cell(x[0], args)[None]  # noqa: E731
    out, rec = record(FIXED, F, jnp.zeros((1, P.CELL_N)), 5)
    assert rec.ck_y.shape == (7, 1, P.CELL_N) and int(rec.step[0]) == 40
    _, rec10 = record(deq.ReversibleIteration(rtol=0.0, atol=0.0, max_steps=10, damping=0.6), F,
                      jnp.zeros((1, P.CELL_N)), 0)
    np.testing.assert_array_equal(np.asarray(rec.ck_y[1]), np.asarray(rec10.y))
    np.testing.assert_array_equal(np.asarray(rec.ck_z[1]), np.asarray(rec10.z))


# ------------------------------------------------------------------------------------ float32


@pytest.fixture(scope="module")
def solvers_problem():
    d = np.load(PROBLEM_NPZ)
    return tuple(d[k] for k in ("W_contractive", "U", "b", "x"))


def _problem_cell(z, p):
    W, U, b, x = p
    return jnp.tanh(z @ W.T + x @ U.T + b)


def _problem_grad(arrays, dtype, steps, damping, backward):
    p = tuple(jnp.asarray(a, dtype) for a in arrays)
    c = jnp.asarray(np.random.default_rng(1).normal(size=arrays[3].shape[:1] + arrays[0].shape[:1]), dtype)
    solver = deq.ReversibleIteration(rtol=0.0, atol=0.0, max_steps=steps, damping=damping)

    def loss(p):
        z0 = jnp.zeros(c.shape, dtype)
        return jnp.sum(c * deq.fixed_point(_problem_cell, z0, p, solver=solver, backward=backward).value)

    return jax.jit(jax.grad(loss))(p)


@pytest.mark.parametrize("steps,damping", [(10, 0.5), (120, 0.5), (50, 0.8), (120, 0.8)])
def test_float32_gradient_is_as_accurate_as_float32_backprop(solvers_problem, damping, steps):
    """banax's one-sweep reversal: 0.44 relative at 10 steps, NaN at 77 (issue 15)."""
    with jax.enable_x64(True):
        ref = _problem_grad(solvers_problem, jnp.float64, steps, damping, deq.Unrolled())
    ours = _rel(_problem_grad(solvers_problem, jnp.float32, steps, damping, deq.Reversible()), ref)
    backprop = _rel(_problem_grad(solvers_problem, jnp.float32, steps, damping, deq.Unrolled()), ref)
    assert ours < 3e-6, (ours, backprop)
    assert ours < 3 * backprop, (ours, backprop)


# ------------------------------------------------------------------------------------ memory


def _temp_bytes(backward, steps, B=8, n=64):
    W = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)) * 0.4 / np.sqrt(n), jnp.float32)
    f = lambda z, W: jnp.tanh(z @ W.T + 0.5)  # noqa: E731
    solver = deq.ReversibleIteration(rtol=0.0, atol=0.0, max_steps=steps)
    loss = lambda W: deq.fixed_point(f, jnp.zeros((B, n)), W, solver=solver, backward=backward,  # noqa: E731
                                     batch_axis=0).value.sum()
    return jax.jit(jax.grad(loss)).lower(W).compile().memory_analysis().temp_size_in_bytes


def test_memory_of_the_gradient():
    B, n, state = 8, 64, 8 * 64 * 4
    plain = [_temp_bytes(deq.Reversible(checkpoint_every=0), s) for s in (25, 400)]
    assert plain[0] == plain[1]  # flat in max_steps
    ours = [_temp_bytes(deq.Reversible(), s) for s in (25, 400)]
    slots = [deq.Reversible().slots(deq.ReversibleIteration(max_steps=s)) for s in (25, 400)]
    assert ours[1] - ours[0] <= 2 * state * (slots[1] - slots[0]) * 1.05  # only the stored copies grow
    unrolled = [_temp_bytes(deq.Unrolled(), s) for s in (25, 400)]
    assert unrolled[1] - unrolled[0] > 10 * (ours[1] - ours[0])


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("solver", [deq.Anderson(), deq.FixedPointIteration(damping=0.5), deq.Broyden()])
def test_reversible_backward_needs_the_reversible_solver(solver):
    with pytest.raises(ValueError, match=r"deq\.Reversible\(\).*ReversibleIteration.*Pass solver=deq\.ReversibleIteration"):
        jax.grad(lambda a: deq.fixed_point(lambda z, a: jnp.tanh(0.5 * z + a), jnp.zeros(2), a,
                                           solver=solver, backward=deq.Reversible()).value.sum())(jnp.ones(2))
    with pytest.raises(ValueError, match=type(solver).__name__):
        deq.fixed_point(lambda z, a: jnp.tanh(0.5 * z + a), jnp.zeros(2), 1.0, solver=solver, backward=deq.Reversible())


@pytest.mark.parametrize("damping", [0.0, 1.0, 2.0, -0.5, float("nan"), "0.5", True])
def test_damping_is_checked(damping):
    with pytest.raises(ValueError, match=r"ReversibleIteration: `damping` must lie in \(0, 2\) and differ from 1.*got"):
        deq.ReversibleIteration(damping=damping)


@pytest.mark.parametrize("k", [-1, 1.5, True, "4"])
def test_checkpoint_every_is_checked(k):
    with pytest.raises(ValueError, match=r"Reversible: `checkpoint_every` must be None.*got"):
        deq.Reversible(checkpoint_every=k)


def test_unknown_keyword_is_named():
    with pytest.raises(TypeError, match="checkpoint_every"):
        deq.Reversible(checkpoints=4)
    with pytest.raises(ValueError, match="max_steps"):
        deq.ReversibleIteration(max_steps=0)


# ------------------------------------------------------------------------------------ docs


@pytest.mark.parametrize("name", ["deq.solvers.reversible", "deq.backward.reversible"])
def test_docstring_examples_run(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
