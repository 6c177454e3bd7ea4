"""The forward's knowledge reused in the backward: SHINE (Broyden's inverse estimate as the adjoint)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import _loop
from .._api import frozen
from .._solution import probe_cotangent
from ..solvers import Anderson, Broyden
from ._base import AbstractBackward
from .ift import IFT


@frozen
class SHINE(AbstractBackward):
    r"""SHINE (Ramzi et al. 2022): the adjoint from the forward Broyden's inverse-Jacobian estimate.

    A Broyden forward solve (`deq.Broyden`) ends with a low-rank estimate
    `H = -I + sum_i u_i v_i^T` of the inverse Jacobian of `g(z) = f(z) - z`, i.e.
    `-H ~ (I - J_f)^{-1}` at `z*`. SHINE applies its transpose to the incoming gradient instead
    of solving the adjoint system:

    .. math::
        u_0 = -H^\top \frac{\partial L}{\partial z^*}
            = \frac{\partial L}{\partial z^*} - \sum_i v_i \Big(u_i \cdot \frac{\partial L}{\partial z^*}\Big)
            \approx (I - J_f^\top)^{-1} \frac{\partial L}{\partial z^*}, \qquad
        \frac{dL}{da} \approx \Big(\frac{\partial f}{\partial a}(z^*, a)\Big)^{\!\top} u .

    With `refine=0`, `u = u_0`: one vector-Jacobian product of `f` (the cost of `deq.JFB`) and
    `O(history_size n)` per sample of memory for the saved estimate. This is also the
    "Broyden-preconditioned JFB" (GDEQ, Nguyen et al. 2023; banax's `GDEQ` adjoint), the same
    formula, so it has no class of its own. With `refine=k`, `u` is `u_0` improved by `k` steps
    of Anderson (`history_size=min(5, k)`) on the adjoint problem `u = J_f^T u + dL/dz*`,
    warm-started at `u_0` (`k + 1` products): the error shrinks with `k`, and `deq.IFT`'s
    gradient is reached once the refinement converges. A solve whose Broyden took no step (it
    converged at `z0`, or a budget of 0) has `H = -I`: SHINE then gives JFB's gradient.

    The estimate is exact only along the directions Broyden stepped in (its secant conditions),
    so the approximation is best for a well-converged forward with `history_size` at least the
    number of steps; `benchmarks.backward` measures its cosine with the exact gradient.
    `refine=k` steps run at a fixed budget (no tolerance, no warning); with a
    `deq.BackwardStats` probe they report their statistics (none for `refine=0`). Reverse mode
    only (a custom VJP); `batch_axis=0` uses each sample's own estimate.

    Args:
      refine: `k >= 0`, the number of adjoint refinement steps from the SHINE estimate.

    Returns:
      From `solve` (called by `deq.fixed_point`): Broyden's returned iterate, with the gradient
      above, and the forward loop's output.

    Pairs only with `deq.Broyden`: any other forward solver is a `ValueError` when the solve is
    traced.

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> f = lambda z, a: 0.5 * z + a  # scalar affine map: Broyden's secant estimate is exact
      >>> loss = lambda a, bw: deq.fixed_point(f, jnp.zeros(3), a, batch_axis=0, solver=deq.Broyden(),
      ...                                      backward=bw).value.sum()
      >>> jax.grad(loss)(jnp.ones(3), deq.SHINE()).round(4).tolist()
      [2.0, 2.0, 2.0]
      >>> jax.grad(loss)(jnp.ones(3), deq.SHINE(refine=3)).round(4).tolist()
      [2.0, 2.0, 2.0]

    References:
      Ramzi, Mannel, Bai, Starck, Ciuciu & Moreau, "SHINE: SHaring the INverse Estimate from the
      forward pass for bi-level optimization and implicit models", ICLR 2022.
      Nguyen, Fung & Vu, "Efficient training of deep equilibrium models", arXiv:2304.11663, 2023.
    """

    refine: int = 0

    def __post_init__(self):
        k = self.refine
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(
                f"SHINE: `refine` must be an integer >= 0 (adjoint steps from the Broyden estimate), "
                f"got {k!r}. Pass e.g. refine=0 (the estimate alone) or refine=5."
            )

    def refiner(self) -> IFT:
        """The fixed-budget adjoint solve of `refine` Anderson steps (None for `refine=0`)."""
        if self.refine == 0:
            return None
        return IFT(solver=Anderson(rtol=0.0, atol=0.0, max_steps=self.refine, history_size=min(5, self.refine)),
                   warn=False)

    def solve(self, fn, solver, x0, params, throw, probe=None, budget=None):
        if not isinstance(solver, Broyden):
            raise ValueError(
                f"fixed_point: backward=deq.SHINE() reuses the inverse-Jacobian estimate of deq.Broyden, "
                f"but got solver={solver!r}. Pass solver=deq.Broyden(...) with it, or keep this solver "
                f"and use backward=deq.IFT() (or deq.JFB())."
            )
        return _shine(fn, solver, self, throw, x0, params, probe, budget)


def estimate_adjoint(state, g: jax.Array) -> jax.Array:
    """`-H^T g` for the Broyden state `(U, V, count)`: SHINE's `(I - J_f^T)^{-1} g`, row by row."""
    U, V, _ = state
    return -Broyden._apply_HT(U, V, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _shine(fn, solver, backward, throw, x0, params, probe, budget):
    out = _loop.run(solver, lambda x: fn(x, params), x0, budget=budget)
    return out.x, out


def _shine_fwd(fn, solver, backward, throw, x0, params, probe, budget):
    out, state = _loop.run(solver, lambda x: fn(x, params), x0, budget=budget, return_state=True)
    return (out.x, out), (out.x, params, state, probe)


def _shine_bwd(fn, solver, backward, throw, residuals, cts):
    x_star, params, state, probe = residuals
    g = cts[0]
    _, vjp = jax.vjp(fn, x_star, params)
    u = estimate_adjoint(state, g)
    refiner = backward.refiner()
    if refiner is None:
        probe_ct = jax.tree_util.tree_map(jnp.zeros_like, probe)
    else:
        u, out = refiner.linear_solve(lambda v: vjp(v)[0], g, throw, init=u)
        probe_ct = probe_cotangent(probe, out)
    return jnp.zeros_like(x_star), vjp(u)[1], probe_ct, None


_shine.defvjp(_shine_fwd, _shine_bwd)


__all__ = ["SHINE", "estimate_adjoint"]
