"""Character-level language modelling: a DEQ-Transformer against explicit Transformers.

Run ``python -m benchmarks.language_model --profile smoke|quick|full`` (``--out DIR``,
``--seed``, ``--no-plot``, ``--models LIST``).

Data: ``deq.data.load_stdlib_corpus()`` -- the Python standard library's ``*.py`` files (9.4 MB
of training text on CPython 3.11), split by file into train / validation / test, with the fixed
98-symbol vocabulary. Training windows of ``seq_len`` characters are drawn from the training
text (``TextCorpus.dataset``: consecutive non-overlapping windows, shuffled); validation and
test bits per character (bpc) are the mean next-character cross-entropy in bits over
``eval_windows`` non-overlapping windows drawn at random (fixed seed) over the whole split
(a window's first positions have a short context, as in any fixed-window evaluation), with the
standard error over windows; the full profile uses 1024 windows of 128 characters.

Models, all from the same block (``deq.nn.TransformerCell``: pre-LN, input injection, causal
attention, width ``d_model``, ``heads`` heads) with the same embedding and head:

* ``deq``: ``deq.nn.models.TransformerDEQLM``, the block as the DEQ cell; Anderson forward,
  IFT backward (Anderson adjoint);
* ``tied``: ``UnrolledTransformerLM``, the same block applied ``depth`` times, weights tied,
  ordinary backprop (exactly the DEQ's parameters);
* ``explicit``: ``TransformerLM.matched``, ``depth`` untied blocks at the width whose parameter
  count is closest to the DEQ's;
* ``deq_jr``: the DEQ trained with Jacobian regularization, ``JacobianSchedule(weight, every,
  ramp_steps)`` (one setting per profile, not tuned on the validation split)
  (``jacobian_penalty`` at the fixed point of a second, stop-gradient solve: ``fit``'s
  ``aux_loss_fn`` cannot see the forward's ``z*``, so penalised steps cost one more solve);
* ``deq_dropout``: the DEQ with ``dropout=p`` (``deq.nn.VariationalDropout`` on the block
  output, one mask per forward pass held over all solver steps);
* ``deq_reversible``: the reversible DEQ (McCallum et al. 2025): the same DEQ solved by
  ``deq.ReversibleIteration(damping=0.8)`` (two cell evaluations per step) and differentiated
  exactly by reversing its steps, ``deq.Reversible()`` (no adjoint solve).

All are trained with one ``deq.train.fit`` configuration (AdamW, warm-up and cosine decay,
gradient clipping at 1), the validation split as ``fit``'s evaluation split every
``eval_every`` steps. Measured, side by side:

* validation bpc against training steps and wall time (``fit``'s records), final validation and
  test bpc;
* forward and backward solver steps per training step (``fit``'s records);
* memory of one training step (XLA's buffer assignment, ``temp_size_in_bytes`` of the jitted
  gradient, compiled not run) against the sequence length and the effective depth: the DEQ's
  ``max_steps`` (flat), the tied twin's ``depth`` (linear), and the reversible DEQ's
  ``max_steps`` (it stores one ``(y, z)`` checkpoint every 2 steps);
* test-time compute: test bpc of the trained DEQ with the runtime step budget
  ``layer(u, max_steps=k)`` (one compilation for every ``k``), and of the tied twin run at depths
  it was not trained for;
* a causality check of the trained DEQ: changing the character at position ``t`` moves the
  logits at positions ``< t`` only by about the solver's tolerance (the solver mixes positions:
  one Anderson residual per sequence);
* the effect of Jacobian regularization and of variational dropout on forward steps and bpc.

Targets (full profile, honest PASS/MISS): the DEQ within 2% of the explicit Transformer's test
bpc and within 1% of its tied twin's; Jacobian regularization at least 2x fewer forward steps at
no more than 1% worse bpc; the DEQ's step memory flat in ``max_steps``. The quick profile
checks the same lines at a size far too small to decide them; the smoke profile only runs the
code.

Every JSON records the settings, the machine, the library versions, the commit and the load
average (the 2-core machine is shared: timings are contaminated by other jobs).
"""

from __future__ import annotations

import math
import os
import time

from benchmarks import _common as C

NAME = "language_model"
KINDS = ("deq", "tied", "explicit", "deq_jr", "deq_dropout", "deq_reversible")
#: The evaluation windows: a fixed random subset spread over the whole split (not its first file).
EVAL_SEED = 1234
LOG2 = math.log(2.0)


def settings(profile: str) -> dict:
    """Sizes and schedule of a profile."""
    return dict(
        d_model=C.pick(profile, smoke=16, quick=48, full=128),
        heads=C.pick(profile, smoke=2, quick=4, full=4),
        seq_len=C.pick(profile, smoke=16, quick=64, full=128),
        batch_size=C.pick(profile, smoke=4, quick=16, full=32),
        steps=C.pick(profile, smoke=3, quick=150, full=3000),
        warmup=C.pick(profile, smoke=1, quick=15, full=200),
        learning_rate=C.pick(profile, smoke=1e-3, quick=3e-3, full=1e-3),
        weight_decay=0.01,
        eval_every=C.pick(profile, smoke=3, quick=50, full=250),
        depth=C.pick(profile, smoke=2, quick=6, full=8),
        max_train_chars=C.pick(profile, smoke=20_000, quick=2_000_000, full=None),
        eval_windows=C.pick(profile, smoke=4, quick=128, full=1024),
        solver=dict(rtol=C.pick(profile, smoke=1e-2, quick=1e-3, full=1e-3), atol=1e-5,
                    max_steps=C.pick(profile, smoke=6, quick=30, full=30)),
        adjoint=dict(rtol=1e-3, atol=1e-6, max_steps=C.pick(profile, smoke=6, quick=30, full=30)),
        jac_weight=C.pick(profile, smoke=1.0, quick=0.5, full=1.0),
        jac_every=C.pick(profile, smoke=1, quick=2, full=4),
        jac_ramp=C.pick(profile, smoke=0, quick=50, full=1000),
        dropout=C.pick(profile, smoke=0.1, quick=0.1, full=0.1),
        budgets=C.pick(profile, smoke=[1, 6], quick=[1, 2, 4, 8, 16, 30], full=[1, 2, 4, 8, 12, 16, 24, 30, 45, 60]),
        tied_depths=C.pick(profile, smoke=[3], quick=[2, 4, 6, 8, 12], full=[2, 4, 8, 12, 16, 24]),
        mem_depths=C.pick(profile, smoke=[2, 4], quick=[2, 4, 8, 16], full=[2, 4, 8, 16, 32]),
        mem_lengths=C.pick(profile, smoke=[16], quick=[32, 64, 128], full=[64, 128, 256, 512]),
        mem_batch=C.pick(profile, smoke=2, quick=8, full=16),
    )


def _parser():
    parser = C.make_parser(__doc__.split("\n\n")[0], name=NAME)
    parser.add_argument("--models", default=",".join(KINDS),
                        help=f"comma-separated subset of {','.join(KINDS)}")
    return parser


def parse_args(argv=None):
    """The command line (the shared options of every benchmark, plus ``--models``)."""
    return _parser().parse_args(argv)


# --------------------------------------------------------------------------------------------
# Models and training
# --------------------------------------------------------------------------------------------


def build(kind: str, s: dict, vocab: int, seed: int):
    """One model of the comparison (the DEQs share every setting but the one they vary)."""
    import deq
    from flax import nnx
    from deq.nn.models import TransformerDEQLM, TransformerLM, UnrolledTransformerLM, count_params

    rngs = nnx.Rngs(seed, dropout=seed + 1000)
    common = dict(max_len=s["seq_len"], rngs=rngs)
    deq_kwargs = dict(solver=deq.Anderson(**s["solver"]),
                      backward=deq.IFT(solver=deq.Anderson(**s["adjoint"])), **common)
    if kind in ("deq", "deq_jr"):
        return TransformerDEQLM(vocab, s["d_model"], s["heads"], **deq_kwargs)
    if kind == "deq_reversible":
        solver = deq.ReversibleIteration(damping=0.8, **s["solver"])
        return TransformerDEQLM(vocab, s["d_model"], s["heads"], solver=solver, backward=deq.Reversible(), **common)
    if kind == "deq_dropout":
        return TransformerDEQLM(vocab, s["d_model"], s["heads"], dropout=s["dropout"], **deq_kwargs)
    if kind == "tied":
        return UnrolledTransformerLM(vocab, s["d_model"], s["heads"], depth=s["depth"], **common)
    if kind == "explicit":
        target = count_params(nnx.eval_shape(lambda: TransformerDEQLM(vocab, s["d_model"], s["heads"],
                                                                      max_len=s["seq_len"], rngs=nnx.Rngs(0))))
        return TransformerLM.matched(target, vocab, s["heads"], depth=s["depth"], **common)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


def jacobian_aux(model, x, key):
    """The Jacobian penalty at the DEQ's fixed point (a second, stop-gradient solve), divided by
    the state size per sample as in Bai, Koltun & Kolter 2021."""
    import jax
    from deq.regularize import jacobian_penalty

    _, u = model._inject(x)
    z = jax.lax.stop_gradient(model.deq(u))
    return jacobian_penalty(model.deq.cell, z, u, key) / (z.shape[1] * z.shape[2])


_JITTED: dict = {}


def _default_forward(m, xb, k):
    import jax.numpy as jnp

    return m(xb)[0], jnp.full((xb.shape[0],), jnp.nan)


def _budget_forward(m, xb, k):
    """The DEQ LM with the runtime step budget `k` (traced: one compilation for every `k`)."""
    _, u = m._inject(xb)
    sol = m.deq(u, max_steps=k, return_solution=True)
    return m.head(sol.value), sol.stats.num_steps.astype(float)


def _per_window():
    """`(model, x, y, k, forward) -> (per-window mean nats, per-window solver steps)`, jitted
    once per process (`forward` static): evaluations of the same model shapes share it."""
    if "per_window" not in _JITTED:
        import functools

        import jax.numpy as jnp
        import optax
        from flax import nnx

        @functools.partial(nnx.jit, static_argnames=("forward",))
        def per_window(m, xb, yb, k, forward):
            logits, steps = forward(m, xb, k)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb), axis=1), steps

        _JITTED["per_window"] = per_window
    return _JITTED["per_window"]


def bits_per_char(model, x, y, batch: int, *, forward=_default_forward, k: int = 0) -> dict:
    """Mean next-character cross-entropy in bits over windows `(x, y)`, with its standard error
    over windows, in eval mode. `forward(model, xb, k) -> (logits, steps)` (`steps`: per-window
    solver steps, or NaN)."""
    import jax.numpy as jnp
    import numpy as np

    per_window = _per_window()
    model.eval()
    try:
        outs = [per_window(model, jnp.asarray(x[i:i + batch]), jnp.asarray(y[i:i + batch]), jnp.int32(k),
                           forward=forward) for i in range(0, len(x), batch)]
    finally:
        model.train()
    bits = np.concatenate([np.asarray(o[0]) for o in outs]) / LOG2
    steps = np.concatenate([np.asarray(o[1], float) for o in outs])
    return {"bpc": float(bits.mean()), "se": float(bits.std(ddof=1) / np.sqrt(len(bits))) if len(bits) > 1 else None,
            "windows": int(len(bits)), "mean_steps": float(steps.mean()) if np.isfinite(steps).all() else None}


def train_one(kind: str, corpus, s: dict, seed: int) -> tuple[dict, object]:
    """Train one model with the shared `deq.train.fit` config; its curves and final figures."""
    import numpy as np
    from deq.nn.models import count_params
    from deq.regularize import JacobianSchedule
    from deq.train import TrainConfig, fit

    ds = corpus.dataset(s["seq_len"], eval_split="validation", max_eval_windows=s["eval_windows"], seed=seed,
                        eval_seed=EVAL_SEED)
    model = build(kind, s, corpus.vocab_size, seed)
    jr = kind == "deq_jr"
    config = TrainConfig(
        learning_rate=s["learning_rate"], weight_decay=s["weight_decay"], warmup_steps=s["warmup"],
        total_steps=s["steps"], clip_norm=1.0, batch_size=s["batch_size"], eval_every=s["eval_every"],
        seed=seed, progress=False,
        jacobian_reg=JacobianSchedule(weight=s["jac_weight"], every=s["jac_every"],
                                      ramp_steps=s["jac_ramp"]) if jr else 0.0,
    )
    t0 = time.perf_counter()
    history = fit(model, ds, config, aux_loss_fn=jacobian_aux if jr else None)
    train_wall = time.perf_counter() - t0
    x_val, y_val = corpus.windows("validation", s["seq_len"], max_windows=s["eval_windows"], seed=EVAL_SEED)
    x_test, y_test = corpus.windows("test", s["seq_len"], max_windows=s["eval_windows"], seed=EVAL_SEED)
    batch = max(s["batch_size"], 16)
    step_time = history.metric("step_time")
    curve = [{"step": r["step"], "val_bpc": r["loss"] / LOG2,
              "wall_s": float(np.sum(step_time[: r["step"]]))} for r in history.eval]
    per_step = {k: history.metric(k).tolist() for k in ("loss", "forward_steps", "backward_steps", "aux_loss")
                if np.isfinite(history.metric(k)).any()}
    out = {
        "kind": kind, "params": count_params(model), "depth": getattr(model, "depth", None),
        "d_model": model.d_model, "train_wall_s": train_wall, "step_time_median_s": float(np.median(step_time[1:]))
        if len(step_time) > 1 else float(step_time[0]), "first_step_s": float(step_time[0]),
        "curve": curve, "per_step": per_step,
        "mean_forward_steps": _tail_mean(history.metric("forward_steps")),
        "mean_backward_steps": _tail_mean(history.metric("backward_steps")),
        "validation": bits_per_char(model, x_val, y_val, batch),
        "test": bits_per_char(model, x_test, y_test, batch),
        "final_train_bpc": _tail_mean(history.metric("loss")) / LOG2,
    }
    return out, model


def _tail_mean(values, frac: float = 0.2):
    import numpy as np

    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    return float(values[-max(1, int(len(values) * frac)):].mean())


# --------------------------------------------------------------------------------------------
# Test-time compute, causality, memory
# --------------------------------------------------------------------------------------------


def deq_budgets(model, x, y, budgets, batch) -> list[dict]:
    """Test bpc and mean forward steps of a trained DEQ LM at each runtime step budget
    (`layer(u, max_steps=k)`: traced, one compilation for every `k`)."""
    return [{"budget": k, **bits_per_char(model, x, y, batch, forward=_budget_forward, k=k)} for k in budgets]


def tied_depths(model, x, y, depths, batch) -> list[dict]:
    """Test bpc of the trained tied twin applied `K'` times (trained at `model.depth`)."""
    rows = []
    trained = model.depth
    for k in depths:
        model.depth = k
        try:
            rows.append({"depth": k, **bits_per_char(model, x, y, batch)})
        finally:
            model.depth = trained
    return rows


def causality_leak(model, x, t: int) -> dict:
    """Largest change of the logits at positions `< t` (and `>= t`) when the character at `t`
    changes, in eval mode."""
    import jax.numpy as jnp
    import numpy as np

    model.eval()
    try:
        x = jnp.asarray(x)
        a, _ = model(x)
        b, _ = model(x.at[:, t].set((x[:, t] + 1) % model.vocab_size))
    finally:
        model.train()
    d = np.abs(np.asarray(a - b))
    return {"position": t, "max_change_before": float(d[:, :t].max()), "max_change_at_or_after": float(d[:, t:].max())}


def step_memory(kind: str, s: dict, vocab: int, *, depth: int, seq_len: int) -> dict | None:
    """XLA's buffer sizes for one training step's gradient (compiled, not run)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    s = dict(s, seq_len=seq_len, depth=depth)
    if kind in ("deq", "deq_reversible"):
        # the DEQ's effective depth is its solver's step budget (the forward's max_steps)
        s["solver"] = dict(s["solver"], max_steps=depth)
    model = build(kind, s, vocab, 0)
    graphdef, state = nnx.split(model)

    def loss(state, x, y):
        logits, _ = nnx.merge(graphdef, state)(x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    grad = jax.jit(jax.grad(loss))
    x = jax.ShapeDtypeStruct((s["mem_batch"], seq_len), jnp.int32)
    mem = C.xla_memory(grad, state, x, x)
    return None if mem is None else {"kind": kind, "depth": depth, "seq_len": seq_len, **mem}


# --------------------------------------------------------------------------------------------
# Targets, tables, plots
# --------------------------------------------------------------------------------------------


def targets(res: dict) -> list[dict]:
    m = res["models"]
    lines = []

    def rel(a, b):
        return (m[a]["test"]["bpc"] - m[b]["test"]["bpc"]) / m[b]["test"]["bpc"]

    if "deq" in m and "explicit" in m:
        r = rel("deq", "explicit")
        lines.append({"target": "DEQ test bpc within 2% of the explicit Transformer (matched params)",
                      "value": r, "pass": r <= 0.02})
    if "deq" in m and "tied" in m:
        r = rel("deq", "tied")
        lines.append({"target": "DEQ test bpc within 1% of its tied unrolled twin", "value": r, "pass": r <= 0.01})
    if "deq" in m and "deq_jr" in m and m["deq_jr"]["mean_forward_steps"]:
        ratio = m["deq"]["mean_forward_steps"] / m["deq_jr"]["mean_forward_steps"]
        r = rel("deq_jr", "deq")
        lines.append({"target": "Jacobian reg.: >= 2x fewer forward steps", "value": ratio, "pass": ratio >= 2})
        lines.append({"target": "Jacobian reg.: <= 1% worse test bpc", "value": r, "pass": r <= 0.01})
    mem = [r for r in res.get("memory", []) if r["kind"] == "deq" and r["seq_len"] == res["settings"]["seq_len"]]
    if len(mem) >= 2:
        temps = [r["temp_size_in_bytes"] for r in mem]
        growth = max(temps) / min(temps)
        lines.append({"target": "DEQ step memory flat in max_steps (largest / smallest <= 1.1)", "value": growth,
                      "pass": growth <= 1.1})
    return lines


def plot(res: dict, out) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    m = res["models"]
    ax = axes[0, 0]
    for kind, r in m.items():
        ax.plot([p["step"] for p in r["curve"]], [p["val_bpc"] for p in r["curve"]], "o-", label=kind)
    ax.set(xlabel="training step", ylabel="validation bits / char", title="validation bpc vs steps")
    ax.legend()
    ax = axes[0, 1]
    for kind, r in m.items():
        ax.plot([p["wall_s"] for p in r["curve"]], [p["val_bpc"] for p in r["curve"]], "o-", label=kind)
    ax.set(xlabel="training wall time (s, shared CPU)", ylabel="validation bits / char", title="vs wall time")
    ax = axes[0, 2]
    for kind, r in m.items():
        if "forward_steps" in r["per_step"]:
            ax.plot(r["per_step"]["forward_steps"], label=f"{kind} forward")
        if "backward_steps" in r["per_step"]:
            ax.plot(r["per_step"]["backward_steps"], "--", label=f"{kind} backward")
    ax.set(xlabel="training step", ylabel="solver steps (batch mean)", title="solver steps in training")
    ax.legend(fontsize=7)
    ax = axes[1, 0]
    for kind in ("deq", "tied", "deq_reversible"):
        rows = [r for r in res.get("memory", []) if r["kind"] == kind and r["seq_len"] == res["settings"]["seq_len"]]
        if rows:
            ax.plot([r["depth"] for r in rows], [r["temp_size_in_bytes"] / 2**20 for r in rows], "o-",
                    label=f"{kind} ({'depth' if kind == 'tied' else 'max_steps'})")
    ax.set(xlabel="effective depth", ylabel="XLA temp MiB (one training step)", title="memory vs depth")
    ax.legend()
    ax = axes[1, 1]
    for kind in ("deq", "tied"):
        rows = sorted((r for r in res.get("memory", []) if r["kind"] == kind
                       and r["depth"] == res["settings"]["mem_depth_at_length"]), key=lambda r: r["seq_len"])
        if rows:
            ax.plot([r["seq_len"] for r in rows], [r["temp_size_in_bytes"] / 2**20 for r in rows], "o-", label=kind)
    ax.set(xlabel="sequence length", ylabel="XLA temp MiB", title="memory vs sequence length")
    ax.legend()
    ax = axes[1, 2]
    if res.get("test_time", {}).get("deq"):
        rows = res["test_time"]["deq"]
        ax.plot([r["budget"] for r in rows], [r["bpc"] for r in rows], "o-", label="deq (step budget)")
    if res.get("test_time", {}).get("tied"):
        rows = res["test_time"]["tied"]
        ax.plot([r["depth"] for r in rows], [r["bpc"] for r in rows], "s--", label="tied (depth)")
    ax.set(xlabel="test-time steps / depth", ylabel="test bits / char", title="test-time compute")
    ax.legend()
    fig.tight_layout()
    C.save_figure(fig, out, NAME)


def main(argv=None) -> dict:
    args = parse_args(argv)
    kinds = [k for k in args.models.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SystemExit(f"error: unknown --models {unknown}; choose from {','.join(KINDS)}")
    C.smoke_notice(args.profile, NAME)
    load_start = os.getloadavg()
    started = time.perf_counter()

    import jax

    from deq.data import load_stdlib_corpus

    s = settings(args.profile)
    s["mem_depth_at_length"] = s["mem_depths"][len(s["mem_depths"]) // 2]
    corpus = load_stdlib_corpus(max_train_chars=s["max_train_chars"])
    C.say(f"corpus: {corpus!r}")
    res = {"settings": s, "profile": args.profile, "seed": args.seed, "models": {}, "test_time": {},
           "corpus": {"name": corpus.name, "chars": {k: len(corpus.split(k)) for k in ("train", "validation", "test")},
                      "files": {k: len(v) for k, v in corpus.files.items()},
                      "unknown_fraction": corpus.unknown_fraction, "vocab_size": corpus.vocab_size}}
    x_test, y_test = corpus.windows("test", s["seq_len"], max_windows=s["eval_windows"], seed=EVAL_SEED)
    batch = max(s["batch_size"], 16)
    for kind in kinds:
        C.say(f"training {kind}")
        out, model = train_one(kind, corpus, s, args.seed)
        res["models"][kind] = out
        C.say(f"  {kind}: test bpc {out['test']['bpc']:.3f}, fwd steps {out['mean_forward_steps']}, "
              f"{out['train_wall_s']:.0f} s")
        if kind == "deq":
            res["test_time"]["deq"] = deq_budgets(model, x_test, y_test, s["budgets"], batch)
            res["causality"] = causality_leak(model, x_test[:4], s["seq_len"] // 2)
        if kind == "tied":
            res["test_time"]["tied"] = tied_depths(model, x_test, y_test, s["tied_depths"], batch)
        del model
        jax.clear_caches()  # this model's compiled programs are not needed again
    C.say("memory of one training step")
    mem = []
    for kind in ("deq", "tied", "deq_reversible"):
        if kind == "deq_reversible" and kind not in kinds:
            continue
        for depth in s["mem_depths"]:
            mem.append(step_memory(kind, s, corpus.vocab_size, depth=depth, seq_len=s["seq_len"]))
        for length in s["mem_lengths"] if kind != "deq_reversible" else []:
            if length != s["seq_len"]:
                mem.append(step_memory(kind, s, corpus.vocab_size, depth=s["mem_depth_at_length"], seq_len=length))
    res["memory"] = [r for r in mem if r is not None]
    res["targets"] = targets(res)
    res["run_time_s"] = time.perf_counter() - started
    res["load_average"] = {"start": load_start, "end": os.getloadavg()}
    path = C.save_json(args.out, NAME, res)

    rows = [{"model": k, "params": r["params"], "width": r["d_model"], "depth": r["depth"],
             "val bpc": r["validation"]["bpc"], "test bpc": r["test"]["bpc"], "se": r["test"]["se"],
             "fwd steps": r["mean_forward_steps"], "bwd steps": r["mean_backward_steps"],
             "s/step": r["step_time_median_s"], "train s": r["train_wall_s"]} for k, r in res["models"].items()]
    C.print_table(rows, ["model", "params", "width", "depth", "val bpc", "test bpc", "se", "fwd steps",
                         "bwd steps", "s/step", "train s"], title="language model (bits per character)")
    tt = [{"budget": r["budget"], "test bpc": r["bpc"], "mean steps": r["mean_steps"]}
          for r in res["test_time"].get("deq", [])]
    if tt:
        C.print_table(tt, ["budget", "test bpc", "mean steps"], title="DEQ test-time step budget")
    if res["memory"]:
        C.print_table([{k: r.get(k) for k in ("kind", "depth", "seq_len")} | {"temp MiB": r["temp_size_in_bytes"] / 2**20}
                       for r in res["memory"]], ["kind", "depth", "seq_len", "temp MiB"],
                      title="memory of one training step (XLA buffer assignment)")
    for line in res["targets"]:
        print(f"{'PASS' if line['pass'] else 'MISS'}  {line['target']}: {line['value']:.3g}")
    if not args.no_plot:
        plot(res, args.out)
    print(f"wrote {path}")
    C.smoke_notice(args.profile, NAME, end=True)
    return res


if __name__ == "__main__":
    main()
