"""Tests for `deq.linen.DEQ`, and agreement with `deq.nn.DEQ` (same params, same outputs/grads)."""

from __future__ import annotations

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq
import deq.linen
import deq.linen._layer
import deq.nn

F64 = jnp.float64
# Plain iteration: fast to compile, and converges quickly on these contractive cells.
TIGHT = deq.FixedPointIteration(rtol=1e-13, atol=1e-13, max_steps=200)
TIGHT_IFT = deq.IFT(solver=deq.FixedPointIteration(rtol=1e-13, atol=1e-13, max_steps=200))
SCALE = 0.3


@pytest.fixture(autouse=True)
def x64():
    """Run every test here in float64, whether or not x64 is enabled globally."""
    with jax.enable_x64(True):
        yield


class LinenCell(nn.Module):
    """z -> tanh(SCALE * W z + U x + b)."""

    hidden: int = 8

    @nn.compact
    def __call__(self, z, x):
        wz = nn.Dense(self.hidden, use_bias=False, dtype=F64, param_dtype=F64, name="W")(z)
        ux = nn.Dense(self.hidden, dtype=F64, param_dtype=F64, name="U")(x)
        return jnp.tanh(SCALE * wz + ux)

    def init_state(self, x):
        return jnp.zeros((x.shape[0], self.hidden), x.dtype)


class NNXCell(nnx.Module):
    """The same cell in NNX."""

    def __init__(self, dim, hidden, *, rngs):
        self.W = nnx.Linear(hidden, hidden, use_bias=False, dtype=F64, param_dtype=F64, rngs=rngs)
        self.U = nnx.Linear(dim, hidden, dtype=F64, param_dtype=F64, rngs=rngs)
        self.hidden = hidden

    def init_state(self, x):
        return jnp.zeros((x.shape[0], self.hidden), x.dtype)

    def __call__(self, z, x):
        return jnp.tanh(SCALE * self.W(z) + self.U(x))


def make_x(b=5, dim=3, seed=1):
    return jax.random.normal(jax.random.key(seed), (b, dim), F64)


def make_model(**kw):
    kw = {"solver": TIGHT, "backward": TIGHT_IFT, **kw}
    return deq.linen.DEQ(cell=LinenCell(), **kw)


def flat(tree):
    return jnp.concatenate([jnp.ravel(l) for l in jax.tree_util.tree_leaves(tree)])


def test_init_apply_shapes_stats_and_jit():
    model = make_model()
    x = make_x()
    params = model.init(jax.random.key(0), x)
    assert set(params) == {"params"} and set(params["params"]["cell"]) == {"W", "U"}
    z = model.apply(params, x)
    assert z.shape == (5, 8) and z.dtype == F64
    sol = jax.jit(lambda p, x: model.apply(p, x, return_solution=True))(params, x)
    assert sol.stats.num_steps.shape == (5,) and bool(jnp.all(sol.stats.converged))
    np.testing.assert_allclose(sol.value, z, atol=1e-12)
    cell_out = LinenCell().apply({"params": params["params"]["cell"]}, z, x)
    np.testing.assert_allclose(cell_out, z, atol=1e-10)
    info = deq.linen.solution_info(sol)
    assert float(info["converged_frac"]) == 1.0


def test_ift_gradients_match_long_unrolled_solve():
    x = make_x()
    target = jax.random.normal(jax.random.key(2), (5, 8), F64)
    ift = make_model()
    unrolled = make_model(
        solver=deq.FixedPointIteration(rtol=0.0, atol=1e-14, max_steps=300), backward=deq.Unrolled()
    )
    params = ift.init(jax.random.key(0), x)

    def loss(model):
        return lambda p: jnp.sum((model.apply(p, x) - target) ** 2)

    a = flat(jax.grad(loss(ift))(params))
    b = flat(jax.grad(loss(unrolled))(params))
    assert float(jnp.linalg.norm(a)) > 1e-3
    cos = float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
    assert cos > 0.9999
    np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)


def test_nnx_and_linen_agree():
    x = make_x()
    target = jax.random.normal(jax.random.key(2), (5, 8), F64)
    linen_model = make_model()
    params = linen_model.init(jax.random.key(0), x)
    p = params["params"]["cell"]

    layer = deq.nn.DEQ(NNXCell(3, 8, rngs=nnx.Rngs(42)), solver=TIGHT, backward=TIGHT_IFT)
    layer.cell.W.kernel[...] = p["W"]["kernel"]
    layer.cell.U.kernel[...] = p["U"]["kernel"]
    layer.cell.U.bias[...] = p["U"]["bias"]

    np.testing.assert_allclose(layer(x), linen_model.apply(params, x), rtol=1e-8, atol=1e-8)

    g_linen = jax.grad(lambda p: jnp.sum((linen_model.apply(p, x) - target) ** 2))(params)
    g_nnx = nnx.grad(lambda m: jnp.sum((m(x) - target) ** 2))(layer)
    gl = g_linen["params"]["cell"]
    gn = g_nnx["cell"]
    np.testing.assert_allclose(gn["W"]["kernel"][...], gl["W"]["kernel"], rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(gn["U"]["kernel"][...], gl["U"]["kernel"], rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(gn["U"]["bias"][...], gl["U"]["bias"], rtol=1e-8, atol=1e-8)


def test_eval_solver_and_per_call_override():
    model = make_model(eval_solver=deq.FixedPointIteration(max_steps=3))
    x = make_x()
    params = model.init(jax.random.key(0), x)
    steps = lambda **kw: int(model.apply(params, x, return_solution=True, **kw).stats.num_steps.max())
    assert steps() > 3
    assert steps(deterministic=True) <= 3
    assert steps(solver=deq.FixedPointIteration(max_steps=2)) == 2
    assert steps(deterministic=True, solver=deq.FixedPointIteration(max_steps=1)) == 1
    eval_model = model.clone(deterministic=True)
    assert int(eval_model.apply(params, x, return_solution=True).stats.num_steps.max()) <= 3
    # warm start
    z = model.apply(params, x)
    warm = model.apply(params, x + 1e-3, z, return_solution=True)
    cold = model.apply(params, x + 1e-3, return_solution=True)
    assert int(warm.stats.num_steps.sum()) < int(cold.stats.num_steps.sum())


def test_default_state_guess_and_hint():
    class NoInit(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            return jnp.tanh(SCALE * nn.Dense(8, dtype=F64, param_dtype=F64)(z) + nn.Dense(8, dtype=F64, param_dtype=F64)(x))

    x = make_x()
    with pytest.raises(ValueError, match=r"init_state\(x\)"):
        deq.linen.DEQ(cell=NoInit(), solver=TIGHT).init(jax.random.key(0), x)
    model = deq.linen.DEQ(cell=NoInit(), solver=TIGHT)
    z0 = jnp.zeros((5, 8), F64)
    params = model.init(jax.random.key(0), x, z0)
    assert model.apply(params, x, z0).shape == (5, 8)


def test_refuses_batchnorm_and_dropout_cells():
    class BNCell(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            return jnp.tanh(nn.BatchNorm(use_running_average=False)(nn.Dense(3)(z)) + x)

    x = jnp.ones((4, 3), jnp.float32)
    with pytest.raises(ValueError, match="batch_stats") as err:
        deq.linen.DEQ(cell=BNCell()).init(jax.random.key(0), x)
    assert "GroupNorm" in str(err.value) and "LayerNorm" in str(err.value)

    class DropCell(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            return jnp.tanh(nn.Dropout(0.5, deterministic=False)(nn.Dense(3)(z)) + x)

    model = deq.linen.DEQ(cell=DropCell())
    for rngs in (jax.random.key(0), {"params": jax.random.key(0), "dropout": jax.random.key(1)}):
        with pytest.raises(ValueError, match="dropout mask") as err:
            model.init(rngs, x)
        assert "outside the solve" in str(err.value)


def test_bad_config():
    x = make_x()
    with pytest.raises(TypeError, match="forward fixed-point solver"):
        deq.linen.DEQ(cell=LinenCell(), solver=deq.GMRES()).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="backward strategy"):
        deq.linen.DEQ(cell=LinenCell(), backward=deq.Anderson()).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="batch_axis"):
        deq.linen.DEQ(cell=LinenCell(), batch_axis=1).init(jax.random.key(0), x)


def test_docstring_examples():
    result = doctest.testmod(deq.linen._layer, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_eager_calls_reuse_the_compiled_solve():
    from deq import _fixed_point

    model = make_model()
    x = make_x()
    params = model.init(jax.random.key(0), x)
    model.apply(params, x)
    before = _fixed_point._impl_jit._cache_size()
    model.apply(params, x + 1.0)
    make_model().apply(params, x)  # a new module with the same configuration too
    assert _fixed_point._impl_jit._cache_size() == before
