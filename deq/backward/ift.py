"""Implicit differentiation: one adjoint fixed-point solve at the fixed point."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import _loop
from .._api import check_bool, frozen
from .._tree import row_norm
from ..solvers import GMRES, AbstractSolver, Anderson
from .._solution import RESULTS, probe_cotangent
from ._base import ADJOINT_RESIDUAL, AbstractBackward, report


ADJOINT_RTOL_CAP = 1e-4
"""The derived adjoint tolerance is never looser than this (float32 training's long-standing default)."""


def adjoint_rtol_floor(dtype) -> float:
    """The tightest relative tolerance the derived adjoint asks for in `dtype`: 10 eps."""
    return 10.0 * float(jnp.finfo(dtype).eps)


def derived_adjoint_solver(forward) -> Anderson:
    """The adjoint solver `deq.IFT()` uses when none is given: Anderson, up to 100 steps.

    Its tolerance is set per sample at run time (see `derived_adjoint_rtol`); `atol=0` since the
    adjoint is judged relative to its right-hand side.
    """
    steps = max(100, int(getattr(forward, "max_steps", 100)))
    return Anderson(rtol=ADJOINT_RTOL_CAP, atol=0.0, max_steps=steps, history_size=5)


def derived_adjoint_rtol(forward, fx_norm: jax.Array, dtype) -> jax.Array:
    """Per-sample relative tolerance of the default adjoint: the forward's, within bounds.

    The forward solve stopped at `||f(z) - z|| <= atol_f + rtol_f ||f(z)||`, i.e. a relative
    precision `r_f = rtol_f + atol_f / ||f(z*)||`; the gradient it determines cannot be more
    precise than that, and the adjoint is asked for the same:
    `rtol_adj = clip(r_f, 10 eps(dtype), 1e-4)`. Loose float32 training (forward `rtol=1e-3`)
    keeps the adjoint at 1e-4, as before; a float64 forward at `atol=1e-12` gets an adjoint at
    about 1e-12 relative.
    """
    rtol_f = float(getattr(forward, "rtol", ADJOINT_RTOL_CAP))
    atol_f = float(getattr(forward, "atol", 0.0))
    safe = jnp.where(fx_norm > 0, fx_norm, 1.0)
    r_f = rtol_f + jnp.where(fx_norm > 0, atol_f / safe, 0.0)
    return jnp.clip(r_f, adjoint_rtol_floor(dtype), ADJOINT_RTOL_CAP).astype(dtype)


@frozen
class IFT(AbstractBackward):
    r"""Implicit-function-theorem gradients (Bai, Kolter & Koltun 2019).

    At the fixed point `z* = f(z*, a)`, the implicit function theorem gives
    `dz*/da = (I - J_f)^{-1} df/da`, so the vector-Jacobian product needs the adjoint `u`:

    .. math::
        u = J_f(z^*)^\top u + \frac{\partial L}{\partial z^*}, \qquad
        \frac{dL}{da} = \Big(\frac{\partial f}{\partial a}(z^*, a)\Big)^{\!\top} u .

    `u` is found with `solver` (any forward solver on this linear fixed-point problem, or
    `deq.GMRES` on `(I - J_f^T) u = dL/dz*`) using vector-Jacobian products of `f` at `z*` only:
    no Jacobian matrix is built, and memory does not grow with the forward steps (only `z*` and
    the parameters are saved). With `batch_axis=0` each sample's adjoint converges on its own.

    The adjoint is a linear system, and it is judged as one: per sample,
    `||J^T u + g - u|| <= atol + rtol ||g||` with `g = dL/dz*` (never relative to the size of
    `u`, which a singular `I - J^T` would let grow without bound). By default (`solver=None`) the
    tolerance follows the forward solve: `rtol = clip(rtol_f + atol_f / ||f(z*)||, 10 eps, 1e-4)`
    per sample (`eps` of the state's dtype; see `derived_adjoint_rtol`), with Anderson and
    `max(100, forward max_steps)` steps, so a float64 solve at `atol=1e-12` gets gradients
    accurate to about that precision, and float32 training at `rtol=1e-3` keeps its 1e-4 adjoint.
    A solver you pass keeps its own `rtol`/`atol`, applied in the same linear-system test;
    `rtol = atol = 0` gives a fixed number of adjoint steps (no warning then).

    Failure is not silent: if the adjoint solve does not converge, a `deq.NonConvergenceWarning`
    naming the adjoint residual `||J^T u + g - u||` is issued from the compiled code, attributed
    to your line that called the solve (disable with `warn=False`), and with
    `deq.fixed_point(..., throw=True)` a `deq.SolveError` is raised instead. The gradient
    returned is then the one from the lowest-residual adjoint iterate. Its statistics (steps,
    residual, converged, result per sample) reach you through `deq.BackwardStats.probe()`.

    The warning costs a little on every call, not only on failures: an executable that holds a
    host callback is dispatched through JAX's Python path instead of its C++ fast path (measured
    on a 2-core CPU: about 0.1-0.4 ms more per call of a jitted training step). `warn=False`
    removes it where convergence is checked another way.

    **Every transformation.** The rule is a custom JVP whose tangent is the linear solve
    `t = J_f t + (df/da) da` (`lax.custom_linear_solve`, with this solver and tolerance rule),
    which JAX transposes into the adjoint solve above: `jax.jvp`, `jax.jacfwd`, `jax.grad`,
    `jax.hessian` and `jax.jacrev(jax.grad(...))` all work with every adjoint solver (a failed
    tangent solve is reported like the adjoint, naming `||J t + b - t||`). When a
    `deq.BackwardStats` probe is passed, a custom VJP delivers the statistics instead (reverse
    mode only). Both give the same gradient at the same cost (measured on the
    `benchmarks.solvers` problem: 2.20 vs 2.20 ms median per jitted gradient).

    Args:
      solver: the adjoint solver, with its own tolerances; None (default) derives them from the
        forward solve as described above.
      warn: warn when the adjoint solve does not converge.

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> f = lambda z, a: jnp.tanh(0.5 * z + a)
      >>> g = jax.grad(lambda a: deq.fixed_point(f, jnp.zeros(2), a).value.sum())(jnp.ones(2))
      >>> g.shape
      (2,)

    References:
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    solver: object = None  # None: the default adjoint solver below
    warn: bool = True

    def __post_init__(self):
        check_bool("IFT", "warn", self.warn)
        if self.solver is not None and not isinstance(self.solver, (AbstractSolver, GMRES)):
            raise TypeError(
                f"IFT: `solver` must be a deq solver (deq.Anderson, deq.Broyden, "
                f"deq.FixedPointIteration or deq.GMRES), got {self.solver!r}. "
                "Pass e.g. IFT(solver=deq.Anderson(max_steps=50))."
            )

    def solve(self, fn, solver, x0, params, throw, probe=None, budget=None, adjoint_init=None):
        if probe is None and adjoint_init is None:
            return _ift_linear(fn, solver, self, throw, x0, params, budget)
        # The backward statistics, and the new adjoint of a warm start, arrive as cotangents: a
        # custom VJP delivers them.
        return _ift(fn, solver, self, throw, x0, params, probe, budget, adjoint_init)

    def adjoint(self, fn, x_star, params, g, throw, vjp=None, forward=None, fx_norm=None, init=None):
        """Solve the adjoint `u = J_f^T u + g` at `x_star`; returns `(u, loop_output)`.

        `vjp`, if given, is `jax.vjp(fn, x_star, params)[1]` (saves linearizing `fn` again).
        `forward` is the forward solver and `fx_norm` the `(B,)` norms `||f(z*)||`, from which
        the default tolerance is derived (without them, the forward is taken as `Anderson()`).
        `init` is the adjoint solve's starting point (default `g`).
        """
        if vjp is None:
            _, vjp = jax.vjp(fn, x_star, params)
        vjp_x = lambda u: vjp(u)[0]  # the parameter cotangent is dead code inside the loop
        if fx_norm is None and self.solver is None:
            fx_norm = row_norm(fn(x_star, params))
        return self.linear_solve(vjp_x, g, throw, forward=forward, fx_norm=fx_norm, init=init)

    def linear_solve(self, J, b, throw, *, forward=None, fx_norm=None, what="the IFT backward (adjoint) solve",
                     residual_name=ADJOINT_RESIDUAL, init=None):
        """Solve the linear fixed-point problem `u = J(u) + b` (rows independent) with this
        strategy's solver and tolerance rule, reporting failure; returns `(u, loop_output)`.

        `J` is `v -> J_f^T v` for the adjoint, or `v -> J_f v` for the tangent of forward mode.
        `init` is the starting point (default `b`: one step from zero); the stopping test is
        relative to `||b||` whatever the start.
        """
        h = lambda u: J(u) + b
        b_norm = row_norm(b)
        start = b if init is None else init
        if isinstance(self.solver, GMRES):
            s = self.solver
            restart, maxiter = s.cycles()  # max_steps counts products, as in every solver
            u, _ = jax.scipy.sparse.linalg.gmres(
                lambda u: u - J(u), b, x0=start, tol=s.rtol, atol=s.atol,
                restart=restart, maxiter=maxiter, solve_method="batched",
            )
            hu = h(u)
            res = row_norm(hu - u)
            conv = jnp.isfinite(res) & (res <= s.atol + s.rtol * b_norm)
            code = jnp.where(conv, RESULTS.CONVERGED,
                             jnp.where(jnp.isfinite(res), RESULTS.MAX_STEPS, RESULTS.NONFINITE))
            B = u.shape[0]
            out = _loop.LoopOutput(u, res, jnp.full((B,), -1, jnp.int32), conv, code.astype(jnp.int32),
                                   jnp.full((B, 1), jnp.nan, res.dtype), hu)
            fixed_budget = False
        else:
            if self.solver is None:
                forward = Anderson() if forward is None else forward
                solver = derived_adjoint_solver(forward)
                rtol = derived_adjoint_rtol(forward, jax.lax.stop_gradient(fx_norm), b.dtype)
            else:
                solver, rtol = self.solver, None
            fixed_budget = solver.rtol == 0 and solver.atol == 0
            out = _loop.run(solver, h, start, rhs_norm=b_norm, rtol=rtol)
        warn = (self.warn or throw) and not fixed_budget
        u = report(what, out, out.x, throw=throw and not fixed_budget, warn=warn, residual_name=residual_name)
        return u, out


TANGENT_RESIDUAL = "||J t + b - t||"




@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _ift_linear(fn, solver, backward, throw, x0, params, budget):
    """IFT as a custom JVP whose tangent is a linear solve JAX can transpose
    (`lax.custom_linear_solve`): forward mode solves `t = J_f t + (df/da) da`; reverse mode
    transposes it into the adjoint solve `u = J_f^T u + g`; higher orders differentiate the
    linear solves in turn. Used whenever no backward-statistics probe is given."""
    out = _loop.run(solver, lambda x: fn(x, params), x0, budget=budget)
    return out.x, out


@_ift_linear.defjvp
def _ift_linear_jvp(fn, solver, backward, throw, primals, tangents):
    x0, params, budget = primals
    dparams = tangents[1]
    x_star, out = _ift_linear(fn, solver, backward, throw, x0, params, budget)
    fx_norm = jax.lax.stop_gradient(row_norm(out.fx))
    # One linearization of f at (z*, a) serves the tangent's right-hand side and every product.
    _, lin = jax.linearize(fn, x_star, params)
    zero_p = jax.tree_util.tree_map(_zero_tangent, params)
    b = lin(jnp.zeros_like(x_star), dparams)
    J = lambda v: lin(v, zero_p)  # noqa: E731

    def solve(matvec, rhs):  # (I - J) t = rhs
        return backward.linear_solve(lambda v: v - matvec(v), rhs, throw, forward=solver, fx_norm=fx_norm,
                                     what="the IFT forward-mode (tangent) solve",
                                     residual_name=TANGENT_RESIDUAL)[0]

    def transpose_solve(vecmat, rhs):  # (I - J^T) u = rhs: the adjoint
        return backward.linear_solve(lambda v: v - vecmat(v), rhs, throw, forward=solver, fx_norm=fx_norm)[0]

    t = jax.lax.custom_linear_solve(lambda v: v - J(v), b, solve, transpose_solve)
    return (x_star, out), (t, jax.tree_util.tree_map(_zero_tangent, out))


def _zero_tangent(leaf):
    """A zero tangent for `leaf`: zeros for a floating leaf, float0 for an integer or bool one."""
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(jnp.shape(leaf), jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _ift(fn, solver, backward, throw, x0, params, probe, budget, u0=None):
    """IFT as a custom VJP, for what arrives as cotangents: the adjoint's statistics (`probe`,
    a `deq.BackwardStats`) and, for a warm start, the new adjoint itself (`u0`, the packed
    `(B, n)` starting point of the adjoint solve, whose cotangent is the solved `u`)."""
    out = _loop.run(solver, lambda x: fn(x, params), x0, budget=budget)
    return out.x, out


def _ift_fwd(fn, solver, backward, throw, x0, params, probe, budget, u0=None):
    x_star, out = _ift(fn, solver, backward, throw, x0, params, probe, budget, u0)
    return (x_star, out), (x_star, params, row_norm(out.fx), probe, u0)


def _ift_bwd(fn, solver, backward, throw, residuals, cts):
    x_star, params, fx_norm, probe, u0 = residuals
    g = cts[0]
    # One linearization of f at z* serves the adjoint solve and the parameter gradient.
    _, vjp = jax.vjp(fn, x_star, params)
    u, out = backward.adjoint(fn, x_star, params, g, throw, vjp=vjp, forward=solver, fx_norm=fx_norm, init=u0)
    g_params = vjp(u)[1]
    # The step budget is an integer: no cotangent. A warm start's "cotangent" is the new adjoint.
    return jnp.zeros_like(x_star), g_params, probe_cotangent(probe, out), None, None if u0 is None else u


_ift.defvjp(_ift_fwd, _ift_bwd)
