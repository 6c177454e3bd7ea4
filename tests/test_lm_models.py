"""The language models: the DEQ-Transformer, its weight-tied unrolled twin, the explicit untied
Transformer at matched parameters. Shapes, causality, dropout, the twin as K solver steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq
from deq.nn.models import (
    TransformerDEQLM,
    TransformerLM,
    UnrolledTransformerLM,
    count_params,
    matched_transformer_width,
)

V, D, H, T, B, K = 11, 16, 2, 8, 2, 3
TIGHT = deq.FixedPointIteration(rtol=1e-11, atol=1e-12, max_steps=100)  # contractive at init


@pytest.fixture(scope="module", autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


@functools.lru_cache(maxsize=None)  # built once per module: parameter initialisation compiles
def _models(dropout=0.0):
    r = lambda: nnx.Rngs(0, dropout=1)
    return {
        "deq": TransformerDEQLM(V, D, H, max_len=T, rngs=r(), solver=TIGHT, dropout=dropout),
        "tied": UnrolledTransformerLM(V, D, H, depth=K, max_len=T, rngs=r(), dropout=dropout),
        "explicit": TransformerLM(V, 8, H, depth=K, max_len=T, rngs=r(), dropout=dropout),
    }


def _tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)), jnp.int32)


@pytest.mark.parametrize("name", ["deq", "tied", "explicit"])
def test_shapes_and_causality(name):
    """Changing token t changes no logit at a position < t, and does change those at >= t.
    The DEQ is causal at its fixed point; its solver mixes positions (one residual per
    sequence), so earlier logits may move by about the solver's residual (about 1e-9 here)."""
    model = _models()[name]
    x = _tokens()
    logits, info = model(x)
    assert logits.shape == (B, T, V) and bool(jnp.isfinite(logits).all())
    assert ("forward_steps" in info) if name == "deq" else int(info["depth"]) == K
    t = 5
    x2 = x.at[:, t].set((x[:, t] + 1) % V)
    logits2, _ = model(x2)
    diff = np.abs(np.asarray(logits2 - logits))
    assert diff[:, :t].max() < (1e-6 if name == "deq" else 1e-12)
    assert diff[:, t].min(axis=-1).max() > 0 and diff[:, t:].max() > 1e-4


def test_tied_twin_is_the_deq_solved_by_k_fixed_point_steps():
    """The twin with the DEQ's parameters == the DEQ solved by exactly K steps of plain fixed-point
    iteration from zero (an independent reference: the solver's own loop)."""
    models = _models()
    deq_lm, twin = models["deq"], models["tied"]
    assert count_params(twin) == count_params(deq_lm)
    nnx.update(twin.cell, nnx.state(deq_lm.deq.cell))
    nnx.update(twin.embed, nnx.state(deq_lm.embed))
    twin.pos[...] = deq_lm.pos[...]
    nnx.update(twin.head, nnx.state(deq_lm.head))
    x = _tokens(1)
    fpi = deq.FixedPointIteration(rtol=0.0, atol=0.0, max_steps=K)
    u = deq_lm.embed(x) + deq_lm.pos[...][:T]
    z = deq_lm.deq(u, solver=fpi)
    np.testing.assert_allclose(twin(x)[0], deq_lm.head(z), rtol=1e-10, atol=1e-12)


def test_explicit_lm_matches_the_deq_parameter_count():
    target = count_params(_models()["deq"])
    lm = TransformerLM.matched(target, V, H, depth=K, max_len=T, rngs=nnx.Rngs(0))
    assert lm.d_model == matched_transformer_width(target, V, H, K, max_len=T) and lm.d_model % H == 0
    # K untied blocks: the closest width is narrower, within a width step of the target count
    assert lm.d_model < D and abs(count_params(lm) - target) / target < 0.2  # coarse steps at toy size


def test_dropout_one_mask_per_forward_pass_for_every_model():
    models = _models(dropout=0.3)
    x = _tokens(2)
    for name, model in models.items():
        a, _ = model(x)
        b, _ = model(x)
        assert not np.allclose(a, b), name  # a new mask per forward pass
    explicit = models["explicit"]
    explicit.eval()
    np.testing.assert_array_equal(explicit(x)[0], explicit(x)[0])  # eval: no dropout
    explicit.train()
    # the tied twin applies the SAME mask at each of its K applications: a manual loop with the
    # mask of the key that forward pass used (resampled at its start, not moved since)
    twin = models["tied"]
    logits, _ = twin(x)
    block = twin.cell
    u = twin.embed(x) + twin.pos[...][:T]
    m = block.drop.mask((B, T, D), u.dtype)
    assert m.shape == (B, 1, D)  # shared over positions
    z = jnp.zeros_like(u)
    for _ in range(K):
        z = m * block.cell(z, u)
    np.testing.assert_allclose(logits, twin.head(z), rtol=1e-10, atol=1e-12)
    # the DEQ with dropout solves a fixed point of the masked block (with a fixed mask the
    # residual falls steadily; a mask redrawn per step would leave it at O(1))
    sol = models["deq"].deq(u, return_solution=True)
    assert float(sol.stats.residual_norm.max()) < 1e-3


def test_lm_misuse_messages():
    with pytest.raises(ValueError, match="`dropout` must be a number in \\[0, 1\\)"):
        TransformerLM(V, D, H, depth=2, rngs=nnx.Rngs(0), dropout=1.5)
    with pytest.raises(ValueError, match="`depth` must be an int >= 1"):
        UnrolledTransformerLM(V, D, H, depth=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="only supported with causal=True"):
        deq.nn.TransformerDEQClassifier(V, D, H, 2, rngs=nnx.Rngs(0), dropout=0.1)
    lm = TransformerLM(V, D, H, depth=1, max_len=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds max_len=4"):
        lm(jnp.zeros((1, 6), jnp.int32))
    with pytest.raises(ValueError, match="must be ids in \\[0, vocab_size=11\\)"):
        lm(jnp.full((1, 3), 11, jnp.int32))
