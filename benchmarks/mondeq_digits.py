"""Monotone operator equilibrium network (monDEQ) on scikit-learn's digits: accuracy with guarantees.

Run ``python -m benchmarks.mondeq_digits --profile smoke|quick|full`` (``--out DIR``, ``--seed``,
``--no-plot``). Writes ``mondeq_digits.json`` and ``mondeq_digits.png`` to ``--out``.

Model and data: ``deq.monotone.MonDEQClassifier(64, hidden, 10, m=1.0)`` (digits flattened to 64
features in ``[0, 1]``, fixed 80/20 split with seed 0): the equilibrium
``z* = relu(W z* + U x + b)`` with ``W = (1 - m) I - A^T A + B - B^T`` (so ``I - W ⪰ m I``),
then a linear head. Forward solve: ``PeacemanRachford(alpha=1, rtol=1e-4, atol=1e-6,
max_steps=200)`` (an LU of ``I + alpha (I - W)`` per forward pass); backward: the same
splitting on the adjoint problem. Adam with a cosine learning-rate decay, batch 64.

Measured:

* test accuracy after training (the target of the issue: >= 95%);
* non-converged solves: forward solves (samples) that did not meet the tolerance in
  ``max_steps``, counted over every training step and over the test evaluation, and backward
  (adjoint) solves, counted from the ``deq.NonConvergenceWarning``\\ s raised by the adjoint
  (target: zero of each);
* the trained model's test set solved again with forward-backward splitting
  (``ForwardBackward()``, automatic step ``m / L^2``): steps, convergence, and the largest
  difference to the Peaceman-Rachford equilibria (the equilibrium is unique, so both must
  agree);
* plain fixed-point iteration ``z <- relu(W z + U x + b)`` (``deq.fixed_point`` with
  ``deq.FixedPointIteration(max_steps=200)``) on the trained weights: the fraction of test
  samples it solves, for contrast (the monotone parametrization does not make plain iteration
  convergent);
* times: whole training, compile time of the training step, and the test-set forward pass
  (``_common.time_fn``: first call apart, median of repeats).
"""

from __future__ import annotations

from benchmarks import _common as C

NAME = "mondeq_digits"


def parse_args(argv=None):
    """The command line; it needs no JAX, so ``--help`` answers before the imports below."""
    return C.make_parser(__doc__.splitlines()[0], name=NAME).parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and bad arguments answer here, before JAX is imported; main() reparses

import re
import time
import warnings

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import deq
from deq.data import iterate_batches, load_digits
from deq.monotone import ForwardBackward, MonDEQClassifier, PeacemanRachford, monotone_fixed_point
M = 1.0
BATCH = 64


def forward_method() -> PeacemanRachford:
    """The forward (and backward) splitting of the benchmark."""
    return PeacemanRachford(alpha=1.0, rtol=1e-4, atol=1e-6, max_steps=200)


def count_warned(records) -> tuple[int, int]:
    """(batches, samples) reported non-converged by adjoint NonConvergenceWarnings."""
    batches = samples = 0
    for w in records:
        if issubclass(w.category, deq.NonConvergenceWarning):
            batches += 1
            found = re.search(r"for (\d+) of \d+ sample", str(w.message))
            samples += int(found.group(1)) if found else 1
    return batches, samples


def train(ds, *, hidden: int, epochs: int, lr: float, seed: int, max_train: int | None):
    """Train the classifier; returns (model, per-epoch history, totals)."""
    x_train, y_train = ds.x_train, ds.y_train
    if max_train is not None:
        x_train, y_train = x_train[:max_train], y_train[:max_train]
    x_train = x_train.reshape(len(x_train), -1)
    x_test = ds.x_test.reshape(len(ds.x_test), -1)
    steps_per_epoch = len(x_train) // BATCH
    model = MonDEQClassifier(64, hidden, ds.num_classes, m=M, method=forward_method(), rngs=nnx.Rngs(seed))
    schedule = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
    opt = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt, x, y):
        def loss_fn(model):
            logits, info = model(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (info, jnp.mean(logits.argmax(-1) == y))

        (loss, (info, acc)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss, acc, info

    @nnx.jit
    def evaluate(model, x, y):
        logits, info = model(x)
        return jnp.mean(logits.argmax(-1) == y), info

    history = []
    fwd_nonconv = 0
    compile_s = None
    t_start = time.perf_counter()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", deq.NonConvergenceWarning)
        batches = iterate_batches(x_train, y_train, BATCH, seed=seed, epochs=epochs)
        for epoch in range(epochs):
            losses, accs, steps, nonconv = [], [], [], 0
            for _ in range(steps_per_epoch):
                xb, yb = next(batches)
                t0 = time.perf_counter()
                loss, acc, info = train_step(model, opt, jnp.asarray(xb), jnp.asarray(yb))
                if compile_s is None:
                    jax.block_until_ready(loss)
                    compile_s = time.perf_counter() - t0
                losses.append(float(loss))
                accs.append(float(acc))
                steps.append(float(info["forward_steps"]))
                nonconv += int(round((1.0 - float(info["converged_frac"])) * len(xb)))
            test_acc, test_info = evaluate(model, jnp.asarray(x_test), jnp.asarray(ds.y_test))
            fwd_nonconv += nonconv
            history.append({
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                "train_acc": float(np.mean(accs)),
                "test_acc": float(test_acc),
                "train_forward_steps": float(np.mean(steps)),
                "test_forward_steps": float(test_info["forward_steps"]),
                "train_forward_nonconverged": nonconv,
                "elapsed_s": time.perf_counter() - t_start,
            })
            C.say(f"training: monDEQ seed {seed} epoch {epoch + 1}/{epochs} done "
                  f"({history[-1]['elapsed_s']:.1f} s, test accuracy {float(test_acc):.1%})")
        jax.effects_barrier()
    train_s = time.perf_counter() - t_start
    bwd_batches, bwd_samples = count_warned(records)
    totals = {
        "train_s": train_s,
        "train_step_compile_s": compile_s,
        "train_steps": epochs * steps_per_epoch,
        "train_samples": len(x_train),
        "train_forward_solves": epochs * steps_per_epoch * BATCH,
        "train_forward_nonconverged": fwd_nonconv,
        "train_backward_nonconverged_batches": bwd_batches,
        "train_backward_nonconverged_samples": bwd_samples,
    }
    return model, history, totals


def evaluate_trained(model, ds):
    """Test accuracy and solve statistics of the trained model: PR, FB and plain iteration."""
    x = jnp.asarray(ds.x_test.reshape(len(ds.x_test), -1))
    y = np.asarray(ds.y_test)
    op = model.deq.operator()
    W = op.weight()

    pr = monotone_fixed_point(op, x, method=forward_method())
    fb = monotone_fixed_point(op, x, method=ForwardBackward(rtol=1e-4, atol=1e-6, max_steps=5000))
    head = lambda z: np.asarray(model.head(z)).argmax(-1)
    plain = deq.fixed_point(
        lambda z, c: jax.nn.relu(z @ W.T + c), jnp.zeros((len(y), model.deq.hidden)), op.inject(x),
        solver=deq.FixedPointIteration(rtol=1e-4, atol=1e-6, max_steps=200), batch_axis=0,
    )
    L = float(op.lipschitz())
    eig_min = float(jnp.linalg.eigvalsh(jnp.eye(W.shape[0]) - (W + W.T) / 2).min())
    forward = nnx.jit(lambda m, x: m(x)[0])
    timing = C.time_fn(forward, model, x, warmup=2, repeats=10, clear_caches=False)
    res = {
        "test_acc": float(np.mean(head(pr.value) == y)),
        "test_forward_nonconverged": int(np.sum(~np.asarray(pr.stats.converged))),
        "test_samples": int(len(y)),
        "pr": {
            "mean_steps": float(np.mean(pr.stats.num_steps)),
            "max_steps": int(np.max(pr.stats.num_steps)),
            "converged_frac": float(np.mean(pr.stats.converged)),
            "max_residual": float(np.max(pr.stats.residual_norm)),
        },
        "fb": {
            "alpha": M / L**2,
            "mean_steps": float(np.mean(fb.stats.num_steps)),
            "max_steps": int(np.max(fb.stats.num_steps)),
            "converged_frac": float(np.mean(fb.stats.converged)),
            "test_acc": float(np.mean(head(fb.value) == y)),
            "max_abs_diff_to_pr": float(jnp.max(jnp.abs(fb.value - pr.value))),
        },
        "plain_iteration": {
            "converged_frac": float(np.mean(plain.stats.converged)),
            "mean_steps": float(np.mean(plain.stats.num_steps)),
        },
        "W": {"lipschitz_I_minus_W": L, "min_eig_sym_I_minus_W": eig_min, "m": M,
              "spectral_norm_W": float(jnp.linalg.norm(W, 2))},
        "test_forward_time": timing,
        "histories": {
            "pr": np.asarray(pr.stats.residual_history[:8]),
            "fb": np.asarray(fb.stats.residual_history[:8, :2001]),
            "plain": np.asarray(plain.stats.residual_history[:8]),
        },
    }
    return res


def plot(history, ev, summary, out_dir):
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ep = [h["epoch"] for h in history]
    ax = axes[0]
    ax.plot(ep, [h["train_acc"] for h in history], "o-", ms=3, label="train")
    ax.plot(ep, [h["test_acc"] for h in history], "o-", ms=3, label="test")
    ax.axhline(0.95, color="gray", ls=":", label="target 95%")
    ax.set(xlabel="epoch", ylabel="accuracy", title="monDEQ on digits (Peaceman-Rachford)")
    ax.legend()
    ax = axes[1]
    ax.plot(ep, [h["train_forward_steps"] for h in history], "o-", ms=3, label="train (mean)")
    ax.plot(ep, [h["test_forward_steps"] for h in history], "o-", ms=3, label="test (mean)")
    ax2 = ax.twinx()
    ax2.bar(ep, [h["train_forward_nonconverged"] for h in history], alpha=0.3, color="red")
    ax2.set_ylabel("non-converged forward solves", color="red")
    ax2.set_ylim(0, max(1, max(h["train_forward_nonconverged"] for h in history)) * 1.2)
    ax.set(xlabel="epoch", ylabel="forward splitting steps", title="solver steps per epoch")
    ax.legend(loc="upper left")
    ax.text(0.98, 0.04, f"non-converged solves: train forward {summary['train_forward_nonconverged']}, "
            f"train backward {summary['train_backward_nonconverged']}, test {summary['test_forward_nonconverged']}",
            transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
    ax = axes[2]
    fb_label = f"forward-backward (alpha = m/L^2 = {ev['fb']['alpha']:.2g})"
    for key, color, label in (("pr", "C0", "Peaceman-Rachford (alpha = 1)"), ("fb", "C1", fb_label),
                              ("plain", "C3", "plain iteration z <- relu(Wz + Ux + b)")):
        for i, h in enumerate(ev["histories"][key]):
            ax.semilogy(h, color=color, alpha=0.6, label=label if i == 0 else None)
    ax.set(xlabel="step", ylabel="||relu(Wz + Ux + b) - z||",
           title=f"8 test solves, trained model (test acc {summary['test_acc']:.1%})")
    ax.set_xscale("symlog", linthresh=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return C.save_figure(fig, out_dir, NAME)


def main(argv=None):
    args = parse_args(argv)
    C.smoke_notice(args.profile, NAME)
    hidden = C.pick(args.profile, smoke=32, quick=128, full=200)
    epochs = C.pick(args.profile, smoke=1, quick=15, full=40)
    max_train = C.pick(args.profile, smoke=256, quick=None, full=None)
    lr = 3e-3
    C.seed_everything(args.seed)
    ds = load_digits(test_fraction=0.2, seed=0)

    model, history, totals = train(ds, hidden=hidden, epochs=epochs, lr=lr, seed=args.seed,
                                   max_train=max_train)
    ev = evaluate_trained(model, ds)
    nonconv_total = (totals["train_forward_nonconverged"] + totals["train_backward_nonconverged_samples"]
                     + ev["test_forward_nonconverged"])
    summary = {
        "test_acc": ev["test_acc"],
        "nonconverged_total": nonconv_total,
        "train_forward_nonconverged": totals["train_forward_nonconverged"],
        "train_backward_nonconverged": totals["train_backward_nonconverged_samples"],
        "test_forward_nonconverged": ev["test_forward_nonconverged"],
        "train_s": totals["train_s"],
        "target_met": bool(ev["test_acc"] >= 0.95 and nonconv_total == 0),
    }
    C.print_table(
        [{"epoch": h["epoch"], "loss": h["train_loss"], "train_acc": h["train_acc"], "test_acc": h["test_acc"],
          "steps": h["train_forward_steps"], "nonconv": h["train_forward_nonconverged"], "t": h["elapsed_s"]}
         for h in history],
        ["epoch", "loss", "train_acc", "test_acc", ("steps", "PR steps"), ("nonconv", "non-conv"), ("t", "time (s)")],
        title=f"monDEQ digits, profile={args.profile}, hidden={hidden}, m={M}",
    )
    C.print_table(
        [{"solver": "Peaceman-Rachford", "steps": ev["pr"]["mean_steps"], "max": ev["pr"]["max_steps"],
          "conv": ev["pr"]["converged_frac"], "acc": ev["test_acc"]},
         {"solver": "forward-backward", "steps": ev["fb"]["mean_steps"], "max": ev["fb"]["max_steps"],
          "conv": ev["fb"]["converged_frac"], "acc": ev["fb"]["test_acc"]},
         {"solver": "plain iteration", "steps": ev["plain_iteration"]["mean_steps"], "max": None,
          "conv": ev["plain_iteration"]["converged_frac"], "acc": None}],
        ["solver", ("steps", "mean steps"), ("max", "max steps"), ("conv", "converged"), ("acc", "test acc")],
        title="test set, trained model",
    )
    C.print_table([summary], list(summary), title="summary")
    payload = {
        "benchmark": NAME,
        "command": f"python -m benchmarks.{NAME} --profile {args.profile} --seed {args.seed}",
        "settings": {
            "profile": args.profile, "seed": args.seed, "hidden": hidden, "m": M, "epochs": epochs,
            "batch_size": BATCH, "lr": lr, "schedule": "cosine", "optimizer": "adam",
            "max_train": max_train, "method": repr(forward_method()), "backward": "same as method",
            "dataset": "sklearn digits (flattened 64 features), test_fraction=0.2, split seed 0",
        },
        "summary": summary,
        "training": totals,
        "history": history,
        "evaluation": ev,
    }
    path = C.save_json(args.out, NAME, payload)
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(history, ev, summary, args.out)}")
    C.smoke_notice(args.profile, NAME, end=True)
    return payload


if __name__ == "__main__":
    main()
