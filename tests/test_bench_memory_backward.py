"""Smoke runs of ``benchmarks.memory`` and ``benchmarks.backward``: they run, and write complete results.

Both benchmarks run as subprocesses (``python -m benchmarks.<name> --profile smoke --out TMP``)
at the same time, so the two smoke profiles take the wall time of the slower one. The tests
check the structure of the JSON (every required field present, finite where it must be) and that
the figures exist; they assert nothing about the measured values beyond sanity (benchmarks
measure, tests assert only that the measurement happened).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import _common as C

REPO = Path(__file__).resolve().parent.parent
BENCHES = ("memory", "backward")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    """Run both smoke profiles concurrently; return {name: (json dict, out dir)}."""
    env = dict(os.environ, DEQ_NO_PROGRESS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    procs = {}
    for name in BENCHES:
        out = tmp_path_factory.mktemp(name)
        procs[name] = (out, subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{name}", "--profile", "smoke", "--out", str(out)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    results = {}
    for name, (out, proc) in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"benchmarks.{name} --profile smoke timed out\n{stderr[-3000:]}")
        assert proc.returncode == 0, f"benchmarks.{name} failed:\n{stdout[-2000:]}\n{stderr[-3000:]}"
        path = C.result_path(out, name)
        assert path.exists(), f"{path} not written; stdout:\n{stdout[-2000:]}"
        results[name] = (json.loads(path.read_text()), out, stdout)
    return results


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_environment(data):
    env = data["environment"]
    assert env["git"] is not None and len(env["git"]["commit"]) == 40
    assert env["versions"]["jax"]
    assert _is_num(data["wall_time_s"]) and data["wall_time_s"] > 0


@pytest.mark.parametrize("name", BENCHES)
def test_figure_and_table(smoke_results, name):
    data, out, stdout = smoke_results[name]
    png = C.result_path(out, name, ".png")
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in stdout
    _check_environment(data)
    assert data["profile"] == "smoke"


def test_memory_fields(smoke_results):
    data, _, _ = smoke_results["memory"]
    depths = data["settings"]["depths"]
    assert len(depths) >= 2
    for method in ("deq", "unrolled"):
        rows = {p["depth"]: p for p in data["points"] if p["method"] == method}
        assert sorted(rows) == sorted(depths), method
        for depth, p in rows.items():
            assert _is_num(p["peak_rss_delta_mib"]) and p["peak_rss_delta_mib"] > 0
            assert _is_num(p["exec_peak_delta_mib"])
            assert isinstance(p["xla_temp_bytes"], int) and p["xla_temp_bytes"] >= 0
            assert p["xla"]["temp_size_in_bytes"] == p["xla_temp_bytes"]
            # the DEQ really ran `depth` forward steps
            assert p["num_steps_min"] == p["num_steps_max"] == depth and p["steps_ok"]
            assert p["grad_finite"]
    s = data["summary"]
    for method in ("deq", "unrolled"):
        assert _is_num(s[method]["slope_peak_rss_mib_per_depth"])
        assert _is_num(s[method]["slope_xla_temp_mib_per_depth"])
    assert isinstance(s["target"]["held"], bool)
    # structural sanity: the unrolled net stores activations per step, the DEQ does not
    un = {p["depth"]: p["xla_temp_bytes"] for p in data["points"] if p["method"] == "unrolled"}
    dq = {p["depth"]: p["xla_temp_bytes"] for p in data["points"] if p["method"] == "deq"}
    assert un[depths[-1]] > un[depths[0]]
    assert dq[depths[-1]] == dq[depths[0]]


def test_backward_fields(smoke_results):
    data, _, _ = smoke_results["backward"]
    assert data["settings"]["datasets"] == ["digits"] == list(data["datasets"])
    res = data["datasets"]["digits"]
    strategies = res["strategies"]
    assert {"IFT", "PhantomGrad", "JFB", "Unrolled", "SHINE"} <= set(strategies)
    for name, r in strategies.items():
        for key in ("init", "trained", "trained_ift_params"):
            c = r["cosine"][key]
            assert c is None or (_is_num(c) and -1 - 1e-9 <= c <= 1 + 1e-9), (name, key, c)
        assert _is_num(r["time_per_step_s"]) and r["time_per_step_s"] > 0
        assert _is_num(r["compile_s"])
        assert isinstance(r["memory"]["xla_temp_bytes"], int)
        assert _is_num(r["accuracy"]) and 0 <= r["accuracy"] <= 1
        assert len(r["accuracies"]) == len(data["settings"]["seeds"])
        for t in r["training"]:
            assert _is_num(t["backward_steps_mean"]) and _is_num(t["forward_steps_mean"])
    # the adjoint statistics come through: IFT solves an adjoint, JFB and SHINE(refine=0) do not
    assert strategies["IFT"]["training"][0]["backward_steps_mean"] > 0
    assert strategies["JFB"]["training"][0]["backward_steps_mean"] == 0
    assert strategies["SHINE"]["training"][0]["backward_steps_mean"] == 0
    # the exact reference is what IFT approximates: at initialisation they must agree closely
    assert strategies["IFT"]["cosine"]["init"] > 0.99
    assert res["exact_gradient_stats"]["forward_residual_max"] < 1e-8


# --- cheap checks of what only the quick/full profiles run (no training, no subprocess) -----


def test_backward_rows_of_every_profile():
    from benchmarks import backward as B

    assert B.strategy_names("smoke") == B.STRATEGIES + B.SMOKE_EXTRA
    quick = B.strategy_names("quick")
    assert quick == B.strategy_names("full")
    new = ("IFT-Broyden", "SHINE", "SHINE-refine", "IFT-warm", "IFT-RevIter", "Reversible")
    assert set(new) <= set(quick) and len(set(quick)) == len(quick)
    described = {s: B.describe(s) for s in quick}  # builds every row's backward and solver
    for s in ("IFT-Broyden", "SHINE", "SHINE-refine"):
        assert "Broyden(" in described[s] and "max_steps=30" in described[s], described[s]
    assert f"SHINE(refine={B.SHINE_REFINE})" in described["SHINE-refine"]
    for s in ("IFT-RevIter", "Reversible"):
        assert f"ReversibleIteration(" in described[s] and f"damping={B.REVERSIBLE_DAMPING}" in described[s]
    assert described["Reversible"].startswith("backward=Reversible(")
    assert "adjoint_init" in described["IFT-warm"] and "adjoint_init" not in described["IFT"]
    assert B.evals_per_step(B.make_solver("Reversible")) == 2 and B.evals_per_step(B.make_solver("SHINE")) == 1
    assert B.default_datasets("smoke") == ["digits"] and B.default_datasets("quick") == ["digits", "mnist1d"]
    assert B.parse_args(["--datasets", "mnist1d"]).datasets == ["mnist1d"]
    with pytest.raises(SystemExit):
        B.parse_args(["--datasets", "digits,cifar"])


def test_backward_batch_indices_follow_iterate_batches():
    import numpy as np

    from benchmarks import backward as B
    from deq.data import iterate_batches

    x, y = np.arange(22)[:, None] * 10, np.arange(22)
    want = [yb for _, yb in iterate_batches(x, y, 4, seed=3, epochs=3)][:12]  # 5 batches per epoch
    got = list(B.batch_indices(22, 4, 3, 12))
    assert len(got) == 12
    for idx, yb in zip(got, want):
        np.testing.assert_array_equal(y[idx], yb)


def test_backward_adjoint_bank_updates_only_the_batch():
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import backward as B

    bank = jnp.arange(12.0).reshape(6, 2)
    new = B.update_bank(bank, np.array([4, 1]), jnp.array([[-1.0, -2.0], [-3.0, -4.0]]))
    want = np.arange(12.0).reshape(6, 2)
    want[4], want[1] = [-1, -2], [-3, -4]
    np.testing.assert_array_equal(new, want)
    np.testing.assert_array_equal(bank, np.arange(12.0).reshape(6, 2))  # the old bank is unchanged


def test_memory_reversible_point_runs_its_steps():
    from benchmarks import memory as M

    assert set(M.SMOKE_METHODS) < set(M.METHODS) and set(M.REVERSIBLE) <= set(M.METHODS)
    p = M.measure_point("reversible", width=4, batch=2, depth=3, cell="tanh")  # one compile, ~2 s
    assert p["num_steps_min"] == p["num_steps_max"] == 3 and p["grad_finite"], p
    assert isinstance(p["xla"]["temp_size_in_bytes"], int)


def test_backward_warm_step_returns_the_adjoint_it_restarts_from():
    import jax.numpy as jnp
    import numpy as np
    import optax

    from benchmarks import backward as B

    arch = {"in_features": 5, "hidden": 4, "use_norm": False}
    graphdef, params, probes, rest = B.strategy_model("IFT-warm", arch, 0)
    tx = optax.adam(1e-3)
    step = B.make_train_step(graphdef, probes, rest, tx, warm=True)
    x, y = jnp.linspace(-1.0, 1.0, 15).reshape(3, 5), jnp.array([0, 1, 2])
    opt = tx.init(params)
    *_, info0, g0, u1 = step(params, opt, x, y, jnp.zeros((3, 4)))
    *_, info1, g1, u2 = step(params, opt, x, y, u1)  # same parameters: the solved adjoint again
    assert u1.shape == (3, 4) and float(jnp.abs(u1).max()) > 0
    assert float(info0["backward_steps"]) >= 1 and float(info1["backward_steps"]) <= 1
    np.testing.assert_allclose(u2, u1, atol=1e-4)
    np.testing.assert_allclose(B.flat(g1), B.flat(g0), rtol=1e-3, atol=1e-5)
