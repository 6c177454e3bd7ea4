r"""Convergence you can trust: Lipschitz estimates and a-posteriori error bounds for fixed points.

If `f` is `L`-Lipschitz in `z` (in the l2 norm over all leaves of a sample) with `L < 1`, it has
a unique fixed point `z*` (Banach), and for *any* `z`

.. math::
    \|z - z^*\| \le \|z - f(z)\| + \|f(z) - f(z^*)\| \le \|f(z) - z\| + L \|z - z^*\|
    \quad\Longrightarrow\quad \|z - z^*\| \le \frac{\|f(z) - z\|}{1 - L}.

`certify` evaluates this bound with a *proven* `L` (e.g. `deq.nn.ContractiveDense.lipschitz_bound()`)
and marks it `guaranteed=True` (exact up to floating-point rounding in the residual).
`certify_estimate` plugs in a power-iteration *estimate* of `||J_f(z)||_2` instead: a useful
diagnostic, marked `guaranteed=False` (the local Jacobian norm is not a Lipschitz constant, and
power iteration underestimates it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ._api import check_positive_int, strict_kwargs
from ._solution import Solution
from .regularize import _check_batch_axis, _check_f, _check_key, _check_z, _scale, _sq_norm, _tree_normal

__all__ = [
    "Certificate",
    "certified_argmax",
    "certify",
    "certify_estimate",
    "lipschitz_estimate",
    "spectral_radius_estimate",
]


def _normalize(tree, batch_axis):
    """`tree / ||tree||` (per sample with batch_axis=0); a zero vector is left unchanged."""
    n = jnp.sqrt(_sq_norm(tree, batch_axis))
    return _scale(tree, jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 1.0), batch_axis), n


def _linear_maps(owner, f, z, args):
    fz, jvp = jax.linearize(lambda z_: f(z_, args), z)
    if jax.tree_util.tree_structure(fz) != jax.tree_util.tree_structure(z) or any(
        jnp.shape(a) != jnp.shape(b) for a, b in zip(jax.tree_util.tree_leaves(fz), jax.tree_util.tree_leaves(z))
    ):
        raise ValueError(
            f"{owner}: `f` must return a pytree shaped like `z`, got output shapes "
            f"{[jnp.shape(a) for a in jax.tree_util.tree_leaves(fz)]} for state shapes "
            f"{[jnp.shape(a) for a in jax.tree_util.tree_leaves(z)]}."
        )
    vjp = jax.linear_transpose(jvp, z)
    return fz, jvp, lambda u: vjp(u)[0]


def _state_of(sol):
    return sol.value if isinstance(sol, Solution) else sol


@strict_kwargs
def lipschitz_estimate(f: Callable, z: Any, args: Any = None, *, key: jax.Array, num_iters: int = 20,
                       batch_axis: Optional[int] = None) -> jax.Array:
    r"""Estimate `||J_f(z)||_2`, the spectral norm of `df/dz` at `z`, by power iteration on `J^T J`.

    .. math::
        v_{k+1} = \frac{J^\top J v_k}{\|J^\top J v_k\|}, \qquad
        \hat\sigma = \|J v_K\| \;\le\; \sigma_{\max}(J),

    with one Jacobian-vector and one vector-Jacobian product per iteration (`jax.linearize` and
    its transpose; no Jacobian matrix is built). **An estimate, not a bound**: `hat sigma` is
    a lower bound on `||J(z)||_2` that converges to it (at a rate set by the gap between the two
    largest singular values), and `||J(z)||_2` is the *local* Lipschitz constant at `z` only.
    At a fixed point, `||J||_2 < 1` is sufficient for local contraction (and for the implicit
    backward pass to be well posed). The gradient of the result with respect to `args` is that
    of `||J v_K||` with `v_K` held fixed, i.e. the gradient of `sigma_max` when it is simple.

    Args:
      f: the cell, `f(z, args) -> z`.
      z: the point (typically the fixed point `sol.value`), any pytree of real floats.
      args: the cell's parameters and inputs.
      key: JAX random key for the starting vector.
      num_iters: power iterations (`>= 1`).
      batch_axis: None (one estimate for the whole state) or 0 (one estimate per sample, shape
        `(B,)`; `f` must not mix samples).

    Returns:
      The estimate: a scalar, or `(B,)` with `batch_axis=0`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deq.certify import lipschitz_estimate
      >>> A = jnp.array([[0.5, 0.2], [0.0, 0.3]])
      >>> est = lipschitz_estimate(lambda z, A: A @ z, jnp.zeros(2), A, key=jax.random.key(0))
      >>> bool(jnp.allclose(est, jnp.linalg.norm(A, 2), rtol=1e-4))
      True

    References:
      Golub & Van Loan, "Matrix Computations", 4th ed., 2013, section 8.2 (power method).
      Miyato, Kataoka, Koyama & Yoshida, "Spectral Normalization for GANs", ICLR 2018.
    """
    owner = "lipschitz_estimate"
    _check_f(owner, f)
    _check_key(owner, key)
    check_positive_int(owner, "num_iters", num_iters, example=20)
    _check_batch_axis(owner, batch_axis)
    _check_z(owner, z, batch_axis)
    _, jvp, vjp = _linear_maps(owner, f, z, args)
    v0, _ = _normalize(_tree_normal(key, z), batch_axis)

    def body(_, v):
        v = jax.lax.stop_gradient(v)
        return _normalize(vjp(jvp(v)), batch_axis)[0]

    v = jax.lax.stop_gradient(jax.lax.fori_loop(0, num_iters, body, v0))
    return jnp.sqrt(_sq_norm(jvp(v), batch_axis))


@strict_kwargs
def spectral_radius_estimate(f: Callable, z: Any, args: Any = None, *, key: jax.Array, num_iters: int = 50,
                             batch_axis: Optional[int] = None) -> jax.Array:
    r"""Estimate the spectral radius `rho(J_f(z))` by power iteration on `J` alone.

    .. math::
        v_{k+1} = \frac{J v_k}{\|J v_k\|}, \qquad
        \hat\rho = \exp\Big(\frac{1}{K - K_0} \sum_{k = K_0}^{K-1} \log \|J v_k\|\Big),
        \quad K_0 = \lfloor K/2 \rfloor,

    the geometric mean of the growth factors over the second half of the iterations (which also
    converges when the dominant eigenvalues are a complex pair, where the single ratio
    oscillates). `rho(J) <= ||J||_2`; `rho(J) < 1` at the fixed point means plain iteration
    converges locally (asymptotically), even where `||J||_2 >= 1`. **An estimate**: it converges
    slowly when the two largest eigenvalue moduli are close. Not differentiated (the result
    carries no gradient).

    Args:
      f: the cell, `f(z, args) -> z`.
      z: the point, e.g. the fixed point.
      args: the cell's parameters and inputs.
      key: JAX random key for the starting vector.
      num_iters: power iterations `K >= 2`.
      batch_axis: None or 0 (one estimate per sample).

    Returns:
      The estimate: a scalar, or `(B,)` with `batch_axis=0`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deq.certify import spectral_radius_estimate
      >>> A = jnp.array([[0.5, 2.0], [0.0, 0.3]])  # rho = 0.5 although ||A||_2 > 2
      >>> est = spectral_radius_estimate(lambda z, A: A @ z, jnp.zeros(2), A, key=jax.random.key(0))
      >>> round(float(est), 2)
      0.5

    References:
      Golub & Van Loan, "Matrix Computations", 4th ed., 2013, section 7.3 (power method).
    """
    owner = "spectral_radius_estimate"
    _check_f(owner, f)
    _check_key(owner, key)
    check_positive_int(owner, "num_iters", num_iters, example=50)
    if num_iters < 2:
        raise ValueError(f"{owner}: `num_iters` must be >= 2, got {num_iters}. Pass e.g. num_iters=50.")
    _check_batch_axis(owner, batch_axis)
    _check_z(owner, z, batch_axis)
    _, jvp, _ = _linear_maps(owner, f, jax.lax.stop_gradient(z), jax.lax.stop_gradient(args))
    v0, _ = _normalize(_tree_normal(key, z), batch_axis)
    k0 = num_iters // 2
    zero = jnp.zeros_like(jnp.sqrt(_sq_norm(v0, batch_axis)))

    def body(k, carry):
        v, acc = carry
        v, n = _normalize(jvp(v), batch_axis)
        acc = acc + jnp.where(k >= k0, jnp.log(n), 0.0)
        return v, acc

    _, acc = jax.lax.fori_loop(0, num_iters, body, (v0, zero))
    return jax.lax.stop_gradient(jnp.exp(acc / (num_iters - k0)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Certificate:
    r"""An a-posteriori error bound `||z - z*|| <= ||f(z) - z|| / (1 - L)` for a computed `z`.

    A pytree (`guaranteed` is static metadata), so it can be returned from `jax.jit`.

    Attributes:
      error_bound: the bound on `||z - z*||` (l2 over all leaves), scalar or `(B,)`; `inf`
        where `L >= 1` (no bound).
      lipschitz: the `L` used: a proven Lipschitz bound (`guaranteed=True`) or an estimate of
        `||J_f(z)||_2` (`guaranteed=False`).
      residual_norm: `||f(z) - z||` at the certified `z`.
      guaranteed: True when `L` is a proven global Lipschitz constant of `f` in `z`, so the
        bound holds (up to floating-point rounding); False when it is an estimate.

    Example:
      >>> import jax.numpy as jnp, deq
      >>> from deq.certify import certify
      >>> f = lambda z, a: 0.5 * jnp.tanh(z) + a
      >>> sol = deq.fixed_point(f, jnp.zeros(2), jnp.ones(2), solver=deq.Anderson(rtol=0.0, atol=1e-6))
      >>> cert = certify(f, sol, jnp.ones(2), lipschitz=0.5)  # ||z - z*|| <= residual / (1 - 0.5)
      >>> cert.guaranteed, bool(cert.error_bound <= 2e-6)
      (True, True)
      >>> sol2 = cert.attach(sol)  # fills sol.stats.error_bound and sol.stats.lipschitz
      >>> bool(sol2.stats.error_bound == cert.error_bound)
      True
    """

    error_bound: Any
    lipschitz: Any
    residual_norm: Any
    guaranteed: bool = dataclasses.field(metadata=dict(static=True), default=False)

    def attach(self, sol: Solution) -> Solution:
        """`sol` with `stats.error_bound` and `stats.lipschitz` filled from this certificate.

        Args:
          sol: the `deq.Solution` that was certified.

        Returns:
          A new `deq.Solution` (via `dataclasses.replace`).
        """
        if not isinstance(sol, Solution):
            raise TypeError(f"Certificate.attach: `sol` must be a deq.Solution, got {type(sol).__name__}.")
        stats = dataclasses.replace(sol.stats, error_bound=self.error_bound, lipschitz=self.lipschitz)
        return dataclasses.replace(sol, stats=stats)


def _residual_norm(f, z, args, batch_axis):
    fz = f(z, args)
    diff = jax.tree_util.tree_map(lambda a, b: jnp.asarray(a) - jnp.asarray(b), fz, z)
    return jnp.sqrt(_sq_norm(diff, batch_axis))


def _bound(res, L):
    L = jnp.asarray(L, dtype=res.dtype)
    ok = (L < 1) & (L >= 0)
    return jnp.where(ok, res / jnp.where(ok, 1 - L, 1), jnp.inf), L


@strict_kwargs
def certify(f: Callable, sol: Any, args: Any = None, *, lipschitz: Any,
            batch_axis: Optional[int] = None) -> Certificate:
    r"""Guaranteed error bound `||z - z*|| <= ||f(z) - z|| / (1 - L)` from a proven Lipschitz `L < 1`.

    For `f` that is `L`-Lipschitz in `z` with `L < 1` (l2 norm over all leaves of a sample),
    Banach's theorem gives a unique fixed point `z*`, and for any `z`:

    .. math:: \|z - z^*\| \le \frac{\|f(z) - z\|}{1 - L}.

    The residual is recomputed here with one evaluation of `f` (not taken from `sol.stats`).
    The bound is guaranteed when `lipschitz` really bounds the Lipschitz constant of `z ->
    f(z, args)`, e.g. `cell.lipschitz_bound()` of a `deq.nn.ContractiveDense` (whose activation
    is 1-Lipschitz and whose weight is parametrized with `||W||_2 <= L`); floating-point
    rounding in the residual is not accounted for.

    Args:
      f: the cell, `f(z, args) -> z`.
      sol: a `deq.Solution` (its `value` is certified) or a state pytree `z`.
      args: the cell's parameters and inputs (the same as for the solve).
      lipschitz: a proven Lipschitz constant `L` of `f` in `z`: a number in `[0, 1)`, an array
        (scalar, or `(B,)` per sample), or an object with a `lipschitz_bound()` method (such as
        a `ContractiveDense` cell). Array entries `>= 1` give `error_bound = inf`.
      batch_axis: None (one bound for the whole state) or 0 (one bound per sample).

    Returns:
      A `Certificate(error_bound, lipschitz, residual_norm, guaranteed=True)`; attach it to the
      solution with `cert.attach(sol)`.

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> from deq.certify import certify
      >>> f = lambda z, x: jnp.tanh(0.5 * z + x)   # tanh is 1-Lipschitz, so L = 0.5
      >>> x = jnp.ones(3)
      >>> sol = deq.fixed_point(f, jnp.zeros(3), x, solver=deq.FixedPointIteration(max_steps=5))
      >>> cert = certify(f, sol, x, lipschitz=0.5)
      >>> z_star = deq.fixed_point(f, jnp.zeros(3), x, solver=deq.Anderson(atol=1e-7)).value
      >>> bool(jnp.linalg.norm(sol.value - z_star) <= cert.error_bound)
      True

    References:
      Banach, "Sur les operations dans les ensembles abstraits", Fund. Math. 1922.
      Revay, Wang & Manchester, "Lipschitz bounded equilibrium networks", 2020.
    """
    owner = "certify"
    _check_f(owner, f)
    _check_batch_axis(owner, batch_axis)
    z = _state_of(sol)
    _check_z(owner, z, batch_axis)
    bound_fn = getattr(lipschitz, "lipschitz_bound", None)
    if callable(bound_fn):
        lipschitz = bound_fn()
    if isinstance(lipschitz, bool) or lipschitz is None:
        raise TypeError(f"{owner}: `lipschitz` must be a number or an array, got {lipschitz!r}.")
    if isinstance(lipschitz, (int, float)):
        if not 0 <= lipschitz < 1:
            raise ValueError(
                f"{owner}: `lipschitz` must be a proven Lipschitz constant in [0, 1), got "
                f"{lipschitz!r}: with L >= 1 no error bound follows. Use a contractive cell "
                "(deq.nn.ContractiveDense, lipschitz < 1), or certify_estimate for an estimate."
            )
    else:
        try:
            lipschitz = jnp.asarray(lipschitz)
        except TypeError as e:
            raise TypeError(f"{owner}: `lipschitz` must be a number or an array, got {lipschitz!r}.") from e
    res = _residual_norm(f, z, args, batch_axis)
    bound, L = _bound(res, lipschitz)
    return Certificate(error_bound=bound, lipschitz=L, residual_norm=res, guaranteed=True)


@strict_kwargs
def certify_estimate(f: Callable, sol: Any, args: Any = None, *, key: jax.Array, num_iters: int = 20,
                     safety: float = 1.0, batch_axis: Optional[int] = None) -> Certificate:
    r"""Estimated error bound `||f(z) - z|| / (1 - L_est)` with `L_est` from power iteration at `z`.

    .. math:: \widehat{\|z - z^*\|} = \frac{\|f(z) - z\|}{1 - s\,\hat\sigma}, \qquad
              \hat\sigma \approx \|J_f(z)\|_2 \ \text{(see lipschitz_estimate)},

    with `s = safety`. **Not a guarantee** (`guaranteed=False`): the local Jacobian norm at `z`
    is not a Lipschitz constant over the segment to `z*`, and power iteration underestimates it.
    A diagnostic for cells without a proven bound. The bound is `inf` where `s * sigma >= 1`.

    Args:
      f: the cell, `f(z, args) -> z`.
      sol: a `deq.Solution` (its `value` is used) or a state pytree `z`.
      args: the cell's parameters and inputs.
      key: JAX random key for the power iteration.
      num_iters: power iterations.
      safety: factor `s >= 1` applied to the estimate (e.g. 1.1 for some margin).
      batch_axis: None or 0 (one estimate per sample).

    Returns:
      A `Certificate(error_bound, lipschitz, residual_norm, guaranteed=False)`.

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> from deq.certify import certify_estimate
      >>> f = lambda z, x: jnp.tanh(0.5 * z + x)
      >>> sol = deq.fixed_point(f, jnp.zeros(3), jnp.ones(3))
      >>> cert = certify_estimate(f, sol, jnp.ones(3), key=jax.random.key(0))
      >>> cert.guaranteed, bool(cert.lipschitz < 0.5)
      (False, True)

    References:
      Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021.
    """
    owner = "certify_estimate"
    _check_f(owner, f)
    _check_batch_axis(owner, batch_axis)
    if isinstance(safety, bool) or not isinstance(safety, (int, float)) or not safety >= 1:
        raise ValueError(f"{owner}: `safety` must be a number >= 1, got {safety!r}. Pass e.g. safety=1.1.")
    z = _state_of(sol)
    _check_z(owner, z, batch_axis)
    L = safety * lipschitz_estimate(f, z, args, key=key, num_iters=num_iters, batch_axis=batch_axis)
    res = _residual_norm(f, z, args, batch_axis)
    bound, L = _bound(res, jax.lax.stop_gradient(L))
    return Certificate(error_bound=bound, lipschitz=L, residual_norm=res, guaranteed=False)


def certified_argmax(logits: jax.Array, kernel: jax.Array, error_bound: Any) -> jax.Array:
    r"""Which argmax predictions of a linear head are certified to be the exact fixed point's.

    For a state `z` with `||z - z*|| <= e` (e.g. `certify(...).error_bound`) and a linear head
    `logits = z V + c`, the margin of the predicted class `t` over a class `j` can move by at
    most `e ||V_t - V_j||` between `z` and `z*` (Cauchy-Schwarz), so the prediction is certified
    to equal the one at `z*` when

    .. math:: l_t - l_j > e \, \|V_{:,t} - V_{:,j}\|_2 \quad \text{for every } j \ne t.

    Args:
      logits: `(B, classes)` logits of the head at `z`.
      kernel: the head's `(features, classes)` weight `V` (e.g. `nnx.Linear.kernel[...]`).
      error_bound: `(B,)` (or scalar) bounds on `||z - z*||` per sample.

    Returns:
      A `(B,)` boolean array: True where the predicted class provably equals the exact fixed
      point's (under a guaranteed bound; with `certify_estimate`'s bound, only as good as it).
      A non-finite bound certifies nothing. The class-pair distances take `features x classes^2`
      memory, independent of the batch.

    Example:
      >>> import jax.numpy as jnp
      >>> from deq.certify import certified_argmax
      >>> V = jnp.eye(2)                             # logits = z
      >>> logits = jnp.array([[1.0, 0.0], [0.51, 0.49]])
      >>> certified_argmax(logits, V, jnp.array([0.1, 0.1])).tolist()
      [True, False]

    References:
      Revay, Wang & Manchester, "Lipschitz bounded equilibrium networks", 2020 (certified
      robustness of equilibrium networks through Lipschitz bounds).
    """
    logits, kernel = jnp.asarray(logits), jnp.asarray(kernel)
    if logits.ndim != 2:
        raise ValueError(f"certified_argmax: `logits` must have shape (B, classes), got {logits.shape}.")
    if kernel.ndim != 2 or kernel.shape[1] != logits.shape[1]:
        raise ValueError(
            f"certified_argmax: `kernel` must have shape (features, {logits.shape[1]}) to match the "
            f"logits' classes, got {kernel.shape}. Pass the head's weight, e.g. head.kernel[...]."
        )
    bound = jnp.broadcast_to(jnp.asarray(error_bound, logits.dtype), logits.shape[:1])
    top = jnp.argmax(logits, axis=-1)
    pairs = jnp.linalg.norm(kernel[:, :, None] - kernel[:, None, :], axis=0)  # (classes, classes)
    spread = pairs[top]  # (B, classes): ||V_t - V_j|| for each sample's predicted class t
    margin = jnp.take_along_axis(logits, top[:, None], axis=-1) - logits
    safe = (margin > bound[:, None] * spread) | (jnp.arange(logits.shape[1]) == top[:, None])
    return jnp.all(safe, axis=-1)
