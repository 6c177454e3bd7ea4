"""The training practice of the DEQ papers: variational dropout in a cell, apply/reset/remove
norm on an existing cell, Jacobian regularization on a schedule, correction at chosen steps.

References are independent of the code under test: closed-form fixed points, manual loops,
finite differences, unrolled autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deq
from deq.nn import VariationalDropout, resample_dropout
from deq.nn.normalization import NormalizedLayer, apply_norm, remove_norm, reset_norm
from deq.regularize import JacobianSchedule, fixed_point_correction


@pytest.fixture(scope="module", autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


def _fd(fn, x, eps=1e-6, seed=0):
    """Central finite difference of a scalar `fn` at array `x` along a random direction `v`:
    returns `(v, (fn(x + eps v) - fn(x - eps v)) / (2 eps))`, to compare with `<grad, v>`."""
    x = np.asarray(x, np.float64)
    v = np.random.default_rng(seed).normal(size=x.shape)
    return v, (fn(x + eps * v) - fn(x - eps * v)) / (2 * eps)


# ----------------------------------------------------------------------------- variational dropout


class _LinearDropCell(nnx.Module):
    """z -> drop(a z + x), a = 0.3: with a fixed mask m the fixed point is m x / (1 - a m), per entry."""

    def __init__(self, rate, rngs):
        self.a = nnx.Param(jnp.asarray(0.3, jnp.float64))
        self.drop = VariationalDropout(rate, rngs=rngs)

    def __call__(self, z, x):
        return self.drop(self.a[...] * z + x)


def _layer(rate=0.5, seed=0):
    solver = deq.FixedPointIteration(rtol=1e-12, atol=1e-12, max_steps=200)
    return deq.nn.DEQ(_LinearDropCell(rate, nnx.Rngs(dropout=seed)), solver=solver)


def test_dropout_mask_is_constant_within_a_solve_and_new_for_each_forward_pass():
    layer = _layer()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 8)))
    sol = layer(x, return_solution=True)
    m = layer.cell.drop.mask(x.shape, x.dtype)  # the mask this solve used (key not moved since)
    assert bool(sol.stats.converged.all())
    # a mask redrawn at any step would not give this closed form
    np.testing.assert_allclose(sol.value, m * x / (1 - 0.3 * m), rtol=1e-10)
    assert set(np.unique(np.asarray(m)).tolist()) == {0.0, 2.0}
    second = layer(x)
    m2 = layer.cell.drop.mask(x.shape, x.dtype)
    assert not np.array_equal(m, m2)
    np.testing.assert_allclose(second, m2 * x / (1 - 0.3 * m2), rtol=1e-10)
    layer.eval()  # identity, key frozen
    key = layer.cell.drop.key[...]
    np.testing.assert_allclose(layer(x), x / 0.7, rtol=1e-10)
    assert bool((jax.random.key_data(layer.cell.drop.key[...]) == jax.random.key_data(key)).all())


def test_dropout_broadcast_axes_share_the_mask():
    drop = VariationalDropout(0.3, rngs=nnx.Rngs(0), broadcast_axes=(1,))
    m = drop.mask((4, 5, 6))
    assert m.shape == (4, 1, 6)
    assert VariationalDropout(0.0, rngs=nnx.Rngs(0))(jnp.ones(3)).tolist() == [1.0, 1.0, 1.0]
    # the keep rate, over many entries
    frac = float(jnp.mean(VariationalDropout(0.3, rngs=nnx.Rngs(1)).mask((200, 200)) > 0))
    assert abs(frac - 0.7) < 0.02


def test_dropout_deq_gradient_matches_finite_differences():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)))
    layer = _layer(rate=0.3, seed=2)
    graphdef, state = nnx.split(layer)

    def fresh():  # a copy of the same state (same key: the same next mask) for every evaluation
        return nnx.merge(graphdef, nnx.to_pure_dict(state))

    def loss_at(a):
        m = fresh()
        m.cell.a[...] = jnp.asarray(a)
        return float(jnp.sum(jnp.sin(m(x))))

    m = fresh()
    g = nnx.grad(lambda mod: jnp.sum(jnp.sin(mod(x))))(m)
    v, fd = _fd(loss_at, 0.3)
    np.testing.assert_allclose(np.sum(g["cell"]["a"][...] * v), fd, rtol=1e-6)


def test_resample_dropout_counts_and_errors():
    cell = _LinearDropCell(0.5, nnx.Rngs(0))
    assert resample_dropout(cell) == 1
    with pytest.raises(TypeError, match="must be an nnx.Module"):
        resample_dropout(3)
    with pytest.raises(ValueError, match="`rate` must be a number in \\[0, 1\\)"):
        VariationalDropout(1.0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="`rngs` must be an nnx.Rngs"):
        VariationalDropout(0.1, rngs=0)
    with pytest.raises(TypeError, match="broadcast_axes"):
        VariationalDropout(0.1, rngs=nnx.Rngs(0), broadcast_axes=("time",))
    with pytest.raises(ValueError, match="names axis 3"):
        VariationalDropout(0.1, rngs=nnx.Rngs(0), broadcast_axes=(3,))(jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="floating point"):
        VariationalDropout(0.1, rngs=nnx.Rngs(0))(jnp.ones((2, 3), jnp.int32))


def test_nnx_dropout_in_a_cell_is_refused_pointing_to_variational_dropout():
    class Bad(nnx.Module):
        def __init__(self, rngs):
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, z, x):
            return self.drop(0.5 * z + x)

    with pytest.raises(ValueError, match="deq.nn.VariationalDropout"):
        deq.nn.DEQ(Bad(nnx.Rngs(0)))


# ----------------------------------------------------------------------------- apply / reset / remove norm


class _Cell(nnx.Module):
    def __init__(self, rngs):
        f64 = {"rngs": rngs, "param_dtype": jnp.float64}
        self.lin = nnx.Linear(4, 4, **f64)
        self.conv = nnx.Conv(4, 4, (3,), **f64)
        self.blocks = nnx.List([nnx.Linear(4, 4, **f64)])
        self.head = nnx.Linear(4, 4, **f64)

    def __call__(self, z, x):
        h = 0.3 * self.lin(z) + 0.3 * self.conv(z) + 0.3 * self.blocks[0](z)
        return jnp.tanh(h + self.head(x))


def test_norm_round_trip_weight_and_spectral():
    rng = np.random.default_rng(0)
    z, x = jnp.asarray(rng.normal(size=(2, 5, 4))), jnp.asarray(rng.normal(size=(2, 5, 4)))
    cell = _Cell(nnx.Rngs(0))
    before = cell(z, x)
    assert apply_norm(cell, "weight", exclude=("head",)) == 3
    assert isinstance(cell.blocks[0], NormalizedLayer) and isinstance(cell.head, nnx.Linear)
    np.testing.assert_allclose(cell(z, x), before, rtol=1e-10)  # g = ||V||: unchanged at first
    cell.lin.g[...] = 2 * cell.lin.g[...]  # W = g V / ||V|| per output column, independently
    V = np.asarray(cell.lin.layer.kernel[...])
    np.testing.assert_allclose(cell.lin.kernel, 2 * V, rtol=1e-10)
    changed = cell(z, x)
    assert apply_norm(cell, "weight") == 1  # only the head was left
    assert remove_norm(cell) == 4 and type(cell.lin) is nnx.Linear
    np.testing.assert_allclose(cell(z, x), changed, rtol=1e-10)
    assert not [p for p, _ in nnx.to_flat_state(nnx.state(cell)) if "g" in p or "u" in p]

    assert apply_norm(cell, "spectral", coeff=0.7, init_power_iterations=100) == 4
    for layer in (cell.lin, cell.conv, cell.blocks[0]):
        mat = np.asarray(layer.kernel).reshape(-1, 4)
        assert abs(np.linalg.norm(mat, 2) - 0.7) < 1e-6  # independent SVD
    normed = cell(z, x)
    cell.lin.layer.kernel[...] = 3 * cell.lin.layer.kernel[...]
    np.testing.assert_allclose(cell(z, x), normed, rtol=1e-8)  # scale-free in V
    assert reset_norm(cell, 5) == 4
    assert remove_norm(cell) == 4
    np.testing.assert_allclose(cell(z, x), normed, rtol=1e-6)


def test_normalized_cell_in_a_deq_and_its_gradient():
    cell = _Cell(nnx.Rngs(1))
    apply_norm(cell, "spectral", coeff=0.9)
    tight = deq.FixedPointIteration(rtol=1e-11, atol=1e-12, max_steps=300)
    layer = deq.nn.DEQ(cell, solver=tight, backward=deq.IFT(solver=tight))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 4)))
    assert bool(layer(x, return_solution=True).stats.converged.all())
    graphdef, state = nnx.split(layer)

    def loss(m):
        return jnp.sum(jnp.sin(m(x)))

    grads = nnx.grad(loss)(nnx.merge(graphdef, nnx.to_pure_dict(state)))
    V0 = np.asarray(state["cell"]["blocks"][0]["layer"]["kernel"][...])

    def loss_at(V):
        m = nnx.merge(graphdef, nnx.to_pure_dict(state))
        m.cell.blocks[0].layer.kernel[...] = jnp.asarray(V)
        return float(loss(m))

    v, fd = _fd(loss_at, V0)
    np.testing.assert_allclose(np.sum(grads["cell"]["blocks"][0]["layer"]["kernel"][...] * v), fd, rtol=1e-6)


def test_weight_norm_gradient_in_g_matches_finite_differences():
    layer = NormalizedLayer(nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=jnp.float64), norm="weight",
                            rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 3)))
    graphdef, state = nnx.split(layer)

    def loss_at(g):
        m = nnx.merge(graphdef, nnx.to_pure_dict(state))
        m.g[...] = jnp.asarray(g)
        return float(jnp.sum(jnp.tanh(m(x))))

    grads = nnx.grad(lambda m: jnp.sum(jnp.tanh(m(x))))(nnx.merge(graphdef, nnx.to_pure_dict(state)))
    v, fd = _fd(loss_at, state["g"][...])
    np.testing.assert_allclose(np.sum(grads["g"][...] * v), fd, rtol=1e-6)


def test_norm_errors():
    with pytest.raises(ValueError, match="`norm` must be one of \\('weight', 'spectral'\\)"):
        apply_norm(_Cell(nnx.Rngs(0)), "batch")
    with pytest.raises(TypeError, match="itself an Linear"):
        apply_norm(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="`layer` must be an nnx.Linear or nnx.Conv"):
        NormalizedLayer(nnx.LayerNorm(2, rngs=nnx.Rngs(0)), norm="weight", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`coeff` must be a number > 0"):
        NormalizedLayer(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), norm="spectral", rngs=nnx.Rngs(0), coeff=0)
    with pytest.raises(ValueError, match="only spectral normalization has a power iteration"):
        NormalizedLayer(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), norm="weight", rngs=nnx.Rngs(0)).update_power_iteration()
    with pytest.raises(TypeError, match="`exclude` must be a sequence"):
        apply_norm(_Cell(nnx.Rngs(0)), exclude="head")
    for fn in (apply_norm, reset_norm, remove_norm):
        with pytest.raises(TypeError, match="must be an nnx.Module"):
            fn("cell")


# ----------------------------------------------------------------------------- Jacobian schedule


def test_jacobian_schedule_values_and_errors():
    sched = JacobianSchedule(weight=0.6, every=3, start_step=2, ramp_steps=6)
    expected = [0, 0, 0.1, 0, 0, 0.4, 0, 0, 0.6, 0, 0, 0.6]  # by the formula, by hand
    np.testing.assert_allclose([sched(s) for s in range(12)], expected, rtol=1e-12)
    assert [sched.active(s) for s in (2, 3)] == [True, False]
    assert JacobianSchedule(weight=0.0)(0) == 0.0
    with pytest.raises(ValueError, match="`weight` must be a finite number >= 0"):
        JacobianSchedule(weight=-1.0)
    with pytest.raises(ValueError, match="`every` must be an integer >= 1"):
        JacobianSchedule(weight=1.0, every=0)
    with pytest.raises(ValueError, match="`ramp_steps` must be an integer >= 0"):
        JacobianSchedule(weight=1.0, ramp_steps=-2)
    with pytest.raises(ValueError, match="`step` must be an integer >= 0"):
        sched(-1)


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.linear(x), {}


def _l2(model, x, key):
    return jnp.sum(model.linear.kernel[...] ** 2)


def test_fit_applies_the_schedule_on_the_chosen_steps_with_its_weights():
    """fit with JacobianSchedule == a manual loop of train_step with the schedule's weight per step."""
    from deq.train import TrainConfig, batch_stream, fit, make_optimizer, train_step

    rng = np.random.default_rng(0)
    ds = deq.data.Dataset(rng.normal(size=(32, 4)), rng.integers(0, 3, 32).astype(np.int32),
                          rng.normal(size=(8, 4)), rng.integers(0, 3, 8).astype(np.int32), 3, "toy", (4,))
    sched = JacobianSchedule(weight=0.5, every=2, ramp_steps=3)
    config = TrainConfig(learning_rate=0.05, total_steps=6, batch_size=8, progress=False, clip_norm=None,
                         jacobian_reg=sched)
    model = _Net(nnx.Rngs(0))
    history = fit(model, ds, config, aux_loss_fn=_l2)
    assert [("aux_loss" in r) for r in history.train] == [True, False, True, False, True, False]

    ref = _Net(nnx.Rngs(0))
    opt = nnx.Optimizer(ref, make_optimizer(config, total_steps=6), wrt=nnx.Param)
    for index, _, xb, yb in batch_stream(ds.x_train, ds.y_train, 8, seed=0, start_step=0, total_steps=6):
        w = [1 / 6, 0, 0.5, 0, 0.5, 0][index]  # 0.5 * min(1, (s + 1) / 3) on even steps
        train_step(ref, opt, jnp.asarray(xb), jnp.asarray(yb), None, aux_loss_fn=_l2 if w else None,
                   aux_weight=w)
    np.testing.assert_allclose(model.linear.kernel[...], ref.linear.kernel[...], rtol=1e-6)


# ----------------------------------------------------------------------------- correction at chosen steps


def _f(z, a):
    return jnp.tanh(0.6 * z + a)


def test_correction_at_chosen_steps_equals_the_iterates_at_those_steps():
    a = jnp.asarray([0.3, -0.5, 1.0])
    solver = deq.FixedPointIteration(rtol=1e-14, atol=1e-14, max_steps=12)

    def loss(a):  # a loss on the iterate after step 4, returning all iterates
        its, w, sol = fixed_point_correction(_f, jnp.zeros(3), a, solver=solver, steps=(1, 4),
                                             backward=deq.Unrolled())
        return jnp.sum(its[1] ** 2), (its, w, sol)

    (_, (its, w, sol)), grad = jax.value_and_grad(loss, has_aux=True)(a)
    z, manual = jnp.zeros(3), {}
    for k in range(1, 5):
        z = _f(z, a)
        manual[k] = z
    for it, k in zip(its, (1, 4)):
        np.testing.assert_allclose(it, manual[k], rtol=1e-12)
    assert int(sol.stats.num_steps) == 4 and sol.stats.residual_history.shape == (5,) and w.shape == (2,)

    # the gradient flows through steps 2..4 only (each segment starts from a stop-gradient
    # value): unrolled autodiff of the manual loop
    def manual_loss(a):
        z = jax.lax.stop_gradient(_f(jnp.zeros(3), a))
        for _ in range(3):
            z = _f(z, a)
        return jnp.sum(z ** 2)

    np.testing.assert_allclose(grad, jax.grad(manual_loss)(a), rtol=1e-10)


def test_correction_steps_errors():
    solver = deq.FixedPointIteration(max_steps=10)
    z0, a = jnp.zeros(2), jnp.ones(2)
    with pytest.raises(ValueError, match="strictly increasing"):
        fixed_point_correction(_f, z0, a, solver=solver, steps=(4, 4, 8))
    with pytest.raises(ValueError, match="beyond the solver's max_steps=10"):
        fixed_point_correction(_f, z0, a, solver=solver, steps=(4, 11))
    with pytest.raises(ValueError, match="disagrees with the 2 entries"):
        fixed_point_correction(_f, z0, a, solver=solver, steps=(4, 8), num_points=3)
    with pytest.raises(ValueError, match="non-empty sequence of integers"):
        fixed_point_correction(_f, z0, a, solver=solver, steps=(2.0, 4))
    with pytest.raises(TypeError, match="sequence of solver step counts"):
        fixed_point_correction(_f, z0, a, solver=solver, steps=5)
