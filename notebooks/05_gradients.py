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
# # 05 · Gradients: implicit, phantom, Jacobian-free, unrolled, and Jacobian regularization
#
# The forward solve of a DEQ finds `z*`; the backward pass must supply `∂L/∂θ` through it.
# `deq` offers four strategies, chosen with `backward=`:
#
# * `deq.IFT()`: the exact implicit gradient (Bai, Kolter & Koltun, *Deep Equilibrium Models*,
#   NeurIPS 2019), from one linear fixed-point solve `u = Jᵀu + ∂L/∂z*` with
#   vector-Jacobian products;
# * `deq.PhantomGrad(steps=K, damping=λ)`: differentiate `K` damped steps started at `z*`
#   (Geng, Zhang, Bai, Wang & Lin, *On training implicit models*, NeurIPS 2021), an
#   approximation that needs no linear solve;
# * `deq.JFB()`: Jacobian-free backpropagation, `(I - J)⁻¹` replaced by `I`, i.e. one step
#   (Fung, Heaton, Li, McKenzie, Osher & Yin, *JFB: Jacobian-free backpropagation for implicit
#   networks*, AAAI 2022);
# * `deq.Unrolled()`: ordinary backprop through every solver step, whose memory grows with the
#   number of steps (the reference an explicit network would use).
#
# We compare their accuracy (cosine with the exact gradient) and their cost, then show how
# Jacobian regularization (Bai, Koltun & Kolter, *Stabilizing Equilibrium Models by Jacobian
# Regularization*, ICML 2021) keeps the forward solves short during training.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import deq
import deq.train

# %% [markdown]
# ## A test problem with a known exact gradient
#
# A batch of 64 samples, `z* = tanh(W z* + U x + b)` with a 64-dimensional state, and the loss
# `L = ||z* R - t||² / 2B` for a fixed readout `R` and target `t`. The approximate gradients
# are good when the cell is strongly contractive and degrade as `||∂f/∂z||` approaches 1, so we
# use a symmetric `W` at two scales, `||W||_2 = 0.5` and `||W||_2 = 0.95`, and small inputs that
# keep tanh near its linear range (so that `∂f/∂z ≈ W`).
#
# The exact gradient is computed densely, independently of `deq`'s backward pass: for each
# sample, the Jacobian `J = ∂f/∂z` at `z*` is built with `jax.jacobian`, the adjoint
# `u = (I - Jᵀ)⁻¹ ∂L/∂z*` is obtained with `jnp.linalg.solve`, and `∂L/∂θ` is the
# vector-Jacobian product of `f(z*, θ)` with `u`.

# %%
B, n, d, c = 64, 64, 16, 10
keys = jax.random.split(jax.random.key(0), 6)
G = jax.random.normal(keys[0], (n, n))
G = (G + G.T) / 2  # symmetric: its spectral radius equals its norm
x = jax.random.normal(keys[1], (B, d))
R = jax.random.normal(keys[2], (n, c)) / jnp.sqrt(n)
t = jax.random.normal(keys[3], (B, c))


def f(z, p):
    return jnp.tanh(z @ p["W"].T + p["x"] @ p["U"].T + p["b"])


def make_params(scale):
    return {"W": scale * G / jnp.linalg.norm(G, 2), "U": 0.3 * jax.random.normal(keys[4], (n, d)) / jnp.sqrt(d),
            "b": jnp.zeros(n), "x": x}


def loss_of_z(z):
    return 0.5 * jnp.sum((z @ R - t) ** 2) / B


forward = deq.Anderson(rtol=1e-6, atol=1e-7, max_steps=100)


def exact_grad(p):
    z = deq.fixed_point(f, jnp.zeros((B, n)), p, solver=forward, batch_axis=0).value
    g = jax.grad(loss_of_z)(z)
    jac = jax.vmap(jax.jacobian(lambda zi, xi: f(zi[None], {**p, "x": xi[None]})[0]))(z, x)  # (B, n, n)
    u = jnp.linalg.solve(jnp.eye(n) - jnp.swapaxes(jac, 1, 2), g[..., None])[..., 0]
    _, vjp = jax.vjp(lambda q: f(z, q), p)
    return vjp(u)[0]


strategies = {
    "IFT": deq.IFT(solver=deq.Anderson(rtol=1e-6, atol=1e-8, max_steps=100)),
    "PhantomGrad(5)": deq.PhantomGrad(steps=5, damping=0.5),
    "PhantomGrad(20)": deq.PhantomGrad(steps=20, damping=0.5),
    "JFB": deq.JFB(),
    "Unrolled": deq.Unrolled(),
}


def make_grad_fn(backward):
    def loss(p):
        return loss_of_z(deq.fixed_point(f, jnp.zeros((B, n)), p, solver=forward,
                                         backward=backward, batch_axis=0).value)

    return jax.jit(jax.grad(loss))


def cosine(a, b):
    a = jnp.concatenate([jnp.ravel(a[k]) for k in ("W", "U", "b")])
    b = jnp.concatenate([jnp.ravel(b[k]) for k in ("W", "U", "b")])
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def median_time(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


scales = (0.5, 0.95)
grad_fns = {name: make_grad_fn(bw) for name, bw in strategies.items()}
cosines = {s: {} for s in scales}
seconds = {s: {} for s in scales}
for s in scales:
    p = make_params(s)
    exact = exact_grad(p)
    for name, fn in grad_fns.items():
        cosines[s][name] = cosine(fn(p), exact)
        seconds[s][name] = median_time(fn, p)

print(f"{'strategy':<16}" + "".join(f"  cos (||W||={s})  ms/grad (||W||={s})" for s in scales))
for name in strategies:
    print(f"{name:<16}" + "".join(f"  {cosines[s][name]:14.5f}  {1e3 * seconds[s][name]:18.2f}" for s in scales))

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
names = list(strategies)
pos = np.arange(len(names))
for i, s in enumerate(scales):
    axes[0].bar(pos + (i - 0.5) * 0.38, [cosines[s][k] for k in names], width=0.38, label=f"||W||_2 = {s}")
    axes[1].bar(pos + (i - 0.5) * 0.38, [1e3 * seconds[s][k] for k in names], width=0.38, label=f"||W||_2 = {s}")
axes[0].set_title("Agreement with the exact gradient")
axes[0].set_ylabel("cosine similarity")
axes[0].set_ylim(np.floor(20 * min(min(v.values()) for v in cosines.values())) / 20 - 0.05, 1.02)
axes[1].set_title("Cost of one gradient (forward + backward)")
axes[1].set_ylabel("milliseconds (median of 5)")
axes[1].set_yscale("log")
for ax in axes:
    ax.set_xticks(pos, names, rotation=15)
    ax.set_xlabel("backward strategy")
handles, labels = axes[0].get_legend_handles_labels()
fig.legend(handles, labels, loc="lower center", ncol=2)
fig.tight_layout(rect=(0, 0.07, 1, 1))
plt.show()

# %% [markdown]
# The IFT gradient matches the exact one to float32 precision at both scales, and so does
# unrolling (the forward solve converged, so backprop through its steps differentiates the
# same function), at a much higher cost in memory (notebook 03) and in time: `deq.Unrolled`
# runs all `max_steps` (here 100) solver steps under `lax.scan`, masked after convergence, so
# that reverse-mode differentiation can traverse them. The cheap
# approximations are excellent for the strongly contractive cell and degrade as the cell gets
# closer to non-contractive: JFB keeps only the first term `I` of the Neumann series
# `(I - J)⁻¹ = I + J + J² + ...`, the phantom gradient keeps a damped version of its first `K`
# terms. Both remain descent directions in practice (the cosine stays well above 0), which is
# why they train well in Geng et al. (2021) and Fung et al. (2022) at a fraction of the cost.
#
# ## Jacobian regularization keeps the solver fast
#
# During training, nothing stops the cell from becoming less contractive, and the forward solver
# then needs more and more steps. Bai, Koltun & Kolter (2021) add the penalty
# `γ ||∂f/∂z||_F² / n` at the fixed point, estimated with one random probe (Hutchinson's
# estimator: `E ||vᵀ J||² = ||J||_F²`), which costs one vector-Jacobian product.
# `deq.jacobian_penalty(cell, z*, x, key)` computes it for an NNX cell (`deq.jacobian_frobenius`
# for a plain function). With `deq.train.fit` it is passed as `aux_loss_fn(model, x, key)` and
# weighted by `TrainConfig.jacobian_reg`.
#
# We train the same tanh DEQ on digits twice for 300 steps, without and with the penalty
# (`γ = 3`), starting from a cell with `||W||_2 ≈ 2` (contractive only where tanh saturates, if
# at all, so its solves start long), and record the number of Anderson steps of every forward
# solve.

# %%
data = deq.data.load_digits()
hidden = 64


class TanhCell(nnx.Module):
    def __init__(self, hidden, *, rngs):
        init = nnx.initializers.normal(1.0 / np.sqrt(hidden))
        self.W = nnx.Linear(hidden, hidden, use_bias=False, kernel_init=init, rngs=rngs)

    def init_state(self, u):
        return jnp.zeros_like(u)

    def __call__(self, z, u):
        return jnp.tanh(self.W(z) + u)


class DigitsDEQ(nnx.Module):
    def __init__(self, *, rngs):
        self.encoder = nnx.Linear(64, hidden, rngs=rngs)
        self.deq = deq.nn.DEQ(TanhCell(hidden, rngs=rngs),
                              solver=deq.Anderson(rtol=1e-3, atol=1e-5, max_steps=40),
                              backward=deq.IFT(solver=deq.Anderson(rtol=1e-3, atol=1e-6, max_steps=60)))
        self.head = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        u = self.encoder(x.reshape(x.shape[0], -1))
        sol = self.deq(u, return_solution=True)
        return self.head(sol.value), deq.nn.solution_info(sol)


def jacobian_reg(model, x, key):
    """||df/dz||_F^2 / n at the fixed point (one Hutchinson probe); z* is held constant."""
    u = model.encoder(x.reshape(x.shape[0], -1))
    z_star = model.deq(u)
    return deq.jacobian_penalty(model.deq.cell, z_star, u, key) / hidden


runs = {}
for gamma in (0.0, 3.0):
    model = DigitsDEQ(rngs=nnx.Rngs(0))
    config = deq.train.TrainConfig(learning_rate=1e-2, total_steps=300, batch_size=64,
                                   jacobian_reg=gamma, progress=False)
    history = deq.train.fit(model, data, config, aux_loss_fn=jacobian_reg if gamma else None)
    model.eval()
    xb = data.x_test[:128]
    u = model.encoder(xb.reshape(len(xb), -1))
    jac = deq.jacobian_penalty(model.deq.cell, model.deq(u), u, jax.random.key(0), num_probes=16) / hidden
    runs[gamma] = (history, float(jac))
    print(f"gamma={gamma}: test accuracy {history.test_accuracy:.3f}, "
          f"forward steps (last 50 training steps) {np.mean(history.metric('forward_steps')[-50:]):.1f}, "
          f"||J||_F^2/n on test inputs {float(jac):.3f}, fit took {history.run_time:.0f} s")


# %%
def smooth(v, w=10):
    return np.convolve(v, np.ones(w) / w, mode="valid")


fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for gamma, (h, _) in runs.items():
    label = "no regularization" if gamma == 0 else f"Jacobian regularization, γ = {gamma:g}"
    steps = h.metric("step")
    axes[0].plot(steps[9:], smooth(h.metric("forward_steps")), label=label)
    axes[1].plot(steps[9:], smooth(h.metric("loss")), label=label)
axes[0].set_title("Forward solver steps during training")
axes[0].set_xlabel("optimizer step")
axes[0].set_ylabel("Anderson steps (batch mean, smoothed)")
axes[0].set_ylim(0, None)
axes[1].set_title("Training loss")
axes[1].set_xlabel("optimizer step")
axes[1].set_ylabel("cross-entropy (smoothed)")
axes[1].set_yscale("log")
for ax in axes:
    ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The regularized model keeps its Jacobian small, so each forward solve takes less than half the
# Anderson steps of the unregularized one, for a small cost in accuracy on this short budget.
# Since every training step runs a forward and an adjoint solve whose length both grow with
# `||J||`, this is what makes large DEQs practical to train (Bai et al. 2021 report the same
# trend, with forward and backward solves several times shorter on language modelling and
# ImageNet). The penalty here costs an extra forward solve per step, because `fit` calls the
# auxiliary loss separately; inside a hand-written loss it would reuse the model's `z*`.
#
# `NonConvergenceWarning` lines above, if any, come from the unregularized run: for the odd
# sample its adjoint (backward) solve needs more than the 60 Anderson steps allowed. `deq`
# reports it (the gradient then uses the best adjoint iterate) instead of failing silently; the
# regularized model, whose Jacobian stays small, does not trigger it.
#
# **What to take away.** Use `deq.IFT` (the default) when you want the true gradient at a
# memory cost independent of depth; `PhantomGrad` or `JFB` when the cell is strongly contractive
# and backward time matters; `Unrolled` only as a reference. Add `deq.jacobian_penalty` to keep
# solves short as the model trains.
