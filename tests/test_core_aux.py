"""Cells with an auxiliary output: `fixed_point(f, ..., has_aux=True)` with `f -> (z, aux)`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq

TIGHT = deq.Anderson(rtol=1e-12, atol=1e-13, max_steps=200)


def cell(z, p):
    return jnp.tanh(z @ p["W"].T + p["x"])


def cell_aux(z, p):
    # a "regularization term" and an "attention map" depending on both z and the parameters
    return cell(z, p), {"energy": jnp.sum(z ** 2, axis=-1) * p["x"][..., 0], "map": jax.nn.softmax(z @ p["W"])}


def params(batch=None, n=3):
    k1, k2 = jax.random.split(jax.random.key(1))
    W = jax.random.normal(k1, (n, n))
    W = 0.8 * W / jnp.linalg.norm(W, 2)
    x = jax.random.normal(k2, (n,) if batch is None else (batch, n))
    return {"W": W, "x": x}


@pytest.mark.parametrize("batch_axis", [None, 0])
def test_aux_is_the_cell_output_at_the_returned_iterate(batch_axis):
    p = params(None if batch_axis is None else 4)
    z0 = jnp.zeros_like(p["x"])
    sol = deq.fixed_point(cell_aux, z0, p, solver=TIGHT, batch_axis=batch_axis, has_aux=True)
    plain = deq.fixed_point(cell, z0, p, solver=TIGHT, batch_axis=batch_axis)
    np.testing.assert_array_equal(sol.value, plain.value)
    np.testing.assert_array_equal(sol.stats.num_steps, plain.stats.num_steps)
    want = cell_aux(plain.value, p)[1]
    for a, b in zip(jax.tree_util.tree_leaves(sol.aux), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-14)
    assert plain.aux is None


@pytest.mark.parametrize("backward", [deq.IFT(), deq.Unrolled()], ids=["IFT", "Unrolled"])
def test_aux_gradient_matches_finite_differences(backward):
    p = params()
    z0 = jnp.zeros(3)

    def loss(x):
        sol = deq.fixed_point(cell_aux, z0, {"W": p["W"], "x": x}, solver=TIGHT, backward=backward, has_aux=True)
        return sol.aux["energy"] + jnp.sum(sol.aux["map"] * jnp.arange(3.0))

    g = jax.grad(loss)(p["x"])
    eps = 1e-6
    fd = np.array([(loss(p["x"].at[i].add(eps)) - loss(p["x"].at[i].add(-eps))) / (2 * eps) for i in range(3)])
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


def test_aux_under_jit_vmap_and_budget():
    p = params(4)
    z0 = jnp.zeros_like(p["x"])
    run = jax.jit(lambda p, k: deq.fixed_point(cell_aux, z0, p, batch_axis=0, has_aux=True, max_steps=k))
    sol = run(p, jnp.int32(2))
    np.testing.assert_array_equal(sol.stats.num_steps, 2)
    np.testing.assert_allclose(sol.aux["energy"], cell_aux(sol.value, p)[1]["energy"], rtol=1e-14)
    energies = jax.vmap(lambda x: deq.fixed_point(cell_aux, jnp.zeros(3), {"W": p["W"], "x": x},
                                                  solver=TIGHT, has_aux=True).aux["energy"])(p["x"])
    one = [deq.fixed_point(cell_aux, jnp.zeros(3), {"W": p["W"], "x": x}, solver=TIGHT, has_aux=True).aux["energy"]
           for x in p["x"]]
    np.testing.assert_allclose(energies, one, rtol=1e-12)


@pytest.mark.parametrize("f, text", [
    (cell, "must return a pair (z, aux), got PyTreeDef(*) with leaves float64[3]"),
    (lambda z, p: (cell(z, p), 1.0, 2.0), "got a tuple of length 3"),
    (lambda z, p: [cell(z, p), 1.0], "got a list of length 2"),
])
def test_has_aux_wrong_output_is_a_clear_error(f, text):
    with pytest.raises(TypeError) as e:
        deq.fixed_point(f, jnp.zeros(3), params(), has_aux=True)
    assert text in str(e.value) and "has_aux=False" in str(e.value)


def test_has_aux_must_be_a_bool():
    with pytest.raises(TypeError, match="`has_aux` must be a bool, got 1"):
        deq.fixed_point(cell, jnp.zeros(3), params(), has_aux=1)


def test_aux_state_part_mismatch_names_z0():
    bad = lambda z, p: (jnp.concatenate([cell(z, p), z]), 0.0)  # noqa: E731
    with pytest.raises(ValueError, match="must return a pytree shaped like `z0`"):
        deq.fixed_point(bad, jnp.zeros(3), params(), has_aux=True)


def test_nnx_and_linen_layers_with_aux():
    import flax.linen as nn
    from flax import nnx

    class Cell(nnx.Module):
        def __init__(self, rngs):
            self.W = nnx.Linear(3, 3, use_bias=False, rngs=rngs)

        def __call__(self, z, x):
            z_new = jnp.tanh(0.5 * self.W(z) + x)
            return z_new, jnp.sum(z_new ** 2, axis=-1)

    x = jax.random.normal(jax.random.key(2), (4, 3))
    layer = deq.nn.DEQ(Cell(nnx.Rngs(0)), solver=TIGHT, has_aux=True)
    z, aux = layer(x)
    np.testing.assert_allclose(aux, jnp.sum(z ** 2, axis=-1), rtol=1e-10)  # aux is at f(z*), z* to 1e-13
    sol = layer(x, return_solution=True)
    np.testing.assert_allclose(sol.aux, aux, rtol=1e-14)
    # differentiable: the aux is a function of the parameters through z*
    g = nnx.grad(lambda m: jnp.sum(m(x)[1]))(layer)
    assert float(jnp.abs(g.cell.W.kernel[...]).sum()) > 0

    class LCell(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            z_new = jnp.tanh(0.5 * nn.Dense(3, use_bias=False)(z) + x)
            return z_new, jnp.mean(z_new, axis=-1)

    lin = deq.linen.DEQ(LCell(), solver=TIGHT, has_aux=True)
    v = lin.init(jax.random.key(0), x)
    z, aux = lin.apply(v, x)
    np.testing.assert_allclose(aux, jnp.mean(z, axis=-1), rtol=1e-10)
    with pytest.raises(TypeError, match="`has_aux` must be a bool"):
        deq.nn.DEQ(Cell(nnx.Rngs(0)), has_aux="yes")
