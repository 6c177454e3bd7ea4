"""Reversible DEQs: how exact the reversed gradient is, against steps and damping, and its memory.

Run ``python -m benchmarks.reversible --profile smoke|quick|full`` (``--out DIR``, ``--seed``,
``--no-plot``).

Problem: the contractive problem of ``benchmarks/solvers.py``, read from
``benchmarks/results/solvers_problem.npz``::

    z = tanh(z W^T + x U^T + b),   z: (64, 256), ||W||_2 = 0.95 (symmetric, eigenvalues in [-0.95, 0])

solved as one vector (``batch_axis=None``) from ``z0 = 0`` by ``deq.ReversibleIteration(damping=b)``
with a fixed budget (``rtol = atol = 0``: exactly ``N`` steps). The loss is ``sum(c * z_N)`` with
a fixed Gaussian ``c``; the gradient is with respect to ``(W, U, b, x)``. The smoke profile uses
the first 32 rows and columns of W and 4 samples (it only checks that the code runs).

Measured:

* ``gradient``: relative error ``||g - g_ref|| / ||g_ref||`` of the float32 gradient, with
  ``g_ref`` ordinary backprop (``deq.Unrolled()``) through the same iteration in float64, for
  float32 backprop (``Unrolled``), reversal in one sweep (``Reversible(checkpoint_every=0)``,
  what banax does), the default ``Reversible()`` (segments of ``derived_checkpoint_every(b)``
  steps), and, at ``b = 0.5``, segments of ``k`` steps; in float64, one-sweep and default
  reversal against the same reference.
* ``reconstruction``: one trajectory of ``N_max`` steps is stored (float32 and float64), then
  rebuilt backwards by algebra alone (the formulas of ``ReversibleIteration.unstep``): in one
  sweep from step ``N_max``, and in segments restarted from the stored ``(y, z)`` every ``k``
  steps. Reported: the error of the rebuilt ``(y_n, z_n)`` against the stored ones, relative
  to the size of ``(y_N, z_N)``,
  against the number of steps undone, the growth per undone step (geometric mean of the float64
  one-sweep curve while it lies between 1e-13 and 1e-4), and the largest error over the
  trajectory per segment length. Also the forward residual ``||f(z_n) - z_n||`` of the same
  trajectory (which ``b`` converge, and how fast: ``steps_to_1e-4``).
* ``memory``: XLA's ``temp_size_in_bytes`` of the compiled gradient against ``max_steps``, for
  ``Unrolled``, ``Reversible(checkpoint_every=0)``, ``Reversible()``, ``Reversible(checkpoint_every=1)``
  and ``IFT()`` (all with the ``ReversibleIteration(damping=0.5)`` forward).
* ``time``: median time of one jitted gradient (forward + backward) at ``N`` steps for the same
  strategies (quick/full only; on whatever machine it runs).
"""

from __future__ import annotations

from benchmarks import _common as C

NAME = "reversible"


def parse_args(argv=None):
    """The command line; it needs no JAX, so ``--help`` answers before the imports below."""
    return C.make_parser(__doc__.splitlines()[0], name=NAME).parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and bad arguments answer here, before JAX is imported; main() reparses

import math
import time

import numpy as np

import jax
import jax.numpy as jnp

import deq
from deq.backward.reversible import derived_checkpoint_every

PROBLEM = C.COMMITTED_RESULTS / "solvers_problem.npz"


def load_problem(profile: str) -> tuple[np.ndarray, ...]:
    """``(W, U, b, x)`` of the solvers benchmark's contractive problem (float32 arrays)."""
    if not PROBLEM.exists():
        raise SystemExit(f"{PROBLEM} is missing: run python -m benchmarks.solvers --out benchmarks/results first")
    d = np.load(PROBLEM)
    W, U, b, x = d["W_contractive"], d["U"], d["b"], d["x"]
    if profile == "smoke":
        W, U, b, x = W[:32, :32], U[:32], b[:32], x[:4]
    return W, U, b, x


def cell(z, p):
    W, U, b, x = p
    return jnp.tanh(z @ W.T + x @ U.T + b)


def loss_weights(arrays, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 1).normal(size=(arrays[3].shape[0], arrays[0].shape[0]))


def gradient(arrays, c, dtype, steps: int, damping: float, backward):
    """The flattened float64 gradient of ``sum(c * z_N)`` with respect to ``(W, U, b, x)``."""
    p = tuple(jnp.asarray(a, dtype) for a in arrays)
    cc = jnp.asarray(c, dtype)
    solver = deq.ReversibleIteration(rtol=0.0, atol=0.0, max_steps=steps, damping=damping)

    def loss(p):
        return jnp.sum(cc * deq.fixed_point(cell, jnp.zeros(cc.shape, dtype), p, solver=solver,
                                            backward=backward).value)

    g = jax.jit(jax.grad(loss))(p)
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in g])


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def measure_gradient(arrays, c, steps_grid, b_grid, k_grid) -> list[dict]:
    rows = []
    points = [(b, n) for b in b_grid for n in steps_grid]
    for b, n in C.progress(points, desc="gradient", label=lambda p: f"b={p[0]} N={p[1]}"):
        with jax.enable_x64(True):
            ref = gradient(arrays, c, jnp.float64, n, b, deq.Unrolled())
            plain64 = rel(gradient(arrays, c, jnp.float64, n, b, deq.Reversible(checkpoint_every=0)), ref)
            default64 = rel(gradient(arrays, c, jnp.float64, n, b, deq.Reversible()), ref)
        row = {
            "damping": b, "steps": n, "default_k": derived_checkpoint_every(b),
            "unrolled_f32": rel(gradient(arrays, c, jnp.float32, n, b, deq.Unrolled()), ref),
            "one_sweep_f32": rel(gradient(arrays, c, jnp.float32, n, b, deq.Reversible(checkpoint_every=0)), ref),
            "default_f32": rel(gradient(arrays, c, jnp.float32, n, b, deq.Reversible()), ref),
            "one_sweep_f64": plain64, "default_f64": default64,
        }
        if b == 0.5:
            for k in k_grid:
                row[f"k{k}_f32"] = rel(gradient(arrays, c, jnp.float32, n, b, deq.Reversible(checkpoint_every=k)), ref)
        rows.append(row)
    return rows


def _trajectory(arrays, dtype, steps):
    """Forward trajectory and its algebraic reconstruction, with the damping traced (one compile per dtype).

    Returns ``(forward, rebuild)``: ``forward(b)`` gives the stored states ``(N + 1, ...)`` and
    the forward residuals; ``rebuild(b, k, ys, zs)`` the error of every state rebuilt from the
    nearest stored state above it, restarting every ``k`` steps (``k = 0``: one sweep from step
    N), relative to the size of the last state.
    """
    p = tuple(jnp.asarray(a, dtype) for a in arrays)
    F = lambda z: cell(z, p)  # noqa: E731
    z0 = jnp.zeros((arrays[3].shape[0], arrays[0].shape[0]), dtype)

    @jax.jit
    def forward(b):
        def step(carry, _):  # ReversibleIteration.step, with b traced
            y, z = carry
            y = y + b * (F(z) - y)
            z = z + b * (F(y) - z)
            return (y, z), (y, z, jnp.linalg.norm(F(z) - z))

        _, (ys, zs, res) = jax.lax.scan(step, (z0, z0), None, length=steps)
        cat = lambda a, s: jnp.concatenate([a[None], s])  # noqa: E731
        return cat(z0, ys), cat(z0, zs), cat(jnp.linalg.norm(F(z0) - z0), res)

    @jax.jit
    def rebuild(b, k, ys, zs):
        scale = jnp.sqrt(jnp.sum(ys[steps] ** 2) + jnp.sum(zs[steps] ** 2))
        def back(carry, n):  # ReversibleIteration.unstep from step n to n - 1
            y, z = carry
            restart = (k > 0) & (n % jnp.maximum(k, 1) == 0)
            y, z = jnp.where(restart, ys[n], y), jnp.where(restart, zs[n], z)
            z_prev = (z - b * F(y)) / (1.0 - b)
            y_prev = (y - b * F(z_prev)) / (1.0 - b)
            err = jnp.sqrt(jnp.sum((y_prev - ys[n - 1]) ** 2) + jnp.sum((z_prev - zs[n - 1]) ** 2)) / scale
            return (y_prev, z_prev), err

        _, errs = jax.lax.scan(back, (ys[steps], zs[steps]), jnp.arange(steps, 0, -1))
        return errs  # errs[d - 1]: after undoing d steps from N (state N - d)

    return forward, rebuild


def growth_per_step(errs: np.ndarray) -> float | None:
    """Geometric-mean growth per undone step of a one-sweep error curve, where it is informative."""
    errs = np.asarray(errs, np.float64)
    ok = np.flatnonzero(np.isfinite(errs) & (errs > 1e-13) & (errs < 1e-4))
    if ok.size < 2 or ok[-1] == ok[0]:
        return None
    return float((errs[ok[-1]] / errs[ok[0]]) ** (1.0 / (ok[-1] - ok[0])))


def measure_reconstruction(arrays, steps, b_grid, k_grid) -> dict:
    out = {}
    for dtype in (jnp.float32, jnp.float64):
        name = jnp.dtype(dtype).name
        with jax.enable_x64(dtype == jnp.float64):
            forward, rebuild = _trajectory(arrays, dtype, steps)
            per_b = {}
            for b in C.progress(b_grid, desc=f"reconstruction {name}", label=lambda b: f"b={b}"):
                ys, zs, res = forward(jnp.asarray(b, dtype))
                res = np.asarray(res, np.float64)
                one = np.asarray(rebuild(jnp.asarray(b, dtype), 0, ys, zs), np.float64)
                below = np.flatnonzero(res <= 1e-4)
                seg = {str(k): float(np.nanmax(np.asarray(rebuild(jnp.asarray(b, dtype), k, ys, zs), np.float64)))
                       for k in sorted(set(k_grid) | {derived_checkpoint_every(b)})}
                per_b[str(b)] = {
                    "one_sweep_error_vs_undone": one.tolist(),
                    "growth_per_undone_step": growth_per_step(one),
                    "largest_error_by_segment": seg,
                    "default_k": derived_checkpoint_every(b),
                    "residual": res.tolist(),
                    "steps_to_1e-4": int(below[0]) if below.size else None,
                    "final_residual": float(res[-1]),
                }
            out[name] = per_b
    return out


def measure_memory(arrays, steps_grid) -> list[dict]:
    c = loss_weights(arrays, 0).astype(np.float32)
    p = tuple(jnp.asarray(a) for a in arrays)
    rows = []
    strategies = {"Unrolled": deq.Unrolled(), "Reversible(0)": deq.Reversible(checkpoint_every=0),
                  "Reversible()": deq.Reversible(), "Reversible(1)": deq.Reversible(checkpoint_every=1),
                  "IFT()": deq.IFT(warn=False)}
    for n in C.progress(steps_grid, desc="memory", label=lambda n: f"N={n}"):
        solver = deq.ReversibleIteration(rtol=0.0, atol=0.0, max_steps=n)
        row = {"steps": n}
        for name, bw in strategies.items():
            loss = lambda p, bw=bw: jnp.sum(c * deq.fixed_point(cell, jnp.zeros(c.shape), p, solver=solver,  # noqa: E731
                                                                  backward=bw).value)
            mem = C.xla_memory(jax.jit(jax.grad(loss)), p)
            row[name] = None if mem is None else mem.get("temp_size_in_bytes")
        rows.append(row)
    return rows


def measure_time(arrays, steps: int, repeats: int) -> dict:
    c = jnp.asarray(loss_weights(arrays, 0), jnp.float32)
    p = tuple(jnp.asarray(a) for a in arrays)
    solver = deq.ReversibleIteration(rtol=0.0, atol=0.0, max_steps=steps)
    out = {}
    for name, bw in {"Unrolled": deq.Unrolled(), "Reversible(0)": deq.Reversible(checkpoint_every=0),
                     "Reversible()": deq.Reversible(), "IFT()": deq.IFT(warn=False)}.items():
        loss = lambda p, bw=bw: jnp.sum(c * deq.fixed_point(cell, jnp.zeros(c.shape), p, solver=solver,  # noqa: E731
                                                              backward=bw).value)
        t = C.time_fn(jax.jit(jax.grad(loss)), p, warmup=1, repeats=repeats, clear_caches=False)
        out[name] = {"median_s": t["median_s"], "iqr_s": t["iqr_s"], "compile_s": t["compile_s"]}
        C.say(f"time {name}: {t['median_s'] * 1e3:.1f} ms")
    fwd = jax.jit(lambda p: deq.fixed_point(cell, jnp.zeros(c.shape), p, solver=solver).value)
    out["forward only"] = {k: v for k, v in C.time_fn(fwd, p, warmup=1, repeats=repeats, clear_caches=False).items()
                           if k in ("median_s", "iqr_s", "compile_s")}
    return {"steps": steps, "damping": 0.5, "by_strategy": out}


def _f(v) -> float:
    """A plotted value: None (a NaN in the JSON) and "inf" as NaN."""
    return float("nan") if v is None or isinstance(v, str) else float(v)


def plot(results, out) -> None:
    """The four panels of ``reversible.png`` from `results` (as run, or as read back from the JSON)."""
    plt = C.pyplot()
    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
    grad = results["gradient"]
    styles = {"unrolled_f32": ("float32 backprop (Unrolled)", "k--"), "one_sweep_f32": ("one sweep (banax-like)", "r-o"),
              "default_f32": ("Reversible() default", "b-s"), "one_sweep_f64": ("one sweep, float64", "r:"),
              "default_f64": ("Reversible(), float64", "b:")}
    a = ax[0, 0]
    for b, marker in zip(sorted({r["damping"] for r in grad}), ("o", "s", "^", "v", "d", "x")):
        rows = [r for r in grad if r["damping"] == b]
        steps = [r["steps"] for r in rows]
        a.plot(steps, [_f(r["one_sweep_f32"]) for r in rows], "r-", marker=marker, alpha=0.7, label=f"one sweep, b={b}")
        a.plot(steps, [_f(r["default_f32"]) for r in rows], "b-", marker=marker, alpha=0.7, label=f"Reversible(), b={b}")
        a.plot(steps, [_f(r["unrolled_f32"]) for r in rows], "k:", marker=marker, alpha=0.5)
    a.set(xscale="log", yscale="log", xlabel="steps N", ylabel="relative gradient error (float32)",
          title="(a) gradient vs float64 backprop; dotted: float32 backprop")
    a.legend(fontsize=7, ncol=2)
    a = ax[0, 1]
    rows = [r for r in grad if r["damping"] == 0.5]
    for key in [k for k in rows[0] if k.startswith("k") and k.endswith("_f32")] if rows else []:
        a.plot([r["steps"] for r in rows], [_f(r[key]) for r in rows], "-o", label=f"segments of {key[1:-4]}")
    for key, (label, style) in reversed(styles.items()):  # float32 backprop last: on top
        if rows:
            a.plot([r["steps"] for r in rows], [_f(r[key]) for r in rows], style, label=label)
    a.set(xscale="log", yscale="log", xlabel="steps N", ylabel="relative gradient error",
          title="(b) b = 0.5: segment length (float32) and float64")
    a.legend(fontsize=7)
    a = ax[1, 0]
    rec = results["reconstruction"]
    colors = plt.get_cmap("viridis")
    for name, style in (("float32", "-"), ("float64", "--")):
        for i, (b, d) in enumerate(rec[name].items()):
            e = np.asarray([_f(v) for v in d["one_sweep_error_vs_undone"]])
            a.plot(np.arange(1, e.size + 1), np.where(np.isfinite(e), e, np.nan), style,
                   color=colors(i / max(1, len(rec[name]) - 1)), label=f"{name} b={b}")
    a.set(yscale="log", xlabel="steps undone (one sweep)", ylabel="relative error of rebuilt (y, z)",
          title="(c) reconstruction in one sweep", ylim=(1e-17, 1e3))
    a.legend(fontsize=6, ncol=2)
    a = ax[1, 1]
    mem = results["memory"]
    for key in [k for k in mem[0] if k != "steps"]:
        a.plot([r["steps"] for r in mem], [_f(r[key]) / 2**20 for r in mem], "-o", label=key)
    a.set(xscale="log", yscale="log", xlabel="max_steps", ylabel="XLA temp MiB of the gradient",
          title="(d) memory of one gradient")
    a.legend(fontsize=7)
    shape = " x ".join(str(d) for d in results["problem"]["state"])
    fig.suptitle(f"Reversible DEQs on the solvers benchmark's contractive problem (z: {shape}, ||W|| = 0.95)")
    fig.tight_layout()
    C.save_figure(fig, out, NAME)


def run(profile: str, seed: int, out, no_plot: bool) -> dict:
    arrays = load_problem(profile)
    c = loss_weights(arrays, seed)
    steps_grid = C.pick(profile, smoke=[5, 10], quick=[10, 50, 150], full=[10, 20, 50, 100, 200, 500])
    b_grid = C.pick(profile, smoke=[0.5], quick=[0.3, 0.5, 0.8, 0.9], full=[0.1, 0.3, 0.5, 0.7, 0.8, 0.9])
    k_grid = C.pick(profile, smoke=[2], quick=[2, 8, 16], full=[1, 2, 8, 16])
    rec_steps = C.pick(profile, smoke=20, quick=200, full=500)
    rec_b = C.pick(profile, smoke=[0.5], quick=[0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 1.2, 1.5],
                   full=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.1, 1.2, 1.5, 1.8])
    mem_steps = C.pick(profile, smoke=[5, 10], quick=[10, 50, 100, 200, 400], full=[10, 50, 100, 200, 400, 1000])
    t0 = time.perf_counter()
    results = {
        "problem": {"npz": str(PROBLEM.relative_to(C.REPO_ROOT)), "W": "W_contractive", "state": list(c.shape),
                    "loss": "sum(c * z_N), c ~ N(0, 1)", "z0": 0, "batch_axis": None,
                    "solver": "ReversibleIteration(rtol=0, atol=0, max_steps=N, damping=b)"},
        "profile": profile, "seed": seed,
        "gradient": measure_gradient(arrays, c, steps_grid, b_grid, k_grid),
        "reconstruction": measure_reconstruction(arrays, rec_steps, rec_b, k_grid),
        "memory": measure_memory(arrays, mem_steps),
    }
    if profile != "smoke":
        results["time"] = measure_time(arrays, 100, C.pick(profile, smoke=1, quick=5, full=20))
    results["wall_s"] = time.perf_counter() - t0

    C.print_table(results["gradient"], ["damping", "steps", "default_k", "unrolled_f32", "one_sweep_f32", "default_f32",
                                        *[f"k{k}_f32" for k in k_grid], "one_sweep_f64", "default_f64"],
                  title="relative gradient error against float64 backprop (float32 unless _f64)", keep=2)
    recon_rows = []
    for name, per_b in results["reconstruction"].items():
        for b, d in per_b.items():
            recon_rows.append({"dtype": name, "damping": float(b), "growth/step": d["growth_per_undone_step"],
                               "steps_to_1e-4": d["steps_to_1e-4"], "final_res": d["final_residual"],
                               "default_k": d["default_k"],
                               **{f"max_err_k{k}": v for k, v in d["largest_error_by_segment"].items()},
                               "one_sweep_max": float(np.nanmax(d["one_sweep_error_vs_undone"]))
                               if np.isfinite(d["one_sweep_error_vs_undone"]).any() else math.nan})
    keys = sorted({k for r in recon_rows for k in r if k.startswith("max_err_k")}, key=lambda s: int(s[9:]))
    C.print_table(recon_rows, ["dtype", "damping", "growth/step", "steps_to_1e-4", "final_res", "default_k", *keys,
                               "one_sweep_max"], title=f"reconstruction of a {rec_steps}-step trajectory", keep=2)
    C.print_table(results["memory"], ["steps", *[k for k in results["memory"][0] if k != "steps"]],
                  title="XLA temp bytes of one compiled gradient")
    if "time" in results:
        C.print_table([{"strategy": k, **v} for k, v in results["time"]["by_strategy"].items()],
                      ["strategy", "median_s", "iqr_s", "compile_s"], title="time of one gradient at N = 100, b = 0.5")
    C.save_json(out, NAME, results)
    if not no_plot:
        plot(results, out)
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    C.smoke_notice(args.profile, NAME)
    run(args.profile, args.seed, args.out, args.no_plot)
    C.smoke_notice(args.profile, NAME, end=True)


if __name__ == "__main__":
    main()
