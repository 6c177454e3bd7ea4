"""Tests for deq.nn.cells and deq.nn.models: shapes, convergence at init, jit, training, twins."""

from __future__ import annotations

import doctest
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deq
from deq.nn import cells as cells_mod
from deq.nn import models as models_mod
from deq.nn._layer import DEQ, solution_info
from deq.nn.cells import ConvCell, DenseCell, MultiscaleCell, TransformerCell
from deq.nn.models import (
    ConvDEQClassifier,
    ConvResNetClassifier,
    ConvUnrolledClassifier,
    DEQClassifier,
    MultiscaleDEQClassifier,
    ResNetClassifier,
    TransformerDEQClassifier,
    TransformerDEQLM,
    UnrolledClassifier,
    count_params,
    matched_resnet_hidden,
    param_table,
)

def _normal(*shape, seed=0):
    """Random inputs from numpy (no XLA compilation per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _cell_cases():
    """name -> (cell factory, input x)."""
    return {
        "dense": (lambda: DenseCell(32, rngs=nnx.Rngs(0)), _normal(16, 32, seed=1)),
        "dense_inject_groupnorm": (
            lambda: DenseCell(32, in_features=64, num_groups=4, rngs=nnx.Rngs(1)),
            _normal(16, 64, seed=1),
        ),
        "conv": (lambda: ConvCell(8, rngs=nnx.Rngs(2)), _normal(4, 8, 8, 8, seed=2)),
        "transformer_causal": (
            lambda: TransformerCell(16, 4, causal=True, rngs=nnx.Rngs(5)),
            _normal(4, 10, 16, seed=4),
        ),
    }


# The multiscale cell is covered by test_multiscale_cell_three_resolutions_shapes (abstract shapes,
# odd sizes) and by MultiscaleDEQClassifier in test_model_returns_logits_and_info_under_jit
# (convergence at init), which saves a second compilation of its solve.
CELL_NAMES = ["dense", "dense_inject_groupnorm", "conv", "transformer_causal"]


@nnx.jit
def _cell_and_deq(cell, x):
    """One compiled call: the zero state, the DEQ solve at init, and the cell at the solution."""
    z0 = cell.init_state(x)
    layer = DEQ(cell, solver=deq.Anderson(rtol=1e-3, atol=1e-5, max_steps=40))
    sol = layer(x, return_solution=True)
    return z0, sol.value, cell(sol.value, x), solution_info(sol)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_cell_state_shapes_and_deq_converges_at_init(name):
    cases = _cell_cases()
    assert set(cases) == set(CELL_NAMES)
    make, x = cases[name]
    cell = make()
    z0, zstar, fzstar, info = _cell_and_deq(cell, x)
    # each cell returns a state shaped like z (a tuple of resolutions for the multiscale cell)
    for z in (zstar, fzstar):
        assert jax.tree_util.tree_structure(z) == jax.tree_util.tree_structure(z0)
        for a, b in zip(jax.tree_util.tree_leaves(z0), jax.tree_util.tree_leaves(z)):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert np.all(np.isfinite(np.asarray(b)))
    # a DEQ with the cell converges on random input at initialisation
    assert float(info["converged_frac"]) >= 0.9, info
    assert float(info["forward_steps"]) < 30, info
    for a, b in zip(jax.tree_util.tree_leaves(zstar), jax.tree_util.tree_leaves(fzstar)):
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert rel < 1e-2, (name, rel)


def test_multiscale_cell_three_resolutions_shapes():
    # abstractly (no compilation): a 3-resolution state on an odd-sized image
    x = jax.ShapeDtypeStruct((2, 7, 9, 1), jnp.float32)

    def run():
        cell = MultiscaleCell((8, 16, 32), in_channels=1, rngs=nnx.Rngs(0))
        z0 = cell.init_state(x)
        return z0, cell(z0, jnp.zeros(x.shape, x.dtype))

    z0, z1 = nnx.eval_shape(run)
    assert isinstance(z0, tuple) and isinstance(z1, tuple)
    assert [z.shape for z in z0] == [z.shape for z in z1] == [(2, 7, 9, 8), (2, 4, 5, 16), (2, 2, 3, 32)]
    assert all(z.dtype == jnp.float32 for z in z1)


def test_multiscale_deq_solution_is_a_pytree_of_resolutions():
    # abstractly: the DEQ's fixed point has the cell's tuple structure
    x = jax.ShapeDtypeStruct((2, 8, 8, 8), jnp.float32)

    def run():
        layer = DEQ(MultiscaleCell((8, 16), rngs=nnx.Rngs(0)), solver=deq.Anderson(max_steps=3))
        return layer(jnp.zeros(x.shape, x.dtype), return_solution=True)

    sol = nnx.eval_shape(run)
    assert isinstance(sol.value, tuple)
    assert [z.shape for z in sol.value] == [(2, 8, 8, 8), (2, 4, 4, 16)]
    assert sol.stats.num_steps.shape == (2,)


def test_cell_argument_errors():
    with pytest.raises(ValueError, match="num_groups"):
        ConvCell(12, num_groups=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="2 or 3"):
        MultiscaleCell((8,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_heads"):
        TransformerCell(10, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="features"):
        DenseCell(0, rngs=nnx.Rngs(0))


def test_weight_norm_parametrisation():
    lin = cells_mod.WeightNormLinear(5, 3, rngs=nnx.Rngs(0), init_scale=1.0)
    np.testing.assert_allclose(lin.weight, lin.v[...], rtol=1e-5, atol=1e-6)  # W = V at scale 1
    lin.g[...] = jnp.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(jnp.linalg.norm(lin.weight, axis=0), [1.0, 2.0, 3.0], rtol=1e-5)
    conv = cells_mod.WeightNormConv(2, 4, 3, rngs=nnx.Rngs(0), init_scale=0.5)
    norms = jnp.sqrt(jnp.sum(conv.weight**2, axis=(0, 1, 2)))
    np.testing.assert_allclose(norms, conv.g[...], rtol=1e-5)


B, T = 3, 9
DEQ_KEYS = {"forward_steps", "residual", "converged_frac"}
TIGHT = deq.Anderson(rtol=1e-6, atol=1e-7, max_steps=60)


def _model_cases():
    """name -> (model factory, input, expected logits shape, expected info keys).

    Widths match the cell cases (32 features, 8/16 channels, d_model 16), so parameter
    initialisers compiled for one test are reused by the others.
    """
    rng = np.random.default_rng(0)
    flat = _normal(B, 8, 8, 1)
    img = _normal(B, 8, 8, 1, seed=1)
    toks = jnp.asarray(rng.integers(0, 5, size=(B, T)), jnp.int32)
    r = lambda: nnx.Rngs(0)  # noqa: E731
    return {
        "DEQClassifier": (
            lambda: DEQClassifier(64, 32, 10, rngs=r(), eval_solver=deq.FixedPointIteration(max_steps=2)),
            flat, (B, 10), DEQ_KEYS),
        "UnrolledClassifier": (lambda: UnrolledClassifier(64, 32, 10, depth=3, rngs=r()), flat, (B, 10), {"depth"}),
        "ResNetClassifier": (lambda: ResNetClassifier(64, 32, 10, depth=3, rngs=r()), flat, (B, 10), {"depth"}),
        "ConvDEQClassifier": (lambda: ConvDEQClassifier(1, 8, 10, rngs=r()), img, (B, 10), DEQ_KEYS),
        "ConvUnrolledClassifier": (lambda: ConvUnrolledClassifier(1, 8, 10, depth=2, rngs=r()), img, (B, 10), {"depth"}),
        "ConvResNetClassifier": (lambda: ConvResNetClassifier(1, 8, 10, depth=2, rngs=r()), img, (B, 10), {"depth"}),
        "MultiscaleDEQClassifier": (lambda: MultiscaleDEQClassifier(1, (8, 16), 10, rngs=r()), img, (B, 10), DEQ_KEYS),
        "TransformerDEQClassifier": (
            lambda: TransformerDEQClassifier(5, 16, 2, 3, max_len=16, rngs=r()), toks, (B, 3), DEQ_KEYS),
        "TransformerDEQLM": (
            lambda: TransformerDEQLM(5, 16, 2, max_len=16, rngs=r(), solver=TIGHT), toks, (B, T, 5), DEQ_KEYS),
    }


MODEL_NAMES = [
    "DEQClassifier", "UnrolledClassifier", "ResNetClassifier", "ConvDEQClassifier", "ConvUnrolledClassifier",
    "ConvResNetClassifier", "MultiscaleDEQClassifier", "TransformerDEQClassifier", "TransformerDEQLM",
]
_apply = nnx.jit(lambda model, x: model(x))


@pytest.fixture(scope="module")
def zoo():
    """Every model, built once for this module."""
    assert set(_model_cases()) == set(MODEL_NAMES)
    return {name: (make(), x, shape, keys) for name, (make, x, shape, keys) in _model_cases().items()}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_returns_logits_and_info_under_jit(zoo, name):
    model, x, shape, keys = zoo[name]
    logits, info = _apply(model, x)
    assert logits.shape == shape
    assert np.all(np.isfinite(np.asarray(logits)))
    assert isinstance(info, dict) and set(info) == keys
    for v in info.values():
        assert jnp.shape(v) == ()
    if "converged_frac" in info:  # the default solver converges at init
        assert float(info["converged_frac"]) >= 0.9, info
    if "depth" in info:
        assert int(info["depth"]) == model.depth


def test_model_input_errors(zoo):
    with pytest.raises(ValueError, match="in_features"):
        zoo["DEQClassifier"][0](jnp.ones((2, 40)))
    with pytest.raises(ValueError, match="NHWC"):
        zoo["ConvDEQClassifier"][0](jnp.ones((2, 8, 8)))
    with pytest.raises(ValueError, match="max_len"):
        zoo["TransformerDEQLM"][0](jnp.zeros((1, 20), jnp.int32))
    with pytest.raises(ValueError, match="in_features"):
        zoo["TransformerDEQLM"][0](jnp.zeros((1, 4, 1), jnp.float32))
    with pytest.raises(ValueError, match="exactly one"):
        TransformerDEQClassifier(5, 16, 2, 2, in_features=1, rngs=nnx.Rngs(0))


def test_transformer_classifier_on_float_features():
    # abstractly: bits (B, T, 1) as in deq.data.make_prefix_parity, per-token logits
    def run():
        model = TransformerDEQClassifier(None, 16, 2, 2, in_features=1, max_len=16, causal=True,
                                         per_token=True, rngs=nnx.Rngs(0))
        return model(jnp.zeros((3, 9, 1), jnp.float32))

    logits, info = nnx.eval_shape(run)
    assert logits.shape == (3, 9, 2) and set(info) == DEQ_KEYS


def test_eval_solver_used_in_eval_mode(zoo):
    model, x, _, _ = zoo["DEQClassifier"]
    _, info_train = _apply(model, x)
    model.eval()
    try:
        _, info_eval = _apply(model, x)
    finally:
        model.train()
    assert float(info_eval["forward_steps"]) <= 2 < float(info_train["forward_steps"])


def test_causal_lm_prefix_logits_ignore_future_tokens(zoo):
    lm, toks, _, _ = zoo["TransformerDEQLM"]
    changed = toks.at[:, 5:].set((toks[:, 5:] + 1) % 5)
    a, _ = _apply(lm, toks)
    b, _ = _apply(lm, changed)
    # Anderson mixes each sample's whole state, so causality holds up to the solver tolerance.
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-3)
    assert float(jnp.max(jnp.abs(a[:, 5:] - b[:, 5:]))) > 1e-2


def test_dense_deq_classifier_gradient_step_reduces_loss():
    from deq.data import load_digits

    ds = load_digits()
    x, y = ds.x_train[:64], ds.y_train[:64]
    model = DEQClassifier(64, 32, 10, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(model):
            logits, info = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), info

        (loss, info), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss, info, grads

    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", deq.NonConvergenceWarning)
        for i in range(20):
            loss, info, grads = step(model, opt, x, y)
            losses.append(float(loss))
            if i == 0:  # gradients reach the cell inside the DEQ (implicit differentiation)
                g = grads["deq"]["cell"]
                assert float(jnp.linalg.norm(g["lin1"]["v"][...])) > 0
                assert float(jnp.linalg.norm(g["lin2"]["g"][...])) > 0
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(info["converged_frac"]) >= 0.9


def _count(make):
    """Parameter count of a model built abstractly (no parameter memory)."""
    return count_params(nnx.eval_shape(make))


def test_twins_param_counts_and_matching():
    r = lambda: nnx.Rngs(0)  # noqa: E731
    target = _count(lambda: DEQClassifier(64, 64, 10, rngs=r()))
    cell = _count(lambda: DenseCell(64, rngs=r()))
    unrolled = {d: _count(lambda d=d: UnrolledClassifier(64, 64, 10, depth=d, rngs=r())) for d in (1, 12)}
    resnet = {d: _count(lambda d=d: ResNetClassifier(64, 64, 10, depth=d, rngs=r())) for d in (1, 6, 12)}
    # tied weights: the unrolled twin has exactly the DEQ's count at every depth
    assert unrolled == {1: target, 12: target}
    # untied: the ResNet grows by one cell per block, so the DEQ has fewer parameters
    assert resnet[1] == target
    assert resnet[6] - resnet[1] == 5 * cell and resnet[12] - resnet[6] == 6 * cell
    # matched parameters: a narrower ResNet within a few percent of the DEQ's count
    h = matched_resnet_hidden(target, 64, 10, depth=6)
    matched = _count(lambda: ResNetClassifier(64, h, 10, depth=6, rngs=r()))
    assert h < 64 and abs(matched - target) / target < 0.03, (h, matched, target)
    abstract = lambda make: nnx.eval_shape(make)  # noqa: E731
    table = param_table({
        "DEQ (h=64)": abstract(lambda: DEQClassifier(64, 64, 10, rngs=r())),
        "Unrolled x6 (h=64, tied)": abstract(lambda: UnrolledClassifier(64, 64, 10, depth=6, rngs=r())),
        "ResNet x6 (h=64, equal width)": abstract(lambda: ResNetClassifier(64, 64, 10, depth=6, rngs=r())),
        f"ResNet x6 (h={h}, matched)": abstract(lambda: ResNetClassifier(64, h, 10, depth=6, rngs=r())),
    })
    print("\n" + table)
    lines = table.splitlines()
    assert len(lines) == 5 and "1.00x" in lines[1] and f"{target:,}" in lines[1]
    assert f"{resnet[6]:,}" in lines[3] and f"{matched:,}" in lines[4]


def test_conv_twins_param_counts_and_matching():
    r = lambda: nnx.Rngs(0)  # noqa: E731
    target = _count(lambda: ConvDEQClassifier(1, 32, 10, rngs=r()))
    assert _count(lambda: ConvUnrolledClassifier(1, 32, 10, depth=5, rngs=r())) == target
    r2 = _count(lambda: ConvResNetClassifier(1, 32, 10, depth=2, rngs=r()))
    r5 = _count(lambda: ConvResNetClassifier(1, 32, 10, depth=5, rngs=r()))
    assert target < r2 < r5 and (r5 - r2) == 3 * (r2 - target)
    matched = nnx.eval_shape(lambda: ConvResNetClassifier.matched(target, 1, 10, depth=4, rngs=r(), multiple_of=4))
    c = matched.channels
    assert c % 4 == 0 and c < 32
    assert abs(count_params(matched) - target) / target < 0.1  # channel steps of 4 are coarse
    print("\n" + param_table({"ConvDEQ (c=32)": nnx.eval_shape(lambda: ConvDEQClassifier(1, 32, 10, rngs=r())),
                               f"ConvResNet x4 (c={c}, matched)": matched}))


@pytest.mark.slow  # builds and compiles every example model eagerly
@pytest.mark.parametrize("module", [cells_mod, models_mod], ids=["cells", "models"])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_dense_models_take_another_cell():
    """`cell=`: the DEQ and its unrolled twin share a given cell type; with a contraction the
    DEQ converges on every sample, and the twin is exactly `depth` applications of the cell."""
    from deq.nn import ContractiveDense

    x = jax.random.normal(jax.random.key(0), (5, 12))
    make_cell = lambda: ContractiveDense(16, 16, rngs=nnx.Rngs(1), lipschitz=0.5, activation="relu")  # noqa: E731
    model = DEQClassifier(12, 16, 3, rngs=nnx.Rngs(0), cell=make_cell(),
                          solver=deq.FixedPointIteration(rtol=0.0, atol=1e-6, max_steps=100))
    twin = UnrolledClassifier(12, 16, 3, depth=4, rngs=nnx.Rngs(0), cell=make_cell())
    assert isinstance(model.deq.cell, ContractiveDense) and isinstance(twin.cell, ContractiveDense)
    assert _count(lambda: model) == _count(lambda: twin)
    _, info = model(x)
    assert float(info["converged_frac"]) == 1.0
    # Same initial parameters, so the twin's z_4 is the cell applied four times from 0.
    u = twin.encoder(x)
    z = jnp.zeros((5, 16))
    for _ in range(4):
        z = twin.cell(z, u)
    np.testing.assert_allclose(twin(x)[0], twin.head(z), rtol=1e-6)
    np.testing.assert_allclose(model.head(z), twin(x)[0], rtol=1e-6)  # same init from the same keys


def test_dense_models_cell_errors():
    from deq.nn import ContractiveDense

    cell = ContractiveDense(16, 16, rngs=nnx.Rngs(1))
    for cls in (DEQClassifier, UnrolledClassifier):
        with pytest.raises(ValueError, match=r"`cell_hidden`, `use_norm`.*cannot be combined with `cell`"):
            cls(12, 16, 3, rngs=nnx.Rngs(0), cell=cell, cell_hidden=8, use_norm=False)
        with pytest.raises(ValueError, match=r"`in_features` is 12.*ContractiveDense\(16, 16"):
            cls(12, 16, 3, rngs=nnx.Rngs(0), cell=ContractiveDense(16, 12, rngs=nnx.Rngs(1)))
        with pytest.raises(ValueError, match=r"`features` is 8"):
            cls(12, 16, 3, rngs=nnx.Rngs(0), cell=ContractiveDense(8, 16, rngs=nnx.Rngs(1)))
        with pytest.raises(TypeError, match="`cell` must be an nnx.Module"):
            cls(12, 16, 3, rngs=nnx.Rngs(0), cell=lambda z, u: z)
        # A DenseCell passed in is used as given (no `in_features` attribute to check).
        given = DenseCell(16, 4, rngs=nnx.Rngs(1))
        model = cls(12, 16, 3, rngs=nnx.Rngs(0), cell=given)
        assert (model.cell if cls is UnrolledClassifier else model.deq.cell) is given
