"""benchmarks.batching: the smoke profile runs and records what the issue asks for (no timing asserted)."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import batching


def test_smoke_profile_records_streaming_and_compaction(tmp_path):
    payload = batching.main(["--profile", "smoke", "--out", str(tmp_path), "--no-plot"])
    saved = json.loads((tmp_path / "batching.json").read_text())
    assert saved["profile"] == "smoke" and "environment" in saved and len(saved["load_average_start"]) == 3
    r = payload["results"]["synthetic"]
    steps = r["steps"]
    assert steps["max_steps"] > steps["mean_steps"] > 0 and steps["ideal_speedup"] >= 1.0
    for key, v in r["stream"].items():
        assert v["identical_steps"] and v["identical_converged"] and v["max_value_diff"] < 1e-5, key
        assert v["samples_per_s"] > 0 and np.isfinite(r["vs_plain"][key]["fraction_of_ideal"])
    c = r["compact"]
    assert c["forward"]["speedup"] > 0 and c["max_value_diff"] < 1e-5
    assert [t["problem"] for t in payload["targets"]] == ["synthetic"]
