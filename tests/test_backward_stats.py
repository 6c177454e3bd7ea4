"""The backward pass reports itself: adjoint statistics through probes, in the core and the layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq


def tanh_half(z, a):
    return jnp.tanh(0.5 * z + a)


def test_probe_matches_a_separate_adjoint_solve():
    """The probe's figures are the adjoint solve's own: re-solve it by hand and compare."""
    a = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    adj = deq.Anderson(rtol=1e-6, atol=0.0, max_steps=50)
    ift = deq.IFT(solver=adj)

    def loss(a, probe):
        return jnp.sum(deq.fixed_point(tanh_half, jnp.zeros((4, 3)), a, batch_axis=0, backward=ift,
                                       backward_stats=probe).value ** 2)

    _, bs = jax.grad(loss, argnums=(0, 1))(a, deq.BackwardStats.probe(4))
    z = deq.fixed_point(tanh_half, jnp.zeros((4, 3)), a, batch_axis=0).value
    fn = lambda x, p: tanh_half(x, p)  # noqa: E731 - packed rows are the samples here
    _, out = ift.adjoint(fn, z, a, 2 * z, False)
    np.testing.assert_array_equal(np.asarray(bs.num_steps), np.asarray(out.num_steps, np.float32))
    np.testing.assert_allclose(np.asarray(bs.residual_norm), np.asarray(out.residual), rtol=1e-5, atol=1e-12)
    # and it is a real adjoint residual: ||J^T u + g - u|| <= rtol ||g|| per sample
    assert np.all(np.asarray(bs.residual_norm) <= 1e-6 * np.linalg.norm(2 * np.asarray(z), axis=1) * 1.0001)


def test_probe_under_vmap():
    def loss(a, probe):
        return deq.fixed_point(tanh_half, jnp.zeros(3), a, backward_stats=probe).value.sum()

    a = jnp.stack([jnp.ones(3), 2 * jnp.ones(3)])
    bs = jax.vmap(jax.grad(loss, argnums=1))(a, jax.vmap(lambda _: deq.BackwardStats.probe())(a))
    assert bs.num_steps.shape == (2,) and np.all(np.asarray(bs.converged) == 1.0)


def test_strategies_without_an_adjoint_leave_the_probe_at_zero():
    for b in (deq.PhantomGrad(), deq.JFB(), deq.Unrolled()):
        bs = jax.grad(lambda p: deq.fixed_point(tanh_half, jnp.zeros(3), jnp.ones(3), backward=b,
                                                backward_stats=p).value.sum())(deq.BackwardStats.probe())
        assert float(bs.num_steps) == 0.0 and float(bs.converged) == 0.0


class TanhCell(nnx.Module):
    def __init__(self, n, rngs):
        self.W = nnx.Linear(n, n, use_bias=False, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(0.5 * self.W(z) + x)


def test_nnx_layer_probe_and_enable_backward_stats():
    layer = deq.nn.DEQ(TanhCell(4, nnx.Rngs(0)))
    x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    # a per-call probe
    probe = deq.BackwardStats.probe(3)
    bs = jax.grad(lambda p: jnp.sum(layer(x, backward_stats=p) ** 2))(probe)
    assert bs.num_steps.shape == (3,) and np.all(np.asarray(bs.converged) == 1.0)
    # the layer's own probe, as deq.train.fit uses it, inside nnx.jit
    assert deq.nn.enable_backward_stats(layer) == 1
    wrt = nnx.DiffState(0, nnx.Any(nnx.Param, deq.nn.BackwardProbe))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=wrt))(layer)
    stats = deq.nn.backward_stats(grads)
    (s,) = stats.values()
    assert float(s.converged) == 1.0 and float(s.num_steps) >= 1.0 and float(s.residual_norm) > 0.0
    # parameter gradients are the same with and without the probe
    g_plain = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    np.testing.assert_allclose(np.asarray(grads["cell"]["W"]["kernel"]), np.asarray(g_plain["cell"]["W"]["kernel"]), rtol=1e-5)
    assert deq.nn.enable_backward_stats(layer, enable=False) == 1
    assert not hasattr(layer, "backward_probe")
    assert deq.nn.backward_stats(nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)) == {}


def test_linen_layer_probe():
    class Cell(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            return jnp.tanh(0.5 * nn.Dense(4, use_bias=False)(z) + nn.Dense(4)(x))

        def init_state(self, x):
            return jnp.zeros((x.shape[0], 4), x.dtype)

    m = deq.linen.DEQ(cell=Cell())
    x = jnp.ones((3, 2))
    params = m.init(jax.random.key(0), x)
    _, bs = jax.grad(lambda p, pr: m.apply(p, x, backward_stats=pr).sum(), argnums=(0, 1))(params, deq.BackwardStats.probe(3))
    assert np.all(np.asarray(bs.converged) == 1.0) and np.all(np.asarray(bs.num_steps) >= 1)


def test_nnx_layer_throw_raises_one_SolveError(capfd):
    layer = deq.nn.DEQ(TanhCell(4, nnx.Rngs(0)), solver=deq.FixedPointIteration(max_steps=1), throw=True)
    with pytest.raises(deq.SolveError, match="forward solve did not converge"):
        layer(jnp.ones((3, 4)))
    assert "Traceback" not in capfd.readouterr().err  # printed once, by pytest, not by JAX's logger
