"""Build the tutorial notebooks from the sources below, and execute them in place.

Each notebook is written here in the "percent" format (``# %%`` starts a code cell,
``# %% [markdown]`` a markdown cell whose lines are ``# ``-commented), so the notebooks can be
reviewed and regenerated as plain Python:

    python notebooks/_build.py                 # build and execute all five notebooks
    python notebooks/_build.py 02 04           # only the notebooks whose name starts so
    python notebooks/_build.py --no-execute    # write the notebooks without outputs

Execution uses nbclient with the ``python3`` kernel (``python -m ipykernel install --user
--name python3`` if it is missing), ``DEQ_NO_PROGRESS=1`` and a 10-minute per-cell timeout, and
prints each notebook's wall time. Nothing is downloaded: the only data set is scikit-learn's
bundled digits (``deq.data.load_digits``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_percent(text: str):
    """Split percent-format source into ``[(kind, source)]`` with kind "code" or "markdown"."""
    cells, kind, lines = [], None, []

    def flush():
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in body.splitlines())
        if body.strip():
            cells.append((kind, body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def build(name: str, text: str):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, body in parse_percent(text):
        cell = nbformat.v4.new_markdown_cell(body) if kind == "markdown" else nbformat.v4.new_code_cell(body)
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding gives identical files
        cell["id"] = f"{name[:2]}-{i:02d}"
    return nb


def execute(nb, path: Path) -> float:
    from nbclient import NotebookClient

    os.environ["DEQ_NO_PROGRESS"] = "1"
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}})
    t0 = time.perf_counter()
    client.execute()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("only", nargs="*", help="notebook name prefixes (default: all)")
    parser.add_argument("--no-execute", action="store_true", help="write the notebooks without running them")
    args = parser.parse_args(argv)
    names = sorted(NOTEBOOKS)
    if args.only:
        names = [n for n in names if any(n.startswith(p) for p in args.only)]
    for name in names:
        nb = build(name, NOTEBOOKS[name])
        path = HERE / f"{name}.ipynb"
        if not args.no_execute:
            seconds = execute(nb, path)
            print(f"{name}: executed in {seconds:.0f} s", flush=True)
        nbformat.write(nb, path)
    return 0


NOTEBOOKS: dict[str, str] = {}

NOTEBOOKS['01_quickstart'] = r'''
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
'''

NOTEBOOKS['02_solvers'] = r'''
# %% [markdown]
# # 02 · Forward solvers: plain iteration, Anderson and Broyden
#
# The forward pass of a DEQ is a root-finding problem, `g(z) = f(z) - z = 0`, and the solver
# decides how many evaluations of the cell it costs, or whether it succeeds at all. `deq` ships
# three solvers with the same interface (`rtol`, `atol`, `max_steps`) and the same statistics:
#
# * `deq.FixedPointIteration(damping=β)`: `z <- z + β (f(z) - z)` (plain iteration for β = 1,
#   Krasnosel'skii-Mann for β < 1). Cheap steps; converges only if the (damped) map contracts.
# * `deq.Anderson(history_size=m)`: type-II Anderson acceleration (Walker & Ni, *Anderson
#   acceleration for fixed-point iterations*, SIAM J. Numer. Anal. 2011), which combines the last
#   `m` iterates with least-squares weights; the default in `deq`.
# * `deq.Broyden()`: limited-memory "good" Broyden's method (Broyden, *A class of methods for
#   solving nonlinear simultaneous equations*, Math. Comp. 1965) on `g`, the quasi-Newton solver
#   of the original DEQ paper (Bai, Kolter & Koltun, NeurIPS 2019).
#
# This notebook compares them on a contractive map and on a harder, non-contractive one, shows
# the effect of `history_size` and `damping`, and shows what a failed solve looks like.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import deq

# %% [markdown]
# ## Two test problems
#
# Both are `f(z, p) = tanh(z Wᵀ + x)` on a batch of 256 inputs with a 64-dimensional state;
# we treat the whole batch as a single fixed-point problem (`batch_axis=None`) to get one
# residual curve per solver. `W` is symmetric with eigenvalues spread evenly over an interval:
#
# * **contractive**: eigenvalues in `[-0.5, 0.95]`, so `||W||_2 = 0.95 < 1`: plain iteration
#   converges, but slowly (the error shrinks by up to 0.95 per step);
# * **harder**: eigenvalues in `[-2.5, 0.9]`: `f` is not a contraction, and plain iteration
#   oscillates along the directions whose eigenvalue is below -1. The fixed point still exists
#   and `I - ∂f/∂z` is invertible there, so Newton-like methods can find it.

# %%
n, batch = 64, 256
kq, kx = jax.random.split(jax.random.key(0))
Q, _ = jnp.linalg.qr(jax.random.normal(kq, (n, n)))
x = jax.random.normal(kx, (batch, n))


def symmetric(lo, hi):
    """A symmetric matrix with eigenvalues evenly spread over [lo, hi]."""
    return (Q * jnp.linspace(lo, hi, n)) @ Q.T


def f(z, p):
    return jnp.tanh(z @ p["W"].T + p["x"])


problems = {
    "contractive": {"W": symmetric(-0.5, 0.95), "x": 0.3 * x},
    "harder": {"W": symmetric(-2.5, 0.9), "x": x},
}
z0 = jnp.zeros((batch, n))
solvers = {
    "FixedPointIteration": deq.FixedPointIteration(max_steps=100),
    "Anderson": deq.Anderson(max_steps=100),
    "Broyden": deq.Broyden(max_steps=100),
}

sols = {}
print(f"{'problem':<12} {'solver':<20} {'steps':>5} {'residual':>9}  converged  result")
for pname, p in problems.items():
    for sname, s in solvers.items():
        sol = deq.fixed_point(f, z0, p, solver=s)
        sols[pname, sname] = sol
        st = sol.stats
        print(f"{pname:<12} {sname:<20} {int(st.num_steps):>5} {float(st.residual_norm):>9.2e}  "
              f"{str(bool(st.converged)):<9}  {deq.RESULTS.describe(st.result).split(':')[0]}")

# %% [markdown]
# ## Residual against solver steps
#
# On the contractive problem all three converge; Anderson and Broyden need about half the steps
# of plain iteration. On the harder problem plain iteration never settles (its residual does
# not fall below its starting value), while Anderson and Broyden converge in a few tens of steps: they do not need
# `f` to be a contraction, only the root of `g` to be well conditioned.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for ax, pname in zip(axes, problems):
    for sname in solvers:
        ax.semilogy(np.asarray(sols[pname, sname].stats.residual_history), label=sname)
    ax.set_title(f"{pname} map: residual against steps")
    ax.set_xlabel("solver step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
axes[0].set_ylabel(r"$\|f(z_k) - z_k\|_2$")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Residual against time
#
# Steps do not cost the same: plain iteration evaluates `f` once per step and does nothing else,
# Anderson also solves a small `m x m` least-squares problem, and Broyden applies a low-rank
# inverse-Jacobian update. We time each solve (already compiled: `deq.fixed_point` jit-compiles
# itself on the first call) as the median of 7 runs, and spread that time evenly over its steps
# to plot the residual against wall-clock time. On a cell as cheap as this one the per-step
# overhead of the solver shows; for a real network the cell dominates, and steps are what count.

# %%
def median_time(fn, repeats=7):
    jax.block_until_ready(fn())  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


timings = {}
for (pname, sname), sol in sols.items():
    timings[pname, sname] = median_time(lambda: deq.fixed_point(f, z0, problems[pname], solver=solvers[sname]))
    steps = int(sol.stats.num_steps)
    print(f"{pname:<12} {sname:<20} {1e3 * timings[pname, sname]:7.2f} ms per solve, "
          f"{1e3 * timings[pname, sname] / steps:6.3f} ms per step")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for ax, pname in zip(axes, problems):
    for sname in solvers:
        st = sols[pname, sname].stats
        h = np.asarray(st.residual_history)
        per_step = timings[pname, sname] / int(st.num_steps)
        ax.semilogy(1e3 * per_step * np.arange(len(h)), h, label=sname)
    ax.set_title(f"{pname} map: residual against time")
    ax.set_xlabel("wall-clock time (ms, median of 7 runs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
axes[0].set_ylabel(r"$\|f(z_k) - z_k\|_2$")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The knobs: Anderson's `history_size` and the `damping` of plain iteration
#
# **History.** Anderson with `history_size=m` extrapolates from the last `m` residuals. With
# `m = 1` (a secant correction in a single direction) it fails on the harder problem, and `m = 2`
# is slow; a handful of directions is enough, and beyond that each step only gets more expensive
# (a larger least-squares problem) for little gain (Walker & Ni 2011 discuss the trade-off).
#
# **Damping.** Plain iteration with damping `β` iterates `z <- (1 - β) z + β f(z)`, whose
# Jacobian has eigenvalues `1 - β + β λ` for the eigenvalues `λ` of `∂f/∂z`. On the harder map
# `λ` reaches about -2.5: `β = 1` and `β = 0.7` leave eigenvalues below -1 (no convergence),
# while `β = 0.5` and `β = 0.3` bring them all inside the unit circle, at the price of slower
# progress along the directions with `λ` near 1.

# %%
p = problems["harder"]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for m in (1, 2, 5, 10):
    sol = deq.fixed_point(f, z0, p, solver=deq.Anderson(history_size=m, max_steps=100))
    status = f"{int(sol.stats.num_steps)} steps" if bool(sol.stats.converged) else "not converged"
    axes[0].semilogy(np.asarray(sol.stats.residual_history), label=f"history_size={m}: {status}")
axes[0].set_title("Anderson on the harder map: history size")
for beta in (1.0, 0.7, 0.5, 0.3):
    sol = deq.fixed_point(f, z0, p, solver=deq.FixedPointIteration(damping=beta, max_steps=100))
    status = f"{int(sol.stats.num_steps)} steps" if bool(sol.stats.converged) else "not converged"
    axes[1].semilogy(np.asarray(sol.stats.residual_history), label=f"damping={beta}: {status}")
axes[1].set_title("Plain iteration on the harder map: damping")
for ax in axes:
    ax.set_xlabel("solver step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
axes[0].set_ylabel(r"$\|f(z_k) - z_k\|_2$")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What non-convergence looks like
#
# A solve that fails does not raise (unless you pass `throw=True`): it is *reported*. There are
# two ways to fail, each with its code in `deq.RESULTS`:
#
# * `MAX_STEPS`: the budget ran out (plain iteration on the harder map above);
# * `NONFINITE`: the residual became NaN or inf, so the solve stopped for that sample at once.
#
# In both cases `converged` is `False` and `value` is the **lowest-residual finite iterate** the
# solver saw, not the last one, so a NaN never leaks out of a solve that started from a finite
# point. To see a divergence to infinity we add a linear part to the map, `f(z) = z Wᵀ + 0.1
# tanh(z) + x` with eigenvalues of `W` in `[-4, 0.5]`: plain iteration multiplies the error by
# about -4 per step and overflows float32 within a few tens of steps.

# %%
def f_lin(z, p):
    return z @ p["W"].T + 0.1 * jnp.tanh(z) + p["x"]


p_lin = {"W": symmetric(-4.0, 0.5), "x": x}
fpi = deq.FixedPointIteration(max_steps=100)

for name, (fn, prob) in {"plain iteration, harder tanh map": (f, problems["harder"]),
                         "plain iteration, linear-dominated map": (f_lin, p_lin)}.items():
    st = deq.fixed_point(fn, z0, prob, solver=fpi).stats
    h = np.asarray(st.residual_history)
    print(f"{name}:")
    print(f"  converged={bool(st.converged)}, result={int(st.result)} "
          f"({deq.RESULTS.describe(st.result)[:60]}...)")
    print(f"  steps={int(st.num_steps)}, returned residual={float(st.residual_norm):.3g}, "
          f"lowest residual in the history={np.nanmin(h):.3g}, last finite one={h[np.isfinite(h)][-1]:.3g}")

sol_div = deq.fixed_point(f_lin, z0, p_lin, solver=fpi)
print("any NaN or inf in the returned value?", not bool(jnp.isfinite(sol_div.value).all()))

# %% [markdown]
# ## A fallback chain rescues a diverging start
#
# `deq.Fallback` runs a chain of solvers and hands each sample over to the next one when its
# residual becomes non-finite, grows more than `growth` times above the best seen so far, or
# stalls for `patience` steps; the next solver starts from the best iterate, never from the
# failed one. Here the chain starts with plain iteration (cheap, but diverging on this map),
# and hands over to Anderson as soon as the residual has grown tenfold, a couple of steps in.

# %%
chain = deq.Fallback(solvers=(deq.FixedPointIteration(), deq.Anderson()), max_steps=100)
sol_fb = deq.fixed_point(f_lin, z0, p_lin, solver=chain)
st = sol_fb.stats
print(f"Fallback: converged={bool(st.converged)} in {int(st.num_steps)} steps, "
      f"residual {float(st.residual_norm):.2e}")

fig, ax = plt.subplots(figsize=(6.5, 3.8))
ax.semilogy(np.asarray(sol_div.stats.residual_history), label="plain iteration (diverges, NONFINITE)")
ax.semilogy(np.asarray(st.residual_history), marker=".", label="Fallback(plain iteration -> Anderson)")
ax.set_title("Linear-dominated map: divergence and rescue")
ax.set_xlabel("solver step")
ax.set_ylabel(r"$\|f(z_k) - z_k\|_2$")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# **What to take away.** Use Anderson (the default) or Broyden: they need several times fewer
# steps than plain iteration and survive maps that are not contractions. Look at
# `stats.converged` and `stats.result` rather than assuming success; a failed solve returns its
# best finite iterate, and `deq.Fallback` adds a safety net. When convergence must be
# *guaranteed*, constrain the cell instead (notebook 04).
'''

NOTEBOOKS['03_deq_vs_explicit'] = r'''
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
# per-call `solver=` override; here we re-run the trained DEQ's layer on the whole test split
# with `Anderson(max_steps=k)` for a few budgets `k`, and mark the explicit twins' accuracy
# for reference.

# %%
deq_model.eval()
u_test = deq_model.encoder(data.x_test.reshape(len(data.x_test), -1))
budgets = [1, 2, 4, 8, 16]
accuracy = []
for k in budgets:
    sol = deq_model.deq(u_test, solver=deq.Anderson(rtol=1e-3, atol=1e-5, max_steps=k), return_solution=True)
    acc = float(jnp.mean(jnp.argmax(deq_model.head(sol.value), -1) == data.y_test))
    accuracy.append(acc)
    print(f"max_steps={k:2d}: test accuracy {acc:.3f}, mean steps used {float(sol.stats.num_steps.mean()):4.1f}, "
          f"converged {float(sol.stats.converged.mean()):.0%}")

fig, ax = plt.subplots(figsize=(6.5, 3.6))
ax.plot(budgets, accuracy, "o-", label="DEQ, Anderson(max_steps=k)")
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
'''

NOTEBOOKS['04_convergence_guarantees'] = r'''
# %% [markdown]
# # 04 · Convergence guarantees: contractive cells, monotone DEQs and certificates
#
# A generic DEQ cell gives no promise that its fixed point exists, is unique, or is reachable:
# the solver may simply fail (notebook 02). Two ways to *guarantee* convergence, whatever the
# parameters, are built into `deq`:
#
# * **contractive cells** (`deq.nn.ContractiveDense`): the weight acting on the state is
#   parametrized so that the cell is provably `L`-Lipschitz in `z` with `L < 1`. Banach's
#   fixed-point theorem then gives a unique fixed point, plain iteration converges to it at rate
#   `L`, and any iterate `z` comes with the error bound `||z - z*|| <= ||f(z) - z|| / (1 - L)`
#   (`deq.certify`);
# * **monotone operator DEQs** (`deq.monotone.MonDEQ`; Winston & Kolter, *Monotone operator
#   equilibrium networks*, NeurIPS 2020): `z* = relu(W z* + U x + b)` with
#   `W = (1 - m) I - AᵀA + B - Bᵀ`, so `I - W ⪰ m I` for every `A`, `B`; the equilibrium is
#   unique and operator-splitting methods (Peaceman-Rachford, forward-backward) converge to it.
#
# To check the certificates against the truth we need fixed points accurate far beyond float32,
# so this notebook runs in **float64**.

# %%
import jax

jax.config.update("jax_enable_x64", True)  # before any array is created

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import deq
import deq.monotone

batch, d, n = 8, 16, 64
x = jax.random.normal(jax.random.key(0), (batch, d), dtype=jnp.float64)
print("dtype of the inputs:", x.dtype)

# %% [markdown]
# ## Large weights: a free cell diverges, the constrained ones do not
#
# Three layers, all with *large* weights (about 3 times a standard initialisation), solved from
# `z = 0`:
#
# * a free cell `relu(W z + U x + b)` with an unconstrained `W` (spectral norm about 6), solved
#   by plain iteration: its iterates grow geometrically, and the solve ends with
#   `converged = False` and `result = MAX_STEPS` (in float32 it would overflow first and report
#   `NONFINITE`), returning the lowest-residual iterate it saw;
# * a `ContractiveDense` cell whose raw parameter `V` is set to the same large matrix: the
#   layer rescales it so that `||W||_2 <= 0.9` (here with `norm_bound="exact"`, an SVD per call,
#   so that `||W||_2 = 0.9` exactly), and plain iteration converges;
# * a `MonDEQ` layer with `A`, `B` drawn at 3 times the default scale, solved by
#   Peaceman-Rachford splitting (the default) and by forward-backward splitting: both converge,
#   although `||W||_2` is far above 1, because the guarantee comes from monotonicity of
#   `I - W`, not from a contraction.

# %%
class FreeCell(nnx.Module):
    """relu(W z + U x + b) with nothing constraining W."""

    def __init__(self, features, in_features, *, scale, rngs):
        init = nnx.initializers.lecun_normal()
        self.W = nnx.Param(scale * init(rngs.params(), (features, features), jnp.float64))
        self.U = nnx.Param(init(rngs.params(), (in_features, features), jnp.float64))
        self.b = nnx.Param(jnp.zeros(features, jnp.float64))

    def init_state(self, x):
        return jnp.zeros(x.shape[:-1] + (self.W.shape[0],), x.dtype)

    def __call__(self, z, x):
        return jax.nn.relu(z @ self.W + x @ self.U + self.b)


free_cell = FreeCell(n, d, scale=3.0, rngs=nnx.Rngs(1))
contractive_cell = deq.nn.ContractiveDense(n, d, lipschitz=0.9, norm_bound="exact", rngs=nnx.Rngs(2))
contractive_cell.v[...] = free_cell.W[...]  # the same large raw weight
mondeq = deq.monotone.MonDEQ(d, n, m=0.5, init_scale=3.0, param_dtype=jnp.float64, rngs=nnx.Rngs(3))

print(f"free cell:        ||W||_2 = {float(jnp.linalg.norm(free_cell.W[...], 2)):6.2f}")
print(f"ContractiveDense: ||V||_2 = {float(jnp.linalg.norm(contractive_cell.v[...], 2)):6.2f} (raw), "
      f"||W||_2 = {float(jnp.linalg.norm(contractive_cell.weight, 2)):.3f} <= L = {contractive_cell.lipschitz_bound()}")
print(f"MonDEQ:           ||W||_2 = {float(jnp.linalg.norm(mondeq.weight(), 2)):6.2f}, "
      f"min eigenvalue of sym(I - W) = {float(jnp.linalg.eigvalsh(jnp.eye(n) - (mondeq.weight() + mondeq.weight().T) / 2).min()):.3f} >= m = 0.5")

# %%
plain = deq.FixedPointIteration(rtol=1e-10, atol=1e-12, max_steps=150)
solves = {
    "free cell, plain iteration": deq.nn.DEQ(free_cell, solver=plain)(x, return_solution=True),
    "ContractiveDense (L=0.9), plain iteration": deq.nn.DEQ(contractive_cell, solver=plain)(x, return_solution=True),
    "MonDEQ, Peaceman-Rachford": mondeq(x, return_solution=True,
                                        method=deq.monotone.PeacemanRachford(rtol=1e-10, atol=1e-12, max_steps=150)),
    "MonDEQ, forward-backward": mondeq(x, return_solution=True,
                                       method=deq.monotone.ForwardBackward(rtol=1e-10, atol=1e-12, max_steps=150)),
}
for name, sol in solves.items():
    st = sol.stats
    print(f"{name:<42} converged {int(st.converged.sum())}/{batch}, result codes {sorted(set(np.asarray(st.result).tolist()))}, "
          f"steps {int(st.num_steps.max()):3d}, value finite: {bool(jnp.isfinite(sol.value).all())}")

fig, ax = plt.subplots(figsize=(7, 4))
for name, sol in solves.items():
    ax.semilogy(np.asarray(sol.stats.residual_history[0]), label=name)
ax.set_ylim(1e-12, 1e8)  # the free cell's residual leaves the chart (it reaches about 1e43)
ax.set_title("Residual of each solve (first sample of the batch)")
ax.set_xlabel("solver step")
ax.set_ylabel(r"$\|f(z_k) - z_k\|_2$")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The free cell's residual grows by a factor of about 6 per step; the solve reports the failure
# and returns its best iterate (here the starting point). The contractive cell converges at
# least at the guaranteed rate 0.9 (faster in practice, since `tanh' < 1`). Both monotone
# solvers are guaranteed to converge, but not equally fast: forward-backward splitting must take
# a small step (`α = m / L²`, with `L` the Lipschitz constant of `I - W`) when `W` is large, and
# after 150 steps its residual has fallen only a few-fold; Peaceman-Rachford has no step-size
# condition and converges in under a hundred steps (Winston & Kolter 2020 make the same
# observation and use Peaceman-Rachford by default, as `deq.monotone` does).
#
# ## Certificates: a proven error bound, checked against the truth
#
# Take the plain iterates `z_0 = 0, z_{k+1} = f(z_k, x)` of the contractive cell (exactly what
# `deq.FixedPointIteration` computes) for one input. For each iterate:
#
# * `deq.certify(f, z_k, x, lipschitz=cell)` returns the **guaranteed** bound
#   `||z_k - z*|| <= ||f(z_k) - z_k|| / (1 - L)` with the proven `L = 0.9`
#   (`Certificate.guaranteed` is `True`);
# * `deq.certify_estimate(f, z_k, x, key=...)` plugs in a power-iteration **estimate** of
#   `||∂f/∂z||_2` at `z_k` instead (`guaranteed` is `False`): usually much tighter, but not a
#   proof, since the local Jacobian norm is not a global Lipschitz constant and power iteration
#   underestimates it.
#
# The truth `z*` comes from an Anderson solve in float64, polished by 200 more plain iterations
# (each shrinks the error by at least 0.9) down to rounding level.

# %%
cell = contractive_cell
x0 = x[0]
reference = deq.nn.DEQ(cell)(x0[None], solver=deq.Anderson(rtol=1e-14, atol=1e-13, max_steps=100),
                             return_solution=True)
z_star = reference.value[0]
for _ in range(200):
    z_star = cell(z_star, x0)
print("reference solve:", int(reference.stats.num_steps[0]), "Anderson steps + 200 plain steps, residual",
      f"{float(jnp.linalg.norm(cell(z_star, x0) - z_star)):.1e}")

K = 40
iterates = [cell.init_state(x0)]
for _ in range(K):
    iterates.append(cell(iterates[-1], x0))
Z = jnp.stack(iterates)                    # (K + 1, n): one row per solver step
X = jnp.broadcast_to(x0, (K + 1, d))       # the same input for every row

proven = deq.certify(cell, Z, X, lipschitz=cell, batch_axis=0)
estimate = deq.certify_estimate(cell, Z, X, key=jax.random.key(4), batch_axis=0)
true_error = jnp.linalg.norm(Z - z_star, axis=-1)
print("certify: guaranteed =", proven.guaranteed, "| certify_estimate: guaranteed =", estimate.guaranteed)
print("proven bound >= true error at every step:", bool(jnp.all(proven.error_bound >= true_error)))
print("estimated bound >= true error at every step:", bool(jnp.all(estimate.error_bound >= true_error)))
print(f"estimated Lipschitz constant ||df/dz|| at z_K: {float(estimate.lipschitz[-1]):.3f} (proven bound {cell.lipschitz_bound()})")

fpi = deq.nn.DEQ(cell)(x0[None], solver=deq.FixedPointIteration(rtol=0.0, atol=1e-30, max_steps=K),
                       return_solution=True)
print("FixedPointIteration after", K, "steps agrees with the manual iterate:",
      float(jnp.abs(fpi.value[0] - Z[-1]).max()))

# %%
steps = np.arange(K + 1)
fig, ax = plt.subplots(figsize=(7, 4))
ax.semilogy(steps, proven.error_bound, label=r"proven bound $\|f(z)-z\|/(1-L)$, $L=0.9$ (certify)")
ax.semilogy(steps, estimate.error_bound, "--", label=r"estimated bound, $L \approx \|J_f\|_2$ (certify_estimate)")
ax.semilogy(steps, true_error, "k.", markersize=4, label=r"true error $\|z_k - z^*\|$ (float64 reference)")
ax.semilogy(steps, proven.residual_norm, ":", label=r"residual $\|f(z_k) - z_k\|$")
ax.set_title("Error bounds against the true error, ContractiveDense")
ax.set_xlabel("plain-iteration step k")
ax.set_ylabel("distance to the fixed point")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The proven bound sits above the true error at every step, as Banach's theorem promises, by a
# factor of roughly `(1 - L_local) / (1 - L)`: it pays for using the global `L = 0.9` where the
# cell is locally more contractive (`tanh' < 1`). The estimated bound follows the true error more
# closely, but nothing guarantees it stays above it: treat it as a diagnostic for cells without
# a proven constant. Below `1e-14` all curves flatten at the float64 rounding level. Both bounds need only the residual, so they
# cost one extra cell evaluation (plus the power iteration for the estimate) at solve time.
# Attach one to a solution with `cert.attach(sol)` to fill `sol.stats.error_bound`.
#
# ## From a certified state to a certified prediction
#
# A classifier's output is a class, not a state. With a linear head `logits = z V + c`, the
# margin of the predicted class `t` over a class `j` moves by at most `e ||V_t - V_j||` when `z`
# moves by `e`, so a prediction whose every margin exceeds that is *proven* to be the exact
# equilibrium's: `deq.certified_argmax(logits, V, cert.error_bound)`. Below, a small DEQ
# classifier with a contractive cell (`DEQClassifier(..., cell=ContractiveDense(...))`) is trained
# on digits for a few epochs, then solved to looser and tighter tolerances: how many test
# predictions can it prove?

# %%
from deq.data import load_digits
from deq.nn.models import DEQClassifier
from deq.train import TrainConfig, fit

digits = load_digits()
clf = DEQClassifier(64, 32, 10, rngs=nnx.Rngs(5),
                    cell=deq.nn.ContractiveDense(32, 32, lipschitz=0.9, activation="relu", rngs=nnx.Rngs(6)))
history = fit(clf, digits, TrainConfig(learning_rate=3e-3, epochs=8, batch_size=64, progress=False))
print(f"test accuracy after training: {history.test_accuracy:.2%}")

x_test, y_test = jnp.asarray(digits.x_test), jnp.asarray(digits.y_test)
u_test = clf._encode(x_test)
head_cell = clf.deq.cell
for rtol in (1e-2, 1e-3, 1e-4, 1e-5):
    sol = clf.deq(u_test, solver=deq.Anderson(rtol=rtol, atol=0.0, max_steps=200), return_solution=True)
    cert = deq.certify(head_cell, sol, u_test, lipschitz=head_cell, batch_axis=0)
    logits = clf.head(sol.value)
    certified = deq.certified_argmax(logits, clf.head.kernel[...], cert.error_bound)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
    print(f"rtol {rtol:.0e}: {float(jnp.mean(sol.stats.num_steps)):5.1f} Anderson steps, accuracy {accuracy:.2%}, "
          f"median bound {float(jnp.median(cert.error_bound)):.1e}, predictions certified {float(jnp.mean(certified)):.1%}")

# %% [markdown]
# The accuracy barely moves with the tolerance, but the *proof* does: a few more solver steps
# turn "probably the equilibrium's answer" into "certainly the equilibrium's answer" for every
# test sample. `benchmarks/inference.py` measures the same on digits and MNIST-1D
# (all predictions certified after about 19 Anderson steps).
#
# **What to take away.** When a forward solve must not fail (safety-critical inference,
# adversarial inputs, large learning rates), build the guarantee into the layer:
# `ContractiveDense` gives convergence of any solver and an a-posteriori error certificate;
# `MonDEQ` gives existence, uniqueness and convergence of operator splitting for a much richer
# weight class, without the `||W|| < 1` restriction.
'''

NOTEBOOKS['05_gradients'] = r'''
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
'''


if __name__ == "__main__":
    sys.exit(main())
