"""banax (JAX/Equinox DEQ library) on the saved problem of ``benchmarks.solvers``: one JSON object.

Run by an interpreter that has ``banax`` (it needs Python >= 3.12; ``deq`` is not imported and
need not be installed there)::

    python benchmarks/banax_peer.py --problem benchmarks/results/solvers_problem.npz \
        [--reference REF.npz] [--repeats 50] [--rounds 5] [--no-tune]

``benchmarks.solvers --profile full`` runs it in a subprocess with the interpreter named by
``DEQ_BANAX_PYTHON`` (or ``.venv-banax/bin/python`` at the repository root, when it exists) and
stores the object under the JSON's ``banax`` key. Set up that interpreter with::

    PYENV_VERSION=3.12.1 python3.12 -m venv .venv-banax
    .venv-banax/bin/pip install banax "jax==<the main venv's jax>" "jaxlib==<same>"

Problem: ``z = tanh(z W^T + x U^T + b)`` with ``W = W_contractive`` or ``W_hard`` from the npz,
float32, ``z0 = 0``, the whole batch as one vector (banax flattens the state; its norms are
over the whole pytree).

Stopping test, as in ``benchmarks.solvers``: ``||f(z) - z||_2 <= 1e-4`` over the whole batch,
at most 500 steps. banax's ``Solver._solve`` keeps looping while ``abs_err > atol`` (when
``atol > 0``) and ``rel_err > rtol`` (when ``rtol > 0``), with ``abs_err = ||f(x_k) - x_k||_2``
computed in float32 at the iterate ``x_k`` it returns; ``rtol=0, atol=1e-4, max_steps=500``
therefore tests exactly ``||f(x_k) - x_k||_2 <= 1e-4`` at the returned point (it returns the
last iterate, not the lowest-residual one). ``steps`` is banax's ``stats.steps`` (calls of
``step``); ``f_evals`` counts ``f`` calls: ``steps + 1`` (``init`` evaluates ``f(x0)``), and
``2 steps + 1`` for ``Reversible`` (two ``f`` calls per step). Every final residual is
recomputed here in float64 NumPy.

Backward: ``grad`` of ``sum(z*)`` with respect to ``(W, U, b)``. Solver rows use banax's
``Implicit`` adjoint (IFT), whose backward iterates ``lambda <- g + J_f^T lambda`` with its
``b_solver``; it has no default, and it is set like ``deq.IFT()``'s default adjoint solve:
``Anderson(rtol=1e-4, atol=0, max_steps=100)`` (relative 1e-4, 100 steps). Backward rows (the
strategies with a ``deq`` counterpart): ``JFB`` (``deq.JFB``), ``UnrollPhantom`` with
``Relaxed(damp=0.5, max_steps=5, rtol=0, atol=0, loop_kind="bounded")`` (= ``deq.PhantomGrad()``:
5 differentiated damped steps from ``z*``), ``GDEQ`` (Broyden-preconditioned JFB; deq's is issue
15 item 4) and ``Reversible`` (``deq.Reversible`` with ``deq.ReversibleIteration``).

Gradient error: ``||g - g_ref|| / ||g_ref||`` with ``g_ref`` the reference gradient of
``benchmarks.solvers`` (deq Anderson to ``atol=1e-5`` and a GMRES adjoint to ``rtol=1e-7``, float32)
when ``--reference`` gives it (arrays ``contractive``, ``hard``: flattened ``(W, U, b)`` grads);
always also against an independent float64 reference computed here without any solver library
(``grad_rel_error_f64``): per batch row, Newton's method on ``tanh(W z + U x + b) - z`` to
machine precision, then the adjoint ``(I - J^T) lambda = 1`` with ``J = diag(1 - z*^2) W`` by a
dense solve (the rows are independent, so the Jacobian is block diagonal with 256 x 256 blocks).

Tuning: banax's Anderson and Broyden are also run on a small grid (Anderson ``depth x ridge``,
Broyden ``history_size x spectral_clip``; forward only, untimed) and the configuration with the
fewest steps summed over both problems among those that converge on both (ties: grid order, banax's
defaults first) is timed as ``banax.Anderson(tuned)`` / ``banax.Broyden(tuned)`` unless it is the
defaults. banax's best-tuned solver (``benchmarks.solvers``' targets) is its converged solver row
with the fewest steps.

Timing: each function is jitted and called once (``compile_s``: the first call); then
``rounds`` rounds, each giving every function one untimed call and ``repeats // rounds`` timed
calls (interleaved so that load changes hit every function alike). Reported: median, IQR and
minimum of the wall-clock times and the median process CPU time. Functions whose warm call takes
more than 50 ms (the non-converging 500-step rows) get one timed call per round. The load average
is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable

import numpy as np

TOL = 1e-4
MAX_STEPS = 500
PROBLEMS = ("contractive", "hard")
#: The IFT adjoint's backward solver, set like deq.IFT()'s default (relative 1e-4, 100 steps).
B_SOLVER = {"rtol": 1e-4, "atol": 0.0, "max_steps": 100}
#: The tuning grids; the first entry of each is banax's defaults.
ANDERSON_GRID = [{"depth": d, "ridge": r} for d in (5, 10, 20) for r in (1e-6, 1e-8, 1e-10)]
#: Functions slower than this (one warm call) get one timed call per round, not ``repeats // rounds``.
SLOW_S = 0.05
BROYDEN_GRID = [{"history_size": h, "spectral_clip": c} for h in (10, 20, 40) for c in (1.5, None)]


# --------------------------------------------------------------------------
# The problem and the float64 reference (NumPy only)
# --------------------------------------------------------------------------


def load_problem(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: np.asarray(d[k]) for k in d.files}


def params_of(arrays: dict[str, np.ndarray], problem: str) -> tuple[np.ndarray, ...]:
    return tuple(arrays[k] for k in (f"W_{problem}", "U", "b", "x"))


def residual64(z, params) -> float:
    """``||f(z) - z||_2`` over the whole batch, in float64 NumPy."""
    W, U, b, x = (np.asarray(a, np.float64) for a in params)
    z = np.asarray(z, np.float64)
    return float(np.linalg.norm(np.tanh(z @ W.T + x @ U.T + b) - z))


def reference64(params, iters: int = 60) -> tuple[np.ndarray, np.ndarray, float]:
    """Fixed point and gradient of ``sum(z*)`` w.r.t. ``(W, U, b)`` in float64, by dense linear algebra.

    Newton per batch row on ``g(z) = tanh(W z + c) - z`` (``c = U x + b``), then the adjoint
    ``(I - J^T) lambda = 1`` with ``J = diag(d) W``, ``d = 1 - z*^2``; with ``r = d * lambda``
    the gradients are ``dW = R^T Z``, ``dU = R^T X``, ``db = sum_rows R``.

    Returns ``(z*, flat gradient (W, U, b), residual ||f(z*) - z*||_2)``.
    """
    W, U, b, x = (np.asarray(a, np.float64) for a in params)
    c = x @ U.T + b
    z = np.zeros_like(c)
    eye = np.eye(W.shape[0])
    for _ in range(iters):
        fz = np.tanh(z @ W.T + c)
        g = fz - z
        if np.linalg.norm(g) < 1e-14:
            break
        J = (1.0 - fz**2)[:, :, None] * W[None]  # (batch, hidden, hidden): rows of diag(d) W
        z = z - np.linalg.solve(J - eye, g[..., None])[..., 0]
    fz = np.tanh(z @ W.T + c)
    d = 1.0 - fz**2
    JT = np.transpose(d[:, :, None] * W[None], (0, 2, 1))
    lam = np.linalg.solve(eye - JT, np.ones_like(z)[..., None])[..., 0]
    r = d * lam
    grad = np.concatenate([(r.T @ fz).ravel(), (r.T @ x).ravel(), r.sum(0)])
    return fz, grad, residual64(fz, params)


def rel_error(g, ref) -> float:
    g = np.asarray(g, np.float64)
    return float(np.linalg.norm(g - ref) / np.linalg.norm(ref))


# --------------------------------------------------------------------------
# banax configurations
# --------------------------------------------------------------------------


def _forward_kw() -> dict[str, Any]:
    return {"rtol": 0.0, "atol": TOL, "max_steps": MAX_STEPS}


def make_configs(banax_solver, banax_adjoint, tuned: dict[str, dict[str, Any]],
                 b_rtols: tuple[float, ...] = ()) -> dict[str, dict[str, Any]]:
    """``{row name: {"adjoint": banax Adjoint, "deq": counterpart, "kind": solver|backward, ...}}``."""
    S, A = banax_solver, banax_adjoint
    kw = _forward_kw()
    b_solver = S.Anderson(**B_SOLVER)

    def implicit(solver):
        return A.Implicit(solver=solver, b_solver=b_solver)

    rows = {
        "banax.Picard": dict(solver=S.Picard(**kw), deq="deq.FixedPointIteration"),
        "banax.Relaxed(damp=0.8)": dict(solver=S.Relaxed(damp=0.8, **kw), deq="deq.FixedPointIteration(damping=0.8)"),
        "banax.Reversible(damp=0.8)": dict(solver=S.Reversible(damp=0.8, **kw), deq="deq.ReversibleIteration(damping=0.8)"),
        "banax.Broyden": dict(solver=S.Broyden(**kw), deq="deq.Broyden"),
        "banax.Anderson": dict(solver=S.Anderson(**kw), deq="deq.Anderson"),
    }
    if "anderson" in tuned:
        rows["banax.Anderson(tuned)"] = dict(solver=S.Anderson(**tuned["anderson"], **kw), deq="deq.Anderson",
                                             tuned=tuned["anderson"])
    if "broyden" in tuned:
        rows["banax.Broyden(tuned)"] = dict(solver=S.Broyden(**tuned["broyden"], **kw), deq="deq.Broyden",
                                            tuned=tuned["broyden"])
    out = {}
    for name, r in rows.items():
        out[name] = {**r, "kind": "solver", "adjoint": implicit(r["solver"]),
                     "backward": f"Implicit(b_solver=Anderson({B_SOLVER}))", "backward_deq": "deq.IFT()"}
    anderson = S.Anderson(**kw)
    for rtol in b_rtols:  # the IFT adjoint solved tighter (e.g. to deq.IFT()'s derived tolerance)
        b = {**B_SOLVER, "rtol": rtol}
        out[f"banax.Anderson + Implicit(b rtol={rtol:g})"] = dict(
            kind="backward", solver=anderson, adjoint=A.Implicit(solver=anderson, b_solver=S.Anderson(**b)),
            deq="deq.Anderson", backward=f"Implicit(b_solver=Anderson({b}))", backward_deq="deq.IFT()")
    phantom = S.Relaxed(damp=0.5, max_steps=5, rtol=0.0, atol=0.0, loop_kind="bounded")
    out["banax.Anderson + JFB"] = dict(kind="backward", solver=anderson, adjoint=A.JFB(solver=anderson),
                                       deq="deq.Anderson", backward="JFB", backward_deq="deq.JFB()")
    out["banax.Anderson + UnrollPhantom(5, 0.5)"] = dict(
        kind="backward", solver=anderson, adjoint=A.UnrollPhantom(solver=anderson, b_solver=phantom),
        deq="deq.Anderson", backward="UnrollPhantom(b_solver=Relaxed(damp=0.5, max_steps=5, rtol=0, atol=0, "
                                     "loop_kind='bounded'))", backward_deq="deq.PhantomGrad(steps=5, damping=0.5)")
    broyden = S.Broyden(**kw)
    out["banax.Broyden + GDEQ"] = dict(kind="backward", solver=broyden, adjoint=A.GDEQ(solver=broyden),
                                       deq="deq.Broyden", backward="GDEQ (Broyden-preconditioned JFB)",
                                       backward_deq="none yet (issue 15 item 4)")
    for damp in (0.5, 0.8):
        rev = S.Reversible(damp=damp, **kw)
        out[f"banax.Reversible(damp={damp}) + Reversible"] = dict(
            kind="backward", solver=rev, adjoint=A.Reversible(solver=rev), deq=f"deq.ReversibleIteration(damping={damp})",
            backward="Reversible", backward_deq="deq.Reversible()")
    return out


def _cell(z, W, U, b, x):
    import jax.numpy as jnp

    return jnp.tanh(z @ W.T + x @ U.T + b)


def make_fns(adjoint, z0_shape) -> tuple[Callable, Callable]:
    """Jitted ``forward(W, U, b, x) -> (z, steps)`` and ``forward_backward(W, U, b, x) -> grads``."""
    import jax
    import jax.numpy as jnp

    def solve(W, U, b, x):
        sol = adjoint((_cell, (W, U, b, x)), jnp.zeros(z0_shape, jnp.float32))
        return sol.value, sol.stats.steps

    def loss(W, U, b, x):
        return jnp.sum(solve(W, U, b, x)[0])

    return jax.jit(solve), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def f_evals_of(name: str, steps: int) -> int:
    return 2 * steps + 1 if "Reversible" in name else steps + 1


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


def _block(out):
    import jax

    return jax.block_until_ready(out)


def _stats(ts: list[float]) -> dict[str, float]:
    a = np.asarray(ts, np.float64)
    q25, q75 = np.percentile(a, [25, 75])
    return {"median_s": float(np.median(a)), "iqr_s": float(q75 - q25), "min_s": float(a.min()), "repeats": int(a.size)}


def tune(banax_solver, problems, z0_shape, log) -> tuple[dict[str, dict], dict[str, Any]]:
    """The grids (forward only): steps and residual per configuration and problem; the chosen ones."""
    import banax.adjoint as A

    kw = _forward_kw()
    grid_out, chosen = {}, {}
    for key, cls, grid in (("anderson", banax_solver.Anderson, ANDERSON_GRID),
                           ("broyden", banax_solver.Broyden, BROYDEN_GRID)):
        rows = []
        for cfg in grid:
            fwd, _ = make_fns(A.JFB(solver=cls(**cfg, **kw)), z0_shape)
            row = {"config": cfg}
            for p, params in problems.items():
                z, steps = _block(fwd(*params))
                res = residual64(z, params)
                row[p] = {"steps": int(steps), "final_residual": res, "converged": bool(np.isfinite(res) and res <= TOL)}
            rows.append(row)
            log(f"[banax] tune {key} {cfg}: " + ", ".join(f"{p} {row[p]['steps']} steps {row[p]['final_residual']:.2e}"
                                                          for p in problems))
        both = [r for r in rows if all(r[p]["converged"] for p in problems)]
        pool = both or [r for r in rows if r["contractive"]["converged"]]
        ps = list(problems) if both else ["contractive"]
        best = min(pool, key=lambda r: sum(r[p]["steps"] for p in ps)) if pool else None  # ties: grid order
        if best is not None and best is not rows[0]:  # rows[0] is banax's defaults: timed as it is
            chosen[key] = best["config"]
        grid_out[key] = {"grid": rows, "chosen": best and best["config"],
                         "timed_as_tuned_row": key in chosen,
                         "rule": "fewest steps summed over both problems among configurations converged on both "
                                 "(else contractive steps among those converged there); ties: the first in grid "
                                 "order (banax's defaults first, then smaller depth / history); no tuned row when "
                                 "the choice is banax's defaults"}
    return chosen, grid_out


def measure(configs, problems, z0_shape, repeats: int, rounds: int, refs: dict, refs64: dict, log) -> dict:
    fns, compile_s, outs, probe = {}, {}, {}, {}
    for name, c in configs.items():
        fwd, fb = make_fns(c["adjoint"], z0_shape)
        for kind, fn in (("fwd", fwd), ("fb", fb)):
            for p, params in problems.items():
                t0 = time.perf_counter()
                outs[(name, p, kind)] = _block(fn(*params))
                compile_s[(name, p, kind)] = time.perf_counter() - t0
                t0 = time.perf_counter()
                _block(fn(*params))
                probe[(name, p, kind)] = time.perf_counter() - t0
                fns[(name, p, kind)] = (fn, params)
        log(f"[banax] compiled {name}")
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    per_round = max(1, repeats // rounds)
    for r in range(rounds):
        for key, (fn, params) in fns.items():
            _block(fn(*params))
            for _ in range(per_round if probe[key] <= SLOW_S else 1):
                c0, t0 = time.process_time(), time.perf_counter()
                _block(fn(*params))
                times[key].append(time.perf_counter() - t0)
                cpu[key].append(time.process_time() - c0)
        log(f"[banax] timing round {r + 1}/{rounds}")
    results = {p: {} for p in problems}
    for name, c in configs.items():
        for i, (p, params) in enumerate(problems.items()):
            z, steps = outs[(name, p, "fwd")]
            steps = int(steps)
            final = residual64(z, params)
            g = np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in outs[(name, p, "fb")]])
            tf, tb = _stats(times[(name, p, "fwd")]), _stats(times[(name, p, "fb")])
            rec = {
                "library": "banax", "kind": c["kind"], "deq_counterpart": c["deq"],
                "solver": repr(c["solver"]), "backward": c["backward"], "backward_deq_counterpart": c["backward_deq"],
                "steps": steps, "f_evals": f_evals_of(name, steps), "final_residual": final,
                "converged": bool(np.isfinite(final) and final <= TOL),
                "forward_s": tf["median_s"], "forward_iqr_s": tf["iqr_s"], "forward_min_s": tf["min_s"],
                "forward_cpu_s": float(np.median(cpu[(name, p, "fwd")])),
                "forward_backward_s": tb["median_s"], "forward_backward_iqr_s": tb["iqr_s"],
                "forward_backward_min_s": tb["min_s"],
                "forward_backward_cpu_s": float(np.median(cpu[(name, p, "fb")])),
                "backward_s": tb["median_s"] - tf["median_s"],
                "repeats": tf["repeats"],
                "first_call_s": {"forward": compile_s[(name, p, "fwd")], "forward_backward": compile_s[(name, p, "fb")]},
                "compile_note": ("first call of the jitted function: compile + one run" if i == 0 else
                                 "same shapes as the first problem: the executable is reused (no compile)"),
                "grad_finite": bool(np.all(np.isfinite(g))),
                "grad_rel_error": rel_error(g, refs[p]) if p in refs else None,
                "grad_rel_error_f64": rel_error(g, refs64[p]),
            }
            if "tuned" in c:
                rec["tuned"] = c["tuned"]
            results[p][name] = rec
    return results


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", required=True, help="benchmarks.solvers' saved problem (.npz)")
    ap.add_argument("--reference", default=None, help=".npz with arrays contractive, hard: reference gradients")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-tune", action="store_true", help="skip the Anderson / Broyden grids")
    ap.add_argument("--b-rtol", type=float, action="append", default=[],
                    help="also a backward row banax.Anderson + Implicit with this b_solver rtol (repeatable); "
                         "deq.IFT()'s default derives rtol = atol_f / ||f(z*)|| = 1e-4 / 43 = 2.3e-6 on this problem")
    ap.add_argument("--out", default=None, help="also write the JSON object to this file")
    args = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    load = {"start": _loadavg()}

    import banax.adjoint as banax_adjoint  # first: without banax this fails before JAX starts
    import banax.solver as banax_solver
    import jax
    import jax.numpy as jnp

    arrays = load_problem(args.problem)
    batch, hidden = arrays["x"].shape[0], arrays["W_contractive"].shape[0]
    z0_shape = (batch, hidden)
    problems = {p: tuple(jnp.asarray(a, jnp.float32) for a in params_of(arrays, p)) for p in PROBLEMS}
    refs, ref_info = {}, {}
    if args.reference:
        with np.load(args.reference) as d:
            refs = {p: np.asarray(d[p], np.float64) for p in PROBLEMS if p in d.files}
    refs64 = {}
    for p in PROBLEMS:
        _, refs64[p], res = reference64(params_of(arrays, p))
        ref_info[p] = {"f64_forward_residual": res,
                       "parent_vs_f64_rel": rel_error(refs[p], refs64[p]) if p in refs else None}

    chosen, grid = ({}, {"status": "skipped (--no-tune)"}) if args.no_tune else tune(banax_solver, problems, z0_shape, log)
    load["after_tuning"] = _loadavg()
    configs = make_configs(banax_solver, banax_adjoint, chosen, tuple(args.b_rtol))
    results = measure(configs, problems, z0_shape, args.repeats, args.rounds, refs, refs64, log)
    load["end"] = _loadavg()
    try:
        from importlib.metadata import version
        versions = {k: version(k) for k in ("banax", "equinox", "jax", "jaxlib", "numpy")}
    except Exception as e:  # noqa: BLE001 -- provenance only
        versions = {"error": repr(e)}
    payload = {
        "status": "measured",
        "versions": versions, "python": platform.python_version(), "executable": sys.executable,
        "backend": jax.default_backend(), "x64": bool(jax.config.jax_enable_x64),
        "problem": {"npz": os.path.basename(args.problem), "batch": batch, "hidden": hidden, "dtype": "float32"},
        "stopping": (f"banax Solver(rtol=0, atol={TOL}, max_steps={MAX_STEPS}): stops when ||f(x_k)-x_k||_2 <= {TOL} "
                     "(float32, whole state) at the returned last iterate x_k, the same test as benchmarks.solvers"),
        "steps_note": "steps = banax stats.steps; f_evals = steps + 1 (2 steps + 1 for Reversible)",
        "backward_note": (f"solver rows: Implicit(solver, b_solver=Anderson({B_SOLVER})), set like deq.IFT()'s default "
                          "adjoint solve; backward rows: the named adjoint"),
        "reference": {
            "grad_rel_error": ("against benchmarks.solvers' reference (deq Anderson atol=1e-5 + IFT(GMRES(rtol=1e-7)), "
                               "float32), passed in with --reference" if refs else "not given (no --reference)"),
            "grad_rel_error_f64": "against a float64 dense reference computed here (Newton per row + dense adjoint)",
            **ref_info},
        "tuning": grid,
        "timing": {"repeats": args.repeats, "rounds": args.rounds, "per_round": max(1, args.repeats // args.rounds),
                   "untimed_calls_per_round": 1, "statistic": "median / IQR / min wall, median process CPU"},
        "results": results,
        "load_average": load,
        "run_time_s": time.perf_counter() - t_start,
    }
    text = json.dumps(payload, default=float)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)
    return payload


if __name__ == "__main__":
    main()
