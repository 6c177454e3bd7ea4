"""Cheap approximate gradients: phantom gradients and Jacobian-free backprop."""

from __future__ import annotations

from .. import _loop
from .._api import check_positive_int, check_range, frozen
from ._base import AbstractBackward, damped_steps, stop, value_with_grad_of


@frozen
class PhantomGrad(AbstractBackward):
    r"""Phantom gradient (Geng et al. 2021): differentiate a few damped steps from `z*`.

    The forward value is the solver's fixed point `z*`; the gradient is that of

    .. math:: z_{k+1} = (1 - \lambda) z_k + \lambda f(z_k, a), \quad z_0 = \mathrm{sg}(z^*),
              \quad k = 0..K-1,

    which approximates the implicit gradient with `K = steps` vector-Jacobian products and no
    linear solve. Memory grows with `steps`, not with the forward solve.

    Args:
      steps: `K >= 1`, the number of differentiated steps.
      damping: `lambda` in `(0, 1]`.

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> f = lambda z, a: jnp.tanh(0.5 * z + a)
      >>> loss = lambda a: deq.fixed_point(f, jnp.zeros(2), a, backward=deq.PhantomGrad()).value.sum()
      >>> jax.grad(loss)(jnp.ones(2)).shape
      (2,)

    References:
      Geng, Zhang, Bai, Wang & Lin, "On training implicit models", NeurIPS 2021.
    """

    steps: int = 5
    damping: float = 0.5

    def __post_init__(self):
        check_positive_int(type(self).__name__, "steps", self.steps, example=5)
        check_range(type(self).__name__, "damping", self.damping, 0.0, 1.0)

    def solve(self, fn, solver, x0, params, throw, probe=None, budget=None):
        out = stop(_loop.run(solver, lambda x: fn(x, stop(params)), stop(x0), budget=budget))
        z = damped_steps(fn, out.x, params, self.steps, self.damping)
        return value_with_grad_of(out.x, z), out


@frozen
class JFB(AbstractBackward):
    r"""Jacobian-free backpropagation (Fung et al. 2022): one step of `f` at `z*`.

    The gradient is that of `f(sg(z*), a)`, i.e. the implicit gradient with
    `(I - J_f)^{-1}` replaced by `I`: a descent direction for contractive `f`, at the cost of
    one vector-Jacobian product. The forward value is `z*`.

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> f = lambda z, a: jnp.tanh(0.5 * z + a)
      >>> loss = lambda a: deq.fixed_point(f, jnp.zeros(2), a, backward=deq.JFB()).value.sum()
      >>> jax.grad(loss)(jnp.ones(2)).shape
      (2,)

    References:
      Fung, Heaton, Li, McKenzie, Osher & Yin, "JFB: Jacobian-free backpropagation for implicit
      networks", AAAI 2022.
    """

    def solve(self, fn, solver, x0, params, throw, probe=None, budget=None):
        out = stop(_loop.run(solver, lambda x: fn(x, stop(params)), stop(x0), budget=budget))
        return value_with_grad_of(out.x, damped_steps(fn, out.x, params, 1, 1.0)), out


@frozen
class Unrolled(AbstractBackward):
    """Ordinary backpropagation through every solver step: the reference gradient.

    Runs exactly `max_steps` masked steps (samples that converged stop changing) under
    `lax.scan` so reverse-mode autodiff applies; memory grows linearly with `max_steps`. Use it
    to check other strategies, or for short solves.

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> f = lambda z, a: jnp.tanh(0.5 * z + a)
      >>> loss = lambda a: deq.fixed_point(f, jnp.zeros(2), a, backward=deq.Unrolled()).value.sum()
      >>> jax.grad(loss)(jnp.ones(2)).shape
      (2,)
    """

    def solve(self, fn, solver, x0, params, throw, probe=None, budget=None):
        out = _loop.run(solver, lambda x: fn(x, params), x0, unroll=True, budget=budget)
        return out.x, out


