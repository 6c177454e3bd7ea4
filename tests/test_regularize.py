"""Tests for `deq.regularize`: Hutchinson Jacobian regularization and fixed-point correction."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deq
from deq.regularize import (
    Correction,
    correction_loss,
    correction_weights,
    fixed_point_correction,
    jacobian_frobenius,
    jacobian_penalty,
)


@pytest.fixture(scope="module", autouse=True)
def _float64():
    """float64 for this module only (see tests/conftest.py: no global x64 switch)."""
    with jax.enable_x64(True):
        yield


N = 4
with jax.enable_x64(True):  # module constants in float64 too
    P = {
        "W": 0.7 * jax.random.normal(jax.random.key(0), (N, N)) / np.sqrt(N),
        "x": jax.random.normal(jax.random.key(1), (N,)),
    }
    Z = jax.random.normal(jax.random.key(2), (N,))


def cell(z, p):
    return jnp.tanh(p["W"] @ z + p["x"])


def exact_frob(f, z, p):
    J = jax.jacfwd(f)(z, p)
    return jnp.sum(J**2)


def test_unbiased_against_dense_jacobian():
    n_keys = 4000
    keys = jax.random.split(jax.random.key(3), n_keys)
    est = jax.jit(jax.vmap(lambda k: jacobian_frobenius(cell, Z, P, k)))(keys)
    exact = exact_frob(cell, Z, P)
    se = float(jnp.std(est)) / np.sqrt(n_keys)
    assert abs(float(jnp.mean(est)) - float(exact)) < 3 * se
    # num_probes=K averages K probes: the same as the mean of K single-probe estimates.
    k = jax.random.key(12)
    many = jacobian_frobenius(cell, Z, P, k, num_probes=4)
    singles = jax.vmap(lambda v: jnp.sum((v @ jax.jacfwd(cell)(Z, P)) ** 2))(
        jax.vmap(lambda kk: jax.random.normal(jax.random.split(kk, 1)[0], (N,)))(jax.random.split(k, 4)))
    np.testing.assert_allclose(many, jnp.mean(singles), rtol=1e-10)


def test_pytree_state():
    def f(z, p):  # two leaves that mix
        a, b = z["a"], z["b"]
        return {"a": jnp.tanh(p["W"] @ a + b[:N]), "b": jnp.sin(0.5 * b + jnp.sum(a))}

    z = {"a": Z, "b": jnp.arange(6.0) / 6}
    flat, unravel = jax.flatten_util.ravel_pytree(z)
    g = lambda v: jax.flatten_util.ravel_pytree(f(unravel(v), P))[0]
    exact = jnp.sum(jax.jacfwd(g)(flat) ** 2)
    keys = jax.random.split(jax.random.key(4), 2000)
    est = jax.jit(jax.vmap(lambda k: jacobian_frobenius(f, z, P, k)))(keys)
    assert abs(float(jnp.mean(est)) - float(exact)) < 3 * float(jnp.std(est)) / np.sqrt(2000)


def test_batch_axis_is_mean_over_samples():
    Zb = jax.random.normal(jax.random.key(5), (3, N))
    fb = lambda z, p: jnp.tanh(z @ p["W"].T + p["x"])
    key = jax.random.key(6)
    total = jacobian_frobenius(fb, Zb, P, key, num_probes=2)
    mean = jacobian_frobenius(fb, Zb, P, key, num_probes=2, batch_axis=0)
    np.testing.assert_allclose(mean, total / 3, rtol=1e-12)
    # ... and it estimates the mean of the per-sample exact norms.
    exact = jnp.mean(jnp.stack([exact_frob(cell, Zb[i], P) for i in range(3)]))
    keys = jax.random.split(key, 2000)
    est = jax.jit(jax.vmap(lambda k: jacobian_frobenius(fb, Zb, P, k, batch_axis=0)))(keys)
    assert abs(float(jnp.mean(est)) - float(exact)) < 3 * float(jnp.std(est)) / np.sqrt(2000)


def test_jit_vmap_grad_compose():
    key = jax.random.key(7)
    # grad w.r.t. args: unbiased for the gradient of the exact norm.
    keys = jax.random.split(key, 2000)
    grads = jax.jit(jax.vmap(lambda k: jax.grad(lambda p: jacobian_frobenius(cell, Z, p, k))(P)))(keys)
    exact = jax.grad(lambda p: exact_frob(cell, Z, p))(P)
    for name in ("W", "x"):
        mean, se = jnp.mean(grads[name], 0), jnp.std(grads[name], 0) / np.sqrt(2000)
        assert bool(jnp.all(jnp.abs(mean - exact[name]) < 4 * se + 1e-12)), name
    # vmap over parameters equals a loop.
    Ws = jnp.stack([P["W"], 0.5 * P["W"]])
    vm = jax.vmap(lambda W: jacobian_frobenius(cell, Z, {"W": W, "x": P["x"]}, key))(Ws)
    loop = [jacobian_frobenius(cell, Z, {"W": W, "x": P["x"]}, key) for W in Ws]
    np.testing.assert_allclose(vm, loop, rtol=1e-12)
    # legacy uint32 keys work too
    assert jnp.isfinite(jacobian_frobenius(cell, Z, P, jax.random.PRNGKey(0)))


class Cell(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(N, N, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, z, x):
        return jnp.tanh(0.5 * self.lin(z) + x)


def test_jacobian_penalty_nnx():
    model = Cell(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(8), (2, N))
    z = jax.random.normal(jax.random.key(9), (2, N))
    key = jax.random.key(10)
    pen = jacobian_penalty(model, z, x, key, num_probes=3)
    W, b = model.lin.kernel[...], model.lin.bias[...]
    f = lambda z, p: jnp.tanh(0.5 * (z @ p[0] + p[1]) + x)
    np.testing.assert_allclose(pen, jacobian_frobenius(f, z, (W, b), key, 3, batch_axis=0), rtol=1e-12)

    @nnx.jit
    def step(model, z):
        return nnx.value_and_grad(lambda m: jacobian_penalty(m, z, x, key))(model)

    val, grads = step(model, z)
    assert jnp.isfinite(val)
    assert float(jnp.abs(grads["lin"]["kernel"][...]).sum()) > 0
    # z is treated as a constant by default; with stop_gradient_z=False it gets a gradient.
    gz = jax.grad(lambda z: jacobian_penalty(model, z, x, key, stop_gradient_z=False))(z)
    assert float(jnp.abs(gz).sum()) > 0
    assert float(jnp.abs(jax.grad(lambda z: jacobian_penalty(model, z, x, key))(z)).sum()) == 0


def test_regularizer_shrinks_jacobian_in_training():
    # Minimising the penalty alone drives ||J||_F^2 down.
    p = dict(P)
    opt = optax.sgd(0.1)
    state = opt.init(p)

    @jax.jit
    def step(p, state, key):
        g = jax.grad(lambda p: jacobian_frobenius(cell, Z, p, key, num_probes=2))(p)
        upd, state = opt.update(g, state)
        return optax.apply_updates(p, upd), state

    before = exact_frob(cell, Z, p)
    for k in jax.random.split(jax.random.key(11), 30):
        p, state = step(p, state, k)
    assert float(exact_frob(cell, Z, p)) < 0.5 * float(before)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_probes=0), ValueError, "num_probes"),
        (dict(key=0), TypeError, "key"),
        (dict(batch_axis=1), ValueError, "batch_axis"),
        (dict(f=3), TypeError, "callable"),
        (dict(f=lambda z, p: z[:2]), ValueError, "shaped like"),
        (dict(z=jnp.arange(4)), TypeError, "floating"),
    ],
)
def test_jacobian_frobenius_validation(kwargs, exc, match):
    a = dict(f=cell, z=Z, args=P, key=jax.random.key(0))
    a.update(kwargs)
    with pytest.raises(exc, match=match):
        jacobian_frobenius(a.pop("f"), a.pop("z"), a.pop("args"), a.pop("key"), **a)


def test_jacobian_penalty_validation():
    with pytest.raises(TypeError, match="NNX module"):
        jacobian_penalty(cell, Z, P, jax.random.key(0))
    with pytest.raises(TypeError, match="unexpected keyword"):
        jacobian_penalty(Cell(nnx.Rngs(0)), Z, P, jax.random.key(0), probes=2)


# ---------------------------------------------------------------- fixed-point correction

SOLVER = deq.Anderson(rtol=0.0, atol=1e-10, max_steps=12)


def fcell(z, p):
    return jnp.tanh(z @ p["W"].T + p["x"])


def test_correction_iterates_and_stats():
    out = fixed_point_correction(fcell, jnp.zeros(N), P, solver=SOLVER, num_points=3)
    assert isinstance(out, Correction)
    its, w, sol = out
    assert len(its) == 3 and its[-1] is sol.value
    np.testing.assert_allclose(w, [0.64, 0.8, 1.0])
    res = [float(jnp.linalg.norm(fcell(z, P) - z)) for z in its]
    assert res[0] > res[1] > res[2] or bool(sol.stats.converged)
    assert sol.stats.residual_history.shape == (SOLVER.max_steps + 1,)
    assert int(sol.stats.num_steps) <= SOLVER.max_steps
    np.testing.assert_allclose(sol.stats.residual_norm, res[-1], rtol=1e-6)
    # Batched: one iterate per point, per-sample stats.
    Xb = jnp.stack([P["x"], -P["x"]])
    its_b, _, sol_b = fixed_point_correction(fcell, jnp.zeros((2, N)), {"W": P["W"], "x": Xb},
                                             solver=SOLVER, num_points=2, batch_axis=0)
    assert its_b[0].shape == (2, N) and sol_b.stats.num_steps.shape == (2,)
    assert sol_b.stats.residual_history.shape == (2, SOLVER.max_steps + 1)


def test_correction_gradient_flows_and_toy_fit_decreases():
    target = jnp.linspace(-0.5, 0.5, N)

    def loss(p):
        its, w, _ = fixed_point_correction(fcell, jnp.zeros(N), p, solver=SOLVER, num_points=3)
        return correction_loss(lambda z: jnp.sum((z - target) ** 2), its, w)

    vg = jax.jit(jax.value_and_grad(loss))
    l0, g = vg(P)
    assert all(bool(jnp.all(jnp.isfinite(v))) and float(jnp.abs(v).sum()) > 0 for v in jax.tree_util.tree_leaves(g))
    opt = optax.adam(0.05)
    p, state = P, opt.init(P)
    for _ in range(40):
        l, g = vg(p)
        upd, state = opt.update(g, state)
        p = optax.apply_updates(p, upd)
    assert float(vg(p)[0]) < 0.1 * float(l0)


def test_correction_loss_and_weights():
    its = [jnp.array(2.0), jnp.array(1.0), jnp.array(0.5)]
    np.testing.assert_allclose(correction_loss(lambda z: z**2, its), 0.64 * 4 + 0.8 * 1 + 0.25)
    np.testing.assert_allclose(correction_loss(lambda z: z**2, its, [1, 0, 0]), 4.0)
    np.testing.assert_allclose(correction_weights(2, 0.5), [0.5, 1.0])
    with pytest.raises(ValueError, match="weights"):
        correction_loss(lambda z: z, its, [1.0, 2.0])
    with pytest.raises(ValueError, match="scalar"):
        correction_loss(lambda z: jnp.ones(2), its)
    with pytest.raises(ValueError, match="gamma"):
        correction_weights(3, 1.5)


def test_correction_validation():
    with pytest.raises(ValueError, match="num_points"):
        fixed_point_correction(fcell, jnp.zeros(N), P, solver=deq.Anderson(max_steps=2), num_points=3)
    with pytest.raises(ValueError, match="weights"):
        fixed_point_correction(fcell, jnp.zeros(N), P, solver=SOLVER, weights=[1.0, 2.0])
    with pytest.raises(TypeError, match="backward"):
        fixed_point_correction(fcell, jnp.zeros(N), P, backward="phantom")
    with pytest.raises(TypeError, match="unexpected keyword"):
        fixed_point_correction(fcell, jnp.zeros(N), P, points=3)
