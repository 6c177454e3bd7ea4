"""Tests for `deq.nn.DEQ`, `deq.nn.SolverConstant` and `deq.nn.solution_info` (Flax NNX)."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deq
import deq.nn
import deq.nn._layer

F64 = jnp.float64
# Plain iteration compiles much faster than Anderson and converges quickly on these
# contractive cells (Lipschitz constant about 0.6); the default Anderson is exercised by the
# docstring examples.
TIGHT = deq.FixedPointIteration(rtol=1e-13, atol=1e-13, max_steps=200)
TIGHT_IFT = deq.IFT(solver=deq.FixedPointIteration(rtol=1e-13, atol=1e-13, max_steps=200))


@pytest.fixture(autouse=True)
def x64():
    """Run every test here in float64, whether or not x64 is enabled globally."""
    with jax.enable_x64(True):
        yield


class Cell(nnx.Module):
    """z -> tanh(scale * W z + U x + b), contractive for small `scale`."""

    def __init__(self, dim, hidden, *, rngs, scale=0.3):
        self.W = nnx.Linear(hidden, hidden, use_bias=False, dtype=F64, param_dtype=F64, rngs=rngs)
        self.U = nnx.Linear(dim, hidden, dtype=F64, param_dtype=F64, rngs=rngs)
        self.hidden = hidden
        self.scale = scale

    def init_state(self, x):
        return jnp.zeros((x.shape[0], self.hidden), x.dtype)

    def __call__(self, z, x):
        return jnp.tanh(self.scale * self.W(z) + self.U(x))


class SameShapeCell(nnx.Module):
    """A cell without `init_state` whose state has the input's shape."""

    def __init__(self, dim, *, rngs):
        self.W = nnx.Linear(dim, dim, dtype=F64, param_dtype=F64, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(0.3 * self.W(z) + x)


def make_x(b=5, dim=3, seed=1):
    return jax.random.normal(jax.random.key(seed), (b, dim), F64)


def make_layer(**kw):
    kw = {"solver": TIGHT, "backward": TIGHT_IFT, **kw}
    return deq.nn.DEQ(Cell(3, 8, rngs=nnx.Rngs(0)), **kw)


def cell_grads(grads):
    """The cell's parameter gradients from an `nnx.grad` result, flattened to one vector."""
    leaves = jax.tree_util.tree_leaves(grads["cell"])
    return jnp.concatenate([jnp.ravel(l) for l in leaves])


# --- forward ----------------------------------------------------------------------------------


def test_shapes_and_stats_under_nnx_jit():
    layer = make_layer()
    x = make_x()
    z = nnx.jit(lambda m, x: m(x))(layer, x)
    assert z.shape == (5, 8) and z.dtype == F64
    sol = nnx.jit(lambda m, x: m(x, return_solution=True))(layer, x)
    assert isinstance(sol, deq.Solution)
    for leaf in (sol.stats.num_steps, sol.stats.residual_norm, sol.stats.converged, sol.stats.result):
        assert leaf.shape == (5,)
    assert bool(jnp.all(sol.stats.converged))
    np.testing.assert_allclose(sol.value, z, atol=1e-12)
    # it is a fixed point of the cell
    np.testing.assert_allclose(layer.cell(z, x), z, atol=1e-4)


def test_batch_axis_none_solves_one_problem():
    layer = make_layer(batch_axis=None)
    sol = layer(make_x(), return_solution=True)
    assert sol.value.shape == (5, 8) and sol.stats.num_steps.shape == ()


def test_default_state_same_shape_as_x_and_hint_when_wrong():
    x = make_x()
    layer = deq.nn.DEQ(SameShapeCell(3, rngs=nnx.Rngs(0)), solver=TIGHT)
    assert layer(x).shape == x.shape

    class NoInitState(nnx.Module):  # state (B, 8), input (B, 3), no init_state
        def __init__(self, rngs):
            self.inner = Cell(3, 8, rngs=rngs)

        def __call__(self, z, x):
            return self.inner(z, x)

    bad = deq.nn.DEQ(NoInitState(nnx.Rngs(0)), solver=TIGHT)
    with pytest.raises(ValueError, match=r"init_state\(x\)") as err:
        bad(x)
    assert "pass z0" in str(err.value)
    # giving z0 fixes it
    assert bad(x, jnp.zeros((5, 8), F64)).shape == (5, 8)
    # a wrong z0 names the mismatch
    with pytest.raises(ValueError, match="does not match the cell's state"):
        make_layer()(x, jnp.zeros((5, 7), F64))


def test_solution_info():
    sol = make_layer()(make_x(), return_solution=True)
    info = deq.nn.solution_info(sol)
    assert set(info) == {"forward_steps", "residual", "converged_frac"}
    assert float(info["forward_steps"]) == pytest.approx(float(np.mean(sol.stats.num_steps)))
    assert float(info["residual"]) == pytest.approx(float(np.mean(sol.stats.residual_norm)))
    assert float(info["converged_frac"]) == 1.0
    jitted = jax.jit(deq.nn.solution_info)(sol)
    assert all(v.shape == () for v in jitted.values())


# --- gradients --------------------------------------------------------------------------------


def test_ift_gradients_match_long_unrolled_solve():
    x = make_x()
    target = jax.random.normal(jax.random.key(2), (5, 8), F64)

    def loss(m):
        return jnp.sum((m(x) - target) ** 2)

    ift = make_layer()
    unrolled = make_layer(
        solver=deq.FixedPointIteration(rtol=0.0, atol=1e-14, max_steps=300), backward=deq.Unrolled()
    )
    l_ift, g_ift = nnx.value_and_grad(loss)(ift)
    l_unr, g_unr = nnx.value_and_grad(loss)(unrolled)
    a, b = cell_grads(g_ift), cell_grads(g_unr)
    assert float(jnp.linalg.norm(a)) > 1e-3  # gradients really reach the cell
    cos = float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
    assert cos > 0.9999
    np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)
    assert float(l_ift) == pytest.approx(float(l_unr), rel=1e-10)


def test_grad_through_model_containing_deq():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Linear(3, 3, dtype=F64, param_dtype=F64, rngs=rngs)
            self.deq = deq.nn.DEQ(Cell(3, 8, rngs=rngs), solver=TIGHT, backward=TIGHT_IFT)
            self.head = nnx.Linear(8, 1, dtype=F64, param_dtype=F64, rngs=rngs)

        def __call__(self, x):
            sol = self.deq(self.encoder(x), return_solution=True)
            return self.head(sol.value), deq.nn.solution_info(sol)

    model = Model(nnx.Rngs(0))
    x = make_x()

    def loss(m):
        y, info = m(x)
        return jnp.mean(y**2), info

    (_, info), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    # gradients reach the cell's parameters, and the encoder upstream of the DEQ through x
    for leaf in jax.tree_util.tree_leaves((grads["deq"]["cell"], grads["encoder"])):
        assert float(jnp.abs(leaf).max()) > 0
    assert float(info["converged_frac"]) == 1.0
    # same gradient from a finite difference along a random direction of the cell's params
    gdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    direction = treedef.unflatten([jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])

    def loss_at(t):
        moved = jax.tree_util.tree_map(lambda p, d: p + t * d, params, direction)
        return loss(nnx.merge(gdef, moved, rest))[0]

    eps = 1e-5
    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction)))
    assert float(dot) == pytest.approx(float(fd), rel=1e-4)


def test_plain_jax_jit_on_split_state():
    layer = make_layer()
    x = make_x()
    graphdef, state = nnx.split(layer)
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_allclose(out, layer(x), atol=1e-10)

    def loss(s, x):
        return jnp.sum(nnx.merge(graphdef, s)(x) ** 2)

    params = nnx.state(layer, nnx.Param)
    g = jax.jit(jax.grad(loss))(params, x)
    ref = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    np.testing.assert_allclose(cell_grads(g), cell_grads(ref), rtol=1e-8, atol=1e-10)


def test_training_step_decreases_loss():
    x = make_x(b=32)
    w_true = jax.random.normal(jax.random.key(5), (3, 1), F64)
    y = jnp.sin(x @ w_true)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.deq = deq.nn.DEQ(Cell(3, 8, rngs=rngs), solver=TIGHT, backward=TIGHT_IFT)
            self.head = nnx.Linear(8, 1, dtype=F64, param_dtype=F64, rngs=rngs)

        def __call__(self, x):
            return self.head(self.deq(x))

    model = Model(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, x, y)) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]


# --- solver selection and warm start ----------------------------------------------------------


def test_eval_solver_used_in_eval_mode():
    layer = make_layer(solver=TIGHT, eval_solver=deq.FixedPointIteration(max_steps=3))
    x = make_x()
    run = nnx.jit(lambda m, x: m(x, return_solution=True).stats.num_steps)
    assert int(run(layer, x).max()) > 3
    layer.eval()
    assert layer.deterministic
    assert int(run(layer, x).max()) <= 3
    layer.train()
    assert int(run(layer, x).max()) > 3

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.drop = nnx.Dropout(0.1, rngs=rngs)
            self.deq = make_layer(solver=TIGHT, eval_solver=deq.FixedPointIteration(max_steps=2))

        def __call__(self, x):
            return self.deq(x, return_solution=True)

    model = Model(nnx.Rngs(0))
    model.eval()  # flips the DEQ together with the model's other modules
    assert model.deq.deterministic and model.drop.deterministic
    assert int(model(x).stats.num_steps.max()) <= 2
    model.train()
    viewed = nnx.view(model, deterministic=True)
    assert viewed.deq.deterministic and not model.deq.deterministic


def test_per_call_solver_override():
    layer = make_layer(eval_solver=deq.FixedPointIteration(max_steps=3))
    x = make_x()
    sol = layer(x, return_solution=True, solver=deq.FixedPointIteration(max_steps=2))
    assert int(sol.stats.num_steps.max()) == 2
    layer.eval()  # the override beats eval_solver too
    sol = layer(x, return_solution=True, solver=deq.FixedPointIteration(max_steps=1))
    assert int(sol.stats.num_steps.max()) == 1
    with pytest.raises(TypeError, match="forward fixed-point solver"):
        layer(x, solver=deq.IFT())


def test_warm_start_takes_fewer_steps():
    layer = make_layer()
    x = make_x()
    cold = layer(x, return_solution=True)
    x2 = x + 1e-3 * jax.random.normal(jax.random.key(9), x.shape, F64)
    cold2 = layer(x2, return_solution=True)
    warm2 = layer(x2, cold.value, return_solution=True)
    assert int(warm2.stats.num_steps.sum()) < int(cold2.stats.num_steps.sum())
    np.testing.assert_allclose(warm2.value, cold2.value, atol=1e-10)


# --- refusals and variable handling -----------------------------------------------------------


def test_refuses_batchnorm_cell():
    class BNCell(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 3, rngs=rngs)
            self.bn = nnx.BatchNorm(3, rngs=rngs)

        def __call__(self, z, x):
            return jnp.tanh(self.bn(self.lin(z)) + x)

    with pytest.raises(ValueError, match="BatchStat") as err:
        deq.nn.DEQ(BNCell(nnx.Rngs(0)))
    assert "GroupNorm" in str(err.value) and "LayerNorm" in str(err.value)


def test_refuses_dropout_with_rngs_cell():
    class DropCell(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 3, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, z, x):
            return jnp.tanh(self.drop(self.lin(z)) + x)

    with pytest.raises(ValueError, match="Rng") as err:
        deq.nn.DEQ(DropCell(nnx.Rngs(0)))
    msg = str(err.value)
    assert "dropout mask" in msg and "outside the solve" in msg and "pass it in x" in msg


def test_refuses_state_added_after_construction_and_writes_during_solve():
    layer = deq.nn.DEQ(SameShapeCell(3, rngs=nnx.Rngs(0)))
    layer.cell.count = nnx.BatchStat(jnp.zeros(()))
    with pytest.raises(ValueError, match="GroupNorm"):
        layer(make_x())

    class Writer(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 3, dtype=F64, param_dtype=F64, rngs=rngs)
            self.u = deq.nn.SolverConstant(jnp.ones(3, F64))

        def __call__(self, z, x):
            self.u[...] = self.u[...] * 2.0
            return jnp.tanh(0.3 * self.lin(z) + x)

    with pytest.raises(ValueError, match="before_solve") as err:
        deq.nn.DEQ(Writer(nnx.Rngs(0)))(make_x())
    assert "u" in str(err.value)


def test_solver_constant_read_in_solve_and_updated_in_before_solve():
    class Scaled(nnx.Module):
        """Reads a SolverConstant inside the solve; updates it once per forward pass."""

        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 3, dtype=F64, param_dtype=F64, rngs=rngs)
            self.gain = deq.nn.SolverConstant(jnp.asarray(0.1, F64))
            self.calls = deq.nn.SolverConstant(jnp.asarray(0, jnp.int32))

        def before_solve(self, x):
            self.calls[...] = self.calls[...] + 1
            self.gain[...] = jnp.minimum(self.gain[...] * 2.0, 0.4)

        def __call__(self, z, x):
            return jnp.tanh(self.gain[...] * self.lin(z) + x)

    layer = deq.nn.DEQ(Scaled(nnx.Rngs(0)), solver=TIGHT, backward=TIGHT_IFT)
    x = make_x()
    fwd = nnx.jit(lambda m, x: m(x))
    z1 = fwd(layer, x)
    assert int(layer.cell.calls[...]) == 1 and float(layer.cell.gain[...]) == pytest.approx(0.2)
    z2 = fwd(layer, x)
    assert int(layer.cell.calls[...]) == 2 and float(layer.cell.gain[...]) == pytest.approx(0.4)
    assert not np.allclose(z1, z2)
    # gradients still reach the Param (and no gradient is asked of the constants)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert float(jnp.abs(grads["cell"]["lin"]["kernel"][...]).max()) > 0
    assert "gain" not in grads["cell"]


def test_constructor_validation():
    cell = Cell(3, 8, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="nnx.Module"):
        deq.nn.DEQ(lambda z, x: z)
    with pytest.raises(TypeError, match="forward fixed-point solver"):
        deq.nn.DEQ(cell, solver=deq.GMRES())
    with pytest.raises(TypeError, match="backward strategy"):
        deq.nn.DEQ(cell, backward=deq.Anderson())
    with pytest.raises(ValueError, match="batch_axis"):
        deq.nn.DEQ(cell, batch_axis=1)
    with pytest.raises(TypeError, match="eval_solver"):
        deq.nn.DEQ(cell, eval_solvr=deq.Anderson())  # typo gets a suggestion


def test_eager_calls_reuse_the_compiled_solve():
    from deq import _fixed_point

    layer = make_layer()
    x = make_x()
    layer(x)
    before = _fixed_point._impl_jit._cache_size()
    layer(x + 1.0)
    make_layer()(x)  # a new layer with the same structure too
    assert _fixed_point._impl_jit._cache_size() == before


def test_docstring_examples():
    result = doctest.testmod(deq.nn._layer, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
