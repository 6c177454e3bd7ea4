"""Shared infrastructure for the benchmark scripts in :mod:`benchmarks`.

Every benchmark module uses these helpers so that all results are produced the
same way:

* command line: :func:`make_parser` (``--profile smoke|quick|full``, ``--out``,
  ``--seed``, ``--no-plot``; ``usage: python -m benchmarks.<name>``), :func:`default_out`
  (where a run writes unless told otherwise) and :func:`pick` to choose sizes per profile;
* provenance: :func:`environment` (machine, library versions, git commit);
* output: :func:`save_json`, :func:`save_figure`, :func:`print_table`,
  :func:`fmt`; progress lines on stderr: :func:`progress`, :func:`say`; the smoke
  profile's notice: :func:`smoke_notice`;
* timing: :func:`time_fn` (compile time apart, median of repeats after
  warm-up) and :func:`compile_time` (AOT lower + compile);
* memory: :func:`xla_memory` (compiled executable's buffer sizes),
  :func:`peak_rss_in_subprocess` (peak resident memory of one call in a fresh
  process) and :func:`device_memory` (accelerator allocator statistics);
* misc: :func:`require` for optional dependencies, :func:`seed_everything`.

Rules the helpers encode: benchmarks measure, tests assert; timings are medians
after warm-up with compile time reported separately; results measured on a GPU
are written to ``<name>-gpu.json`` / ``<name>-gpu.png``.

Nothing in this module prints except :func:`print_table`, :func:`smoke_notice` (stdout) and
the progress lines of :func:`say` and :func:`progress` (stderr; silent when the environment
sets ``DEQ_NO_PROGRESS=1``, as CI does).

Importing this module does not import JAX (each helper that needs it imports it), so a
benchmark that builds its parser from :func:`make_parser` and parses its arguments before its
own heavy imports answers ``--help`` at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import importlib.metadata
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

#: Root of the repository (the parent of the ``benchmarks`` package).
REPO_ROOT: Path = Path(__file__).resolve().parent.parent

#: The committed results (``--out benchmarks/results`` writes there; nothing does by default).
COMMITTED_RESULTS: Path = REPO_ROOT / "benchmarks" / "results"

#: Where every benchmark writes unless ``--out`` says otherwise: ``<DEFAULT_OUT_ROOT>/<name>/``
#: relative to the current directory (ignored by git), so that a run never overwrites the
#: committed results. See :func:`default_out`.
DEFAULT_OUT_ROOT: Path = Path("deq-results")

#: Time origin of the progress lines (:func:`say`): when this module was first imported.
_T0 = time.perf_counter()

#: Allowed values of ``--profile``, from cheapest to most expensive.
PROFILES: tuple[str, ...] = ("smoke", "quick", "full")

#: Distributions whose versions are recorded by :func:`environment`
#: (key in the output -> distribution name on the package index).
_VERSIONED = {
    "deq": "deq-jax",
    "jax": "jax",
    "jaxlib": "jaxlib",
    "flax": "flax",
    "optax": "optax",
    "jaxopt": "jaxopt",
    "optimistix": "optimistix",
    "numpy": "numpy",
    "matplotlib": "matplotlib",
    "torch": "torch",
    "torchdeq": "torchdeq",
}


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def default_out(name: str) -> Path:
    """The output directory of benchmark ``name`` when ``--out`` is not given.

    The one place that decides it for every benchmark: ``./deq-results/<name>/``, relative to the
    current directory and ignored by git (``.gitignore`` lists ``deq-results/``), so the
    README's commands leave a clone's committed ``benchmarks/results/`` untouched. Writing the
    committed results takes an explicit ``--out benchmarks/results``.

    Args:
      name: The benchmark's name, e.g. ``"deq_vs_explicit"``.

    Returns:
      ``Path("deq-results") / name``.
    """
    return DEFAULT_OUT_ROOT / name


def make_parser(description: str, *, name: str | None = None,
                default_profile: str = "quick") -> argparse.ArgumentParser:
    """Build the standard argument parser shared by all benchmarks.

    Args:
      description: Text shown by ``--help``.
      name: The benchmark's module name in :mod:`benchmarks` (e.g. ``"memory"``): ``--help``
        then shows ``usage: python -m benchmarks.<name>`` and ``--out`` defaults to
        :func:`default_out` of it. None: argparse's own ``prog`` and ``./deq-results/``.
      default_profile: Profile used when ``--profile`` is not given.

    Returns:
      An :class:`argparse.ArgumentParser` with ``--profile {smoke,quick,full}``,
      ``--out DIR`` (a :class:`~pathlib.Path`; default :func:`default_out`, relative paths
      are taken relative to the current directory), ``--seed INT`` (default 0)
      and ``--no-plot`` (stored as ``args.no_plot``). Benchmarks may add their
      own arguments before calling ``parse_args``.
    """
    if default_profile not in PROFILES:
        raise ValueError(f"default_profile must be one of {PROFILES}, got {default_profile!r}")
    parser = argparse.ArgumentParser(
        prog=None if name is None else f"python -m benchmarks.{name}",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default=default_profile,
        help="problem sizes / repeats: smoke (seconds, for CI), quick (minutes), full (publication)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT_ROOT if name is None else default_out(name),
        metavar="DIR",
        help="directory for the JSON results and PNG figures; the default is ignored by git, "
             "--out benchmarks/results rewrites the committed results",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--no-plot", action="store_true", help="do not write PNG figures")
    return parser


def pick(profile: str, *, smoke: Any, quick: Any, full: Any) -> Any:
    """Return the value that belongs to ``profile``.

    Args:
      profile: One of ``"smoke"``, ``"quick"``, ``"full"``.
      smoke: Value for the smoke profile.
      quick: Value for the quick profile.
      full: Value for the full profile.

    Returns:
      The value given for ``profile``.

    Raises:
      ValueError: If ``profile`` is not a known profile.
    """
    table = {"smoke": smoke, "quick": quick, "full": full}
    if profile not in table:
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    return table[profile]


def seed_everything(seed: int) -> tuple[jax.Array, np.random.Generator]:
    """Seed Python's ``random`` and create JAX and NumPy random sources.

    Args:
      seed: Integer seed.

    Returns:
      ``(key, rng)``: a ``jax.random.PRNGKey(seed)`` and a
      ``numpy.random.default_rng(seed)`` generator.
    """
    import jax

    random.seed(seed)
    return jax.random.PRNGKey(seed), np.random.default_rng(seed)


def require(module_name: str, extra: str) -> Any:
    """Import an optional dependency or exit with a one-line error.

    Args:
      module_name: Importable module name, e.g. ``"matplotlib"``.
      extra: Name of the ``pyproject.toml`` extra that provides it, e.g. ``"bench"``.

    Returns:
      The imported module.

    Raises:
      SystemExit: With message
        ``error: <module> is needed for this benchmark: pip install -e ".[<extra>]"``
        when the import fails.
    """
    try:
        return importlib.import_module(module_name)
    except ImportError:
        raise SystemExit(
            f'error: {module_name} is needed for this benchmark: pip install -e ".[{extra}]"'
        ) from None


# --------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    """Run ``git <args>`` in the repository root; return stdout or None on failure."""
    try:
        proc = subprocess.run(
            ["git", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_info() -> dict[str, Any] | None:
    """Describe the repository's current commit.

    Returns:
      ``{"commit": sha, "dirty": bool}`` where ``dirty`` is True when
      ``git status --porcelain`` reports any change (untracked files included) outside
      ``benchmarks/results/`` (result files written by other runs do not change the code that
      produced this one), or None when git is unavailable or the code is not in a git repository.
    """
    # A copy of the tree made elsewhere (e.g. on a remote GPU machine) may carry no .git or a
    # stale one: the caller then names the commit it was copied from in DEQ_GIT_COMMIT.
    commit = os.environ.get("DEQ_GIT_COMMIT")
    if commit:
        return {"commit": commit, "dirty": None, "source": "DEQ_GIT_COMMIT"}
    head = _git("rev-parse", "HEAD")
    if head is None:
        return None
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    return {"commit": head.strip(), "dirty": None if status is None else bool(status.strip())}


def _version(dist: str) -> str | None:
    """Installed version of distribution ``dist``, or None if not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_gpu() -> bool:
    """Whether JAX's default backend is a GPU.

    Returns:
      True for the ``gpu``/``cuda``/``rocm`` backends.
    """
    import jax

    return jax.default_backend() in ("gpu", "cuda", "rocm")


def environment() -> dict[str, Any]:
    """Collect the machine, software and repository state for a result file.

    Library versions are read from the installed package metadata, so optional
    packages (torch, torchdeq) are never imported; they are None when absent.

    Returns:
      A JSON-serialisable dict with keys ``platform``, ``machine``,
      ``processor``, ``hostname``, ``cpu_count``, ``cpu_affinity``, ``python``,
      ``jax_backend``, ``devices`` (device kinds), ``device_count``,
      ``jax_x64``, ``compilation_cache_dir``, ``env`` (JAX-related environment
      variables), ``versions`` (name -> version or None), ``git``
      (see :func:`git_info`) and ``timestamp_utc`` (ISO 8601).
    """
    import jax

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    devices = jax.devices()
    env_keys = ("JAX_PLATFORMS", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                "XLA_PYTHON_CLIENT_MEM_FRACTION", "CUDA_VISIBLE_DEVICES", "JAX_ENABLE_X64",
                "JAX_DEFAULT_MATMUL_PRECISION")
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "jax_backend": jax.default_backend(),
        "devices": [d.device_kind for d in devices],
        "device_count": len(devices),
        "jax_x64": bool(jax.config.jax_enable_x64),
        # GPUs run float32 matmuls in TF32 unless this is "highest"; GPU results set it.
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
        "env": {k: os.environ[k] for k in env_keys if k in os.environ},
        "versions": {key: _version(dist) for key, dist in _VERSIONED.items()},
        "git": git_info(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------


def result_path(out_dir: str | os.PathLike, name: str, suffix: str = ".json") -> Path:
    """Path of a result file, marked ``-gpu`` when measured on a GPU.

    Args:
      out_dir: Output directory.
      name: Base name without extension, e.g. ``"memory"``.
      suffix: File extension including the dot.

    Returns:
      ``out_dir/<name><suffix>``, or ``out_dir/<name>-gpu<suffix>`` when the
      default JAX backend is a GPU.
    """
    stem = f"{name}-gpu" if is_gpu() else name
    return Path(out_dir) / f"{stem}{suffix}"


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` recursively into plain JSON-compatible Python values.

    NumPy and JAX arrays become (nested) lists, NumPy scalars become Python
    numbers, tuples/sets become lists, dict keys become strings, paths and
    unknown objects become strings, dataclasses become dicts. Non-finite floats
    are encoded consistently: NaN -> ``None`` (JSON ``null``), +inf ->
    ``"inf"``, -inf -> ``"-inf"``.

    Args:
      obj: Any value.

    Returns:
      A value that ``json.dumps(..., allow_nan=False)`` accepts.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(obj, (complex, np.complexfloating)):
        return {"real": to_jsonable(obj.real), "imag": to_jsonable(obj.imag)}
    jax = sys.modules.get("jax")  # a JAX array exists only if JAX was imported
    if jax is not None and isinstance(obj, jax.Array):
        if jax.dtypes.issubdtype(obj.dtype, jax.dtypes.prng_key):
            obj = jax.random.key_data(obj)
        obj = np.asarray(obj)
    if isinstance(obj, np.ndarray):
        if obj.ndim == 0:
            return to_jsonable(obj.item())
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, argparse.Namespace):
        return to_jsonable(vars(obj))
    return str(obj)


def save_json(out_dir: str | os.PathLike, name: str, payload: dict[str, Any]) -> Path:
    """Write a benchmark's results as pretty JSON, with the environment added.

    Args:
      out_dir: Output directory (created if missing).
      name: Benchmark name; the file is ``<name>.json`` or ``<name>-gpu.json``
        (see :func:`result_path`).
      payload: Results (settings, measurements, ...). Values are converted with
        :func:`to_jsonable`; an ``"environment"`` key is set to
        :func:`environment`.

    Returns:
      The path written.
    """
    path = result_path(out_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_jsonable({**payload, "environment": environment()})
    text = json.dumps(data, indent=2, allow_nan=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def pyplot() -> Any:
    """Import ``matplotlib.pyplot`` with the non-interactive Agg backend.

    Returns:
      The ``matplotlib.pyplot`` module.

    Raises:
      SystemExit: With the one-line :func:`require` message if matplotlib is missing.
    """
    matplotlib = require("matplotlib", "bench")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def save_figure(fig: Any, out_dir: str | os.PathLike, name: str, *, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG and close it.

    Args:
      fig: A :class:`matplotlib.figure.Figure`.
      out_dir: Output directory (created if missing).
      name: Base name; the file is ``<name>.png`` or ``<name>-gpu.png``.
      dpi: Resolution.

    Returns:
      The path written.
    """
    path = result_path(out_dir, name, suffix=".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


# --------------------------------------------------------------------------
# Terminal output
# --------------------------------------------------------------------------


def fmt(x: Any, digits: int = 3) -> str:
    """Format a value compactly for a table.

    Args:
      x: Number, string, bool, None or array scalar.
      digits: Significant digits for floats.

    Returns:
      ``"-"`` for None, ints with thousands separators, floats with
      ``digits`` significant digits (scientific notation when very large or
      small), ``"nan"``/``"inf"`` for non-finite values, ``str(x)`` otherwise.
    """
    if x is None:
        return "-"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    jax = sys.modules.get("jax")  # a JAX array exists only if JAX was imported
    if isinstance(x, np.ndarray if jax is None else (jax.Array, np.ndarray)) and np.ndim(x) == 0:
        x = np.asarray(x).item()
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        v = float(x)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0.0:
            return "0"
        if abs(v) >= 10 ** max(digits + 2, 5) or abs(v) < 1e-3:
            return f"{v:.{max(digits - 1, 0)}e}"
        text = f"{v:.{digits}g}"
        return f"{v:,.0f}" if "e" in text else text
    return str(x)


def _is_numeric(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


#: Widest line :func:`print_table` prints; wider tables are split into column blocks.
MAX_WIDTH = 120


def print_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str | tuple[str, str]],
    title: str | None = None,
    *,
    keep: int = 1,
    max_width: int = MAX_WIDTH,
) -> str:
    """Print rows as an aligned plain-text table, no line wider than ``max_width``.

    Numbers are formatted with :func:`fmt` and right-aligned; other values are
    left-aligned. Missing keys show as ``-``. A table wider than ``max_width`` is printed as
    several blocks of columns, one under the other, each repeating the first ``keep`` columns
    (the ones that name a row); a long title is wrapped.

    Args:
      rows: One dict per row.
      columns: Keys to show, in order; an entry may be ``(key, header)`` to
        give the column a different header (e.g. with units).
      title: Optional line printed above the table.
      keep: Leading columns repeated in every block of a split table.
      max_width: Widest line printed (the repeated columns plus one more column may exceed it
        only if they alone are wider).

    Returns:
      The table text (also printed to stdout).
    """
    keys = [c[0] if isinstance(c, tuple) else c for c in columns]
    headers = [c[1] if isinstance(c, tuple) else c for c in columns]
    cells = [[fmt(row.get(k)) for k in keys] for row in rows]
    numeric = [any(_is_numeric(row.get(k)) for row in rows) for k in keys]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    keep = max(0, min(keep, len(keys) - 1))

    def line(values: Sequence[str], idx: Sequence[int]) -> str:
        parts = [values[i].rjust(widths[i]) if numeric[i] else values[i].ljust(widths[i]) for i in idx]
        return "  ".join(parts).rstrip()

    def block(idx: Sequence[int]) -> list[str]:
        return ([line(headers, idx), "  ".join("-" * widths[i] for i in idx)]
                + [line(r, idx) for r in cells])

    # Greedy blocks: the `keep` columns, then as many further columns as fit.
    blocks: list[list[int]] = []
    current = list(range(keep))
    for i in range(keep, len(keys)):
        width = sum(widths[j] + 2 for j in current + [i]) - 2
        if width > max_width and len(current) > keep:
            blocks.append(current)
            current = list(range(keep))
        current.append(i)
    blocks.append(current)

    out = textwrap.wrap(title, max_width) if title else []
    for n, idx in enumerate(blocks):
        if n:
            out.append("")
        out.extend(block(idx))
    text = "\n".join(out)
    print(text, flush=True)
    return text


def print_wrapped(text: str, *, indent: int = 6) -> str:
    """Print a line of results (a PASS/MISS verdict, a note) wrapped at :data:`MAX_WIDTH`.

    Args:
      text: The line.
      indent: Spaces before each continuation line.

    Returns:
      The printed text.
    """
    out = textwrap.fill(text, MAX_WIDTH, subsequent_indent=" " * indent, break_long_words=False,
                        break_on_hyphens=False)
    print(out, flush=True)
    return out


def progress_enabled() -> bool:
    """Whether progress lines are printed: unless the environment sets ``DEQ_NO_PROGRESS=1``."""
    return os.environ.get("DEQ_NO_PROGRESS") != "1"


def say(message: str) -> None:
    """Print one progress line to stderr, prefixed with the seconds since the run started.

    Silent when ``DEQ_NO_PROGRESS=1`` (CI sets it). Results never go through here: they are
    printed to stdout and written to the JSON.

    Args:
      message: The line, e.g. ``"digits: DEQ seed 0 done in 12.1 s"``.
    """
    if progress_enabled():
        print(f"[{time.perf_counter() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


def progress(iterable: Iterable, *, desc: str = "", total: int | None = None,
             label: Callable[[Any], str] | None = None) -> Iterable:
    """Yield the items of ``iterable``, printing a progress line (:func:`say`) after each one.

    Each line reads ``[  elapsed s] <desc> i/n: <label(item)> done in t s``, so a long run shows
    which model, seed or point it has finished and how long each took. Silent when
    ``DEQ_NO_PROGRESS=1``.

    Args:
      iterable: Anything iterable.
      desc: What the loop is, e.g. ``"digits runs"``.
      total: Number of items, when ``len(iterable)`` does not give it.
      label: Describes one item for its line (default ``str``).

    Returns:
      An iterator over the same items.
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    label = str if label is None else label
    of = "" if total is None else f"/{total}"
    t = time.perf_counter()
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        say(f"{desc} {i}{of}: {label(item)} done in {now - t:.1f} s")
        t = now


def smoke_notice(profile: str, name: str, *, end: bool = False) -> None:
    """Say on stdout, at the start and at the end of a smoke run, that it checks only that the
    code runs: its figures (and any MISS line) are not results.

    Args:
      profile: The run's profile; nothing is printed unless it is ``"smoke"``.
      name: The benchmark's name, for the line.
      end: Whether this is the line at the end of the run.
    """
    if profile != "smoke":
        return
    print(f"[smoke] {name}{' finished' if end else ''}: smoke only checks that the code runs;\n"
          f"[smoke] its numbers and PASS/MISS lines are not results (see --profile quick or full)",
          flush=True)


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def time_fn(
    fn: Callable[..., Any],
    *args: Any,
    warmup: int = 2,
    repeats: int = 10,
    block: bool = True,
    clear_caches: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Time ``fn(*args, **kwargs)``: first call apart, then median of repeats.

    The first call (tracing + compilation + one run for a jitted function) is
    reported as ``compile_s``. Then ``warmup`` untimed calls are made, then
    ``repeats`` timed calls. Each call is timed with :func:`time.perf_counter`
    up to :func:`jax.block_until_ready` on its output when ``block`` is True
    (otherwise JAX's asynchronous dispatch would make the numbers meaningless).

    Args:
      fn: Function to time (typically ``jax.jit``-ed).
      *args: Positional arguments for ``fn``.
      warmup: Untimed calls after the first call.
      repeats: Timed calls (at least 1).
      block: Wait for the outputs before stopping the clock.
      clear_caches: Call :func:`jax.clear_caches` first so that ``compile_s``
        includes a real compilation even if the same computation was compiled
        before in this process (it clears every function's cache).
      **kwargs: Keyword arguments for ``fn``.

    Returns:
      Dict with ``compile_s`` (first call), ``median_s``, ``iqr_s`` (75th minus
      25th percentile), ``min_s``, ``max_s``, ``mean_s``, ``repeats``,
      ``warmup`` and ``times_s`` (all timed calls, seconds).
    """
    import jax

    if repeats < 1:
        raise ValueError("repeats must be >= 1")

    def call() -> float:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if block:
            jax.block_until_ready(out)
        return time.perf_counter() - start

    if clear_caches:
        jax.clear_caches()
    compile_s = call()
    for _ in range(warmup):
        call()
    times = np.array([call() for _ in range(repeats)])
    q25, q75 = np.percentile(times, [25, 75])
    return {
        "compile_s": compile_s,
        "median_s": float(np.median(times)),
        "iqr_s": float(q75 - q25),
        "min_s": float(times.min()),
        "max_s": float(times.max()),
        "mean_s": float(times.mean()),
        "repeats": int(repeats),
        "warmup": int(warmup),
        "times_s": times.tolist(),
    }


def _as_jitted(fn: Callable[..., Any]) -> Any:
    """Return ``fn`` if it already has an AOT ``lower`` method, else ``jax.jit(fn)``."""
    import jax

    return fn if hasattr(fn, "lower") else jax.jit(fn)


def compile_time(jitted_fn: Callable[..., Any], *args: Any, clear_caches: bool = True, **kwargs: Any) -> dict[str, float]:
    """Measure ahead-of-time lowering and compilation separately.

    Uses ``jitted_fn.lower(*args, **kwargs)`` then ``.compile()``; nothing is
    executed. JAX caches both steps in memory, so by default
    :func:`jax.clear_caches` is called first to measure a cold compile.

    Args:
      jitted_fn: A ``jax.jit``-ed function (a plain function is jitted here).
      *args: Example arguments (arrays or ``jax.ShapeDtypeStruct``).
      clear_caches: Clear JAX's in-memory caches before measuring.
      **kwargs: Example keyword arguments.

    Returns:
      Dict with ``lower_s`` (trace + lower to StableHLO), ``compile_s``
      (XLA compilation) and ``total_s``.
    """
    import jax

    f = _as_jitted(jitted_fn)
    if clear_caches:
        jax.clear_caches()
    t0 = time.perf_counter()
    lowered = f.lower(*args, **kwargs)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------

_MEMORY_FIELDS = (
    "temp_size_in_bytes",
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "generated_code_size_in_bytes",
    "peak_memory_in_bytes",
    "host_temp_size_in_bytes",
    "host_argument_size_in_bytes",
    "host_output_size_in_bytes",
    "host_alias_size_in_bytes",
    "host_generated_code_size_in_bytes",
)


def xla_memory(jitted_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, int] | None:
    """Buffer sizes XLA assigned to the compiled executable.

    Compiles ``jitted_fn`` for the given arguments (AOT; nothing runs) and
    reads ``compiled.memory_analysis()``. ``temp_size_in_bytes`` is the
    scratch memory the computation needs beyond its inputs and outputs — the
    number to compare for activation memory (e.g. unrolled backprop vs.
    implicit differentiation).

    Args:
      jitted_fn: A ``jax.jit``-ed function (a plain function is jitted here).
      *args: Example arguments (arrays or ``jax.ShapeDtypeStruct``).
      **kwargs: Example keyword arguments.

    Returns:
      Dict of the available fields among ``temp_size_in_bytes``,
      ``argument_size_in_bytes``, ``output_size_in_bytes``,
      ``alias_size_in_bytes``, ``generated_code_size_in_bytes``,
      ``peak_memory_in_bytes`` and their ``host_*`` variants, plus
      ``total_bytes`` = argument + output + temp - alias; or None when the
      backend provides no analysis.
    """
    try:
        analysis = _as_jitted(jitted_fn).lower(*args, **kwargs).compile().memory_analysis()
    except (NotImplementedError, AttributeError):
        return None
    if analysis is None:
        return None
    stats = {f: int(getattr(analysis, f)) for f in _MEMORY_FIELDS if getattr(analysis, f, None) is not None}
    if not stats:
        return None
    stats["total_bytes"] = (
        stats.get("argument_size_in_bytes", 0)
        + stats.get("output_size_in_bytes", 0)
        + stats.get("temp_size_in_bytes", 0)
        - stats.get("alias_size_in_bytes", 0)
    )
    return stats


def device_memory(device: Any = None) -> dict[str, Any] | None:
    """Allocator statistics of a JAX device (GPU/TPU).

    Args:
      device: A ``jax.Device``; defaults to ``jax.devices()[0]``.

    Returns:
      ``device.memory_stats()`` (e.g. ``bytes_in_use``,
      ``peak_bytes_in_use``, ``bytes_limit``) or None when unavailable (CPU).
    """
    import jax

    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except (NotImplementedError, AttributeError, RuntimeError):
        return None
    return dict(stats) if stats else None


# Program run in the fresh subprocess by peak_rss_in_subprocess.
_RSS_PROBE = r"""
import gc, importlib, json, resource, sys

out_path, module_name, func_name, kwargs_json = sys.argv[1:5]
kwargs = json.loads(kwargs_json)

def ru_maxrss_kib():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r

def proc_status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None

def peak_kib():
    # VmHWM is this process's own high-water mark. ru_maxrss is only a
    # fallback: after fork+exec it is bounded below by the parent's peak RSS.
    hwm = proc_status_kib("VmHWM")
    return ru_maxrss_kib() if hwm is None else hwm

fn = getattr(importlib.import_module(module_name), func_name)
jax = sys.modules.get("jax")
if jax is not None:
    jax.devices()  # initialise the backend before the baseline
gc.collect()
import_peak = peak_kib()
hwm_reset = False
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark to the current RSS
    hwm_reset = True
except OSError:
    pass
baseline = proc_status_kib("VmRSS")
if baseline is None:
    baseline = import_peak

result = fn(**kwargs)
jax = sys.modules.get("jax")
if jax is not None:
    jax.block_until_ready(result)
peak = peak_kib()
ru_maxrss = ru_maxrss_kib()

device = None
if jax is not None:
    try:
        device = jax.devices()[0].memory_stats() or None
    except Exception:
        device = None

from benchmarks._common import to_jsonable
with open(out_path, "w") as f:
    json.dump(to_jsonable({
        "peak_kib": peak,
        "baseline_kib": baseline,
        "import_peak_kib": import_peak,
        "hwm_reset": hwm_reset,
        "ru_maxrss_kib": ru_maxrss,
        "device_memory": device,
        "result": result,
    }), f)
"""


def peak_rss_in_subprocess(
    module: str,
    func_name: str,
    kwargs: dict[str, Any] | None = None,
    *,
    timeout: float | None = 600,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Peak resident memory of one function call, measured in a fresh process.

    Runs ``sys.executable -c <probe>`` with the repository root on
    ``PYTHONPATH`` (and ``JAX_PLATFORMS=cpu`` when this process's backend is
    the CPU). The probe imports ``module``, initialises JAX's backend if the
    module imported JAX, records a baseline RSS, calls
    ``func_name(**kwargs)``, blocks on its result and reads the process's peak
    RSS. On Linux the peak is ``VmHWM`` from ``/proc/self/status``, whose
    high-water mark is reset right before the baseline
    (``/proc/self/clear_refs``), so it covers only the call; ``hwm_reset`` says
    whether the reset worked. Elsewhere ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
    is used; it is also returned as ``ru_maxrss_kib`` but is not a clean
    number on Linux, where after fork+exec it is bounded below by the parent's
    peak RSS. The baseline is the current RSS (``VmRSS``) after imports and
    backend initialisation, so ``delta_kib`` is what the call itself added.

    Args:
      module: Dotted module path, e.g. ``"benchmarks.memory"``.
      func_name: Name of a module-level function in it.
      kwargs: JSON-serialisable keyword arguments for the function.
      timeout: Seconds before the subprocess is killed.
      env: Extra environment variables for the subprocess.

    Returns:
      Dict with ``peak_kib`` (peak RSS), ``baseline_kib`` (RSS after imports,
      before the call), ``delta_kib`` (peak minus baseline), ``peak_mib``,
      ``delta_mib``, ``import_peak_kib`` (peak before the call),
      ``hwm_reset``, ``ru_maxrss_kib``, ``device_memory``
      (device allocator stats after the call, or None) and ``result`` (the
      function's return value converted with :func:`to_jsonable`; keep it small).

    Raises:
      RuntimeError: If the subprocess fails; the message holds its stderr tail.
    """
    import jax

    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([child_env["PYTHONPATH"]] if child_env.get("PYTHONPATH") else [])
    )
    if jax.default_backend() == "cpu":
        child_env["JAX_PLATFORMS"] = "cpu"
    child_env.setdefault("DEQ_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory(prefix="deq-rss-") as tmp:
        out_path = os.path.join(tmp, "rss.json")
        proc = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE, out_path, module, func_name, json.dumps(kwargs or {})],
            cwd=REPO_ROOT,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0 or not os.path.exists(out_path):
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            raise RuntimeError(
                f"peak_rss_in_subprocess({module}.{func_name}) failed with exit code {proc.returncode}:\n{tail}"
            )
        with open(out_path, encoding="utf-8") as f:
            report = json.load(f)
    report["delta_kib"] = report["peak_kib"] - report["baseline_kib"]
    report["peak_mib"] = report["peak_kib"] / 1024
    report["delta_mib"] = report["delta_kib"] / 1024
    return report


def _probe_alloc(mb: float) -> int:
    """Allocate and touch ``mb`` MiB with NumPy (a probe for the memory tests).

    Args:
      mb: Size in MiB.

    Returns:
      Number of bytes allocated.
    """
    block = np.ones(int(mb * 2**20), dtype=np.uint8)
    return int(block.nbytes)
