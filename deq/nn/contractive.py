r"""Contractive DEQ cells with a *proven* Lipschitz bound `L < 1` in the state.

For such a cell, Banach's fixed-point theorem guarantees a unique fixed point for every input,
plain iteration converges to it from any start (linearly, at rate `L`), and
`deq.certify(f, sol, args, lipschitz=cell.lipschitz_bound())` turns any iterate into a
guaranteed error bound `||z - z*|| <= ||f(z) - z|| / (1 - L)`.

The bound is proven, not estimated: the weight acting on the state is parametrized so that a
guaranteed upper bound on its spectral norm is at most `L`, and the activation is 1-Lipschitz.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deq._linalg import cheap_bounds, spectral_norm, svd_with_retry

from ._checks import check_input

__all__ = ["ContractiveDense", "spectral_norm_upper_bound"]

_ACTIVATIONS = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "identity": lambda a: a,
}

_BOUNDS = ("min", "frobenius", "holder", "exact")

# Relative safety margin (in machine epsilons) absorbing rounding in the computed bound.
_MARGIN_ULPS = 64


@jax.custom_jvp
def _exact_norm(V):
    """Largest singular value of `V`; the guaranteed cheap bound if the SVD fails (non-finite)."""
    return spectral_norm(V)


@_exact_norm.defjvp
def _exact_norm_jvp(primals, tangents):
    # d sigma_1 = u_1^T dV v_1 for the leading singular pair (any pair of a repeated largest
    # singular value gives a valid subgradient), from the SVD with the QR retry, and the cheap
    # bound's derivative where even that failed.
    (V,), (dV,) = primals, tangents
    U, s, Vh = svd_with_retry(V, compute_uv=True)
    k = jnp.argmax(s)
    ok = jnp.isfinite(s[k]) & jnp.all(jnp.isfinite(U[:, k])) & jnp.all(jnp.isfinite(Vh[k]))
    # Zero the vectors of a failed SVD before use: NaN * 0 would leak into reverse mode.
    u1, v1 = jnp.where(ok, U[:, k], 0.0), jnp.where(ok, Vh[k], 0.0)
    exact_dot = u1 @ dV @ v1
    cheap, cheap_dot = jax.jvp(lambda A: jnp.minimum(*cheap_bounds(A)), (V,), (dV,))
    return (jnp.where(ok, s[k], cheap), jnp.where(ok, exact_dot, cheap_dot))


def spectral_norm_upper_bound(V: jax.Array, method: str = "min") -> jax.Array:
    r"""A guaranteed upper bound on the spectral norm `||V||_2` of a matrix.

    .. math::
        \|V\|_2 \le \|V\|_F = \Big(\sum_{ij} V_{ij}^2\Big)^{1/2}, \qquad
        \|V\|_2 \le \sqrt{\|V\|_1 \|V\|_\infty}
        = \Big(\max_j \sum_i |V_{ij}| \cdot \max_i \sum_j |V_{ij}|\Big)^{1/2}

    (the second is Hölder's inequality / Schur's test). Both are cheap (`O(n^2)`),
    differentiable almost everywhere, and exact for rank-one matrices (Frobenius) or
    matrices with constant absolute row and column sums (Hölder).

    Args:
      V: a 2-D array.
      method: "min" (the smaller of the two bounds, default), "frobenius", "holder", or
        "exact" (the largest singular value via an SVD: `O(n^3)`, exact up to rounding; an SVD
        that returns non-finite values is redone by the QR-based algorithm, and if that fails
        too the "min" bound is returned instead, so value and gradient stay finite and the
        result is always a bound).

    Returns:
      A scalar upper bound on `||V||_2`.

    Example:
      >>> import jax.numpy as jnp
      >>> from deq.nn.contractive import spectral_norm_upper_bound
      >>> V = jnp.array([[3.0, 0.0], [0.0, 4.0]])
      >>> float(spectral_norm_upper_bound(V, "frobenius")), float(spectral_norm_upper_bound(V, "holder"))
      (5.0, 4.0)

    References:
      Horn & Johnson, "Matrix Analysis", 2nd ed., 2013, sections 5.6 and 5.7.
    """
    if method not in _BOUNDS:
        raise ValueError(
            f"spectral_norm_upper_bound: `method` must be one of {', '.join(map(repr, _BOUNDS))}, got "
            f"{method!r}. Use 'min' (cheap, default) or 'exact' (SVD)."
        )
    if jnp.ndim(V) != 2:
        raise ValueError(f"spectral_norm_upper_bound: `V` must be a 2-D matrix, got shape {jnp.shape(V)}.")
    if method == "exact":
        return _exact_norm(V)
    frob, holder = cheap_bounds(V)
    if method == "frobenius":
        return frob
    if method == "holder":
        return holder
    return jnp.minimum(frob, holder)


class ContractiveDense(nnx.Module):
    r"""A dense DEQ cell that is provably `L`-Lipschitz in `z` (`L = lipschitz < 1`).

    .. math::
        f(z, x) = \sigma(z W + x U + b), \qquad
        W = \frac{L\,(1 - \epsilon)}{\max\big(1, \beta(V)\big)}\, V,

    where `V` (features x features) is the trainable parameter, `beta(V) >= ||V||_2` is a
    guaranteed upper bound on its spectral norm (`spectral_norm_upper_bound`: the smaller of
    the Frobenius and Hölder bounds by default, or the exact largest singular value), `epsilon`
    is a 64-ulp margin against rounding, and `sigma` is 1-Lipschitz (tanh, relu or identity),
    applied elementwise. Hence `||W||_2 <= L` and, for all `z1, z2`,

    .. math:: \|f(z_1, x) - f(z_2, x)\| \le \|(z_1 - z_2) W\| \le L \|z_1 - z_2\|,

    so `f(., x)` is a contraction: a unique fixed point exists for every `x` (Banach) and
    `deq.certify(..., lipschitz=cell.lipschitz_bound())` gives guaranteed error bounds.
    The cheap bounds are loose for generic matrices (the Frobenius norm exceeds `||V||_2` by up
    to `sqrt(features)`), so the effective contraction is often well below `L`; training can
    use the budget by making `V` better conditioned, or use `norm_bound="exact"` (an SVD per
    call) for the tight normalization.

    Use it as the cell of `deq.nn.DEQ`: it holds only `nnx.Param`\ s, and `init_state(x)`
    gives the zero state.

    Args:
      features: state size `d` (z has shape `(..., d)`).
      in_features: input size (x has shape `(..., in_features)`).
      rngs: random key source.
      lipschitz: the proven bound `L`, in `(0, 1)`.
      activation: "tanh" (default), "relu" or "identity" (all 1-Lipschitz).
      use_bias: add the bias `b` (zeros at init).
      norm_bound: "min" (default), "frobenius", "holder" or "exact" (see above).

    Returns:
      Calling the cell `cell(z, x)` returns the new state, shaped like `z`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import deq
      >>> from deq.nn.contractive import ContractiveDense
      >>> cell = ContractiveDense(8, 3, rngs=nnx.Rngs(0), lipschitz=0.9)
      >>> bool(jnp.linalg.norm(cell.weight, 2) <= cell.lipschitz_bound())
      True
      >>> layer = deq.nn.DEQ(cell)
      >>> sol = layer(jnp.ones((4, 3)), return_solution=True)
      >>> sol.value.shape, bool(sol.stats.converged.all())
      ((4, 8), True)

    References:
      Banach, "Sur les operations dans les ensembles abstraits", Fund. Math. 1922.
      Revay, Wang & Manchester, "Lipschitz Bounded Equilibrium Networks", 2020.
      Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
    """

    def __init__(self, features: int, in_features: int, *, rngs: nnx.Rngs, lipschitz: float = 0.9,
                 activation: str = "tanh", use_bias: bool = True, norm_bound: str = "min"):
        owner = "ContractiveDense"
        for name, value in (("features", features), ("in_features", in_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}: `{name}` must be an int >= 1, got {value!r}. Pass e.g. {name}=16.")
        if isinstance(lipschitz, bool) or not isinstance(lipschitz, (int, float)) or not 0 < lipschitz < 1:
            raise ValueError(
                f"{owner}: `lipschitz` must be a number in (0, 1) for a contraction, got {lipschitz!r}. "
                "Pass e.g. lipschitz=0.9."
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"{owner}: `activation` must be one of {', '.join(map(repr, _ACTIVATIONS))} (1-Lipschitz, so "
                f"the bound is proven), got {activation!r}. Pass activation='tanh'."
            )
        if norm_bound not in _BOUNDS:
            raise ValueError(
                f"{owner}: `norm_bound` must be one of {', '.join(map(repr, _BOUNDS))}, got {norm_bound!r}. "
                "Pass norm_bound='min' (cheap) or 'exact' (SVD)."
            )
        if not isinstance(use_bias, bool):
            raise TypeError(f"{owner}: `use_bias` must be a bool, got {use_bias!r}.")
        self.features = features
        self.in_features = in_features
        self.lipschitz = float(lipschitz)
        self.activation = activation
        self.norm_bound = norm_bound
        init = nnx.initializers.lecun_normal()
        self.v = nnx.Param(init(rngs.params(), (features, features)))
        self.u = nnx.Param(init(rngs.params(), (in_features, features)))
        self.b = nnx.Param(jnp.zeros((features,))) if use_bias else None

    def lipschitz_bound(self) -> float:
        """The proven Lipschitz constant `L` of `z -> cell(z, x)` (l2 norm), for every `x`.

        Returns:
          `L` as a Python float (the `lipschitz` given at construction).
        """
        return self.lipschitz

    @property
    def weight(self) -> jax.Array:
        """The state weight `W` (features x features), with `||W||_2 <= lipschitz` guaranteed."""
        return self._weight(None)

    def _weight(self, dtype) -> jax.Array:
        # Cast first, then normalize in the compute dtype, so rounding is covered by the margin.
        V = self.v[...] if dtype is None else self.v[...].astype(dtype)
        beta = spectral_norm_upper_bound(V, self.norm_bound)
        margin = 1.0 - _MARGIN_ULPS * jnp.finfo(V.dtype).eps
        return V * (self.lipschitz * margin / jnp.maximum(1.0, beta))

    def init_state(self, x: jax.Array) -> jax.Array:
        """The zero state `(..., features)` for input `x` of shape `(..., in_features)`."""
        self.check_input(x, batched=False)
        return jnp.zeros(jnp.shape(x)[:-1] + (self.features,), jnp.result_type(x))

    def check_input(self, x, *, batched: bool = True) -> jax.Array:
        """Raise unless `x` is a float `(batch, ..., in_features)` array (`batched=False` drops
        the batch axis). `deq.nn.DEQ` calls it before the solve."""
        n = self.in_features
        return check_input(
            "ContractiveDense", x, layout=f"(batch, {n})" if batched else f"(..., {n})",
            min_ndim=2 if batched else 1, last=n, last_name="in_features",
            fix=f"Pass x of shape (batch, {n}), or build ContractiveDense(features, <x's last axis>, ...).",
        )

    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        self.check_input(x, batched=False)
        if jnp.ndim(z) < 1 or jnp.shape(z)[-1] != self.features:
            raise ValueError(
                f"ContractiveDense: `z` must have last axis features={self.features}, got shape "
                f"{jnp.shape(z)}. Start from cell.init_state(x)."
            )
        dt = jnp.result_type(z)
        pre = z @ self._weight(dt) + x @ self.u[...].astype(dt)
        if self.b is not None:
            pre = pre + self.b[...].astype(dt)
        return _ACTIVATIONS[self.activation](pre).astype(dt)


# `inspect.signature` and `help` of every module class above show its real arguments.
from .cells import _show_init_signatures  # noqa: E402

_show_init_signatures(globals(), __name__)
