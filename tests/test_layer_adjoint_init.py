"""`adjoint_init` through the layers: `deq.nn.DEQ` and `deq.linen.DEQ` pass it to
`deq.fixed_point`, so a training step can warm-start IFT's adjoint and get the new adjoint back
as the gradient with respect to it (float64, tight tolerances)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import deq
import deq.linen
import deq.nn

TIGHT = deq.Anderson(rtol=0.0, atol=1e-12, max_steps=200)


class Cell(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(0.3 * jax.random.normal(rngs.params(), (3, 3), jnp.float64))

    def __call__(self, z, x):
        return jnp.tanh(z @ self.w + x)


class LinenCell(nn.Module):
    @nn.compact
    def __call__(self, z, x):
        w = self.param("w", lambda k: 0.3 * jax.random.normal(k, (3, 3), jnp.float64))
        return jnp.tanh(z @ w + x)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _nnx_loss(backward):
    layer = deq.nn.DEQ(Cell(nnx.Rngs(0)), solver=TIGHT, backward=backward)
    graphdef, params = nnx.split(layer)
    x = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float64).reshape(4, 3)

    def loss(params, u):
        return jnp.sum(nnx.merge(graphdef, params)(x, adjoint_init=u) ** 2)

    return loss, params, x


def test_nnx_adjoint_init_gradient_is_the_solved_adjoint_and_params_gradient_unchanged():
    ift = deq.IFT(solver=deq.Anderson(rtol=0.0, atol=1e-13, max_steps=200))
    loss, params, x = _nnx_loss(ift)
    u0 = jnp.zeros((4, 3), jnp.float64)
    g_cold, u1 = jax.grad(loss, argnums=(0, 1))(params, u0)
    g_warm, u2 = jax.grad(loss, argnums=(0, 1))(params, u1)
    # the same gradient from a cold or a warm start; the adjoint returned is a fixed point of
    # u = J^T u + dL/dz*, so starting from it gives it back
    for a, b in zip(jax.tree_util.tree_leaves(g_cold), jax.tree_util.tree_leaves(g_warm)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(u2, u1, rtol=1e-10, atol=1e-12)
    assert float(jnp.max(jnp.abs(u1))) > 1e-3  # a real adjoint, not zeros
    # and it is the adjoint: the plain (no adjoint_init) gradient equals the warm one
    g_plain = jax.grad(lambda p: loss(p, None))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_warm)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_nnx_adjoint_init_with_another_backward_is_a_clear_error():
    loss, params, _ = _nnx_loss(deq.JFB())
    with pytest.raises(TypeError, match="adjoint_init"):
        loss(params, jnp.zeros((4, 3), jnp.float64))


def test_linen_adjoint_init_passes_through():
    layer = deq.linen.DEQ(LinenCell(), solver=TIGHT,
                          backward=deq.IFT(solver=deq.Anderson(rtol=0.0, atol=1e-13, max_steps=200)))
    x = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float64).reshape(4, 3)
    params = layer.init(jax.random.key(0), x)

    def loss(p, u):
        return jnp.sum(layer.apply(p, x, adjoint_init=u) ** 2)

    g1, u1 = jax.grad(loss, argnums=(0, 1))(params, jnp.zeros_like(x))
    g2, u2 = jax.grad(loss, argnums=(0, 1))(params, u1)
    np.testing.assert_allclose(u2, u1, rtol=1e-10, atol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="adjoint_init"):
        loss(params, jnp.zeros((4, 2), jnp.float64))


def test_streaming_refuses_a_warm_start():
    """Under `deq.nn.stream` (not differentiable) a model that hands its layer a warm start gets
    a TypeError naming it."""

    class Warm(nnx.Module):
        def __init__(self):
            self.deq = deq.nn.DEQ(Cell(nnx.Rngs(0)))

        def __call__(self, x):
            return self.deq(x, adjoint_init=jnp.zeros_like(x))

    x = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float64).reshape(4, 3)
    with pytest.raises(TypeError, match="streaming solves are not differentiable"):
        deq.nn.stream(Warm(), x, slots=2)
