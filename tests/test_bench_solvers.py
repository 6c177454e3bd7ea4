"""The solvers benchmark runs end to end in its smoke profile and writes complete results."""

import json
import os
import sys

import pytest

pytest.importorskip("jaxopt")
pytest.importorskip("optimistix")
pytest.importorskip("lineax")
pytest.importorskip("matplotlib")

from benchmarks import _common as C  # noqa: E402
from benchmarks import solvers as S  # noqa: E402

PER_SOLVER = ("steps", "f_evals", "final_residual", "converged", "forward_s", "forward_backward_s",
              "ift_backward_s", "compile_s", "memory", "overhead", "trace", "grad_rel_error")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_solvers")
    os.environ.setdefault("DEQ_NO_PROGRESS", "1")
    payload = S.main(["--profile", "smoke", "--out", str(out)])
    return out, payload


def test_json_has_every_field(smoke):
    out, _ = smoke
    path = C.result_path(out, "solvers")
    data = json.loads(path.read_text())  # strict JSON (save_json refuses NaN literals)
    assert data["profile"] == "smoke"
    assert data["environment"]["git"]["commit"]
    assert data["problem"]["tolerance"] == S.TOL and data["problem"]["max_steps"] == S.MAX_STEPS
    assert set(data["results"]) == {S.CONTRACTIVE, S.HARD}
    torchdeq = data["torchdeq"]
    if torchdeq["status"] == "measured":
        expected = {*S.profile_solvers("smoke"), *S.TORCHDEQ_SOLVERS}
        assert torchdeq["num_threads"] >= 1 and torchdeq["device"] in ("cpu", "cuda")
    else:
        expected = set(S.profile_solvers("smoke"))
        assert torchdeq == {"status": "skipped", "reason": S.TORCHDEQ_MISSING, "error": torchdeq["error"]}
    assert set(data["solvers"]) == expected
    for problem, per in data["results"].items():
        assert set(per) == expected
        for name, rec in per.items():
            for key in PER_SOLVER:
                assert key in rec, (problem, name, key)
            assert rec["steps"] >= 1 and rec["f_evals"] >= 1
            assert rec["forward_s"] > 0 and rec["forward_backward_s"] > 0
            assert rec["final_residual"] is not None
            assert rec["memory"]["forward"] is None or rec["memory"]["forward"]["total_bytes"] > 0
            assert rec["memory"]["forward_backward"] is None or "temp_size_in_bytes" in rec["memory"]["forward_backward"]
        first = per[S.SOLVERS[0]]
        if problem == S.CONTRACTIVE:
            assert first["compile_s"]["forward"] > 0 and first["compile_s"]["forward_backward"] > 0
        else:
            assert first["compile_s"] is None and first["compile_shared_with"] == S.CONTRACTIVE
    # deq's own residual history is recorded in every profile.
    assert len(data["results"][S.CONTRACTIVE]["deq.Anderson"]["trace"]) >= 2
    assert {t["target"] for t in data["targets"]} and all(isinstance(t["passed"], bool) for t in data["targets"])
    assert data["run_time_s"] > 0
    # measured in quick and full only: the mixed-precision section and the fixed-tolerance adjoint rows
    assert data["precision"]["status"].startswith("skipped")
    for name in S.FIXED_ADJOINT_RTOL:
        assert name in S.profile_solvers("full") and name not in expected


def test_recomputed_residuals_agree_with_converged_flags(smoke):
    _, payload = smoke
    for per in payload["results"].values():
        for rec in per.values():
            assert rec["converged"] == (rec["final_residual"] <= S.TOL)
    # The contractive problem is solved by every solver; ours take gradients close to the reference.
    for name, rec in payload["results"][S.CONTRACTIVE].items():
        assert rec["converged"], name
    for name in ("deq.Anderson", "deq.Broyden"):
        assert payload["results"][S.CONTRACTIVE][name]["grad_rel_error"] < 1e-2


def test_figure_and_problem_file_exist(smoke):
    out, payload = smoke
    png = C.result_path(out, "solvers", suffix=".png")
    assert png.exists() and png.stat().st_size > 1000
    assert payload["figure"] == png.name
    npz = out / payload["problem"]["npz"]
    assert npz.exists() and npz.stat().st_size < 2**20


def test_torchdeq_rows(smoke):
    """When torchdeq is installed its rows are in the run: residuals recomputed, IFT gradients accurate."""
    _, payload = smoke
    if payload["torchdeq"]["status"] != "measured":
        pytest.skip(payload["torchdeq"]["reason"])
    for problem, per in payload["results"].items():
        for name in S.TORCHDEQ_SOLVERS:
            rec = per[name]
            assert rec["library"] == "torchdeq" and rec["compile_s"] is None
            assert len(rec["trace"]) == rec["steps"] + 1
            assert rec["trace"][-1] == pytest.approx(rec["final_residual"], rel=1e-6)
            if rec["converged"]:
                assert rec["grad_rel_error"] < 1e-2, (problem, name)
    assert any("torchdeq" in t["measured"] for t in payload["targets"])


def test_torchdeq_path_recomputes_the_residual():
    """torchdeq's solvers on the smoke problem: the float64 residual of the returned z is below the
    tolerance whenever torchdeq reports convergence, and the per-step trace ends on it."""
    torch = pytest.importorskip("torch")
    torchdeq = pytest.importorskip("torchdeq")
    shape = (4, 16)
    arrays = S.make_problem(0, hidden=16, batch=4, inp=8)
    for problem in (S.CONTRACTIVE, S.HARD):
        params = tuple(arrays[k] for k in (f"W_{problem}", "U", "b", "x"))
        for name in S.TORCHDEQ_SOLVERS:
            run = S.make_torchdeq(name, torch, torchdeq, params, shape, "cpu")
            z, info = run["forward"]()
            assert tuple(z.shape) == shape
            res = S.residual64(z.numpy(), params)
            assert res != info["library_residual"]  # float64, at the returned point: not torchdeq's number
            if info["library_residual"] < S.TOL:
                assert res <= S.TOL, (problem, name, res)
            else:
                assert info["f_evals"] >= S.MAX_STEPS or name == "torchdeq.Broyden", (problem, name)
            if problem == S.CONTRACTIVE:  # solved by each of them, as by every JAX library
                assert res <= S.TOL, name
            trace = run["trace"]()
            assert len(trace) == info["steps"] + 1 and trace[-1] == pytest.approx(res, rel=1e-6)


def test_torchdeq_missing_is_one_line_and_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdeq", None)  # makes `import torchdeq` raise ImportError
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    lines = []
    status, runs = S.setup_torchdeq({}, (4, 16), loop_len=2, ref_grads={}, log=lines.append)
    assert runs == {}
    assert status["status"] == "skipped" and status["reason"] == S.TORCHDEQ_MISSING
    # the import error is recorded: torch itself when it is absent (CI), else the blocked torchdeq
    assert ("torchdeq" in status["error"]) or ("No module named 'torch'" in status["error"])
    assert lines == [f"[{S.NAME}] {S.TORCHDEQ_MISSING}"]
    json.dumps(status)
