"""Shared pytest configuration.

The core tests (``tests/test_core_*.py``) check numerics in float64. Rather than enabling
``jax_enable_x64`` for the whole session (which would change the default dtype under every other
test file), x64 is switched on with ``jax.enable_x64`` for the duration of each ``test_core_*``
module only, by an autouse module-scoped fixture. Everything in those modules (tests, hypothesis
examples, module-scoped fixtures that depend on it) therefore runs with x64; tests of float32 or
bfloat16 behaviour create those dtypes explicitly.

Nothing here runs at import time, so collecting the core tests never changes global state.

XLA compile time. The suite's cost is almost all XLA compilation of small programs on the CPU,
so ``pytest_configure`` appends :data:`FAST_COMPILE_XLA_FLAGS` to ``XLA_FLAGS`` before any JAX
backend starts: LLVM optimisation level 0 and XLA:CPU's classic elemental emitters instead of
its newer fusion emitters. Both change how XLA turns the optimised HLO into machine code, not
the HLO (every HLO pass still runs), so results agree with the default settings to within
rounding, and the suite passes under both. Measured on 2 CPU cores: compilation is 3-5x
cheaper (some parameter initialisers took 2-7 s each to compile at the default level), and
``pytest -n 2 tests`` takes about a third of the time. The flags reach everything the session
starts (xdist workers, benchmark subprocesses, notebook kernels) through the environment. They
are checked once in a subprocess first, and dropped when that fails (a jaxlib that does not
know a flag) or when the default backend is not the CPU. Flags already named in ``XLA_FLAGS``
are left as set; ``DEQ_TEST_XLA_DEFAULTS=1`` runs the suite with XLA's default settings.

Compilation cache. Many programs are compiled more than once in a session: the same small
eager operations and solver loops in both xdist workers, in notebook kernels and in benchmark
subprocesses, and identical programs rebuilt from fresh closures by different tests. So
``pytest_configure`` also points JAX's persistent compilation cache at a new, empty temporary
directory for the session (``JAX_COMPILATION_CACHE_DIR``, every program cached however fast it
compiled), which every process of the session inherits through the environment, and removes it
at the end. It starts empty every time, so nothing carries over between runs. Measured on 2 CPU
cores (``pytest -n 2 --dist loadfile tests/test_core_*.py``): 282 s without, 174 s with (CPU
time 284 s -> 249 s; the first run shared the machine more). ``DEQ_TEST_NO_COMPILATION_CACHE=1``
turns it off; a ``JAX_COMPILATION_CACHE_DIR`` already set is used as it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest

#: Appended to ``XLA_FLAGS`` for the test session (see the module docstring).
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _fast_compile_xla_flags() -> None:
    """Add :data:`FAST_COMPILE_XLA_FLAGS` to ``XLA_FLAGS`` if this jaxlib accepts them on the CPU."""
    if os.environ.get("DEQ_TEST_XLA_DEFAULTS") == "1" or os.environ.get("DEQ_TEST_XLA_FLAGS_CHECKED"):
        return
    os.environ["DEQ_TEST_XLA_FLAGS_CHECKED"] = "1"  # xdist workers inherit the decision
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in FAST_COMPILE_XLA_FLAGS if f.split("=")[0] not in current]
    # all of them, else the optimisation level alone (a flag unknown to this jaxlib aborts XLA)
    for candidate in (extra, extra[:1]):
        if not candidate:
            return
        flags = " ".join([current, *candidate]).strip()
        probe = subprocess.run(
            [sys.executable, "-c", "import jax; print(jax.default_backend())"],
            env=dict(os.environ, XLA_FLAGS=flags), capture_output=True, text=True, timeout=300, check=False,
        )
        if probe.returncode == 0:
            if probe.stdout.split()[-1:] == ["cpu"]:
                os.environ["XLA_FLAGS"] = flags
            return


_CACHE_ENV = "DEQ_TEST_COMPILATION_CACHE_OWNED"  # the directory this session created (to remove)


def _session_compilation_cache() -> None:
    """Point JAX's persistent compilation cache at a fresh directory (see the module docstring)."""
    if os.environ.get("DEQ_TEST_NO_COMPILATION_CACHE") == "1":
        return
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        path = tempfile.mkdtemp(prefix="deq-test-jax-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = path
        os.environ[_CACHE_ENV] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    # this process imported jax before the variables were set: tell its config too
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                      int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def pytest_configure(config: pytest.Config) -> None:
    _fast_compile_xla_flags()
    _session_compilation_cache()


def pytest_unconfigure(config: pytest.Config) -> None:
    owned = os.environ.get(_CACHE_ENV)
    if owned and not hasattr(config, "workerinput"):  # the controller, not an xdist worker
        shutil.rmtree(owned, ignore_errors=True)


def _is_core_module(request: pytest.FixtureRequest) -> bool:
    return os.path.basename(str(request.module.__file__)).startswith("test_core_")


@pytest.fixture(scope="module", autouse=True)
def _x64_for_core_tests(request: pytest.FixtureRequest):
    """float64 for the core test modules, and only for them."""
    if not _is_core_module(request):
        yield
        return
    with jax.enable_x64(True):
        yield


@pytest.fixture
def x64(request: pytest.FixtureRequest):
    """Request float64 explicitly from a test outside the core modules."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def break_svd(monkeypatch):
    """``break_svd(algorithms)`` makes ``jax.lax.linalg.svd`` return NaN for the given algorithms
    (``None`` is the default one, ``SvdAlgorithm.QR`` the retry), as LAPACK's gesdd did on a
    trained weight with a clustered spectrum (see ``deq._linalg.svd_with_retry``)."""
    import jax.numpy as jnp
    from jax.lax import linalg as lax_linalg

    real_svd = lax_linalg.svd

    def apply(algorithms):
        def svd(x, *args, algorithm=None, **kwargs):
            out = real_svd(x, *args, algorithm=algorithm, **kwargs)
            if algorithm not in algorithms:
                return out
            return jax.tree.map(lambda o: jnp.full_like(o, jnp.nan), out)
        monkeypatch.setattr(lax_linalg, "svd", svd)

    return apply
