r"""Weight normalizations for DEQ cells: spectral normalization and weight normalization.

Both are `nnx.Module` dense layers `y = x W + b` whose effective weight `W` is a function of the
trainable parameters, so they can be used inside a `deq.nn.DEQ` cell.

**Spectral normalization** needs a power-iteration vector `u` that changes between training
steps. The DEQ solver calls the cell many times per forward pass, so `u` must not change
*inside* the solve: `SpectralNormDense.__call__` only reads `u`, and the update is a separate,
explicit call made once per training step outside the solve:

- `layer.update_power_iteration()` for one layer, or `spectral_norm_step(model)` for every
  `SpectralNormDense` inside a model, called in the training step (before or after the
  forward pass); or
- from the cell's `before_solve(self, x)` method, which `deq.nn.DEQ` calls once per forward
  pass outside the solve (note: that also runs in evaluation mode).

`u` is stored as a `PowerIterationState`, a subclass of `deq.nn.SolverConstant` (read-only
during the solve), so `deq.nn.DEQ` accepts cells holding it and `nnx.grad` does not
differentiate it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ._layer import SolverConstant

__all__ = ["PowerIterationState", "SpectralNormDense", "WeightNormDense", "spectral_norm_step"]


def _check_int(owner: str, name: str, value, minimum: int = 1, example: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: `{name}` must be an int >= {minimum}, got {value!r}. Pass e.g. {name}={example}.")


def _check_input(owner: str, x, in_features: int) -> None:
    if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != in_features:
        raise ValueError(
            f"{owner}: the input's last axis must have size in_features={in_features}, got shape "
            f"{jnp.shape(x)}. Pass x of shape (..., {in_features})."
        )


def _safe_normalize(v, eps):
    n = jnp.sqrt(jnp.sum(v * v))
    return v / jnp.maximum(n, eps)


class PowerIterationState(SolverConstant):
    """The power-iteration vector of `SpectralNormDense`: not trainable, read-only in the solve.

    A `deq.nn.SolverConstant` subclass, so `deq.nn.DEQ` accepts cells holding it. It is
    updated only by `SpectralNormDense.update_power_iteration` / `spectral_norm_step`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.normalization import PowerIterationState
      >>> isinstance(PowerIterationState(jnp.ones(3)), nnx.Param)
      False
    """


class SpectralNormDense(nnx.Module):
    r"""Dense layer with spectral normalization: `y = x W_sn + b`, `W_sn = coeff * W / sigma(W)`.

    `sigma(W)` is estimated with one power-iteration vector `u` kept between training steps
    (Miyato et al. 2018):

    .. math::
        v = \frac{W u}{\|W u\|}, \quad u \leftarrow \frac{W^\top v}{\|W^\top v\|}
        \ \text{(update, outside the solve)}, \qquad
        \hat\sigma = \|W\, \mathrm{sg}(u)\| \ \text{(in the call)},

    with `W` the `(in_features, out_features)` kernel and `sg` the stop-gradient, so the
    gradient of `hat sigma` with respect to `W` is `v u^T`, the gradient of `sigma_max(W)`.
    The call only *reads* `u`: update it with `update_power_iteration()` (or
    `spectral_norm_step(model)`) once per training step, outside the DEQ solve.

    With `clip=False` (default, Miyato et al.) the weight is `coeff * W / hat sigma`, so
    `||W_sn||_2 ~ coeff`; with `clip=True` (Behrmann et al. 2019) it is
    `W / max(1, hat sigma / coeff)`, which leaves weights with `hat sigma <= coeff` unchanged.
    `hat sigma` is a power-iteration **estimate** (a lower bound on `sigma_max(W)` that is
    accurate once `u` has converged over training steps), so `||W_sn||_2 <= coeff` holds only
    approximately; for a proven bound use `deq.nn.contractive.ContractiveDense`.

    Args:
      in_features: input size.
      out_features: output size.
      rngs: random key source (kernel and the initial `u`).
      coeff: the target spectral norm (`> 0`).
      n_power_iterations: power iterations per `update_power_iteration()` call (`>= 1`).
      use_bias: add a bias `b` (zeros at init).
      clip: only scale down (`W / max(1, sigma / coeff)`) instead of normalizing.
      init_power_iterations: power iterations run at construction so that `u` starts accurate.
      eps: floor on norms in the normalizations.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.normalization import SpectralNormDense, spectral_norm_step
      >>> layer = SpectralNormDense(4, 3, rngs=nnx.Rngs(0), coeff=0.9)
      >>> layer(jnp.ones((2, 4))).shape
      (2, 3)
      >>> round(float(jnp.linalg.norm(layer.weight, 2)), 3)
      0.9
      >>> spectral_norm_step(layer)  # once per training step, outside the solve
      1

    References:
      Miyato, Kataoka, Koyama & Yoshida, "Spectral Normalization for Generative Adversarial
      Networks", ICLR 2018.
      Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen, "Invertible Residual Networks", ICML 2019.
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, coeff: float = 1.0,
                 n_power_iterations: int = 1, use_bias: bool = True, clip: bool = False,
                 init_power_iterations: int = 20, eps: float = 1e-12):
        owner = "SpectralNormDense"
        _check_int(owner, "in_features", in_features, example=16)
        _check_int(owner, "out_features", out_features, example=16)
        _check_int(owner, "n_power_iterations", n_power_iterations, example=1)
        _check_int(owner, "init_power_iterations", init_power_iterations, minimum=0, example=20)
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not coeff > 0:
            raise ValueError(f"{owner}: `coeff` must be a number > 0, got {coeff!r}. Pass e.g. coeff=0.9.")
        if not isinstance(clip, bool):
            raise TypeError(f"{owner}: `clip` must be a bool, got {clip!r}.")
        self.in_features = in_features
        self.out_features = out_features
        self.coeff = float(coeff)
        self.n_power_iterations = n_power_iterations
        self.clip = clip
        self.eps = float(eps)
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
        u = jax.random.normal(rngs.params(), (out_features,))
        self.u = PowerIterationState(_safe_normalize(u, self.eps))
        if init_power_iterations:
            self.update_power_iteration(init_power_iterations)

    def update_power_iteration(self, num_iterations: Optional[int] = None) -> jax.Array:
        r"""Run power iterations on the kernel and store the new `u` (call outside the solve).

        .. math:: v = W u / \|W u\|, \qquad u \leftarrow W^\top v / \|W^\top v\|

        Args:
          num_iterations: iterations to run (default `n_power_iterations`).

        Returns:
          The new estimate `||W u||` of `sigma_max(W)` (no gradient).
        """
        n = self.n_power_iterations if num_iterations is None else num_iterations
        _check_int("SpectralNormDense.update_power_iteration", "num_iterations", n, example=1)
        W = jax.lax.stop_gradient(self.kernel[...])
        u = jax.lax.stop_gradient(self.u[...]).astype(W.dtype)
        for _ in range(n):
            v = _safe_normalize(W @ u, self.eps)
            u = _safe_normalize(W.T @ v, self.eps)
        self.u[...] = u
        return jnp.sqrt(jnp.sum(jnp.square(W @ u)))

    def sigma(self) -> jax.Array:
        """The current estimate `||W sg(u)||` of the kernel's spectral norm (differentiable in `W`)."""
        W = self.kernel[...]
        u = jax.lax.stop_gradient(self.u[...]).astype(W.dtype)
        return jnp.sqrt(jnp.sum(jnp.square(W @ u)))

    @property
    def weight(self) -> jax.Array:
        """The normalized `(in_features, out_features)` weight used by the call."""
        W = self.kernel[...]
        s = jnp.maximum(self.sigma(), self.eps)
        factor = 1.0 / jnp.maximum(1.0, s / self.coeff) if self.clip else self.coeff / s
        return W * factor

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_input("SpectralNormDense", x, self.in_features)
        y = x @ self.weight.astype(jnp.result_type(x))
        return y if self.bias is None else y + self.bias[...]


def spectral_norm_step(module: nnx.Module, num_iterations: Optional[int] = None) -> int:
    """Update the power iteration of every `SpectralNormDense` inside `module` (in place).

    Call it once per training step, outside the DEQ solve (e.g. at the start of the jitted
    training step, before the forward pass). Each layer runs its `n_power_iterations`
    (or `num_iterations`) iterations.

    Args:
      module: any `nnx.Module` (a model, a cell, or a `SpectralNormDense` itself).
      num_iterations: override of each layer's `n_power_iterations`.

    Returns:
      The number of layers updated (a Python int).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deq
      >>> from deq.nn.normalization import SpectralNormDense, spectral_norm_step
      >>> class Cell(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.W = SpectralNormDense(4, 4, rngs=rngs, coeff=0.8, use_bias=False)
      ...     def __call__(self, z, x):
      ...         return jnp.tanh(self.W(z) + x)
      >>> layer = deq.nn.DEQ(Cell(nnx.Rngs(0)))
      >>> spectral_norm_step(layer)
      1
      >>> bool(layer(jnp.ones((2, 4)), return_solution=True).stats.converged.all())
      True
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"spectral_norm_step: `module` must be an nnx.Module, got {type(module).__name__}.")
    count = 0
    for _, node in nnx.iter_graph(module):
        if isinstance(node, SpectralNormDense):
            node.update_power_iteration(num_iterations)
            count += 1
    return count


class WeightNormDense(nnx.Module):
    r"""Dense layer with weight normalization: `y = x W + b`, `W = g * V / ||V||` per output unit.

    .. math:: W_{:, j} = g_j \, \frac{V_{:, j}}{\|V_{:, j}\|_2}, \qquad j = 1..\text{out}

    The direction `V` (in_features, out_features) and the norm `g` (out_features,) are trained
    separately (Salimans & Kingma 2016), so `||W_{:, j}|| = |g_j|` exactly, which makes the
    layer's scale easy to control in a DEQ cell. At initialisation `g = init_scale * ||V||`,
    so `W = init_scale * V` with `V` LeCun-normal. A zero column of `V` gives a zero column of
    `W` (and a finite gradient).

    Args:
      in_features: input size.
      out_features: output size.
      rngs: random key source.
      use_bias: add a bias (zeros at init).
      init_scale: scale of `W` at initialisation.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.normalization import WeightNormDense
      >>> layer = WeightNormDense(3, 5, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 3))).shape
      (2, 5)
      >>> bool(jnp.allclose(jnp.linalg.norm(layer.weight, axis=0), jnp.abs(layer.g[...]), rtol=1e-5))
      True

    References:
      Salimans & Kingma, "Weight Normalization: A Simple Reparameterization to Accelerate
      Training of Deep Neural Networks", NeurIPS 2016.
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = True,
                 init_scale: float = 1.0):
        owner = "WeightNormDense"
        _check_int(owner, "in_features", in_features, example=16)
        _check_int(owner, "out_features", out_features, example=16)
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)):
            raise TypeError(f"{owner}: `init_scale` must be a number, got {init_scale!r}.")
        self.in_features = in_features
        self.out_features = out_features
        v = nnx.initializers.lecun_normal()(rngs.params(), (in_features, out_features))
        self.v = nnx.Param(v)
        self.g = nnx.Param(init_scale * jnp.linalg.norm(v, axis=0))
        self.b = nnx.Param(jnp.zeros((out_features,))) if use_bias else None

    @property
    def weight(self) -> jax.Array:
        """The effective `(in_features, out_features)` weight `g * V / ||V||`."""
        v = self.v[...]
        sq = jnp.sum(v * v, axis=0)
        pos = sq > 0
        norm = jnp.sqrt(jnp.where(pos, sq, 1.0))
        return jnp.where(pos, v * (self.g[...] / norm), 0.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_input("WeightNormDense", x, self.in_features)
        y = x @ self.weight.astype(jnp.result_type(x))
        return y if self.b is None else y + self.b[...]


# `inspect.signature` and `help` of every module class above show its real arguments.
from .cells import _show_init_signatures  # noqa: E402

_show_init_signatures(globals(), __name__)
