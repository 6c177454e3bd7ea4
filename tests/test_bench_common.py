"""Tests for the shared benchmark infrastructure in ``benchmarks/_common.py``."""

import json
from pathlib import Path
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import _common as C


def test_save_json_writes_environment_and_converts_values(tmp_path):
    payload = {
        "np_scalar": np.float32(1.5),
        "np_int": np.int64(7),
        "np_bool": np.bool_(True),
        "np_array": np.arange(3),
        "jax_array": jnp.ones((2, 2)),
        "jax_scalar": jnp.float32(2.0),
        "nan": float("nan"),
        "np_nan": np.array([1.0, np.nan, np.inf, -np.inf]),
        "tuple": (1, 2),
        "int_keys": {1: "a"},
        "path": tmp_path,
    }
    path = C.save_json(tmp_path / "sub", "bench", payload)
    assert path.exists() and path.suffix == ".json"
    assert path.name == ("bench-gpu.json" if C.is_gpu() else "bench.json")
    data = json.loads(path.read_text())  # strict: no NaN literals
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert data["np_scalar"] == 1.5
    assert data["np_int"] == 7
    assert data["np_bool"] is True
    assert data["np_array"] == [0, 1, 2]
    assert data["jax_array"] == [[1.0, 1.0], [1.0, 1.0]]
    assert data["jax_scalar"] == 2.0
    assert data["nan"] is None
    assert data["np_nan"] == [1.0, None, "inf", "-inf"]
    assert data["tuple"] == [1, 2]
    assert data["int_keys"] == {"1": "a"}
    assert data["path"] == str(tmp_path)

    env = data["environment"]
    for key in ("platform", "machine", "cpu_count", "python", "jax_backend", "devices",
                "versions", "git", "timestamp_utc", "hostname"):
        assert key in env
    for lib in ("jax", "jaxlib", "flax", "optax", "jaxopt", "optimistix", "numpy", "torch", "torchdeq"):
        assert lib in env["versions"]
    assert env["versions"]["jax"] == jax.__version__
    assert env["git"] is not None and len(env["git"]["commit"]) == 40
    assert isinstance(env["git"]["dirty"], bool)


def test_time_fn_reports_compile_and_median():
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((64, 64))
    r = C.time_fn(f, x, warmup=1, repeats=5)
    assert r["compile_s"] > 0 and r["median_s"] > 0
    assert r["repeats"] == 5 and len(r["times_s"]) == 5
    assert r["min_s"] <= r["median_s"] <= r["max_s"]
    assert r["iqr_s"] >= 0
    # The first call compiles, so it must be slower than a typical later call.
    assert r["compile_s"] > r["median_s"]


def test_compile_time_and_xla_memory():
    f = jax.jit(lambda x: jnp.sin(x) @ x.T)
    x = jnp.ones((32, 32))
    ct = C.compile_time(f, x)
    assert ct["lower_s"] > 0 and ct["compile_s"] > 0
    assert math.isclose(ct["total_s"], ct["lower_s"] + ct["compile_s"])
    mem = C.xla_memory(f, x)
    if mem is not None:  # backend-dependent
        assert mem["argument_size_in_bytes"] == 32 * 32 * 4
        assert mem["output_size_in_bytes"] == 32 * 32 * 4
        assert mem["total_bytes"] >= mem["argument_size_in_bytes"]


def test_parser_profiles():
    parser = C.make_parser("demo", name="demo")
    args = parser.parse_args([])
    assert args.profile == "quick" and args.seed == 0 and args.no_plot is False
    # By default nothing is written into the committed results: ./deq-results/<name>/.
    assert args.out == C.default_out("demo") == Path("deq-results") / "demo"
    assert parser.prog == "python -m benchmarks.demo"
    for profile in C.PROFILES:
        assert parser.parse_args(["--profile", profile]).profile == profile
    args = parser.parse_args(["--profile", "smoke", "--seed", "3", "--no-plot", "--out", "x"])
    assert (args.seed, args.no_plot, str(args.out)) == (3, True, "x")
    assert C.make_parser("demo", default_profile="smoke").parse_args([]).profile == "smoke"
    with pytest.raises(SystemExit):
        parser.parse_args(["--profile", "huge"])


def test_pick():
    assert C.pick("smoke", smoke=1, quick=2, full=3) == 1
    assert C.pick("quick", smoke=1, quick=2, full=3) == 2
    assert C.pick("full", smoke=1, quick=2, full=3) == 3
    with pytest.raises(ValueError):
        C.pick("huge", smoke=1, quick=2, full=3)


def test_peak_rss_in_subprocess_grows_with_allocation():
    # A large parent process must not leak into the child's peak (ru_maxrss
    # would: after fork+exec it is bounded below by the parent's peak RSS).
    ballast = np.ones(256 * 2**20, dtype=np.uint8)
    small = C.peak_rss_in_subprocess("benchmarks._common", "_probe_alloc", {"mb": 1})
    del ballast
    large = C.peak_rss_in_subprocess("benchmarks._common", "_probe_alloc", {"mb": 128})
    for r in (small, large):
        assert r["peak_kib"] >= r["baseline_kib"] > 0
        assert r["delta_kib"] == r["peak_kib"] - r["baseline_kib"]
    assert large["result"] == 128 * 2**20
    assert large["peak_kib"] > small["peak_kib"]
    assert small["delta_kib"] < 32 * 1024
    assert large["delta_kib"] - small["delta_kib"] > 100 * 1024  # ~127 MiB more


def test_peak_rss_in_subprocess_reports_failure():
    with pytest.raises(RuntimeError, match="no_such_function"):
        C.peak_rss_in_subprocess("benchmarks._common", "no_such_function", {})


def test_require_missing_module_one_line():
    with pytest.raises(SystemExit) as exc:
        C.require("surely_not_an_installed_module_xyz", "bench")
    msg = str(exc.value)
    assert msg == (
        'error: surely_not_an_installed_module_xyz is needed for this benchmark: '
        'pip install -e ".[bench]"'
    )
    assert "\n" not in msg
    assert C.require("json", "bench") is json


def test_print_table_aligns(capsys):
    rows = [
        {"name": "deq", "time_ms": 1.23456, "iters": 12},
        {"name": "explicit-long-name", "time_ms": 123.0, "iters": 3},
        {"name": "missing"},
    ]
    text = C.print_table(rows, ["name", ("time_ms", "time [ms]"), "iters"], title="Demo")
    assert capsys.readouterr().out.strip() == text.strip()
    lines = text.splitlines()
    assert lines[0] == "Demo"
    assert lines[1].split() == ["name", "time", "[ms]", "iters"]
    body = lines[3:]
    assert len(body) == 3
    # Numeric columns are right-aligned: every row ends at the same column.
    assert len({len(line) for line in [lines[1]] + body[:2]}) == 1
    assert body[0].endswith("12") and body[1].endswith("3")
    assert "1.23" in body[0] and "123" in body[1]
    assert body[2].split() == ["missing", "-", "-"]
    # Header separator spans every column.
    assert len(lines[2].split()) == 3


def test_fmt():
    assert C.fmt(None) == "-"
    assert C.fmt(1234567) == "1,234,567"
    assert C.fmt(0.5) == "0.5"
    assert C.fmt(1.23456) == "1.23"
    assert C.fmt(999.9) == "1,000" and C.fmt(12345.6) == "12,346"
    assert C.fmt(1e-6) == "1.00e-06"
    assert C.fmt(float("nan")) == "nan"
    assert C.fmt(float("inf")) == "inf"
    assert C.fmt(np.float32(2.0)) == "2"
    assert C.fmt(True) == "True"
    assert C.fmt("abc") == "abc"


def test_seed_everything_reproducible():
    k1, r1 = C.seed_everything(3)
    k2, r2 = C.seed_everything(3)
    assert np.array_equal(np.asarray(jax.random.key_data(k1)), np.asarray(jax.random.key_data(k2)))
    assert r1.integers(1 << 30) == r2.integers(1 << 30)


def test_save_figure_and_progress(tmp_path, monkeypatch):
    plt = C.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="y=x")
    ax.set_xlabel("x [1]")
    ax.set_ylabel("y [1]")
    ax.legend()
    path = C.save_figure(fig, tmp_path, "demo")
    assert path.exists() and path.suffix == ".png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    monkeypatch.setenv("DEQ_NO_PROGRESS", "1")
    assert list(C.progress(range(4), desc="x")) == [0, 1, 2, 3]


def test_progress_lines_on_stderr_unless_disabled(capsys, monkeypatch):
    monkeypatch.delenv("DEQ_NO_PROGRESS", raising=False)
    assert list(C.progress(["a", "b"], desc="runs", label=lambda s: f"model {s}")) == ["a", "b"]
    C.say("hello")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 3 and "runs 1/2: model a done in" in lines[0] and "runs 2/2: model b" in lines[1]
    assert lines[2].endswith("] hello") and lines[2].startswith("[")
    monkeypatch.setenv("DEQ_NO_PROGRESS", "1")
    list(C.progress(["a"], desc="runs"))
    C.say("quiet")
    assert capsys.readouterr().err == ""


def test_smoke_notice(capsys, monkeypatch):
    monkeypatch.setenv("DEQ_NO_PROGRESS", "1")  # the notice is not a progress line: always shown
    C.smoke_notice("quick", "demo")
    assert capsys.readouterr().out == ""
    C.smoke_notice("smoke", "demo")
    C.smoke_notice("smoke", "demo", end=True)
    out = capsys.readouterr().out
    assert out.count("only checks that the code runs") == 2 and "not results" in out
    assert max(len(line) for line in out.splitlines()) <= C.MAX_WIDTH


def test_print_table_splits_wide_tables(capsys):
    rows = [{"name": f"model {i}", **{f"c{j}": 1000.0 * i + j for j in range(30)}} for i in range(3)]
    columns = ["name"] + [(f"c{j}", f"column {j} [unit]") for j in range(30)]
    text = C.print_table(rows, columns, title="A title " * 30, keep=1)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= C.MAX_WIDTH
    # every value is still there, and every block repeats the name column
    for j in range(30):
        assert f"column {j} [unit]" in text
    blocks = text.split("\n\n")
    assert len(blocks) > 1 and all("model 2" in b for b in blocks)


def test_git_info_dirty_ignores_result_files_only(tmp_path, monkeypatch):
    """Result files that other runs left in benchmarks/results/ do not make the code dirty;
    any other change does."""
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.delenv("DEQ_GIT_COMMIT", raising=False)
    monkeypatch.setattr(C, "REPO_ROOT", tmp_path)
    assert C.git_info()["dirty"] is False
    (tmp_path / "benchmarks" / "results" / "other_run.json").write_text("{}")
    assert C.git_info()["dirty"] is False
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert C.git_info()["dirty"] is True
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "code.py").write_text("x = 2\n")
    assert C.git_info()["dirty"] is True
