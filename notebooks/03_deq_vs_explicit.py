# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · A DEQ against its explicit twins
#
# Is an "infinitely deep" weight-tied network worth it? Bai, Kolter & Koltun (*Deep Equilibrium
# Models*, NeurIPS 2019) argue that a DEQ matches explicit networks of similar size while its
# training memory does not grow with depth. This notebook puts that to a small test on the
# digits data set (8x8 images, 1,438 training and 359 test images), with three models that share
# the same encoder, the same cell type (`deq.nn.DenseCell`) and the same head:
#
# * `deq.nn.DEQClassifier`: the fixed point `z* = f(z*, u)` (Anderson forward, IFT backward);
# * `deq.nn.UnrolledClassifier`: the *same* cell applied 6 times with tied weights, trained by
#   ordinary backprop (identical parameter count);
# * `deq.nn.ResNetClassifier.matched`: 6 *different* cells (a residual network), narrowed so
#   that its parameter count matches the DEQ's.
#
# The budget is deliberately short (250 optimizer steps each), so read the numbers as a sketch,
# not a benchmark; `python -m benchmarks.deq_vs_explicit` in the repository runs the full study.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import deq
import deq.train

data = deq.data.load_digits()
hidden, depth = 32, 6
# Anderson forward (rtol 1e-3, at most 30 steps) and IFT backward with an Anderson adjoint solve;
# the adjoint gets up to 60 steps, since a few samples need more than the default 30.
backward = deq.IFT(solver=deq.Anderson(rtol=1e-3, atol=1e-6, max_steps=60))
deq_model = deq.nn.DEQClassifier(64, hidden, 10, rngs=nnx.Rngs(0), backward=backward)
models = {
    "DEQ": deq_model,
    f"Unrolled (tied, depth {depth})": deq.nn.UnrolledClassifier(64, hidden, 10, depth=depth, rngs=nnx.Rngs(0)),
    f"ResNet (untied, depth {depth})": deq.nn.ResNetClassifier.matched(
        deq.nn.count_params(deq_model), 64, 10, depth=depth, rngs=nnx.Rngs(0)),
}
print(deq.nn.param_table(models))
print("ResNet width:", models[f"ResNet (untied, depth {depth})"].hidden, "| DEQ and Unrolled width:", hidden)

# %% [markdown]
# ## Training side by side
#
# Each model is trained with `deq.train.fit` (Adam, learning rate 3e-3 with cosine decay,
# batch 64) for 250 steps, and evaluated on the test split every 50 steps. `fit` records the wall
# time of every step; the first step includes compilation, so below the time axis counts only
# the steps after it (the first one is charged at the median step time).

# %%
config = deq.train.TrainConfig(learning_rate=3e-3, total_steps=250, batch_size=64,
                               eval_every=50, progress=False)
histories = {}
for name, model in models.items():
    histories[name] = h = deq.train.fit(model, data, config)
    print(f"{name:<28} test accuracy {h.test_accuracy:.3f}   "
          f"{1e3 / h.steps_per_second:6.1f} ms per training step   (fit took {h.run_time:.0f} s)")
print("DEQ: lowest fraction of a training batch whose forward solve converged:",
      histories["DEQ"].metric("converged_frac").min())


def train_seconds(h):
    t = h.metric("step_time")
    t[0] = np.median(t[1:])  # the first step is mostly compilation
    return np.cumsum(t)


fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for name, h in histories.items():
    clock = train_seconds(h)
    eval_steps = h.metric("step", "eval").astype(int)
    axes[0].plot(clock[eval_steps - 1], h.metric("accuracy", "eval"), "o-", label=name)
    axes[1].plot(h.metric("step"), h.metric("loss"), alpha=0.8, label=name)
axes[0].set_title("Test accuracy against training time")
axes[0].set_xlabel("training time (s, excluding compilation)")
axes[0].set_ylabel("test accuracy")
axes[0].legend()
axes[1].set_title("Training loss (per batch)")
axes[1].set_xlabel("optimizer step")
axes[1].set_ylabel("cross-entropy")
axes[1].set_yscale("log")
axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The three reach similar accuracy on this easy task. The DEQ's step is typically the most
# expensive, because every step runs a forward solve *and* an adjoint solve, each of several
# cell evaluations. If `NonConvergenceWarning` lines appear above, they are `deq` being explicit
# about the odd sample whose solve stopped short of its tolerance (`max_steps=30` forward,
# 60 for the adjoint): the forward solve then returns its lowest-residual iterate and the
# gradient uses the best adjoint iterate, which is harmless for training; only the first five
# warnings are shown. Unlike the explicit nets, the DEQ chooses its own depth: the number of forward
# solver steps needed to reach the tolerance (`rtol=1e-3`), which tends to grow as the cell
# learns a less contractive map (notebook 05 shows how Jacobian regularization counters this).

# %%
h = histories["DEQ"]
fig, ax = plt.subplots(figsize=(6.5, 3.6))
ax.plot(h.metric("step"), h.metric("forward_steps"), label="DEQ: Anderson steps (batch mean)")
ax.axhline(depth, color="C1", linestyle="--", label=f"explicit twins: {depth} cell evaluations")
ax.set_title("Forward cell evaluations per training step")
ax.set_xlabel("optimizer step")
ax.set_ylabel("forward solver steps")
ax.set_ylim(0, None)
ax.legend()
plt.show()

# %% [markdown]
# ## Memory against depth
#
# Backpropagation through an unrolled network stores the activations of every layer, so its
# memory grows linearly with depth; the implicit (IFT) backward pass of a DEQ stores only the
# fixed point and the parameters, whatever the number of solver steps. We measure it without
# running anything: `jax.jit(grad).lower(...).compile().memory_analysis()` reports the temporary
# buffers XLA allocates for one gradient evaluation. The cell is a 256-wide tanh layer on a batch
# of 256, solved with exactly `K` steps of plain iteration (tolerances set so it never stops
# early), and differentiated either by unrolling (`deq.Unrolled()`, i.e. a `K`-layer weight-tied
# network) or by the IFT (`deq.IFT`).

# %%
width, batch = 256, 256
kw, kx = jax.random.split(jax.random.key(1))
mem_params = {"W": 0.5 * jax.random.normal(kw, (width, width)) / jnp.sqrt(width),
              "x": jax.random.normal(kx, (batch, width))}


def cell(z, p):
    return jnp.tanh(z @ p["W"] + p["x"])


def temp_megabytes(K, backward):
    solver = deq.FixedPointIteration(max_steps=K, rtol=0.0, atol=1e-30)  # exactly K steps

    def loss(p):
        z = deq.fixed_point(cell, jnp.zeros((batch, width)), p, solver=solver,
                            backward=backward, batch_axis=0).value
        return jnp.sum(z ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(mem_params).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


depths = [4, 8, 16, 32]
ift_backward = deq.IFT(solver=deq.FixedPointIteration(max_steps=30))
memory = {"DEQ, IFT backward": [temp_megabytes(K, ift_backward) for K in depths],
          "unrolled, backprop through K steps": [temp_megabytes(K, deq.Unrolled()) for K in depths]}
for name, mb in memory.items():
    print(f"{name:<36}", "  ".join(f"K={K}: {m:5.1f} MB" for K, m in zip(depths, mb)))

fig, ax = plt.subplots(figsize=(6.5, 3.6))
for name, mb in memory.items():
    ax.plot(depths, mb, "o-", label=name)
ax.set_title("Training memory against depth (XLA temp buffers)")
ax.set_xlabel("depth K (forward steps)")
ax.set_ylabel("temporary memory per gradient (MB)")
ax.set_xscale("log", base=2)
ax.set_xticks(depths, [str(K) for K in depths])
ax.legend()
plt.show()

# %% [markdown]
# ## Accuracy against the inference budget
#
# A trained DEQ is not tied to the depth it was trained at: at inference you may stop the
# solver early to save time, and accuracy degrades gracefully. Every `deq.nn.DEQ` call accepts a
# per-call `solver=` override and a runtime step budget `max_steps=k` (a traced integer up to
# the solver's own `max_steps`, so every budget reuses one compiled solve); here we re-run the
# trained DEQ's layer on the whole test split for a few budgets `k`, and mark the explicit
# twins' accuracy for reference.

# %%
deq_model.eval()
u_test = deq_model.encoder(data.x_test.reshape(len(data.x_test), -1))
budgets = [1, 2, 4, 8, 16]
capped = deq.Anderson(rtol=1e-3, atol=1e-5, max_steps=max(budgets))
accuracy = []
for k in budgets:
    sol = deq_model.deq(u_test, solver=capped, max_steps=k, return_solution=True)
    acc = float(jnp.mean(jnp.argmax(deq_model.head(sol.value), -1) == data.y_test))
    accuracy.append(acc)
    print(f"max_steps={k:2d}: test accuracy {acc:.3f}, mean steps used {float(sol.stats.num_steps.mean()):4.1f}, "
          f"converged {float(sol.stats.converged.mean()):.0%}")

fig, ax = plt.subplots(figsize=(6.5, 3.6))
ax.plot(budgets, accuracy, "o-", label="DEQ, Anderson with budget max_steps=k")
for i, (name, h) in enumerate(histories.items()):
    if name != "DEQ":
        ax.axhline(h.test_accuracy, color=f"C{i}", linestyle="--", label=name)
ax.set_title("DEQ test accuracy against the solver budget at inference")
ax.set_xlabel("maximum solver steps k")
ax.set_ylabel("test accuracy")
ax.set_xscale("log", base=2)
ax.set_xticks(budgets, [str(k) for k in budgets])
ax.legend()
plt.show()

# %% [markdown]
# **What to take away.** At equal parameters the DEQ is competitive in accuracy, costs more
# time per training step (two solves), adapts its depth to the input, trains in constant memory
# in the depth, and lets you trade accuracy for speed at inference by capping the solver.
# Bai et al. (2019) report the same picture at scale on language modelling.
