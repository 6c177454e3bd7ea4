"""`deq.train.fit` records the adjoint (backward) statistics of every training step.

The promise: each train record holds `backward_steps`, `backward_residual`,
`backward_converged_frac` and `backward_result` beside the forward statistics, equal to an
independent adjoint solve on the same batch and parameters; the parameters are those of a run
without the statistics; the probes are never updated, never checkpointed, and gone after `fit`;
models without a DEQ (or with a backward that solves no adjoint) are unchanged; a failing adjoint
shows up as unconverged; a failed solve with `throw=True` arrives as one `deq.SolveError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq
from deq.data import Dataset
from deq.train import (TrainConfig, batch_stream, cross_entropy, fit, make_optimizer,
                       restore_checkpoint, train_step)

BACKWARD = ("backward_steps", "backward_residual", "backward_converged_frac", "backward_result")


class TanhCell(nnx.Module):
    def __init__(self, n, rngs):
        self.W = nnx.Linear(n, n, use_bias=False, rngs=rngs,
                            kernel_init=nnx.initializers.normal(0.6 / math.sqrt(n)))

    def __call__(self, z, x):
        return jnp.tanh(self.W(z) + x)


def fpi(max_steps, rtol=1e-3):
    return deq.FixedPointIteration(rtol=rtol, atol=0.0, max_steps=max_steps)


class Net(nnx.Module):
    """Encoder, one (or two stacked) `deq.nn.DEQ` layers with plain iteration, linear head."""

    def __init__(self, din=8, width=16, classes=3, *, layers=1, backward=None, adjoint_steps=60,
                 throw=False, forward_steps=60, rngs):
        self.inp = nnx.Linear(din, width, rngs=rngs)
        backward = backward or deq.IFT(solver=fpi(adjoint_steps), warn=False)
        self.layers = nnx.List([
            deq.nn.DEQ(TanhCell(width, rngs), solver=fpi(forward_steps), backward=backward,
                       batch_axis=0, throw=throw)
            for _ in range(layers)])
        self.out = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, x):
        z = self.inp(x)
        for layer in self.layers:
            sol = layer(z, return_solution=True)
            z = sol.value
        return self.out(z), deq.nn.solution_info(sol)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1, self.l2 = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x))), {"depth": 2.0}


@pytest.fixture(scope="module")
def ds():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)).astype(np.float32) * 2.0
    y = rng.integers(0, 3, size=80).astype(np.int32)
    x = (centers[y] + rng.normal(size=(80, 8))).astype(np.float32)
    return Dataset(x[:64], y[:64], x[64:], y[64:], 3, "toy", (8,))


def cfg(**kw):
    return TrainConfig(**{**dict(learning_rate=1e-2, total_steps=4, batch_size=16, progress=False), **kw})


def params_of(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def assert_same_params(a, b):
    """Equal to float32 rounding: bitwise at XLA's default settings, but the test session's
    fast-compile flags (conftest.py) let the two compiled steps round a few sums differently."""
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6), params_of(a), params_of(b))


def state_paths(obj):
    return sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(obj)))


def independent_adjoint(model, x, y):
    """The one DEQ layer's adjoint solve re-run by hand: `u = J^T u + dL/dz*` at the fixed point,
    `L` the batch-mean cross-entropy (no probe involved)."""
    (layer,) = model.layers
    u = model.inp(x)
    z = jax.lax.stop_gradient(layer(u))
    g = jax.grad(lambda z_: jnp.mean(cross_entropy(model.out(z_), y)[0]))(z)
    graphdef, state = nnx.split(layer.cell)

    def fn(z_, params):
        return nnx.merge(graphdef, params[0])(z_, params[1])

    _, out = layer.backward.adjoint(fn, z, (state, u), g, False)
    return out


def test_records_match_an_independent_adjoint_solve_and_a_manual_loop(ds):
    config = cfg()
    model = Net(rngs=nnx.Rngs(0))
    history = fit(model, ds, config)
    assert not hasattr(model.layers[0], "backward_probe")  # the probes were for the run only

    manual = Net(rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(manual, make_optimizer(config), wrt=nnx.Param)
    expected = []
    for _, _, xb, yb in batch_stream(ds.x_train, ds.y_train, 16, seed=0, total_steps=4):
        out = jax.device_get(independent_adjoint(manual, jnp.asarray(xb), jnp.asarray(yb)))
        metrics = train_step(manual, opt, jnp.asarray(xb), jnp.asarray(yb))
        assert not set(BACKWARD) & set(metrics)  # no probes in this model: nothing extra
        expected.append((out, float(metrics["grad_norm"])))
    assert_same_params(model, manual)
    for record, (out, grad_norm) in zip(history.train, expected, strict=True):
        assert {"forward_steps", "residual", "converged_frac", *BACKWARD} <= set(record)
        assert record["backward_steps"] == pytest.approx(float(np.mean(out.num_steps)), rel=1e-6)
        assert record["backward_steps"] > 1
        assert record["backward_residual"] == pytest.approx(float(np.max(out.residual)), rel=1e-3)
        assert record["backward_converged_frac"] == float(np.mean(out.converged)) == 1.0
        assert record["backward_result"] == 0.0
        # the probes' gradient (its steps are ~10) is not in the gradient norm
        assert record["grad_norm"] == pytest.approx(grad_norm, rel=1e-6)
        assert record["skipped"] == 0.0


def test_backward_stats_off_gives_the_same_parameters_and_leaves_the_model_alone(ds):
    on, off = Net(rngs=nnx.Rngs(1)), Net(rngs=nnx.Rngs(1))
    paths = state_paths(on)
    h_on, h_off = fit(on, ds, cfg()), fit(off, ds, cfg(backward_stats=False))
    assert_same_params(on, off)
    assert state_paths(on) == state_paths(off) == paths
    assert all(set(BACKWARD) <= set(r) for r in h_on.train)
    assert not any(set(BACKWARD) & set(r) for r in h_off.train)
    np.testing.assert_allclose(h_on.metric("loss"), h_off.metric("loss"), rtol=1e-6)
    with pytest.raises(TypeError, match="backward_stats must be a bool"):
        TrainConfig(total_steps=1, backward_stats=1)


def test_models_without_an_adjoint_record_nothing_extra(ds):
    mlp = MLP(nnx.Rngs(0))
    history = fit(mlp, ds, cfg())
    assert not any(set(BACKWARD) & set(r) for r in history.train) and history.train[0]["depth"] == 2.0
    # JFB solves no adjoint: its probe would stay at zero and read "0% converged": no probe, no record
    jfb = Net(backward=deq.JFB(), rngs=nnx.Rngs(0))
    paths = state_paths(jfb)
    history = fit(jfb, ds, cfg())
    assert not any(set(BACKWARD) & set(r) for r in history.train)
    assert state_paths(jfb) == paths


class InfoClash(Net):
    """A model that reports its own `backward_steps` in info."""

    def __call__(self, x):
        logits, info = super().__call__(x)
        return logits, {**info, "backward_steps": jnp.float32(-7.0)}


def test_a_model_info_entry_named_like_the_adjoint_statistics_is_kept_apart(ds):
    history = fit(InfoClash(rngs=nnx.Rngs(0)), ds, cfg(total_steps=2))
    record = history.train[0]
    assert record["model_backward_steps"] == -7.0 and record["backward_steps"] > 1


def test_probes_the_user_enabled_are_kept_never_updated_and_never_in_the_optimizer(ds):
    model = Net(rngs=nnx.Rngs(2))
    assert deq.nn.enable_backward_stats(model) == 1
    seen = []

    def watch(record):
        if record["kind"] == "train":
            seen.append(np.asarray(model.layers[0].backward_probe.get_value()))

    history = fit(model, ds, cfg(), callbacks=[watch])
    assert len(seen) == 4 and all(np.array_equal(v, np.zeros(4, np.float32)) for v in seen)
    assert isinstance(model.layers[0].backward_probe, deq.nn.BackwardProbe)  # kept: it was the user's
    assert all(r["backward_steps"] > 1 for r in history.train)
    opt = nnx.Optimizer(model, make_optimizer(cfg()), wrt=nnx.Param)
    assert not any("backward_probe" in p for p in state_paths(opt))


def test_two_layers_aggregate_like_backward_stats_read_by_hand(ds):
    model = Net(layers=2, rngs=nnx.Rngs(3))
    reference = Net(layers=2, rngs=nnx.Rngs(3))
    deq.nn.enable_backward_stats(reference)
    xb, yb = next(batch_stream(ds.x_train, ds.y_train, 16, seed=0))[2:]
    xb, yb = jnp.asarray(xb), jnp.asarray(yb)

    def loss(m):
        return jnp.mean(cross_entropy(m(xb)[0], yb)[0])

    wrt = nnx.DiffState(0, nnx.Any(nnx.Param, deq.nn.BackwardProbe))
    stats = list(deq.nn.backward_stats(nnx.grad(loss, argnums=wrt)(reference)).values())
    assert len(stats) == 2
    record = fit(model, ds, cfg(total_steps=1)).train[0]
    assert record["backward_steps"] == pytest.approx(float(np.mean([s.num_steps for s in stats])), rel=1e-6)
    assert record["backward_residual"] == pytest.approx(float(np.max([s.residual_norm for s in stats])), rel=1e-3)
    assert record["backward_converged_frac"] == float(np.min([s.converged for s in stats]))


def test_a_failing_adjoint_is_recorded_unconverged_and_the_step_still_applies(ds):
    model = Net(adjoint_steps=1, rngs=nnx.Rngs(0))
    plain = Net(adjoint_steps=1, rngs=nnx.Rngs(0))
    history = fit(model, ds, cfg())
    fit(plain, ds, cfg(backward_stats=False))
    for r in history.train:
        assert r["backward_steps"] == 1.0 and r["backward_converged_frac"] < 1.0
        assert r["backward_result"] == float(deq.RESULTS.MAX_STEPS)
        assert r["backward_residual"] > 0 and math.isfinite(r["backward_residual"])
        assert r["skipped"] == 0.0  # a finite (if inexact) gradient is applied, as without the probes
        assert r["converged_frac"] == 1.0  # the forward solve converged
    assert_same_params(model, plain)


def test_throw_inside_fit_is_one_solve_error(ds, capfd):
    with pytest.raises(deq.SolveError, match="forward solve did not converge"):
        fit(Net(forward_steps=1, throw=True, rngs=nnx.Rngs(0)), ds, cfg(total_steps=2))
    with pytest.raises(deq.SolveError, match="backward"):
        fit(Net(adjoint_steps=1, throw=True, rngs=nnx.Rngs(0)), ds, cfg(total_steps=2))
    assert "Traceback" not in capfd.readouterr().err


def test_resume_with_the_statistics_and_from_a_checkpoint_without_probes(ds, tmp_path):
    full_model = Net(rngs=nnx.Rngs(4))
    full = fit(full_model, ds, cfg(total_steps=6))

    class Killed(Exception):
        pass

    def kill(record):
        if record["kind"] == "train" and record["step"] == 4:
            raise Killed

    for i, first_stats in enumerate((True, False)):  # False writes what the code before the probes wrote
        ckpt = cfg(total_steps=6, checkpoint_dir=str(tmp_path / f"ckpt{i}"), checkpoint_every=3)
        first = Net(rngs=nnx.Rngs(4))
        with pytest.raises(Killed):
            fit(first, ds, dataclasses.replace(ckpt, backward_stats=first_stats), callbacks=[kill])
        assert not hasattr(first.layers[0], "backward_probe")
        saved = restore_checkpoint(tmp_path / f"ckpt{i}", Net(rngs=nnx.Rngs(9)))  # a model without probes
        assert saved["step"] == 3
        resumed_model = Net(rngs=nnx.Rngs(5))
        resumed = fit(resumed_model, ds, ckpt)
        assert resumed.start_step == 3
        assert_same_params(resumed_model, full_model)
        for key in ("loss", *BACKWARD):
            want = full.metric(key)[3:]
            np.testing.assert_allclose(resumed.metric(key)[3:], want, rtol=1e-4)
        assert all(set(BACKWARD) <= set(r) for r in resumed.train[3:])
        assert first_stats == all(set(BACKWARD) <= set(r) for r in resumed.train[:3])
        # A model holding probes reads the same checkpoint (they are not part of it).
        probed = Net(rngs=nnx.Rngs(9))
        deq.nn.enable_backward_stats(probed)
        restore_checkpoint(tmp_path / f"ckpt{i}", probed)
        assert_same_params(probed, full_model)
        assert np.array_equal(np.asarray(probed.layers[0].backward_probe.get_value()), np.zeros(4))


SHARDED = textwrap.dedent(
    r'''
    import json, math
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import deq
    from deq.data import Dataset
    from deq.train import TrainConfig, fit, make_mesh

    class Cell(nnx.Module):
        def __init__(self, n, rngs):
            self.W = nnx.Linear(n, n, use_bias=False, rngs=rngs,
                                kernel_init=nnx.initializers.normal(0.6 / math.sqrt(n)))
        def __call__(self, z, x):
            return jnp.tanh(self.W(z) + x)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.inp, self.out = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)
            it = deq.FixedPointIteration(rtol=1e-3, atol=0.0, max_steps=60)
            self.deq = deq.nn.DEQ(Cell(16, rngs), solver=it, backward=deq.IFT(solver=it, warn=False), batch_axis=0)
        def __call__(self, x):
            sol = self.deq(self.inp(x), return_solution=True)
            return self.out(sol.value), deq.nn.solution_info(sol)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=64).astype(np.int32)
    ds = Dataset(x, y, x[:16], y[:16], 3, "toy", (8,))
    config = TrainConfig(learning_rate=1e-2, total_steps=3, batch_size=16, progress=False)
    out = {"devices": jax.device_count()}
    for name, devices in (("four", jax.devices()), ("one", jax.devices()[:1])):
        h = fit(Net(nnx.Rngs(0)), ds, config, mesh=make_mesh(devices))
        out[name] = {k: h.metric(k).tolist() for k in ("loss", "backward_steps", "backward_residual",
                                                       "backward_converged_frac")}
    print(json.dumps(out))
    '''
)


def test_data_parallel_fit_records_the_same_adjoint_statistics():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    four, one = out["four"], out["one"]
    assert four["backward_converged_frac"] == one["backward_converged_frac"] == [1.0] * 3
    np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(four["backward_steps"], one["backward_steps"], rtol=1e-6)
    np.testing.assert_allclose(four["backward_residual"], one["backward_residual"], rtol=1e-3)
