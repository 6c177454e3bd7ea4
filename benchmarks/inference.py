"""Inference trade-off: test accuracy vs the number of forward solver steps allowed at evaluation.

Run ``python -m benchmarks.inference --profile smoke|quick|full`` (``--out DIR``, ``--seed``,
``--no-plot``).

Each model of ``benchmarks.deq_vs_explicit`` is trained once (same settings, one seed):
the dense DEQ, the DEQ with Jacobian regularization, the tied unrolled twin (depth ``K``) and
the parameter-matched untied ResNet (depth ``K``) (the smoke profile trains only the DEQ and
the tied twin, and sweeps two Anderson budgets). Then the trained DEQs are evaluated on the
whole test split with the per-call solver override of ``deq.nn.DEQ`` and its runtime step
budget (``model.deq(u, solver=..., max_steps=budget)``, a traced integer, so each solver kind
compiles once for the whole sweep; ``sweep_compile_s`` in the JSON is the compile time of the
sweep) for every budget in a sweep (1..50):

* ``anderson``: ``deq.Anderson(rtol=1e-3, atol=1e-5)`` with ``max_steps=budget`` -- the training
  solver's tolerances, so a solve stops early once converged (``mean_steps`` is what it used);
* ``fixed_point_iteration``: ``deq.FixedPointIteration`` with the same tolerances: plain
  iteration ``z_{k+1} = f(z_k, u)`` from ``z_0 = 0`` (budget ``k`` is the DEQ's own cell applied
  ``k`` times, unless it stops early).

The full profile also trains the DEQ with the provably contractive cell (``deq_contractive``,
Lipschitz bound ``L`` < 1). For it every budget also reports what is *guaranteed*
(`eval_certified`): ``deq.certify``'s bound on the distance to the exact fixed point,
``||z - z*|| <= ||f(z) - z|| / (1 - L)`` (median over samples, absolute and relative to
``||z||``), and the fraction of test predictions certified to equal the exact equilibrium's (the
logit margin exceeds the most the bound lets it move through the linear head); and the same
guarantees after solves to relative tolerances ``CERTIFY_RTOLS`` (1e-3 to 1e-6, ``atol=0``):
``certified_by_tolerance``, printed as a second table.

An explicit network has one fixed depth: the twins are shown as a horizontal line and a point at
``K``. For reference the tied unrolled twin (trained at depth ``K``) is also run for ``k`` steps
(``unrolled_any_depth``), which it was not trained for.

Recorded per budget: test accuracy and loss, mean solver steps actually used, converged
fraction, and the evaluation wall time of the whole test split (median of repeats after a
compiling call and one warm-up, the fastest of the repeats, since on a shared machine other
processes only ever add time; the median wall and CPU times are kept too). Each budget is a
separate compilation (the solver configuration is static).
"""

from __future__ import annotations

from benchmarks import _common as C

NAME = "inference"


def parse_args(argv=None):
    """The command line; it needs no JAX, so ``--help`` answers before the imports below."""
    return C.make_parser(__doc__.splitlines()[0], name=NAME).parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and bad arguments answer here, before JAX is imported; main() reparses

import os
import time
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp
from flax import nnx

import deq
from benchmarks import deq_vs_explicit as DVE
from deq.nn.models import count_params
from deq.train import cross_entropy

#: Training tolerances of the models' default solver, kept in the sweep.
RTOL, ATOL = 1e-3, 1e-5
SOLVERS = {"anderson": deq.Anderson, "fixed_point_iteration": deq.FixedPointIteration}
SOLVER_LABELS = {"anderson": "Anderson", "fixed_point_iteration": "fixed-point iteration"}
#: Relative tolerances of the certification sweep of the contractive DEQ (``atol=0``,
#: ``max_steps=CERTIFY_MAX_STEPS``): how tight a solve must be for its guarantees to settle
#: every prediction.
CERTIFY_RTOLS = (1e-3, 1e-4, 1e-5, 1e-6)
CERTIFY_MAX_STEPS = 500


def _deq_metrics(model, x, y, solver, budget=None):
    """``(metrics, u, sol, logits)`` of a DEQ classifier solved with ``solver`` under the runtime
    step budget ``budget`` (``deq.nn.DEQ``'s ``max_steps=``; not jitted)."""
    u = model._encode(x)
    sol = model.deq(u, return_solution=True, solver=solver, max_steps=budget)
    logits = model.head(sol.value)
    losses, correct = cross_entropy(logits, y)
    metrics = {
        "accuracy": jnp.mean(correct), "loss": jnp.mean(losses),
        "mean_steps": jnp.mean(sol.stats.num_steps.astype(jnp.float32)),
        "converged_frac": jnp.mean(sol.stats.converged.astype(jnp.float32)),
    }
    return metrics, u, sol, logits


@nnx.jit(static_argnames=("solver",))
def eval_deq(model, x, y, solver, budget=None):
    """Test metrics of a DEQ classifier solved with ``solver`` (per-call override) for at most
    ``budget`` steps (traced: one compilation serves every budget up to ``solver.max_steps``)."""
    return _deq_metrics(model, x, y, solver, budget)[0]


@nnx.jit(static_argnames=("solver",))
def eval_certified(model, x, y, solver, budget=None):
    """`eval_deq` plus guarantees, for a DEQ whose cell has a proven Lipschitz bound ``L < 1``.

    ``deq.certify`` bounds each sample's distance to its exact fixed point,
    ``||z - z*|| <= ||f(z) - z|| / (1 - L)``. The head is linear (``logits = z V + c``), so the
    predicted class ``t`` is certified to be the exact equilibrium's when, for every other class
    ``j``, the logit margin ``l_t - l_j`` exceeds ``bound * ||V[:, t] - V[:, j]||`` (the most the
    margin can move within the bound; ``deq.certified_argmax``). Returns, besides `eval_deq`'s metrics,
    ``certified_bound_median`` and ``certified_relative_bound_median`` (the bound over ``||z||``,
    medians over samples) and ``certified_prediction_frac``.
    """
    metrics, u, sol, logits = _deq_metrics(model, x, y, solver, budget)
    cell, z = model.deq.cell, sol.value
    graphdef, state = nnx.split(cell)
    cert = deq.certify(lambda z_, u_: nnx.merge(graphdef, state)(z_, u_), z, u,
                       lipschitz=cell.lipschitz_bound(), batch_axis=0)
    certified = deq.certified_argmax(logits, model.head.kernel[...], cert.error_bound)
    return {
        **metrics,
        "certified_bound_median": jnp.median(cert.error_bound),
        "certified_relative_bound_median": jnp.median(cert.error_bound / jnp.linalg.norm(z, axis=-1)),
        "certified_prediction_frac": jnp.mean(certified.astype(jnp.float32)),
    }


@nnx.jit
def eval_explicit(model, x, y):
    """Test metrics of an explicit network (its own fixed depth)."""
    logits, _ = model(x)
    losses, correct = cross_entropy(logits, y)
    return {"accuracy": jnp.mean(correct), "loss": jnp.mean(losses)}


@nnx.jit
def eval_tied(model, x, y, depth):
    """The tied unrolled twin's cell applied ``depth`` times (traced: one compilation)."""
    u = model._encode(x)
    graphdef, state = nnx.split(model.cell)
    z = jax.lax.fori_loop(0, depth, lambda i, z: nnx.merge(graphdef, state)(z, u), model.cell.init_state(u))
    losses, correct = cross_entropy(model.head(z), y)
    return {"accuracy": jnp.mean(correct), "loss": jnp.mean(losses)}


def _timed(fn, *args, repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of ``fn(*args)`` and its evaluation time.

    ``eval_time_s`` is the fastest of ``repeats`` timed calls (after a compiling call and one
    warm-up; other processes on a shared machine only ever add time, so the minimum is the
    least disturbed figure); the median and the median process CPU time are kept too.
    """
    t = C.time_fn(fn, *args, warmup=1, repeats=repeats, clear_caches=False)
    cpu = []
    for _ in range(repeats):
        c0 = time.process_time()
        jax.block_until_ready(fn(*args))
        cpu.append(time.process_time() - c0)
    out = {k: float(v) for k, v in jax.device_get(fn(*args)).items()}
    return out, {"eval_time_s": t["min_s"], "eval_time_median_s": t["median_s"],
                 "eval_cpu_median_s": float(np.median(cpu)), "compile_s": t["compile_s"]}


def sweep_dataset(dname: str, profile: str, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the models on one dataset, then sweep the evaluation budget."""
    st = DVE.dataset_settings(profile, dname)
    if profile == "quick":
        st["epochs"] = 10  # keeps the quick profile under 3 minutes on 2 cores with its 27 compilations
    ds = DVE.load_dataset(dname, st)
    budgets = C.pick(profile, smoke=[1, 5],
                     quick=[1, 2, 3, 4, 6, 8, 12, 20, 50],
                     full=[1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50])
    repeats = C.pick(profile, smoke=1, quick=5, full=7)
    plan = C.pick(profile, smoke={"deq": ["anderson"]},
                  quick={"deq": ["anderson", "fixed_point_iteration"], "deq_jr": ["anderson"]},
                  full={"deq": ["anderson", "fixed_point_iteration"],
                        "deq_jr": ["anderson", "fixed_point_iteration"],
                        "deq_contractive": ["anderson", "fixed_point_iteration"]})
    # The smoke profile (CI) trains only the DEQ and its tied twin: every compilation costs seconds.
    kinds = list(plan) + C.pick(profile, smoke=["unrolled"], quick=["unrolled", "resnet"],
                                full=["unrolled", "resnet"])
    x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)

    models, trained = {}, {}
    for kind in C.progress(kinds, desc=f"{dname}: training", label=lambda k: f"{DVE.LABELS[k]} seed {seed}"):
        rec, model = DVE.run_one(kind, ds, st, seed, probe_backward=False)
        models[kind] = model
        trained[kind] = {
            "label": DVE.LABELS[kind], "params": count_params(model),
            "depth": None if kind in DVE.DEQ_MODELS else st["depth"],
            "test_accuracy_after_training": rec["final_accuracy"],
            "forward_steps_after_training": rec["forward_steps_final"],
            "step_time_median_s": rec["step_time_median_s"],
        }

    sweep: dict[str, Any] = {}
    jobs = [(kind, s, b) for kind, solvers in plan.items() for s in solvers for b in budgets]
    for kind, sname, b in C.progress(jobs, desc=f"{dname}: budgets",
                                     label=lambda j: f"{DVE.LABELS[j[0]]}, {SOLVER_LABELS[j[1]]}, max_steps {j[2]}"):
        # One solver per model and solver kind, capped at the largest budget; each budget is a
        # runtime `max_steps` (a traced integer), so the sweep compiles once per solver kind.
        solver = SOLVERS[sname](rtol=RTOL, atol=ATOL, max_steps=max(budgets))
        budget = jnp.int32(b)
        metrics, timing = _timed(eval_deq, models[kind], x, y, solver, budget, repeats=repeats)
        if kind in DVE.CONTRACTIVE_MODELS:  # the guarantees, computed apart so timings stay comparable
            certified = jax.device_get(eval_certified(models[kind], x, y, solver, budget))
            metrics.update({k: float(v) for k, v in certified.items() if k.startswith("certified_")})
        sweep.setdefault(kind, {}).setdefault(sname, []).append({"max_steps": b, **metrics, **timing})

    certified: dict[str, Any] = {}
    for kind in [k for k in plan if k in DVE.CONTRACTIVE_MODELS]:
        for sname in plan[kind]:
            for rtol in CERTIFY_RTOLS:
                solver = SOLVERS[sname](rtol=rtol, atol=0.0, max_steps=CERTIFY_MAX_STEPS)
                out = jax.device_get(eval_certified(models[kind], x, y, solver))
                certified.setdefault(kind, {}).setdefault(sname, []).append(
                    {"rtol": rtol, **{k: float(v) for k, v in out.items()}})

    explicit = {}
    for kind in [k for k in kinds if k not in DVE.DEQ_MODELS]:
        metrics, timing = _timed(eval_explicit, models[kind], x, y, repeats=repeats)
        explicit[kind] = {"label": DVE.LABELS[kind], "depth": st["depth"], "params": trained[kind]["params"],
                          **metrics, **timing}
    tied = []
    for b in budgets:
        metrics, timing = _timed(eval_tied, models["unrolled"], x, y, b, repeats=repeats)
        tied.append({"depth": b, **metrics, **timing})

    sweep_compile = {kind: {sname: float(sum(p["compile_s"] for p in pts)) for sname, pts in by.items()}
                     for kind, by in sweep.items()}
    summary = summarize(sweep, explicit)
    settings = {**st, "num_train": len(ds.x_train), "num_test": len(ds.x_test), "budgets": budgets,
                "repeats": repeats, "solvers_per_model": plan}
    return {"models": trained, "sweep": sweep, "explicit": explicit, "unrolled_any_depth": tied,
            "certified_by_tolerance": certified, "summary": summary,
            "sweep_compile_s": sweep_compile}, settings


def _first_budget(points: list[dict[str, Any]], level: float) -> int | None:
    for p in points:
        if p["accuracy"] >= level:
            return p["max_steps"]
    return None


def summarize(sweep: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """Smallest budgets reaching (within 1 point) the DEQ's best and the explicit twins' accuracy."""
    out = {}
    for kind, per in sweep.items():
        for sname, points in per.items():
            best = max(p["accuracy"] for p in points)
            out[f"{kind}/{sname}"] = {
                "best_accuracy": best,
                "accuracy_at_max_budget": points[-1]["accuracy"],
                "min_budget_within_1pt_of_best": _first_budget(points, best - DVE.MATCH_TOL),
                **{f"min_budget_within_1pt_of_{e}": _first_budget(points, explicit[e]["accuracy"] - DVE.MATCH_TOL)
                   for e in explicit},
            }
    return out


def plot(plt, dname: str, res: dict[str, Any], st: dict[str, Any]):
    """Accuracy vs max solver steps (left) and vs evaluation time (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    styles = {"anderson": "-", "fixed_point_iteration": "--"}
    for kind, per in res["sweep"].items():
        for sname, points in per.items():
            label = f"{DVE.LABELS[kind]}, {SOLVER_LABELS[sname]}"
            b = [p["max_steps"] for p in points]
            acc = [p["accuracy"] for p in points]
            axes[0].plot(b, acc, styles[sname], color=DVE.COLORS[kind], marker="o", ms=3, label=label)
            axes[1].plot([p["eval_time_s"] * 1e3 for p in points], acc, styles[sname], color=DVE.COLORS[kind],
                         marker="o", ms=3, label=label)
    tied = res["unrolled_any_depth"]
    axes[0].plot([p["depth"] for p in tied], [p["accuracy"] for p in tied], ":", color=DVE.COLORS["unrolled"],
                 marker=".", label=f"{DVE.LABELS['unrolled']} (trained at K={st['depth']}) run for k steps")
    for kind, e in res["explicit"].items():
        label = f"{e['label']} (fixed depth {e['depth']}, {e['params']:,} params)"
        axes[0].axhline(e["accuracy"], color=DVE.COLORS[kind], lw=1, alpha=0.7)
        axes[0].plot([e["depth"]], [e["accuracy"]], "*", ms=12, color=DVE.COLORS[kind], label=label)
        axes[1].plot([e["eval_time_s"] * 1e3], [e["accuracy"]], "*", ms=12, color=DVE.COLORS[kind], label=label)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("max forward solver steps allowed at evaluation (explicit: depth), log scale")
    axes[0].set_title("test accuracy vs solver-step budget")
    axes[1].set_xscale("log")
    axes[1].set_xlabel(f"evaluation wall time of the {st['num_test']} test samples (ms, best of {st['repeats']}), "
                       "log scale")
    axes[1].set_title("test accuracy vs inference time")
    for ax in axes:
        ax.set_ylabel("test accuracy (fraction)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    lo = min([p["accuracy"] for per in res["sweep"].values() for pts in per.values() for p in pts]
             + [e["accuracy"] for e in res["explicit"].values()])
    for ax in axes:
        ax.set_ylim(max(0.0, lo - 0.02), 1.0)
    fig.suptitle(f"{dname}: a DEQ can stop early or run longer at test time; an explicit net has one depth "
                 f"(hidden {st['hidden']}, trained {st['epochs']} epochs)")
    fig.tight_layout()
    return fig


def main(argv=None) -> dict[str, Any]:
    """Run the benchmark; write ``inference.json`` and PNGs; return the payload."""
    args = parse_args(argv)
    C.smoke_notice(args.profile, NAME)
    started, cpu_started = time.perf_counter(), time.process_time()
    load_before = os.getloadavg()
    datasets = C.pick(args.profile, smoke=["digits"], quick=["digits"], full=["digits", "mnist1d"])
    results, per_settings = {}, {}
    for dname in datasets:
        results[dname], per_settings[dname] = sweep_dataset(dname, args.profile, args.seed)

    rows = []
    for dname, res in results.items():
        for kind, per in res["sweep"].items():
            for sname, points in per.items():
                s = res["summary"][f"{kind}/{sname}"]
                by_budget = {p["max_steps"]: p for p in points}
                row = {"dataset": dname, "model": f"{DVE.LABELS[kind]}, {SOLVER_LABELS[sname]}",
                       "best": s["best_accuracy"],
                       "b_best": s["min_budget_within_1pt_of_best"],
                       "b_unr": s.get("min_budget_within_1pt_of_unrolled"),
                       "b_res": s.get("min_budget_within_1pt_of_resnet")}
                for b in (1, 4, 8, 16, 50):
                    if b in by_budget:
                        row[f"acc{b}"] = f"{by_budget[b]['accuracy']:.1%} ({by_budget[b]['mean_steps']:.1f})"
                rows.append(row)
        for kind, e in res["explicit"].items():
            rows.append({"dataset": dname, "model": f"{e['label']} (depth {e['depth']})", "best": e["accuracy"],
                         "fixed": f"{e['accuracy']:.1%}"})
    print()
    table = C.print_table(rows, [
        "dataset", "model", ("best", "best acc"),
        ("acc1", "acc@1 (steps used)"), ("acc4", "acc@4"), ("acc8", "acc@8"), ("acc16", "acc@16"), ("acc50", "acc@50"),
        ("fixed", "acc at own depth"),
        ("b_best", "budget: within 1pt of best"), ("b_unr", "budget: ≥ unrolled-1pt"), ("b_res", "budget: ≥ ResNet-1pt"),
    ], keep=2, title="Test accuracy at a forward solver-step budget (max_steps; mean steps used in parentheses)")
    cert_rows = [{"dataset": dname, "model": f"{DVE.LABELS[kind]}, {SOLVER_LABELS[sname]}", "rtol": f"{p['rtol']:g}",
                  "steps": p["mean_steps"], "acc": f"{p['accuracy']:.2%}", "bound": f"{p['certified_relative_bound_median']:.1e}",
                  "certified": f"{p['certified_prediction_frac']:.2%}"}
                 for dname, res in results.items() for kind, per in res["certified_by_tolerance"].items()
                 for sname, points in per.items() for p in points]
    cert_table = None
    if cert_rows:
        print()
        cert_table = C.print_table(cert_rows, [
            "dataset", "model", ("rtol", "solver rtol"), ("steps", "mean steps"), ("acc", "test acc"),
            ("bound", "median ||z - z*|| / ||z|| bound"), ("certified", "predictions certified"),
        ], keep=2, title="Contractive DEQ: guaranteed distance to the exact fixed point and predictions certified "
                 "to be the exact equilibrium's, against the solver tolerance")

    figures = {}
    if not args.no_plot:
        plt = C.pyplot()
        for dname, res in results.items():
            path = C.save_figure(plot(plt, dname, res, per_settings[dname]), args.out, f"{NAME}_{dname}")
            figures[dname] = str(path)

    payload = {
        "benchmark": NAME, "profile": args.profile,
        "settings": {"profile": args.profile, "seed": args.seed, "datasets": per_settings,
                     "solver_tolerances": {"rtol": RTOL, "atol": ATOL},
                     "load_average": {"before": load_before, "after": os.getloadavg()}},
        "results": results, "summary_table": table, "certified_table": cert_table, "figures": figures,
        "run_time_s": time.perf_counter() - started,
        "cpu_time_s": time.process_time() - cpu_started,
    }
    path = C.save_json(args.out, NAME, payload)
    print(f"\ntable: {path}; run time {payload['run_time_s']:.1f} s")
    for dname, fig_path in figures.items():
        print(f"plot ({dname}): {fig_path}")
    C.smoke_notice(args.profile, NAME, end=True)
    return payload


if __name__ == "__main__":
    main()
