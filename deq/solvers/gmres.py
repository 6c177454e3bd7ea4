"""Matrix-free GMRES for the linear adjoint system of the implicit backward pass."""

from __future__ import annotations

from .._api import check_positive_int, check_tolerances, frozen


@frozen
class GMRES:
    r"""Restarted GMRES (`jax.scipy.sparse.linalg.gmres`) for the adjoint of `deq.IFT`.

    Solves the linear system :math:`(I - J_f(z^*)^\top) u = \partial L / \partial z^*` with
    vector-Jacobian products only (no Jacobian matrix is built). Only usable as
    `deq.IFT(solver=deq.GMRES(...))`: the forward problem is nonlinear.

    `jax.scipy`'s GMRES does not report its iteration count, so the backward statistics give
    `num_steps = -1` for it; the residual is computed afterwards, exactly, per sample.

    Args:
      rtol: relative tolerance (`tol` of `jax.scipy.sparse.linalg.gmres`).
      atol: absolute tolerance.
      max_steps: most matrix-vector (vector-Jacobian) products, as `max_steps` counts
        evaluations in every other solver; rounded up to whole restart cycles of
        `min(restart, max_steps)` products (`maxiter = ceil(max_steps / restart)`).
      restart: Krylov subspace size per cycle.

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> f = lambda z, a: jnp.tanh(0.5 * z + a)
      >>> loss = lambda a: deq.fixed_point(f, jnp.zeros(3), a,
      ...     backward=deq.IFT(solver=deq.GMRES())).value.sum()
      >>> jax.grad(loss)(jnp.ones(3)).shape
      (3,)

    References:
      Saad & Schultz, "GMRES: a generalized minimal residual algorithm", SIAM J. Sci. Comput. 1986.
    """

    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: int = 400
    restart: int = 20

    def __post_init__(self):
        check_tolerances(self)
        check_positive_int(type(self).__name__, "restart", self.restart, example=20)

    def cycles(self) -> tuple[int, int]:
        """`(restart, maxiter)` for `jax.scipy.sparse.linalg.gmres`: cycles of at most
        `restart` products, enough of them to reach `max_steps` products (rounded up).

        Example:
          >>> import deq
          >>> deq.GMRES(max_steps=20, restart=20).cycles(), deq.GMRES(max_steps=50, restart=20).cycles()
          ((20, 1), (20, 3))
          >>> deq.GMRES(max_steps=5, restart=20).cycles()
          (5, 1)
        """
        restart = min(self.restart, self.max_steps)
        return restart, -(-self.max_steps // restart)
