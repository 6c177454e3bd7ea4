"""An adversary's suite for the core: inputs and faults meant to make `deq` lie or crash.

Every case is one parametrized test id (`pytest -v` prints one line per case); each feeds the
input that would break a promise and asserts the promise: converged means converged, a
runaway or a NaN is named as such, the gradient is the gradient, statistics are plain data,
misuse gets an error that names the argument, and failures raise one `deq.SolveError`.
The layers' and data loaders' cases are in test_adversarial_layers.py, training's in
test_adversarial_train.py.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq
from deq._tree import row_norm

CASES = {}


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


# ----------------------------------------------------------------------------- maps (module level: cached compiles)


def doubling(z, a):
    return 2.0 * z + 1.0


def halving(z, a):
    return 0.5 * z


def shift(z, a):
    return a @ z + jnp.ones_like(z)


def tanh_half(z, a):
    return jnp.tanh(0.5 * z + a)


def batch_mixing(z, a):
    return jnp.tanh(0.5 * z + a + 0.3 * jnp.mean(z, axis=0))


def nan_at_three(z, a):
    """No fixed point (g = f(z) - z = 1), and NaN once |z| > 2.5: every solver walks into the NaN."""
    return jnp.where(jnp.max(jnp.abs(z)) > 2.5, jnp.nan, z + 1.0)


def slow_growth(z, a):
    return 1.0001 * z + 1.0


def linear_a(z, p):
    return p["A"] @ z + p["b"]


fp = deq.FixedPointIteration

SOLVERS = {
    "iteration": lambda **kw: deq.FixedPointIteration(**kw),
    "anderson": lambda **kw: deq.Anderson(**kw),
    "broyden": lambda **kw: deq.Broyden(**kw),
    "broyden_ls": lambda **kw: deq.Broyden(line_search=True, **kw),
}


# ----------------------------------------------------------------------------- overflow and non-finite


@case("overflow/doubling-float32-is-diverged-not-converged")
def _():
    sol = deq.fixed_point(doubling, jnp.zeros(3, jnp.float32), None, solver=fp(max_steps=100))
    assert not bool(sol.stats.converged)
    assert deq.RESULTS.name(sol.stats.result) == "DIVERGED"
    assert np.all(np.isfinite(np.asarray(sol.value)))


@case("overflow/doubling-float64-is-diverged")
def _():
    with jax.enable_x64(True):
        sol = deq.fixed_point(doubling, jnp.zeros(3, jnp.float64), None, solver=fp(max_steps=2000))
        assert deq.RESULTS.name(sol.stats.result) == "DIVERGED" and int(sol.stats.num_steps) < 40


@case("overflow/contraction-from-1e30-float32-is-finite-and-converges")
def _():
    sol = deq.fixed_point(halving, jnp.full(3, 1e30, jnp.float32), None, solver=fp(max_steps=300))
    assert deq.RESULTS.name(sol.stats.result) == "CONVERGED"
    assert np.isfinite(np.asarray(sol.stats.residual_history)[0])  # no overflow at step 0


@case("overflow/start-1e38-float32-is-not-called-nonfinite")
def _():
    sol = deq.fixed_point(halving, jnp.full(4, 1e38, jnp.float32), None, solver=fp(max_steps=400))
    assert deq.RESULTS.name(sol.stats.result) != "NONFINITE"
    assert np.isfinite(float(sol.stats.residual_history[0]))


@case("overflow/row-norm-of-huge-and-tiny-rows")
def _():
    x = jnp.array([[1e30, 1e30], [3e38, 3e38], [1e-30, 1e-30], [0.0, 0.0]], jnp.float32)
    got = np.asarray(row_norm(x), np.float64)
    want = np.array([1.4142135e30, np.finfo(np.float32).max, 1.4142135e-30, 0.0])
    np.testing.assert_allclose(got, want, rtol=1e-6)


@case("nonfinite/nan-start-is-nonfinite-at-step-0")
def _():
    sol = deq.fixed_point(tanh_half, jnp.array([jnp.nan, 0.0]), jnp.zeros(2))
    assert deq.RESULTS.name(sol.stats.result) == "NONFINITE" and int(sol.stats.num_steps) == 0


@case("nonfinite/inf-in-args-is-nonfinite")
def _():
    sol = deq.fixed_point(tanh_half, jnp.zeros(2), jnp.array([jnp.inf, -jnp.inf]) * jnp.array([1.0, jnp.nan]))
    assert deq.RESULTS.name(sol.stats.result) == "NONFINITE"
    assert not bool(sol.stats.converged)


def _nan_midway(name):
    sol = deq.fixed_point(nan_at_three, jnp.zeros(2), None, solver=SOLVERS[name](max_steps=50))
    assert deq.RESULTS.name(sol.stats.result) == "NONFINITE"
    assert np.all(np.isfinite(np.asarray(sol.value))) and np.isfinite(float(sol.stats.residual_norm))


for _name in SOLVERS:
    CASES[f"nonfinite/nan-midway-{_name}"] = (lambda n: lambda: _nan_midway(n))(_name)


@case("nonfinite/one-nan-sample-leaves-the-others-converged")
def _():
    a = jnp.ones((4, 3)).at[2, 1].set(jnp.nan)
    sol = deq.fixed_point(tanh_half, jnp.zeros((4, 3)), a, batch_axis=0)
    codes = [deq.RESULTS.name(c) for c in np.asarray(sol.stats.result)]
    assert codes == ["CONVERGED", "CONVERGED", "NONFINITE", "CONVERGED"]


@case("nonfinite/bfloat16-state-has-finite-float32-stats")
def _():
    sol = deq.fixed_point(tanh_half, jnp.zeros(8, jnp.bfloat16), jnp.ones(8, jnp.bfloat16),
                          solver=deq.Anderson(rtol=1e-2, atol=1e-2))
    assert sol.value.dtype == jnp.bfloat16 and bool(sol.stats.converged)
    assert np.isfinite(float(sol.stats.residual_norm))


# ----------------------------------------------------------------------------- convergence at infinity


NO_FIXED_POINT = {"A": jnp.diag(jnp.array([1.0, 0.5, 0.3])), "b": jnp.ones(3)}
JORDAN = {"A": jnp.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]]), "b": jnp.ones(3)}

for _name in SOLVERS:
    for _label, _p in (("unit-eigenvalue", NO_FIXED_POINT), ("jordan-block", JORDAN)):
        def _no_fixed_point(name=_name, p=_p):
            for rtol in (1e-5, 1e-3):
                sol = deq.fixed_point(linear_a, jnp.zeros(3), p, solver=SOLVERS[name](rtol=rtol))
                assert not bool(sol.stats.converged), (name, rtol, float(jnp.linalg.norm(sol.value)))
                assert deq.RESULTS.name(sol.stats.result) in ("DIVERGED", "MAX_STEPS")

        CASES[f"infinity/affine-without-fixed-point-{_label}-{_name}"] = _no_fixed_point


@case("infinity/slowly-growing-iterates-never-converge-by-the-relative-test")
def _():
    sol = deq.fixed_point(slow_growth, jnp.zeros(2), None, solver=fp(rtol=1e-3, atol=0.0, max_steps=3000))
    assert not bool(sol.stats.converged)


SINGULAR = {"A": jnp.diag(jnp.array([1.0, 0.5])), "b": jnp.array([0.0, 1.0])}


def _singular_adjoint(adjoint):
    loss = lambda p: jnp.sum(deq.fixed_point(linear_a, jnp.zeros(2), p,
                                             backward=deq.IFT(solver=adjoint)).value)
    sol = deq.fixed_point(linear_a, jnp.zeros(2), SINGULAR)
    assert bool(sol.stats.converged)  # the forward has (many) fixed points; the adjoint has none
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        jax.block_until_ready(jax.grad(loss)(SINGULAR))
    msgs = [str(w.message) for w in rec if issubclass(w.category, deq.NonConvergenceWarning)]
    assert msgs and "||J^T u + g - u||" in msgs[0] and "||f(z) - z||" not in msgs[0]


for _label, _adj in (("broyden", deq.Broyden()), ("anderson", deq.Anderson()), ("iteration", deq.FixedPointIteration()),
                     ("default", None)):
    CASES[f"infinity/singular-adjoint-is-reported-{_label}"] = (lambda a: lambda: _singular_adjoint(a))(_adj)


# ----------------------------------------------------------------------------- statistics are plain data


def _stats_loss(backward):
    def loss(a):
        s = deq.fixed_point(tanh_half, jnp.zeros((4, 3)), a, batch_axis=0, backward=backward)
        aux = {"all": jnp.all(s.stats.converged), "max": jnp.max(s.stats.num_steps),
               "ok": jnp.mean(s.stats.result == deq.RESULTS.CONVERGED), "res": jnp.max(s.stats.residual_norm),
               "hist": jnp.nanmax(s.stats.residual_history)}
        return jnp.sum(s.value) + 0.0 * aux["all"], aux

    return loss


BACKWARDS = {"ift": deq.IFT(), "phantom": deq.PhantomGrad(), "jfb": deq.JFB(), "unrolled": deq.Unrolled()}
TRANSFORMS = {
    "grad": lambda L, a: jax.grad(lambda a: L(a)[0] + jnp.where(L(a)[1]["all"], 0.0, 1.0))(a),
    "value_and_grad": lambda L, a: jax.value_and_grad(L, has_aux=True)(a),
    "jit-value_and_grad": lambda L, a: jax.jit(jax.value_and_grad(L, has_aux=True))(a),
    "vmap-grad": lambda L, a: jax.vmap(jax.grad(lambda a: L(a)[0] * L(a)[1]["ok"]))(jnp.stack([a, a])),
    "scan-grad": lambda L, a: jax.lax.scan(lambda c, _: (c - 0.1 * jax.grad(lambda a: L(a)[0])(c), L(c)[1]), a, None,
                                           length=2),
}
for _b in BACKWARDS:
    for _t in TRANSFORMS:
        CASES[f"stats/{_t}-{_b}"] = (lambda b, t: lambda: jax.block_until_ready(
            TRANSFORMS[t](_stats_loss(BACKWARDS[b]), jnp.ones((4, 3)))))(_b, _t)
for _b in ("phantom", "jfb", "unrolled"):
    CASES[f"stats/jvp-{_b}"] = (lambda b: lambda: jax.jvp(lambda a: _stats_loss(BACKWARDS[b])(a)[1], (jnp.ones((4, 3)),),
                                                          (jnp.ones((4, 3)),)))(_b)


# ----------------------------------------------------------------------------- gradient precision


def _tanh_problem(n=6, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(n, n))
    return {"W": jnp.asarray(0.9 * W / np.linalg.norm(W, 2)), "x": jnp.asarray(rng.normal(size=n))}


def tanh_cell(z, p):
    return jnp.tanh(p["W"] @ z + p["x"])


@case("precision/float64-ift-gradient-matches-unrolled-to-1e-9")
def _():
    with jax.enable_x64(True):
        p = _tanh_problem()
        solver = deq.Anderson(rtol=0.0, atol=1e-12, max_steps=500)
        loss = lambda p, b: jnp.sum(deq.fixed_point(tanh_cell, jnp.zeros(6), p, solver=solver, backward=b).value ** 2)
        g = jax.grad(loss)(p, deq.IFT())
        ref = jax.grad(loss)(p, deq.Unrolled())
        for k in g:
            err = float(jnp.linalg.norm(g[k] - ref[k]) / jnp.linalg.norm(ref[k]))
            assert err < 1e-9, (k, err)
        h = 1e-6
        e = jnp.zeros(6).at[2].set(h)
        fd = (loss({"W": p["W"], "x": p["x"] + e}, deq.IFT()) - loss({"W": p["W"], "x": p["x"] - e}, deq.IFT())) / (2 * h)
        assert abs(float(g["x"][2] - fd)) <= 1e-7 * abs(float(fd)) + 1e-9


@case("precision/derived-adjoint-tolerance-follows-the-forward")
def _():
    from deq.backward.ift import derived_adjoint_rtol

    one = jnp.ones(3)
    loose = derived_adjoint_rtol(deq.Anderson(rtol=1e-3), one, jnp.float32)
    np.testing.assert_allclose(np.asarray(loose), 1e-4)  # float32 training keeps its 1e-4 adjoint
    with jax.enable_x64(True):
        tight = derived_adjoint_rtol(deq.Anderson(rtol=0.0, atol=1e-12), jnp.ones(3, jnp.float64), jnp.float64)
        np.testing.assert_allclose(np.asarray(tight), 1e-12, rtol=1e-6)
    floor = derived_adjoint_rtol(deq.Anderson(rtol=0.0, atol=1e-30), one, jnp.float32)
    np.testing.assert_allclose(np.asarray(floor), 10 * np.finfo(np.float32).eps, rtol=1e-6)


# ----------------------------------------------------------------------------- the backward reports itself


def _probe_loss(a, probe, backward=None):
    kw = {} if backward is None else {"backward": backward}
    return deq.fixed_point(tanh_half, jnp.zeros((4, 3)), a, batch_axis=0, backward_stats=probe, **kw).value.sum()


@case("backward/probe-per-sample-inside-jit")
def _():
    g, bs = jax.jit(jax.grad(_probe_loss, argnums=(0, 1)))(jnp.ones((4, 3)), deq.BackwardStats.probe(4))
    assert bs.num_steps.shape == (4,) and np.all(np.asarray(bs.converged) == 1.0)
    assert np.all(np.asarray(bs.residual_norm) >= 0) and np.all(np.asarray(bs.num_steps) >= 1)
    assert "4/4 converged" in bs.summary()


@case("backward/probe-reports-a-failed-adjoint")
def _():
    adj = deq.IFT(solver=deq.FixedPointIteration(max_steps=1), warn=False)
    _, bs = jax.grad(_probe_loss, argnums=(0, 1))(jnp.ones((4, 3)), deq.BackwardStats.probe(4), adj)
    assert np.all(np.asarray(bs.converged) == 0.0)
    assert np.all(np.asarray(bs.result) == deq.RESULTS.MAX_STEPS) and np.all(np.asarray(bs.num_steps) == 1)


@case("backward/probe-aggregated")
def _():
    _, bs = jax.grad(_probe_loss, argnums=(0, 1))(jnp.ones((4, 3)), deq.BackwardStats.probe())
    assert bs.num_steps.shape == () and float(bs.converged) == 1.0


@case("backward/probe-of-the-wrong-size")
def _():
    with pytest.raises(ValueError, match=r"probe has shape \(3,\).*4 sample"):
        jax.grad(_probe_loss, argnums=(0, 1))(jnp.ones((4, 3)), deq.BackwardStats.probe(3))


@case("backward/probe-of-the-wrong-type")
def _():
    with pytest.raises(TypeError, match="backward_stats.*BackwardStats"):
        jax.grad(_probe_loss, argnums=(0, 1))(jnp.ones((4, 3)), jnp.zeros(4))


@case("backward/probe-batch-must-be-an-int")
def _():
    with pytest.raises(ValueError, match="`batch` must be None or an integer"):
        deq.BackwardStats.probe(2.5)


@case("backward/warning-with-a-nan-sample-prints-no-minus-inf")
def _():
    adj = deq.IFT(solver=deq.FixedPointIteration(max_steps=2))
    a = jnp.ones((4, 3)).at[1].set(jnp.nan)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        jax.block_until_ready(jax.grad(lambda a: _probe_loss(a, None, adj))(a))
    msgs = [str(w.message) for w in rec if issubclass(w.category, deq.NonConvergenceWarning)]
    assert msgs
    assert "-inf" not in msgs[0] and "is -" not in msgs[0]
    assert "||J^T u + g - u||" in msgs[0]


@case("backward/warning-points-at-the-users-line")
def _():
    adj = deq.IFT(solver=deq.FixedPointIteration(max_steps=1))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        jax.block_until_ready(jax.grad(lambda a: _probe_loss(a, None, adj))(jnp.ones((4, 3)) * 0.5))
    hits = [w for w in rec if issubclass(w.category, deq.NonConvergenceWarning)]
    assert hits and hits[0].filename == __file__, hits[0].filename


# ----------------------------------------------------------------------------- one clean error


@case("errors/throw-forward-raises-one-SolveError")
def _():
    with pytest.raises(deq.SolveError, match=r"forward solve did not converge.*MAX_STEPS"):
        deq.fixed_point(doubling, jnp.zeros(2), None, solver=fp(max_steps=3), throw=True)


@case("errors/throw-forward-diverged-names-the-code")
def _():
    with pytest.raises(deq.SolveError, match="DIVERGED"):
        deq.fixed_point(doubling, jnp.zeros(2), None, solver=fp(max_steps=100), throw=True)


@case("errors/throw-inside-user-jit-with-clean_errors")
def _():
    solve = jax.jit(lambda a: deq.fixed_point(doubling, jnp.zeros(2), a, solver=fp(max_steps=3), throw=True).value)
    with pytest.raises(deq.SolveError):
        with deq.clean_errors():
            jax.block_until_ready(solve(jnp.ones(2)))


@case("errors/throw-backward-raises-SolveError")
def _():
    adj = deq.IFT(solver=deq.FixedPointIteration(max_steps=1))
    g = lambda a: jax.grad(lambda a: deq.fixed_point(tanh_half, jnp.zeros(3), a, backward=adj, throw=True).value.sum())(a)
    with pytest.raises(deq.SolveError, match=r"adjoint\) solve did not converge"):
        with deq.clean_errors():
            jax.block_until_ready(g(jnp.ones(3)))


@case("errors/warning-as-error-arrives-as-SolveError")
def _():
    adj = deq.IFT(solver=deq.FixedPointIteration(max_steps=1))
    g = lambda a: jax.grad(lambda a: deq.fixed_point(tanh_half, jnp.zeros(3), a, backward=adj).value.sum())(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error", deq.NonConvergenceWarning)
        with pytest.raises(deq.SolveError, match="adjoint"):
            with deq.clean_errors():
                jax.block_until_ready(g(jnp.ones(3) * 0.7))


@case("errors/SolveError-is-a-RuntimeError-and-clean_errors-passes-others")
def _():
    assert issubclass(deq.SolveError, RuntimeError)
    with pytest.raises(ZeroDivisionError):
        with deq.clean_errors():
            1 / 0


# ----------------------------------------------------------------------------- the batch contract


@case("batch/mixing-cell-is-detected")
def _():
    with pytest.raises(deq.SolveError, match="check_batch: f mixes samples"):
        deq.fixed_point(batch_mixing, jnp.zeros((5, 3)), jnp.ones((5, 3)), batch_axis=0, check_batch=True)


@case("batch/row-wise-cell-passes-the-check")
def _():
    sol = deq.fixed_point(tanh_half, jnp.zeros((40, 3)), jnp.ones((40, 3)), batch_axis=0, check_batch=True)
    assert bool(jnp.all(sol.stats.converged))


@case("batch/check_batch-needs-batch_axis-0")
def _():
    with pytest.raises(ValueError, match="check_batch=True.*batch_axis is None"):
        deq.fixed_point(tanh_half, jnp.zeros(3), jnp.ones(3), check_batch=True)


@case("batch/zero-size-batch-is-an-empty-solution")
def _():
    sol = deq.fixed_point(tanh_half, jnp.zeros((0, 3)), jnp.ones((0, 3)), batch_axis=0)
    assert sol.value.shape == (0, 3) and sol.stats.num_steps.shape == (0,)
    g = jax.grad(lambda a: deq.fixed_point(tanh_half, jnp.zeros((0, 3)), a, batch_axis=0).value.sum())(jnp.ones((0, 3)))
    assert g.shape == (0, 3)


@case("batch/zero-size-pytree-batch")
def _():
    z0 = {"a": jnp.zeros((0, 2)), "b": jnp.zeros((0, 2, 2))}
    sol = deq.fixed_point(lambda z, _: jax.tree_util.tree_map(lambda v: 0.5 * v, z), z0, None, batch_axis=0)
    assert sol.value["b"].shape == (0, 2, 2) and sol.stats.converged.shape == (0,)


@case("batch/vmap-equals-batch_axis-0-including-result-codes")
def _():
    a = jnp.stack([jnp.ones(2), jnp.full(2, jnp.nan), jnp.zeros(2)])
    solver = deq.Anderson()
    batched = deq.fixed_point(tanh_half, jnp.zeros((3, 2)), a, batch_axis=0, solver=solver)
    mapped = jax.vmap(lambda a: deq.fixed_point(tanh_half, jnp.zeros(2), a, solver=solver).stats.result)(a)
    np.testing.assert_array_equal(np.asarray(batched.stats.result), np.asarray(mapped))


# ----------------------------------------------------------------------------- fixed budgets


for _name in SOLVERS:
    def _budget(name=_name):
        sol = deq.fixed_point(tanh_half, jnp.zeros(3), jnp.ones(3), solver=SOLVERS[name](rtol=0.0, atol=0.0, max_steps=7))
        assert int(sol.stats.num_steps) == 7 and deq.RESULTS.name(sol.stats.result) == "MAX_STEPS"

    CASES[f"budget/exactly-max_steps-{_name}"] = _budget


@case("budget/fixed-step-adjoint-is-a-neumann-sum-and-silent")
def _():
    with jax.enable_x64(True):
        A = jnp.array([[0.3, 0.1], [0.0, 0.2]])
        p = {"A": A, "b": jnp.ones(2)}
        adj = deq.IFT(solver=deq.FixedPointIteration(rtol=0.0, atol=0.0, max_steps=3))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            g = jax.grad(lambda p: deq.fixed_point(linear_a, jnp.zeros(2), p, backward=adj,
                                                   solver=deq.Anderson(rtol=0.0, atol=1e-13)).value.sum())(p)
        u = np.ones(2)
        for _ in range(3):
            u = np.asarray(A).T @ u + np.ones(2)
        np.testing.assert_allclose(np.asarray(g["b"]), u, rtol=1e-12)


# ----------------------------------------------------------------------------- misuse


def _raises(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


MISUSE = {
    "f-returns-the-wrong-shape": (ValueError, r"`f` must return a pytree shaped like `z0`",
                                  lambda: deq.fixed_point(lambda z, a: z[:2], jnp.zeros(3), None)),
    "integer-z0": (TypeError, "floating point", lambda: deq.fixed_point(tanh_half, jnp.zeros(3, jnp.int32), jnp.ones(3))),
    "complex-z0": (TypeError, "real, not complex", lambda: deq.fixed_point(lambda z, a: z, jnp.zeros(3, jnp.complex64), None)),
    "batch_axis-1": (ValueError, "`batch_axis` must be None", lambda: deq.fixed_point(tanh_half, jnp.zeros(3), jnp.ones(3), batch_axis=1)),
    "batch_axis-True": (ValueError, "`batch_axis`", lambda: deq.fixed_point(tanh_half, jnp.zeros(3), jnp.ones(3), batch_axis=True)),
    "throw-a-string": (TypeError, "`throw` must be a bool", lambda: deq.fixed_point(tanh_half, jnp.zeros(3), jnp.ones(3), throw="yes")),
    "check_batch-a-string": (TypeError, "`check_batch` must be a bool",
                             lambda: deq.fixed_point(tanh_half, jnp.zeros((2, 3)), jnp.ones((2, 3)), batch_axis=0, check_batch="y")),
    "gmres-as-forward-solver": (TypeError, "GMRES solves linear systems", lambda: deq.fixed_point(tanh_half, jnp.zeros(3), jnp.ones(3), solver=deq.GMRES())),
    "unknown-keyword": (TypeError, "Did you mean `solver`", lambda: deq.fixed_point(tanh_half, jnp.zeros(3), jnp.ones(3), solvr=deq.Anderson())),
    "negative-rtol": (ValueError, "`rtol` must be a finite non-negative", lambda: deq.Anderson(rtol=-1.0)),
    "max_steps-zero": (ValueError, "`max_steps` must be an integer >= 1", lambda: deq.Broyden(max_steps=0)),
    "divergence_limit-below-one": (ValueError, "`divergence_limit` must lie in", lambda: deq.FixedPointIteration(divergence_limit=0.5)),
    "backward-as-a-string": (TypeError, "`backward` must be a deq backward strategy",
                             lambda: deq.fixed_point(tanh_half, jnp.zeros(3), jnp.ones(3), backward="ift")),
    "f-not-callable": (TypeError, "`f` must be callable", lambda: deq.fixed_point(3, jnp.zeros(3), None)),
    "leaves-of-different-batch-sizes": (ValueError, "same leading \\(batch\\) size",
                                        lambda: deq.fixed_point(lambda z, a: z, {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))}, None, batch_axis=0)),
    "RESULTS-called-like-an-enum": (TypeError, r"RESULTS.name\(code\)", lambda: deq.RESULTS(0)),
    "ift-solver-a-string": (TypeError, "IFT: `solver` must be a deq solver", lambda: deq.IFT(solver="anderson")),
}
for _k, (_exc, _match, _fn) in MISUSE.items():
    CASES[f"misuse/{_k}"] = (lambda e, m, f: lambda: _raises(e, m, f))(_exc, _match, _fn)


@case("misuse/result-names-and-summary-are-readable")
def _():
    assert [deq.RESULTS.name(c) for c in range(4)] == ["CONVERGED", "MAX_STEPS", "NONFINITE", "DIVERGED"]
    assert deq.RESULTS.name(9) == "UNKNOWN(9)"
    a = jnp.ones((3, 2)).at[0].set(jnp.nan)
    line = deq.fixed_point(tanh_half, jnp.zeros((3, 2)), a, batch_axis=0).stats.summary()
    assert "2/3 converged" in line and "1 NONFINITE" in line and "nan" not in line.split("largest residual")[1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_case(name):
    CASES[name]()


def test_the_suite_is_large_enough():
    assert len(CASES) >= 60, len(CASES)
