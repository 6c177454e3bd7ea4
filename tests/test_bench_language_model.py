"""benchmarks.language_model runs end to end in its smoke profile and writes complete results.

Run in-process (the session's fast-compile XLA flags apply, see tests/conftest.py) on the DEQ
alone, to stay near the CI budget (the memory sweep still compiles the DEQ and the tied twin); the
quick profile runs all five models.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import language_model as lm


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_smoke")
    lm.main(["--profile", "smoke", "--models", "deq", "--no-plot", "--out", str(out)])
    return json.loads((out / "language_model.json").read_text())


def test_smoke_writes_every_measurement(smoke):
    s = smoke["settings"]
    r = smoke["models"]["deq"]
    assert set(smoke["models"]) == {"deq"}
    assert r["curve"] and r["curve"][-1]["step"] == s["steps"]
    assert 0 < r["test"]["bpc"] < 10 and r["validation"]["windows"] == s["eval_windows"]
    assert r["mean_forward_steps"] > 0 and r["mean_backward_steps"] > 0
    assert [b["budget"] for b in smoke["test_time"]["deq"]] == s["budgets"]
    assert all(b["mean_steps"] <= b["budget"] for b in smoke["test_time"]["deq"])
    assert smoke["causality"]["max_change_at_or_after"] > smoke["causality"]["max_change_before"]
    assert {"load_average", "environment", "targets", "corpus"} <= set(smoke)


def test_smoke_memory_flat_for_the_deq_and_growing_for_the_tied_twin(smoke):
    """XLA's buffer assignment (compiled, not timed): the IFT-differentiated DEQ's step memory
    does not depend on max_steps; the unrolled twin's grows with its depth."""
    rows = {(r["kind"], r["depth"]): r["temp_size_in_bytes"] for r in smoke["memory"]
            if r["seq_len"] == smoke["settings"]["seq_len"]}
    d0, d1 = smoke["settings"]["mem_depths"][:2]
    assert rows[("deq", d0)] == rows[("deq", d1)]
    assert rows[("tied", d1)] > rows[("tied", d0)]


def test_unknown_model_is_refused():
    with pytest.raises(SystemExit, match="unknown --models"):
        lm.main(["--profile", "smoke", "--models", "deq,gpt"])
