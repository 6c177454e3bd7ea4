"""Continuous batching: samples per second of plain batched solves, streaming and compaction.

Run ``python -m benchmarks.batching --profile smoke|quick|full`` (``--out DIR``, ``--seed``,
``--no-plot``).

A plain batched solve (``deq.fixed_point(..., batch_axis=0)``) evaluates ``f`` on the whole
batch until its slowest sample stops. Measured side by side, in one run:

* ``plain``: the dataset in batches of ``B``, solved one batch after another by
  ``deq.fixed_point(..., batch_axis=0)`` inside one compiled ``lax.map`` (no Python dispatch per
  batch is counted), the cost set by each batch's largest step count;
* ``stream_<S>``: ``deq.fixed_point_stream`` over the whole dataset with ``S`` slots (its default
  tail compaction, ``tail_buckets=4``); ``stream_<B>_no_tail`` with ``tail_buckets=0``;
* ``compact``: a training batch of ``B`` through ``deq.fixed_point_compact`` (buckets ``B``,
  ``B/2``, ``B/4``, ``B/8``) against the plain solve of that batch, forward alone and forward +
  IFT backward (``jax.grad``), over several batches.

Problems: (a) ``synthetic``: ``z = tanh(s_i W z + x_i)`` with ``W`` symmetric of spectral
radius 1, so sample ``i`` contracts at rate about ``s_i``; ``s_i = tol^(1/t_i)`` with ``t_i``
Pareto-distributed (index ``ALPHA``, at least ``T_MIN``): most samples need a few plain
iteration steps, a few run to ``max_steps``; solved with ``deq.FixedPointIteration``. (b) the
dense DEQs of ``benchmarks.deq_vs_explicit`` trained here on ``digits`` and ``mnist1d`` (same
settings; quick trains fewer epochs, see ``EPOCHS``), solved with their Anderson solver on the
test split (the encoder's injections computed once; only the DEQ solve is timed). The smoke
profile runs the synthetic problem only.

Recorded per problem: the step counts (mean, per-batch max of the plain solve), the *ideal
speedup* ``mean over batches of max steps / mean steps`` (the issue's definition) and the
work ratio ``sum_b B (max_b + 1) / sum_i (steps_i + 1)`` (evaluations of ``f`` per row, which
counts each sample's start), samples per second (the fastest of the repeats after a compiling
call and a warm-up; medians kept), whether the results are identical (steps, converged, values
to rounding; predictions for the models), and XLA's memory estimate of each compiled program.
Target: streaming reaches at least 0.7 of the ideal speedup. Timings on a shared CPU are noisy:
the machine's load average is recorded.
"""

from __future__ import annotations

from benchmarks import _common as C

NAME = "batching"


def parse_args(argv=None):
    """The command line; it needs no JAX, so ``--help`` answers before the imports below."""
    return C.make_parser(__doc__.splitlines()[0], name=NAME).parse_args(argv)


if __name__ == "__main__":
    parse_args()

import os
import time
import warnings
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp
from flax import nnx

import deq

ALPHA = 1.2  # Pareto index of the synthetic problem's step counts
T_MIN = 3.0
TOL = 1e-4  # the synthetic solver's rtol; rates are set from it
TARGET = 0.7
EPOCHS = {"quick": {"digits": 5, "mnist1d": 5}, "full": {}}


def settings(profile: str) -> dict[str, Any]:
    return C.pick(
        profile,
        smoke=dict(N=128, n=16, B=32, slots=[16], max_steps=50, repeats=1, compact_batches=2, datasets=[],
                   memory=False, compact_grad=False),
        quick=dict(N=4096, n=256, B=256, slots=[64, 256, 1024], max_steps=300, repeats=3, compact_batches=4,
                   datasets=["digits", "mnist1d"], memory=True, compact_grad=True),
        full=dict(N=16384, n=256, B=256, slots=[64, 128, 256, 512, 1024, 2048], max_steps=500, repeats=5,
                  compact_batches=8, datasets=["digits", "mnist1d"], memory=True, compact_grad=True),
    )


def load() -> list[float]:
    return list(os.getloadavg())


# --------------------------------------------------------------------------------------------
# Measurements shared by both problems
# --------------------------------------------------------------------------------------------


def best_time(fn, repeats: int) -> dict[str, float]:
    """Compile call, one warm-up, then `repeats` timed calls: the fastest and the median."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return {"time_s": float(min(times)), "time_median_s": float(np.median(times)), "first_call_s": compile_s}


def step_stats(steps: np.ndarray, B: int) -> dict[str, Any]:
    N = len(steps)
    batches = [steps[i:i + B] for i in range(0, N, B)]
    maxes = np.array([b.max() for b in batches])
    work_plain = sum(len(b) * (b.max() + 1) for b in batches)
    return {
        "mean_steps": float(steps.mean()), "max_steps": int(steps.max()), "median_steps": float(np.median(steps)),
        "p90_steps": float(np.percentile(steps, 90)),
        "per_batch_max_steps_mean": float(maxes.mean()),
        "ideal_speedup": float(maxes.mean() / max(steps.mean(), 1e-9)),
        "work_ratio": float(work_plain / (steps + 1).sum()),
    }


MEMORY = [True]


def xla_mem(fn, *args) -> int | None:
    """XLA's temporary buffer size of `fn`'s compiled program (a compilation of its own)."""
    if not MEMORY[0]:
        return None
    stats = C.xla_memory(jax.jit(fn), *args)
    return None if stats is None else stats.get("temp_size_in_bytes")


def compare(plain_time: float, N: int, stream: dict[str, dict], stats: dict) -> dict[str, Any]:
    out = {}
    for key, r in stream.items():
        speedup = plain_time / r["time_s"]
        out[key] = {"speedup": speedup, "fraction_of_ideal": speedup / stats["ideal_speedup"],
                    "fraction_of_work_ratio": speedup / stats["work_ratio"]}
    return out


# --------------------------------------------------------------------------------------------
# (a) synthetic heavy-tailed problem
# --------------------------------------------------------------------------------------------


def synthetic_cell(z, W, xs):
    x, s = xs
    return jnp.tanh(s[:, None] * (z @ W) + x)


def _plain_f(z, a):
    return synthetic_cell(z, a[0], a[1])


def synthetic_problem(N: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    W = (A + A.T) / np.linalg.norm(A + A.T, 2)
    x = 0.05 * rng.standard_normal((N, n))
    t = T_MIN * rng.uniform(size=N) ** (-1.0 / ALPHA)  # Pareto: P(t > k) = (T_MIN / k)^ALPHA
    s = TOL ** (1.0 / t)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return f32(W), (f32(x), f32(s)), jnp.full((N, n), 0.5, jnp.float32)


def run_synthetic(st: dict[str, Any], seed: int) -> dict[str, Any]:
    N, n, B, repeats = st["N"], st["n"], st["B"], st["repeats"]
    W, xs, z0 = synthetic_problem(N, n, seed)
    solver = deq.FixedPointIteration(rtol=TOL, atol=0.0, max_steps=st["max_steps"])
    batches = [(z0[i:i + B], jax.tree_util.tree_map(lambda a: a[i:i + B], xs)) for i in range(0, N, B)]
    stack = lambda a: a.reshape((N // B, B) + a.shape[1:])  # noqa: E731
    zb, xsb = stack(z0), jax.tree_util.tree_map(stack, xs)
    # The plain solve of every batch, one after another, in one compiled program (lax.map), so
    # that no Python dispatch per batch is counted against it.
    plain_all = jax.jit(lambda zb, W, xsb: jax.lax.map(
        lambda a: deq.fixed_point(_plain_f, a[0], (W, a[1]), batch_axis=0, solver=solver), (zb, xsb)))

    C.say(f"synthetic: plain, {N} samples in batches of {B}")
    plain = best_time(lambda: plain_all(zb, W, xsb), repeats)
    sol = plain_all(zb, W, xsb)
    p_steps = np.asarray(sol.stats.num_steps).reshape(-1)
    p_value = np.asarray(sol.value).reshape(N, n)
    p_conv = np.asarray(sol.stats.converged).reshape(-1)
    stats = step_stats(p_steps, B)
    stats["converged_frac"] = float(p_conv.mean())
    res: dict[str, Any] = {"settings": {"N": N, "n": n, "B": B, "solver": repr(solver), "alpha": ALPHA,
                                        "t_min": T_MIN, "dtype": "float32"},
                           "steps": stats, "plain": {**plain, "samples_per_s": N / plain["time_s"],
                                                     "temp_bytes": xla_mem(plain_all, zb, W, xsb)}}
    stream = {}
    for S, tail in [(S, 4) for S in st["slots"]] + ([(B, 0)] if st["memory"] else []):
        key = f"stream_{S}" + ("" if tail else "_no_tail")
        C.say(f"synthetic: {key}")
        run = jax.jit(lambda z, W, xs, S=S, tail=tail: deq.fixed_point_stream(
            synthetic_cell, z, W, xs, solver=solver, slots=S, tail_buckets=tail))
        r = best_time(lambda: run(z0, W, xs), repeats)
        sol = run(z0, W, xs)
        d_steps = np.asarray(sol.stats.num_steps) - p_steps
        r.update(samples_per_s=N / r["time_s"],
                 identical_steps=bool(np.array_equal(np.asarray(sol.stats.num_steps), p_steps)),
                 steps_mismatches=int((d_steps != 0).sum()), max_steps_diff=int(np.abs(d_steps).max()),
                 identical_converged=bool(np.array_equal(np.asarray(sol.stats.converged), p_conv)),
                 max_value_diff=float(np.max(np.abs(np.asarray(sol.value) - p_value))),
                 temp_bytes=xla_mem(run, z0, W, xs))
        stream[key] = r
    res["stream"] = stream
    res["vs_plain"] = compare(plain["time_s"], N, stream, stats)
    res["compact"] = run_compact_synthetic(st, W, batches, solver)
    return res


def _timed_pair(plain_fn, compact_fn, args_list, repeats):
    """Forward (and forward + backward) time over several batches, plain and compacted."""
    out = {}
    for key, fn in (("plain", plain_fn), ("compact", compact_fn)):
        out[key] = best_time(lambda fn=fn: [fn(*a) for a in args_list], repeats)
    out["speedup"] = out["plain"]["time_s"] / out["compact"]["time_s"]
    return out


def run_compact_synthetic(st, W, batches, solver) -> dict[str, Any]:
    repeats, nb = st["repeats"], st["compact_batches"]
    args_list = [(z, W, x) for z, x in batches[:nb]]
    plain_fwd = jax.jit(lambda z, W, xs: deq.fixed_point(_plain_f, z, (W, xs), batch_axis=0, solver=solver).value)
    comp_fwd = jax.jit(lambda z, W, xs: deq.fixed_point_compact(synthetic_cell, z, W, xs, solver=solver).value)

    def loss_plain(W, z, xs):
        return jnp.sum(jnp.sin(deq.fixed_point(_plain_f, z, (W, xs), batch_axis=0, solver=solver).value))

    def loss_comp(W, z, xs):
        return jnp.sum(jnp.sin(deq.fixed_point_compact(synthetic_cell, z, W, xs, solver=solver).value))

    plain_grad = jax.jit(lambda z, W, xs: jax.grad(loss_plain)(W, z, xs))
    comp_grad = jax.jit(lambda z, W, xs: jax.grad(loss_comp)(W, z, xs))
    C.say("synthetic: compaction, forward")
    fwd = _timed_pair(plain_fwd, comp_fwd, args_list, repeats)
    both, rel = None, None
    if st["compact_grad"]:
        C.say("synthetic: compaction, forward + backward")
        both = _timed_pair(plain_grad, comp_grad, args_list, repeats)
        g_p = [np.asarray(plain_grad(*a)) for a in args_list]
        g_c = [np.asarray(comp_grad(*a)) for a in args_list]
        rel = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30)) for a, b in zip(g_p, g_c))
    v_p = [np.asarray(plain_fwd(*a)) for a in args_list]
    v_c = [np.asarray(comp_fwd(*a)) for a in args_list]
    return {"batches": nb, "buckets": 3, "forward": fwd, "forward_backward": both,
            "max_value_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(v_p, v_c)),
            "max_grad_rel_diff": rel,
            "temp_bytes": {"plain_forward": xla_mem(plain_fwd, *args_list[0]),
                           "compact_forward": xla_mem(comp_fwd, *args_list[0])}}


# --------------------------------------------------------------------------------------------
# (b) trained DEQs of deq_vs_explicit
# --------------------------------------------------------------------------------------------


def run_model(dname: str, profile: str, st: dict[str, Any], seed: int) -> dict[str, Any]:
    from benchmarks import deq_vs_explicit as DVE
    from deq.nn._layer import _CellMap
    from deq.nn._stream import _StreamCell

    dst = DVE.dataset_settings(profile, dname)
    if dname in EPOCHS.get(profile, {}):
        dst["epochs"] = EPOCHS[profile][dname]
    ds = DVE.load_dataset(dname, dst)
    C.say(f"{dname}: training the DEQ ({dst['epochs']} epochs)")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", deq.NonConvergenceWarning)
        rec, model = DVE.run_one("deq", ds, dst, seed, probe_backward=False)
    train_s = time.perf_counter() - t0
    model.eval()
    layer = model.deq
    x = jnp.asarray(ds.x_test)
    y = np.asarray(ds.y_test)
    u = model._encode(x)
    N, B, repeats = len(x), dst["batch_size"], st["repeats"]
    B_eval = st["B"] if N >= 2 * st["B"] else B
    graphdef, state = nnx.split(layer.cell)
    cellmap, solver = _CellMap(graphdef), layer.active_solver()
    nb = -(-N // B_eval)
    pad = jnp.concatenate([u, u[: nb * B_eval - N]]) if nb * B_eval > N else u  # repeat samples to fill
    ub = pad.reshape((nb, B_eval) + u.shape[1:])
    plain_all = jax.jit(lambda state, ub: jax.lax.map(
        lambda b: deq.fixed_point(cellmap, layer.cell.init_state(b), (state, b), batch_axis=0, solver=solver), ub))

    C.say(f"{dname}: plain, {N} test samples in batches of {B_eval}")
    plain = best_time(lambda: plain_all(state, ub), repeats)
    sol = plain_all(state, ub)
    p_steps = np.asarray(sol.stats.num_steps).reshape(-1)[:N]
    p_z = sol.value.reshape((nb * B_eval,) + sol.value.shape[2:])[:N]
    p_conv = np.asarray(sol.stats.converged).reshape(-1)[:N]
    p_pred = np.asarray(model.head(p_z).argmax(-1))
    stats = step_stats(p_steps, B_eval)
    stats["converged_frac"] = float(p_conv.mean())
    res: dict[str, Any] = {
        "settings": {"N_test": N, "B": B_eval, "hidden": dst["hidden"], "epochs": dst["epochs"],
                     "solver": repr(layer.active_solver()), "train_time_s": train_s,
                     "test_accuracy": float((p_pred == y).mean())},
        "steps": stats, "plain": {**plain, "samples_per_s": N / plain["time_s"],
                                  "temp_bytes": xla_mem(plain_all, state, ub)}}
    stream = {}
    f = _StreamCell(graphdef)
    for S in [s for s in st["slots"] if s <= N]:
        C.say(f"{dname}: stream, {S} slots")
        # compiled as the plain solve is (deq.nn.stream adds the layer's eager checks, timed apart)
        run = jax.jit(lambda state, u, S=S: deq.fixed_point_stream(f, layer.cell.init_state(u), state, u,
                                                                  solver=solver, slots=S))
        r = best_time(lambda: run(state, u), repeats)
        r["nn_stream_time_s"] = best_time(lambda S=S: deq.nn.stream(layer, u, slots=S), repeats)["time_s"]
        sol = deq.nn.stream(layer, u, slots=S)
        pred = np.asarray(model.head(sol.value).argmax(-1))
        r.update(samples_per_s=N / r["time_s"],
                 identical_predictions=bool(np.array_equal(pred, p_pred)),
                 prediction_mismatches=int((pred != p_pred).sum()),
                 identical_steps=bool(np.array_equal(np.asarray(sol.stats.num_steps), p_steps)),
                 steps_mismatches=int((np.asarray(sol.stats.num_steps) != p_steps).sum()),
                 max_value_diff=float(jnp.max(jnp.abs(sol.value - p_z))),
                 temp_bytes=xla_mem(run, state, u))
        stream[f"stream_{S}"] = r
    res["stream"] = stream
    res["vs_plain"] = compare(plain["time_s"], N, stream, stats)
    # compaction on training batches of the training batch size, with the trained cell
    train_solver = layer.solver
    xt = jnp.asarray(ds.x_train)
    ub = [model._encode(xt[i * B:(i + 1) * B]) for i in range(st["compact_batches"])]
    args_list = [(jnp.zeros_like(b), state, b) for b in ub]
    plain_fwd = jax.jit(lambda z, p, x: deq.fixed_point(lambda z, a: f(z, *a), z, (p, x), batch_axis=0,
                                                        solver=train_solver, backward=layer.backward).value)
    comp_fwd = jax.jit(lambda z, p, x: deq.fixed_point_compact(f, z, p, x, solver=train_solver,
                                                               backward=layer.backward).value)
    plain_grad = jax.jit(jax.grad(lambda z, p, x: jnp.sum(plain_fwd(z, p, x) ** 2), argnums=(1, 2)))
    comp_grad = jax.jit(jax.grad(lambda z, p, x: jnp.sum(comp_fwd(z, p, x) ** 2), argnums=(1, 2)))
    C.say(f"{dname}: compaction, training batches of {B}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", deq.NonConvergenceWarning)
        fwd = _timed_pair(plain_fwd, comp_fwd, args_list, repeats)
        both = _timed_pair(plain_grad, comp_grad, args_list, repeats)
        steps_train = np.concatenate([np.asarray(deq.fixed_point(lambda z, a: f(z, *a), *a_[:1], (a_[1], a_[2]),
                                                                 batch_axis=0, solver=train_solver).stats.num_steps)
                                      for a_ in args_list])
        gp = [jax.tree_util.tree_leaves(plain_grad(*a)) for a in args_list]
        gc = [jax.tree_util.tree_leaves(comp_grad(*a)) for a in args_list]
    rel = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
              for p_, c_ in zip(gp, gc) for a, b in zip(p_, c_))
    res["compact"] = {"batches": len(args_list), "B": B, "buckets": 3, "forward": fwd, "forward_backward": both,
                      "train_batch_steps": step_stats(steps_train, B), "max_grad_rel_diff": rel}
    return res


# --------------------------------------------------------------------------------------------


def plot(results: dict[str, Any], out) -> None:
    plt = C.pyplot()
    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = results[name]
        labels = ["plain"] + [k.replace("stream_", "stream ").replace("_no_tail", " no tail") for k in r["stream"]]
        vals = [r["plain"]["samples_per_s"]] + [v["samples_per_s"] for v in r["stream"].values()]
        ax.bar(range(len(vals)), vals, color=["gray"] + ["C0"] * (len(vals) - 1))
        ideal = r["plain"]["samples_per_s"] * r["steps"]["ideal_speedup"]
        ax.axhline(ideal, color="C3", ls="--", lw=1, label=f"ideal ({r['steps']['ideal_speedup']:.1f}x)")
        ax.axhline(TARGET * ideal, color="C3", ls=":", lw=1, label=f"{TARGET} x ideal")
        ax.set_xticks(range(len(vals)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("samples / s")
        s = r["steps"]
        ax.set_title(f"{name}: steps mean {s['mean_steps']:.1f}, batch max {s['per_batch_max_steps_mean']:.0f}",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"plain batched solve vs streaming ({jax.default_backend()}, load {os.getloadavg()[0]:.1f})",
                 fontsize=10)
    C.save_figure(fig, out, NAME)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    C.smoke_notice(args.profile, NAME)
    st = settings(args.profile)
    MEMORY[0] = st["memory"]
    load_start = load()
    results = {"synthetic": run_synthetic(st, args.seed)}
    for dname in st["datasets"]:
        results[dname] = run_model(dname, args.profile, st, args.seed)
    rows, targets = [], []
    for name, r in results.items():
        for key, v in r["vs_plain"].items():
            rows.append({"problem": name, "method": key, "samples_per_s": r["stream"][key]["samples_per_s"],
                         "plain_samples_per_s": r["plain"]["samples_per_s"], "speedup": v["speedup"],
                         "ideal": r["steps"]["ideal_speedup"], "of_ideal": v["fraction_of_ideal"],
                         "identical": r["stream"][key].get("identical_predictions", r["stream"][key].get("identical_steps"))})
        best = max(r["vs_plain"].values(), key=lambda v: v["fraction_of_ideal"])
        targets.append({"problem": name, "best_fraction_of_ideal": best["fraction_of_ideal"],
                        "met": best["fraction_of_ideal"] >= TARGET})
        c = r["compact"]
        rows.append({"problem": name, "method": "compact (train batch)", "speedup": c["forward"]["speedup"],
                     "identical": None})
        if c["forward_backward"] is not None:
            rows.append({"problem": name, "method": "compact fwd+bwd", "speedup": c["forward_backward"]["speedup"]})
    C.print_table(rows, ["problem", "method", "samples_per_s", "plain_samples_per_s", "speedup", "ideal", "of_ideal",
                         "identical"], title="streaming and compaction vs the plain batched solve")
    for t in targets:
        print(f"{'PASS' if t['met'] else 'MISS'} {t['problem']}: streaming reaches "
              f"{t['best_fraction_of_ideal']:.2f} of the ideal speedup (target {TARGET})")
    payload = {"profile": args.profile, "seed": args.seed, "settings": st, "results": results, "targets": targets,
               "load_average_start": load_start, "load_average_end": load()}
    path = C.save_json(args.out, NAME, payload)
    print(f"wrote {path}")
    if not args.no_plot:
        plot(results, args.out)
    C.smoke_notice(args.profile, NAME, end=True)
    return payload


if __name__ == "__main__":
    main()
