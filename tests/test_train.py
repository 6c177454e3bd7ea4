"""Tests of deq.train: config, optimizer, steps, evaluation, fit, logging, exact resume."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deq
from deq.data import Dataset, iterate_batches
from deq.train import (
    History,
    TrainConfig,
    batch_stream,
    cross_entropy,
    epoch_seed,
    evaluate,
    fit,
    make_mesh,
    make_optimizer,
    make_schedule,
    replicate,
    restore_checkpoint,
    shard_batch,
    total_steps_for,
    train_step,
)

# ----------------------------------------------------------------------------- test models


class MLP(nnx.Module):
    """Explicit net: (logits, {"depth": 2}); optional dropout (RNG state in the model)."""

    def __init__(self, din=8, width=32, classes=3, *, dropout=0.0, rngs):
        self.l1 = nnx.Linear(din, width, rngs=rngs)
        self.l2 = nnx.Linear(width, classes, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None

    def __call__(self, x):
        h = nnx.relu(self.l1(x.reshape(x.shape[0], -1)))
        if self.drop is not None:
            h = self.drop(h)
        return self.l2(h), {"depth": 2.0}


class TinyDEQ(nnx.Module):
    """z* = tanh(W z + U x) solved by deq.fixed_point; W's nnx state goes through `args`.

    `deterministic` (set by model.eval()) switches to the eval solver budget and is reported
    as info["eval_mode"], so tests can see which mode produced a record.
    """

    def __init__(self, din=8, width=16, classes=3, *, train_steps=25, eval_steps=40, rngs):
        self.inp = nnx.Linear(din, width, rngs=rngs)
        self.cell = nnx.Linear(width, width, use_bias=False, rngs=rngs,
                               kernel_init=nnx.initializers.normal(0.3 / math.sqrt(width)))
        self.out = nnx.Linear(width, classes, rngs=rngs)
        self.deterministic = False
        self.train_steps, self.eval_steps = train_steps, eval_steps

    def _solve(self, u):
        graphdef, state = nnx.split(self.cell)

        def f(z, args):
            st, u_ = args
            return jnp.tanh(nnx.merge(graphdef, st)(z) + u_)

        steps = self.eval_steps if self.deterministic else self.train_steps
        # Plain iteration forward and adjoint: compiles faster than the Anderson defaults.
        solver = deq.FixedPointIteration(max_steps=steps)
        backward = deq.IFT(solver=deq.FixedPointIteration(max_steps=25))
        sol = deq.fixed_point(f, jnp.zeros_like(u), (state, u), solver=solver, backward=backward,
                              batch_axis=0)
        return sol

    def __call__(self, x):
        u = self.inp(x.reshape(x.shape[0], -1))
        sol = self._solve(u)
        info = {
            "forward_steps": jnp.mean(sol.stats.num_steps),
            "residual": jnp.max(sol.stats.residual_norm),
            "converged_frac": jnp.mean(sol.stats.converged),
            "eval_mode": jnp.float32(self.deterministic),
        }
        return self.out(sol.value), info

    def jacobian_penalty(self, x, key):
        """Hutchinson ||df/dz||_F^2 (at a cheap point z = tanh(Ux), not z*, to keep the test's
        compile small; a real hook evaluates it at the fixed point)."""
        from deq.regularize import jacobian_frobenius

        u = self.inp(x.reshape(x.shape[0], -1))
        graphdef, state = nnx.split(self.cell)

        def f(z, args):
            st, u_ = args
            return jnp.tanh(nnx.merge(graphdef, st)(z) + u_)

        z = jax.lax.stop_gradient(jnp.tanh(u))
        return jacobian_frobenius(f, z, (state, u), key, 1, batch_axis=0)


def jac_hook(model, x, key):
    return model.jacobian_penalty(x, key)


def toy_dataset(n_train=96, n_test=40, din=8, classes=3, seed=0):
    """Linearly separable-ish Gaussian blobs."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, din)).astype(np.float32) * 2.0

    def draw(n):
        y = rng.integers(0, classes, size=n).astype(np.int32)
        x = centers[y] + rng.normal(size=(n, din)).astype(np.float32)
        return x.astype(np.float32), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Dataset(x_train, y_train, x_test, y_test, classes, "toy", (din,))


@pytest.fixture(scope="module")
def ds():
    return toy_dataset()


def params_of(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def cfg(**kw):
    """Test configs share the optimizer settings, so `train_step` compiles once per model."""
    base = dict(learning_rate=1e-2, total_steps=12, warmup_steps=2, batch_size=16, progress=False)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- config / optimizer


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one of total_steps and epochs"):
        TrainConfig()
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(total_steps=10, epochs=2)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(total_steps=10, learning_rate=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(total_steps=10, batch_size=0)
    with pytest.raises(ValueError, match="log_dir"):
        TrainConfig(total_steps=10, tensorboard=True)
    c = TrainConfig(epochs=3, batch_size=10)
    with pytest.raises(Exception):
        c.batch_size = 5  # frozen
    assert total_steps_for(c, 105) == 30
    with pytest.raises(ValueError, match="total_steps"):
        make_optimizer(c)  # epochs-based: length unknown without the data
    make_optimizer(c, total_steps=30)


def test_schedule_warmup_then_cosine():
    s = make_schedule(TrainConfig(learning_rate=2.0, warmup_steps=4, total_steps=20))
    assert float(s(0)) == 0.0 and float(s(2)) == pytest.approx(1.0) and float(s(4)) == pytest.approx(2.0)
    assert float(s(12)) == pytest.approx(1.0, abs=1e-6) and float(s(20)) == pytest.approx(0.0, abs=1e-7)
    s0 = make_schedule(TrainConfig(learning_rate=1.0, total_steps=10))
    assert float(s0(0)) == 1.0  # no warm-up: starts at the peak


def test_optimizer_adamw_decays_and_clips():
    params = {"w": jnp.ones(3)}
    zero = {"w": jnp.zeros(3)}
    adam = make_optimizer(TrainConfig(total_steps=10, learning_rate=0.1, weight_decay=0.0))
    adamw = make_optimizer(TrainConfig(total_steps=10, learning_rate=0.1, weight_decay=0.5))
    u, _ = adam.update(zero, adam.init(params), params)
    assert np.allclose(u["w"], 0.0)
    u, _ = adamw.update(zero, adamw.init(params), params)
    assert np.allclose(u["w"], -0.1 * 0.5 * 1.0)  # decoupled decay: -lr * wd * w
    clip = make_optimizer(TrainConfig(total_steps=10, clip_norm=1.0))
    noclip = make_optimizer(TrainConfig(total_steps=10, clip_norm=None))
    assert len(clip.init(params)) == 2 and isinstance(noclip.init(params), tuple)
    # Memoized: equal settings give the same object (no recompilation across fit calls).
    assert make_optimizer(TrainConfig(total_steps=10, clip_norm=1.0, log_dir="x")) is clip


def test_cross_entropy_sequence_targets_and_shape_error():
    logits = jnp.zeros((2, 5, 4)).at[..., 1].set(3.0)
    losses, correct = cross_entropy(logits, jnp.ones((2, 5), jnp.int32))
    assert losses.shape == (2, 5) and float(correct.mean()) == 1.0
    with pytest.raises(ValueError, match="do not match the targets"):
        cross_entropy(jnp.zeros((2, 4)), jnp.zeros((3,), jnp.int32))


# ----------------------------------------------------------------------------- data order


def test_batch_stream_is_pure_function_of_seed_and_epoch():
    x = np.arange(20, dtype=np.float32)[:, None]
    y = np.arange(20)
    full = list(batch_stream(x, y, 6, seed=3, total_steps=10))  # 3 batches/epoch
    assert [s for s, *_ in full] == list(range(10))
    assert [e for _, e, *_ in full] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    for start in (0, 2, 4, 9):
        tail = list(batch_stream(x, y, 6, seed=3, start_step=start, total_steps=10))
        assert [b[3].tolist() for b in tail] == [b[3].tolist() for b in full[start:]]
    epoch1 = [yb.tolist() for _, yb in iterate_batches(x, y, 6, seed=epoch_seed(3, 1))]
    assert [b[3].tolist() for b in full[3:6]] == epoch1
    assert full[0][3].tolist() != full[3][3].tolist()  # epochs are reshuffled
    other = list(batch_stream(x, y, 6, seed=4, total_steps=3))
    assert [b[3].tolist() for b in other] != [b[3].tolist() for b in full[:3]]


# ----------------------------------------------------------------------------- steps / evaluate


def test_train_step_decreases_loss(ds):
    model = MLP(rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    x, y = jnp.asarray(ds.x_train[:32]), jnp.asarray(ds.y_train[:32])
    losses = [float(train_step(model, opt, x, y)["loss"]) for _ in range(8)]
    m = train_step(model, opt, x, y)
    assert losses[-1] < losses[0]
    assert set(m) == {"loss", "accuracy", "grad_norm", "skipped", "depth"} and float(m["depth"]) == 2.0
    assert float(m["skipped"]) == 0.0
    assert int(opt.step[...]) == 9


def test_evaluate_pads_last_batch_exactly(ds):
    model = MLP(rngs=nnx.Rngs(1))
    x, y = ds.x_test, ds.y_test  # 40 samples, batch 16: last batch has 8 real + 8 padded
    logits, _ = model(jnp.asarray(x))
    want_loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    want_acc = float((np.argmax(np.asarray(logits), -1) == y).mean())
    out = evaluate(model, x, y, 16)
    assert out["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert out["accuracy"] == pytest.approx(want_acc)
    assert out["depth"] == pytest.approx(2.0)
    assert evaluate(model, x, y, 40)["loss"] == pytest.approx(want_loss, rel=1e-5)

    class Clash(MLP):  # an info entry named like a trainer field is kept, renamed
        def __call__(self, x):
            logits, _ = super().__call__(x)
            return logits, {"loss": 7.0}

    out = evaluate(Clash(rngs=nnx.Rngs(1)), x, y, 40)
    assert out["model_loss"] == 7.0 and out["loss"] == pytest.approx(want_loss, rel=1e-5)


# ----------------------------------------------------------------------------- fit


def test_fit_mlp_records_and_eval_schedule(ds):
    model = MLP(rngs=nnx.Rngs(0))
    h = fit(model, ds, cfg(eval_every=5))
    assert isinstance(h, History)
    assert [r["step"] for r in h.train] == list(range(1, 13))
    assert [r["step"] for r in h.eval] == [5, 10, 12]
    r = h.train[5]
    assert {"kind", "step", "epoch", "loss", "accuracy", "grad_norm", "lr", "step_time", "depth"} <= set(r)
    assert r["epoch"] == 0 and h.train[-1]["epoch"] == 1  # 6 batches per epoch
    sched = make_schedule(cfg())
    assert h.metric("lr") == pytest.approx(np.asarray(sched(np.arange(12))), rel=1e-5, abs=1e-8)
    assert h.train[0]["lr"] == 0.0 and h.metric("loss")[-1] < h.metric("loss")[0]
    assert h.test_accuracy == h.eval[-1]["accuracy"] > 0.8
    assert h.test_loss == h.eval[-1]["loss"]
    assert h.steps_per_second > 0 and h.run_time > 0 and not h.stopped_early
    assert all(r["step_time"] > 0 for r in h.train)


def test_fit_matches_manual_loop(ds):
    config = cfg(seed=5)
    a, b = MLP(rngs=nnx.Rngs(2)), MLP(rngs=nnx.Rngs(2))
    h = fit(a, ds, config)
    mesh = make_mesh()
    opt = replicate(nnx.Optimizer(replicate(b, mesh), make_optimizer(config), wrt=nnx.Param), mesh)
    losses = []
    for _, _, xb, yb in batch_stream(ds.x_train, ds.y_train, 16, seed=5, total_steps=12):
        losses.append(float(train_step(b, opt, *shard_batch((xb, yb), mesh))["loss"]))
    np.testing.assert_allclose(h.metric("loss"), losses, rtol=1e-6)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-7), params_of(a), params_of(b))


def test_fit_deq_with_jacobian_hook_evaluates_in_eval_mode(ds):
    with pytest.raises(ValueError, match="aux_loss_fn"):
        fit(TinyDEQ(rngs=nnx.Rngs(0)), ds, cfg(jacobian_reg=0.1))
    model = TinyDEQ(rngs=nnx.Rngs(0))
    h = fit(model, ds, cfg(total_steps=6, eval_every=3, jacobian_reg=0.5), aux_loss_fn=jac_hook)
    assert all(r["eval_mode"] == 0.0 for r in h.train)
    assert [r["eval_mode"] for r in h.eval] == [1.0, 1.0]
    assert model.deterministic is False  # back in train mode
    for key in ("forward_steps", "residual", "converged_frac"):
        assert np.isfinite(h.metric(key)).all() and np.isfinite(h.metric(key, "eval")).all()
    assert 1 <= h.metric("forward_steps").min() and h.metric("forward_steps").max() <= 25
    aux = h.metric("aux_loss")
    assert np.isfinite(aux).all() and (aux > 0).all()
    assert h.metric("loss")[-1] < h.metric("loss")[0]


def test_fit_epochs(ds):
    h = fit(MLP(rngs=nnx.Rngs(0)), ds, cfg(total_steps=None, epochs=2), aux_loss_fn=jac_hook)
    assert len(h.train) == 12 and h.train[-1]["epoch"] == 1
    assert "aux_loss" not in h.train[0]  # jacobian_reg=0: the hook is off


def test_callback_stops_early(ds):
    seen = []

    def stop_at_3(record):
        seen.append((record["kind"], record["step"]))
        return record["kind"] == "train" and record["step"] == 3

    h = fit(MLP(rngs=nnx.Rngs(0)), ds, cfg(), callbacks=[stop_at_3])
    assert h.stopped_early and len(h.train) == 3
    assert [r["step"] for r in h.eval] == [3]
    assert seen == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]


def test_wrong_model_output_is_explained(ds):
    class Bare(nnx.Module):
        def __init__(self, rngs):
            self.l = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.l(x)

    with pytest.raises(TypeError, match=r"\(logits, info\)"):
        fit(Bare(nnx.Rngs(0)), ds, cfg())


def test_jsonl_and_tensorboard_logs(ds, tmp_path):
    h = fit(MLP(rngs=nnx.Rngs(0)), ds, cfg(eval_every=5, log_dir=str(tmp_path), tensorboard=True))
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(h.train) + len(h.eval) == 12 + 3
    kinds = [(r["kind"], r["step"]) for r in lines]
    assert kinds[4:7] == [("train", 5), ("eval", 5), ("train", 6)] and kinds[-2:] == [("train", 12), ("eval", 12)]
    assert lines[0]["loss"] == pytest.approx(h.train[0]["loss"])
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_tensorboard_missing_is_a_clear_error(ds, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorboardX", None)  # import now fails
    with pytest.raises(ImportError, match="pip install tensorboardX"):
        fit(MLP(rngs=nnx.Rngs(0)), ds, cfg(log_dir=str(tmp_path), tensorboard=True))


# ----------------------------------------------------------------------------- checkpoints


class Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted_run(ds, tmp_path):
    """2N steps uninterrupted == N steps + crash + resume on a fresh model (dropout RNG too)."""
    n = 6  # cfg() runs 12 steps
    make = lambda: MLP(dropout=0.2, rngs=nnx.Rngs(0))  # noqa: E731
    config = cfg(eval_every=4, seed=1)

    full_model = make()
    full = fit(full_model, ds, config)

    ckpt = cfg(eval_every=4, seed=1, checkpoint_dir=str(tmp_path / "ckpt"),
               checkpoint_every=n, log_dir=str(tmp_path / "log"))

    def kill_after_checkpoint(record):
        if record["kind"] == "train" and record["step"] == n + 2:
            raise Killed  # dies mid-way: steps n+1, n+2 are lost

    with pytest.raises(Killed):
        fit(make(), ds, ckpt, callbacks=[kill_after_checkpoint])
    resumed_model = MLP(dropout=0.2, rngs=nnx.Rngs(123))  # different init: all comes from the checkpoint
    resumed = fit(resumed_model, ds, ckpt)

    assert resumed.start_step == n
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-6),
                 params_of(full_model), params_of(resumed_model))
    np.testing.assert_allclose(resumed.metric("loss"), full.metric("loss"), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(resumed.metric("loss", "eval"), full.metric("loss", "eval"), rtol=1e-6)
    assert [r["step"] for r in resumed.eval] == [4, 8, 12]
    assert resumed.test_accuracy == pytest.approx(full.test_accuracy)
    # The log holds every step once, as if uninterrupted.
    lines = [json.loads(s) for s in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 2 * n + 1))

    # Resuming a finished run is a no-op that returns the same history.
    again = fit(MLP(dropout=0.2, rngs=nnx.Rngs(7)), ds, ckpt)
    assert len(again.train) == 2 * n and again.test_accuracy == pytest.approx(full.test_accuracy)

    # restore_checkpoint loads the final weights into a fresh model.
    fresh = MLP(dropout=0.2, rngs=nnx.Rngs(9))
    meta = restore_checkpoint(tmp_path / "ckpt", fresh)
    assert meta["step"] == 2 * n and meta["epoch"] == 2
    jax.tree.map(np.testing.assert_array_equal, params_of(fresh), params_of(full_model))

    # A different trajectory config refuses to resume; resume=False starts over.
    other = cfg(seed=2, checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="seed"):
        fit(make(), ds, other)
    restarted = fit(make(), ds, other, resume=False)  # deletes the old checkpoints
    assert restarted.start_step == 0
    assert restore_checkpoint(tmp_path / "ckpt", MLP(dropout=0.2, rngs=nnx.Rngs(9)))["config"]["seed"] == 2


def test_mesh_helpers_single_device():
    mesh = make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    x = shard_batch(np.zeros((4, 3), np.float32), mesh)
    assert len(x.addressable_shards) == jax.device_count()
    tree = replicate({"w": jnp.ones(2)}, mesh)
    assert tree["w"].sharding.is_fully_replicated
    model = replicate(MLP(rngs=nnx.Rngs(0)), mesh)
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(nnx.state(model)))
