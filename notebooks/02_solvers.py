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
