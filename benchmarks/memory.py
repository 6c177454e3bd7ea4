"""Peak memory of one training step: DEQ (implicit backward) vs. an unrolled weight-tied net.

Run ``python -m benchmarks.memory --profile smoke|quick|full`` (``--out DIR``, ``--seed``,
``--no-plot``).

Model (both methods share it, seeded identically)::

    u = encoder(x)                  (input injection, nnx.Linear(in_features -> width))
    z_{k+1} = cell(z_k, u)          (the same cell at every step, z_0 = cell.init_state(u))
    loss = cross_entropy(head(z_K), y)   (head: nnx.Linear(width -> 10))

The model is the library's ``deq.nn.models.DEQClassifier(in_features, width, 10)`` (encoder,
DEQ layer around a ``DenseCell(width)``: weight-normalised W1, W2, three LayerNorms, skip; and
head) in the quick and full profiles. The smoke profile uses the same layout around a
self-contained ``z -> tanh(z W + u)`` cell, which compiles several times faster (smoke only
checks the machinery). ``settings.cell`` in the JSON says which one ran.

* ``deq``: the model's DEQ layer, built with ``solver=FixedPointIteration(rtol=0, atol=1e-30,
  max_steps=K)`` and ``backward=IFT(warn=False)``. With these tolerances the stopping test
  ``||f(z) - z|| <= atol + rtol ||f(z)||`` can only pass at an exactly zero residual, so the
  forward solve runs exactly ``K`` steps: ``K`` is the DEQ's *effective depth*. The layer solves
  the whole batch as one problem (``batch_axis=None``): with per-sample stopping
  (``batch_axis=0``, the classifier's default) the iterates of some samples of this contractive
  cell become *exactly* stationary in float32 after ~40 steps, which passes even this test and
  freezes them early (the loop itself still runs ``K`` times for the others; measured:
  ``num_steps`` min 43, max 300 at ``K = 300``). The number of steps the solver took is returned
  by the solve (``stats.num_steps``) and reported (``num_steps_min/max``, ``steps_ok``). The backward pass is the implicit function
  theorem (adjoint fixed point with the default Anderson adjoint solver), so nothing of the
  forward iterations is stored.
* ``reversible`` and ``reversible_flat`` (quick/full only): the same DEQ layer with
  ``solver=ReversibleIteration(rtol=0, atol=1e-30, max_steps=K)`` (damping 0.5; exactly ``K``
  steps of two cell evaluations each, for the same reason) and ``backward=Reversible()``: the
  exact gradient of the ``K`` steps by reversing them (McCallum et al. 2025). ``Reversible()``
  restarts the reversal from a stored ``(y, z)`` every 4 steps at this damping, so it stores
  ``(K - 1) // 4`` copies of two ``(batch, width)`` arrays: half a state per step, against the
  unrolled net's every activation of the cell per step; ``reversible_flat`` is
  ``Reversible(checkpoint_every=0)``, which stores none (memory flat in ``K``, but float32
  reversal in one sweep loses its digits after about 15 steps at this damping; see
  ``benchmarks/reversible.py``). The smoke profile skips them (one process per point);
  ``tests/test_bench_memory_backward.py`` measures one small reversible point in the test process.
* ``unrolled``: the explicit net ``z_K = cell(...cell(cell(z_0, u), u)..., u)`` written as a
  ``jax.lax.scan`` of length ``K`` and differentiated by ordinary reverse-mode autodiff, which
  stores the activations of every step.

The training step is ``jax.jit(jax.value_and_grad(loss))`` with respect to all parameters
(injection, cell, head): forward + backward, no optimizer update. Inputs are Gaussian
``(batch, in_features)`` and labels uniform; memory does not depend on the values.

Memory is measured two ways, both reported per (method, depth):

(a) **peak RSS in a fresh process** (``_common.peak_rss_in_subprocess`` running
    :func:`measure_point`). The function builds the model and data, compiles the step
    (ahead of time), releases freed heap memory to the OS (``malloc_trim``), then resets the
    process's peak-RSS high-water mark (``/proc/self/clear_refs``) and runs the step once,
    blocking on the gradients. So the transient memory of XLA *compilation* is excluded and
    reported apart (``compile_peak_delta_mib``). Reported:

    * ``peak_rss_delta_mib``: peak RSS during the step minus the RSS of the fresh process after
      imports (parameters, data, what building the model left behind, the compiled executable
      and the step's buffers);
    * ``exec_peak_delta_mib``: peak RSS during the step minus the RSS just before it (only what
      executing the step allocated).

(b) **XLA's compiled memory analysis** (``_common.xla_memory`` of the jitted step):
    ``temp_size_in_bytes``, the scratch memory beyond inputs and outputs (activations, solver
    state, adjoint state).

(c) **on a GPU**, the device allocator's statistics in the same fresh process
    (``device.memory_stats()``): ``device_step_peak_mib`` is the allocator's peak after the step
    minus the bytes in use just before it. Host RSS says nothing about device buffers, so on a
    GPU the target below uses (c) and (b). The allocator's peak cannot be reset; when an earlier
    allocation in the process (e.g. compilation's autotuning) peaked higher than the step, the
    step's own peak is unknown and reported as None.

Slopes: a least-squares line of memory against depth, in MiB per depth unit (per step/layer).
The expectation tested (and reported, never asserted here): the DEQ's peak at the largest depth
is at most 1.2x its peak at the smallest depth, while the unrolled net grows linearly.
"""

from __future__ import annotations

from benchmarks import _common as C

NAME = "memory"


def parse_args(argv=None):
    """The command line; it needs no JAX, so ``--help`` answers before the imports below."""
    parser = C.make_parser(__doc__.splitlines()[0], name=NAME)
    parser.add_argument("--jobs", type=int, default=2,
                        help="measurement processes run at the same time (each point is its own process)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and bad arguments answer here, before JAX is imported; main() reparses

import concurrent.futures
import ctypes
import gc
import os
import resource
import time
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp
from flax import nnx

import deq
import deq.nn
METHODS = ("deq", "unrolled", "reversible", "reversible_flat")
#: The methods of the smoke profile (each point is a fresh process: the reversible ones would
#: double its cost; ``tests/test_bench_memory_backward.py`` runs one reversible point in-process).
SMOKE_METHODS = ("deq", "unrolled")
#: The reversible methods' backward strategies, by method.
REVERSIBLE = {"reversible": "Reversible()", "reversible_flat": "Reversible(checkpoint_every=0)"}

#: DEQ peak at the largest depth divided by its peak at the smallest depth must stay below this.
TARGET_RATIO = 1.2


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


class TanhCell(nnx.Module):
    """Cell ``z -> tanh(z W + u)`` with ``W ~ N(0, 0.25 / width)`` (smoke profile only)."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.width = width
        self.lin = nnx.Linear(width, width, use_bias=False, rngs=rngs,
                              kernel_init=nnx.initializers.normal(0.5 / np.sqrt(width)))

    def init_state(self, x: jax.Array) -> jax.Array:
        return jnp.zeros(x.shape[:-1] + (self.width,), x.dtype)

    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.tanh(self.lin(z) + x)


class TanhDEQClassifier(nnx.Module):
    """``DEQClassifier``'s layout (``encoder``, ``deq``, ``head``) around a :class:`TanhCell`."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, *, rngs: nnx.Rngs,
                 solver, backward):
        self.encoder = nnx.Linear(in_features, hidden, rngs=rngs)
        self.deq = deq.nn.DEQ(TanhCell(hidden, rngs=rngs), solver=solver, backward=backward)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)


def make_model(cell: str, width: int, *, in_features: int, num_classes: int, solver, backward,
               rngs: nnx.Rngs) -> tuple[nnx.Module, str]:
    """The classifier (``encoder`` -> ``deq`` layer -> ``head``) and a description of its cell.

    ``cell="dense"``: the library's ``deq.nn.models.DEQClassifier(in_features, width,
    num_classes)`` (a ``DenseCell(width)`` with its default ``init_scale``);
    ``cell="tanh"``: :class:`TanhDEQClassifier`.
    """
    if cell == "dense":
        from deq.nn.models import DEQClassifier

        model = DEQClassifier(in_features, width, num_classes, rngs=rngs, solver=solver, backward=backward)
        return model, "deq.nn.models.DEQClassifier (DenseCell)"
    if cell == "tanh":
        model = TanhDEQClassifier(in_features, width, num_classes, rngs=rngs, solver=solver, backward=backward)
        return model, "TanhDEQClassifier (z -> tanh(z W + u))"
    raise ValueError(f"cell must be 'dense' or 'tanh', got {cell!r}")


def build_step(method: str, width: int, batch: int, depth: int, *, cell: str = "dense",
               in_features: int = 64, num_classes: int = 10, seed: int = 0):
    """The jitted training step of one (method, depth) point and its arguments.

    Both methods use the same model (same seed, same parameters): ``deq`` calls its DEQ layer,
    ``unrolled`` applies the layer's cell ``depth`` times under ``jax.lax.scan`` (the library's
    ``UnrolledClassifier`` is the same net written as a Python loop, whose compile time grows
    with the depth; the scan keeps the program size constant and the stored activations
    identical).

    Returns:
      ``(step, args, cell_name)``: ``step(*args) -> ((loss, num_steps), grads)``, where
      ``num_steps`` is the per-sample forward step count (``depth`` for the unrolled net).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in REVERSIBLE:
        solver = deq.ReversibleIteration(rtol=0.0, atol=1e-30, max_steps=depth)
        backward = deq.Reversible(checkpoint_every=0 if method == "reversible_flat" else None)
    else:
        solver = deq.FixedPointIteration(rtol=0.0, atol=1e-30, max_steps=depth)
        backward = deq.IFT(warn=False)
    model, cell_name = make_model(cell, width, in_features=in_features, num_classes=num_classes,
                                  solver=solver, backward=backward, rngs=nnx.Rngs(seed))
    # One problem over the whole batch (see the module docstring): its residual is exactly zero
    # only if every entry of every sample is stationary, so the solve runs all `depth` steps.
    model.deq = deq.nn.DEQ(model.deq.cell, solver=solver, backward=backward, batch_axis=None)
    graphdef, params = nnx.split(model)
    kx, ky = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(kx, (batch, in_features), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, num_classes)

    def loss_fn(params, x, y):
        model = nnx.merge(graphdef, params)
        u = model.encoder(x)
        if method != "unrolled":
            sol = model.deq(u, return_solution=True)
            z, steps = sol.value, jnp.full((batch,), sol.stats.num_steps, jnp.int32)
        else:
            cell_def, cell_state = nnx.split(model.deq.cell)

            def body(z, _):
                return nnx.merge(cell_def, cell_state)(z, u), None

            z, _ = jax.lax.scan(body, model.deq.cell.init_state(u), None, length=depth)
            steps = jnp.full((batch,), depth, jnp.int32)
        logits = model.head(z)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)
        return jnp.mean(nll), steps

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    return step, (params, x, y), cell_name


# --------------------------------------------------------------------------
# One measurement point (runs in a fresh process)
# --------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> bool:
    """Give freed heap memory back to the OS (glibc), so RSS reflects live memory."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _device_bytes() -> dict[str, int] | None:
    """``bytes_in_use`` / ``peak_bytes_in_use`` of the default device's allocator (None on CPU)."""
    if jax.default_backend() == "cpu":
        return None
    stats = C.device_memory() or {}
    keys = ("bytes_in_use", "peak_bytes_in_use")
    return {k: int(stats[k]) for k in keys} if all(k in stats for k in keys) else None


def _device_step_peak_mib(before: dict | None, after: dict | None) -> float | None:
    """Device memory the step added at its peak, or None when unknown.

    The allocator's peak counter cannot be reset, so the step's own peak is known only when the
    step raised the process's peak (``after.peak > before.peak``); otherwise an earlier
    allocation (building the data, compilation's autotuning) masks it and None is returned.
    """
    if not before or not after or after["peak_bytes_in_use"] <= before["peak_bytes_in_use"]:
        return None
    return (after["peak_bytes_in_use"] - before["bytes_in_use"]) / 2**20


def measure_point(method: str, width: int, batch: int, depth: int, cell: str = "dense",
                  seed: int = 0) -> dict[str, Any]:
    """Build, compile and run one training step; meant for ``peak_rss_in_subprocess``.

    The step is compiled ahead of time (``_common.xla_memory``, then the cached
    ``lower().compile()``), freed heap memory is trimmed, the peak-RSS mark is reset, and the
    compiled step runs once. Returns small JSON-able facts: XLA memory analysis, the forward
    step counts, and RSS figures in KiB taken inside the process.
    """
    rss_start = _status_kib("VmRSS")
    step, args, cell_name = build_step(method, width, batch, depth, cell=cell, seed=seed)
    jax.block_until_ready(args)
    rss_built = _status_kib("VmRSS")
    t0 = time.perf_counter()
    xla = C.xla_memory(step, *args)
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    gc.collect()
    trimmed = _malloc_trim()
    compile_hwm = _status_kib("VmHWM")
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak()
    dev_before = _device_bytes()
    t0 = time.perf_counter()
    (loss, steps), grads = compiled(*args)
    jax.block_until_ready(grads)
    run_s = time.perf_counter() - t0
    hwm_run = _status_kib("VmHWM")
    dev_after = _device_bytes()
    steps = np.asarray(steps)
    return {
        "cell": cell_name,
        "xla": xla,
        "num_steps_min": int(steps.min()),
        "num_steps_max": int(steps.max()),
        "loss": float(loss),
        "grad_finite": bool(all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))),
        "rss_start_kib": rss_start,
        "rss_built_kib": rss_built,
        "compile_hwm_kib": compile_hwm,
        "rss_before_step_kib": rss_before,
        "hwm_step_kib": hwm_run,
        "exec_peak_delta_kib": None if reset is False else hwm_run - rss_before,
        "peak_reset_inside": reset,
        "device_before": dev_before,
        "device_after": dev_after,
        "malloc_trim": trimmed,
        "compile_s": compile_s,
        "run_s": run_s,
    }


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the probes)."""
    self_, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + kids.ru_utime + kids.ru_stime


def _slope(depths, values) -> float | None:
    pts = [(d, v) for d, v in zip(depths, values) if v is not None]
    if len(pts) < 2:
        return None
    d, v = np.array(pts, dtype=float).T
    return float(np.polyfit(d, v, 1)[0])


def run(profile: str, seed: int, out, no_plot: bool, jobs: int = 2) -> dict[str, Any]:
    width = C.pick(profile, smoke=16, quick=128, full=512)
    batch = C.pick(profile, smoke=8, quick=512, full=512)
    depths = C.pick(profile, smoke=[2, 5], quick=[10, 30, 100, 300], full=[10, 30, 100, 300])
    # smoke checks the machinery only: the tanh cell compiles in a fraction of DenseCell's time.
    cell = C.pick(profile, smoke="tanh", quick="dense", full="dense")
    t_start, cpu_start, load_start = time.perf_counter(), cpu_seconds(), os.getloadavg()

    methods = C.pick(profile, smoke=SMOKE_METHODS, quick=METHODS, full=METHODS)
    grid = [(method, depth) for method in methods for depth in depths]

    probe_env = None
    if C.is_gpu():
        # Compilation's autotuning allocates scratch that would peak above a small step and mask
        # the step's own device peak (the allocator's peak counter cannot be reset); allocate on
        # demand so the device figures are the step's buffers, not a preallocated pool.
        flags = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
        probe_env = {"XLA_FLAGS": flags, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}

    def probe(point):
        method, depth = point
        return C.peak_rss_in_subprocess(
            "benchmarks.memory", "measure_point",
            {"method": method, "width": width, "batch": batch, "depth": depth, "cell": cell, "seed": seed},
            timeout=900, env=probe_env,
        )

    # Each point is its own process with its own peak-RSS mark, so running `jobs` of them at
    # once changes no figure (only wall time); `--jobs 1` runs them one after another.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        reports = [rep for _, rep in C.progress(zip(grid, pool.map(probe, grid)), total=len(grid),
                                                desc="points", label=lambda it: f"{it[0][0]} depth {it[0][1]}")]

    points: list[dict[str, Any]] = []
    for (method, depth), rep in zip(grid, reports):
        res = rep["result"]
        xla = res["xla"] or {}
        temp = xla.get("temp_size_in_bytes")
        points.append({
            "method": method,
            "depth": depth,
            "num_steps_min": res["num_steps_min"],
            "num_steps_max": res["num_steps_max"],
            "steps_ok": res["num_steps_min"] == depth == res["num_steps_max"],
            "peak_rss_delta_mib": rep["delta_mib"],
            "peak_rss_mib": rep["peak_mib"],
            "exec_peak_delta_mib": None if res["exec_peak_delta_kib"] is None else res["exec_peak_delta_kib"] / 1024,
            "compile_peak_delta_mib": (res["compile_hwm_kib"] - rep["baseline_kib"]) / 1024,
            "device_step_peak_mib": _device_step_peak_mib(res.get("device_before"), res.get("device_after")),
            "device_memory": {"before_step": res.get("device_before"), "after_step": res.get("device_after")},
            "xla_temp_bytes": temp,
            "xla_temp_mib": None if temp is None else temp / 2**20,
            "xla": xla,
            "hwm_reset": rep["hwm_reset"] and res["peak_reset_inside"],
            "malloc_trim": res["malloc_trim"],
            "loss": res["loss"],
            "grad_finite": res["grad_finite"],
            "compile_s": res["compile_s"],
            "run_s": res["run_s"],
            "rss_probe": {k: v for k, v in rep.items() if k != "result"},
        })
    cell_name = res["cell"]

    summary: dict[str, Any] = {}
    for method in methods:
        rows = [p for p in points if p["method"] == method]
        ds = [p["depth"] for p in rows]
        entry = {
            "slope_peak_rss_mib_per_depth": _slope(ds, [p["peak_rss_delta_mib"] for p in rows]),
            "slope_exec_peak_mib_per_depth": _slope(ds, [p["exec_peak_delta_mib"] for p in rows]),
            "slope_xla_temp_mib_per_depth": _slope(ds, [p["xla_temp_mib"] for p in rows]),
            "slope_device_step_peak_mib_per_depth": _slope(ds, [p["device_step_peak_mib"] for p in rows]),
        }
        lo, hi = rows[0], rows[-1]
        for key in ("peak_rss_delta_mib", "exec_peak_delta_mib", "xla_temp_mib", "device_step_peak_mib"):
            a, b = lo[key], hi[key]
            entry[f"ratio_{key}_max_over_min_depth"] = None if not a or b is None else b / a
        entry["all_steps_ok"] = all(p["steps_ok"] for p in rows)
        summary[method] = entry
    deq_s = summary["deq"]
    on_gpu = C.is_gpu()
    # On a GPU the step's buffers live in device memory: host RSS says nothing about them, so the
    # target uses the device allocator's peak there (and XLA's analysis on every backend).
    measured = "device_step_peak_mib" if on_gpu else "peak_rss_delta_mib"
    ratios = [deq_s[f"ratio_{measured}_max_over_min_depth"], deq_s["ratio_xla_temp_mib_max_over_min_depth"]]
    summary["target"] = {
        "statement": f"DEQ peak at depth {depths[-1]} <= {TARGET_RATIO}x its depth-{depths[0]} figure "
                     f"(both the {'device allocator peak of the step' if on_gpu else 'fresh-process peak RSS delta'}"
                     " and XLA temp bytes)",
        "ratio_limit": TARGET_RATIO,
        "measured": measured,
        "held_peak_rss" if not on_gpu else "held_device_peak": ratios[0] is not None and ratios[0] <= TARGET_RATIO,
        "held_xla_temp": ratios[1] is not None and ratios[1] <= TARGET_RATIO,
    }
    summary["target"]["held"] = bool(ratios[0] is not None and ratios[0] <= TARGET_RATIO
                                     and summary["target"]["held_xla_temp"])
    # Activation floats of one (batch, width) array, for reading the unrolled slope.
    summary["one_activation_mib"] = batch * width * 4 / 2**20
    un = summary["unrolled"]["slope_xla_temp_mib_per_depth"]
    summary["unrolled_xla_slope_in_activations_per_step"] = None if un is None else un / summary["one_activation_mib"]

    wall = time.perf_counter() - t_start
    cpu = cpu_seconds() - cpu_start
    payload = {
        "benchmark": NAME,
        "profile": profile,
        "command": f"python -m benchmarks.memory --profile {profile}",
        "settings": {
            "width": width, "batch": batch, "depths": depths, "in_features": 64, "num_classes": 10,
            "dtype": "float32", "seed": seed, "cell": cell_name, "jobs": jobs,
            "deq_solver": "FixedPointIteration(rtol=0, atol=1e-30, max_steps=depth), batch_axis=None",
            "deq_backward": "IFT(warn=False) (default adjoint solver: Anderson rtol=1e-4, atol=1e-6, max_steps=100, m=5)",
            "unrolled": "jax.lax.scan of the same cell, `depth` steps, ordinary reverse-mode autodiff",
            "methods": list(methods),
            "reversible_solver": "ReversibleIteration(rtol=0, atol=1e-30, max_steps=depth) (damping 0.5), batch_axis=None",
            "reversible_backward": {m: REVERSIBLE[m] for m in methods if m in REVERSIBLE},
            "step": "jax.jit(jax.value_and_grad(cross-entropy loss)) w.r.t. all parameters; no optimizer update",
        },
        "points": points,
        "summary": summary,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "load_average_1min": {"start": load_start[0], "end": os.getloadavg()[0]},
    }
    path = C.save_json(out, NAME, payload)

    C.print_table(
        [{**p, "xla_temp_mib": p["xla_temp_mib"]} for p in points],
        [("method", "method"), ("depth", "depth"), ("num_steps_max", "steps"),
         ("peak_rss_delta_mib", "peak RSS delta [MiB]"), ("exec_peak_delta_mib", "exec peak [MiB]"),
         ("compile_peak_delta_mib", "compile peak [MiB]"), ("xla_temp_mib", "XLA temp [MiB]")]
        + ([("device_step_peak_mib", "device step peak [MiB]")] if on_gpu else [])
        + [("run_s", "run [s]")],
        title=f"Peak memory of one training step ({profile}: width {width}, batch {batch}, cell {cell_name})",
    )
    C.print_table(
        [{"method": m, **summary[m]} for m in methods],
        [("method", "method"),
         ("slope_peak_rss_mib_per_depth", "RSS slope [MiB/depth]"),
         ("slope_xla_temp_mib_per_depth", "XLA slope [MiB/depth]"),
         ("ratio_peak_rss_delta_mib_max_over_min_depth", f"RSS d{depths[-1]}/d{depths[0]}"),
         ("ratio_xla_temp_mib_max_over_min_depth", f"XLA d{depths[-1]}/d{depths[0]}")]
        + ([("ratio_device_step_peak_mib_max_over_min_depth", f"device d{depths[-1]}/d{depths[0]}")]
           if on_gpu else [])
        + [("all_steps_ok", "steps == depth")],
        title=f"Growth with depth; target (DEQ ratio <= {TARGET_RATIO}) held: {summary['target']['held']}",
    )
    print(f"wrote {path}  ({wall:.1f} s wall, {cpu:.1f} s CPU, load average {os.getloadavg()[0]:.1f})")

    if not no_plot:
        plot(payload, out)
    return payload


def plot(payload: dict[str, Any], out) -> Any:
    """Draw memory against depth (both measurements) from a result payload; save the PNG.

    Also usable on a saved result: ``plot(json.load(open("memory.json")), out_dir)``.
    """
    points, summary, st = payload["points"], payload["summary"], payload["settings"]
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    backend = payload.get("environment", {}).get("jax_backend") or jax.default_backend()
    gpu = backend != "cpu"
    styles = {"deq": ("tab:blue", "o", "DEQ (IFT backward)"), "unrolled": ("tab:red", "s", "unrolled net (backprop)"),
              "reversible": ("tab:green", "^", "DEQ, reversible iteration + Reversible()"),
              "reversible_flat": ("tab:olive", "v", "DEQ, reversible + Reversible(checkpoint_every=0)")}
    for method in payload["settings"].get("methods", ("deq", "unrolled")):
        rows = [p for p in points if p["method"] == method]
        ds = [p["depth"] for p in rows]
        color, marker, label = styles[method]
        if gpu:
            dev = [p.get("device_step_peak_mib") for p in rows]
            axes[0].plot(ds, [np.nan if v is None else v for v in dev], marker=marker, color=color,
                         label=f"{label}: device peak of the step")
        else:
            axes[0].plot(ds, [p["peak_rss_delta_mib"] for p in rows], marker=marker, color=color,
                         label=f"{label}: peak RSS delta")
        if not gpu and all(p["exec_peak_delta_mib"] is not None for p in rows):
            axes[0].plot(ds, [p["exec_peak_delta_mib"] for p in rows], marker=marker, color=color,
                         ls="--", mfc="none", label=f"{label}: step execution only")
        slope = summary[method]["slope_xla_temp_mib_per_depth"]
        if slope is not None:
            slope = 0.0 if abs(slope) < 1e-6 else slope  # least-squares round-off on a flat line
        axes[1].plot(ds, [p["xla_temp_mib"] for p in rows], marker=marker, color=color,
                     label=label if slope is None else f"{label}: slope {slope:.3g} MiB/depth")
    axes[0].set_title("(a) device allocator peak during the step" if gpu else "(a) peak RSS in a fresh process")
    axes[0].set_ylabel("memory above the step's inputs [MiB]" if gpu else "memory above process baseline [MiB]")
    axes[1].set_title("(b) XLA memory analysis: temp buffers")
    axes[1].set_ylabel("temp_size_in_bytes [MiB]")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")  # from tens of MiB (DEQ) to GiB (unrolled)
        ax.set_xlabel("effective depth K (forward solver steps / layers)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper left")
    fig.suptitle(f"One training step (forward + backward), width {st['width']}, batch {st['batch']}, "
                 f"float32, {backend}", fontsize=10)
    fig.tight_layout()
    return C.save_figure(fig, out, NAME)


def main(argv=None) -> None:
    args = parse_args(argv)
    C.smoke_notice(args.profile, NAME)
    run(args.profile, args.seed, args.out, args.no_plot, args.jobs)
    C.smoke_notice(args.profile, NAME, end=True)


if __name__ == "__main__":
    main()
