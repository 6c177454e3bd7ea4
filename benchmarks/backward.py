"""Backward strategies compared: IFT, phantom gradients, JFB and unrolling on a DEQ classifier.

Run ``python -m benchmarks.backward --profile smoke|quick|full`` (``--out DIR``, ``--seed``,
``--no-plot``).

Model and data: ``deq.nn.models.DEQClassifier(64, hidden, 10)`` (``Linear`` encoder, DEQ layer
around a ``DenseCell(hidden)``, ``Linear`` head; the smoke profile, which only checks the
machinery, uses ``use_norm=False``, which compiles faster) on scikit-learn's digits, flattened to 64
features in ``[0, 1]`` (``deq.data.load_digits``, fixed 80/20 split with seed 0). Every strategy
uses the same forward solver (the classifier's default, ``Anderson(rtol=1e-3, atol=1e-5,
max_steps=30)``); only ``backward`` differs:

* ``IFT``: the classifier's default ``IFT(solver=Anderson(rtol=1e-3, atol=1e-6, max_steps=30))``;
* ``PhantomGrad``: ``PhantomGrad(steps=5, damping=0.5)``;
* ``JFB``: ``JFB()`` (one differentiated cell step at ``z*``);
* ``Unrolled``: ``Unrolled()``: backprop through the 30 (masked) Anderson steps;
* ``IFT-nowarn`` (quick/full only): the same IFT with ``warn=False``: no host callback
  (``jax.pure_callback`` behind a ``lax.cond``) checking the adjoint's convergence at every
  backward pass, to show what that check costs per step;
* ``Unrolled-FPI`` (quick/full only): ``Unrolled()`` with the forward solver replaced by
  ``FixedPointIteration`` with the same tolerances and ``max_steps=30``: classic unrolled
  backprop through plain iterations, to separate "unrolling" from "differentiating Anderson".

Three measurements:

(a) **Gradient quality.** Cosine similarity between each strategy's gradient (float32, as in
    training) and the *exact* gradient of the same loss with respect to all parameters
    (encoder, cell, head), on fixed training batches. The exact gradient is computed in float64
    (inside ``jax.enable_x64``; parameters and data cast to float64) with a tight forward solve
    ``Anderson(rtol=1e-11, atol=1e-12, max_steps=500)`` and a tight IFT adjoint
    ``IFT(Anderson(rtol=1e-11, atol=1e-12, max_steps=500))``; its forward residuals and adjoint
    convergence warnings are recorded. In quick/full it is cross-checked against plain
    backprop through 300 float64 fixed-point iterations (``reference_check``). Cosines are
    reported at initialisation (``init``), after training each strategy with itself
    (``trained``, seed ``--seed``) and at the IFT-trained parameters (``trained_ift_params``),
    with the ratio of gradient norms ``||g|| / ||g_exact||``.
(b) **Cost of a training step** (forward + backward + Adam update, ``jax.jit``, on one batch):
    ``_common.time_fn``; the first call (compile + one run) is reported apart as
    ``compile_s``; then ``rounds`` rounds, each timing every strategy in turn
    (``time_fn``: warm-up calls, then ``per_round`` timed calls), so that changes of machine
    load hit every strategy alike; median, IQR and minimum of all timed calls. Memory:
    ``_common.xla_memory`` (``temp_size_in_bytes`` of the compiled step).
(c) **Accuracy.** The same training budget for every strategy: same number of Adam steps, same
    learning rate, same initial parameters and the same batch order for a given seed; test
    accuracy at the end, with the default Anderson forward solve for every strategy (the fixed
    point does not depend on the solver). 1 seed in smoke/quick, 3 in full
    (``--seed``, ``--seed + 1``, ``--seed + 2``); mean, standard deviation and every seed are
    reported.
"""

from __future__ import annotations

from benchmarks import _common as C

NAME = "backward"


def parse_args(argv=None):
    """The command line; it needs no JAX, so ``--help`` answers before the imports below."""
    return C.make_parser(__doc__.splitlines()[0], name=NAME).parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and bad arguments answer here, before JAX is imported; main() reparses

import os
import resource
import time
import warnings
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import deq
import deq.nn
from deq.data import iterate_batches, load_digits
from deq.nn.models import DEQClassifier, default_backward, default_solver
STRATEGIES = ("IFT", "PhantomGrad", "JFB", "Unrolled")
#: Extra variants (quick/full): IFT without its non-convergence check (no host callback), and
#: unrolled backprop through plain fixed-point iteration.
EXTRA = ("IFT-nowarn", "Unrolled-FPI")


def fpi_solver() -> deq.FixedPointIteration:
    """Forward solver of ``Unrolled-FPI``: the default solver's tolerances, plain iteration."""
    base = default_solver()
    return deq.FixedPointIteration(rtol=base.rtol, atol=base.atol, max_steps=base.max_steps)


def make_backward(name: str):
    """The backward strategy called ``name`` (see the module docstring)."""
    return {
        "IFT": default_backward,
        "IFT-nowarn": lambda: deq.IFT(solver=default_backward().solver, warn=False),
        "PhantomGrad": lambda: deq.PhantomGrad(steps=5, damping=0.5),
        "JFB": deq.JFB,
        "Unrolled": deq.Unrolled,
        "Unrolled-FPI": deq.Unrolled,
    }[name]()


def make_solver(name: str):
    """The forward solver used in training with strategy ``name``."""
    return fpi_solver() if name == "Unrolled-FPI" else default_solver()


def make_model(arch: dict, seed: int, *, solver=None, backward=None) -> DEQClassifier:
    """The benchmark's classifier ``DEQClassifier(64, arch["hidden"], 10,
    use_norm=arch["use_norm"])``; its parameters depend only on ``arch`` and ``seed``."""
    return DEQClassifier(64, arch["hidden"], 10, rngs=nnx.Rngs(seed), use_norm=arch["use_norm"],
                         solver=solver or default_solver(), backward=backward or default_backward())


def strategy_model(name: str, arch: dict, seed: int) -> DEQClassifier:
    return make_model(arch, seed, solver=make_solver(name), backward=make_backward(name))


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    self_, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + kids.ru_utime + kids.ru_stime


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def flat(tree) -> np.ndarray:
    """All leaves of a gradient pytree as one float64 vector (fixed leaf order)."""
    return np.concatenate([np.asarray(l, np.float64).ravel() for l in jax.tree_util.tree_leaves(tree)])


def compare(g: np.ndarray, g_ref: np.ndarray) -> dict[str, float]:
    """Cosine similarity, norm ratio and relative error of ``g`` against ``g_ref``."""
    ng, nr = np.linalg.norm(g), np.linalg.norm(g_ref)
    return {
        "cosine": float(g @ g_ref / (ng * nr)),
        "norm_ratio": float(ng / nr),
        "rel_error": float(np.linalg.norm(g - g_ref) / nr),
    }


def make_train_step(graphdef, rest, tx):
    """Jitted ``(params, opt_state, x, y) -> (params, opt_state, loss, info, grads)``."""

    def loss_fn(params, x, y):
        model = nnx.merge(graphdef, params, rest)
        logits, info = model(x)
        return cross_entropy(logits, y), info

    @jax.jit
    def step(params, opt_state, x, y):
        (loss, info), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, info, grads

    return step


def make_eval(graphdef, rest):
    """Jitted ``(params, x, y) -> accuracy`` (forward solve only)."""

    @jax.jit
    def accuracy(params, x, y):
        logits, _ = nnx.merge(graphdef, params, rest)(x)
        return jnp.mean(jnp.argmax(logits, axis=-1) == y)

    return accuracy


def exact_gradient_fn(arch: dict, *, reference: bool = False):
    """Float64 gradient function ``(params64, x64, y) -> (grads, forward stats)``.

    Must be built and called inside ``jax.enable_x64(True)``. ``reference=True`` gives the
    cross-check: ordinary backprop through 300 fixed-point iterations instead of the IFT.
    """
    if reference:
        solver = deq.FixedPointIteration(rtol=0.0, atol=1e-14, max_steps=300)
        backward = deq.Unrolled()
    else:
        solver = deq.Anderson(rtol=1e-11, atol=1e-12, max_steps=500)
        backward = deq.IFT(solver=deq.Anderson(rtol=1e-11, atol=1e-12, max_steps=500))
    graphdef, _, rest = nnx.split(make_model(arch, 0, solver=solver, backward=backward), nnx.Param, ...)

    def loss_fn(params, x, y):
        model = nnx.merge(graphdef, params, rest)
        logits, info = model(x)
        return cross_entropy(logits, y), info

    return jax.jit(jax.grad(loss_fn, has_aux=True))


def _to64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


def exact_gradients(arch: dict, param_sets: dict[str, Any], batches, *, reference: bool):
    """Exact float64 gradients for every parameter set and batch (in an x64 scope)."""
    out: dict[str, list[np.ndarray]] = {}
    stats: dict[str, Any] = {"adjoint_nonconvergence_warnings": 0, "forward_residual_max": 0.0,
                             "forward_converged_frac_min": 1.0, "forward_steps_max": 0.0}
    with jax.enable_x64(True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", deq.NonConvergenceWarning)
        grad_fn = exact_gradient_fn(arch, reference=reference)
        for key, params in param_sets.items():
            p64 = _to64(params)
            out[key] = []
            for xb, yb in batches:
                g, info = grad_fn(p64, jnp.asarray(xb, jnp.float64), jnp.asarray(yb))
                g = jax.block_until_ready(g)
                assert all(l.dtype == jnp.float64 for l in jax.tree_util.tree_leaves(g))
                out[key].append(flat(g))
                stats["forward_residual_max"] = max(stats["forward_residual_max"], float(info["residual"]))
                stats["forward_converged_frac_min"] = min(stats["forward_converged_frac_min"],
                                                          float(info["converged_frac"]))
                stats["forward_steps_max"] = max(stats["forward_steps_max"], float(info["forward_steps"]))
        jax.effects_barrier()
    stats["adjoint_nonconvergence_warnings"] = sum(
        issubclass(w.category, deq.NonConvergenceWarning) for w in caught)
    return out, stats


def run(profile: str, seed: int, out, no_plot: bool) -> dict[str, Any]:
    t_start, cpu_start, load_start = time.perf_counter(), cpu_seconds(), os.getloadavg()
    names = STRATEGIES + (EXTRA if profile != "smoke" else ())
    hidden = C.pick(profile, smoke=8, quick=64, full=64)
    # smoke checks the machinery: the cell without norms compiles markedly faster.
    arch = {"hidden": hidden, "use_norm": profile != "smoke"}
    batch = C.pick(profile, smoke=16, quick=64, full=64)
    steps = C.pick(profile, smoke=5, quick=300, full=1000)
    rounds = C.pick(profile, smoke=1, quick=5, full=10)
    per_round = C.pick(profile, smoke=3, quick=5, full=5)
    n_cos = C.pick(profile, smoke=1, quick=2, full=4)
    seeds = [seed + i for i in range(C.pick(profile, smoke=1, quick=1, full=3))]
    do_reference = profile != "smoke"
    lr = 2e-3

    data = load_digits(test_fraction=0.2, seed=0)
    x_train = data.x_train.reshape(len(data.x_train), -1)
    x_test = data.x_test.reshape(len(data.x_test), -1)
    y_train, y_test = data.y_train, data.y_test
    # Fixed cosine batches: the first n_cos batches of the training set, in order.
    cos_batches = [(x_train[i * batch:(i + 1) * batch], y_train[i * batch:(i + 1) * batch]) for i in range(n_cos)]
    tx = optax.adam(lr)

    graphdefs, params0, rest0 = {}, {}, None
    for s in names:
        graphdefs[s], params0[s], rest0 = nnx.split(strategy_model(s, arch, seed), nnx.Param, ...)
    p0 = params0["IFT"]
    for s in names:  # same architecture and seed: identical initial parameters
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(params0[s])))
    n_params = int(sum(np.size(l) for l in jax.tree_util.tree_leaves(p0)))
    steps_fn = {s: make_train_step(graphdefs[s], rest0, tx) for s in names}
    accuracy_fn = make_eval(graphdefs["IFT"], rest0)

    results: dict[str, dict[str, Any]] = {
        s: {"description": f"backward={make_backward(s)!r}, solver={make_solver(s)!r}"} for s in names}

    # (b) cost of one training step (first call = compile).
    xb0, yb0 = jnp.asarray(cos_batches[0][0]), jnp.asarray(cos_batches[0][1])
    opt0 = tx.init(p0)
    for s in C.progress(names, desc="compile"):
        first = C.time_fn(steps_fn[s], p0, opt0, xb0, yb0, warmup=0, repeats=1, clear_caches=False)
        mem = C.xla_memory(steps_fn[s], p0, opt0, xb0, yb0)
        results[s]["compile_s"] = first["compile_s"]
        results[s]["memory"] = {
            "xla_temp_bytes": None if mem is None else mem.get("temp_size_in_bytes"),
            "xla": mem,
        }
    # Timed calls interleaved over strategies in `rounds` rounds, so that a change of machine
    # load during the benchmark affects every strategy alike; each round is a time_fn call
    # (its first, untimed-for-us call and `warmup` more are warm-up; then `per_round` timed).
    times: dict[str, list[float]] = {s: [] for s in names}
    for _ in C.progress(range(rounds), desc="timing", label=lambda r: f"round {r + 1} of every strategy"):
        for s in names:
            t = C.time_fn(steps_fn[s], p0, opt0, xb0, yb0, warmup=1, repeats=per_round, clear_caches=False)
            times[s].extend(t["times_s"])
    for s in names:
        ts = np.array(times[s])
        q25, q75 = np.percentile(ts, [25, 75])
        results[s]["timing"] = {
            "compile_s": results[s]["compile_s"], "median_s": float(np.median(ts)), "iqr_s": float(q75 - q25),
            "q25_s": float(q25), "q75_s": float(q75),
            "min_s": float(ts.min()), "max_s": float(ts.max()), "mean_s": float(ts.mean()),
            "repeats": int(ts.size), "rounds": rounds, "per_round": per_round, "warmup_per_round": 2,
            "times_s": ts.tolist(),
        }
        results[s]["time_per_step_s"] = float(np.median(ts))

    def strategy_grads(s, params):
        return [flat(steps_fn[s](params, opt0, jnp.asarray(xb), jnp.asarray(yb))[4]) for xb, yb in cos_batches]

    # (c) training: same budget, init and batch order for every strategy.
    trained: dict[str, dict[int, Any]] = {s: {} for s in names}
    for s in names:
        accs, losses = [], []
        for sd in seeds:
            _, params, _ = nnx.split(strategy_model(s, arch, sd), nnx.Param, ...)
            opt = tx.init(params)
            it = iterate_batches(x_train, y_train, batch, seed=sd, epochs=steps // (len(x_train) // batch) + 1)
            hist = []
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", deq.NonConvergenceWarning)
                for k, (xb, yb) in zip(range(steps), it):
                    params, opt, loss, info, _ = steps_fn[s](params, opt, jnp.asarray(xb), jnp.asarray(yb))
                    hist.append((loss, info["forward_steps"], info["converged_frac"]))
                jax.block_until_ready(params)
                jax.effects_barrier()
            train_s = time.perf_counter() - t0
            C.say(f"training: {s} seed {sd} done in {train_s:.1f} s ({steps} Adam steps)")
            n_warn = sum(issubclass(w.category, deq.NonConvergenceWarning) for w in caught)
            hist = np.array(jax.device_get(hist), dtype=np.float64)
            tail = hist[-min(20, len(hist)):]
            accs.append(float(accuracy_fn(params, jnp.asarray(x_test), jnp.asarray(y_test))))
            losses.append({"seed": sd, "final_train_loss_last20": float(tail[:, 0].mean()),
                           "forward_steps_last20": float(tail[:, 1].mean()),
                           "converged_frac_last20": float(tail[:, 2].mean()),
                           "nonfinite_loss_steps": int((~np.isfinite(hist[:, 0])).sum()),
                           "train_wall_s": train_s,
                           "adjoint_nonconvergence_warnings": n_warn,
                           "loss_curve": hist[:, 0].tolist()})
            trained[s][sd] = params
        results[s]["accuracy"] = float(np.mean(accs))
        results[s]["accuracy_std"] = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        results[s]["accuracies"] = accs
        results[s]["training"] = losses

    # (a) gradient quality against the float64 exact gradient.
    points = {"init": p0, "trained_ift_params": trained["IFT"][seed]}
    points.update({f"trained:{s}": trained[s][seed] for s in names})
    C.say("gradient quality: float64 exact gradients ...")
    exact, exact_stats = exact_gradients(arch, points, cos_batches, reference=False)
    reference_check = None
    if do_reference:
        ref, ref_stats = exact_gradients(arch, {"init": p0, "trained_ift_params": trained["IFT"][seed]},
                                         cos_batches, reference=True)
        C.say("gradient quality: exact gradients checked against float64 backprop")
        reference_check = {
            "what": "exact (float64 IFT, tight Anderson) vs float64 backprop through 300 fixed-point iterations",
            "stats": ref_stats,
            **{k: [compare(e, r) for e, r in zip(exact[k], ref[k])] for k in ref},
        }
    for s in names:
        cos = {}
        for label, key in (("init", "init"), ("trained", f"trained:{s}"), ("trained_ift_params", "trained_ift_params")):
            grads = strategy_grads(s, points[key])
            per_batch = [compare(g, e) for g, e in zip(grads, exact[key])]
            cos[f"{label}_nonfinite_entries"] = int(sum((~np.isfinite(g)).sum() for g in grads))
            cos[label] = float(np.mean([c["cosine"] for c in per_batch]))
            cos[f"{label}_norm_ratio"] = float(np.mean([c["norm_ratio"] for c in per_batch]))
            cos[f"{label}_per_batch"] = per_batch
        results[s]["cosine"] = cos

    wall = time.perf_counter() - t_start
    cpu = cpu_seconds() - cpu_start
    payload = {
        "benchmark": NAME,
        "profile": profile,
        "command": f"python -m benchmarks.backward --profile {profile}",
        "settings": {
            "model": f"deq.nn.models.DEQClassifier(64, {hidden}, 10, use_norm={arch['use_norm']}) (DenseCell)",
            "num_params": n_params,
            "forward_solver": repr(default_solver()),
            "strategies": {s: results[s]["description"] for s in names},
            "data": "sklearn digits via deq.data.load_digits(test_fraction=0.2, seed=0), flattened to 64",
            "n_train": len(x_train), "n_test": len(x_test),
            "batch_size": batch, "train_steps": steps, "optimizer": f"optax.adam({lr})",
            "seeds": seeds, "timing_rounds": rounds, "timing_per_round": per_round,
            "cosine_batches": n_cos,
            "exact_gradient": "float64 (jax.enable_x64), Anderson(rtol=1e-11, atol=1e-12, max_steps=500) "
                              "forward, IFT(Anderson(rtol=1e-11, atol=1e-12, max_steps=500)) adjoint",
            "dtype_strategies": "float32",
        },
        "strategies": results,
        "exact_gradient_stats": exact_stats,
        "reference_check": reference_check,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "load_average_1min": {"start": load_start[0], "end": os.getloadavg()[0]},
    }
    path = C.save_json(out, NAME, payload)

    rows = []
    for s in names:
        r = results[s]
        rows.append({
            "strategy": s,
            "cos_init": r["cosine"]["init"],
            "cos_trained": r["cosine"]["trained"],
            "cos_ift_params": r["cosine"]["trained_ift_params"],
            "norm_ratio": r["cosine"]["trained_norm_ratio"],
            "ms": 1e3 * r["time_per_step_s"],
            "ms_min": 1e3 * r["timing"]["min_s"],
            "compile": r["compile_s"],
            "temp_kib": None if r["memory"]["xla_temp_bytes"] is None else r["memory"]["xla_temp_bytes"] / 1024,
            "acc": r["accuracy"],
            "acc_std": r["accuracy_std"],
            "fsteps": float(np.mean([t["forward_steps_last20"] for t in r["training"]])),
        })
    C.print_table(rows, [
        ("strategy", "strategy"), ("cos_init", "cos@init"), ("cos_trained", "cos@trained"),
        ("cos_ift_params", "cos@IFT-trained"), ("norm_ratio", "|g|/|g*| trained"),
        ("ms", "time/step [ms]"), ("ms_min", "min [ms]"), ("compile", "compile [s]"), ("temp_kib", "XLA temp [KiB]"),
        ("acc", "test acc"), ("acc_std", "acc std"), ("fsteps", "fwd steps"),
    ], title=f"Backward strategies ({profile}: hidden {hidden}, batch {batch}, {steps} Adam steps, "
             f"{len(seeds)} seed(s), {n_params} params)")
    print(f"exact gradient: forward residual max {exact_stats['forward_residual_max']:.2e}, "
          f"adjoint non-convergence warnings {exact_stats['adjoint_nonconvergence_warnings']}")
    if reference_check:
        print("reference check (exact IFT vs 300-step float64 backprop), cosine:",
              {k: [round(c["cosine"], 12) for c in v] for k, v in reference_check.items()
               if k in ("init", "trained_ift_params")})
    print(f"wrote {path}  ({wall:.1f} s wall, {cpu:.1f} s CPU, load average {os.getloadavg()[0]:.1f})")

    if not no_plot:
        plot(payload, out)
    return payload


def _num(x) -> float:
    """A JSON number, or NaN for null (non-finite values are stored as null)."""
    return float("nan") if x is None else float(x)


def plot(payload: dict[str, Any], out) -> Any:
    """Bar charts (cosine, time per step, step memory, accuracy) from a result payload; save the PNG.

    Also usable on a saved result: ``plot(json.load(open("backward.json")), out_dir)``.
    """
    results, st = payload["strategies"], payload["settings"]
    names = list(results)
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.4))
    xs = np.arange(len(names))
    w = 0.27
    keys = (("at init", "init"), ("after training (own)", "trained"), ("at IFT-trained params", "trained_ift_params"))
    for i, (label, key) in enumerate(keys):
        axes[0].bar(xs + (i - 1) * w, [_num(results[s]["cosine"][key]) for s in names], w, label=label)
    lo = np.nanmin([[_num(results[s]["cosine"][k]) for _, k in keys] for s in names])
    lo = max(0.0, lo - 0.05) if np.isfinite(lo) else 0.0
    axes[0].set_ylim(lo, 1.0 + 0.25 * (1.0 - lo))
    axes[0].axhline(1.0, color="k", lw=0.6)
    axes[0].set_ylabel("cosine similarity with exact gradient")
    axes[0].set_title("(a) gradient direction (float64 exact)")
    axes[0].legend(fontsize=6.5, loc="upper center", ncol=3, handlelength=1.0, columnspacing=0.8)
    tm = [results[s]["timing"] for s in names]
    ms = [1e3 * t["median_s"] for t in tm]
    quart = [[1e3 * (t["median_s"] - t["q25_s"]) for t in tm], [1e3 * (t["q75_s"] - t["median_s"]) for t in tm]]
    axes[1].bar(xs, ms, yerr=quart, capsize=3, color="tab:orange", label="median (whiskers: 25-75%)")
    axes[1].plot(xs, [1e3 * t["min_s"] for t in tm], "kv", ms=5, label="minimum")
    axes[1].legend(fontsize=7)
    axes[1].set_ylabel("time per training step [ms]")
    axes[1].set_title("(b1) step time (compile excluded)")
    temp = [(results[s]["memory"]["xla_temp_bytes"] or 0) / 1024 for s in names]
    axes[2].bar(xs, temp, color="tab:purple")
    axes[2].set_ylabel("XLA temp memory of the step [KiB]")
    axes[2].set_title("(b2) step memory")
    acc = [100 * results[s]["accuracy"] for s in names]
    err = [100 * results[s]["accuracy_std"] for s in names]
    axes[3].bar(xs, acc, yerr=err, capsize=3, color="tab:green")
    for i, s in enumerate(names):
        axes[3].plot([i] * len(results[s]["accuracies"]), [100 * a for a in results[s]["accuracies"]], "k.", ms=5)
    axes[3].set_ylim(max(0.0, min(acc) - 10), 100)
    axes[3].set_ylabel("test accuracy [%]")
    axes[3].set_title(f"(c) after {st['train_steps']} Adam steps, {len(st['seeds'])} seed(s)")
    for ax in axes:
        ax.set_xticks(xs, names, fontsize=8, rotation=25, ha="right")
        ax.set_xlabel("backward strategy")
        ax.grid(True, axis="y", alpha=0.3)
    backend = payload.get("environment", {}).get("jax_backend") or C.environment()["jax_backend"]
    fig.suptitle(f"{st['model']} on digits, float32, batch {st['batch_size']}, {backend}", fontsize=10)
    fig.tight_layout()
    return C.save_figure(fig, out, NAME)


def main(argv=None) -> None:
    args = parse_args(argv)
    C.smoke_notice(args.profile, NAME)
    run(args.profile, args.seed, args.out, args.no_plot)
    C.smoke_notice(args.profile, NAME, end=True)


if __name__ == "__main__":
    main()
