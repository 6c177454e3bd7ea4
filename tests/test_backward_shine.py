"""SHINE (Broyden's inverse estimate as the adjoint) and IFT's warm-started adjoint (`adjoint_init`).

Float64 numerics against known answers: on a scalar affine map per sample Broyden's secant
estimate is the exact inverse, so SHINE equals IFT; on a 6-dimensional one it is not, and
`refine=k` closes the gap as `k` grows. The warm start's new adjoint is checked against the
analytic `(I - A^T)^{-1} g`, its gradient against IFT's, and its step count against a cold start.
"""

from __future__ import annotations

import doctest
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq
import deq.backward.shine
from problems import batched_linear_map, linear_map, make_linear

N = 6
BROYDEN = deq.Broyden(rtol=0.0, atol=1e-12, max_steps=100, history_size=30)


@pytest.fixture(autouse=True, scope="module")
def x64():
    with jax.enable_x64(True):
        yield


def _args(lin):
    return jax.tree_util.tree_map(jnp.asarray, lin.args)


def _loss(backward, solver=BROYDEN, c=None):
    c = np.random.default_rng(1).normal(size=N) if c is None else c

    def loss(a):
        return deq.fixed_point(linear_map, jnp.zeros(N), a, solver=solver, backward=backward).value @ c

    return loss


def _rel(g, ref):
    return max(float(jnp.max(jnp.abs(g[k] - ref[k])) / jnp.max(jnp.abs(ref[k]))) for k in ref)


def test_scalar_affine_estimate_is_exact_per_sample():
    """batch_axis=0, one state entry per sample: H is the exact 1/(a_i - 1), so SHINE == IFT == analytic."""
    slopes = jnp.asarray([0.2, -0.5, 0.9, 0.6])

    def loss(p, backward):
        f = lambda z, p: p["a"] * z + p["b"]  # noqa: E731
        sol = deq.fixed_point(f, jnp.zeros((4, 1)), p, batch_axis=0, solver=BROYDEN, backward=backward)
        return jnp.sum(sol.value[:, 0] ** 2)

    p = {"a": slopes[:, None], "b": jnp.ones((4, 1))}
    g_shine = jax.grad(loss)(p, deq.SHINE())
    g_ift = jax.grad(loss)(p, deq.IFT())
    z = 1.0 / (1.0 - slopes)  # z* = b / (1 - a); dL/db = 2 z* / (1 - a)
    np.testing.assert_allclose(g_shine["b"][:, 0], 2 * z / (1 - slopes), rtol=1e-12)
    assert _rel(g_shine, g_ift) < 1e-12


def test_refine_shrinks_the_error_to_ift():
    """6-d affine map: the estimate alone is a few % off IFT; refine=k converges to it."""
    args = _args(make_linear(0, N, 0.5))
    g_ift = jax.grad(_loss(deq.IFT()))(args)
    errs = {k: _rel(jax.grad(_loss(deq.SHINE(refine=k)))(args), g_ift) for k in (0, 2, 16)}
    assert 1e-3 < errs[0] < 0.5  # an approximation, not the exact gradient ...
    assert errs[2] < 0.2 * errs[0]  # ... improved by refinement ...
    assert errs[16] < 1e-10  # ... to IFT's gradient (Anderson is exact on a 6-d linear problem)
    # SHINE's estimate beats JFB's identity (the same cost) on this problem
    assert errs[0] < _rel(jax.grad(_loss(deq.JFB()))(args), g_ift)


def test_estimate_is_minus_h_transpose_g():
    """The adjoint SHINE uses is `-H^T g` with H Broyden's dense inverse estimate `-I + U^T V`."""
    args = _args(make_linear(2, N, 0.5))
    c = np.random.default_rng(3).normal(size=N)
    F = lambda x: batched_linear_map(x, args)  # noqa: E731
    # A loose stop: the last rank-one updates of a solve at 1e-12 divide by tiny steps, where the
    # compiled and this eager run round differently.
    solver = deq.Broyden(rtol=0.0, atol=1e-6, max_steps=100, history_size=30)
    out, (U, V, _) = deq._loop.run(solver, F, jnp.zeros((1, N)), return_state=True)
    H = -np.eye(N) + np.asarray(U[0]).T @ np.asarray(V[0])
    u = -H.T @ c
    want = {"A": np.outer(u, np.asarray(out.x[0])), "b": u}  # (df/dA)^T u, (df/db)^T u
    got = jax.grad(_loss(deq.SHINE(), solver=solver, c=c))(args)
    np.testing.assert_allclose(got["b"], want["b"], rtol=1e-8)
    np.testing.assert_allclose(got["A"], want["A"], rtol=1e-8, atol=1e-12)


def test_jit_vmap_grad_and_per_sample_batch():
    lin = make_linear(4, N, 0.5, batch=3)
    A, b = jnp.asarray(lin.A), jnp.asarray(lin.b)

    def one(b_i, backward):
        sol = deq.fixed_point(linear_map, jnp.zeros(N), {"A": A, "b": b_i}, solver=BROYDEN, backward=backward)
        return jnp.sum(jnp.sin(sol.value))

    for bw in (deq.SHINE(), deq.SHINE(refine=3)):
        composed = jax.jit(jax.vmap(jax.grad(one), in_axes=(0, None)), static_argnums=1)(b, bw)
        looped = jnp.stack([jax.grad(one)(b[i], bw) for i in range(3)])
        # Broyden's last updates at atol 1e-12 divide by tiny steps: equivalent programs agree to ~1e-6
        np.testing.assert_allclose(composed, looped, rtol=1e-4)

        def batched(b_all):
            sol = deq.fixed_point(batched_linear_map, jnp.zeros((3, N)), {"A": A, "b": b_all}, batch_axis=0,
                                  solver=BROYDEN, backward=bw)
            return jnp.sum(jnp.sin(sol.value))

        np.testing.assert_allclose(jax.grad(batched)(b), looped, rtol=1e-4)


def test_refine_reports_its_steps_to_a_probe():
    args = _args(make_linear(0, N, 0.5, batch=2))

    def loss(a, probe, backward):
        return deq.fixed_point(batched_linear_map, jnp.zeros((2, N)), a, batch_axis=0, solver=BROYDEN,
                               backward=backward, backward_stats=probe).value.sum()

    _, st = jax.grad(loss, argnums=(0, 1))(args, deq.BackwardStats.probe(2), deq.SHINE(refine=3))
    assert st.num_steps.tolist() == [3.0, 3.0]
    _, st0 = jax.grad(loss, argnums=(0, 1))(args, deq.BackwardStats.probe(2), deq.SHINE())
    assert st0.num_steps.tolist() == [0.0, 0.0]


def test_shine_errors():
    args = _args(make_linear(0, N, 0.5))
    with pytest.raises(ValueError, match=r"solver=deq.Broyden\(\.\.\.\)"):
        jax.grad(_loss(deq.SHINE(), solver=deq.Anderson()))(args)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="`refine` must be an integer >= 0"):
            deq.SHINE(refine=bad)
    with pytest.raises(TypeError, match="unexpected keyword argument `refin`"):
        deq.SHINE(refin=2)


# ----------------------------------------------------------------------------- warm start


def _warm_loss(a, u, probe, solver=deq.Anderson(rtol=0.0, atol=1e-12, max_steps=100)):
    backward = deq.IFT(solver=deq.Anderson(rtol=1e-10, atol=0.0, max_steps=200))
    sol = deq.fixed_point(batched_linear_map, jnp.zeros((2, N)), a, batch_axis=0, solver=solver,
                          backward=backward, adjoint_init=u, backward_stats=probe)
    return jnp.sum(sol.value ** 2)


def test_warm_start_returns_the_new_adjoint_and_ifts_gradient():
    lin = make_linear(5, N, 0.8, batch=2)
    args = _args(lin)
    step = jax.jit(jax.grad(_warm_loss, argnums=(0, 1, 2)))
    g_cold, u, st_cold = step(args, jnp.zeros((2, N)), deq.BackwardStats.probe(2))
    # the "gradient" w.r.t. adjoint_init is the adjoint (I - A^T)^{-1} dL/dz*
    g = 2 * lin.z_star
    u_exact = np.linalg.solve(np.eye(N) - lin.A.T, g.T).T
    np.testing.assert_allclose(u, u_exact, rtol=1e-8)
    # IFT's gradient, from any start
    g_ift = jax.grad(lambda a: _warm_loss(a, None, None))(args)
    assert _rel(g_cold, g_ift) < 1e-8
    # warm-started at the solved adjoint: fewer adjoint steps, the same gradient
    g_warm, u2, st_warm = step(args, u, deq.BackwardStats.probe(2))
    assert _rel(g_warm, g_ift) < 1e-8
    assert np.all(st_warm.num_steps <= 1) and np.all(st_cold.num_steps >= 5)
    # from a nearby adjoint (the parameters moved a little): still fewer steps
    moved = jax.tree_util.tree_map(lambda x: x * 1.01, args)
    g_near, _, st_near = step(moved, u, deq.BackwardStats.probe(2))
    _, _, st_far = step(moved, jnp.zeros((2, N)), deq.BackwardStats.probe(2))
    assert np.all(st_near.num_steps < st_far.num_steps)
    assert _rel(g_near, jax.grad(lambda a: _warm_loss(a, None, None))(moved)) < 1e-8


def test_warm_start_pytree_state_vmap_and_training_loop():
    """A dict state: the adjoint comes back as a dict; a jitted step threads it through Adam-like updates."""
    f = lambda z, p: {"a": jnp.tanh(p["w"] * z["a"] + p["x"]), "b": 0.5 * z["b"] + z["a"][:2]}  # noqa: E731
    z0 = {"a": jnp.zeros(3), "b": jnp.zeros(2)}

    def loss(p, u):
        sol = deq.fixed_point(f, z0, p, adjoint_init=u)
        return jnp.sum(sol.value["a"]) + jnp.sum(sol.value["b"] ** 2)

    @jax.jit
    def train_step(p, u):
        g, u_new = jax.grad(loss, argnums=(0, 1))(p, u)
        return jax.tree_util.tree_map(lambda w, d: w - 0.1 * d, p, g), u_new, g

    p = {"w": jnp.asarray(0.5), "x": jnp.asarray([0.1, -0.2, 0.3])}
    u = jax.tree_util.tree_map(jnp.zeros_like, z0)
    for _ in range(3):
        p_next, u, g = train_step(p, u)
        g_ref = jax.grad(loss)(p, None)  # cold IFT
        assert _rel(g, g_ref) < 1e-4  # both at the default forward and adjoint tolerances (rtol 1e-5)
        p = p_next
    assert set(u) == {"a", "b"} and u["a"].shape == (3,)
    # vmap over a batch of parameters and warm starts
    ps = jax.tree_util.tree_map(lambda l: jnp.stack([l, 0.9 * l]), p)
    us = jax.tree_util.tree_map(lambda l: jnp.stack([l, l]), u)
    gs, _ = jax.vmap(jax.grad(loss, argnums=(0, 1)))(ps, us)
    g0, _ = jax.grad(loss, argnums=(0, 1))(p, u)
    np.testing.assert_allclose(gs["x"][0], g0["x"], rtol=1e-8)


def test_warm_start_errors():
    args = _args(make_linear(0, N, 0.5))
    with pytest.raises(TypeError, match="adjoint_init` warm-starts the adjoint solve of deq.IFT"):
        deq.fixed_point(linear_map, jnp.zeros(N), args, backward=deq.JFB(), adjoint_init=jnp.zeros(N))
    with pytest.raises(ValueError, match=r"`adjoint_init` must be a pytree shaped like `z0`.*float64\[5\]"):
        deq.fixed_point(linear_map, jnp.zeros(N), args, adjoint_init=jnp.zeros(5))
    with pytest.raises(ValueError, match="shaped like `z0`"):
        deq.fixed_point(linear_map, jnp.zeros(N), args, adjoint_init=jnp.zeros(N, jnp.float32))


def test_docstring_examples_run():
    with warnings.catch_warnings():
        warnings.simplefilter("error", deq.NonConvergenceWarning)
        result = doctest.testmod(deq.backward.shine, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
