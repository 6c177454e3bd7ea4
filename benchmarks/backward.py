"""Backward strategies compared: IFT, phantom gradients, JFB, unrolling, SHINE, reversible, on a DEQ classifier.

Run ``python -m benchmarks.backward --profile smoke|quick|full`` (``--out DIR``, ``--seed``,
``--no-plot``, ``--datasets digits,mnist1d``).

Model and data: ``deq.nn.models.DEQClassifier(in_features, hidden, 10)`` (``Linear`` encoder,
DEQ layer around a ``DenseCell(hidden)``, ``Linear`` head; the smoke profile, which only checks
the machinery, uses ``use_norm=False``, which compiles faster) on each data set of
``--datasets`` (default: digits in smoke, both in quick/full), each measured on its own and
stored under ``datasets.<name>`` in the JSON:

* ``digits``: scikit-learn's digits, flattened to 64 features in ``[0, 1]``
  (``deq.data.load_digits``, fixed 80/20 split with seed 0);
* ``mnist1d``: MNIST-1D, 40 features (``deq.data.load_mnist1d()``: 4000 signals generated with
  seed 0, 3200 train / 800 test, as in ``benchmarks.deq_vs_explicit``), with the same model
  sizes and solvers as digits (so the default 30-step solvers may leave some solves
  unconverged there: ``converged_frac_last20`` and the adjoint warnings are recorded).

Unless stated, a row uses the classifier's default forward solver ``Anderson(rtol=1e-3,
atol=1e-5, max_steps=30)`` and differs only in ``backward``:

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
* ``IFT-Broyden`` (quick/full): the default IFT with the forward ``Broyden(rtol=1e-3,
  atol=1e-5, max_steps=30)`` (its default ``history_size=20``): the like-for-like baseline of
  the SHINE rows;
* ``SHINE`` (every profile; the smoke's one extra row, about 3 s of compilation): the same
  Broyden forward with ``SHINE(refine=0)``: the adjoint ``-H^T dL/dz*`` from Broyden's
  inverse-Jacobian estimate (Broyden-preconditioned JFB);
* ``SHINE-refine`` (quick/full): ``SHINE(refine=3)``: that estimate refined by 3 Anderson
  adjoint steps (4 vector-Jacobian products against JFB's 1; the IFT's adjoint takes about 6
  at initialisation on digits). 3 is a small budget chosen from the library's test
  (tests/test_backward_shine.py, a 6-d affine map: gradient error against IFT 8e-2 at
  ``refine=0``, below 1.6e-2 at 2), not tuned here;
* ``IFT-warm`` (quick/full): the default IFT with its adjoint solve warm-started
  (``DEQClassifier(...)(x, adjoint_init=u)``) from a bank ``(n_train, hidden)`` of every
  sample's adjoint at its previous visit (zeros at the start; the gradient with respect to
  ``u`` is the newly solved adjoint, which replaces the batch's rows, ``update_bank``), so a
  sample's adjoint starts from where it was one epoch (22 or 50 steps) of parameter updates
  earlier;
* ``IFT-RevIter`` (quick/full): the default IFT with the forward
  ``ReversibleIteration(rtol=1e-3, atol=1e-5, max_steps=30, damping=0.8)``: the baseline of
  ``Reversible``;
* ``Reversible`` (quick/full): the same reversible forward with ``Reversible()``: the exact
  gradient of the steps taken, by reversing them (segments of 2 steps at this damping). Damping
  0.8 instead of the solver's default 0.5: measured at initialisation on a digits batch of 64
  (seed 0), ``b = 0.5 / 0.8 / 1.2 / 1.5`` took 22.1 / 11.7 / 5.4 / 11.0 steps (two cell
  evaluations each) with 96.9 / 100 / 100 / 100% of the samples converged within 30 steps;
  0.8 is the fastest under 1 (over-relaxation is not guaranteed to converge).

Three measurements:

(a) **Gradient quality.** Cosine similarity between each strategy's gradient (float32, as in
    training) and the *exact* gradient of the same loss with respect to all parameters
    (encoder, cell, head), on fixed training batches. The exact gradient is computed in float64
    (inside ``jax.enable_x64``; parameters and data cast to float64) with a tight forward solve
    ``Anderson(rtol=1e-11, atol=1e-12, max_steps=500)`` and a tight IFT adjoint
    ``IFT(Anderson(rtol=1e-11, atol=1e-12, max_steps=500))``; its forward residuals and adjoint
    convergence warnings are recorded. It is the same for every row, whatever its forward
    solver, because the fixed point does not depend on the solver: for ``Reversible``, whose
    gradient is the exact one *of the computed iterate*, it differs from that only through the
    forward tolerance (``rtol=1e-3``), as for every other row. In quick/full it is cross-checked
    against plain backprop through 300 float64 fixed-point iterations (``reference_check``).
    Cosines are reported at initialisation (``init``), after training each strategy with itself
    (``trained``, seed ``--seed``) and at the IFT-trained parameters (``trained_ift_params``),
    with the ratio of gradient norms ``||g|| / ||g_exact||``. ``IFT-warm`` starts its adjoint
    from zeros at ``init`` (so it equals IFT up to one adjoint step there) and from its bank at
    the end of its training at the two trained points.
(b) **Cost of a training step** (forward + backward + Adam update, ``jax.jit``, on one batch):
    ``_common.time_fn``; the first call (compile + one run) is reported apart as
    ``compile_s``; then ``rounds`` rounds, each timing every strategy in turn
    (``time_fn``: warm-up calls, then ``per_round`` timed calls), so that changes of machine
    load hit every strategy alike; median, IQR and minimum of all timed calls. Memory:
    ``_common.xla_memory`` (``temp_size_in_bytes`` of the compiled step). ``IFT-warm`` is timed
    with a warm adjoint: the one its previous call on the same batch, at the same parameters,
    returned (the best case: its adjoint solve then stops at once; ``timing.backward_steps``
    says how many steps the timed call took). The table's ``in training`` column is the
    training loop's wall time per step (dispatch and the bank update included), the realistic
    figure for ``IFT-warm``.
(c) **Accuracy.** The same training budget for every strategy: same number of Adam steps, same
    learning rate, same initial parameters and the same batch order for a given seed
    (``batch_indices``: the order of ``deq.data.iterate_batches``); test accuracy at the end,
    with the default Anderson forward solve for every strategy (the fixed point does not depend
    on the solver). 1 seed in smoke/quick, 3 in full (``--seed``, ``--seed + 1``,
    ``--seed + 2``); mean, standard deviation and every seed are reported. Per training step
    the forward steps and the adjoint steps (mean over the batch, from the layer's
    ``deq.nn.BackwardProbe``: the IFT's adjoint solve, SHINE's refinement steps, 0 for the
    strategies without an adjoint solve) are recorded: ``forward_steps_mean`` /
    ``backward_steps_mean`` over all steps, ``*_last20`` over the last 20.
"""

from __future__ import annotations

import argparse

from benchmarks import _common as C

NAME = "backward"


DATASETS = ("digits", "mnist1d")


def default_datasets(profile: str) -> list[str]:
    """The data sets a profile runs without ``--datasets``: digits in smoke, both otherwise."""
    return C.pick(profile, smoke=["digits"], quick=list(DATASETS), full=list(DATASETS))


def _datasets(text: str) -> list[str]:
    """``--datasets`` value: comma-separated names from `DATASETS`, none repeated."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or not set(names) <= set(DATASETS) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names from {','.join(DATASETS)}, got {text!r}")
    return names


def parse_args(argv=None):
    """The command line; it needs no JAX, so ``--help`` answers before the imports below."""
    parser = C.make_parser(__doc__.splitlines()[0], name=NAME)
    parser.add_argument("--datasets", type=_datasets, default=None, metavar="LIST",
                        help="comma-separated data sets from " + ",".join(DATASETS) +
                             "; default: digits in smoke, both in quick and full")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and bad arguments answer here, before JAX is imported; main() reparses

import itertools
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
from deq.data import iterate_batches, load_digits, load_mnist1d
from deq.nn import BackwardProbe
from deq.nn.models import DEQClassifier, default_backward, default_solver

STRATEGIES = ("IFT", "PhantomGrad", "JFB", "Unrolled")
#: Extra variants (quick/full; see the module docstring), in the order of the tables.
EXTRA = ("IFT-nowarn", "Unrolled-FPI", "IFT-Broyden", "SHINE", "SHINE-refine", "IFT-warm", "IFT-RevIter",
         "Reversible")
#: The extra variants the smoke profile runs too (each costs a compilation).
SMOKE_EXTRA = ("SHINE",)
#: Rows whose IFT adjoint is warm-started from a bank of the previous visit's adjoints.
WARM = ("IFT-warm",)
#: Anderson refinement steps of ``SHINE-refine``.
SHINE_REFINE = 3
#: Damping of the ``ReversibleIteration`` forward of ``Reversible`` / ``IFT-RevIter`` (see the docstring).
REVERSIBLE_DAMPING = 0.8
LR = 2e-3


def strategy_names(profile: str) -> tuple[str, ...]:
    """The rows of ``profile``: all of them in quick/full, the base four and `SMOKE_EXTRA` in smoke."""
    return STRATEGIES + C.pick(profile, smoke=SMOKE_EXTRA, quick=EXTRA, full=EXTRA)


def _like_default(cls, **kwargs):
    """Solver ``cls`` with the default solver's tolerances and ``max_steps``."""
    base = default_solver()
    return cls(rtol=base.rtol, atol=base.atol, max_steps=base.max_steps, **kwargs)


def fpi_solver() -> deq.FixedPointIteration:
    """Forward solver of ``Unrolled-FPI``: the default solver's tolerances, plain iteration."""
    return _like_default(deq.FixedPointIteration)


#: Forward solvers other than the default, by row.
SOLVERS = {
    "Unrolled-FPI": fpi_solver,
    **dict.fromkeys(("IFT-Broyden", "SHINE", "SHINE-refine"), lambda: _like_default(deq.Broyden)),
    **dict.fromkeys(("IFT-RevIter", "Reversible"),
                    lambda: _like_default(deq.ReversibleIteration, damping=REVERSIBLE_DAMPING)),
}


def make_backward(name: str):
    """The backward strategy called ``name`` (see the module docstring)."""
    return {
        "IFT-nowarn": lambda: deq.IFT(solver=default_backward().solver, warn=False),
        "PhantomGrad": lambda: deq.PhantomGrad(steps=5, damping=0.5),
        "JFB": deq.JFB,
        "Unrolled": deq.Unrolled,
        "Unrolled-FPI": deq.Unrolled,
        "SHINE": lambda: deq.SHINE(refine=0),
        "SHINE-refine": lambda: deq.SHINE(refine=SHINE_REFINE),
        "Reversible": deq.Reversible,
    }.get(name, default_backward)()  # IFT, IFT-Broyden, IFT-warm, IFT-RevIter: the default IFT


def make_solver(name: str):
    """The forward solver used in training with strategy ``name``."""
    return SOLVERS.get(name, default_solver)()


def describe(name: str) -> str:
    """The row's description in the JSON: its backward and forward solver."""
    warm = ", adjoint_init=bank of the previous visit's adjoints" if name in WARM else ""
    return f"backward={make_backward(name)!r}, solver={make_solver(name)!r}{warm}"


def evals_per_step(solver) -> int:
    """Cell evaluations per forward solver step (two for the reversible iteration)."""
    return 2 if isinstance(solver, deq.ReversibleIteration) else 1


def make_model(arch: dict, seed: int, *, solver=None, backward=None) -> DEQClassifier:
    """The benchmark's classifier ``DEQClassifier(arch["in_features"], arch["hidden"], 10,
    use_norm=arch["use_norm"])``; its parameters depend only on ``arch`` and ``seed``."""
    return DEQClassifier(arch["in_features"], arch["hidden"], 10, rngs=nnx.Rngs(seed), use_norm=arch["use_norm"],
                         solver=solver or default_solver(), backward=backward or default_backward())


def strategy_model(name: str, arch: dict, seed: int):
    """Row ``name``'s classifier, with its DEQ layer's `deq.nn.BackwardProbe` (adjoint statistics),
    split as ``(graphdef, params, probes, rest)``."""
    model = make_model(arch, seed, solver=make_solver(name), backward=make_backward(name))
    deq.nn.enable_backward_stats(model)
    return nnx.split(model, nnx.Param, BackwardProbe, ...)


def batch_indices(n: int, batch: int, seed: int, steps: int):
    """Sample indices of the first ``steps`` training batches.

    The order of ``deq.data.iterate_batches(x, y, batch, seed=seed)`` over as many epochs as
    needed (its own batching, run on ``range(n)``). ``IFT-warm`` needs the indices to find each
    sample's adjoint in its bank.
    """
    ids = np.arange(n)
    epochs = steps // (n // batch) + 1
    batches = iterate_batches(ids, ids, batch, seed=seed, epochs=epochs)
    return (idx for _, idx in itertools.islice(batches, steps))


def update_bank(bank: jax.Array, idx, u: jax.Array) -> jax.Array:
    """The adjoint bank ``(n_train, hidden)`` with the rows of samples ``idx`` replaced by ``u``."""
    return bank.at[jnp.asarray(idx)].set(u)


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


def make_train_step(graphdef, probes, rest, tx, *, warm: bool = False):
    """Jitted ``(params, opt_state, x, y, u) -> (params, opt_state, loss, info, grads, u_new)``.

    ``info`` is the model's (forward statistics) with ``backward_steps``, the mean adjoint steps
    of the batch from the layer's `deq.nn.BackwardProbe` (0 for strategies without an adjoint
    solve). With ``warm=True`` the model is called with ``adjoint_init=u`` and ``u_new`` is the
    gradient with respect to ``u``, the newly solved adjoint; otherwise pass ``u=None`` (then
    ``u_new`` is None).
    """

    def loss_fn(params, probes, u, x, y):
        model = nnx.merge(graphdef, params, probes, rest)
        logits, info = model(x, adjoint_init=u) if warm else model(x)
        return cross_entropy(logits, y), info

    @jax.jit
    def step(params, opt_state, x, y, u):
        (loss, info), (grads, probe_grads, u_new) = jax.value_and_grad(
            loss_fn, argnums=(0, 1, 2), has_aux=True)(params, probes, u, x, y)
        (stats,) = deq.nn.backward_stats(probe_grads).values()
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, loss,
                {**info, "backward_steps": stats.num_steps}, grads, u_new)

    return step


def make_eval(graphdef, probes, rest):
    """Jitted ``(params, x, y) -> accuracy`` (forward solve only)."""

    @jax.jit
    def accuracy(params, x, y):
        logits, _ = nnx.merge(graphdef, params, probes, rest)(x)
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
            point = stats.setdefault("by_point", {})[key] = {"forward_residual_max": 0.0,
                                                              "forward_converged_frac_min": 1.0}
            for xb, yb in batches:
                g, info = grad_fn(p64, jnp.asarray(xb, jnp.float64), jnp.asarray(yb))
                g = jax.block_until_ready(g)
                assert all(l.dtype == jnp.float64 for l in jax.tree_util.tree_leaves(g))
                out[key].append(flat(g))
                point["forward_residual_max"] = max(point["forward_residual_max"], float(info["residual"]))
                point["forward_converged_frac_min"] = min(point["forward_converged_frac_min"],
                                                          float(info["converged_frac"]))
                stats["forward_residual_max"] = max(stats["forward_residual_max"], float(info["residual"]))
                stats["forward_converged_frac_min"] = min(stats["forward_converged_frac_min"],
                                                          float(info["converged_frac"]))
                stats["forward_steps_max"] = max(stats["forward_steps_max"], float(info["forward_steps"]))
        jax.effects_barrier()
    stats["adjoint_nonconvergence_warnings"] = sum(
        issubclass(w.category, deq.NonConvergenceWarning) for w in caught)
    return out, stats


def load_dataset(name: str):
    """``(x_train, y_train, x_test, y_test, description)``, inputs flattened."""
    if name == "digits":
        data, what = load_digits(test_fraction=0.2, seed=0), "sklearn digits via deq.data.load_digits(test_fraction=0.2, seed=0), flattened to 64"
    elif name == "mnist1d":
        data, what = load_mnist1d(), "MNIST-1D via deq.data.load_mnist1d() (4000 signals, seed 0, 20% test), 40 features"
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    flat_x = lambda a: a.reshape(len(a), -1)  # noqa: E731
    return flat_x(data.x_train), data.y_train, flat_x(data.x_test), data.y_test, what


def _timing(ts: np.ndarray, compile_s: float, rounds: int, per_round: int) -> dict[str, Any]:
    q25, q75 = np.percentile(ts, [25, 75])
    return {
        "compile_s": compile_s, "median_s": float(np.median(ts)), "iqr_s": float(q75 - q25),
        "q25_s": float(q25), "q75_s": float(q75),
        "min_s": float(ts.min()), "max_s": float(ts.max()), "mean_s": float(ts.mean()),
        "repeats": int(ts.size), "rounds": rounds, "per_round": per_round, "warmup_per_round": 2,
        "times_s": ts.tolist(),
    }


def run_dataset(dataset: str, profile: str, seed: int) -> dict[str, Any]:
    """Every row's measurements (a), (b), (c) on one data set; see the module docstring."""
    names = strategy_names(profile)
    x_train, y_train, x_test, y_test, data_what = load_dataset(dataset)
    hidden = C.pick(profile, smoke=8, quick=64, full=64)
    # smoke checks the machinery: the cell without norms compiles markedly faster.
    arch = {"in_features": x_train.shape[1], "hidden": hidden, "use_norm": profile != "smoke"}
    batch = C.pick(profile, smoke=16, quick=64, full=64)
    steps = C.pick(profile, smoke=5, quick=300, full=1000)
    rounds = C.pick(profile, smoke=1, quick=5, full=10)
    per_round = C.pick(profile, smoke=3, quick=5, full=5)
    n_cos = C.pick(profile, smoke=1, quick=2, full=4)
    seeds = [seed + i for i in range(C.pick(profile, smoke=1, quick=1, full=3))]
    do_reference = profile != "smoke"
    tx = optax.adam(LR)

    # Fixed cosine batches: the first n_cos batches of the training set, in order.
    cos_idx = [np.arange(i * batch, (i + 1) * batch) for i in range(n_cos)]
    cos_batches = [(x_train[i], y_train[i]) for i in cos_idx]

    models = {s: strategy_model(s, arch, seed) for s in names}
    p0 = models["IFT"][1]
    for s in names:  # same architecture and seed: identical initial parameters
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(models[s][1])))
    n_params = int(sum(np.size(l) for l in jax.tree_util.tree_leaves(p0)))
    steps_fn = {s: make_train_step(*(models[s][i] for i in (0, 2, 3)), tx, warm=s in WARM) for s in names}
    accuracy_fn = make_eval(*(models["IFT"][i] for i in (0, 2, 3)))

    def cold(s, b):
        """The adjoint start of a cold call of row ``s`` on a batch of ``b`` samples."""
        return jnp.zeros((b, hidden), jnp.float32) if s in WARM else None

    results: dict[str, dict[str, Any]] = {s: {"description": describe(s)} for s in names}

    # (b) cost of one training step (first call = compile). IFT-warm is timed with a warm
    # adjoint: the one its previous call on the same batch (at the same parameters) returned.
    xb0, yb0 = jnp.asarray(cos_batches[0][0]), jnp.asarray(cos_batches[0][1])
    opt0 = tx.init(p0)
    u_time = {}
    for s in C.progress(names, desc=f"{dataset}: compile"):
        first = C.time_fn(steps_fn[s], p0, opt0, xb0, yb0, cold(s, batch), warmup=0, repeats=1, clear_caches=False)
        u_time[s] = steps_fn[s](p0, opt0, xb0, yb0, cold(s, batch))[5]
        mem = C.xla_memory(steps_fn[s], p0, opt0, xb0, yb0, u_time[s])
        results[s]["compile_s"] = first["compile_s"]
        results[s]["memory"] = {
            "xla_temp_bytes": None if mem is None else mem.get("temp_size_in_bytes"),
            "xla": mem,
        }
    # Timed calls interleaved over strategies in `rounds` rounds, so that a change of machine
    # load during the benchmark affects every strategy alike; each round is a time_fn call
    # (its first, untimed-for-us call and `warmup` more are warm-up; then `per_round` timed).
    times: dict[str, list[float]] = {s: [] for s in names}
    for _ in C.progress(range(rounds), desc=f"{dataset}: timing", label=lambda r: f"round {r + 1} of every strategy"):
        for s in names:
            t = C.time_fn(steps_fn[s], p0, opt0, xb0, yb0, u_time[s], warmup=1, repeats=per_round, clear_caches=False)
            times[s].extend(t["times_s"])
    for s in names:
        results[s]["timing"] = _timing(np.array(times[s]), results[s]["compile_s"], rounds, per_round)
        info = steps_fn[s](p0, opt0, xb0, yb0, u_time[s])[3]
        results[s]["timing"]["backward_steps"] = float(info["backward_steps"])
        results[s]["timing"]["forward_steps"] = float(info["forward_steps"])
        results[s]["time_per_step_s"] = results[s]["timing"]["median_s"]

    # (c) training: same budget, init and batch order for every strategy.
    trained: dict[str, dict[int, Any]] = {s: {} for s in names}
    banks: dict[str, dict[int, Any]] = {s: {} for s in names}
    for s in names:
        accs, losses = [], []
        for sd in seeds:
            params = strategy_model(s, arch, sd)[1]
            opt = tx.init(params)
            bank = jnp.zeros((len(x_train), hidden), jnp.float32) if s in WARM else None
            hist = []
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", deq.NonConvergenceWarning)
                for idx in batch_indices(len(x_train), batch, sd, steps):
                    u = None if bank is None else bank[idx]
                    params, opt, loss, info, _, u = steps_fn[s](params, opt, jnp.asarray(x_train[idx]),
                                                                jnp.asarray(y_train[idx]), u)
                    if bank is not None:
                        bank = update_bank(bank, idx, u)
                    hist.append((loss, info["forward_steps"], info["converged_frac"], info["backward_steps"]))
                jax.block_until_ready(params)
                jax.effects_barrier()
            train_s = time.perf_counter() - t0
            C.say(f"training: {dataset} {s} seed {sd} done in {train_s:.1f} s ({steps} Adam steps)")
            n_warn = sum(issubclass(w.category, deq.NonConvergenceWarning) for w in caught)
            hist = np.array(jax.device_get(hist), dtype=np.float64)
            tail = hist[-min(20, len(hist)):]
            accs.append(float(accuracy_fn(params, jnp.asarray(x_test), jnp.asarray(y_test))))
            losses.append({"seed": sd, "final_train_loss_last20": float(tail[:, 0].mean()),
                           "forward_steps_last20": float(tail[:, 1].mean()),
                           "forward_steps_mean": float(hist[:, 1].mean()),
                           "converged_frac_last20": float(tail[:, 2].mean()),
                           "backward_steps_last20": float(tail[:, 3].mean()),
                           "backward_steps_mean": float(hist[:, 3].mean()),
                           "nonfinite_loss_steps": int((~np.isfinite(hist[:, 0])).sum()),
                           "train_wall_s": train_s,
                           "adjoint_nonconvergence_warnings": n_warn,
                           "loss_curve": hist[:, 0].tolist()})
            trained[s][sd], banks[s][sd] = params, bank
        results[s]["accuracy"] = float(np.mean(accs))
        results[s]["accuracy_std"] = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        results[s]["accuracies"] = accs
        results[s]["training"] = losses

    # (a) gradient quality against the float64 exact gradient.
    points = {"init": p0, "trained_ift_params": trained["IFT"][seed]}
    points.update({f"trained:{s}": trained[s][seed] for s in names})
    C.say(f"gradient quality ({dataset}): float64 exact gradients ...")
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
            # IFT-warm: from zeros at init; after training from its bank (seed `seed`'s run).
            us = [cold(s, batch) if s not in WARM or label == "init" else banks[s][seed][i] for i in cos_idx]
            grads = [flat(steps_fn[s](points[key], opt0, jnp.asarray(xb), jnp.asarray(yb), u)[4])
                     for (xb, yb), u in zip(cos_batches, us)]
            per_batch = [compare(g, e) for g, e in zip(grads, exact[key])]
            cos[f"{label}_nonfinite_entries"] = int(sum((~np.isfinite(g)).sum() for g in grads))
            cos[label] = float(np.mean([c["cosine"] for c in per_batch]))
            cos[f"{label}_norm_ratio"] = float(np.mean([c["norm_ratio"] for c in per_batch]))
            cos[f"{label}_per_batch"] = per_batch
        results[s]["cosine"] = cos

    settings = {
        "model": f"deq.nn.models.DEQClassifier({arch['in_features']}, {hidden}, 10, use_norm={arch['use_norm']}) (DenseCell)",
        "num_params": n_params, "data": data_what, "in_features": arch["in_features"],
        "n_train": len(x_train), "n_test": len(x_test), "seeds": seeds, "cosine_batches": n_cos,
    }
    rows = []
    for s in names:
        r = results[s]
        fsteps = float(np.mean([t["forward_steps_last20"] for t in r["training"]]))
        rows.append({
            "strategy": s,
            "cos_init": r["cosine"]["init"],
            "cos_trained": r["cosine"]["trained"],
            "cos_ift_params": r["cosine"]["trained_ift_params"],
            "norm_ratio": r["cosine"]["trained_norm_ratio"],
            "ms": 1e3 * r["time_per_step_s"],
            "ms_min": 1e3 * r["timing"]["min_s"],
            "train_ms": 1e3 * float(np.mean([t["train_wall_s"] for t in r["training"]])) / steps,
            "compile": r["compile_s"],
            "temp_kib": None if r["memory"]["xla_temp_bytes"] is None else r["memory"]["xla_temp_bytes"] / 1024,
            "acc": r["accuracy"],
            "acc_std": r["accuracy_std"],
            "fsteps": fsteps,
            "fevals": fsteps * evals_per_step(make_solver(s)),
            "bsteps": float(np.mean([t["backward_steps_mean"] for t in r["training"]])),
        })
    C.print_table(rows, [
        ("strategy", "strategy"), ("cos_init", "cos@init"), ("cos_trained", "cos@trained"),
        ("cos_ift_params", "cos@IFT-trained"), ("norm_ratio", "|g|/|g*| trained"),
        ("ms", "time/step [ms]"), ("ms_min", "min [ms]"), ("train_ms", "in training [ms]"),
        ("compile", "compile [s]"), ("temp_kib", "XLA temp [KiB]"),
        ("acc", "test acc"), ("acc_std", "acc std"), ("fsteps", "fwd steps"), ("fevals", "fwd f evals"),
        ("bsteps", "adjoint steps"),
    ], title=f"Backward strategies on {dataset} ({profile}: hidden {hidden}, batch {batch}, {steps} Adam steps, "
             f"{len(seeds)} seed(s), {n_params} params)")
    print(f"exact gradient: forward residual max {exact_stats['forward_residual_max']:.2e}, "
          f"adjoint non-convergence warnings {exact_stats['adjoint_nonconvergence_warnings']}")
    loose = {k: round(v["forward_converged_frac_min"], 3) for k, v in exact_stats["by_point"].items()
             if v["forward_converged_frac_min"] < 1}
    if loose:
        print("exact gradient not exact (tight float64 forward unconverged for some samples; converged "
              f"fraction of the worst batch) at: {loose}")
    if reference_check:
        print("reference check (exact IFT vs 300-step float64 backprop), cosine:",
              {k: [round(c["cosine"], 12) for c in v] for k, v in reference_check.items()
               if k in ("init", "trained_ift_params")})
    return {"settings": settings, "strategies": results, "exact_gradient_stats": exact_stats,
            "reference_check": reference_check, "table": rows}


def run(profile: str, seed: int, out, no_plot: bool, datasets=None) -> dict[str, Any]:
    t_start, cpu_start, load_start = time.perf_counter(), cpu_seconds(), os.getloadavg()
    datasets = list(datasets or default_datasets(profile))
    names = strategy_names(profile)
    per_dataset = {d: run_dataset(d, profile, seed) for d in datasets}
    first = per_dataset[datasets[0]]["settings"]
    wall = time.perf_counter() - t_start
    cpu = cpu_seconds() - cpu_start
    payload = {
        "benchmark": NAME,
        "profile": profile,
        "command": f"python -m benchmarks.backward --profile {profile} --datasets {','.join(datasets)}",
        "settings": {
            "forward_solver": repr(default_solver()),
            "strategies": {s: describe(s) for s in names},
            "datasets": datasets,
            "batch_size": C.pick(profile, smoke=16, quick=64, full=64),
            "train_steps": C.pick(profile, smoke=5, quick=300, full=1000),
            "optimizer": f"optax.adam({LR})",
            "seeds": first["seeds"], "cosine_batches": first["cosine_batches"],
            "timing_rounds": C.pick(profile, smoke=1, quick=5, full=10),
            "timing_per_round": C.pick(profile, smoke=3, quick=5, full=5),
            "exact_gradient": "float64 (jax.enable_x64), Anderson(rtol=1e-11, atol=1e-12, max_steps=500) "
                              "forward, IFT(Anderson(rtol=1e-11, atol=1e-12, max_steps=500)) adjoint",
            "dtype_strategies": "float32",
            "ift_warm": "adjoint bank (n_train, hidden), zeros at the start, rows of each batch's samples "
                        "replaced by the adjoint solved in that step; time per step measured with the adjoint "
                        "of the previous call on the same batch at the same parameters (optimistic; "
                        "'in training' ms is the training loop's)",
            "reversible_damping": REVERSIBLE_DAMPING,
            "shine_refine": SHINE_REFINE,
        },
        "datasets": per_dataset,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "load_average_1min": {"start": load_start[0], "end": os.getloadavg()[0]},
    }
    path = C.save_json(out, NAME, payload)
    print(f"wrote {path}  ({wall:.1f} s wall, {cpu:.1f} s CPU, load average {os.getloadavg()[0]:.1f})")
    if not no_plot:
        plot(payload, out)
    return payload


def _num(x) -> float:
    """A JSON number, or NaN for null (non-finite values are stored as null)."""
    return float("nan") if x is None else float(x)


def plot(payload: dict[str, Any], out) -> Any:
    """Bar charts (cosine, time per step, step memory, accuracy) from a result payload, one row
    of panels per data set; save the PNG.

    Also usable on a saved result: ``plot(json.load(open("backward.json")), out_dir)``.
    """
    per_dataset, st = payload["datasets"], payload["settings"]
    plt = C.pyplot()
    fig, grid = plt.subplots(len(per_dataset), 4, figsize=(20, 4.8 * len(per_dataset)), squeeze=False)
    for axes, (dataset, res) in zip(grid, per_dataset.items()):
        results = res["strategies"]
        names = list(results)
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
        axes[0].set_title(f"{dataset}: (a) gradient direction (float64 exact)")
        axes[0].legend(fontsize=6.5, loc="upper center", ncol=3, handlelength=1.0, columnspacing=0.8)
        tm = [results[s]["timing"] for s in names]
        ms = [1e3 * t["median_s"] for t in tm]
        quart = [[1e3 * (t["median_s"] - t["q25_s"]) for t in tm], [1e3 * (t["q75_s"] - t["median_s"]) for t in tm]]
        axes[1].bar(xs, ms, yerr=quart, capsize=3, color="tab:orange", label="median (whiskers: 25-75%)")
        axes[1].plot(xs, [1e3 * t["min_s"] for t in tm], "kv", ms=5, label="minimum")
        axes[1].legend(fontsize=7)
        axes[1].set_ylabel("time per training step [ms]")
        axes[1].set_title(f"{dataset}: (b1) step time (compile excluded)")
        temp = [(results[s]["memory"]["xla_temp_bytes"] or 0) / 1024 for s in names]
        axes[2].bar(xs, temp, color="tab:purple")
        axes[2].set_yscale("log")
        axes[2].set_ylabel("XLA temp memory of the step [KiB]")
        axes[2].set_title(f"{dataset}: (b2) step memory")
        acc = [100 * results[s]["accuracy"] for s in names]
        err = [100 * results[s]["accuracy_std"] for s in names]
        axes[3].bar(xs, acc, yerr=err, capsize=3, color="tab:green")
        for i, s in enumerate(names):
            axes[3].plot([i] * len(results[s]["accuracies"]), [100 * a for a in results[s]["accuracies"]], "k.", ms=5)
        lowest = min(100 * a for s in names for a in results[s]["accuracies"])  # every seed's point in view
        axes[3].set_ylim(max(0.0, min(min(acc), lowest) - 5), 100)
        axes[3].set_ylabel("test accuracy [%]")
        axes[3].set_title(f"{dataset}: (c) after {st['train_steps']} Adam steps, {len(st['seeds'])} seed(s)")
        for ax in axes:
            ax.set_xticks(xs, names, fontsize=8, rotation=30, ha="right")
            ax.grid(True, axis="y", alpha=0.3)
    backend = payload.get("environment", {}).get("jax_backend") or C.environment()["jax_backend"]
    models = "; ".join(f"{d}: {r['settings']['model']}" for d, r in per_dataset.items())
    fig.suptitle(f"{models}; float32, batch {st['batch_size']}, {backend}", fontsize=10)
    fig.tight_layout()
    return C.save_figure(fig, out, NAME)


def main(argv=None) -> None:
    args = parse_args(argv)
    C.smoke_notice(args.profile, NAME)
    run(args.profile, args.seed, args.out, args.no_plot, args.datasets)
    C.smoke_notice(args.profile, NAME, end=True)


if __name__ == "__main__":
    main()
