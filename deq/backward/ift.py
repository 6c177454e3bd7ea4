"""Implicit differentiation: one adjoint fixed-point solve at the fixed point."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _loop
from .._api import check_bool, frozen
from .._tree import row_norm
from ..solvers import GMRES, AbstractSolver, Anderson
from ._base import AbstractBackward, report


def _default_adjoint_solver():
    return Anderson(rtol=1e-4, atol=1e-6, max_steps=100, history_size=5)


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

    Failure is not silent: if the adjoint solve does not converge, a `deq.NonConvergenceWarning`
    is issued from the compiled code (naming the steps and residual; disable with `warn=False`),
    and with `deq.fixed_point(..., throw=True)` a `RuntimeError` is raised instead. The gradient
    returned is then the one from the lowest-residual adjoint iterate.

    The warning costs a little on every call, not only on failures: an executable that holds a
    host callback is dispatched through JAX's Python path instead of its C++ fast path (measured
    on a 2-core CPU: about 0.1-0.4 ms more per call of a jitted training step). `warn=False`
    removes it where convergence is checked another way.

    Args:
      solver: the adjoint solver, with its own tolerances (default `Anderson(rtol=1e-4,
        atol=1e-6, max_steps=100)`: ample for training in float32; tighten it for exact
        gradients in float64).
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
        if self.solver is None:
            object.__setattr__(self, "solver", _default_adjoint_solver())
        if not isinstance(self.solver, (AbstractSolver, GMRES)):
            raise TypeError(
                f"IFT: `solver` must be a deq solver (deq.Anderson, deq.Broyden, "
                f"deq.FixedPointIteration or deq.GMRES), got {self.solver!r}. "
                "Pass e.g. IFT(solver=deq.Anderson(max_steps=50))."
            )

    def solve(self, fn, solver, x0, params, throw):
        return _ift(fn, solver, self, throw, x0, params)

    def adjoint(self, fn, x_star, params, g, throw, vjp=None):
        """Solve the adjoint `u = J_f^T u + g` at `x_star`; returns `(u, loop_output)`.

        `vjp`, if given, is `jax.vjp(fn, x_star, params)[1]` (saves linearizing `fn` again).
        """
        if vjp is None:
            _, vjp = jax.vjp(fn, x_star, params)
        vjp_x = lambda u: vjp(u)[0]  # the parameter cotangent is dead code inside the loop
        h = lambda u: vjp_x(u) + g
        if isinstance(self.solver, GMRES):
            s = self.solver
            u, _ = jax.scipy.sparse.linalg.gmres(
                lambda u: u - vjp_x(u), g, x0=g, tol=s.rtol, atol=s.atol,
                restart=s.restart, maxiter=s.max_steps, solve_method="batched",
            )
            hu = h(u)
            res = row_norm(hu - u)
            conv = res <= s.atol + s.rtol * row_norm(g)
            B = u.shape[0]
            out = _loop.LoopOutput(u, res, jnp.full((B,), -1, jnp.int32), conv,
                                   jnp.where(conv, 0, 1).astype(jnp.int32),
                                   jnp.full((B, 1), jnp.nan, res.dtype), hu)
        else:
            out = _loop.run(self.solver, h, g)
        u = report("the IFT backward (adjoint) solve", out, out.x, throw=throw, warn=self.warn or throw)
        return u, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _ift(fn, solver, backward, throw, x0, params):
    out = _loop.run(solver, lambda x: fn(x, params), x0)
    return out.x, out


def _ift_fwd(fn, solver, backward, throw, x0, params):
    x_star, out = _ift(fn, solver, backward, throw, x0, params)
    return (x_star, out), (x_star, params)


def _ift_bwd(fn, solver, backward, throw, residuals, cts):
    x_star, params = residuals
    g = cts[0]
    # One linearization of f at z* serves the adjoint solve and the parameter gradient.
    _, vjp = jax.vjp(fn, x_star, params)
    u, _ = backward.adjoint(fn, x_star, params, g, throw, vjp=vjp)
    g_params = vjp(u)[1]
    return jnp.zeros_like(x_star), g_params


_ift.defvjp(_ift_fwd, _ift_bwd)
