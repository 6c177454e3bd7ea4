"""benchmarks.solvers' banax peer: the skip record, the failure record, the float64 reference, the targets.

banax needs Python >= 3.12 and is not installed where the suite runs (CI): nothing here runs
banax. The float64 reference of ``benchmarks/banax_peer.py`` (NumPy only) is checked against
central finite differences.
"""

import importlib.util
import json
import sys

import numpy as np
import pytest

from benchmarks import banax_peer as P
from benchmarks import solvers as S


def test_missing_interpreter_is_one_line_and_a_record(monkeypatch, tmp_path):
    missing = str(tmp_path / "no-such-python")
    monkeypatch.setenv("DEQ_BANAX_PYTHON", missing)
    lines = []
    rec = S.run_banax(tmp_path / "problem.npz", {}, repeats=1, rounds=1, timeout=5.0, log=lines.append)
    assert rec == {"status": "skipped", "reason": f"DEQ_BANAX_PYTHON={missing} does not exist"}
    assert lines == [f"banax: skipped (DEQ_BANAX_PYTHON={missing} does not exist)"]
    assert S.banax_targets({}, rec) == []
    json.dumps(rec)


@pytest.mark.skipif(importlib.util.find_spec("banax") is not None, reason="banax importable by this interpreter")
def test_interpreter_without_banax_is_a_skip_with_the_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DEQ_BANAX_PYTHON", sys.executable)
    np.savez(tmp_path / "problem.npz", x=np.zeros((1, 1), np.float32))
    lines = []
    rec = S.run_banax(tmp_path / "problem.npz", {"contractive": np.zeros(3)}, repeats=1, rounds=1, timeout=60.0,
                      log=lines.append)
    assert rec["status"] == "skipped" and "banax" in rec["reason"] and rec["interpreter"] == sys.executable
    assert len(lines) == 1 and lines[0].startswith("banax: skipped (")


def _loss64(W, U, b, x):
    return P.reference64((W, U, b, x))[0].sum()


def test_float64_reference_matches_finite_differences():
    arrays = S.make_problem(0, hidden=6, batch=3, inp=4)
    params = [np.asarray(a, np.float64) for a in P.params_of(arrays, "hard")]
    z, grad, res = P.reference64(params)
    assert res < 1e-12
    fd, h = [], 1e-6
    for i in range(3):  # W, U, b
        for j in range(params[i].size):
            plus = [a.copy() for a in params]
            minus = [a.copy() for a in params]
            plus[i].flat[j] += h
            minus[i].flat[j] -= h
            fd.append((_loss64(*plus) - _loss64(*minus)) / (2 * h))
    np.testing.assert_allclose(grad, np.asarray(fd), rtol=1e-6, atol=1e-8)


def _row(steps, fwd, fb, converged=True, kind="solver"):
    return {"kind": kind, "steps": steps, "converged": converged, "forward_s": fwd, "forward_min_s": fwd,
            "forward_cpu_s": fwd, "forward_backward_s": fb, "forward_backward_min_s": fb, "forward_backward_cpu_s": fb}


def test_targets_compare_with_the_fewest_step_converged_solver():
    ours = {p: {S.OURS_ANDERSON: _row(9, 1.0, 2.0)} for p in (S.CONTRACTIVE, S.HARD)}
    banax = {"status": "measured", "results": {
        S.CONTRACTIVE: {"a": _row(9, 2.0, 5.0), "b": _row(8, 1.5, 3.0, converged=False),
                        "c": _row(5, 9.0, 9.0, kind="backward")},
        S.HARD: {"a": _row(20, 1.2, 3.0), "d": _row(10, 1.9, 4.1)}}}
    t = {x["target"]: x for x in S.banax_targets(ours, banax)}
    assert len(t) == 6
    con = [v for k, v in t.items() if k.startswith(S.CONTRACTIVE)]
    hard = [v for k, v in t.items() if k.startswith(S.HARD)]
    # contractive: best is "a" (9 steps; "b" did not converge, "c" is a backward row): 9 <= 9, 0.5x, 0.4x
    assert [v["passed"] for v in con] == [True, True, True] and "a 9 steps" in con[0]["measured"]
    # hard: best is "d" (10 steps): 9 <= 10; forward 1.0 / 1.9 = 0.53x <= 0.6; fwd+bwd 2.0 / 4.1 = 0.49x
    assert [v["passed"] for v in hard] == [True, True, True] and "d 10 steps" in hard[0]["measured"]
    banax["results"][S.HARD]["d"] = _row(8, 1.5, 3.0)
    hard = [x for x in S.banax_targets(ours, banax) if x["target"].startswith(S.HARD)]
    assert [v["passed"] for v in hard] == [False, False, False]
