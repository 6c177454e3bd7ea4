"""Adversarial cases for deq.train.fit: bad data, non-finite steps, unusable checkpoints.

Each case is what someone trying to break training would do. Every one must fail loudly (the
documented exception type, a message naming the index / step / path) or, where the library
recovers (a corrupt newest checkpoint), recover exactly and say so with a warning. Models are
tiny and runs a few steps, so the file takes seconds.
"""

from __future__ import annotations

import os
import shutil
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deq.data import Dataset
from deq.train import (
    CheckpointError,
    NonFiniteError,
    TrainConfig,
    batch_stream,
    fit,
    restore_checkpoint,
    train_step,
)

DIN, CLASSES, N_TRAIN, N_TEST, BATCH = 4, 3, 32, 8, 8


class Net(nnx.Module):
    """A linear classifier: logits = W x + b."""

    def __init__(self, rngs, classes=CLASSES, extra=False):
        self.l = nnx.Linear(DIN, classes, rngs=rngs)
        if extra:
            self.m = nnx.Linear(classes, classes, rngs=rngs)

    def __call__(self, x):
        return self.l(x), {}


class ExpNet(nnx.Module):
    """logits = W exp(x) + b: a finite input of 100 overflows float32 inside the model."""

    def __init__(self, rngs):
        self.l = nnx.Linear(DIN, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.l(jnp.exp(x)), {}


class MaskedNet(nnx.Module):
    """A constant -inf buffer (a mask on an unused 4th logit) is infinite on purpose."""

    def __init__(self, rngs):
        self.l = nnx.Linear(DIN, CLASSES + 1, rngs=rngs)
        self.mask = nnx.Variable(jnp.array([0.0] * CLASSES + [-jnp.inf]))

    def __call__(self, x):
        return self.l(x) + self.mask[...], {}


def nan_aux(model, x, key):
    return jnp.float32(jnp.nan) * jnp.sum(model.l.kernel[...])


RNG = np.random.default_rng(0)
X = RNG.normal(size=(N_TRAIN + N_TEST, DIN)).astype(np.float32)
Y = RNG.integers(0, CLASSES, size=N_TRAIN + N_TEST).astype(np.int32)


def make_ds(**overrides):
    parts = dict(x_train=X[:N_TRAIN], y_train=Y[:N_TRAIN], x_test=X[N_TRAIN:], y_test=Y[N_TRAIN:],
                 num_classes=CLASSES, name="toy", input_shape=(DIN,))
    parts.update(overrides)
    return Dataset(**parts)


def with_value(a, index, value):
    a = np.array(a, copy=True)
    a[index] = value
    return a


def cfg(**kw):
    base = dict(learning_rate=1e-2, total_steps=4, batch_size=BATCH, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def params_of(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def assert_close(a, b):
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-6), a, b)


def all_finite(tree):
    return all(np.isfinite(a).all() for a in jax.tree.leaves(tree))


class CountSteps:
    """A callback counting the records it sees (0 means fit failed before the first step)."""

    def __init__(self):
        self.records = []

    def __call__(self, record):
        self.records.append(record)


# ----------------------------------------------------------------------------- bad data, before training

# (id, dataset, model factory, exception type, text the message must contain)
BAD_DATA = [
    ("label-minus-one", lambda: make_ds(y_train=with_value(Y[:N_TRAIN], 5, -1)), Net,
     ValueError, "y_train[5] = -1"),
    ("label-equals-num-classes", lambda: make_ds(y_train=with_value(Y[:N_TRAIN], 7, CLASSES)), Net,
     ValueError, f"y_train[7] = {CLASSES}"),
    ("label-out-of-range-in-test-split", lambda: make_ds(y_test=with_value(Y[N_TRAIN:], 2, 9)), Net,
     ValueError, "y_test[2] = 9"),
    ("label-beyond-model-width-no-num-classes",
     lambda: types.SimpleNamespace(x_train=X[:N_TRAIN], y_train=with_value(Y[:N_TRAIN], 4, CLASSES),
                                   x_test=X[N_TRAIN:], y_test=Y[N_TRAIN:]), Net,
     ValueError, f"y_train[4] = {CLASSES}"),
    ("label-beyond-model-width-num-classes-too-big",
     lambda: make_ds(y_train=with_value(Y[:N_TRAIN], 6, 4), num_classes=5), Net,
     ValueError, f"the model outputs {CLASSES} logits"),
    ("float-labels", lambda: make_ds(y_train=Y[:N_TRAIN].astype(np.float32)), Net,
     TypeError, "y_train must hold integer class indices, got dtype float32"),
    ("one-hot-float-labels", lambda: make_ds(y_train=np.eye(CLASSES, dtype=np.float32)[Y[:N_TRAIN]]), Net,
     TypeError, "look one-hot"),
    ("one-hot-int-labels", lambda: make_ds(y_train=np.eye(CLASSES, dtype=np.int32)[Y[:N_TRAIN]],
                                           y_test=np.eye(CLASSES, dtype=np.int32)[Y[N_TRAIN:]]), Net,
     ValueError, "one-hot"),
    ("nan-input-train", lambda: make_ds(x_train=with_value(X[:N_TRAIN], (3, 1), np.nan)), Net,
     ValueError, "x_train[3] holds a non-finite value (nan)"),
    ("inf-input-train", lambda: make_ds(x_train=with_value(X[:N_TRAIN], (30, 0), -np.inf)), Net,
     ValueError, "x_train[30] holds a non-finite value (-inf)"),
    ("nan-input-test", lambda: make_ds(x_test=with_value(X[N_TRAIN:], (1, 2), np.nan)), Net,
     ValueError, "x_test[1]"),
    ("inf-input-test", lambda: make_ds(x_test=with_value(X[N_TRAIN:], (6, 3), np.inf)), Net,
     ValueError, "x_test[6] holds a non-finite value (inf)"),
    ("empty-train-split", lambda: make_ds(x_train=X[:0], y_train=Y[:0]), Net,
     ValueError, "train split is empty"),
    ("empty-test-split", lambda: make_ds(x_test=X[:0], y_test=Y[:0]), Net,
     ValueError, "test split is empty"),
    ("batch-larger-than-dataset", lambda: make_ds(x_train=X[:5], y_train=Y[:5]), Net,
     ValueError, "batch_size=8 is larger than the 5 training samples"),
    ("nan-initial-parameters", make_ds, lambda rngs: _poisoned(Net(rngs)),
     ValueError, "'l/kernel' holds non-finite values before training"),
    ("bool-labels", lambda: make_ds(y_train=Y[:N_TRAIN] > 0), Net,
     TypeError, "y_train must hold integer class indices, got dtype bool"),
    ("labels-with-an-extra-axis", lambda: make_ds(y_train=Y[:N_TRAIN, None], y_test=Y[N_TRAIN:, None]), Net,
     ValueError, "do not match the targets (8, 1)"),
    ("string-inputs", lambda: types.SimpleNamespace(x_train=X[:N_TRAIN].astype(str), y_train=Y[:N_TRAIN],
                                                    x_test=X[N_TRAIN:], y_test=Y[N_TRAIN:]), Net,
     TypeError, "x_train must be a numeric array"),
    ("inputs-and-labels-of-different-lengths",
     lambda: types.SimpleNamespace(x_train=X[:N_TRAIN], y_train=Y[:N_TRAIN - 1], x_test=X[N_TRAIN:],
                                   y_test=Y[N_TRAIN:]), Net,
     ValueError, "(31,)"),
    ("num-classes-not-an-integer",
     lambda: types.SimpleNamespace(x_train=X[:N_TRAIN], y_train=Y[:N_TRAIN], x_test=X[N_TRAIN:],
                                   y_test=Y[N_TRAIN:], num_classes="3"), Net,
     ValueError, "num_classes must be an integer >= 1"),
]


def _poisoned(model):
    model.l.kernel[...] = model.l.kernel[...].at[0, 0].set(jnp.nan)
    return model


@pytest.mark.parametrize("make_data, make_model, error, text",
                         [case[1:] for case in BAD_DATA], ids=[case[0] for case in BAD_DATA])
def test_bad_data_fails_before_the_first_step(make_data, make_model, error, text):
    model, seen = make_model(nnx.Rngs(0)), CountSteps()
    before = params_of(model)
    with pytest.raises(error) as info:
        fit(model, make_data(), cfg(), callbacks=[seen])
    assert text in str(info.value)
    assert seen.records == []  # nothing trained, nothing evaluated
    jax.tree.map(np.testing.assert_array_equal, params_of(model), before)


CONFIGS = [("zero-epochs", dict(total_steps=None, epochs=0), "epochs must be an integer >= 1, got 0"),
           ("infinite-learning-rate", dict(learning_rate=float("inf")),
            "learning_rate must be a finite number"),
           ("skip-nonfinite-not-a-bool", dict(skip_nonfinite=1), "skip_nonfinite must be a bool, got 1")]


@pytest.mark.parametrize("settings, text", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_bad_config_is_refused(settings, text):
    with pytest.raises((ValueError, TypeError), match=text):
        cfg(**settings)


# ----------------------------------------------------------------------------- non-finite steps


def _overflow_dataset(sample=13):
    """Finite inputs, one of which (x = 100) overflows exp() inside ExpNet."""
    return make_ds(x_train=with_value(X[:N_TRAIN], (sample, 2), 100.0)), sample


def _steps_with(x_train, y_train, config, predicate):
    """1-based steps of a run whose batch satisfies `predicate(xb)` (the data order is public)."""
    return [i + 1 for i, _, xb, _ in batch_stream(x_train, y_train, config.batch_size, seed=config.seed,
                                                  total_steps=config.total_steps) if predicate(xb)]


def test_finite_input_that_overflows_stops_with_last_finite_parameters():
    ds, _ = _overflow_dataset()
    config = cfg(total_steps=12)
    first_bad = _steps_with(ds.x_train, ds.y_train, config, lambda xb: (xb == 100.0).any())[0]
    model, snapshots = ExpNet(nnx.Rngs(0)), {}

    def snapshot(record):
        if record["kind"] == "train":
            snapshots[record["step"]] = params_of(model)

    with pytest.raises(NonFiniteError) as info:
        fit(model, ds, config, callbacks=[snapshot])
    e = info.value
    assert isinstance(e, RuntimeError) and e.step == first_bad and e.what == "loss"
    assert f"training step {first_bad} " in str(e) and "the loss is not finite" in str(e)
    assert not np.isfinite(e.record["loss"]) and len(e.history.train) == first_bad - 1
    assert all_finite(params_of(model))
    if first_bad > 1:  # the failing update was not applied
        jax.tree.map(np.testing.assert_array_equal, params_of(model), snapshots[first_bad - 1])


def test_huge_learning_rate_stops_and_checkpoints_only_finite_parameters(tmp_path):
    config = cfg(learning_rate=1e38, total_steps=8, checkpoint_dir=str(tmp_path), checkpoint_every=1,
                 clip_norm=None)
    model = Net(nnx.Rngs(0))
    with pytest.raises(NonFiniteError) as info:
        fit(model, make_ds(), config)
    step = info.value.step
    assert 1 < step <= 8 and f"training step {step} " in str(info.value)
    assert all_finite(params_of(model))
    assert not (tmp_path / str(step)).exists()  # no checkpoint of the failing step
    saved = Net(nnx.Rngs(1))
    meta = restore_checkpoint(tmp_path, saved)
    assert meta["step"] == step - 1 and all_finite(params_of(saved))
    jax.tree.map(np.testing.assert_array_equal, params_of(saved), params_of(model))


def test_nonfinite_extra_loss_is_named():
    with pytest.raises(NonFiniteError, match=r"training step 1 .*aux_loss=nan") as info:
        fit(Net(nnx.Rngs(0)), make_ds(), cfg(jacobian_reg=0.1), aux_loss_fn=nan_aux)
    assert info.value.what == "loss" and info.value.step == 1


def test_skip_mode_skips_and_counts_the_nonfinite_steps(tmp_path):
    ds, _ = _overflow_dataset()
    config = cfg(total_steps=12, skip_nonfinite=True, checkpoint_dir=str(tmp_path), checkpoint_every=3)
    bad = _steps_with(ds.x_train, ds.y_train, config, lambda xb: (xb == 100.0).any())
    assert 0 < len(bad) < 12
    model = ExpNet(nnx.Rngs(0))
    h = fit(model, ds, config)
    assert h.skipped_steps == len(bad)
    assert [r["step"] for r in h.train if r["skipped"]] == bad
    assert all(np.isfinite(r["loss"]) for r in h.train if not r["skipped"])
    assert all_finite(params_of(model))
    restored = ExpNet(nnx.Rngs(1))
    assert restore_checkpoint(tmp_path, restored)["step"] == 12 and all_finite(params_of(restored))


def test_skip_mode_with_every_step_nonfinite_leaves_the_model_as_it_was():
    ds = make_ds(x_train=np.full_like(X[:N_TRAIN], 100.0))  # every sample overflows exp()
    model = ExpNet(nnx.Rngs(0))
    before = params_of(model)
    h = fit(model, ds, cfg(skip_nonfinite=True))
    assert h.skipped_steps == 4 == len(h.train)
    jax.tree.map(np.testing.assert_array_equal, params_of(model), before)


def test_a_run_stopped_as_nonfinite_resumes_with_skipping_switched_on(tmp_path):
    ds, _ = _overflow_dataset()
    config = cfg(total_steps=12, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    with pytest.raises(NonFiniteError) as info:
        fit(ExpNet(nnx.Rngs(0)), ds, config)
    step = info.value.step
    h = fit(ExpNet(nnx.Rngs(3)), ds, cfg(total_steps=12, checkpoint_dir=str(tmp_path), checkpoint_every=1,
                                         skip_nonfinite=True))
    assert h.start_step == step - 1 and h.train[step - 1]["skipped"] == 1.0
    assert [r["step"] for r in h.train] == list(range(1, 13))


def test_train_step_never_applies_a_nonfinite_update():
    model = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x, y = jnp.asarray(X[:BATCH]), jnp.asarray(Y[:BATCH])
    train_step(model, opt, x, y)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(opt))), params_of(model)
    m = train_step(model, opt, x.at[2, 1].set(jnp.nan), y)
    assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
    jax.tree.map(np.testing.assert_array_equal, params_of(model), before[1])
    after_opt = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(opt)))
    for path, a in jax.tree_util.tree_flatten_with_path(after_opt)[0]:
        b = dict(jax.tree_util.tree_flatten_with_path(before[0])[0])[path]
        if np.issubdtype(a.dtype, np.floating):  # moments untouched; counters move on
            np.testing.assert_array_equal(a, b)


def test_an_infinite_buffer_on_purpose_is_not_taken_for_a_nonfinite_step(tmp_path):
    model = MaskedNet(nnx.Rngs(0))
    before = params_of(model)
    config = cfg(total_steps=8, checkpoint_dir=str(tmp_path))
    h = fit(model, make_ds(), config)
    assert h.skipped_steps == 0 and np.isfinite(h.metric("loss")).all()
    assert not np.array_equal(params_of(model)["l"]["kernel"], before["l"]["kernel"])
    again = fit(MaskedNet(nnx.Rngs(1)), make_ds(), config)  # the finished run's checkpoint restores
    assert again.start_step == 8


def test_train_step_refuses_an_update_that_overflows_from_a_finite_gradient():
    model = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(3e38), wrt=nnx.Param)  # finite rate, overflowing step
    before = params_of(model)
    m = train_step(model, opt, jnp.asarray(X[:BATCH]) * 10, jnp.asarray(Y[:BATCH]))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert float(m["skipped"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, params_of(model), before)


# ----------------------------------------------------------------------------- checkpoints

CKPT = dict(total_steps=6, checkpoint_every=2)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """Checkpoints of steps 2, 4, 6 of one run, and its final parameters."""
    root = tmp_path_factory.mktemp("golden")
    model = Net(nnx.Rngs(0))
    fit(model, make_ds(), cfg(checkpoint_dir=str(root), **CKPT))
    return root, params_of(model)


def _copy(golden, tmp_path):
    dest = tmp_path / "ckpt"
    shutil.copytree(golden[0], dest)
    return dest


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path: Path):
    path.write_bytes(bytes(255 - b for b in path.read_bytes()))


def _largest(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _empty(folder: Path):
    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# (id, damage(step_dir) -> None, text the warning must contain below the step directory)
DAMAGE = [
    ("truncated-array-file", lambda d: _truncate(_largest(d / "model" / "d")), "model"),
    ("garbled-array-file", lambda d: _garble(_largest(d / "model" / "d")), "model"),
    ("truncated-orbax-metadata", lambda d: _truncate(d / "model" / "_METADATA"), "model"),
    ("truncated-run-metadata", lambda d: _truncate(d / "meta" / "metadata"), "meta/metadata"),
    ("deleted-model-folder", lambda d: shutil.rmtree(d / "model"), ""),
    ("emptied-step-folder", _empty, "meta/metadata"),
    ("nan-parameters-from-an-older-version", lambda d: _nan_model(d / "model"), "model"),
]


def _nan_model(path: Path):
    """What the previous code saved after one NaN sample: every parameter NaN."""
    import orbax.checkpoint as ocp

    state = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), nnx.to_pure_dict(nnx.state(Net(nnx.Rngs(0)))))
    shutil.rmtree(path)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, state)


@pytest.mark.parametrize("damage, where", [c[1:] for c in DAMAGE], ids=[c[0] for c in DAMAGE])
def test_corrupt_latest_checkpoint_resumes_from_the_newest_intact_one(golden, tmp_path, damage, where):
    ckpt = _copy(golden, tmp_path)
    damage(ckpt / "6")
    model = Net(nnx.Rngs(5))
    with pytest.warns(UserWarning, match="resumed from the checkpoint of step 4") as caught:
        h = fit(model, make_ds(), cfg(checkpoint_dir=str(ckpt), **CKPT))
    message = " ".join(str(w.message) for w in caught)
    assert str(ckpt / "6" / where).rstrip("/") in message and "structure differs" not in message
    assert h.start_step == 4 and [r["step"] for r in h.train] == list(range(1, 7))
    assert_close(params_of(model), golden[1])
    assert (ckpt / "6.corrupt").is_dir()  # set aside, and step 6 written again
    assert restore_checkpoint(ckpt, Net(nnx.Rngs(6)))["step"] == 6


def test_two_corrupt_checkpoints_are_both_named_and_set_aside(golden, tmp_path):
    ckpt = _copy(golden, tmp_path)
    _truncate(_largest(ckpt / "6" / "model" / "d"))
    _truncate(ckpt / "4" / "meta" / "metadata")
    model = Net(nnx.Rngs(5))
    with pytest.warns(UserWarning, match="resumed from the checkpoint of step 2") as caught:
        h = fit(model, make_ds(), cfg(checkpoint_dir=str(ckpt), **CKPT))
    message = " ".join(str(w.message) for w in caught)
    assert str(ckpt / "6" / "model") in message and str(ckpt / "4" / "meta" / "metadata") in message
    assert h.start_step == 2 and (ckpt / "6.corrupt").is_dir() and (ckpt / "4.corrupt").is_dir()
    assert_close(params_of(model), golden[1])


def test_every_checkpoint_corrupt_is_an_error_naming_them_unless_asked_to_start_over(golden, tmp_path):
    ckpt = _copy(golden, tmp_path)
    for step in (2, 4, 6):
        _truncate(ckpt / str(step) / "meta" / "metadata")
    model, seen = Net(nnx.Rngs(0)), CountSteps()  # the golden run's initialization
    before = params_of(model)
    with pytest.raises(CheckpointError) as info:
        fit(model, make_ds(), cfg(checkpoint_dir=str(ckpt), **CKPT), callbacks=[seen])
    assert isinstance(info.value, RuntimeError) and seen.records == []
    assert info.value.paths == [str(ckpt / s) for s in ("6", "4", "2")]
    assert all(str(ckpt / s / "meta" / "metadata") in str(info.value) for s in ("2", "4", "6"))
    assert "resume=False" in str(info.value)
    jax.tree.map(np.testing.assert_array_equal, params_of(model), before)
    h = fit(model, make_ds(), cfg(checkpoint_dir=str(ckpt), **CKPT), resume=False)  # asked to start over
    assert h.start_step == 0
    assert_close(params_of(model), golden[1])


def test_restore_checkpoint_of_a_corrupt_step_names_its_path(golden, tmp_path):
    ckpt = _copy(golden, tmp_path)
    _truncate(_largest(ckpt / "4" / "model" / "d"))
    with pytest.raises(CheckpointError, match=str(ckpt / "4" / "model")):
        restore_checkpoint(ckpt, Net(nnx.Rngs(1)), step=4)
    assert restore_checkpoint(ckpt, Net(nnx.Rngs(1)), step=2)["step"] == 2


def test_checkpoint_of_a_different_model_keeps_the_structure_advice(golden, tmp_path):
    ckpt = _copy(golden, tmp_path)
    pattern = r"structure differs .*'m/kernel' is not in the checkpoint.*Build the model"
    with pytest.raises(ValueError, match=pattern) as info:
        fit(Net(nnx.Rngs(0), extra=True), make_ds(), cfg(checkpoint_dir=str(ckpt), **CKPT))
    assert not isinstance(info.value, CheckpointError)


CHANGED = [("learning-rate", dict(learning_rate=2e-2), "learning_rate: checkpoint 0.01 vs now 0.02"),
           ("clip-norm", dict(clip_norm=None), "clip_norm: checkpoint 1.0 vs now None"),
           ("batch-size", dict(batch_size=4), "batch_size: checkpoint 8 vs now 4")]


@pytest.mark.parametrize("change, text", [c[1:] for c in CHANGED], ids=[c[0] for c in CHANGED])
def test_resume_with_a_different_config_is_refused_and_leaves_the_model_untouched(golden, tmp_path, change,
                                                                                  text):
    ckpt = _copy(golden, tmp_path)
    model = Net(nnx.Rngs(5))
    before = params_of(model)
    with pytest.raises(ValueError, match="written by a run with different settings") as info:
        fit(model, make_ds(), cfg(checkpoint_dir=str(ckpt), **{**CKPT, **change}))
    assert text in str(info.value) and str(ckpt) in str(info.value)
    jax.tree.map(np.testing.assert_array_equal, params_of(model), before)


def _a_file(tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    return path, path


def _under_a_file(tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    return path / "ckpt", path


def _not_writable(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere it can create files: use a directory nobody can
        return Path("/proc/self"), Path("/proc/self")
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o500)
    return path, path


UNUSABLE = [("regular-file", _a_file, "is an existing file"),
            ("under-a-regular-file", _under_a_file, "which is an existing file"),
            ("not-writable", _not_writable, "is not a writable directory")]


@pytest.mark.parametrize("make_path, text", [c[1:] for c in UNUSABLE], ids=[c[0] for c in UNUSABLE])
def test_unusable_checkpoint_dir_fails_before_the_first_step(tmp_path, make_path, text):
    path, named = make_path(tmp_path)
    seen = CountSteps()
    with pytest.raises(ValueError, match="checkpoint_dir") as info:
        fit(Net(nnx.Rngs(0)), make_ds(), cfg(checkpoint_dir=str(path)), callbacks=[seen])
    assert text in str(info.value) and str(named) in str(info.value)
    assert seen.records == []
