r"""Operator splitting for monotone equilibria, forward and backward, on the core's driver loop.

The equilibrium `z = relu(W z + c)` (with `c = U x + b`) is the zero of the monotone inclusion

.. math:: 0 \in \underbrace{(I - W) z - c}_{F(z)} + \underbrace{\partial \iota_{\ge 0}(z)}_{G(z)},

`F` is `m`-strongly monotone and `L`-Lipschitz (`L = ||I - W||_2`) and `relu` is the resolvent
(proximal operator) of `G` for every step size. The two splitting methods differ in how they
use `F`:

* forward-backward: `z <- relu(z - alpha F(z)) = relu((1 - alpha) z + alpha (W z + c))`, a
  contraction for `0 < alpha < 2m / L^2`; one multiplication by `W` per step.
* Peaceman-Rachford: the reflected resolvents of `F` and `G`, a contraction for every
  `alpha > 0`; one resolvent `(I + alpha (I - W))^{-1}` (factorized once per solve) and one
  multiplication by `W` (for the residual) per step.

The gradient solves the adjoint problem with the same splitting: with `D = relu'(W z* + c)` (a
0/1 diagonal), the cotangent `w` of `c` solves `w = D (W^T w + g)`, which is again a monotone
inclusion (`I - W^T` has the same symmetric part; multiplication by a 0/1 diagonal is the
proximal operator of a convex function for every step size), so it converges under the same
conditions. Both directions are run by `deq._loop.run`: the methods are `AbstractSolver`s bound
to the operator of the solve, and `Stats` have the semantics of `deq.fixed_point`: the
residual is `||relu(W z + c) - z||` and the stopping test
`||relu(W z + c) - z|| <= atol + rtol ||relu(W z + c)||`.

References:
  Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
  Ryu & Boyd, "A primer on monotone operator methods", Appl. Comput. Math. 2016.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .. import _loop
from .._api import check_tolerances, frozen, strict_kwargs
from .._solution import Solution, Stats
from ..backward._base import report
from ..solvers._base import AbstractSolver
from ..nn._checks import check_input, check_nonempty_batch, check_state_like
from ._operators import MonotoneConv, MonotoneDense


class _Problem(NamedTuple):
    """A monotone equilibrium `z = prox(K z + bias)` on packed `(B, n)` rows."""

    K: Callable  # the linear operator (W, or W^T for the adjoint)
    resolve: Optional[Callable]  # (I + alpha (I - K))^{-1}, when the method needs it
    prox: Callable  # relu (forward) or multiplication by D (adjoint)
    bias: jax.Array  # c (forward) or g (adjoint)

    def F(self, z):
        return self.prox(self.K(z) + self.bias)


def _check_alpha(owner: str, alpha) -> None:
    if alpha is None:
        return
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(
            f"{owner}: `alpha` must be a positive step size or None (automatic), got {alpha!r}."
        )


class _Splitting:
    """Shared configuration of the splitting methods."""

    alpha: Optional[float]
    rtol: float
    atol: float
    max_steps: int
    needs_resolvent = False

    def __post_init__(self):
        check_tolerances(self)
        _check_alpha(type(self).__name__, self.alpha)

    def auto_alpha(self, m, L):  # pragma: no cover - abstract
        raise NotImplementedError

    def step_size(self, op, shape):
        """The step size for `op` on per-sample state `shape`: `alpha`, or the automatic one."""
        if self.alpha is not None:
            return self.alpha
        L = jax.lax.stop_gradient(op.lipschitz(shape))
        return self.auto_alpha(op.m, L)

    def bind(self, problem: _Problem, alpha) -> AbstractSolver:  # pragma: no cover - abstract
        raise NotImplementedError


class _Bound(AbstractSolver):
    """A splitting method bound to one problem and step size: what `deq._loop.run` drives."""

    def __init__(self, config, problem: _Problem, alpha):
        self.rtol, self.atol, self.max_steps = config.rtol, config.atol, config.max_steps
        self.p, self.alpha = problem, alpha


class _BoundFB(_Bound):
    def init(self, F, x, fx):
        return self.p.K(x) + self.p.bias  # the pre-activation at x: one W-product per step

    def step(self, F, x, fx, pre, active, best):
        a = self.alpha
        x_new = self.p.prox((1 - a) * x + a * pre)
        pre_new = self.p.K(x_new) + self.p.bias
        return x_new, self.p.prox(pre_new), pre_new


class _BoundPR(_Bound):
    def init(self, F, x, fx):
        return x  # u_0 = z_0

    def step(self, F, x, fx, u, active, best):
        a = self.alpha
        u_half = 2 * x - u
        z_half = self.p.resolve(u_half + a * self.p.bias)
        u_new = 2 * z_half - u_half
        x_new = self.p.prox(u_new)
        return x_new, F(x_new), u_new


@frozen
class ForwardBackward(_Splitting):
    r"""Forward-backward splitting for monotone equilibria.

    .. math::
        z_{k+1} = \mathrm{relu}\big((1 - \alpha) z_k + \alpha (W z_k + U x + b)\big)

    The forward step on `F(z) = (I - W) z - c` followed by the backward (proximal) step on the
    nonnegativity constraint. Since `I - W` is `m`-strongly monotone and `L`-Lipschitz, the map
    is a contraction with factor `sqrt(1 - 2 alpha m + alpha^2 L^2) < 1` for
    `0 < alpha < 2m / L^2`, whatever the scale of `W`, where plain iteration
    `z <- relu(W z + c)` may diverge. `alpha=None` picks `alpha = m / L^2` (the best factor of
    that bound, `sqrt(1 - m^2 / L^2)`) from the exact `L` (dense, circular conv) or an upper
    bound on it (zero-padded conv), recomputed for each solve. One multiplication by `W` per
    step, no factorization: cheap steps, but many of them when `L / m` is large.

    Args:
      alpha: step size; None for the automatic `m / L^2`. A fixed `alpha` must satisfy
        `alpha < 2m / L^2` for the guarantee.
      rtol: relative tolerance of the stopping test `||f(z) - z|| <= atol + rtol ||f(z)||`,
        `f(z) = relu(W z + U x + b)`.
      atol: absolute tolerance of the same test.
      max_steps: most steps.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deq.monotone import MonotoneDense, ForwardBackward, monotone_fixed_point
      >>> op = MonotoneDense.init(jax.random.PRNGKey(0), 4, 8, m=1.0)
      >>> x = jnp.ones((2, 4))
      >>> sol = monotone_fixed_point(op, x, method=ForwardBackward(max_steps=1000))
      >>> sol.value.shape, bool(sol.stats.converged.all())
      ((2, 8), True)

    References:
      Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
      Ryu & Boyd, "A primer on monotone operator methods", Appl. Comput. Math. 2016.
    """

    alpha: Optional[float] = None
    rtol: float = 1e-4
    atol: float = 1e-6
    max_steps: int = 500

    def auto_alpha(self, m, L):
        return m / L**2

    def bind(self, problem, alpha):
        return _BoundFB(self, problem, alpha)


@frozen
class PeacemanRachford(_Splitting):
    r"""Peaceman-Rachford splitting for monotone equilibria.

    .. math::
        u_{k+1/2} &= 2 z_k - u_k, \\
        z_{k+1/2} &= (I + \alpha (I - W))^{-1} (u_{k+1/2} + \alpha (U x + b)), \\
        u_{k+1} &= 2 z_{k+1/2} - u_{k+1/2}, \qquad z_{k+1} = \mathrm{relu}(u_{k+1}).

    The composition of the two reflected resolvents is a contraction for every `alpha > 0`
    because `I - W` is strongly monotone and Lipschitz: no step-size condition. The resolvent is
    factorized once per solve (LU for dense `W`; per-frequency `C x C` inverses for circular
    convolutions; conjugate gradients for zero-padded ones) and applied once per step.
    `alpha=None` picks `alpha = 1 / L`, which minimizes the contraction bound
    `sqrt(1 - 4 alpha m / (1 + alpha L)^2)`.

    Args:
      alpha: step size `> 0`, or None for `1 / L` (default 1, as in Winston & Kolter).
      rtol: relative tolerance of the stopping test `||f(z) - z|| <= atol + rtol ||f(z)||`,
        `f(z) = relu(W z + U x + b)`.
      atol: absolute tolerance of the same test.
      max_steps: most steps.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deq.monotone import MonotoneDense, PeacemanRachford, monotone_fixed_point
      >>> op = MonotoneDense.init(jax.random.PRNGKey(0), 4, 8, m=1.0)
      >>> x = jnp.ones((2, 4))
      >>> sol = monotone_fixed_point(op, x, method=PeacemanRachford(alpha=1.0))
      >>> bool(sol.stats.converged.all()), int(sol.stats.num_steps.max()) < 100
      (True, True)

    References:
      Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
      Ryu & Boyd, "A primer on monotone operator methods", Appl. Comput. Math. 2016.
    """

    alpha: Optional[float] = 1.0
    rtol: float = 1e-4
    atol: float = 1e-6
    max_steps: int = 200
    needs_resolvent = True

    def auto_alpha(self, m, L):
        return 1.0 / L

    def bind(self, problem, alpha):
        return _BoundPR(self, problem, alpha)


# --------------------------------------------------------------------------------------------
# The solve and its implicit gradient
# --------------------------------------------------------------------------------------------


def _problem(op, method, shape, bias, prox, *, transpose: bool):
    """Bind `op` (or its transpose) into a packed problem for `method`; returns `(problem, alpha)`."""
    B = bias.shape[0]
    unpack = lambda v: v.reshape((B,) + tuple(shape))
    pack = lambda v: v.reshape(B, -1)
    mv = op.rmatvec if transpose else op.matvec
    alpha = method.step_size(op, shape)
    resolve = None
    if method.needs_resolvent:
        R = op.resolvent(alpha, shape)
        rs = R.solve_T if transpose else R.solve
        resolve = lambda v: pack(rs(unpack(v)))
    problem = _Problem(K=lambda v: pack(mv(unpack(v))), resolve=resolve, prox=prox, bias=pack(bias))
    return problem, alpha


def _forward(method, op, c, z0):
    problem, alpha = _problem(op, method, c.shape[1:], c, jax.nn.relu, transpose=False)
    out = _loop.run(method.bind(problem, alpha), problem.F, z0.reshape(c.shape[0], -1))
    return out.x.reshape(c.shape), out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _solve(method, backward, throw, op, c, z0):
    return _forward(method, op, c, z0)


def _solve_fwd(method, backward, throw, op, c, z0):
    z, out = _forward(method, op, c, z0)
    return (z, out), (op, c, z)


def _solve_bwd(method, backward, throw, res, cts):
    op, c, z = res
    g = cts[0]
    backward = method if backward is None else backward
    B = c.shape[0]
    D = (op.matvec(z) + c > 0).astype(g.dtype).reshape(B, -1)
    problem, alpha = _problem(op, backward, c.shape[1:], g, lambda v: D * v, transpose=True)
    out = _loop.run(backward.bind(problem, alpha), problem.F, jnp.zeros_like(problem.bias))
    w = report("the monDEQ backward (adjoint) splitting solve", out, out.x, throw=throw, warn=True).reshape(c.shape)
    _, vjp_op = jax.vjp(lambda o: o.matvec(z), op)
    (op_bar,) = vjp_op(w)
    return op_bar, w, jnp.zeros_like(z)


_solve.defvjp(_solve_fwd, _solve_bwd)


_METHODS = (ForwardBackward, PeacemanRachford)
_OPERATORS = (MonotoneDense, MonotoneConv)


def _validate(op, x, method, backward, batch_axis, throw):
    if not isinstance(op, _OPERATORS):
        raise TypeError(
            "monotone_fixed_point: `op` must be a deq.monotone.MonotoneDense or MonotoneConv "
            f"(the parameters A, B, U, b and margin m), got {type(op).__name__}. Build one with "
            "MonotoneDense.init(key, in_features, hidden, m=...) or take layer.operator() of a "
            "deq.monotone.MonDEQ."
        )
    for name, value in (("method", method), ("backward", backward)):
        if value is not None and not isinstance(value, _METHODS):
            raise TypeError(
                f"monotone_fixed_point: `{name}` must be deq.monotone.ForwardBackward(...) or "
                f"deq.monotone.PeacemanRachford(...), got {value!r}. The general deq solvers "
                "(Anderson, Broyden, ...) do not use the monotone structure: call deq.fixed_point "
                "for them."
            )
    if batch_axis not in (None, 0) or isinstance(batch_axis, bool):
        raise ValueError(
            f"monotone_fixed_point: `batch_axis` must be None (one sample) or 0 (axis 0 indexes "
            f"samples), got {batch_axis!r}."
        )
    if not isinstance(throw, bool):
        raise TypeError(f"monotone_fixed_point: `throw` must be a bool, got {throw!r}.")
    want = 2 if isinstance(op, MonotoneDense) else 4
    got = jnp.ndim(x) + (1 if batch_axis is None else 0)
    if got != want:
        kind = "(batch, in_features)" if want == 2 else "(batch, H, W, C_in)"
        raise ValueError(
            f"monotone_fixed_point: `x` must be shaped {kind} with batch_axis=0 (drop the batch "
            f"axis for batch_axis=None), got shape {jnp.shape(x)} with batch_axis={batch_axis!r}."
        )
    if isinstance(op, MonotoneDense):
        size, name, layout = op.U.shape[1], "in_features", f"(batch, {op.U.shape[1]})"
    else:
        size, name, layout = op.U.shape[2], "in_channels", f"(batch, H, W, {op.U.shape[2]})"
    check_input("monotone_fixed_point", x, layout=layout, last=size, last_name=f"{name} (op.U's input size)",
                fix=f"Pass x with {size} features on its last axis, or build the operator for this input.")
    if batch_axis == 0:
        check_nonempty_batch("monotone_fixed_point", x)


def _impl(op, x, z0, method, backward, batch_axis, throw):
    # One compute dtype for parameters and inputs (at least float32); gradients flow back
    # through the casts in the parameters' own dtypes.
    dtype = jnp.result_type(jnp.float32, x, *jax.tree_util.tree_leaves(op))
    op = jax.tree_util.tree_map(lambda a: a.astype(dtype), op)
    x = x.astype(dtype)
    if batch_axis is None:
        x = x[None]
        z0 = None if z0 is None else z0[None]
    c = op.inject(x)
    if z0 is None:
        z0 = jnp.zeros_like(c)
    elif jnp.shape(z0) != c.shape:
        state = c[0] if batch_axis is None else c
        got = z0[0] if batch_axis is None else z0
        check_state_like("monotone_fixed_point", got, state, "state (per sample: " f"{c.shape[1:]})")
    z, out = _solve(method, backward, throw, op, c, jnp.asarray(z0, c.dtype))
    if throw:
        z = report("the monDEQ forward splitting solve", out, z, throw=True, warn=False)
    sq = (lambda a: a[0]) if batch_axis is None else (lambda a: a)
    stats = Stats(
        num_steps=sq(out.num_steps),
        residual_norm=sq(out.residual),
        converged=sq(out.converged),
        result=sq(out.result),
        residual_history=sq(out.history),
    )
    return Solution(value=sq(z), stats=stats)


_impl_jit = jax.jit(_impl, static_argnums=(3, 4, 5, 6))


@strict_kwargs
def monotone_fixed_point(op, x, *, method=None, backward=None, z0=None, batch_axis=0,
                         throw=False) -> Solution:
    r"""Solve the monotone equilibrium `z* = relu(W z* + U x + b)` by operator splitting.

    .. math::
        z^\star = \mathrm{relu}(W z^\star + U x + b), \qquad I - W \succeq m I,

    has a unique solution for every input (Winston & Kolter 2020, Thm. 1), found by
    forward-backward or Peaceman-Rachford splitting, each convergent whatever the scale of the
    weights. The gradient is implicit (a `jax.custom_vjp`, matrix-free): with
    `D = relu'(W z* + U x + b)`, the cotangent `w` of `U x + b` solves the adjoint monotone
    problem `w = D (W^T w + g)` with the same splitting, and the parameter gradients are
    vector-Jacobian products of `W z*` and `U x + b` with `w`. Memory does not grow with the
    number of steps.

    Args:
      op: a `MonotoneDense` or `MonotoneConv` (parameters `A`, `B`, `U`, `b` and margin `m`).
      x: input, `(batch, d)` (dense) or `(batch, H, W, C_in)` NHWC (conv); without the batch
        axis when `batch_axis=None`.
      method: `PeacemanRachford()` (default) or `ForwardBackward()`, with the forward solve's
        tolerances and step size.
      backward: the splitting method (and tolerances) of the adjoint solve; None: `method`.
        Non-convergence of the adjoint is reported by a `deq.NonConvergenceWarning`.
      z0: starting point shaped like the state (default zeros).
      batch_axis: 0 (axis 0 of `x` indexes samples: per-sample stopping and stats) or None.
      throw: raise a `RuntimeError` from compiled code when the forward or the backward solve
        does not converge.

    Returns:
      A `deq.Solution`: `value` is `z*` (`(batch, n)` or `(batch, H, W, C)`) and `stats` has
      `num_steps`, `residual_norm` (`||relu(W z + U x + b) - z||`), `converged`, `result` and
      `residual_history`, per sample, as for `deq.fixed_point`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deq.monotone import MonotoneDense, PeacemanRachford, monotone_fixed_point
      >>> op = MonotoneDense.init(jax.random.PRNGKey(0), 4, 8, m=1.0)
      >>> x = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
      >>> sol = monotone_fixed_point(op, x, method=PeacemanRachford(rtol=1e-4, atol=1e-6))
      >>> z = sol.value
      >>> bool(jnp.allclose(z, jax.nn.relu(z @ op.weight().T + op.inject(x)), atol=1e-3))
      True
      >>> loss = lambda op: monotone_fixed_point(op, x).value.sum()
      >>> jax.grad(loss)(op).A.shape
      (8, 8)

    References:
      Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
      Ryu & Boyd, "A primer on monotone operator methods", Appl. Comput. Math. 2016.
    """
    method = PeacemanRachford() if method is None else method
    _validate(op, x, method, backward, batch_axis, throw)
    return _impl_jit(op, jnp.asarray(x), z0, method, backward, batch_axis, throw)
