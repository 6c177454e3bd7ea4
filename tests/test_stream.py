"""deq.fixed_point_stream and deq.nn.stream: streaming (continuous batching) equals per-sample solves.

References are independent of the code under test: `deq.fixed_point(..., batch_axis=0)` on the
whole dataset (the shared `_loop.run` driver) and `deq.fixed_point` on each sample alone.
"""

from __future__ import annotations

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq

pytestmark = pytest.mark.usefixtures("x64")

N, n = 37, 6  # 37 samples: not a multiple of the slot counts used below


def cell(z, W, xs):
    """A tanh cell whose contraction rate is the sample's own `s` (leading axis = rows)."""
    x, s = xs
    return jnp.tanh(s[:, None] * (z @ W.T) + x)


def problem(seed=0, N=N):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    A = jax.random.normal(k1, (n, n))
    W = (A + A.T) / jnp.linalg.norm(A + A.T, 2)  # symmetric: spectral radius 1
    x = 0.3 * jax.random.normal(k2, (N, n))
    # heavy-tailed: most samples contract fast, a few slowly (rates up to 0.995)
    s = 0.995 * jax.random.uniform(k3, (N,)) ** 6
    return jnp.zeros((N, n)), W, (x, s)


def _plain_f(z, a):
    return cell(z, a[0], a[1])


def plain(solver, z0, W, xs):
    return deq.fixed_point(_plain_f, z0, (W, xs), batch_axis=0, solver=solver)


def assert_same(sol, ref, atol=1e-10):
    np.testing.assert_array_equal(sol.stats.num_steps, ref.stats.num_steps)
    np.testing.assert_array_equal(sol.stats.converged, ref.stats.converged)
    np.testing.assert_array_equal(sol.stats.result, ref.stats.result)
    np.testing.assert_allclose(sol.value, ref.value, atol=atol, rtol=0)
    np.testing.assert_allclose(sol.stats.residual_norm, ref.stats.residual_norm, atol=atol, rtol=1e-9)
    np.testing.assert_allclose(sol.stats.residual_history, ref.stats.residual_history, atol=atol, rtol=1e-9)


def _one_f(z, a):
    return cell(z[None], a[0], (a[1][0][None], a[1][1][None]))[0]


SOLVERS = [deq.FixedPointIteration(max_steps=60), deq.Anderson(max_steps=60, atol=1e-12, rtol=0.0, history_size=3),
           deq.Broyden(max_steps=60)]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_equals_the_plain_batched_solve_and_each_sample_alone(solver):
    # 16 slots refilled about twice each (Anderson's and Broyden's per-slot histories must restart
    # with every new sample for the step counts to match), then the running slots compacted into
    # a bucket of 8 rows once every sample is loaded.
    z0, W, xs = problem()
    sol = deq.fixed_point_stream(cell, z0, W, xs, solver=solver, slots=16)
    ref = plain(solver, z0, W, xs)
    assert_same(sol, ref)
    steps = np.asarray(ref.stats.num_steps)
    assert steps.max() >= 2 * np.median(steps)  # the problem has the spread streaming is for
    if type(solver) is not deq.FixedPointIteration:
        return  # the batched reference is per sample already; each sample alone costs compilations
    for i in (0, int(np.argmax(steps)), N - 1):
        one = deq.fixed_point(_one_f, z0[i], (W, (xs[0][i], xs[1][i])), solver=solver)
        assert int(one.stats.num_steps) == int(sol.stats.num_steps[i])
        assert bool(one.stats.converged) == bool(sol.stats.converged[i])
        np.testing.assert_allclose(sol.value[i], one.value, atol=1e-12)


def test_fewer_samples_than_slots():
    z0, W, xs = problem(N=3)
    solver = SOLVERS[0]
    ref = plain(solver, z0, W, xs)
    assert_same(deq.fixed_point_stream(cell, z0, W, xs, solver=solver, slots=8), ref)


def test_every_sample_converged_at_the_start():
    # f(z) = x: starting at z0 = x every sample has residual 0 at step 0.
    x = jnp.arange(12.0).reshape(6, 2)
    sol = deq.fixed_point_stream(lambda z, a, x: x, x, None, x, slots=4, solver=SOLVERS[0])
    assert sol.stats.num_steps.tolist() == [0] * 6
    assert bool(sol.stats.converged.all()) and sol.stats.result.tolist() == [0] * 6
    np.testing.assert_array_equal(sol.value, x)


def test_nonfinite_and_max_steps_samples_stop_alone():
    z0, W, (x, s) = problem()
    x = x.at[3].set(jnp.nan).at[20, 0].set(jnp.nan)
    z0, x, s = slow_sample(z0, x, s, 30)
    for solver in SOLVERS[:2]:
        sol = deq.fixed_point_stream(cell, z0, W, (x, s), solver=solver, slots=16)
        ref = plain(solver, z0, W, (x, s))
        assert_same(sol, ref)
        codes = sol.stats.result.tolist()
        assert codes[3] == codes[20] == deq.RESULTS.NONFINITE
        if type(solver) is deq.FixedPointIteration:
            assert codes[30] == deq.RESULTS.MAX_STEPS and int(sol.stats.num_steps[30]) == solver.max_steps
        assert np.isfinite(np.asarray(sol.value)[np.r_[0:3, 4:20, 21:N]]).all()


def slow_sample(z0, x, s, i):
    """Sample `i` contracting at rate 0.9999 around its fixed point 0: plain iteration runs out of steps."""
    return z0.at[i].set(1.0), x.at[i].set(0.0), s.at[i].set(0.9999)


def test_pytree_state_and_inputs():
    z0, W, (x, s) = problem()

    def f(z, W, xs):
        out = cell(z["a"], W, (xs["x"], xs["s"]))
        return {"a": out, "b": 0.5 * z["b"] + out[:, :2]}

    z = {"a": z0, "b": jnp.zeros((N, 2))}
    solver = SOLVERS[0]
    sol = deq.fixed_point_stream(f, z, W, {"x": x, "s": s}, solver=solver, slots=16)
    ref = deq.fixed_point(lambda z, a: f(z, a[0], a[1]), z, (W, {"x": x, "s": s}), batch_axis=0, solver=solver)
    np.testing.assert_array_equal(sol.stats.num_steps, ref.stats.num_steps)
    for k in ("a", "b"):
        np.testing.assert_allclose(sol.value[k], ref.value[k], atol=1e-12)


def test_empty_dataset():
    sol = deq.fixed_point_stream(cell, jnp.zeros((0, n)), jnp.eye(n), (jnp.zeros((0, n)), jnp.zeros((0,))))
    assert sol.value.shape == (0, n) and sol.stats.num_steps.shape == (0,)


def test_compiles_once_per_shape_and_composes_with_jit():
    traces = []

    def f(z, W, xs):
        traces.append(1)  # runs once per trace of f
        return cell(z, W, xs)

    solver = SOLVERS[0]
    z0, W, xs = problem(0)
    first = deq.fixed_point_stream(f, z0, W, xs, solver=solver, slots=8)
    count = len(traces)
    for seed in (1, 2):  # new datasets and parameters of the same shapes: no new trace
        z0, W, xs = problem(seed)
        sol = deq.fixed_point_stream(f, z0, W, xs, solver=solver, slots=8)
        assert_same(sol, plain(solver, z0, W, xs))
    assert len(traces) == count
    assert not np.allclose(first.value, sol.value)
    # inside a user's jit, again one trace for several calls
    run = jax.jit(lambda W, xs: deq.fixed_point_stream(f, z0, W, xs, solver=solver, slots=8).value)
    run(W, xs)
    count = len(traces)
    np.testing.assert_allclose(run(*problem(3)[1:]), plain(solver, z0, *problem(3)[1:]).value, atol=1e-12)
    assert len(traces) == count


def test_vmap_over_parameter_sets():
    z0, W, xs = problem()
    solver = SOLVERS[0]
    Ws = jnp.stack([W, 0.5 * W])
    vals = jax.vmap(lambda W: deq.fixed_point_stream(cell, z0, W, xs, solver=solver, slots=16).value)(Ws)
    for k in range(2):
        np.testing.assert_allclose(vals[k], plain(solver, z0, Ws[k], xs).value, atol=1e-12)


def test_throw_raises_a_solve_error():
    z0, W, (x, s) = problem()
    z0, x, s = slow_sample(z0, x, s, 2)
    with pytest.raises(deq.SolveError, match="did not converge for 1 of 37"):
        deq.fixed_point_stream(cell, z0, W, (x, s), slots=16, solver=SOLVERS[0], throw=True)


def test_refuses_differentiation():
    z0, W, xs = problem()
    with pytest.raises(TypeError, match="is for inference and is not differentiable"):
        jax.grad(lambda W: deq.fixed_point_stream(cell, z0, W, xs, slots=8).value.sum())(W)
    with pytest.raises(TypeError, match="not differentiable"):  # through a closed-over array too
        jax.grad(lambda W: deq.fixed_point_stream(lambda z, a, x: cell(z, W, x), z0, None, xs).value.sum())(W)
    # a stop_gradient makes the intent explicit and is allowed
    g = jax.grad(lambda W: deq.fixed_point_stream(cell, z0, jax.lax.stop_gradient(W), xs, solver=SOLVERS[0],
                                                  slots=16).value.sum() + W.sum())(W)
    np.testing.assert_array_equal(g, jnp.ones_like(W))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(f=3), TypeError, "`f` must be callable as f\\(z, args, x\\)"),
    (dict(solver=deq.GMRES()), TypeError, "`solver` must be a forward fixed-point solver"),
    (dict(slots=0), ValueError, "`slots` must be an integer >= 1, got 0"),
    (dict(slots=2.5), ValueError, "`slots` must be an integer >= 1"),
    (dict(tail_buckets=-1), ValueError, "`tail_buckets` must be an integer >= 0"),
    (dict(throw=1), TypeError, "`throw` must be a bool"),
    (dict(z0=jnp.zeros((N, n), jnp.int32)), TypeError, "every leaf of `z0` must be floating point"),
    (dict(z0=(jnp.zeros((N, n)), jnp.zeros((3, n)))), ValueError, "same leading \\(sample\\) axis"),
    (dict(z0={}), ValueError, "`z0` has no array leaves"),
    (dict(xs=None), ValueError, "`xs` has no array leaves"),
    (dict(xs=(jnp.zeros((N - 1, n)), jnp.ones(N))), ValueError, "every leaf of `xs` needs leading axis N = 37"),
    (dict(f=lambda z, W, xs: z[:, :2]), ValueError, "`f` must return a pytree shaped like its state"),
    (dict(bogus=1), TypeError, "unexpected keyword argument `bogus`"),
])
def test_errors(kwargs, err, match):
    z0, W, xs = problem()
    call = dict(f=cell, z0=z0, args=W, xs=xs)
    call.update(kwargs)
    f, z0, args, xs = (call.pop(k) for k in ("f", "z0", "args", "xs"))
    with pytest.raises(err, match=match):
        deq.fixed_point_stream(f, z0, args, xs, **call)


# --------------------------------------------------------------------------------------------
# deq.nn.stream
# --------------------------------------------------------------------------------------------


class TinyCell(nnx.Module):
    def __init__(self, rngs):
        self.W = nnx.Param(0.4 * jax.random.normal(rngs.params(), (4, 4)))

    def __call__(self, z, x):
        return jnp.tanh(z @ self.W + x)


def _layer():
    return deq.nn.DEQ(TinyCell(nnx.Rngs(0)), solver=deq.FixedPointIteration(max_steps=50),
                      eval_solver=deq.Broyden(max_steps=50, atol=1e-8, rtol=1e-8))


def test_nn_stream_layer_equals_the_layer_call_in_both_modes():
    # (a model holding a layer: the example of deq.nn.stream, run by test_docstring_examples_run)
    layer = _layer()
    x = jax.random.normal(jax.random.key(0), (11, 4), jnp.float64) * 2
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        sol = deq.nn.stream(layer, x, slots=3)
        ref = layer(x, return_solution=True)
        np.testing.assert_array_equal(sol.stats.num_steps, ref.stats.num_steps)
        np.testing.assert_allclose(sol.value, ref.value, atol=1e-10)
    z0 = jnp.ones((11, 4))
    np.testing.assert_allclose(deq.nn.stream(layer, x, slots=3, z0=z0).value, layer(x, z0), atol=1e-10)
    # the layer's own method is the same streamed solve
    np.testing.assert_array_equal(layer.stream(x, slots=3).stats.num_steps, sol.stats.num_steps)


class TinyModel(nnx.Module):
    def __init__(self, rngs):
        self.encoder = nnx.Linear(3, 4, rngs=rngs)
        self.deq = _layer()
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        sol = self.deq(self.encoder(x), return_solution=True)
        return self.head(sol.value), sol.stats.num_steps


def test_nn_stream_model_streams_its_layers_and_restores_them():
    model = TinyModel(nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(1), (11, 3), jnp.float64)
    (logits, steps), (ref, ref_steps) = deq.nn.stream(model, x, slots=3), model(x)
    np.testing.assert_allclose(logits, ref, atol=1e-10)
    np.testing.assert_array_equal(steps, ref_steps)
    assert type(model.deq) is deq.nn.DEQ  # restored


def test_nn_stream_errors():
    layer = deq.nn.DEQ(deq.nn.DenseCell(4, rngs=nnx.Rngs(0)), batch_axis=None)
    with pytest.raises(ValueError, match="`batch_axis` must be 0"):
        deq.nn.stream(layer, jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="holds no deq.nn.DEQ layer"):
        deq.nn.stream(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), jnp.ones((3, 2)))
    with pytest.raises(TypeError, match="`module` must be a deq.nn.DEQ layer"):
        deq.nn.stream(lambda x: x, jnp.ones((3, 2)))
    from deq.nn.models import DEQClassifier

    with pytest.raises(ValueError, match="`z0` and `solver` apply to one deq.nn.DEQ layer"):
        deq.nn.stream(DEQClassifier(4, 8, 3, rngs=nnx.Rngs(0)), jnp.ones((3, 4)), z0=jnp.zeros((3, 8)))
    with pytest.raises(ValueError, match="`slots` must be an integer >= 1"):
        deq.nn.stream(_layer(), jnp.ones((3, 4)), slots=-1)
    with pytest.raises(ValueError, match="has_aux=True"):
        deq.nn.stream(deq.nn.DEQ(TinyCell(nnx.Rngs(0)), has_aux=True), jnp.ones((3, 4)))

    class Budgeted(TinyModel):
        def __call__(self, x):
            return self.deq(self.encoder(x), max_steps=5)

    with pytest.raises(ValueError, match="runtime `max_steps` budget is not supported"):
        deq.nn.stream(Budgeted(nnx.Rngs(0)), jnp.ones((3, 3)))


@pytest.mark.parametrize("name", ["deq._stream", "deq.nn._stream"])
def test_docstring_examples_run(name):
    with jax.enable_x64(False):
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_train_evaluate_with_stream_slots_equals_batched_evaluation():
    from deq.nn.models import DEQClassifier
    from deq.train import evaluate

    model = DEQClassifier(6, 8, 3, rngs=nnx.Rngs(0), solver=deq.Broyden(rtol=1e-9, atol=1e-10, max_steps=60))
    model.eval()
    x = np.asarray(jax.random.normal(jax.random.key(1), (13, 6)))
    y = np.arange(13) % 3
    mesh = deq.train.make_mesh(jax.devices()[:1])
    batched = evaluate(model, x, y, 13, mesh=mesh)
    streamed = evaluate(model, x, y, 13, mesh=mesh, stream_slots=4)
    assert set(streamed) == set(batched)
    for k in batched:
        np.testing.assert_allclose(streamed[k], batched[k], rtol=1e-6, atol=1e-9, err_msg=k)
