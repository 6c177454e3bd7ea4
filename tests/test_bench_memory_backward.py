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
    strategies = data["strategies"]
    assert {"IFT", "PhantomGrad", "JFB", "Unrolled"} <= set(strategies)
    for name, r in strategies.items():
        for key in ("init", "trained", "trained_ift_params"):
            c = r["cosine"][key]
            assert c is None or (_is_num(c) and -1 - 1e-9 <= c <= 1 + 1e-9), (name, key, c)
        assert _is_num(r["time_per_step_s"]) and r["time_per_step_s"] > 0
        assert _is_num(r["compile_s"])
        assert isinstance(r["memory"]["xla_temp_bytes"], int)
        assert _is_num(r["accuracy"]) and 0 <= r["accuracy"] <= 1
        assert len(r["accuracies"]) == len(data["settings"]["seeds"])
    # the exact reference is what IFT approximates: at initialisation they must agree closely
    assert strategies["IFT"]["cosine"]["init"] > 0.99
    assert data["exact_gradient_stats"]["forward_residual_max"] < 1e-8
