"""Adversarial inputs to the layers, models and data loaders: every misuse a clear error.

Each case feeds something wrong (a wrong width, rank or dtype, a wrong `z0`, an empty batch, NaN
inputs, unknown keywords, corrupt files of every kind) and checks the exception type and that
the message names the argument, what was expected and what was got. The NaN cases check that
the layer reports non-convergence in its statistics instead of returning garbage marked
converged; the empty-batch cases that no crash comes from inside the solver.
"""

from __future__ import annotations

import re
import warnings
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq
import deq.linen
import flax.linen as nn
from deq import data
from deq.monotone import MonDEQ, MonDEQClassifier, MonDEQConv, MonotoneDense, monotone_fixed_point
from deq.nn import ContractiveDense
from deq.nn.cells import ConvCell, DenseCell, MultiscaleCell, TransformerCell
from deq.nn.models import (
    ConvDEQClassifier,
    DEQClassifier,
    TransformerDEQClassifier,
    TransformerDEQLM,
    UnrolledClassifier,
)

FPI = deq.FixedPointIteration(rtol=1e-4, atol=1e-6, max_steps=30)


class DocCell(nnx.Module):
    """The cell of `deq.nn.DEQ`'s docstring: input width `dim`, state width `hidden`."""

    def __init__(self, dim, hidden, rngs):
        self.W = nnx.Linear(hidden, hidden, use_bias=False, rngs=rngs)
        self.U = nnx.Linear(dim, hidden, rngs=rngs)

    def init_state(self, x):
        return jnp.zeros((x.shape[0], self.W.in_features), x.dtype)

    def __call__(self, z, x):
        return jnp.tanh(0.5 * self.W(z) + self.U(x))


class LinenCell(nn.Module):
    @nn.compact
    def __call__(self, z, x):
        return jnp.tanh(0.5 * nn.Dense(4, use_bias=False)(z) + nn.Dense(4)(x))

    def init_state(self, x):
        return jnp.zeros((x.shape[0], 4), x.dtype)


def rngs():
    return nnx.Rngs(0)


def layer(cell):
    return deq.nn.DEQ(cell, solver=FPI)


def head(message: str) -> str:
    """The library's part of a message (before the wrapped original error)."""
    return message.split("\nOriginal error")[0]


# --------------------------------------------------------------------------------------------
# Layers and models: a wrong input raises, naming the argument, its shape and what is expected.
# --------------------------------------------------------------------------------------------


def linen_wrong_width():
    model = deq.linen.DEQ(cell=LinenCell(), solver=FPI)
    params = model.init(jax.random.key(0), jnp.ones((5, 3)))
    model.apply(params, jnp.ones((5, 5)))


def linen_empty_batch():
    model = deq.linen.DEQ(cell=LinenCell(), solver=FPI)
    params = model.init(jax.random.key(0), jnp.ones((5, 3)))
    model.apply(params, jnp.ones((0, 3)))


def monotone_fixed_point_wrong_width():
    op = MonotoneDense.init(jax.random.key(0), 3, 8)
    monotone_fixed_point(op, jnp.ones((5, 4)))


LAYER_CASES = [
    # deq.nn.DEQ with a user-defined cell (the example): x named, z0 not blamed.
    pytest.param(lambda: layer(DocCell(3, 8, rngs()))(jnp.ones((5, 5))), ValueError,
                 r"DEQ: the cell DocCell failed on the input `x` \(float32\[5, 5\]\).*U: 3",
                 id="deq-user-cell-wrong-width-names-x-and-sizes"),
    pytest.param(lambda: layer(DocCell(3, 8, rngs()))(jnp.ones((5, 3)), jnp.zeros((5, 7))), ValueError,
                 r"the given `z0` \(float32\[5, 7\]\) does not match the cell's state cell\.init_state\(x\) "
                 r"\(float32\[5, 8\]\)", id="deq-given-z0-wrong-width"),
    pytest.param(lambda: layer(DocCell(3, 8, rngs()))(jnp.ones((5, 3), jnp.int32)), TypeError,
                 r"cell\.init_state\(x\) is int32\[5, 8\] for the input `x` \(int32\[5, 3\]\).*floating",
                 id="deq-user-cell-int-input"),
    pytest.param(lambda: layer(DocCell(3, 8, rngs()))(jnp.ones((0, 3))), ValueError,
                 r"DEQ: `x` holds an empty batch \(float32\[0, 3\]", id="deq-empty-batch"),
    # Library cells check their own input.
    pytest.param(lambda: layer(DenseCell(8, rngs=rngs()))(jnp.ones((5, 5))), ValueError,
                 r"DenseCell: `x` must have a last axis of size features=8.*got float32\[5, 5\]",
                 id="densecell-wrong-width"),
    pytest.param(lambda: layer(DenseCell(8, rngs=rngs(), in_features=3))(jnp.ones((5, 5))), ValueError,
                 r"DenseCell: `x` must have a last axis of size in_features=3.*got float32\[5, 5\]",
                 id="densecell-injection-wrong-width"),
    pytest.param(lambda: layer(DenseCell(8, rngs=rngs()))(jnp.ones((8,))), ValueError,
                 r"DenseCell: `x` must be shaped \(B, 8\) \(at least 2 axes\), got float32\[8\]",
                 id="densecell-missing-batch-axis"),
    pytest.param(lambda: layer(DenseCell(8, rngs=rngs()))(jnp.ones((5, 8), jnp.int32)), TypeError,
                 r"DenseCell: `x` must be floating point.*int32\[5, 8\].*astype", id="densecell-int-input"),
    pytest.param(lambda: layer(ConvCell(8, rngs=rngs()))(jnp.ones((2, 6, 6, 3))), ValueError,
                 r"ConvCell: `x` must have a last axis of size channels=8.*\(B, H, W, 8\)",
                 id="convcell-wrong-channels"),
    pytest.param(lambda: layer(ConvCell(8, rngs=rngs()))(jnp.ones((6, 6, 8))), ValueError,
                 r"ConvCell: `x` must be shaped \(B, H, W, 8\) \(4 axes\), got float32\[6, 6, 8\]",
                 id="convcell-rank3"),
    pytest.param(lambda: layer(MultiscaleCell((8, 16), rngs=rngs()))(jnp.ones((2, 8, 8, 3))), ValueError,
                 r"MultiscaleCell: `x` must have a last axis of size channels=8", id="multiscalecell-wrong-channels"),
    pytest.param(lambda: layer(TransformerCell(16, 4, rngs=rngs()))(jnp.ones((2, 5, 8))), ValueError,
                 r"TransformerCell: `x` must have a last axis of size d_model=16.*\(B, T, 16\)",
                 id="transformercell-wrong-width"),
    pytest.param(lambda: layer(TransformerCell(16, 4, rngs=rngs()))(jnp.ones((2, 16))), ValueError,
                 r"TransformerCell: `x` must be shaped \(B, T, 16\).*got float32\[2, 16\]",
                 id="transformercell-missing-time-axis"),
    pytest.param(lambda: layer(ContractiveDense(8, 3, rngs=rngs()))(jnp.ones((5, 3), jnp.int32)), TypeError,
                 r"ContractiveDense: `x` must be floating point.*int32\[5, 3\]", id="contractive-int-input"),
    pytest.param(lambda: layer(ContractiveDense(8, 3, rngs=rngs()))(jnp.ones((5, 3)), jnp.zeros((5, 7))),
                 ValueError, r"given `z0` \(float32\[5, 7\]\) does not match the cell's state",
                 id="contractive-given-z0-wrong-width"),
    # Models.
    pytest.param(lambda: DEQClassifier(64, 16, 10, rngs=rngs())(jnp.ones((2, 40))), ValueError,
                 r"DEQClassifier: `x` must have in_features=64 features per sample.*float32\[2, 40\]",
                 id="deqclassifier-wrong-features"),
    pytest.param(lambda: DEQClassifier(64, 16, 10, rngs=rngs())(jnp.ones((2, 8, 8, 1), jnp.uint8)), TypeError,
                 r"DEQClassifier: `x` must be floating point.*uint8\[2, 8, 8, 1\].*255",
                 id="deqclassifier-uint8-pixels"),
    pytest.param(lambda: DEQClassifier(64, 16, 10, rngs=rngs())(jnp.ones(())), ValueError,
                 r"DEQClassifier: `x` must have a leading batch axis", id="deqclassifier-scalar-input"),
    pytest.param(lambda: DEQClassifier(64, 16, 10, rngs=rngs())(jnp.ones((0, 64))), ValueError,
                 r"DEQClassifier: `x` holds an empty batch \(float32\[0, 64\]", id="deqclassifier-empty-batch"),
    pytest.param(lambda: ConvDEQClassifier(1, 8, 10, rngs=rngs())(jnp.ones((2, 8, 8))), ValueError,
                 r"ConvDEQClassifier: `x` must be shaped NHWC images \(B, H, W, 1\).*x\[\.\.\., None\]",
                 id="convdeqclassifier-grayscale-without-channel"),
    pytest.param(lambda: TransformerDEQLM(30, 16, 2, max_len=32, rngs=rngs())(jnp.zeros((2, 8))), TypeError,
                 r"TransformerDEQLM: `tokens` must be integer token ids in \[0, vocab_size=30\).*float32\[2, 8\]",
                 id="lm-float-tokens"),
    pytest.param(lambda: TransformerDEQLM(30, 16, 2, max_len=32, rngs=rngs())(jnp.full((2, 8), 40)), ValueError,
                 r"`tokens` must be ids in \[0, vocab_size=30\), got values in \[40, 40\].*vocab_size>=41",
                 id="lm-token-ids-too-large"),
    pytest.param(lambda: TransformerDEQLM(30, 16, 2, max_len=32, rngs=rngs())(jnp.full((2, 8), -1)), ValueError,
                 r"`tokens` must be ids in \[0, vocab_size=30\), got values in \[-1, -1\].*negative",
                 id="lm-negative-token-ids"),
    pytest.param(lambda: TransformerDEQLM(30, 16, 2, max_len=16, rngs=rngs())(jnp.zeros((1, 40), jnp.int32)),
                 ValueError, r"`tokens` has sequence length 40.*max_len=16", id="lm-sequence-too-long"),
    pytest.param(lambda: TransformerDEQClassifier(None, 16, 2, 2, in_features=1, max_len=12, rngs=rngs())(
                     jnp.ones((3, 10, 1), jnp.int32)), TypeError,
                 r"TransformerDEQClassifier: `tokens` must be floating point.*int32\[3, 10, 1\]",
                 id="transformer-classifier-int-features"),
    # Monotone operator layers.
    pytest.param(lambda: MonDEQ(3, 8, rngs=rngs())(jnp.ones((5, 5))), ValueError,
                 r"MonDEQ: `x` must have a last axis of size in_features=3.*got float32\[5, 5\]",
                 id="mondeq-wrong-width"),
    pytest.param(lambda: MonDEQ(3, 8, rngs=rngs())(jnp.ones((5, 3, 3))), ValueError,
                 r"MonDEQ: `x` must be shaped \(batch, 3\) or \(3,\) for one sample \(1 or 2 axes\)",
                 id="mondeq-rank3"),
    pytest.param(lambda: MonDEQ(3, 8, rngs=rngs())(jnp.ones((5, 3), jnp.int32)), TypeError,
                 r"MonDEQ: `x` must be floating point.*int32\[5, 3\]", id="mondeq-int-input"),
    pytest.param(lambda: MonDEQ(3, 8, rngs=rngs())(jnp.ones((5, 3)), jnp.zeros((5, 7))), ValueError,
                 r"MonDEQ: the given `z0` \(float32\[5, 7\]\) does not match the layer's state \(float32\[5, 8\]\)",
                 id="mondeq-given-z0-wrong-width"),
    pytest.param(lambda: MonDEQ(3, 8, rngs=rngs())(jnp.ones((0, 3))), ValueError,
                 r"MonDEQ: `x` holds an empty batch", id="mondeq-empty-batch"),
    pytest.param(lambda: MonDEQConv(1, 4, rngs=rngs())(jnp.ones((2, 8, 8, 3))), ValueError,
                 r"MonDEQConv: `x` must have a last axis of size in_channels=1", id="mondeqconv-wrong-channels"),
    pytest.param(lambda: MonDEQClassifier(64, 16, 10, rngs=rngs())(jnp.ones(())), ValueError,
                 r"MonDEQClassifier: `x` must have a leading batch axis", id="mondeqclassifier-scalar-input"),
    pytest.param(monotone_fixed_point_wrong_width, ValueError,
                 r"monotone_fixed_point: `x` must have a last axis of size in_features.*=3.*got float32\[5, 4\]",
                 id="monotone-fixed-point-wrong-width"),
    # Linen.
    pytest.param(linen_wrong_width, ValueError,
                 r"deq\.linen\.DEQ: the cell LinenCell failed on the input `x` \(float32\[5, 5\]\).*Dense_1: 3",
                 id="linen-wrong-width-names-x-and-sizes"),
    pytest.param(linen_empty_batch, ValueError, r"deq\.linen\.DEQ: `x` holds an empty batch",
                 id="linen-empty-batch"),
    # Configuration and keywords.
    pytest.param(lambda: layer(DenseCell(8, rngs=rngs()))(jnp.ones((5, 8)), z00=1), TypeError,
                 r"unexpected keyword argument `z00`.*Did you mean `z0`", id="deq-unknown-keyword"),
    pytest.param(lambda: deq.nn.DEQ(DenseCell(8, rngs=rngs()), solver="anderson"), TypeError,
                 r"`solver` must be a forward fixed-point solver.*got 'anderson'", id="deq-solver-as-string"),
    pytest.param(lambda: deq.nn.DEQ(DenseCell(8, rngs=rngs()), backward="ift"), TypeError,
                 r"`backward` must be a deq backward strategy.*got 'ift'", id="deq-backward-as-string"),
    pytest.param(lambda: MonDEQ(3, 8, rngs=rngs(), method=deq.Anderson()), TypeError,
                 r"MonDEQ: `method` must be deq\.monotone\.PeacemanRachford", id="mondeq-general-solver-as-method"),
]


@pytest.mark.parametrize("call, error, pattern", LAYER_CASES)
def test_layer_misuse_is_a_clear_error(call, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        call()
    assert "z0" not in head(str(info.value)) or "z0" in pattern, "z0 blamed though not passed"


# --------------------------------------------------------------------------------------------
# Empty batches without a solve, NaN inputs, out-of-range ids under jit.
# --------------------------------------------------------------------------------------------


def test_unrolled_classifier_empty_batch_gives_empty_logits():
    logits, _ = UnrolledClassifier(64, 16, 10, depth=2, rngs=rngs())(jnp.ones((0, 8, 8, 1)))
    assert logits.shape == (0, 10)


NAN_CASES = [
    pytest.param(lambda x: layer(DenseCell(8, rngs=rngs()))(x, return_solution=True), (3, 8), id="deq-densecell"),
    pytest.param(lambda x: MonDEQ(8, 8, rngs=rngs())(x, return_solution=True), (3, 8), id="mondeq"),
]


@pytest.mark.parametrize("solve, shape", NAN_CASES)
def test_nan_input_is_reported_not_converged(solve, shape):
    x = jnp.ones(shape).at[1].set(jnp.nan)
    sol = solve(x)
    converged = np.asarray(sol.stats.converged)
    assert not converged[1], "a NaN sample reported converged"
    assert int(np.asarray(sol.stats.result)[1]) != deq.RESULTS.CONVERGED
    assert converged[0] and converged[2], "the finite samples are solved as usual"


def test_nan_input_to_model_lowers_converged_frac():
    _, info = DEQClassifier(64, 16, 10, rngs=rngs())(jnp.full((2, 64), jnp.nan))
    assert float(info["converged_frac"]) == 0.0


def test_negative_token_ids_under_jit_are_not_silently_wrapped():
    lm = TransformerDEQLM(30, 16, 2, max_len=32, rngs=rngs())
    _, info = nnx.jit(lambda m, t: m(t))(lm, jnp.full((2, 4), -1, jnp.int32))
    # -1 would otherwise read the embedding of id 29 and converge as if it were a real token.
    assert float(info["converged_frac"]) == 0.0


# --------------------------------------------------------------------------------------------
# Data files: corrupt, truncated or wrong files raise errors naming the path and what is expected.
# --------------------------------------------------------------------------------------------


def good_arrays(**over):
    arrays = dict(x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.array([0, 1, 2, 1]),
                  x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.array([2, 0]))
    arrays.update(over)
    return arrays


def write_good(path, **over):
    np.savez(path, **good_arrays(**over))
    return path


def truncated(path):
    raw = write_good(path).read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def corrupt_member(path):
    """Flip bytes inside the compressed data of x_train, keeping the zip directory intact."""
    pixels = np.arange(4 * 28 * 28, dtype=np.uint8).reshape(4, 28, 28)
    np.savez_compressed(path, **good_arrays(x_train=pixels))
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("x_train.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 40
    for i in range(start, start + 64):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def object_array(path):
    np.savez(path, **good_arrays(x_train=np.array([{}], dtype=object)))


FILE_CASES = [
    pytest.param(truncated, ValueError, r"is not a readable \.npz archive.*numpy\.savez with keys", id="npz-truncated"),
    pytest.param(lambda p: p.write_bytes(b""), ValueError, r"is empty \(0 bytes\): expected a zip archive",
                 id="npz-empty-file"),
    pytest.param(lambda p: p.write_text("x_train,y_train\n1,2\n"), ValueError, r"is not a readable \.npz archive",
                 id="npz-text-file"),
    pytest.param(lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 40), ValueError, r"is not a readable \.npz archive",
                 id="npz-zip-header-only"),
    pytest.param(lambda p: np.save(open(p, "wb"), np.zeros(3)), ValueError,
                 r"holds a single \.npy array \(float64\[3\]\), not an \.npz archive", id="npz-single-npy-array"),
    pytest.param(object_array, ValueError, r"the array 'x_train' cannot be read", id="npz-object-array"),
    pytest.param(corrupt_member, ValueError, r"(the array 'x_train' cannot be read|not a readable \.npz archive)",
                 id="npz-corrupt-member"),
    pytest.param(lambda p: np.savez(p, x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(2, int),
                                    x_test=np.zeros((1, 28, 28), np.uint8)),
                 ValueError, r"missing \['y_test'\]", id="npz-missing-key"),
    pytest.param(lambda p: write_good(p, x_train=np.where(np.arange(4)[:, None, None] == 2, np.nan,
                                                          np.zeros((4, 28, 28), np.float32))),
                 ValueError, r"x_train in '.*' must hold finite values, got NaN or inf in 1 sample\(s\), first at index 2",
                 id="npz-nan-pixels"),
    pytest.param(lambda p: write_good(p, x_test=np.full((2, 28, 28), np.inf, np.float32)), ValueError,
                 r"x_test in '.*' must hold finite values", id="npz-inf-pixels"),
    pytest.param(lambda p: write_good(p, x_train=np.full((4, 28, 28), 1000, np.int32)), ValueError,
                 r"x_train in '.*' holds integer pixels in \[1000, 1000\], expected uint8 values in 0\.\.255",
                 id="npz-int-pixels-above-255"),
    pytest.param(lambda p: write_good(p, x_train=np.zeros((4, 28, 28), bool)), ValueError,
                 r"x_train in '.*' must hold real-valued pixels.*got dtype bool", id="npz-bool-pixels"),
    pytest.param(lambda p: write_good(p, x_train=np.zeros((4, 28), np.uint8)), ValueError,
                 r"x_train in '.*' must be images shaped \(N, H, W\) or \(N, H, W, C\), got shape \(4, 28\)",
                 id="npz-wrong-rank"),
    pytest.param(lambda p: write_good(p, x_train=np.zeros((0, 28, 28), np.uint8), y_train=np.zeros(0, int)),
                 ValueError, r"x_train in '.*' holds no samples", id="npz-no-training-samples"),
    pytest.param(lambda p: write_good(p, y_train=np.array([0, -1, 2, 1])), ValueError,
                 r"y_train in '.*' must hold labels >= 0, got -1 at index 1", id="npz-negative-label"),
    pytest.param(lambda p: write_good(p, y_test=np.array([2, 11])), ValueError,
                 r"y_test in '.*' must hold labels in \[0, num_classes=10\), got 11 at index 1",
                 id="npz-label-out-of-range"),
    pytest.param(lambda p: write_good(p, y_train=np.array([0, 2**40, 2, 1])), ValueError,
                 r"y_train in '.*' must hold labels in \[0, num_classes=10\), got 1099511627776 at index 1",
                 id="npz-int64-label-would-wrap"),
    pytest.param(lambda p: write_good(p, y_train=np.array([0.0, 1, 2, 1])), ValueError,
                 r"y_train in '.*' must be integer labels shaped \(N,\) or \(N, 1\), got shape \(4,\) dtype float64",
                 id="npz-float-labels"),
    pytest.param(lambda p: write_good(p, y_train=np.array([0, 1, 2])), ValueError,
                 r"x_train and y_train in '.*' must have the same number of samples", id="npz-length-mismatch"),
]


@pytest.mark.parametrize("make, error, pattern", FILE_CASES)
def test_bad_npz_file_is_a_clear_error(tmp_path, make, error, pattern):
    path = tmp_path / "mnist.npz"
    make(path)
    with pytest.raises(error, match=pattern) as info:
        data.load_mnist(path)
    assert str(path) in str(info.value), "the message must name the file"


def test_npz_path_is_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mnist data file is a directory, not a file.*numpy\.savez"):
        data.load_mnist(tmp_path)


# --------------------------------------------------------------------------------------------
# The MNIST-1D cache: a bad cache file is regenerated with a warning naming it.
# --------------------------------------------------------------------------------------------


CACHE_CASES = [
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[:100]), r"is not a readable \.npz archive", id="truncated"),
    pytest.param(lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)", id="empty"),
    pytest.param(lambda p: np.savez(p, x=np.zeros((5, 40), np.float32), y=np.zeros(5, np.int32)),
                 r"x in '.*' must be float32 \(100, 40\), got float32 \(5, 40\)", id="wrong-shape"),
    pytest.param(lambda p: np.savez(p, x=np.full((100, 40), np.nan, np.float32), y=np.zeros(100, np.int32)),
                 r"x in '.*' must hold finite values", id="nan-signals"),
    pytest.param(lambda p: np.savez(p, x=np.zeros((100, 40), np.float32), y=np.full(100, 10)),
                 r"y in '.*' must hold labels in \[0, num_classes=10\)", id="labels-out-of-range"),
    pytest.param(lambda p: np.savez(p, q=np.zeros(3)), r"missing \['x', 'y'\]", id="missing-keys"),
]


@pytest.mark.parametrize("spoil, pattern", CACHE_CASES)
def test_mnist1d_bad_cache_is_regenerated_with_a_warning(tmp_path, spoil, pattern):
    fresh = data.load_mnist1d(num_samples=100, cache_dir=tmp_path)
    path = tmp_path / "mnist1d_n100_seed0.npz"
    spoil(path)
    with pytest.warns(RuntimeWarning, match=re.escape(str(path)) + r".*regenerated") as record:
        again = data.load_mnist1d(num_samples=100, cache_dir=tmp_path)
    assert any(re.search(pattern, str(w.message), re.S) for w in record), [str(w.message) for w in record]
    np.testing.assert_array_equal(again.x_train, fresh.x_train)
    np.testing.assert_array_equal(again.y_test, fresh.y_test)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.load_mnist1d(num_samples=100, cache_dir=tmp_path)  # the rewritten cache is good


def test_mnist1d_cache_dir_is_a_file(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"cache_dir '.*not_a_dir' exists and is not a directory"):
        data.load_mnist1d(num_samples=100, cache_dir=path)


def test_text_corpus_root_is_a_file(tmp_path):
    path = tmp_path / "one.py"
    path.write_text("print(1)\n")
    with pytest.raises(ValueError, match=r"root must be a directory of \*\.py files, got the file '.*one\.py'"):
        data.read_source_text(max_chars=100, root=path)
