"""Test-time compute on prefix parity: train on short strings, test on longer ones with more steps.

Run ``python -m benchmarks.test_time_compute --profile smoke|quick|full`` (``--out DIR``,
``--seed``, ``--no-plot``).

Task (``deq.data.load_algorithmic("prefix_parity", ...)``): bits ``x_1..x_T``, per-position
targets ``y_t = (x_1 + ... + x_t) mod 2``. Models are trained on strings of length
``train_length`` and evaluated on lengths up to ``max(test_lengths)`` (fresh strings), with
per-token accuracy (and whole-sequence accuracy) as the metric.

Models (written here: the library has no 1-D sequence cell of this kind), all with the same
input encoder ``u_t = Linear(1, hidden)(x_t)`` and head ``Linear(channels, 2)``:

* ``deq``: ``deq.nn.DEQ`` over the whole sequence state ``z`` of shape ``(B, T, channels)``
  with the ``ShiftCell``

  .. math:: z_t \\leftarrow \\tanh\\big(W_2\\,\\mathrm{relu}(W_1 z_{t-1} + u_t) + b_2\\big),
            \\qquad z_0 \\equiv 0,

  a strictly causal 1-D convolution (kernel 2 with the current position's tap removed): each
  solver step moves information one position to the right, so a string of length ``T`` needs
  about ``T`` steps. Its Jacobian in ``z`` is strictly block lower-triangular (nilpotent): the
  fixed point is unique and plain fixed-point iteration reaches it exactly in ``T`` steps
  whatever the weights. Forward solver ``FixedPointIteration(rtol=1e-4, atol=1e-6,
  max_steps=train_max_steps)``; backward: the library's default IFT (Anderson adjoint).
* ``unrolled``: the same cell applied ``K = train_length`` times with tied weights (ordinary
  backprop) -- the explicit twin at its fixed depth. For reference it is also run for more steps
  at test time (``unrolled_any_depth``), which it was not trained for.
* ``stack``: ``K`` different (untied) ``ShiftCell`` s, depth ``K = train_length``: an explicit
  network of fixed depth; position ``t`` sees only the last ``K`` bits, whatever the input length.

With a budget ``k`` below the length, fixed-point iteration has made positions ``1..k`` exact,
but the library's solve loop returns the *lowest-residual* iterate it saw (documented in
``deq.fixed_point``), which for this map is usually an early one -- often the initial state
``z_0 = 0``, whose residual is smaller than those of the partly propagated iterates: accuracy
at ``k < T`` is then near chance rather than at the ``k / T`` "frontier". For comparison the
DEQ's trained cell is also iterated ``k`` times by hand, keeping the last iterate
(``deq_last_iterate``, no solver, no stopping test).

All are trained with the same ``deq.train.fit`` config. At test time the DEQ is solved with
the per-call solver override and the layer's runtime step budget (``max_steps=budget``, traced:
one compilation per solver kind and length) for every budget in ``budgets`` (fixed-point
iteration; Anderson too in the full profile), and each length is evaluated at every budget.

Targets (PASS/MISS, honest):

* the DEQ trained on length ``L0`` reaches >= 99% token accuracy on strings ``8 L0`` long
  (mean over seeds) when its budget is at least the length;
* on the longest strings, a larger budget helps: accuracy at ``budget >= length`` exceeds
  accuracy at ``budget = L0`` by >= 10 points;
* on strings ``8 L0`` long the DEQ beats the fixed-depth explicit net (``stack``) by >= 10 points.
"""

from __future__ import annotations

from benchmarks import _common as C

NAME = "test_time_compute"


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
from deq.data import load_algorithmic
from deq.nn import solution_info
from deq.nn.models import count_params
from deq.train import TrainConfig, fit
LABELS = {"deq": "DEQ (shift cell)", "unrolled": "Unrolled (tied)", "stack": "Explicit stack (untied)"}
COLORS = {"deq": "C0", "unrolled": "C1", "stack": "C3"}
SOLVERS = {"fixed_point_iteration": deq.FixedPointIteration, "anderson": deq.Anderson}
RTOL, ATOL = 1e-4, 1e-6


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class ShiftCell(nnx.Module):
    """``z_t <- tanh(W2 relu(W1 z_{t-1} + u_t) + b2)`` on a ``(B, T, channels)`` state.

    Args:
      channels: state channels per position.
      hidden: inner width (also the width of the injection ``u``).
      rngs: random key source.
    """

    def __init__(self, channels: int, hidden: int, *, rngs: nnx.Rngs):
        self.channels = channels
        self.w_prev = nnx.Linear(channels, hidden, rngs=rngs)
        self.w_out = nnx.Linear(hidden, channels, rngs=rngs)

    def init_state(self, u):
        return jnp.zeros(u.shape[:-1] + (self.channels,), u.dtype)

    def __call__(self, z, u):
        prev = jnp.pad(z, ((0, 0), (1, 0), (0, 0)))[:, :-1]  # z_{t-1}, zeros before the start
        return jnp.tanh(self.w_out(jax.nn.relu(self.w_prev(prev) + u)))


class _SeqBase(nnx.Module):
    def _init_io(self, channels, hidden, rngs):
        self.encoder = nnx.Linear(1, hidden, rngs=rngs)
        self.head = nnx.Linear(channels, 2, rngs=rngs)


class SeqDEQ(_SeqBase):
    """Encoder -> DEQ(ShiftCell) -> per-position head; ``model(x, solver=None)``."""

    def __init__(self, channels: int, hidden: int, *, rngs: nnx.Rngs, solver):
        self._init_io(channels, hidden, rngs)
        self.deq = deq.nn.DEQ(ShiftCell(channels, hidden, rngs=rngs), solver=solver)

    def __call__(self, x, solver=None, max_steps=None):
        u = self.encoder(x)
        sol = self.deq(u, return_solution=True, solver=solver, max_steps=max_steps)
        return self.head(sol.value), solution_info(sol)


class SeqUnrolled(_SeqBase):
    """The ShiftCell applied ``depth`` times with tied weights."""

    def __init__(self, channels: int, hidden: int, depth: int, *, rngs: nnx.Rngs):
        self._init_io(channels, hidden, rngs)
        self.cell = ShiftCell(channels, hidden, rngs=rngs)
        self.depth = depth

    def __call__(self, x):
        u = self.encoder(x)
        z = self.cell.init_state(u)
        for _ in range(self.depth):
            z = self.cell(z, u)
        return self.head(z), {"depth": jnp.asarray(self.depth, jnp.int32)}


class SeqStack(_SeqBase):
    """``depth`` different ShiftCells (untied): an explicit network of fixed depth."""

    def __init__(self, channels: int, hidden: int, depth: int, *, rngs: nnx.Rngs):
        self._init_io(channels, hidden, rngs)
        self.cells = nnx.List([ShiftCell(channels, hidden, rngs=rngs) for _ in range(depth)])
        self.depth = depth

    def __call__(self, x):
        u = self.encoder(x)
        z = self.cells[0].init_state(u)
        for cell in self.cells:
            z = cell(z, u)
        return self.head(z), {"depth": jnp.asarray(self.depth, jnp.int32)}


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _metrics(logits, y):
    correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
    return {
        "token_accuracy": jnp.mean(correct),
        "sequence_accuracy": jnp.mean(jnp.all(correct > 0, axis=1).astype(jnp.float32)),
        "position_accuracy": jnp.mean(correct, axis=0),
    }


@nnx.jit(static_argnames=("solver",))
def eval_deq(model, x, y, solver, budget=None):
    """Metrics of the DEQ solved with ``solver`` (per-call override) for at most ``budget`` steps
    (a traced runtime budget: one compilation per solver and input shape), plus solver stats."""
    logits, info = model(x, solver=solver, max_steps=budget)
    return {**_metrics(logits, y), "mean_steps": info["forward_steps"], "converged_frac": info["converged_frac"]}


@nnx.jit
def eval_explicit(model, x, y):
    logits, _ = model(x)
    return _metrics(logits, y)


@nnx.jit
def eval_tied(model, x, y, depth):
    """The model's cell applied ``depth`` times, last iterate kept (traced depth: one compilation
    per shape): the tied twin's cell, or the DEQ's cell without its solver."""
    u = model.encoder(x)
    cell = model.cell if isinstance(model, SeqUnrolled) else model.deq.cell
    graphdef, state = nnx.split(cell)
    z = jax.lax.fori_loop(0, depth, lambda i, z: nnx.merge(graphdef, state)(z, u), cell.init_state(u))
    return _metrics(model.head(z), y)


def _host(out) -> dict[str, Any]:
    out = jax.device_get(out)
    return {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def settings_for(profile: str) -> dict[str, Any]:
    """Sizes and schedules of a profile."""
    return C.pick(
        profile,
        smoke=dict(train_length=4, test_lengths=[4, 8], budgets=[2, 8], num_train=256, num_test=64,
                   epochs=1, channels=8, hidden=16, seeds=1, train_max_steps=12, solvers=["fixed_point_iteration"]),
        quick=dict(train_length=8, test_lengths=[8, 16, 32, 64], budgets=[4, 8, 16, 32, 64, 128],
                   num_train=2048, num_test=256, epochs=8, channels=32, hidden=64, seeds=1, train_max_steps=30,
                   solvers=["fixed_point_iteration"]),
        full=dict(train_length=8, test_lengths=[8, 16, 32, 64, 128, 256], budgets=[4, 8, 16, 32, 64, 128, 256],
                  num_train=4096, num_test=256, epochs=10, channels=32, hidden=64, seeds=3, train_max_steps=30,
                  solvers=["fixed_point_iteration", "anderson"]),
    ) | dict(batch_size=64, learning_rate=3e-3)


def build(kind: str, st: dict[str, Any], seed: int) -> nnx.Module:
    rngs = nnx.Rngs(seed)
    c, h, k = st["channels"], st["hidden"], st["train_length"]
    if kind == "deq":
        solver = deq.FixedPointIteration(rtol=RTOL, atol=ATOL, max_steps=st["train_max_steps"])
        return SeqDEQ(c, h, rngs=rngs, solver=solver)
    if kind == "unrolled":
        return SeqUnrolled(c, h, k, rngs=rngs)
    if kind == "stack":
        return SeqStack(c, h, k, rngs=rngs)
    raise ValueError(kind)


def run_seed(st: dict[str, Any], seed: int, test_sets: dict[int, Any]) -> dict[str, Any]:
    """Train the three models with one seed and evaluate them on every length and budget."""
    ds = load_algorithmic("prefix_parity", train_length=st["train_length"], test_length=st["train_length"],
                          num_train=st["num_train"], num_test=st["num_test"], seed=seed)
    cfg = TrainConfig(learning_rate=st["learning_rate"], epochs=st["epochs"], batch_size=st["batch_size"],
                      seed=seed, progress=False)
    out: dict[str, Any] = {"seed": seed, "models": {}}
    models = {}
    for kind in ("deq", "unrolled", "stack"):
        model = build(kind, st, seed)
        t0 = time.perf_counter()
        hist = fit(model, ds, cfg)
        C.say(f"training: {LABELS[kind]} seed {seed} done in {time.perf_counter() - t0:.1f} s")
        times = np.array([r["step_time"] for r in hist.train])
        models[kind] = model
        out["models"][kind] = {
            "label": LABELS[kind], "params": count_params(model),
            "depth": None if kind == "deq" else st["train_length"],
            "train_length_test_accuracy": hist.test_accuracy,
            "final_train_accuracy": float(np.mean(hist.metric("accuracy")[-10:])),
            "step_time_median_s": float(np.median(times[1:])) if len(times) > 1 else float(times[0]),
            "forward_steps_train": float(np.mean(hist.metric("forward_steps")[-10:])) if kind == "deq" else None,
        }

    deq_res: dict[str, dict[str, dict[str, Any]]] = {}
    explicit: dict[str, dict[str, Any]] = {"unrolled": {}, "stack": {}}
    tied: dict[str, dict[str, Any]] = {}
    last: dict[str, dict[str, Any]] = {}
    jobs = [(L, s, b) for L in st["test_lengths"] for s in st["solvers"] for b in st["budgets"]]
    for L, sname, b in C.progress(jobs, desc=f"seed {seed}: lengths x budgets",
                                  label=lambda j: f"DEQ, {j[1]}, length {j[0]}, max_steps {j[2]}"):
        x, y = test_sets[L]
        # capped at the largest budget; `b` is a runtime budget (no recompilation across budgets)
        solver = SOLVERS[sname](rtol=RTOL, atol=ATOL, max_steps=max(st["budgets"]))
        t0 = time.perf_counter()
        res = _host(eval_deq(models["deq"], x, y, solver, jnp.int32(b)))
        res["eval_wall_s_incl_compile"] = time.perf_counter() - t0
        deq_res.setdefault(sname, {}).setdefault(str(L), {})[str(b)] = res
    for L in st["test_lengths"]:
        x, y = test_sets[L]
        for kind in ("unrolled", "stack"):
            explicit[kind][str(L)] = _host(eval_explicit(models[kind], x, y))
        tied[str(L)] = {str(b): _host(eval_tied(models["unrolled"], x, y, b)) for b in st["budgets"]}
        last[str(L)] = {str(b): _host(eval_tied(models["deq"], x, y, b)) for b in st["budgets"]}
    out["deq"] = deq_res
    out["explicit"] = explicit
    out["unrolled_any_depth"] = tied
    out["deq_last_iterate"] = last
    return out


def aggregate(runs: list[dict[str, Any]], st: dict[str, Any]) -> dict[str, Any]:
    """Mean (and min/max) token accuracy over seeds per solver, length and budget."""

    def stat(vals):
        v = np.asarray(vals, float)
        return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}

    agg: dict[str, Any] = {"deq": {}, "explicit": {}, "unrolled_any_depth": {}, "deq_last_iterate": {}}
    for sname in st["solvers"]:
        agg["deq"][sname] = {
            str(L): {str(b): {"token_accuracy": stat([r["deq"][sname][str(L)][str(b)]["token_accuracy"] for r in runs]),
                              "sequence_accuracy": stat([r["deq"][sname][str(L)][str(b)]["sequence_accuracy"] for r in runs]),
                              "mean_steps": stat([r["deq"][sname][str(L)][str(b)]["mean_steps"] for r in runs])}
                     for b in st["budgets"]}
            for L in st["test_lengths"]}
    for kind in ("unrolled", "stack"):
        agg["explicit"][kind] = {
            str(L): {"token_accuracy": stat([r["explicit"][kind][str(L)]["token_accuracy"] for r in runs]),
                     "sequence_accuracy": stat([r["explicit"][kind][str(L)]["sequence_accuracy"] for r in runs])}
            for L in st["test_lengths"]}
    for key in ("unrolled_any_depth", "deq_last_iterate"):
        agg[key] = {
            str(L): {str(b): {"token_accuracy": stat([r[key][str(L)][str(b)]["token_accuracy"] for r in runs])}
                     for b in st["budgets"]}
            for L in st["test_lengths"]}
    return agg


def evaluate_targets(agg: dict[str, Any], st: dict[str, Any]) -> list[dict[str, Any]]:
    L0 = st["train_length"]
    sname = st["solvers"][0]
    per = agg["deq"][sname]
    lengths = st["test_lengths"]
    far = 8 * L0 if 8 * L0 in lengths else max(lengths)
    longest = max(lengths)

    def best_enough(L):  # accuracy at the smallest budget >= L (or the largest budget)
        bs = [b for b in st["budgets"] if b >= L] or [max(st["budgets"])]
        return min(bs), per[str(L)][str(min(bs))]["token_accuracy"]["mean"]

    b_far, acc_far = best_enough(far)
    b_long, acc_long = best_enough(longest)
    b0 = min(st["budgets"], key=lambda b: abs(b - L0))
    acc_long_b0 = per[str(longest)][str(b0)]["token_accuracy"]["mean"]
    stack_far = agg["explicit"]["stack"][str(far)]["token_accuracy"]["mean"]
    return [
        {"target": f"DEQ trained on length {L0} reaches >=99% token accuracy on length {far} "
                   f"({far // L0}x) with budget >= length",
         "measured": f"{acc_far:.2%} at max_steps={b_far} ({sname})", "passed": bool(acc_far >= 0.99)},
        {"target": f"more solver steps help on length {longest}: accuracy at budget {b_long} exceeds "
                   f"budget {b0} by >=10 points",
         "measured": f"{acc_long_b0:.2%} -> {acc_long:.2%}", "passed": bool(acc_long - acc_long_b0 >= 0.10)},
        {"target": f"on length {far} the DEQ beats the fixed-depth explicit stack (depth {L0}) by >=10 points",
         "measured": f"DEQ {acc_far:.2%} vs stack {stack_far:.2%}", "passed": bool(acc_far - stack_far >= 0.10)},
    ]


def plot(plt, agg: dict[str, Any], runs: list[dict[str, Any]], st: dict[str, Any]):
    """Accuracy vs test length per budget; accuracy vs budget per length; accuracy by position."""
    sname = st["solvers"][0]
    per = agg["deq"][sname]
    lengths, budgets = st["test_lengths"], st["budgets"]
    L0 = st["train_length"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    cmap = plt.get_cmap("viridis")
    ax = axes[0]
    for i, b in enumerate(budgets):
        m = [per[str(L)][str(b)]["token_accuracy"]["mean"] for L in lengths]
        lo = [per[str(L)][str(b)]["token_accuracy"]["min"] for L in lengths]
        hi = [per[str(L)][str(b)]["token_accuracy"]["max"] for L in lengths]
        color = cmap(i / max(1, len(budgets) - 1))
        ax.plot(lengths, m, "-o", color=color, ms=4, label=f"DEQ, max_steps={b}")
        if len(runs) > 1:
            ax.fill_between(lengths, lo, hi, color=color, alpha=0.15, linewidth=0)
    for kind in ("unrolled", "stack"):
        m = [agg["explicit"][kind][str(L)]["token_accuracy"]["mean"] for L in lengths]
        ax.plot(lengths, m, "--s", color=COLORS[kind], ms=5, label=f"{LABELS[kind]}, fixed depth {L0}")
    ax.axvline(L0, color="gray", ls=":", lw=1, label=f"training length {L0}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test string length (bits), log scale")
    ax.set_ylabel("per-token test accuracy (fraction)")
    ax.set_title("accuracy vs test length, per solver-step budget")

    ax = axes[1]
    for i, L in enumerate(lengths):
        color = plt.get_cmap("plasma")(i / max(1, len(lengths) - 1))
        ax.plot(budgets, [per[str(L)][str(b)]["token_accuracy"]["mean"] for b in budgets], "-o", ms=4,
                color=color, label=f"DEQ, length {L}")
        ax.plot(budgets, [agg["unrolled_any_depth"][str(L)][str(b)]["token_accuracy"]["mean"] for b in budgets],
                ":", color=color, alpha=0.7)
        ax.plot(budgets, [agg["deq_last_iterate"][str(L)][str(b)]["token_accuracy"]["mean"] for b in budgets],
                "-.", color=color, alpha=0.7)
    ax.plot([], [], ":", color="gray", label=f"{LABELS['unrolled']} (trained at depth {L0}) run for k steps")
    ax.plot([], [], "-.", color="gray", label="DEQ cell iterated k times, last iterate (no solver)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("max solver steps at test time (unrolled: depth), log scale")
    ax.set_ylabel("per-token test accuracy (fraction)")
    ax.set_title("accuracy vs solver-step budget, per length")

    ax = axes[2]
    longest = max(lengths)
    for i, b in enumerate(budgets):
        pos = np.mean([r["deq"][sname][str(longest)][str(b)]["position_accuracy"] for r in runs], axis=0)
        ax.plot(np.arange(1, longest + 1), pos, color=cmap(i / max(1, len(budgets) - 1)), lw=1,
                label=f"DEQ, max_steps={b}")
    pos = np.mean([r["explicit"]["stack"][str(longest)]["position_accuracy"] for r in runs], axis=0)
    ax.plot(np.arange(1, longest + 1), pos, "--", color=COLORS["stack"], lw=1, label=f"{LABELS['stack']}, depth {L0}")
    ax.set_xlabel(f"position in a length-{longest} string")
    ax.set_ylabel("per-position test accuracy (fraction)")
    ax.set_title(f"accuracy by position, length {longest}")
    low = min(0.4, min(a["token_accuracy"]["min"] for per_l in per.values() for a in per_l.values()) - 0.02,
              min(a["token_accuracy"]["mean"] for k in ("unrolled", "stack")
                  for a in agg["explicit"][k].values()) - 0.02)
    for ax in axes:
        ax.axhline(0.5, color="black", lw=0.8, alpha=0.5, label="chance")
        ax.set_ylim(max(0.0, low), 1.02)
        ax.grid(alpha=0.3, which="both")
        # below the panel, where it hides no curve
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.suptitle(f"Prefix parity: trained on length {L0}, tested longer; DEQ solved by {sname.replace('_', ' ')} "
                 f"(mean over {len(runs)} seed(s))")
    fig.tight_layout()
    return fig


def main(argv=None) -> dict[str, Any]:
    """Run the benchmark; write ``test_time_compute.json`` and a PNG; return the payload."""
    args = parse_args(argv)
    C.smoke_notice(args.profile, NAME)
    started, cpu_started = time.perf_counter(), time.process_time()
    load_before = os.getloadavg()
    st = settings_for(args.profile)
    seeds = [args.seed + i for i in range(st["seeds"])]
    test_sets = {}
    for L in st["test_lengths"]:
        t = load_algorithmic("prefix_parity", train_length=st["train_length"], test_length=L, num_train=1,
                             num_test=st["num_test"], seed=10_000 + L)
        test_sets[L] = (jnp.asarray(t.x_test), jnp.asarray(t.y_test))
    runs = [run_seed(st, s, test_sets) for s in C.progress(seeds, desc="seeds", label=lambda s: f"seed {s}")]
    agg = aggregate(runs, st)
    targets = evaluate_targets(agg, st)

    models = {k: {"label": LABELS[k], "params": runs[0]["models"][k]["params"],
                  "depth": runs[0]["models"][k]["depth"],
                  "train_length_test_accuracy": float(np.mean([r["models"][k]["train_length_test_accuracy"] for r in runs])),
                  "step_time_median_s": float(np.median([r["models"][k]["step_time_median_s"] for r in runs])),
                  "forward_steps_train": runs[0]["models"][k]["forward_steps_train"]}
              for k in LABELS}
    print(f"\nPrefix parity: train length {st['train_length']}, seeds {seeds}")
    C.print_table([{"model": v["label"], "params": v["params"], "depth": v["depth"] or "adaptive",
                    "acc": v["train_length_test_accuracy"], "step_ms": v["step_time_median_s"] * 1e3,
                    "fsteps": v["forward_steps_train"]} for v in models.values()],
                  ["model", "params", "depth", ("acc", f"acc @ length {st['train_length']}"),
                   ("step_ms", "train step ms"), ("fsteps", "fwd steps (train)")])
    rows = []
    for sname in st["solvers"]:
        for b in st["budgets"]:
            row = {"model": f"DEQ, {sname.replace('_', ' ')}, max_steps={b}"}
            for L in st["test_lengths"]:
                a = agg["deq"][sname][str(L)][str(b)]
                row[f"L{L}"] = f"{a['token_accuracy']['mean']:.1%} ({a['mean_steps']['mean']:.0f})"
            rows.append(row)
    for b in st["budgets"]:
        row = {"model": f"DEQ cell iterated {b}x, last iterate (no solver)"}
        for L in st["test_lengths"]:
            row[f"L{L}"] = f"{agg['deq_last_iterate'][str(L)][str(b)]['token_accuracy']['mean']:.1%}"
        rows.append(row)
    for kind in ("unrolled", "stack"):
        row = {"model": f"{LABELS[kind]}, depth {st['train_length']}"}
        for L in st["test_lengths"]:
            row[f"L{L}"] = f"{agg['explicit'][kind][str(L)]['token_accuracy']['mean']:.1%}"
        rows.append(row)
    print()
    table = C.print_table(rows, ["model"] + [(f"L{L}", f"length {L}") for L in st["test_lengths"]],
                          title="Per-token test accuracy by test length (DEQ: mean solver steps used in parentheses)")
    print()
    for t in targets:
        C.print_wrapped(f"{'PASS' if t['passed'] else 'MISS'}: {t['target']} -- {t['measured']}")

    figures = {}
    if not args.no_plot:
        path = C.save_figure(plot(C.pyplot(), agg, runs, st), args.out, NAME)
        figures["accuracy_vs_length"] = str(path)
    payload = {
        "benchmark": NAME, "profile": args.profile,
        "settings": {**st, "seeds": seeds, "task": "prefix_parity", "solver_tolerances": {"rtol": RTOL, "atol": ATOL},
                     "load_average": {"before": load_before, "after": os.getloadavg()}},
        "models": models, "results": agg, "runs": runs, "targets": targets, "summary_table": table,
        "figures": figures, "run_time_s": time.perf_counter() - started,
        "cpu_time_s": time.process_time() - cpu_started,
    }
    path = C.save_json(args.out, NAME, payload)
    print(f"\ntable: {path}; run time {payload['run_time_s']:.1f} s")
    for name, fig_path in figures.items():
        print(f"plot ({name}): {fig_path}")
    C.smoke_notice(args.profile, NAME, end=True)
    return payload


if __name__ == "__main__":
    main()
