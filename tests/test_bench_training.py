"""The training benchmarks run end to end in their smoke profiles and write complete results.

``benchmarks.deq_vs_explicit``, ``benchmarks.inference`` and ``benchmarks.test_time_compute``
are each run as ``python -m benchmarks.X --profile smoke --out DIR`` in a subprocess (the three
at once, so that they share the CPU cores), with ``DEQ_NO_PROGRESS=1``. Their cost is almost
all XLA compilation, so the subprocesses get ``XLA_FLAGS`` that lower XLA's backend
optimisation level (compilation about twice as fast; the smoke numbers are not measurements).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from benchmarks import _common as C  # noqa: E402

BENCHES = ("deq_vs_explicit", "inference", "test_time_compute")
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TIMEOUT_S = 1200


def _result(out: Path, name: str, suffix: str = ".json") -> Path:
    for stem in (name, f"{name}-gpu"):
        path = out / f"{stem}{suffix}"
        if path.exists():
            return path
    return out / f"{name}{suffix}"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_training")
    env = dict(os.environ, DEQ_NO_PROGRESS="1")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    env["PYTHONPATH"] = os.pathsep.join([str(C.REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    procs = {}
    for name in BENCHES:
        out = root / name
        procs[name] = (out, subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{name}", "--profile", "smoke", "--out", str(out)],
            cwd=C.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    runs = {}
    try:
        for name, (out, proc) in procs.items():
            stdout, _ = proc.communicate(timeout=TIMEOUT_S)
            runs[name] = {"out": out, "rc": proc.returncode, "stdout": stdout}
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return runs


def _load(smoke, name):
    run = smoke[name]
    assert run["rc"] == 0, f"{name} failed:\n{run['stdout'][-4000:]}"
    path = _result(run["out"], name)
    assert path.exists(), run["stdout"][-2000:]
    assert str(path) in run["stdout"]  # the script says where its table is
    data = json.loads(path.read_text())  # strict JSON
    assert data["profile"] == "smoke"
    assert data["settings"]
    assert len(data["environment"]["git"]["commit"]) == 40
    assert data["environment"]["versions"]["jax"]
    assert data["run_time_s"] > 0
    assert data["summary_table"]
    for fig in data["figures"].values():
        assert Path(fig).exists() and Path(fig).suffix == ".png" and str(fig) in run["stdout"]
    return run["out"], data


def _acc(a):
    return a is not None and 0.0 <= a <= 1.0


def test_deq_vs_explicit_smoke(smoke):
    out, data = _load(smoke, "deq_vs_explicit")
    assert _result(out, "deq_vs_explicit_digits", ".png").exists()
    assert _result(out, "deq_vs_explicit_solver_steps", ".png").exists()
    st = data["settings"]["datasets"]["digits"]
    res = data["results"]["digits"]
    assert set(res) == {"deq", "deq_jr", "unrolled", "resnet"}
    for kind, agg in res.items():
        assert agg["params"] > 0
        assert _acc(agg["final_accuracy"]["mean"]) and agg["final_accuracy"]["n"] == len(data["settings"]["seeds"])
        assert agg["final_loss"]["mean"] > 0
        assert agg["step_time_s"] > 0 and agg["step_cpu_s"] > 0
        assert agg["forward_steps"]["mean"] >= 1
        run = agg["runs"][0]
        n_eval = st["epochs"]
        for key in ("epoch", "train_time_s", "train_cpu_s", "test_accuracy", "test_loss"):
            assert len(run[key]) == n_eval, (kind, key)
        assert all(b >= a for a, b in zip(run["train_time_s"], run["train_time_s"][1:]))
        assert "time_to_target_s" in run and "compile_s" in run
        if kind in ("deq", "deq_jr"):
            assert len(run["train_forward_steps_epoch"]) == st["epochs"]
            assert 1 <= run["forward_steps_final"] <= st["solver"]["max_steps"]
            assert "backward_steps" in run
        else:
            assert agg["forward_steps"]["mean"] == st["depth"] == agg["depth"]
    # Same cell for the DEQ and its tied twin; the matched ResNet is within a few percent.
    assert res["deq"]["params"] == res["deq_jr"]["params"] == res["unrolled"]["params"]
    assert abs(res["resnet"]["params"] / res["deq"]["params"] - 1) < 0.1
    assert data["settings"]["params_resnet_equal_width"]["digits"] > res["deq"]["params"]
    assert res["deq_jr"]["runs"][0]["jac_penalty_epoch"][0] > 0
    assert data["targets"] and all(isinstance(t["passed"], bool) for t in data["targets"])
    assert "PASS" in smoke["deq_vs_explicit"]["stdout"] or "MISS" in smoke["deq_vs_explicit"]["stdout"]


def test_inference_smoke(smoke):
    out, data = _load(smoke, "inference")
    assert _result(out, "inference_digits", ".png").exists()
    res = data["results"]["digits"]
    budgets = data["settings"]["datasets"]["digits"]["budgets"]
    points = res["sweep"]["deq"]["anderson"]
    assert [p["max_steps"] for p in points] == budgets
    for p in points:
        assert _acc(p["accuracy"]) and p["eval_time_s"] > 0
        assert 1 <= p["mean_steps"] <= p["max_steps"]
        assert 0 <= p["converged_frac"] <= 1
    assert _acc(res["explicit"]["unrolled"]["accuracy"]) and res["explicit"]["unrolled"]["depth"] >= 1
    assert [p["depth"] for p in res["unrolled_any_depth"]] == budgets
    assert res["models"]["deq"]["params"] == res["models"]["unrolled"]["params"]
    assert "deq/anderson" in res["summary"]


def test_test_time_compute_smoke(smoke):
    out, data = _load(smoke, "test_time_compute")
    assert _result(out, "test_time_compute", ".png").exists()
    st = data["settings"]
    for sname in st["solvers"]:
        per = data["results"]["deq"][sname]
        assert set(per) == {str(L) for L in st["test_lengths"]}
        for L in st["test_lengths"]:
            assert set(per[str(L)]) == {str(b) for b in st["budgets"]}
            for b in st["budgets"]:
                cell = per[str(L)][str(b)]
                assert _acc(cell["token_accuracy"]["mean"]) and _acc(cell["sequence_accuracy"]["mean"])
                assert cell["mean_steps"]["mean"] <= b
    for kind in ("unrolled", "stack"):
        for L in st["test_lengths"]:
            assert _acc(data["results"]["explicit"][kind][str(L)]["token_accuracy"]["mean"])
    for key in ("unrolled_any_depth", "deq_last_iterate"):
        assert set(data["results"][key]) == {str(L) for L in st["test_lengths"]}
        assert set(data["results"][key][str(st["test_lengths"][0])]) == {str(b) for b in st["budgets"]}
    for kind, m in data["models"].items():
        assert m["params"] > 0 and m["step_time_median_s"] > 0 and _acc(m["train_length_test_accuracy"])
    assert data["models"]["deq"]["params"] == data["models"]["unrolled"]["params"] < data["models"]["stack"]["params"]
    longest = max(st["test_lengths"])
    pos = data["runs"][0]["deq"][st["solvers"][0]][str(longest)][str(st["budgets"][0])]["position_accuracy"]
    assert len(pos) == longest
    assert len(data["targets"]) == 3 and all(isinstance(t["passed"], bool) for t in data["targets"])


def test_missing_dataset_file_is_a_one_line_error(tmp_path):
    from benchmarks import deq_vs_explicit

    missing = tmp_path / "nope.npz"
    with pytest.raises(SystemExit) as e:
        deq_vs_explicit.main(["--profile", "smoke", "--out", str(tmp_path), "--mnist", str(missing)])
    msg = str(e.value)
    assert msg.startswith("error: --mnist") and str(missing) in msg and "\n" not in msg
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(SystemExit) as e:
        deq_vs_explicit.main(["--profile", "smoke", "--out", str(tmp_path), "--cifar", str(bad)])
    assert str(e.value).startswith("error: --cifar") and "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.json"))


def test_deq_vs_explicit_merge_keeps_other_runs_and_refuses_mixed_settings(tmp_path):
    from benchmarks import deq_vs_explicit as dve

    kinds = ["deq", "unrolled"]
    st = {"depth": 2, "solver": {"max_steps": 30}}

    def runs(seeds, acc):
        return {k: {"runs": [{"seed": s, "final_accuracy": acc} for s in seeds]} for k in kinds}

    previous = {
        "profile": "smoke", "environment": {"git": {"commit": "old"}},
        "settings": {"models": {k: k for k in kinds}, "seeds": [0, 1], "forward_solver": "old solver",
                     "datasets": {"digits": dict(st), "mnist1d": dict(st)},
                     "params_resnet_equal_width": {"digits": 1, "mnist1d": 2}},
        "results": {"digits": runs([0, 1], 0.5), "mnist1d": runs([0, 1], 0.5)},
    }
    (tmp_path / "deq_vs_explicit.json").write_text(json.dumps(previous))
    new_st = {"digits": {**st, "forward_solver": "old solver", "seeds": [1, 2]}}
    prev = dve.load_previous(tmp_path, "smoke", kinds, new_st, [1, 2])
    new_runs = {"digits": {k: v["runs"] for k, v in runs([1, 2], 0.9).items()}}
    settings = {"datasets": new_st, "params_resnet_equal_width": {"digits": 1}}
    provenance = {"digits": [{"seeds": [1, 2], "git": "new"}]}
    dve.merge_runs(prev, new_runs, settings, provenance)
    assert [(r["seed"], r["final_accuracy"]) for r in new_runs["digits"]["deq"]] == [(0, 0.5), (1, 0.9), (2, 0.9)]
    assert [r["seed"] for r in new_runs["mnist1d"]["unrolled"]] == [0, 1]  # not run: kept whole
    assert settings["datasets"]["digits"]["seeds"] == [0, 1, 2]
    assert settings["datasets"]["mnist1d"]["forward_solver"] == "old solver"
    assert [p["seeds"] for p in provenance["digits"]] == [[0], [1, 2]]
    # Seed 0 kept under other settings would pool runs of two configurations: refused.
    other = {"digits": {**st, "solver": {"max_steps": 100}, "seeds": [1]}}
    with pytest.raises(SystemExit, match="solver"):
        dve.load_previous(tmp_path, "smoke", kinds, other, [1])
    with pytest.raises(SystemExit, match="profile"):
        dve.load_previous(tmp_path, "full", kinds, new_st, [1, 2])


def test_validation_split_is_disjoint_from_training_and_test():
    import numpy as np

    from benchmarks import deq_vs_explicit as dve

    def rows(a):
        return {np.asarray(r).tobytes() for r in np.asarray(a).reshape(len(a), -1)}

    for name in ("digits", "mnist1d"):
        st = dve.dataset_settings("full", name)
        test = dve.load_dataset(name, st)
        val = dve.load_dataset(name, st, split="validation")
        if name == "mnist1d":  # fresh generated signals; the training split is unchanged
            assert np.array_equal(val.x_train, test.x_train) and len(val.x_test) == dve.MNIST1D_VALIDATION
        else:  # the tail of the training split, left out of training
            n = len(test.x_train)
            assert len(val.x_train) + len(val.x_test) == n
            assert len(val.x_test) == round(dve.VALIDATION_FRACTION * n)
            assert np.array_equal(np.concatenate([val.x_train, val.x_test]), test.x_train)
        assert not rows(val.x_test) & rows(val.x_train)
        assert not rows(val.x_test) & rows(test.x_test)
    with pytest.raises(ValueError, match="split"):
        dve.load_dataset("digits", dve.dataset_settings("full", "digits"), split="train")


def test_deq_vs_explicit_argument_errors(capsys):
    from benchmarks import deq_vs_explicit as dve

    for argv, word in ((["--models", "deq,mlp"], "--models"), (["--models", "deq,deq"], "--models"),
                       (["--jac-reg", "0"], "--jac-reg"), (["--split", "train"], "--split"),
                       (["--cell-hidden", "0"], "--cell-hidden"), (["--lipschitz", "1"], "--lipschitz"),
                       (["--lipschitz", "0"], "--lipschitz"), (["--learning-rate", "0"], "--learning-rate"),
                       (["--weight-decay", "-0.1"], "--weight-decay")):
        with pytest.raises(SystemExit):
            dve.parse_args(["--profile", "smoke", *argv])
        assert word in capsys.readouterr().err
    args = dve.parse_args(["--profile", "full", "--models", "unrolled_jr,deq"])
    assert args.models == ["deq", "unrolled_jr"]  # canonical order
    assert dve.parse_args(["--profile", "full"]).models == list(dve.KINDS["full"])


def test_jacobian_aux_loss_same_with_and_without_the_memo():
    import jax
    import numpy as np

    from benchmarks import deq_vs_explicit as dve

    ds = dve.load_dataset("digits", {"num_train": 8, "num_test": 8})
    st = {**dve.dataset_settings("smoke", "digits"), "jac_reg": 2.0}
    x = np.asarray(ds.x_train[:8])
    key = jax.random.key(3)
    for kind in dve.JR_MODELS:
        model = dve.build_model(kind, ds, st, 0)
        model(x)  # the forward pass lends its final state to the aux loss
        assert len(dve._FIXED_POINT_MEMO) == 1
        with_memo = float(dve.jacobian_aux_loss(model, x, key))
        assert not dve._FIXED_POINT_MEMO
        without = float(dve.jacobian_aux_loss(model, x, key))  # recomputes the state
        assert with_memo > 0 and np.isclose(with_memo, without, rtol=1e-5), kind


def test_jacobian_comparisons_report_both_twins():
    from benchmarks import deq_vs_explicit as dve

    def agg(acc):
        return {"final_accuracy": {"mean": acc}}

    res = {"mnist1d": {"deq_jr": agg(0.63), "unrolled": agg(0.635), "unrolled_jr": agg(0.65)},
           "digits": {"deq": agg(0.9)}}
    out = dve.model_comparisons(res)
    assert [c["models"] for c in out] == [["deq_jr", "unrolled"], ["deq_jr", "unrolled_jr"]]
    assert out[0]["text"].startswith("mnist1d (test): ")
    assert [c["within_1_point"] for c in out] == [True, False]
    assert "-2.00 points" in out[1]["text"]
    # A large-test-set accuracy is compared only where both models have one (merged old runs lack it).
    res["mnist1d"]["deq_jr"]["large_test_accuracy"] = {"mean": 0.62}
    res["mnist1d"]["unrolled_jr"]["large_test_accuracy"] = {"mean": None}
    res["mnist1d"]["unrolled"]["large_test_accuracy"] = {"mean": 0.64}
    out = dve.model_comparisons(res)
    assert [(c["models"][1], c["accuracy"]) for c in out] == [
        ("unrolled", "final_accuracy"), ("unrolled_jr", "final_accuracy"), ("unrolled", "large_test_accuracy")]


def test_validation_run_writes_its_own_file(tmp_path, monkeypatch):
    from benchmarks import deq_vs_explicit as dve

    monkeypatch.setenv("DEQ_NO_PROGRESS", "1")
    data = dve.main(["--profile", "smoke", "--split", "validation", "--models", "deq_jr,unrolled_jr",
                     "--jac-reg", "3", "--learning-rate", "1e-3", "--weight-decay", "0.1",
                     "--out", str(tmp_path), "--no-plot"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deq_vs_explicit_validation.json"]
    saved = json.loads((tmp_path / "deq_vs_explicit_validation.json").read_text())
    st = saved["settings"]["datasets"]["digits"]
    assert st["split"] == "validation" and st["jac_reg"] == 3.0
    assert (st["learning_rate"], st["weight_decay"], st["optimizer"]) == (1e-3, 0.1, "AdamW")
    assert set(saved["results"]["digits"]) == {"deq_jr", "unrolled_jr"} == set(data["results"]["digits"])
    assert saved["results"]["digits"]["unrolled_jr"]["runs"][0]["jac_penalty_epoch"][0] > 0
    assert [c["models"] for c in saved["comparisons"]] == [["deq_jr", "unrolled_jr"]]
    # The texts name the split the accuracies come from.
    assert saved["comparisons"][0]["text"].startswith("digits (validation): ")
    assert saved["targets"] == []  # the targets compare the plain DEQ, not trained here


def test_large_test_set_only_for_mnist1d_on_the_test_split():
    import numpy as np

    from benchmarks import deq_vs_explicit as dve

    x, y = dve.large_test_set("mnist1d")
    assert x.shape == (dve.MNIST1D_LARGE_TEST, 40) and y.shape == (dve.MNIST1D_LARGE_TEST,)
    assert set(np.unique(y)) == set(range(10))
    ds = dve.load_dataset("mnist1d", dve.dataset_settings("full", "mnist1d"))
    seen = {r.tobytes() for r in np.concatenate([ds.x_train, ds.x_test])}
    assert not any(r.tobytes() in seen for r in x)  # fresh signals, none from the splits
    assert dve.large_test_set("digits") is None and dve.large_test_set("mnist1d", "validation") is None


def test_cell_hidden_widens_every_model_alike():
    from flax import nnx

    from benchmarks import deq_vs_explicit as dve

    ds = dve.load_dataset("digits", {"num_train": 8, "num_test": 8})
    st = dve.dataset_settings("quick", "digits")
    wide = {**st, "cell_hidden": 2 * st["hidden"]}

    def params(kind, settings):
        return dve.count_params(nnx.eval_shape(lambda: dve.build_model(kind, ds, settings, 0)))

    # W1 (hidden -> cell_hidden), its bias and LayerNorm, W2 (cell_hidden -> hidden) grow with cell_hidden.
    extra = params("deq", wide) - params("deq", st)
    assert extra > 0
    assert params("unrolled", wide) - params("unrolled", st) == extra == params("deq_jr", wide) - params("deq_jr", st)
    assert abs(params("resnet", wide) / params("deq", wide) - 1) < 0.1  # matched to the new count


def test_contractive_models_share_a_proven_contraction():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks import deq_vs_explicit as dve

    ds = dve.load_dataset("digits", {"num_train": 8, "num_test": 8})
    st = dve.dataset_settings("quick", "digits")
    st["contractive"]["lipschitz"] = 0.5
    deq_model = dve.build_model("deq_contractive", ds, st, 0)
    twin = dve.build_model("unrolled_contractive", ds, st, 0)
    for model, cell in ((deq_model, deq_model.deq.cell), (twin, twin.cell)):
        assert isinstance(cell, dve.ContractiveDense) and cell.lipschitz_bound() == 0.5
        assert float(jnp.linalg.norm(cell.weight, 2)) <= 0.5  # the proven bound holds for the weights
    assert twin.depth == st["depth"]
    # Same seed, same parameters: the twin is the DEQ's cell unrolled from the same initialisation.
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                        nnx.state(deq_model.deq.cell, nnx.Param), nnx.state(twin.cell, nnx.Param))
    assert all(jax.tree.leaves(same))
    assert dve.count_params(deq_model) == dve.count_params(twin) < dve.count_params(dve.build_model("deq", ds, st, 0))
    _, info = deq_model(ds.x_test)
    assert float(info["converged_frac"]) == 1.0


def test_comparisons_of_the_contractive_deq():
    from benchmarks import deq_vs_explicit as dve

    res = {"digits": {k: {"final_accuracy": {"mean": a}} for k, a in
                      (("deq", 0.97), ("unrolled", 0.99), ("deq_contractive", 0.975), ("unrolled_contractive", 0.95))}}
    out = dve.model_comparisons(res)
    assert [c["models"][1] for c in out] == ["unrolled_contractive", "unrolled", "deq"]
    assert [round(c["difference"] * 100, 6) for c in out] == [2.5, -1.5, 0.5]
    assert [c["within_1_point"] for c in out] == [True, False, True]


def test_inference_certificates_of_the_contractive_deq_hold():
    """`eval_certified`'s guarantees against a near-exact solve: the bound covers the true
    distance to z*, and a prediction certified at a loose budget is the exact equilibrium's."""
    import jax.numpy as jnp

    import deq
    from benchmarks import deq_vs_explicit as dve
    from benchmarks import inference

    ds = dve.load_dataset("digits", {"num_train": 64, "num_test": 200})
    st = dve.dataset_settings("smoke", "digits")
    st["contractive"]["lipschitz"] = 0.6
    model = dve.build_model("deq_contractive", ds, st, 0)
    x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    u = model._encode(x)
    z_star = model.deq(u, solver=deq.FixedPointIteration(rtol=0.0, atol=1e-7, max_steps=2000))
    exact_pred = jnp.argmax(model.head(z_star), -1)
    previous = -1.0
    for steps in (1, 2, 4, 8, 60):
        solver = deq.FixedPointIteration(rtol=0.0, atol=1e-12, max_steps=steps)
        out = inference.eval_certified(model, x, y, solver)
        z = model.deq(u, solver=solver)
        # elementwise bound >= distance implies the same for the medians (up to float32 rounding,
        # which the certificate does not cover: a residual that rounds to 0 gives a 0 bound)
        distance = float(jnp.median(jnp.linalg.norm(z - z_star, axis=-1)))
        assert float(out["certified_bound_median"]) + 1e-6 >= distance
        agree = float(jnp.mean(jnp.argmax(model.head(z), -1) == exact_pred))
        assert float(out["certified_prediction_frac"]) <= agree  # certified predictions agree
        assert float(out["certified_prediction_frac"]) >= previous  # more steps certify more
        previous = float(out["certified_prediction_frac"])
    assert previous == 1.0 and float(out["certified_relative_bound_median"]) < 1e-4
