"""Data-parallel training on 4 (forced host) devices matches 1 device; the batch is sharded.

`--xla_force_host_platform_device_count` must be set before jax is imported, so the checks
run in a fresh Python subprocess that prints its results as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    r'''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from deq.data import Dataset
    from deq.train import TrainConfig, fit, make_mesh, make_optimizer, replicate, shard_batch, train_step

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(8, 32, rngs=rngs), nnx.Linear(32, 3, rngs=rngs)
        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x))), {"depth": 2.0}

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=64).astype(np.int32)
    config = TrainConfig(learning_rate=1e-2, total_steps=4, batch_size=16, progress=False)
    out = {"device_count": jax.device_count()}

    def one_step(devices):
        mesh = make_mesh(devices)
        model = replicate(MLP(nnx.Rngs(0)), mesh)
        opt = replicate(nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param), mesh)
        xb, yb = shard_batch((x[:16], y[:16]), mesh)
        m = train_step(model, opt, xb, yb, jax.random.key(0))
        params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        shards = {"x": len(xb.addressable_shards), "y": len(yb.addressable_shards),
                  "x_shard_shape": list(xb.addressable_shards[0].data.shape),
                  "spec": str(xb.sharding.spec),
                  "param_replicated": all(l.sharding.is_fully_replicated for l in jax.tree.leaves(nnx.state(model)))}
        return float(m["loss"]), float(m["grad_norm"]), params, shards

    loss4, gn4, p4, shards4 = one_step(jax.devices())
    loss1, gn1, p1, shards1 = one_step(jax.devices()[:1])
    out.update(loss4=loss4, loss1=loss1, grad_norm4=gn4, grad_norm1=gn1, shards4=shards4, shards1=shards1)
    out["max_param_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)))

    ds = Dataset(x, y, x[:20], y[:20], 3, "toy", (8,))
    h4 = fit(MLP(nnx.Rngs(1)), ds, config)
    h1 = fit(MLP(nnx.Rngs(1)), ds, config, mesh=make_mesh(jax.devices()[:1]))
    out["fit_losses4"], out["fit_losses1"] = h4.metric("loss").tolist(), h1.metric("loss").tolist()
    out["fit_test4"], out["fit_test1"] = h4.test_loss, h1.test_loss
    try:
        fit(MLP(nnx.Rngs(1)), ds, TrainConfig(total_steps=2, batch_size=6, progress=False))
        out["indivisible_error"] = None
    except ValueError as e:
        out["indivisible_error"] = str(e)
    print("RESULT " + json.dumps(out))
    '''
)


def run_with_devices(n: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_four_devices_match_one_device_and_shard_the_batch():
    out = run_with_devices(4)
    assert out["device_count"] == 4
    s4, s1 = out["shards4"], out["shards1"]
    assert s4["x"] == 4 and s4["y"] == 4 and s4["x_shard_shape"] == [4, 8] and "data" in s4["spec"]
    assert s1["x"] == 1 and s1["x_shard_shape"] == [16, 8]
    assert s4["param_replicated"] and s1["param_replicated"]
    assert abs(out["loss4"] - out["loss1"]) <= 1e-5
    assert abs(out["grad_norm4"] - out["grad_norm1"]) <= 1e-5
    assert out["max_param_diff"] <= 1e-5
    assert len(out["fit_losses4"]) == 4
    for a, b in zip(out["fit_losses4"], out["fit_losses1"]):
        assert abs(a - b) <= 1e-5
    assert abs(out["fit_test4"] - out["fit_test1"]) <= 1e-5
    err = out["indivisible_error"]
    assert err is not None and "batch_size=6" in err and "divisible by the number of devices (4)" in err
