"""The benchmarks' command lines: ``--help`` parses before anything heavy is imported, names the
command the README uses, and every benchmark writes outside the committed results by default.

Each ``--help`` runs in a fresh interpreter (the test process has JAX loaded already), through
``runpy`` as ``python -m benchmarks.<name>`` does, and reports which modules it imported. The
time a ``--help`` takes is measured by hand (README), not asserted here: benchmarks measure,
tests assert.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import _common as C

BENCHMARKS = ("deq_vs_explicit", "memory", "inference", "test_time_compute", "backward", "solvers",
              "mondeq_digits", "reversible", "batching", "language_model")

#: Modules whose import makes ``--help`` slow (JAX alone takes seconds).
HEAVY = ("jax", "jaxlib", "flax", "optax", "deq", "matplotlib", "torch", "sklearn")

_PROBE = r"""
import contextlib, io, json, runpy, sys
name, heavy_roots = sys.argv[1], json.loads(sys.argv[2])
sys.argv = [f"python -m benchmarks.{name}", "--help"]
buf = io.StringIO()
code = None
with contextlib.redirect_stdout(buf):
    try:
        runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in heavy_roots)
print(json.dumps({"code": code, "help": buf.getvalue(), "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def helps():
    out = {}
    for name in BENCHMARKS:
        proc = subprocess.run([sys.executable, "-c", _PROBE, name, json.dumps(HEAVY)], cwd=C.REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("name", BENCHMARKS)
def test_help_imports_nothing_heavy(helps, name):
    h = helps[name]
    assert h["code"] == 0
    assert h["heavy"] == [], f"--help of benchmarks.{name} imported {h['heavy'][:8]}"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_help_names_the_module_command(helps, name):
    text = helps[name]["help"]
    assert text.startswith(f"usage: python -m benchmarks.{name} "), text[:200]
    assert "--profile" in text and "--out" in text
    flat = re.sub(r"-\s+", "-", " ".join(text.split()))  # undo argparse's line wrapping
    assert f"(default: deq-results/{name})" in flat  # the default --out, outside the committed results


def test_every_benchmark_defaults_outside_the_committed_results():
    for name in BENCHMARKS:
        args = C.make_parser("demo", name=name).parse_args([])
        assert args.out == C.default_out(name) == Path("deq-results") / name
        assert not args.out.is_absolute()
    assert Path(C.default_out("x")).parts[0] == "deq-results"
    gitignore = (C.REPO_ROOT / ".gitignore").read_text().split()
    assert "deq-results/" in gitignore


def test_benchmark_mains_use_the_shared_default():
    """Each benchmark's own parser (with its extra arguments) keeps the shared default."""
    import importlib

    for name in BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        args = module.parse_args(["--profile", "smoke"])
        assert args.out == C.default_out(name), name
