"""`deq.train.fit` across 2 processes (2 host devices each, gloo CPU collectives), launched by
`python -m deq.launch`: the same losses and parameters as one process with 4 devices, a killed
run resumed from its checkpoint with the same results, and a clear error when the processes
disagree. Every subprocess runs under a short timeout, so nothing can hang CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent(
    r'''
    import deq.distributed as dd
    dd.initialize()
    import json, os, signal, sys, jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from deq.data import Dataset
    from deq.train import TrainConfig, fit

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)
        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x))), {}

    ckpt, kill_at, seed1 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32); y = rng.integers(0, 3, size=64).astype(np.int32)
    ds = Dataset(x, y, x[:16], y[:16], 3, "toy", (8,))
    seed = seed1 if jax.process_index() == 1 else 0
    cfg = TrainConfig(learning_rate=1e-2, total_steps=4, batch_size=16, progress=False, seed=seed,
                      checkpoint_dir=ckpt, checkpoint_every=2, log_dir=ckpt + "_log")

    def kill(record):
        if record["kind"] == "train" and record["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    model = MLP(nnx.Rngs(0))
    try:
        h = fit(model, ds, cfg, callbacks=[kill])
    except ValueError as e:
        print("ERROR " + json.dumps(str(e)), flush=True)
        sys.exit(0)
    params = [np.asarray(a).tolist() for a in jax.tree.leaves(jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))))]
    print("RESULT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
          "start": h.start_step, "losses": h.metric("loss").tolist(), "params": params}), flush=True)
    '''
)


def _run(tmp_path, args, *, processes):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if processes == 1:
        cmd = [sys.executable, str(script), *args]
        env["DEQ_CPU_DEVICES"] = "4"
    else:
        cmd = [sys.executable, "-m", "deq.launch", "--processes", str(processes), "--cpu-devices", "2",
               "--init-timeout", "30", "--timeout", "90", "--", str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    out = {}
    for line in proc.stdout.splitlines():
        tag = line.split("] ", 1)[-1]
        if tag.startswith("RESULT "):
            r = json.loads(tag[len("RESULT "):])
            out[r["process"]] = r
        elif tag.startswith("ERROR "):
            out.setdefault("errors", []).append(json.loads(tag[len("ERROR "):]))
    return proc.returncode, out, proc.stdout[-3000:] + proc.stderr[-3000:]


def _max_diff(a, b):
    import numpy as np

    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(a, b))


def test_two_processes_match_one_resume_after_kill_and_refuse_disagreement(tmp_path):
    rc, one, log = _run(tmp_path, [str(tmp_path / "one"), "0", "0"], processes=1)
    assert rc == 0 and one[0]["devices"] == 4, log
    # Two processes, killed after step 3 (the checkpoint of step 2 committed), relaunched: the
    # run resumes at step 2 and ends with the one-process run's losses and parameters.
    rc, killed, log = _run(tmp_path, [str(tmp_path / "kill"), "3", "0"], processes=2)
    assert rc != 0 and 0 not in killed, log
    rc, resumed, log = _run(tmp_path, [str(tmp_path / "kill"), "0", "0"], processes=2)
    assert rc == 0 and set(resumed) == {0, 1} and resumed[0]["devices"] == 4, log
    assert resumed[0]["start"] == 2 and resumed[1]["start"] == 2, log
    for p in (0, 1):
        assert len(resumed[p]["losses"]) == 4
        assert max(abs(a - b) for a, b in zip(resumed[p]["losses"], one[0]["losses"])) <= 1e-5
        assert _max_diff(resumed[p]["params"], one[0]["params"]) <= 1e-5
    assert resumed[0]["losses"] == resumed[1]["losses"]
    assert _max_diff(resumed[0]["params"], resumed[1]["params"]) == 0.0
    # Logged by process 0 only: steps 1-4 once each, step 3 at most twice (before the kill and
    # after the resume); both processes logging would give every step twice.
    steps = [json.loads(l)["step"] for l in (tmp_path / "kill_log" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert set(steps) == {1, 2, 3, 4} and len(steps) <= 5, steps
    # Process 1 with another seed: both processes refuse, naming what differs.
    rc, bad, log = _run(tmp_path, [str(tmp_path / "bad"), "0", "7"], processes=2)
    assert rc == 0 and len(bad.get("errors", [])) == 2, log
    assert all("disagree on config" in e and "same config" in e for e in bad["errors"])
