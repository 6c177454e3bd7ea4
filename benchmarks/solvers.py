"""Forward solvers side by side: deq vs jaxopt vs optimistix (vs torchdeq) on one seeded DEQ cell.

Run ``python -m benchmarks.solvers --profile smoke|quick|full`` (``--out DIR``,
``--seed``, ``--no-plot``).

Problem (one seeded instance, saved to ``<out>/solvers_problem.npz``)::

    z = tanh(z W^T + x U^T + b),   z: (batch, hidden), x: (batch, input), float32

solved as ONE vector (the whole batch; ``batch_axis=None`` for deq) from ``z0 = 0``,
with two recurrent matrices of the same construction:

* ``contractive``: ``||W||_2 = 0.95``;
* ``hard``: ``||W||_2 = 1.1``.

``W = -s * Q |Lambda| Q^T / max|Lambda|`` where ``Q Lambda Q^T`` is the eigendecomposition of
a symmetric Gaussian matrix: a symmetric, negative semi-definite ("inhibitory") coupling whose
spectral radius *equals* its spectral norm ``s``. This construction is deliberate: for a plain
Gaussian ``W`` rescaled to ``||W||_2 = s`` the spectral radius is only about ``s / 2`` and the
tanh saturates, so plain iteration converges in 15-18 steps even at ``s = 1.1`` (measured every
quick/full run, see ``generator_check`` in the JSON), which would make neither problem informative.
With the construction above the linearised iteration has eigenvalues down to ``-s``: at
``s = 0.95`` plain iteration converges slowly (oscillating), at ``s = 1.1`` it oscillates without
converging, while the root problem ``f(z) - z = 0`` stays well conditioned (eigenvalues of
``J_f - I`` in ``[-1 - s, -1]``), so Anderson and Broyden should converge.
``U ~ N(0, 0.25 / input)``, ``b ~ N(0, 0.05^2)``, ``x ~ N(0, 1)``.

Stopping test, the same for every solver: ``||f(z) - z||_2 <= 1e-4`` over the whole batch
(absolute), at most ``max_steps = 500`` iterations. How each library is set up to test exactly
that (read from the installed sources):

* deq: ``rtol=0, atol=1e-4, batch_axis=None``; the loop tests ``||f(x_k) - x_k||`` at the
  iterate it returns (the lowest-residual one).
* jaxopt ``FixedPointIteration``: ``error = ||f(x_k) - x_k||``, returns ``x_{k+1} = f(x_k)``;
  ``tol=1e-4`` (the returned point is one contraction better than the test).
* jaxopt ``AndersonAcceleration``: ``error = ||f(y_k) - y_k||`` at the extrapolated point
  ``y_k``, returns ``f(y_k)``; ``tol=1e-4``. The first ``history_size`` steps are plain
  iterations (jaxopt's design).
* jaxopt ``Broyden``: root finding on ``g(z) = f(z) - z``, ``error = ||g(x_k)||`` at the
  returned point; ``tol=1e-4``; defaults otherwise (backtracking line search on ``||g||^2`` with
  gradients, ``history_size = maxiter``).
* optimistix ``FixedPointIteration``: ``norm=optx.two_norm, rtol=0, atol=1e-4`` gives
  ``||y_k - f(y_k)||_2 < 1e-4``; returns ``f(y_k)``.
* torchdeq (PyTorch; optional, the ``peers`` extra: ``pip install -e '.[peers]'``; when
  ``import torch, torchdeq`` fails one line says so and the JSON's ``torchdeq`` entry records
  why): ``torchdeq.get_deq(f_solver=..., f_max_iter=500, f_tol=1e-4, f_stop_mode='abs', ...)``
  applied to the batch packed into ONE row, shape ``(1, batch*hidden)``, with ``W, U, b, x``
  from the saved arrays (float32). Its solvers flatten ``z`` to ``(rows, -1)`` and stop when
  the largest per-row ``||f(z) - z||_2`` is ``< tol``; one row makes that the whole-batch norm.
  ``fixed_point_iter`` tests ``||f(x_k) - x_k||`` and returns ``f(x_k)``. ``anderson`` (its
  defaults ``m=6, lam=1e-4, tau=1``) spends its first two ``f`` calls on plain iteration, then
  tests ``||f(y_k) - y_k||`` at the mixed point and returns ``f(y_k)``; it counts those two calls
  as steps, so its ``steps`` equal its ``f`` evaluations. ``broyden`` (defaults: no line search,
  ``LBFGS_thres = max_iter``, i.e. full memory) tests ``||g(x_k)||`` at the point it returns, and
  also stops, after more than 30 steps, when the residual is below ``3 * tol`` and improved less
  than 1.3x over the last 30 steps (a rule of its own that no argument turns off; such a stop
  shows as not converged). All three return their lowest-residual iterate (``return_final``
  False). ``max_iter = 500`` bounds ``f`` evaluations for iteration and Anderson, steps for
  Broyden. torch runs on the CPU with ``torch.set_num_threads`` = the CPUs this process may use
  (the size of XLA's CPU thread pool), or on CUDA when JAX runs on a GPU and torch sees one.
  ``OMP_WAIT_POLICY=PASSIVE`` is set before torch is first imported (unless already set; the
  JSON records it): with libgomp's default spin-waiting, on the shared 2-core machine every
  multi-threaded torch op waited for a descheduled thread (a 64x256 @ 256x256 matmul took
  3-26 ms instead of 0.25 ms; a 6x64 Gram matrix 16-20 ms).

Every final residual is recomputed here, in float64 NumPy, from the returned ``z``.

Backward: ``grad`` of ``sum(z*)`` with respect to ``(W, U, b)``. deq: default
``deq.IFT()`` (adjoint fixed point solved with its default solver, recorded in the JSON; its
tolerance is derived from the forward solve's). Two more deq rows (``quick``/``full``) keep
``deq.Anderson``'s forward and fix the adjoint's relative tolerance: ``deq.Anderson+IFT(rtol=1e-4)``
(deq's earlier default) and ``deq.Anderson+IFT(rtol=3e-5)``, the like-for-like accuracy row, whose
gradient error matches jaxopt's tuned Anderson's (calibrated on this problem). jaxopt: its
implicit differentiation (``custom_root``) with its default linear solver (normal-equation CG,
``jax.scipy`` CG ``tol=1e-5``). optimistix: ``ImplicitAdjoint(linear_solver=lineax.GMRES(
rtol=1e-5, atol=1e-7))`` (matrix-free); its default ``ImplicitAdjoint()`` materialises the
``(batch*hidden)^2`` Jacobian (a 1 GiB float32 matrix here) and is measured only in the ``full``
profile, in a subprocess with a timeout. torchdeq: its IFT (``ift=True``: a
``torch.autograd.Function`` whose backward solves ``u = u J_f(z*) + g`` with ``b_solver``), set
like deq's default ``IFT()``: ``b_solver='anderson', b_stop_mode='rel', b_tol=1e-4,
b_max_iter=100``. Its defaults (``b_solver='fixed_point_iter', b_max_iter=40, b_tol=1e-6``
absolute) are not used for the comparison: plain iteration on ``u J_f`` does not converge on the
hard problem and is slow on the contractive one (measured while writing this: relative gradient
error 0.31 and 0.002 at the smoke size; at the quick size 5.5% and 0.02% away from the gradient
of the setting above); the gradient error they give is recorded once per problem
(``torchdeq.default_backward``, untimed). In training mode torchdeq returns
``f(z*)`` (one more ``f`` call, the anchor of its IFT graph), so its forward+backward is the
gradient of ``sum(f(z*))``; its forward alone is timed in eval mode, which returns ``z*``. Each
gradient is compared with a reference gradient (deq Anderson at ``atol=1e-5`` +
``IFT(GMRES(rtol=1e-7))``).

Timings: every jitted function is first called once (``compile_s``, via ``_common.time_fn``;
JAX's caches are cleared once before the compile phase); then the timed calls are interleaved
over all functions in rounds (``_common.time_fn`` per function per round), so that changes of
machine load hit every solver alike. Reported per solver: median (``forward_s``,
``forward_backward_s``), IQR and minimum of the wall-clock times, and the median process CPU
time of the same calls (``*_cpu_s``; much less sensitive to other jobs on a shared machine).
``overhead = forward_s / (steps * f_eval_s)`` with ``f_eval_s`` the median time of one jitted
call of ``f`` (as specified; a single call includes dispatch, so this flatters every solver);
``overhead_loop*`` divide by the number of ``f`` evaluations times the per-evaluation time of
``f`` inside a compiled loop of 10 (wall median / wall min / CPU median): the stricter numbers.
``ift_backward_s = forward_backward_s - forward_s``. Memory: ``_common.xla_memory`` of the
compiled forward and forward+backward functions. The machine's load average is recorded.
torchdeq's functions (eager PyTorch, synchronised on CUDA) join the same interleaved rounds;
torch has no compile step, so their ``compile_s`` is null (the untimed first call is in
``first_call_s``), their ``memory`` is null (XLA's analysis only), and their overheads divide
by the times of one eager torch ``f`` call (``f_eval.torch`` in the JSON).

Residual traces (quick/full; deq also in smoke): deq's ``stats.residual_history``; for peers the
library's own ``init_state/update`` (``init/step`` for optimistix) is stepped from Python with
the same settings, recomputing ``||f(z) - z||`` of the iterate the library would return after
each step. torchdeq (every profile, one untimed solve): its solver function is called
directly, as ``get_deq`` calls it (``torch.no_grad``, same arguments), with ``indexing`` naming
every step, which makes it keep the iterate it would return after each step; their residuals
are recomputed in float64 NumPy (its Anderson would return ``z0`` after its first two steps).
The time axis of the plot is ``k * forward_min_s / steps``.

banax (``full`` profile; JAX/Equinox, needs Python >= 3.12): ``benchmarks/banax_peer.py`` runs in
a subprocess (timeout 900 s) with the interpreter ``DEQ_BANAX_PYTHON`` names, else
``.venv-banax/bin/python`` at the repository root when it exists (set up with
``PYENV_VERSION=3.12.1 python3.12 -m venv .venv-banax && .venv-banax/bin/pip install banax
jax==<this jax> jaxlib==<this jaxlib>``), on the saved problem with the same stopping test (its
``Solver(rtol=0, atol=1e-4, max_steps=500)`` tests ``||f(x_k) - x_k||_2 <= 1e-4`` at the iterate it
returns) and the reference gradients passed in an .npz; its JSON object is stored under ``banax``
(the script's docstring says what each row runs). Without such an interpreter one line says
``banax: skipped (...)`` and the record is ``{"status": "skipped", "reason": ...}``. Its targets
compare ``deq.Anderson`` at its defaults with banax's best-tuned solver (its converged solver row
with the fewest steps, the tuned Anderson/Broyden grids included): no more steps, forward <= 0.6x
and forward+backward <= 0.5x (median wall; min-wall and CPU ratios beside). banax is timed in its
own process after deq's rows: the machine's load may differ between the two (both are recorded).

The ``quick``/``full`` profiles also time the pieces of an Anderson step at the problem's shapes
inside compiled loops (``anderson_breakdown``) to show where its per-step time goes, and the
``full`` profile measures, each in a subprocess with a timeout, optimistix's default
``ImplicitAdjoint()`` and jaxopt's ``Broyden`` at its defaults (both too slow for the main loop).

Mixed precision (``precision`` in the JSON, ``quick``/``full``): the contractive problem with the
cell's weights and input in bfloat16 against float32, solved by ``deq.Anderson`` and
``deq.FixedPointIteration`` with float32 solver state (the default, ``solver_dtype=None``) and, for
the bfloat16 cell, bfloat16 solver state (``solver_dtype=jnp.bfloat16``): the residual floor (the
lowest ``||f(z_k) - z_k|| / ||z*||`` of a 200-step budget run) and the error there against the
float64 fixed point, steps to relative residuals 1e-2 / 1e-3 / 1e-4, and a solve with ``rtol=1e-2``
(steps, converged, error, median time; on this machine's CPU, which has no fast bfloat16).
"""

from __future__ import annotations

from benchmarks import _common as C

NAME = "solvers"


def parse_args(argv=None):
    """The command line; it needs no JAX, so ``--help`` answers before the imports below."""
    return C.make_parser(__doc__.splitlines()[0], name=NAME).parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and bad arguments answer here, before JAX is imported; main() reparses

import os
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

import jax
import jax.numpy as jnp
TOL = 1e-4
MAX_STEPS = 500
CONTRACTIVE, HARD = "contractive", "hard"
PROBLEM_NORMS = {CONTRACTIVE: 0.95, HARD: 1.1}

#: Order of the rows of the table and the curves of the plot.
SOLVERS = (
    "deq.FixedPointIteration",
    "deq.Anderson",
    "deq.Broyden",
    "jaxopt.FixedPointIteration",
    "jaxopt.AndersonAcceleration(ridge=1e-5)",
    "jaxopt.AndersonAcceleration(ridge=1e-10)",
    "jaxopt.Broyden(stepsize=1, history_size=20)",
    "optimistix.FixedPointIteration",
    "deq.Anderson+IFT(rtol=1e-4)",
    "deq.Anderson+IFT(rtol=3e-5)",
)
JAXOPT_BROYDEN_DEFAULT = "jaxopt.Broyden(defaults)"
OURS_ANDERSON = "deq.Anderson"
#: Rows with deq.Anderson's forward and an IFT adjoint at a fixed relative tolerance instead of the
#: derived default: 1e-4, deq's earlier default; 3e-5, the like-for-like accuracy row (its gradient
#: error, 7.4e-6 in a quick run, is that of jaxopt's tuned Anderson, 7.9e-6).
OURS_OLD_ADJOINT = "deq.Anderson+IFT(rtol=1e-4)"
OURS_LIKE_FOR_LIKE = "deq.Anderson+IFT(rtol=3e-5)"
FIXED_ADJOINT_RTOL = {OURS_OLD_ADJOINT: 1e-4, OURS_LIKE_FOR_LIKE: 3e-5}


def profile_solvers(profile: str) -> tuple:
    """The rows `profile` measures: `SOLVERS`, less the fixed-adjoint rows in the smoke profile."""
    return tuple(n for n in SOLVERS if profile != "smoke" or n not in FIXED_ADJOINT_RTOL)
JAXOPT_TUNED_AA = "jaxopt.AndersonAcceleration(ridge=1e-10)"

#: The optional PyTorch peer (measured when `import torch, torchdeq` works), by its solver key.
TORCHDEQ_SOLVERS = {
    "torchdeq.FixedPointIteration": "fixed_point_iter",
    "torchdeq.Anderson": "anderson",
    "torchdeq.Broyden": "broyden",
}
TORCHDEQ_MISSING = "torchdeq not installed: pip install -e '.[peers]'"
#: torchdeq's forward arguments: the stopping test of every library.
TORCHDEQ_FORWARD = {"f_max_iter": MAX_STEPS, "f_tol": TOL, "f_stop_mode": "abs"}
#: torchdeq's IFT backward, set like deq.IFT()'s default adjoint solve (Anderson, relative 1e-4, 100 steps).
TORCHDEQ_BACKWARD = {"ift": True, "b_solver": "anderson", "b_max_iter": 100, "b_tol": 1e-4, "b_stop_mode": "rel"}


# --------------------------------------------------------------------------
# Problem
# --------------------------------------------------------------------------


def make_problem(seed: int, hidden: int, batch: int, inp: int, norms=PROBLEM_NORMS) -> dict[str, np.ndarray]:
    """The seeded problem: one base matrix, rescaled to each spectral norm in `norms`.

    Returns float32 arrays ``W_<problem>`` (hidden, hidden) for each problem, ``U`` (hidden,
    inp), ``b`` (hidden,), ``x`` (batch, inp).
    """
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((hidden, hidden))
    lam, Q = np.linalg.eigh((A + A.T) / 2)
    base = -(Q * np.abs(lam)) @ Q.T
    base /= np.linalg.norm(base, 2)
    out = {f"W_{name}": (s * base).astype(np.float32) for name, s in norms.items()}
    out["U"] = (0.5 * rng.standard_normal((hidden, inp)) / np.sqrt(inp)).astype(np.float32)
    out["b"] = (0.05 * rng.standard_normal(hidden)).astype(np.float32)
    out["x"] = rng.standard_normal((batch, inp)).astype(np.float32)
    return out


def gaussian_problem(seed: int, hidden: int, batch: int, inp: int, s: float) -> tuple[np.ndarray, ...]:
    """The literal alternative: a Gaussian W rescaled to ``||W||_2 = s`` (for `generator_check`)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((hidden, hidden))
    W = s * A / np.linalg.norm(A, 2)
    U = 0.5 * rng.standard_normal((hidden, inp)) / np.sqrt(inp)
    b = 0.05 * rng.standard_normal(hidden)
    x = rng.standard_normal((batch, inp))
    return tuple(a.astype(np.float32) for a in (W, U, b, x))


def cell(z, params):
    """The DEQ cell ``f(z) = tanh(z W^T + x U^T + b)``; ``params = (W, U, b, x)``."""
    W, U, b, x = params
    return jnp.tanh(z @ W.T + x @ U.T + b)


def _cell_args(z, W, U, b, x):
    return cell(z, (W, U, b, x))


def residual64(z, params) -> float:
    """``||f(z) - z||_2`` recomputed in float64 NumPy."""
    W, U, b, x = (np.asarray(a, np.float64) for a in params)
    z = np.asarray(z, np.float64)
    return float(np.linalg.norm(np.tanh(z @ W.T + x @ U.T + b) - z))


# --------------------------------------------------------------------------
# Solvers: each entry gives a jittable solve(W, U, b, x) -> (z, info) and a Python stepper
# --------------------------------------------------------------------------


def _deq_solver(name: str, tol: float, max_steps: int):
    import deq

    kw = dict(rtol=0.0, atol=tol, max_steps=max_steps)
    return {
        "deq.FixedPointIteration": deq.FixedPointIteration,
        "deq.Anderson": deq.Anderson,
        "deq.Broyden": deq.Broyden,
    }[name.split("+")[0]](**kw)


def _deq_backward(name: str):
    """The backward strategy of a deq row: IFT's default, or the like-for-like row's fixed tolerance."""
    import deq

    if name in FIXED_ADJOINT_RTOL:
        return deq.IFT(solver=deq.Anderson(rtol=FIXED_ADJOINT_RTOL[name], atol=0.0))
    return deq.IFT()


def _jaxopt_solver(name: str, tol: float, max_steps: int):
    import jaxopt

    if name == "jaxopt.FixedPointIteration":
        return jaxopt.FixedPointIteration(fixed_point_fun=_cell_args, maxiter=max_steps, tol=tol)
    if name.startswith("jaxopt.AndersonAcceleration"):
        ridge = float(name.split("ridge=")[1].rstrip(")"))
        return jaxopt.AndersonAcceleration(fixed_point_fun=_cell_args, maxiter=max_steps, tol=tol, ridge=ridge)
    if name.startswith("jaxopt.Broyden"):
        root = lambda z, W, U, b, x: _cell_args(z, W, U, b, x) - z  # noqa: E731
        if name == JAXOPT_BROYDEN_DEFAULT:
            return jaxopt.Broyden(fun=root, maxiter=max_steps, tol=tol)
        return jaxopt.Broyden(fun=root, maxiter=max_steps, tol=tol, stepsize=1.0, history_size=20)
    raise KeyError(name)


def _optx_solver(tol: float):
    import optimistix as optx

    return optx.FixedPointIteration(rtol=0.0, atol=tol, norm=optx.two_norm)


def _optx_fn(y, args):
    return cell(y, args)


def _optx_adjoint(default: bool = False):
    import lineax as lx
    import optimistix as optx

    if default:
        return optx.ImplicitAdjoint()
    return optx.ImplicitAdjoint(linear_solver=lx.GMRES(rtol=1e-5, atol=1e-7))


def _deq_default_backward() -> str:
    import deq

    return repr(deq.IFT())


def solver_settings(name: str) -> dict[str, Any]:
    """What each solver is run with (for the JSON)."""
    common = {"stopping": f"||f(z)-z||_2 <= {TOL} over the whole batch", "max_steps": MAX_STEPS}
    if name in FIXED_ADJOINT_RTOL:
        return {**common, "call": f"Anderson(rtol=0, atol={TOL}, max_steps={MAX_STEPS}); "
                "fixed_point(..., batch_axis=None); other settings default (the forward of deq.Anderson)",
                "backward": f"{_deq_backward(name)!r}: a fixed relative adjoint tolerance instead of the derived one",
                "note": {OURS_OLD_ADJOINT: "deq's earlier default adjoint tolerance (fixed 1e-4)",
                         OURS_LIKE_FOR_LIKE: "like-for-like accuracy row: the adjoint tolerance at which the "
                                             "gradient error matches jaxopt's tuned Anderson (calibrated on this "
                                             "problem: 1e-4 gives 4.8e-5, 3e-5 gives 7.4e-6, 1e-5 gives 2.0e-6, "
                                             "jaxopt 7.9e-6)"}[name]}
    if name.startswith("deq."):
        return {**common, "call": f"{name.split('.')[1]}(rtol=0, atol={TOL}, max_steps={MAX_STEPS}); "
                "fixed_point(..., batch_axis=None); other settings default",
                "backward": f"deq.IFT() default: {_deq_default_backward()}"}
    if name.startswith("jaxopt."):
        extra = {
            "jaxopt.Broyden(stepsize=1, history_size=20)": (
                "fun = f(z) - z; fixed step 1 (no line search) and history_size=20 (as deq.Broyden). jaxopt's "
                "defaults (backtracking line search on ||g||^2 with gradients, history_size = maxiter) take ~10 s of "
                "CPU per forward here, and with history_size=20 the line search returns NaN: they are measured "
                "separately (full profile, subprocess) under jaxopt_broyden_default"),
        }.get(name, "")
        return {**common, "call": f"{name} with tol={TOL}, maxiter={MAX_STEPS}; other settings default", "note": extra,
                "backward": "jaxopt implicit diff (custom_root), default solve = solve_normal_cg (jax.scipy cg tol=1e-5)"}
    if name.startswith("torchdeq."):
        kw = ", ".join(f"{k}={v!r}" for k, v in {"f_solver": TORCHDEQ_SOLVERS[name], **TORCHDEQ_FORWARD}.items())
        bw = ", ".join(f"{k}={v!r}" for k, v in TORCHDEQ_BACKWARD.items())
        return {**common, "call": f"torchdeq.get_deq({kw}, ...)(f, z0) on z packed as one row (1, batch*hidden); "
                "eval mode for the forward; solver settings default",
                "note": {"fixed_point_iter": "tests ||f(x_k)-x_k||, returns f(x_k) (lowest residual)",
                         "anderson": "m=6, lam=1e-4, tau=1 (defaults); steps count its two initial plain calls; tests "
                                     "the mixed point y_k, returns f(y_k) (lowest residual)",
                         "broyden": "no line search, LBFGS_thres = max_iter (defaults); also stops after > 30 steps "
                                    "when residual < 3 tol and < 1.3x progress over 30 steps"}[TORCHDEQ_SOLVERS[name]],
                "backward": f"torchdeq IFT: get_deq(..., {bw}) in training mode; grad of sum(f(z*))"}
    return {**common, "call": f"optx.fixed_point(f, FixedPointIteration(rtol=0, atol={TOL}, norm=two_norm), "
            f"max_steps={MAX_STEPS}, throw=False)",
            "backward": "optx.ImplicitAdjoint(linear_solver=lineax.GMRES(rtol=1e-5, atol=1e-7))"}


def make_solve(name: str, z0_shape: tuple[int, int], tol: float = TOL, max_steps: int = MAX_STEPS,
               optx_default_adjoint: bool = False) -> Callable:
    """``solve(W, U, b, x) -> (z, info)`` with ``info = {steps, f_evals[, history]}``; jittable."""
    if name.startswith("deq."):
        import deq

        solver, backward = _deq_solver(name, tol, max_steps), _deq_backward(name)

        def solve(W, U, b, x):
            z0 = jnp.zeros(z0_shape, jnp.float32)
            sol = deq.fixed_point(cell, z0, (W, U, b, x), solver=solver, backward=backward, batch_axis=None)
            steps = sol.stats.num_steps
            return sol.value, {"steps": steps, "f_evals": steps + 1, "history": sol.stats.residual_history}

        return solve

    if name.startswith("jaxopt."):

        def solve(W, U, b, x):
            s = _jaxopt_solver(name, tol, max_steps)
            out = s.run(jnp.zeros(z0_shape, jnp.float32), W, U, b, x)
            return out.params, {"steps": out.state.iter_num, "f_evals": out.state.num_fun_eval}

        return solve

    if name == "optimistix.FixedPointIteration":
        import optimistix as optx

        def solve(W, U, b, x):
            sol = optx.fixed_point(
                _optx_fn, _optx_solver(tol), jnp.zeros(z0_shape, jnp.float32), args=(W, U, b, x),
                max_steps=max_steps, throw=False, adjoint=_optx_adjoint(optx_default_adjoint),
            )
            steps = sol.stats["num_steps"]
            return sol.value, {"steps": steps, "f_evals": steps}

        return solve

    raise KeyError(name)


def make_grad(solve: Callable) -> Callable:
    """``(W, U, b, x) -> grad of sum(z*) w.r.t. (W, U, b)``."""
    return jax.grad(lambda W, U, b, x: jnp.sum(solve(W, U, b, x)[0]), argnums=(0, 1, 2))


def peer_trace(name: str, params: tuple, z0_shape, tol: float = TOL, max_steps: int = MAX_STEPS) -> list[float]:
    """Residual of the returned iterate after k = 0, 1, ... library steps (peers only).

    Steps the library's own state machine from Python with its own stopping rule, so the
    iterates are those of its `run`; each residual is recomputed with a jitted ``f``.
    """
    res_fn = jax.jit(lambda z, p: jnp.linalg.norm(cell(z, p) - z))
    z = jnp.zeros(z0_shape, jnp.float32)
    trace = [float(res_fn(z, params))]
    if name.startswith("jaxopt."):
        s = _jaxopt_solver(name, tol, max_steps)
        state = s.init_state(z, *params)
        for _ in range(max_steps):
            z, state = s.update(z, state, *params)
            trace.append(float(res_fn(z, params)))
            if not float(state.error) > tol:
                break
        return trace
    if name == "optimistix.FixedPointIteration":
        solver = _optx_solver(tol)
        fn = lambda y, a: (_optx_fn(y, a), None)  # noqa: E731
        f_struct = jax.eval_shape(_optx_fn, z, params)
        state = solver.init(fn, z, params, {}, f_struct, None, frozenset())
        step = jax.jit(lambda y, st, a: solver.step(fn, y, a, {}, st, frozenset())[:2])
        for _ in range(max_steps):
            z, state = step(z, state, params)
            trace.append(float(res_fn(z, params)))
            if bool(state.relative_error < 1):
                break
        return trace
    raise KeyError(name)


# --------------------------------------------------------------------------
# torchdeq (optional peer): eager PyTorch callables with no arguments
# --------------------------------------------------------------------------


def import_torchdeq() -> tuple[Any, Any, dict[str, Any]]:
    """``(torch, torchdeq, status)``; the modules are None, and status says why, when an import fails.

    Sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set) before torch is first imported: see the module
    docstring for what libgomp's default spin-waiting does on a shared machine.
    """
    imported_before = "torch" in sys.modules
    policy_set = not imported_before and "OMP_WAIT_POLICY" not in os.environ
    if policy_set:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import torch
        import torchdeq
    except ImportError as e:
        return None, None, {"status": "skipped", "reason": TORCHDEQ_MISSING, "error": repr(e)}
    return torch, torchdeq, {
        "status": "measured", "torch": torch.__version__, "torchdeq": C._version("torchdeq"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "omp_wait_policy_set_here": policy_set,
        "torch_imported_before": imported_before,
    }


def torch_runtime(torch) -> dict[str, Any]:
    """Give torch as many CPU threads as XLA's CPU pool and pick its device; returns what was set."""
    try:
        threads = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = "cuda" if C.is_gpu() and torch.cuda.is_available() else "cpu"
    return {"device": device, "num_threads": torch.get_num_threads(),
            "num_threads_rule": "len(os.sched_getaffinity(0)): the CPUs this process may use (XLA's CPU pool size)",
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def make_torchdeq(name: str, torch, torchdeq, params, z0_shape, device: str, loop_len: int = 10) -> dict[str, Callable]:
    """torchdeq's solver `name` on one problem, as callables without arguments.

    ``forward() -> (z, info)`` (eval mode, ``z`` of shape `z0_shape`), ``forward_backward() ->
    (grads, backward_stats)`` (training mode, IFT, grads of ``sum`` of the output w.r.t. ``W, U,
    b``), ``trace() -> [residual after step k]``, ``default_backward() -> grads`` (torchdeq's
    default backward settings) and ``f()`` / ``f_loop()`` (one / `loop_len` eager calls of ``f``).
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    W, U, b, x = (torch.tensor(np.asarray(a, np.float32), device=device, requires_grad=i < 3)
                  for i, a in enumerate(params))
    params64 = tuple(np.asarray(a, np.float64) for a in params)
    calls = [0]

    def f(z):  # the batch packed into one row: torchdeq's residual norms are per row
        calls[0] += 1
        return torch.tanh(z.reshape(z0_shape) @ W.T + x @ U.T + b).reshape(1, -1)

    z0 = torch.zeros((1, int(np.prod(z0_shape))), device=device)
    key = TORCHDEQ_SOLVERS[name]
    layer = torchdeq.get_deq(f_solver=key, **TORCHDEQ_FORWARD, **TORCHDEQ_BACKWARD)
    layer_eval = torchdeq.get_deq(f_solver=key, **TORCHDEQ_FORWARD, **TORCHDEQ_BACKWARD).eval()
    # torchdeq counts Anderson's two initial calls as steps; Broyden makes one call before its first step.
    extra_calls = 1 if key == "broyden" else 0

    def forward():
        calls[0] = 0
        z, info = layer_eval(f, z0)
        sync()
        return z[-1].reshape(z0_shape), {"steps": calls[0] - extra_calls, "f_evals": calls[0],
                                         "library_residual": float(info["abs_lowest"].max())}

    def grads(deq_layer):
        stats: list = []
        z, _ = deq_layer(f, z0, backward_writer=stats.append)
        g = torch.autograd.grad(z[-1].sum(), (W, U, b))
        sync()
        return g, stats

    def forward_backward():
        g, stats = grads(layer)
        return g, {"steps": int(stats[-1]["nstep"].max()), "rel_residual": float(stats[-1]["rel_lowest"].max())}

    def default_backward():
        return grads(torchdeq.get_deq(f_solver=key, **TORCHDEQ_FORWARD, ift=True))[0]

    def trace():
        solver = torchdeq.solver.get_solver(key)
        with torch.no_grad():
            _, zs, _ = solver(f, z0, max_iter=MAX_STEPS, tol=TOL, stop_mode="abs", indexing=range(1, MAX_STEPS + 2))
        zs = [z0] * (3 if key == "anderson" else 1) + list(zs)
        return [residual64(z.reshape(z0_shape).cpu().numpy(), params64) for z in zs]

    z_probe = torch.full_like(z0, 0.1)

    def f_single():
        out = f(z_probe)
        sync()
        return out

    def f_loop():
        z = z_probe
        for _ in range(loop_len):
            z = f(z)
        sync()
        return z

    return {"forward": forward, "forward_backward": forward_backward, "trace": trace,
            "default_backward": default_backward, "f": f_single, "f_loop": f_loop}


def torch_flat(tensors) -> np.ndarray:
    return np.concatenate([t.detach().cpu().numpy().astype(np.float64).ravel() for t in tensors])


def setup_torchdeq(problems: dict[str, tuple], z0_shape, loop_len: int, ref_grads: dict[str, np.ndarray],
                   log=print) -> tuple[dict[str, Any], dict]:
    """The JSON's ``torchdeq`` entry and ``{(name, problem): make_torchdeq(...)}`` (empty when not installed).

    When measured, the entry also holds the gradient error of torchdeq's default backward settings
    (one untimed gradient per problem, Anderson forward).
    """
    torch, torchdeq, status = import_torchdeq()
    if torch is None:
        log(f"[{NAME}] {TORCHDEQ_MISSING}")
        return status, {}
    status.update(torch_runtime(torch))
    runs = {(name, p): make_torchdeq(name, torch, torchdeq, params, z0_shape, status["device"], loop_len)
            for name in TORCHDEQ_SOLVERS for p, params in problems.items()}
    status.update(solvers=list(TORCHDEQ_SOLVERS), forward=TORCHDEQ_FORWARD, backward=TORCHDEQ_BACKWARD)
    status["default_backward"] = {
        "how": "torchdeq.Anderson forward; get_deq(ift=True) with its default backward (b_solver='fixed_point_iter', "
               "b_max_iter=40, b_tol=1e-6 absolute); one untimed gradient per problem",
        **{p: _grad_error(torch_flat(runs[("torchdeq.Anderson", p)]["default_backward"]()), ref_grads[p])
           for p in problems}}
    log(f"[{NAME}] torchdeq {status['torchdeq']} (torch {status['torch']}) on {status['device']}, "
        f"{status['num_threads']} threads")
    return status, runs


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(l, np.float64)) for l in jax.tree_util.tree_leaves(tree)])


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _stats(times: list[float]) -> dict[str, Any]:
    ts = np.asarray(times, np.float64)
    q25, q75 = np.percentile(ts, [25, 75])
    return {"median_s": float(np.median(ts)), "iqr_s": float(q75 - q25), "min_s": float(ts.min()),
            "max_s": float(ts.max()), "mean_s": float(ts.mean()), "repeats": int(ts.size), "times_s": ts.tolist()}


def _cpu_timed(fn: Callable, sink: list) -> Callable:
    """`fn`, also appending the process CPU time of each call (all threads) to `sink`.

    On a shared machine the process CPU time of a call is much less sensitive to other jobs than
    its wall-clock time (preemption does not count), so it is recorded next to time_fn's wall time.
    """
    def wrapped(*a):
        c0 = time.process_time()
        out = jax.block_until_ready(fn(*a))
        sink.append(time.process_time() - c0)
        return out

    return wrapped


def _f_eval_stats(times, cpu, key, loop_len: int) -> dict[str, Any]:
    """Per-call time of ``f`` from its single-call and looped probes ``(*key, "single" | "loop")``."""
    single, looped = _stats(times[(*key, "single")]), _stats(times[(*key, "loop")])
    return {"f_eval_s": single["median_s"], "f_eval_min_s": single["min_s"], "f_eval_iqr_s": single["iqr_s"],
            "f_eval_in_loop_s": looped["median_s"] / loop_len, "f_eval_in_loop_min_s": looped["min_s"] / loop_len,
            "f_eval_cpu_s": float(np.median(cpu[(*key, "single")])),
            "f_eval_in_loop_cpu_s": float(np.median(cpu[(*key, "loop")])) / loop_len,
            "loop_len": loop_len}


def _timed_record(times, cpu, key, timing_info, steps: int, n_f: int, fe: dict[str, Any]) -> dict[str, Any]:
    """The timing fields of one (solver, problem) record; `fe` is the ``f`` probe it is divided by."""
    tf, tb = _stats(times[(*key, "fwd")]), _stats(times[(*key, "fb")])
    fwd_cpu = float(np.median(cpu[(*key, "fwd")]))
    return {
        "forward_s": tf["median_s"], "forward_iqr_s": tf["iqr_s"], "forward_min_s": tf["min_s"],
        "forward_backward_s": tb["median_s"], "forward_backward_iqr_s": tb["iqr_s"],
        "forward_backward_min_s": tb["min_s"],
        "ift_backward_s": tb["median_s"] - tf["median_s"],
        "ift_backward_min_s": tb["min_s"] - tf["min_s"],
        "forward_cpu_s": fwd_cpu,
        "forward_backward_cpu_s": float(np.median(cpu[(*key, "fb")])),
        "timing": {**timing_info, "forward_times_s": tf["times_s"], "forward_backward_times_s": tb["times_s"]},
        "overhead": tf["median_s"] / (max(steps, 1) * fe["f_eval_s"]),
        "overhead_loop": tf["median_s"] / (max(n_f, 1) * fe["f_eval_in_loop_s"]),
        "overhead_loop_min": tf["min_s"] / (max(n_f, 1) * fe["f_eval_in_loop_min_s"]),
        "overhead_loop_cpu": fwd_cpu / (max(n_f, 1) * fe["f_eval_in_loop_cpu_s"]),
        "time_per_step_s": tf["median_s"] / max(steps, 1),
    }


def _grad_error(g: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    return {"grad_finite": bool(np.all(np.isfinite(g))),
            "grad_rel_error": float(np.linalg.norm(g - ref) / np.linalg.norm(ref))}


def measure_all(names, problems: dict[str, tuple], z0_shape, *, repeats: int, rounds: int, loop_len: int,
                ref_grads: dict[str, np.ndarray], trace: bool, torch_runs: dict | None = None,
                log=print) -> tuple[dict, dict]:
    """Measure every solver on every problem; returns ``(results[problem][solver], f_eval[problem])``.

    1. Compile: for each solver, the forward and forward+backward functions are jitted and called
       once on the first problem (``compile_s`` = that first call, via ``time_fn``); JAX's caches
       are cleared once before this phase, not per function, so that every executable stays
       compiled for the timing phase. The other problems have the same shapes and reuse the
       executables (their ``compile_s`` is None). Outputs, gradients and ``xla_memory`` come from
       this phase. `torch_runs` (``{(name, problem): make_torchdeq(...)}``, optional) are called
       once here too (``first_call_s``; torch compiles nothing).
    2. Time: ``rounds`` rounds; in each, every (solver, problem, fwd / fwd+bwd) function and the two
       ``f`` probes (and torch's two) get one ``time_fn`` call with ``repeats // rounds`` timed
       calls (after ``time_fn``'s own untimed first call). Interleaving spreads changes of machine
       load over all functions alike; medians (and minima) are over all rounds.
    """
    torch_runs = torch_runs or {}
    first = next(iter(problems))
    z = jnp.zeros(z0_shape, jnp.float32) + 0.1
    f_single = jax.jit(cell)
    f_loop = jax.jit(lambda z, p: jax.lax.fori_loop(0, loop_len, lambda i, z: cell(z, p), z))
    fns: dict[tuple, Callable] = {}
    args: dict[tuple, tuple] = {}
    for p, params in problems.items():
        fns[("f", p, "single")], args[("f", p, "single")] = f_single, (z, params)
        fns[("f", p, "loop")], args[("f", p, "loop")] = f_loop, (z, params)
    compile_s, outs, mem = {}, {}, {}
    jax.clear_caches()
    for name in C.progress(names, desc="compile"):
        t0 = time.perf_counter()
        solve = make_solve(name, z0_shape)
        for kind, fn in (("fwd", jax.jit(solve)), ("fb", jax.jit(make_grad(solve)))):
            for p, params in problems.items():
                fns[(name, p, kind)], args[(name, p, kind)] = fn, params
                t = C.time_fn(fn, *params, warmup=0, repeats=1, clear_caches=False)
                compile_s[(name, p, kind)] = t["compile_s"]
                outs[(name, p, kind)] = fn(*params)
            mem[(name, kind)] = C.xla_memory(fn, *problems[first])
        log(f"[{NAME}] compiled {name} in {time.perf_counter() - t0:.1f} s")
    for (name, p), run in torch_runs.items():
        for kind, fn in (("fwd", run["forward"]), ("fb", run["forward_backward"])):
            fns[(name, p, kind)], args[(name, p, kind)] = fn, ()
            compile_s[(name, p, kind)] = C.time_fn(fn, warmup=0, repeats=1, clear_caches=False)["compile_s"]
            outs[(name, p, kind)] = fn()
        for kind, fn in (("single", run["f"]), ("loop", run["f_loop"])):
            fns.setdefault(("torch_f", p, kind), fn)
            args[("torch_f", p, kind)] = ()
    times: dict[tuple, list[float]] = {k: [] for k in fns}
    cpu: dict[tuple, list[float]] = {k: [] for k in fns}
    per_round = max(1, repeats // rounds)
    for _ in C.progress(range(rounds), desc="timing rounds"):
        for key, fn in fns.items():
            sink: list[float] = []
            times[key].extend(C.time_fn(_cpu_timed(fn, sink), *args[key], warmup=0, repeats=per_round,
                                        clear_caches=False)["times_s"])
            cpu[key].extend(sink[1:])  # time_fn's first call is untimed
    timing_info = {"rounds": rounds, "per_round": per_round, "repeats": rounds * per_round,
                   "untimed_calls_per_round": 1}

    f_eval = {p: _f_eval_stats(times, cpu, ("f", p), loop_len) for p in problems}
    for p in {p for _, p in torch_runs}:
        f_eval[p]["torch"] = {**_f_eval_stats(times, cpu, ("torch_f", p), loop_len),
                              "note": "eager torch f; the looped probe is a Python loop"}

    results: dict[str, dict[str, dict]] = {p: {} for p in problems}
    for name in names:
        for p, params in problems.items():
            z_star, info = outs[(name, p, "fwd")]
            steps, n_f = int(info["steps"]), int(info["f_evals"])
            final = residual64(z_star, params)
            rec = {
                "library": name.split(".")[0], "settings": solver_settings(name),
                "steps": steps, "f_evals": n_f, "final_residual": final,
                "converged": bool(np.isfinite(final) and final <= TOL),
                **_timed_record(times, cpu, (name, p), timing_info, steps, n_f, f_eval[p]),
                "compile_s": ({"forward": compile_s[(name, p, "fwd")], "forward_backward": compile_s[(name, p, "fb")]}
                              if p == first else None),
                "compile_shared_with": None if p == first else first,
                "first_call_s": {"forward": compile_s[(name, p, "fwd")], "forward_backward": compile_s[(name, p, "fb")]},
                "memory": {"forward": mem[(name, "fwd")], "forward_backward": mem[(name, "fb")]},
                **_grad_error(_flat(outs[(name, p, "fb")]), ref_grads[p]),
            }
            if "history" in info:
                h = np.asarray(info["history"], np.float64)
                rec["trace"] = h[: steps + 1].tolist()
                rec["trace_source"] = "stats.residual_history (residual at iterate k)"
            elif trace:
                rec["trace"] = peer_trace(name, params, z0_shape)
                rec["trace_source"] = "library init/update stepped from Python; residual of returned iterate recomputed"
            else:
                rec["trace"] = None
                rec["trace_source"] = "skipped in this profile"
            results[p][name] = rec
    for (name, p), run in torch_runs.items():
        z_star, info = outs[(name, p, "fwd")]
        grads, bwd = outs[(name, p, "fb")]
        final = residual64(z_star.cpu().numpy(), problems[p])
        results[p][name] = {
            "library": "torchdeq", "settings": solver_settings(name),
            "steps": info["steps"], "f_evals": info["f_evals"], "final_residual": final,
            "converged": bool(np.isfinite(final) and final <= TOL),
            "library_residual": info["library_residual"],
            **_timed_record(times, cpu, (name, p), timing_info, info["steps"], info["f_evals"], f_eval[p]["torch"]),
            "compile_s": None, "compile_shared_with": None,
            "first_call_s": {"forward": compile_s[(name, p, "fwd")], "forward_backward": compile_s[(name, p, "fb")]},
            "memory": {"forward": None, "forward_backward": None},
            **_grad_error(torch_flat(grads), ref_grads[p]),
            "backward_solver": bwd,
            "trace": run["trace"](),
            "trace_source": "torchdeq solver with indexing at every step; residual of returned iterate recomputed",
        }
    return results, f_eval


def reference_grad_fn(z0_shape) -> Callable:
    """Jitted tight gradient: deq Anderson to atol=1e-5 and a GMRES adjoint to rtol=1e-7."""
    import deq

    solver = deq.Anderson(rtol=0.0, atol=1e-5, max_steps=MAX_STEPS)
    backward = deq.IFT(solver=deq.GMRES(rtol=1e-7, atol=0.0, max_steps=1500, restart=30))

    def loss(W, U, b, x):
        sol = deq.fixed_point(cell, jnp.zeros(z0_shape, jnp.float32), (W, U, b, x), solver=solver,
                              backward=backward, batch_axis=None)
        return jnp.sum(sol.value), sol.value

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


def reference_grad(ref_fn: Callable, params) -> tuple[np.ndarray, dict[str, Any]]:
    g, z = ref_fn(*params)
    return _flat(g), {"forward_residual": residual64(z, params),
                      "how": "deq.Anderson(rtol=0, atol=1e-5) + IFT(GMRES(rtol=1e-7, restart=30))"}


def generator_check(seed: int, hidden: int, batch: int, inp: int) -> dict[str, Any]:
    """Plain iteration and Anderson on the literal Gaussian-W generator (see module docstring)."""
    out = {"generator": "W = s * G / ||G||_2, G Gaussian; U, b, x as in the main problem", "results": {}}
    fns = {name: jax.jit(make_solve(name, (batch, hidden))) for name in ("deq.FixedPointIteration", "deq.Anderson")}
    for label, s in PROBLEM_NORMS.items():
        params = tuple(jnp.asarray(a) for a in gaussian_problem(seed, hidden, batch, inp, s))
        W = np.asarray(params[0], np.float64)
        row = {"spectral_norm": float(np.linalg.norm(W, 2)),
               "spectral_radius": float(np.max(np.abs(np.linalg.eigvals(W))))}
        for name, fn in fns.items():
            z, info = fn(*params)
            row[name] = {"steps": int(info["steps"]), "final_residual": residual64(z, params)}
        out["results"][label] = row
    return out


def expensive_probe(kind: str, seed: int, hidden: int, batch: int, inp: int) -> dict[str, Any]:
    """Configurations too slow or too large for the main loop; run in a subprocess (full profile).

    ``kind="optimistix_default_adjoint"``: one gradient of sum(z*) with optimistix's default
    ``ImplicitAdjoint()`` (``AutoLinearSolver`` materialises the dense Jacobian) on the
    contractive problem. ``kind="jaxopt_broyden_default"``: jaxopt ``Broyden`` at its defaults
    (line search, ``history_size = maxiter``) forward on both problems. Compile (AOT) and one
    run are timed separately.
    """
    arrays = make_problem(seed, hidden, batch, inp)
    shape = (batch, hidden)
    out: dict[str, Any] = {}
    if kind == "optimistix_default_adjoint":
        params = tuple(jnp.asarray(arrays[k]) for k in (f"W_{CONTRACTIVE}", "U", "b", "x"))
        fb = jax.jit(make_grad(make_solve("optimistix.FixedPointIteration", shape, optx_default_adjoint=True)))
        comp = C.compile_time(fb, *params, clear_caches=False)
        t0 = time.perf_counter()
        g = jax.block_until_ready(fb(*params))
        out["first_call_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        g = jax.block_until_ready(fb(*params))
        out.update(problem=CONTRACTIVE, compile_s=comp["total_s"], forward_backward_s=time.perf_counter() - t0,
                   memory_forward_backward=C.xla_memory(fb, *params))
        ref, _ = reference_grad(reference_grad_fn(shape), params)
        out["grad_rel_error"] = float(np.linalg.norm(_flat(g) - ref) / np.linalg.norm(ref))
        return out
    if kind == "jaxopt_broyden_default":
        fwd = jax.jit(make_solve(JAXOPT_BROYDEN_DEFAULT, shape))
        for i, p in enumerate((CONTRACTIVE, HARD)):
            params = tuple(jnp.asarray(arrays[k]) for k in (f"W_{p}", "U", "b", "x"))
            rec = {}
            if i == 0:
                rec["compile_s"] = C.compile_time(fwd, *params, clear_caches=False)["total_s"]
            t0 = time.perf_counter()
            z, info = jax.block_until_ready(fwd(*params))
            rec.update(forward_s=time.perf_counter() - t0, steps=int(info["steps"]), f_evals=int(info["f_evals"]),
                       final_residual=residual64(z, params))
            rec["converged"] = bool(np.isfinite(rec["final_residual"]) and rec["final_residual"] <= TOL)
            out[p] = rec
        out["memory_forward"] = C.xla_memory(fwd, *params)
        return out
    raise ValueError(kind)


def run_expensive(kind: str, seed: int, hidden: int, batch: int, inp: int, timeout: float) -> dict[str, Any]:
    """`expensive_probe` in a fresh process with a timeout, with its peak resident memory."""
    try:
        probe = C.peak_rss_in_subprocess("benchmarks.solvers", "expensive_probe",
                                         {"kind": kind, "seed": seed, "hidden": hidden, "batch": batch, "inp": inp},
                                         timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s", "timeout_s": timeout}
    except RuntimeError as e:
        return {"status": "failed", "error": str(e)[-2000:], "timeout_s": timeout}
    return {"status": "measured", "timeout_s": timeout, "peak_rss_mib": probe["peak_mib"],
            "delta_rss_mib": probe["delta_mib"], **probe["result"]}


# --------------------------------------------------------------------------
# banax (optional peer, Python >= 3.12): benchmarks/banax_peer.py in its own interpreter
# --------------------------------------------------------------------------

BANAX_SCRIPT = C.REPO_ROOT / "benchmarks" / "banax_peer.py"
BANAX_VENV_PYTHON = C.REPO_ROOT / ".venv-banax" / "bin" / "python"
BANAX_SETUP = ("PYENV_VERSION=3.12.1 python3.12 -m venv .venv-banax && .venv-banax/bin/pip install banax "
               "'jax==<this jax>' 'jaxlib==<this jaxlib>' (or set DEQ_BANAX_PYTHON)")


def banax_python() -> tuple[str | None, str]:
    """The interpreter for the banax peer and where it came from, or ``(None, why not)``."""
    env = os.environ.get("DEQ_BANAX_PYTHON")
    if env:
        return (env, "DEQ_BANAX_PYTHON") if os.path.exists(env) else (None, f"DEQ_BANAX_PYTHON={env} does not exist")
    if BANAX_VENV_PYTHON.exists():
        return str(BANAX_VENV_PYTHON), ".venv-banax"
    return None, f"no interpreter with banax: {BANAX_SETUP}"


def run_banax(problem_npz, refs: dict[str, np.ndarray], *, repeats: int, rounds: int, timeout: float,
              log=print) -> dict[str, Any]:
    """banax's rows: `BANAX_SCRIPT` in a subprocess (its JSON object), or ``{"status": "skipped", ...}``.

    `refs` (the reference gradients) travel in a temporary .npz; the script's stdout's last line
    is its JSON object. One printed line says when it is skipped or fails.
    """
    import json
    import tempfile

    py, source = banax_python()
    if py is None:
        log(f"banax: skipped ({source})")
        return {"status": "skipped", "reason": source}
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = os.path.join(tmp, "reference.npz")
        np.savez(ref_path, **refs)
        cmd = [py, str(BANAX_SCRIPT), "--problem", str(problem_npz), "--reference", ref_path,
               "--repeats", str(repeats), "--rounds", str(rounds)]
        env = {**os.environ, "JAX_ENABLE_X64": "0"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            log(f"banax: skipped (timed out after {timeout:.0f} s)")
            return {"status": "skipped", "reason": f"timed out after {timeout:.0f} s", "interpreter": py}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        reason = f"{py} exited with {proc.returncode}: {proc.stderr.strip()[-1500:]}"
        log(f"banax: skipped ({reason.splitlines()[0]})")
        return {"status": "skipped", "reason": reason, "interpreter": py}
    rec = json.loads(lines[-1])
    rec["interpreter_source"] = source
    rec["command"] = " ".join(cmd[:2] + ["--problem", os.path.basename(str(problem_npz)), "--reference <tmp>"] + cmd[6:])
    return rec


def banax_targets(results: dict[str, dict[str, dict]], banax: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 15 item 8: deq.Anderson (defaults) against banax's best-tuned solver on each problem.

    banax's best-tuned solver is its converged solver row (Implicit backward) with the fewest
    steps (ties: the lower median forward time), among its defaults and the tuned grid's choice.
    """
    if banax.get("status") != "measured":
        return []
    targets = []

    def ms(v):
        return f"{v * 1e3:.3f} ms"

    for problem in (CONTRACTIVE, HARD):
        ours = results[problem][OURS_ANDERSON]
        rows = {k: v for k, v in banax["results"][problem].items() if v["kind"] == "solver" and v["converged"]}
        if not rows:
            targets.append({"target": f"{problem}: banax has a converged solver", "passed": True,
                            "measured": "no banax solver converged", "goal": "comparison possible"})
            continue
        best = min(rows, key=lambda k: (rows[k]["steps"], rows[k]["forward_s"]))
        b = rows[best]
        targets.append({
            "target": f"{problem}: deq.Anderson (defaults) takes no more steps than banax's best-tuned solver",
            "passed": bool(ours["converged"] and ours["steps"] <= b["steps"]),
            "measured": f"deq.Anderson {ours['steps']} steps vs {best} {b['steps']} steps", "goal": "<="})
        for key, limit, label in (("forward", 0.6, "forward"), ("forward_backward", 0.5, "forward+backward")):
            r, r_min = ours[f"{key}_s"] / b[f"{key}_s"], ours[f"{key}_min_s"] / b[f"{key}_min_s"]
            r_cpu = ours[f"{key}_cpu_s"] / b[f"{key}_cpu_s"]
            targets.append({
                "target": f"{problem}: deq.Anderson {label} time <= {limit} x banax's best-tuned solver",
                "passed": bool(r <= limit), "passed_min": bool(r_min <= limit), "passed_cpu": bool(r_cpu <= limit),
                "measured": (f"median wall {ms(ours[f'{key}_s'])} vs {best} {ms(b[f'{key}_s'])} = {r:.2f}x; min wall "
                             f"{r_min:.2f}x; median CPU {r_cpu:.2f}x (banax timed in its own process after deq's rows)"),
                "goal": f"<= {limit}x"})
    return targets


def banax_rows(banax: dict[str, Any]) -> list[dict[str, Any]]:
    """banax's rows for the printed table."""
    return [{"problem": p, "solver": n, "deq": r["deq_counterpart"], "backward": r["backward"], "steps": r["steps"],
             "residual": r["final_residual"], "conv": "yes" if r["converged"] else "NO",
             "fwd_ms": r["forward_s"] * 1e3, "fwdbwd_ms": r["forward_backward_s"] * 1e3,
             "grad_err": r["grad_rel_error"], "grad_err64": r["grad_rel_error_f64"]}
            for p, per in banax.get("results", {}).items() for n, r in per.items()]


# --------------------------------------------------------------------------
# Where Anderson's time goes
# --------------------------------------------------------------------------


def _per_iter(fn, args, K: int, repeats: int) -> float:
    t = C.time_fn(jax.jit(fn), *args, warmup=2, repeats=repeats, clear_caches=False)
    return t["min_s"] / K


def anderson_breakdown(params, z0_shape, K: int, repeats: int) -> dict[str, Any]:
    """Per-step cost of the pieces of an Anderson step, each timed inside a compiled loop of K.

    Shapes are those of the solve: B = 1 row (batch_axis=None), n = batch * hidden, m = 5.
    """
    import deq

    B, n, m = 1, int(np.prod(z0_shape)), deq.Anderson().history_size
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    G = jax.random.normal(k1, (B, m, n), jnp.float32)
    v = jax.random.normal(k2, (B, n), jnp.float32)
    A = jnp.eye(m, dtype=jnp.float32)[None] + 0.1 * jax.random.normal(k3, (B, m, m), jnp.float32)
    rhs = jnp.ones((B, m, 1), jnp.float32)
    out: dict[str, Any] = {"shapes": {"B": B, "n": n, "m": m}, "loop_len": K, "per_step_s": {},
                           "statistic": "min over repeats of (loop time / iterations): the machine is shared, "
                                        "and the minimum is the least load-contaminated estimate"}
    p = out["per_step_s"]

    def loop(body, init):
        return lambda *a: jax.lax.fori_loop(0, K, lambda i, c: body(i, c, *a), init)

    p["empty_loop"] = _per_iter(loop(lambda i, c: c + 1.0, jnp.zeros(())), (), K, repeats)
    p["f_eval"] = _per_iter(lambda z, prm: jax.lax.fori_loop(0, K, lambda i, z: cell(z, prm), z),
                            (jnp.full(z0_shape, 0.1, jnp.float32), params), K, repeats)
    p["linalg_solve_(1,m,m)"] = _per_iter(
        loop(lambda i, c, A, r: c + jnp.linalg.solve(A + c[..., :1] * 1e-9, r), jnp.zeros((B, m, 1))),
        (A, rhs), K, repeats)
    p["einsum_bm,bmn->bn"] = _per_iter(
        loop(lambda i, c, G: jnp.einsum("bm,bmn->bn", 1e-3 * c[:, :m] + 0.2, G), jnp.zeros((B, n))), (G,), K, repeats)
    p["einsum_bmn,bn->bm"] = _per_iter(
        loop(lambda i, c, G, v: c + jnp.einsum("bmn,bn->bm", G, v + c[:, :1]), jnp.zeros((B, m))), (G, v), K, repeats)
    p["history_insert_x2"] = _per_iter(
        loop(lambda i, c, v: (c[0].at[jnp.arange(B), i % m].set(v + i), c[1].at[jnp.arange(B), i % m].set(v - i)),
             (G, G)), (v,), K, repeats)

    # What the driver's row-select (`where_rows` over the solver state) costs on Anderson-sized
    # history buffers: a data-dependent select rewrites both (B, m, n) arrays every step.
    p["where_(1,m,n)_x2"] = _per_iter(
        loop(lambda i, c, G: (jnp.where((i % 2 == 0), c[0] + 1e-9, c[1]), jnp.where((i % 3 == 0), c[1], c[0] + 1e-9)),
             (G, G)), (G,), K, repeats)
    p["vjp_f"] = _per_iter(
        lambda z, prm: jax.lax.fori_loop(0, K, lambda i, u: jax.vjp(lambda zz: cell(zz, prm), z)[1](u)[0], z),
        (jnp.full(z0_shape, 0.1, jnp.float32), params), K, repeats)

    # The solver's own pieces through its public interface (init/step, and mix when it has one),
    # on a state filled by m + 1 real steps of the packed problem (B = 1 row).
    solver = deq.Anderson()
    F = lambda xx: cell(xx.reshape(z0_shape), params).reshape(B, n)  # noqa: E731
    x = jnp.zeros((B, n), jnp.float32)
    fx = F(x)
    st = solver.init(F, x, fx)
    active = jnp.ones((B,), bool)
    # The driver's lowest-residual point, held fixed here (it only steers Anderson's restarts).
    best = deq.Best(x, fx, jnp.full((B,), jnp.inf, jnp.float32))
    for _ in range(m + 1):
        x, fx, st = solver.step(F, x, fx, st, active, best)

    def step_loop(x, fx, st):
        return jax.lax.fori_loop(0, K, lambda i, c: solver.step(F, c[0], c[1], c[2], active, best), (x, fx, st))

    p["Anderson.step (incl. one f)"] = _per_iter(step_loop, (x, fx, st), K, repeats)
    fpi = deq.FixedPointIteration()
    p["FixedPointIteration.step (incl. one f)"] = _per_iter(
        lambda x, fx: jax.lax.fori_loop(0, K, lambda i, c: fpi.step(F, c[0], c[1], (), active, best)[:2], (x, fx)),
        (x, fx), K, repeats)
    if hasattr(solver, "mix"):
        leaves, treedef = jax.tree_util.tree_flatten(st)

        def mix_loop(c0, *leaves):
            def body(i, c):
                lv = list(leaves)
                gi = next(j for j, l in enumerate(lv) if l.ndim == 3 and l.shape[1:] == (m, m))
                lv[gi] = lv[gi] + c[:, :1, None] * 1e-9
                return c + solver.mix(jax.tree_util.tree_unflatten(treedef, lv))[0]
            return jax.lax.fori_loop(0, K, body, c0)

        try:
            p["Anderson.mix"] = _per_iter(mix_loop, (jnp.zeros((B, m)), *leaves), K, repeats)
        except (StopIteration, TypeError, ValueError) as e:  # state layout changed: report, do not fail
            out["mix_error"] = repr(e)

    # Whole solves through deq's driver / jaxopt with tolerance ~0, so they run up to K steps (they
    # stop earlier only at a bit-exact fixed point); time per step = time / steps actually taken.
    z0 = jnp.zeros(z0_shape, jnp.float32)
    import jaxopt

    def whole(fn):
        jf = jax.jit(fn)
        t = C.time_fn(jf, *params, warmup=2, repeats=repeats, clear_caches=False)
        steps = int(jf(*params)[1])
        out["steps_taken"][label] = steps
        return t["min_s"] / max(steps, 1)

    out["steps_taken"] = {}
    for label, solver_k in (("deq.FixedPointIteration_step", deq.FixedPointIteration(rtol=0.0, atol=1e-30, max_steps=K)),
                            ("deq.Anderson_step", deq.Anderson(rtol=0.0, atol=1e-30, max_steps=K))):
        def run_deq(W, U, b, x, s=solver_k):
            sol = deq.fixed_point(cell, z0, (W, U, b, x), solver=s)
            return sol.value, sol.stats.num_steps
        p[label] = whole(run_deq)
    for label, cls, kw in (("jaxopt.AndersonAcceleration_step", jaxopt.AndersonAcceleration, {"ridge": 1e-10}),
                           ("jaxopt.FixedPointIteration_step", jaxopt.FixedPointIteration, {})):
        def run_jaxopt(W, U, b, x, cls=cls, kw=kw):
            r = cls(fixed_point_fun=_cell_args, maxiter=K, tol=0.0, implicit_diff=False, unroll=False, **kw).run(
                z0, W, U, b, x)
            return r.params, r.state.iter_num
        p[label] = whole(run_jaxopt)

    # The IFT adjoint solve alone (deq.IFT.adjoint on the packed problem at the fixed point).
    try:
        ift = deq.IFT()
        fn = lambda xx, prm: cell(xx.reshape(z0_shape), prm).reshape(B, n)  # noqa: E731
        x_star = deq.fixed_point(cell, z0, params, solver=deq.Anderson(rtol=0.0, atol=TOL, max_steps=MAX_STEPS)).value
        x_star = x_star.reshape(B, n)
        g = jnp.ones((B, n), jnp.float32)
        adj = jax.jit(lambda xs, prm, g: ift.adjoint(fn, xs, prm, g, False))
        u, lo = adj(x_star, params, g)
        t = C.time_fn(adj, x_star, params, g, warmup=2, repeats=repeats, clear_caches=False)
        from deq.backward.ift import derived_adjoint_solver

        fwd = deq.Anderson(rtol=0.0, atol=TOL, max_steps=MAX_STEPS)
        used = repr(ift.solver) if ift.solver is not None else (
            f"derived from the forward: {derived_adjoint_solver(fwd)!r} with rtol per sample "
            "clip(rtol_f + atol_f / ||f(z*)||, 10 eps, 1e-4)")
        out["ift_adjoint"] = {"solver": used, "steps": int(np.asarray(lo.num_steps).max()),
                              "residual": float(np.asarray(lo.residual).max()), "time_min_s": t["min_s"],
                              "time_median_s": t["median_s"]}
    except Exception as e:  # internal API; report instead of failing the benchmark
        out["ift_adjoint"] = {"error": repr(e)}

    # deq.IFT(warn=True) (the default) reports non-convergence through a host callback
    # (jax.pure_callback in a lax.cond; effect-free, so JAX keeps its C++ dispatch fast path).
    fbs = {}
    for warn in (True, False):
        def loss(W, U, b, x, warn=warn):
            sol = deq.fixed_point(cell, z0, (W, U, b, x), solver=deq.Anderson(rtol=0.0, atol=TOL, max_steps=MAX_STEPS),
                                  backward=deq.IFT(warn=warn))
            return jnp.sum(sol.value)

        fbs[warn] = C.time_fn(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), *params, warmup=2, repeats=repeats,
                              clear_caches=False)["min_s"]
    out["ift_warn_callback"] = {"forward_backward_s_warn_true": fbs[True], "forward_backward_s_warn_false": fbs[False],
                                "note": "deq.Anderson forward + IFT backward, default IFT(warn=True) vs IFT(warn=False)"}

    out["derived"] = {
        "deq_driver_overhead_anderson_per_step_s": p["deq.Anderson_step"] - p["Anderson.step (incl. one f)"],
        "deq_driver_overhead_per_step_s": p["deq.FixedPointIteration_step"] - p["FixedPointIteration.step (incl. one f)"],
        "deq_anderson_step_minus_f_s": p["Anderson.step (incl. one f)"] - p["f_eval"],
        "deq_anderson_extra_per_step_s": p["deq.Anderson_step"] - p["deq.FixedPointIteration_step"],
        "jaxopt_anderson_extra_per_step_s": p["jaxopt.AndersonAcceleration_step"] - p["jaxopt.FixedPointIteration_step"],
        "deq_anderson_step_over_f": p["deq.Anderson_step"] / p["f_eval"],
        "jaxopt_anderson_step_over_f": p["jaxopt.AndersonAcceleration_step"] / p["f_eval"],
    }
    return out


# --------------------------------------------------------------------------
# Mixed precision: a bfloat16 cell with float32 (or bfloat16) solver state
# --------------------------------------------------------------------------

#: (label, cell dtype, solver_dtype) of the precision section.
PRECISION_CASES = (
    ("float32 cell, float32 state", "float32", None),
    ("bfloat16 cell, float32 state", "bfloat16", None),
    ("bfloat16 cell, bfloat16 state", "bfloat16", "bfloat16"),
)
PRECISION_SOLVERS = ("deq.Anderson", "deq.FixedPointIteration")
#: The relative stopping test of the timed solves (reachable from a bfloat16 cell) and the budget.
PRECISION_RTOL, PRECISION_BUDGET = 1e-2, 200


def fixed_point64(arrays, problem: str = CONTRACTIVE) -> np.ndarray:
    """The float64 fixed point of `problem`, to a residual below 1e-12 (deq.Anderson under x64)."""
    import deq

    with jax.enable_x64(True):
        params = tuple(jnp.asarray(arrays[k], jnp.float64) for k in (f"W_{problem}", "U", "b", "x"))
        z0 = jnp.zeros((arrays["x"].shape[0], arrays["U"].shape[0]), jnp.float64)
        sol = deq.fixed_point(cell, z0, params, solver=deq.Anderson(rtol=0.0, atol=1e-12, max_steps=MAX_STEPS))
        return np.asarray(sol.value, np.float64)


def precision_study(arrays, z0_shape, *, repeats: int) -> dict[str, Any]:
    """Steps, residual floor, error against float64 and time of each `PRECISION_CASES` x solver.

    Per case two solves from z0 = 0 of the contractive problem, with the cell's weights and input
    cast to the cell dtype: a budget run (rtol = atol = 0, `PRECISION_BUDGET` steps) whose residual
    history gives the residual floor (the lowest relative residual `||f(z_k) - z_k|| / ||z*||`), the
    relative error of the iterate it returns (the lowest-residual one) against the float64 fixed
    point, and the steps to reach relative residuals 1e-2, 1e-3 and 1e-4 (None when never); and the timed solve
    with `rtol=PRECISION_RTOL` (steps, converged, relative error of the value against the float64
    fixed point, median wall and CPU time over `repeats` calls after one untimed call).
    """
    import deq

    z64 = fixed_point64(arrays)
    scale = float(np.linalg.norm(z64))
    out: dict[str, Any] = {
        "problem": CONTRACTIVE, "reference": "float64 fixed point (deq.Anderson, atol=1e-12, x64)",
        "reference_residual": residual64(z64, tuple(arrays[k] for k in (f"W_{CONTRACTIVE}", "U", "b", "x"))),
        "norm_z_star": scale, "rtol": PRECISION_RTOL, "budget": PRECISION_BUDGET,
        "eps": {d: float(jnp.finfo(d).eps) for d in ("float32", "bfloat16")},
        "device": jax.devices()[0].platform, "timing": "CPU (this machine; no GPU time measured)" if
        jax.devices()[0].platform == "cpu" else jax.devices()[0].device_kind,
        "relative": "residuals and errors divided by ||z*|| of the float64 fixed point (whole batch, l2)",
        "cases": {},
    }
    for label, cell_dtype, solver_dtype in PRECISION_CASES:
        params = tuple(jnp.asarray(arrays[k]).astype(cell_dtype) for k in (f"W_{CONTRACTIVE}", "U", "b", "x"))
        z0 = jnp.zeros(z0_shape, cell_dtype)
        for name in PRECISION_SOLVERS:
            cls = {"deq.Anderson": deq.Anderson, "deq.FixedPointIteration": deq.FixedPointIteration}[name]

            def solve(p, solver):
                sol = deq.fixed_point(cell, z0, p, solver=solver, solver_dtype=solver_dtype)
                return sol.value, sol.stats

            budget = jax.jit(lambda p: solve(p, cls(rtol=0.0, atol=0.0, max_steps=PRECISION_BUDGET)))
            timed = jax.jit(lambda p: solve(p, cls(rtol=PRECISION_RTOL, atol=0.0, max_steps=MAX_STEPS)))
            v_floor, st = budget(params)
            h = np.asarray(st.residual_history, np.float64) / scale
            cpu: list[float] = []
            t = C.time_fn(_cpu_timed(timed, cpu), params, warmup=0, repeats=repeats, clear_caches=False)
            value, st2 = timed(params)
            err = float(np.linalg.norm(np.asarray(value, np.float64) - z64) / scale)
            out["cases"][f"{name} | {label}"] = {
                "solver": name, "cell_dtype": cell_dtype, "solver_dtype": solver_dtype or "float32 (default)",
                "residual_floor_rel": float(np.nanmin(h)), "floor_step": int(np.nanargmin(h)),
                "error_rel_at_floor": float(np.linalg.norm(np.asarray(v_floor, np.float64) - z64) / scale),
                "steps_to_rel": {f"{r:g}": (int(np.argmax(h <= r)) if np.any(h <= r) else None)
                                 for r in (1e-2, 1e-3, 1e-4)},
                "history_rel": [None if not np.isfinite(v) else float(v) for v in h],
                "steps": int(st2.num_steps), "converged": bool(st2.converged),
                "reported_residual_rel": float(st2.residual_norm) / scale,
                "recomputed_residual_rel": residual64(value, params) / scale,
                "error_rel": err, "forward_s": t["median_s"], "forward_min_s": t["min_s"],
                "forward_cpu_s": float(np.median(cpu[1:])), "repeats": t["repeats"],
            }
    return out


def precision_rows(study: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"case": k, "floor": r["residual_floor_rel"], "to1e-2": r["steps_to_rel"]["0.01"],
             "to1e-3": r["steps_to_rel"]["0.001"], "steps": r["steps"], "conv": "yes" if r["converged"] else "NO",
             "err_floor": r["error_rel_at_floor"], "err": r["error_rel"], "fwd_ms": r["forward_s"] * 1e3} for k, r in study["cases"].items()]


# --------------------------------------------------------------------------
# Targets, table, figure
# --------------------------------------------------------------------------


def evaluate_targets(results: dict[str, dict[str, dict]]) -> list[dict[str, Any]]:
    """The targets of the issue, each with the measured value and PASS/MISS."""
    con, hard = results[CONTRACTIVE], results[HARD]
    ours = con[OURS_ANDERSON]
    peers = {k: v for k, v in con.items() if not k.startswith("deq.") and v["converged"]}
    targets = []

    def add(name, passed, measured, goal, **also):
        targets.append({"target": name, "passed": bool(passed), "measured": measured, "goal": goal,
                        **{k: bool(v) for k, v in also.items()}})

    if peers:
        best = min(peers, key=lambda k: peers[k]["f_evals"])
        add("contractive: deq.Anderson (default settings) needs no more f evaluations than the best peer",
            ours["converged"] and ours["f_evals"] <= peers[best]["f_evals"],
            f"deq.Anderson {ours['f_evals']} f evals ({ours['steps']} steps) vs best peer {best} "
            f"{peers[best]['f_evals']} f evals ({peers[best]['steps']} steps)", "<=")

    def ms(v):
        return f"{v * 1e3:.3f} ms"

    if peers:
        def best_of(key):
            k = min(peers, key=lambda k: peers[k][key])
            return k, peers[k][key]

        fewest, fewest_steps = best_of("steps")
        (fast, fast_s), (fast_min, fast_min_s), (fast_cpu, fast_cpu_s) = (
            best_of(k) for k in ("forward_s", "forward_min_s", "forward_cpu_s"))
        steps_ok = ours["converged"] and ours["steps"] <= fewest_steps
        add("contractive: deq.Anderson fewest steps and least forward time among the libraries "
            "(converged jaxopt, optimistix and, when installed, torchdeq solvers)",
            steps_ok and ours["forward_s"] <= fast_s,
            f"deq.Anderson {ours['steps']} steps ({ours['f_evals']} f evals) vs fewest {fewest} {fewest_steps} "
            f"({peers[fewest]['f_evals']} f evals); median wall {ms(ours['forward_s'])} vs fastest {fast} "
            f"{ms(fast_s)}; min wall {ms(ours['forward_min_s'])} vs {fast_min} {ms(fast_min_s)}; median CPU "
            f"{ms(ours['forward_cpu_s'])} vs {fast_cpu} {ms(fast_cpu_s)}; libraries compared: "
            f"{sorted({v['library'] for v in peers.values()})}", "fewest steps and least time",
            passed_min=steps_ok and ours["forward_min_s"] <= fast_min_s,
            passed_cpu=steps_ok and ours["forward_cpu_s"] <= fast_cpu_s)
    aa = con[JAXOPT_TUNED_AA]

    def ratio_target(name, key, limit, ours=ours):
        r = ours[f"{key}_s"] / aa[f"{key}_s"]
        r_min = ours[f"{key}_min_s"] / aa[f"{key}_min_s"]
        r_cpu = ours[f"{key}_cpu_s"] / aa[f"{key}_cpu_s"]
        add(name, r <= limit,
            f"median wall {ms(ours[f'{key}_s'])} vs {ms(aa[f'{key}_s'])} = {r:.2f}x; min wall {r_min:.2f}x; "
            f"median CPU {ms(ours[f'{key}_cpu_s'])} vs {ms(aa[f'{key}_cpu_s'])} = {r_cpu:.2f}x", f"<= {limit}x",
            passed_min=r_min <= limit, passed_cpu=r_cpu <= limit)

    ratio_target("contractive: forward time <= 0.8 x jaxopt tuned Anderson", "forward", 0.8)
    ratio_target("contractive: forward+backward time <= 0.6 x jaxopt tuned Anderson", "forward_backward", 0.6)
    for name, what in ((OURS_OLD_ADJOINT, "earlier default adjoint tolerance"),
                       (OURS_LIKE_FOR_LIKE, "like-for-like accuracy")):
        if name in con:
            row = con[name]
            ratio_target(f"contractive, {what} ({name}: gradient error {row['grad_rel_error']:.2g} vs jaxopt's "
                         f"{aa['grad_rel_error']:.2g}): forward+backward time <= 0.6 x jaxopt tuned Anderson",
                         "forward_backward", 0.6, ours=row)
    add("contractive: deq.Anderson solver overhead <= 1.3", ours["overhead"] <= 1.3,
        f"overhead {ours['overhead']:.2f} (median forward / (steps x median single jitted f call)); per f "
        f"evaluation inside a compiled loop: {ours['overhead_loop']:.2f} (median wall), "
        f"{ours['overhead_loop_min']:.2f} (min wall), {ours['overhead_loop_cpu']:.2f} (median CPU)", "<= 1.3",
        passed_min=ours["overhead_loop_min"] <= 1.3, passed_cpu=ours["overhead_loop_cpu"] <= 1.3)
    bwd_cpu = ours["forward_backward_cpu_s"] - ours["forward_cpu_s"]
    add("contractive: deq.Anderson IFT backward time <= forward time", ours["ift_backward_s"] <= ours["forward_s"],
        f"median wall: backward {ms(ours['ift_backward_s'])} vs forward {ms(ours['forward_s'])}; min wall "
        f"{ms(ours['ift_backward_min_s'])} vs {ms(ours['forward_min_s'])}; median CPU {ms(bwd_cpu)} vs "
        f"{ms(ours['forward_cpu_s'])}", "<=",
        passed_min=ours["ift_backward_min_s"] <= ours["forward_min_s"], passed_cpu=bwd_cpu <= ours["forward_cpu_s"])
    plain = {k: v for k, v in hard.items() if "FixedPointIteration" in k}
    add("hard: plain iteration fails (does not reach the tolerance)", not any(v["converged"] for v in plain.values()),
        "; ".join(f"{k}: {v['steps']} steps, residual {v['final_residual']:.3g}" for k, v in plain.items()),
        "not converged")
    for name in ("deq.Anderson", "deq.Broyden"):
        v = hard[name]
        add(f"hard: {name} converges", v["converged"],
            f"{v['steps']} steps, residual {v['final_residual']:.3g}", f"residual <= {TOL}")
    return targets


def solver_order(per: dict[str, Any]) -> list[str]:
    """Names in `per` in the order of the table and plot: `SOLVERS`, then torchdeq's."""
    return [n for n in (*SOLVERS, *TORCHDEQ_SOLVERS) if n in per]


def table_rows(results) -> list[dict[str, Any]]:
    rows = []
    for problem, per in results.items():
        for name in solver_order(per):
            r = per[name]
            rows.append({
                "problem": problem, "solver": name, "steps": r["steps"], "f_evals": r["f_evals"],
                "residual": r["final_residual"], "conv": "yes" if r["converged"] else "NO",
                "fwd_ms": r["forward_s"] * 1e3, "fwdbwd_ms": r["forward_backward_s"] * 1e3,
                "fwd_min_ms": r["forward_min_s"] * 1e3, "fwdbwd_min_ms": r["forward_backward_min_s"] * 1e3,
                "bwd_ms": r["ift_backward_s"] * 1e3, "overhead": r["overhead"],
                "compile_s": (r["compile_s"]["forward"] + r["compile_s"]["forward_backward"]) if r["compile_s"] else None,
                "temp_MiB": ((r["memory"]["forward_backward"] or {}).get("temp_size_in_bytes", float("nan")) / 2**20),
                "grad_err": r.get("grad_rel_error"),
            })
    return rows


def plot(results, out_dir, precision: dict | None = None) -> Any:
    """Residual against steps and against time, both problems (log y); with `precision` (a
    `precision_study`), a third row: its relative residual histories, and its errors at the floor.

    The x range is cut at 2.5x the slowest converged solver (solvers that do not converge run
    on to max_steps; their last residual is given in the legend). Time is
    ``k * forward_min_s / steps``: the minimum of the timed forward calls, the estimate least
    affected by other jobs on a shared machine.
    """
    plt = C.pyplot()
    rows = 3 if precision and "cases" in precision else 2
    fig, axes = plt.subplots(rows, 2, figsize=(14, 4.75 * rows), squeeze=False)
    styles = {"deq": "-", "jaxopt": "--", "optimistix": ":", "torchdeq": "-."}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"] + ["navy", "darkred", "darkgreen"]
    for row, (problem, per) in enumerate(results.items()):
        conv = [r for r in per.values() if r["converged"] and r.get("trace")]
        k_max = max([len(r["trace"]) for r in conv] + [10]) * 2.5
        t_max = max([r["forward_min_s"] * 1e3 * len(r["trace"]) / max(r["steps"], 1) for r in conv] + [1e-3]) * 2.5
        for i, name in enumerate(solver_order(per)):
            r = per[name]
            if not r.get("trace") or name in FIXED_ADJOINT_RTOL:  # their forward is deq.Anderson's
                continue
            tr = np.asarray([np.nan if v is None else v for v in r["trace"]], np.float64)
            k = np.arange(len(tr))
            dt = r["forward_min_s"] * 1e3 / max(r["steps"], 1)
            label = name if r["converged"] else f"{name} (not converged: {r['final_residual']:.3g} at {r['steps']})"
            kw = dict(ls=styles[r["library"]], color=colors[i % len(colors)], lw=1.6, label=label)
            axes[row, 0].semilogy(k, tr, **kw)
            axes[row, 1].semilogy(k * dt, tr, **kw)
        axes[row, 0].set_xlim(0, k_max)
        axes[row, 1].set_xlim(0, t_max)
        for col in range(2):
            ax = axes[row, col]
            ax.axhline(TOL, color="k", lw=0.8, alpha=0.6)
            ax.set_ylabel(r"residual $\|f(z_k) - z_k\|_2$ (whole batch)")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{problem}: ||W||_2 = {PROBLEM_NORMS[problem]}")
        axes[row, 0].set_xlabel("solver step k")
        axes[row, 1].set_xlabel("time (ms) = k x min forward time / steps")
        axes[row, 0].legend(fontsize=7, loc="upper right")
    if rows == 3:
        cases = precision["cases"]
        for i, (label, r) in enumerate(cases.items()):
            tr = np.asarray([np.nan if v is None else v for v in r["history_rel"]], np.float64)
            ls = "-" if r["solver"] == "deq.Anderson" else "--"
            axes[2, 0].semilogy(np.arange(len(tr)), tr, ls=ls, color=colors[i // 2], lw=1.4, label=label)
        for d, eps in precision["eps"].items():
            axes[2, 0].axhline(eps, color="k", lw=0.6, ls=":", alpha=0.6)
            axes[2, 0].text(1, eps, f" eps({d})", fontsize=7, va="bottom")
        axes[2, 0].set_xlabel("solver step k")
        axes[2, 0].set_ylabel(r"$\|f(z_k) - z_k\| / \|z^*\|$ (solver dtype)")
        axes[2, 0].set_title("mixed precision (contractive): cell dtype vs solver state dtype")
        axes[2, 0].legend(fontsize=7, loc="upper right")
        axes[2, 0].grid(True, which="both", alpha=0.3)
        names = list(cases)
        axes[2, 1].barh(np.arange(len(names)), [cases[n]["error_rel_at_floor"] for n in names],
                        color=[colors[i // 2] for i in range(len(names))])
        axes[2, 1].set_xscale("log")
        axes[2, 1].set_yticks(np.arange(len(names)), names, fontsize=7)
        axes[2, 1].set_xlabel(r"$\|z - z^*_{64}\| / \|z^*_{64}\|$ at the residual floor")
        axes[2, 1].set_title("error against the float64 fixed point")
        axes[2, 1].grid(True, which="both", axis="x", alpha=0.3)
    fig.suptitle(f"Forward solvers on z = tanh(zW^T + xU^T + b), batch as one vector; tolerance {TOL} (black line)")
    fig.tight_layout()
    return C.save_figure(fig, out_dir, NAME)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    prof = args.profile
    hidden, batch, inp = C.pick(prof, smoke=(16, 4, 8), quick=(256, 64, 128), full=(256, 64, 128))
    repeats = C.pick(prof, smoke=3, quick=20, full=100)
    rounds = C.pick(prof, smoke=1, quick=4, full=10)
    traces = prof != "smoke"
    z0_shape = (batch, hidden)
    C.seed_everything(args.seed)

    arrays = make_problem(args.seed, hidden, batch, inp)
    problem_info = {
        "equation": "z = tanh(z W^T + x U^T + b), z0 = 0, solved as one vector (whole batch)",
        "hidden": hidden, "batch": batch, "input": inp, "dtype": "float32", "seed": args.seed,
        "generator": ("W = -s * Q|Lambda|Q^T / max|Lambda| (Q Lambda Q^T = eigh of (A + A^T)/2, A Gaussian): "
                      "symmetric negative semi-definite, spectral radius = ||W||_2 = s; "
                      "U = 0.5 N(0,1)/sqrt(input), b = 0.05 N(0,1), x = N(0,1); numpy default_rng(seed)"),
        "norms": PROBLEM_NORMS,
        "tolerance": TOL, "max_steps": MAX_STEPS,
    }
    npz_bytes = sum(a.nbytes for a in arrays.values())
    if npz_bytes < 2**20:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{NAME}_problem.npz"
        np.savez(path, **arrays)
        problem_info["npz"] = path.name
    problem_info["npz_bytes"] = npz_bytes

    problems = {p: tuple(jnp.asarray(arrays[k]) for k in (f"W_{p}", "U", "b", "x")) for p in (CONTRACTIVE, HARD)}
    loadavg = {"start": _loadavg()}
    ref_fn = reference_grad_fn(z0_shape)
    refs, extra = {}, {}
    for p, params in problems.items():
        W64 = arrays[f"W_{p}"].astype(np.float64)
        refs[p], ref_info = reference_grad(ref_fn, params)
        extra[p] = {
            "spectral_norm_W": float(np.linalg.norm(W64, 2)),
            "spectral_radius_W": float(np.max(np.abs(np.linalg.eigvalsh(W64)))),
            "reference_gradient": ref_info,
        }
    loop_len = C.pick(prof, smoke=20, quick=10, full=10)
    torchdeq_status, torch_runs = setup_torchdeq(problems, z0_shape, loop_len, refs)
    results, f_evals = measure_all(profile_solvers(prof), problems, z0_shape, repeats=repeats, rounds=rounds, loop_len=loop_len,
                                   ref_grads=refs, trace=traces, torch_runs=torch_runs)
    for p in problems:
        extra[p]["f_eval"] = f_evals[p]
    loadavg["after_solvers"] = _loadavg()

    payload: dict[str, Any] = {
        "benchmark": NAME,
        "profile": prof,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "problem": problem_info,
        "problems": extra,
        "solvers": {name: solver_settings(name) for name in solver_order(results[CONTRACTIVE])},
        "torchdeq": torchdeq_status,
        "results": results,
    }
    if prof == "smoke":
        payload["generator_check"] = {"status": "skipped in the smoke profile"}
    else:
        payload["generator_check"] = generator_check(args.seed, hidden, batch, inp)

    if prof != "smoke":
        params = tuple(jnp.asarray(arrays[k]) for k in (f"W_{CONTRACTIVE}", "U", "b", "x"))
        payload["anderson_breakdown"] = anderson_breakdown(params, z0_shape, K=C.pick(prof, smoke=5, quick=10, full=10),
                                                           repeats=C.pick(prof, smoke=10, quick=100, full=300))

    if prof != "smoke":
        payload["precision"] = precision_study(arrays, z0_shape, repeats=C.pick(prof, smoke=3, quick=10, full=30))
    else:
        payload["precision"] = {"status": "skipped in the smoke profile (measured in quick and full)"}

    if prof == "full":
        timeout = 900.0
        payload["optimistix_default_adjoint"] = {
            **run_expensive("optimistix_default_adjoint", args.seed, hidden, batch, inp, timeout),
            "note": "optx.ImplicitAdjoint() default: AutoLinearSolver materialises the dense (batch*hidden)^2 Jacobian",
        }
        payload["jaxopt_broyden_default"] = {
            **run_expensive("jaxopt_broyden_default", args.seed, hidden, batch, inp, timeout),
            "note": "jaxopt.Broyden(fun=f(z)-z, tol=1e-4, maxiter=500), other settings default",
        }
    else:
        payload["optimistix_default_adjoint"] = {
            "status": "skipped in this profile (measured in --profile full only)",
            "reason": "the default ImplicitAdjoint materialises the (batch*hidden)^2 Jacobian "
                      "(~1 GiB float32 at the real sizes, tens of seconds per gradient)",
        }
        payload["jaxopt_broyden_default"] = {
            "status": "skipped in this profile (measured in --profile full only)",
            "reason": "jaxopt.Broyden at its defaults takes tens of seconds per forward at the real sizes",
        }

    if prof == "full":
        problem_npz = args.out / f"{NAME}_problem.npz"
        if "npz" not in problem_info:
            problem_npz = args.out / f"{NAME}_problem_banax.npz"
            np.savez(problem_npz, **arrays)
        payload["banax"] = run_banax(problem_npz, refs, repeats=50, rounds=5, timeout=900.0)
    else:
        payload["banax"] = {"status": "skipped", "reason": "measured in --profile full only (about 2 min)"}
    loadavg["after_banax"] = _loadavg()

    targets = evaluate_targets(results) + banax_targets(results, payload["banax"])
    payload["targets"] = targets
    loadavg["end"] = _loadavg()
    payload["load_average"] = loadavg
    payload["run_time_s"] = time.perf_counter() - t_start

    C.print_table(
        table_rows(results),
        ["problem", "solver", "steps", "f_evals", "residual", "conv", ("fwd_ms", "fwd ms"),
         ("fwdbwd_ms", "fwd+bwd ms"), ("bwd_ms", "bwd ms"),
         ("fwd_min_ms", "fwd min"), ("fwdbwd_min_ms", "f+b min"), "overhead", ("compile_s", "compile s"),
         ("temp_MiB", "bwd temp MiB"), ("grad_err", "grad rel err")],
        title=f"solvers ({prof}): f eval {extra[CONTRACTIVE]['f_eval']['f_eval_s'] * 1e6:.1f} us "
              f"(in loop {extra[CONTRACTIVE]['f_eval']['f_eval_in_loop_s'] * 1e6:.1f} us)",
    )
    for t in targets:
        also = "".join(f" [{k.split('_', 1)[1]}-based: {'PASS' if t[k] else 'MISS'}]" for k in ("passed_min", "passed_cpu")
                       if k in t)
        print(f"{'PASS' if t['passed'] else 'MISS'}: {t['target']}{also} -- {t['measured']}")
    if "anderson_breakdown" in payload:
        bd = payload["anderson_breakdown"]
        C.print_table([{"piece": k, "us": v * 1e6} for k, v in {**bd["per_step_s"], **{
            k: v for k, v in bd["derived"].items() if k.endswith("_s")}}.items()],
            ["piece", ("us", "us per step")], title="Anderson per-step breakdown (compiled loops)")
    if payload["banax"].get("status") == "measured":
        C.print_table(banax_rows(payload["banax"]),
                      ["problem", "solver", "deq", "backward", "steps", "residual", "conv", ("fwd_ms", "fwd ms"),
                       ("fwdbwd_ms", "fwd+bwd ms"), ("grad_err", "grad rel err"), ("grad_err64", "vs f64")],
                      title=f"banax {payload['banax']['versions'].get('banax')} (own process, after deq's rows)")
    if "cases" in payload["precision"]:
        C.print_table(precision_rows(payload["precision"]),
                      ["case", ("floor", "rel floor"), ("err_floor", "err at floor"), ("to1e-2", "steps to 1e-2"),
                       ("to1e-3", "steps to 1e-3"), ("steps", f"steps (rtol {PRECISION_RTOL:g})"), "conv",
                       ("err", "rel err vs f64"),
                       ("fwd_ms", "fwd ms (CPU)")],
                      title="mixed precision: contractive problem, cell in its dtype, solver state as named")
    for key in ("optimistix_default_adjoint", "jaxopt_broyden_default"):
        print(f"{key}: " + ", ".join(f"{k}={C.fmt(v)}" for k, v in payload[key].items()
                                     if not isinstance(v, dict) and k not in ("note", "reason")))

    if not args.no_plot:
        payload["figure"] = plot(results, args.out, payload["precision"]).name
    payload["run_time_s"] = time.perf_counter() - t_start
    payload["run_cpu_s"] = time.process_time() - cpu_start
    payload["run_time_note"] = ("wall-clock and CPU time (this process only) of the whole run; the machine's load "
                                "average is in load_average (other jobs share the 2 cores)")
    path = C.save_json(args.out, NAME, payload)
    print(f"wrote {path} ({payload['run_time_s']:.1f} s wall, {payload['run_cpu_s']:.1f} s CPU)")
    return payload


if __name__ == "__main__":
    main()
