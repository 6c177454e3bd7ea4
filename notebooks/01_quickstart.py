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
# # 01 · Quickstart: a fixed point, its gradient, and a DEQ layer
#
# A deep equilibrium model (DEQ; Bai, Kolter & Koltun, *Deep Equilibrium Models*, NeurIPS 2019)
# replaces a stack of weight-tied layers `z_{k+1} = f(z_k, x)` by its limit: the output is the
# **fixed point** `z* = f(z*, x)`, found by a root-finding solver, and the gradient is obtained
# from the **implicit function theorem** (IFT) at `z*` instead of backpropagating through the
# solver's iterations. This notebook shows the three pieces of `deq` you need first:
#
# 1. `deq.fixed_point`: solve `z* = f(z*, args)` for any function `f` and differentiate `z*`;
# 2. `deq.nn.DEQ`: the same as a Flax NNX layer, trained here for a few steps on digits;
# 3. the solver statistics every solve returns (`num_steps`, `residual_norm`, `converged`, ...).
#
# Everything runs on CPU in about a minute; the data set is scikit-learn's bundled 8x8 digits
# (no download).

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import deq
import deq.train

print(f"jax {jax.__version__}, deq {deq.__version__}, devices: {jax.devices()}")


# %% [markdown]
# ## A first toy problem: a scalar map
#
# The fixed point of `z = cos(z)` (the Dottie number, 0.739085...). Plain iteration contracts by
# `|sin(z*)| = 0.67` per step; Anderson acceleration, the default solver, mixes the last few
# iterates so that on a scalar map it is a secant method, and reaches the same tolerance in a
# handful of steps. `history_size=1` (one difference) already gets the acceleration.

# %%
cos_map = lambda z, _: jnp.cos(z)  # noqa: E731
for name, solver in [("FixedPointIteration", deq.FixedPointIteration()), ("Anderson (default)", deq.Anderson()),
                     ("Anderson(history_size=1)", deq.Anderson(history_size=1)), ("Broyden", deq.Broyden())]:
    toy = deq.fixed_point(cos_map, 0.0, None, solver=solver)
    print(f"{name:26s} z* = {float(toy.value):.6f} in {int(toy.stats.num_steps):2d} steps, "
          f"residual {float(toy.stats.residual_norm):.1e}")

# %% [markdown]
# ## 1. A fixed point with `deq.fixed_point`
#
# The cell is a single tanh layer with input injection, `f(z, p) = tanh(W z + U x + b)`. Any
# pytree can be the state and the arguments; parameters go in `args` so that gradients can flow
# to them. With `||W||_2 < 1` the map is a contraction (tanh is 1-Lipschitz), so the fixed point
# exists and is unique. We take a symmetric `W` with `||W||_2 = 0.9`, so that plain iteration
# converges, but slowly. By default `deq.fixed_point` uses Anderson acceleration forward and
# the IFT backward.

# %%
def f(z, p):
    return jnp.tanh(p["W"] @ z + p["U"] @ p["x"] + p["b"])


n, d = 32, 8
kW, kU, kx = jax.random.split(jax.random.key(0), 3)
G = jax.random.normal(kW, (n, n))
G = (G + G.T) / 2
params = {
    "W": 0.9 * G / jnp.linalg.norm(G, 2),  # symmetric, spectral norm 0.9
    "U": 0.3 * jax.random.normal(kU, (n, d)) / jnp.sqrt(d),
    "b": jnp.zeros(n),
    "x": jax.random.normal(kx, (d,)),
}
print("||W||_2 =", float(jnp.linalg.norm(params["W"], 2)))

sol = deq.fixed_point(f, jnp.zeros(n), params)  # solver=deq.Anderson(), backward=deq.IFT()
z_star = sol.value
print("steps:", int(sol.stats.num_steps), "| converged:", bool(sol.stats.converged),
      "| residual ||f(z*) - z*|| =", float(sol.stats.residual_norm))
print("recomputed residual:", float(jnp.linalg.norm(f(z_star, params) - z_star)))
print("result code", int(sol.stats.result), "->", deq.RESULTS.describe(sol.stats.result))


# %% [markdown]
# ## 2. Its gradient, checked against finite differences
#
# Differentiating `z* = f(z*, θ)` gives `dz*/dθ = (I - ∂f/∂z)^{-1} ∂f/∂θ`. `deq.IFT` never forms
# that matrix: the backward pass solves one linear fixed-point problem for the adjoint vector
# with vector-Jacobian products, so its memory does not depend on how many steps the forward
# solve took. `jax.grad` works as usual. Below we compare the directional derivative
# `<∇L, v>` with a central finite difference of the loss along a random direction `v`
# (float32, so agreement to a few digits is what to expect).

# %%
def loss(p):
    return 0.5 * jnp.sum(deq.fixed_point(f, jnp.zeros(n), p).value ** 2)


grads = jax.grad(loss)(params)
v = jax.tree.map(lambda a, k: jax.random.normal(k, a.shape),
                 params, dict(zip(params, jax.random.split(jax.random.key(1), len(params)))))
eps = 1e-3
shift = lambda s: jax.tree.map(lambda a, b: a + s * eps * b, params, v)
finite_diff = (loss(shift(+1)) - loss(shift(-1))) / (2 * eps)
ift = sum(jnp.vdot(g, w) for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(v)))
print(f"IFT directional derivative   {float(ift):+.5f}")
print(f"finite-difference estimate   {float(finite_diff):+.5f}")
print(f"relative difference          {float(abs(ift - finite_diff) / abs(finite_diff)):.1e}")

# %% [markdown]
# ## 3. Reading the residual history
#
# `sol.stats.residual_history[k]` is `||f(z_k) - z_k||` after step `k` (NaN once the solve has
# stopped). Anderson acceleration (Walker & Ni, *Anderson acceleration for fixed-point
# iterations*, SIAM J. Numer. Anal. 2011) extrapolates from the last few iterates and reaches
# the tolerance in far fewer steps than plain iteration `z <- f(z)`, whose residual falls
# geometrically at the rate of the contraction. Notebook 02 compares the solvers in depth.

# %%
plain = deq.fixed_point(f, jnp.zeros(n), params, solver=deq.FixedPointIteration(max_steps=100))

fig, ax = plt.subplots(figsize=(6, 3.5))
for name, s in [("Anderson (default)", sol), ("plain iteration", plain)]:
    h = np.asarray(s.stats.residual_history)
    ax.semilogy(h, marker=".", label=f"{name}: {int(s.stats.num_steps)} steps")
ax.set_title("Residual of the forward solve")
ax.set_xlabel("solver step k")
ax.set_ylabel(r"$\|f(z_k) - z_k\|_2$")
ax.legend()
ax.grid(True, which="both", alpha=0.3)
plt.show()


# %% [markdown]
# ## 4. The same as a Flax NNX layer
#
# `deq.nn.DEQ(cell)` turns any `nnx.Module` cell with `__call__(z, x) -> z` into a layer that
# returns `z*`. The cell's parameters are split off and passed to `deq.fixed_point` as
# arguments, so `nnx.grad` reaches them through the implicit backward pass. An optional
# `init_state(x)` gives the initial state. With `batch_axis=0` (the default) every sample of a
# batch has its own stopping test and its own statistics.
#
# The classifier below is `encoder -> DEQ -> head`. The input injection `u = encoder(x)` is
# computed once, outside the solve, and the model returns `(logits, info)` with the solver
# statistics averaged over the batch (`deq.nn.solution_info`), which is what `deq.train.fit`
# expects and records.

# %%
class TanhCell(nnx.Module):
    """z -> tanh(W z + u): contractive at initialisation (||W||_2 about 0.6)."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.3 / np.sqrt(hidden))
        self.W = nnx.Linear(hidden, hidden, use_bias=False, kernel_init=init, rngs=rngs)

    def init_state(self, u):
        return jnp.zeros_like(u)

    def __call__(self, z, u):
        return jnp.tanh(self.W(z) + u)


class DigitsDEQ(nnx.Module):
    def __init__(self, hidden: int = 64, *, rngs: nnx.Rngs):
        self.encoder = nnx.Linear(64, hidden, rngs=rngs)
        solver = deq.Anderson(rtol=1e-3, atol=1e-5, max_steps=30)
        self.deq = deq.nn.DEQ(TanhCell(hidden, rngs=rngs), solver=solver, backward=deq.IFT(solver=solver))
        self.head = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        u = self.encoder(x.reshape(x.shape[0], -1))
        sol = self.deq(u, return_solution=True)
        return self.head(sol.value), deq.nn.solution_info(sol)


data = deq.data.load_digits()
print(data)
model = DigitsDEQ(rngs=nnx.Rngs(0))
logits, info = model(data.x_test[:8])
print("logits", logits.shape, "| info", {k: round(float(v), 4) for k, v in info.items()})

# %% [markdown]
# `deq.train.fit` trains any model that returns `(logits, info)` with Adam, a warm-up + cosine
# schedule and gradient clipping, evaluates on the test split, and returns a `History` with one
# record per step (loss, accuracy, step time and every entry of `info`, such as the number of
# forward solver steps). A manual optax loop with `nnx.value_and_grad` works just as well; `fit`
# saves the boilerplate. 200 steps take a few seconds after compilation.

# %%
config = deq.train.TrainConfig(learning_rate=5e-3, total_steps=200, batch_size=64,
                               eval_every=50, progress=False)
history = deq.train.fit(model, data, config)
for r in history.eval:
    print(f"step {r['step']:4d}: test accuracy {r['accuracy']:.3f}, "
          f"mean forward steps {r['forward_steps']:.1f}")
print(f"training took {history.run_time:.1f} s (including compilation); "
      f"{history.steps_per_second:.0f} steps/s after compilation")
print(f"fraction of training samples whose forward solve converged: "
      f"{np.mean(history.metric('converged_frac')):.4f}")

# %%
steps = history.metric("step")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
axes[0].plot(steps, history.metric("loss"), label="train loss (per batch)")
axes[0].plot(history.metric("step", "eval"), history.metric("loss", "eval"), "o-", label="test loss")
axes[0].set_title("Cross-entropy during training")
axes[0].set_xlabel("optimizer step")
axes[0].set_ylabel("loss")
axes[0].legend()
axes[1].plot(steps, history.metric("forward_steps"), label="forward solver steps (batch mean)")
axes[1].axhline(30, color="gray", linestyle="--", label="max_steps")
axes[1].set_ylim(0, 32)
axes[1].set_title("Solver effort during training")
axes[1].set_xlabel("optimizer step")
axes[1].set_ylabel("Anderson steps")
axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Reading the statistics of a trained layer
#
# `layer(u, return_solution=True)` returns the whole `deq.Solution`. With `batch_axis=0`
# its statistics are per sample: `num_steps` and `converged` have shape `(B,)` and
# `residual_history` has shape `(B, max_steps + 1)`. A sample that does not converge is not an
# error: it is reported (`converged=False`, `result=RESULTS.MAX_STEPS`) and the layer returns
# the lowest-residual iterate it saw.

# %%
model.eval()
u_test = model.encoder(data.x_test[:64].reshape(64, -1))
sol = model.deq(u_test, return_solution=True)
st = sol.stats
print("num_steps shape", st.num_steps.shape, "| residual_history shape", st.residual_history.shape)
print(f"mean steps {float(st.num_steps.mean()):.1f}, max steps {int(st.num_steps.max())}, "
      f"converged {int(st.converged.sum())}/{st.converged.size}, "
      f"largest residual {float(st.residual_norm.max()):.2e}")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for i in range(6):
    axes[0].semilogy(np.asarray(st.residual_history[i]), marker=".", label=f"test sample {i}")
axes[0].set_title("Per-sample residual history (trained layer)")
axes[0].set_xlabel("solver step k")
axes[0].set_ylabel(r"$\|f(z_k) - z_k\|_2$")
axes[0].legend(fontsize=8)
axes[1].hist(np.asarray(st.num_steps), bins=np.arange(0, 32) - 0.5, label="64 test samples")
axes[1].set_title("Steps to reach the tolerance")
axes[1].set_xlabel("Anderson steps")
axes[1].set_ylabel("number of samples")
axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# **What to take away.** `deq.fixed_point` solves and differentiates any fixed-point problem;
# `deq.nn.DEQ` makes it a layer; the statistics tell you how hard each solve was. As training
# proceeds the cell usually becomes less contractive and the solver needs more steps: notebook
# 05 shows how Jacobian regularization (Bai, Koltun & Kolter, *Stabilizing Equilibrium Models by
# Jacobian Regularization*, ICML 2021) keeps that in check, and notebook 04 shows cells whose
# convergence is guaranteed.
