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

**An existing cell, without rewriting it** (torchdeq's `apply_norm` / `reset_norm` /
`remove_norm`): `apply_norm(cell, "weight")` or `apply_norm(cell, "spectral")` replaces, in
place, every `nnx.Linear` and `nnx.Conv` inside a module by a `NormalizedLayer` wrapping it
(the layer's kernel becomes the direction `V`); `reset_norm(model)` runs the spectral power
iterations once per training step, outside the solve; `remove_norm(model)` folds the
normalized kernels back into plain `nnx.Linear` / `nnx.Conv` layers (for export or
inference), leaving the function unchanged.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ._layer import SolverConstant

__all__ = [
    "NormalizedLayer", "PowerIterationState", "SpectralNormDense", "WeightNormDense", "apply_norm", "remove_norm",
    "reset_norm", "spectral_norm_step",
]


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


# --------------------------------------------------------------------------------------------
# Normalizing an existing module's layers: apply_norm / reset_norm / remove_norm
# --------------------------------------------------------------------------------------------

NORMS = ("weight", "spectral")
_WRAPPABLE = (nnx.Linear, nnx.Conv)


def _check_norm(owner: str, norm) -> str:
    if norm not in NORMS:
        raise ValueError(
            f"{owner}: `norm` must be one of {NORMS} (weight normalization, Salimans & Kingma 2016; "
            f"spectral normalization, Miyato et al. 2018), got {norm!r}. Pass e.g. norm='weight'."
        )
    return norm


class NormalizedLayer(nnx.Module):
    r"""An `nnx.Linear` or `nnx.Conv` whose kernel is weight- or spectrally normalized.

    The wrapped layer's kernel `V` (shape `(..., out)`) is kept as the trainable direction and
    each call runs the layer with the effective kernel

    .. math::
        \text{weight:}\ W_{\cdot j} = g_j \frac{V_{\cdot j}}{\|V_{\cdot j}\|}, \qquad
        \text{spectral:}\ W = c\, \frac{V}{\hat\sigma(V)},\ \
        \hat\sigma = \|\bar V\, \mathrm{sg}(u)\|,

    where `j` runs over output units (the norm is over every other kernel axis), `g` is a
    trainable `(out,)` scale initialised to `||V_j||` (so the layer's function is unchanged
    at first), `bar V` is `V` reshaped to `(fan_in, out)`, and `u` is a power-iteration vector
    stored as a `PowerIterationState` (read-only during a solve; `reset_norm` advances it, as
    `SpectralNormDense.update_power_iteration` does). Build it with `apply_norm`, which
    replaces the layers of an existing module in place.

    Args:
      layer: the `nnx.Linear` or `nnx.Conv` to wrap (it becomes `self.layer`).
      norm: `"weight"` or `"spectral"`.
      rngs: random key source (the initial `u` of spectral normalization).
      coeff: spectral normalization's target norm `c > 0`.
      n_power_iterations: power iterations per `reset_norm` call.
      init_power_iterations: power iterations run at construction.
      eps: floor on norms.

    Returns:
      Calling it on `x` returns what the wrapped layer returns with the effective kernel.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.normalization import NormalizedLayer
      >>> lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      >>> wn = NormalizedLayer(lin, norm="weight", rngs=nnx.Rngs(1))
      >>> bool(jnp.allclose(wn(jnp.ones((2, 3))), lin(jnp.ones((2, 3))), atol=1e-6))
      True
      >>> sorted(nnx.to_pure_dict(nnx.state(wn, nnx.Param)))
      ['g', 'layer']

    References:
      Salimans & Kingma, "Weight Normalization", NeurIPS 2016.
      Miyato, Kataoka, Koyama & Yoshida, "Spectral Normalization for Generative Adversarial
      Networks", ICLR 2018.
    """

    def __init__(self, layer: nnx.Module, *, norm: str, rngs: nnx.Rngs, coeff: float = 1.0,
                 n_power_iterations: int = 1, init_power_iterations: int = 20, eps: float = 1e-12):
        owner = "NormalizedLayer"
        if not isinstance(layer, _WRAPPABLE):
            raise TypeError(
                f"{owner}: `layer` must be an nnx.Linear or nnx.Conv, got {type(layer).__name__}. "
                "Normalize other layers by writing them with deq.nn.WeightNormDense / SpectralNormDense."
            )
        self.norm = _check_norm(owner, norm)
        _check_int(owner, "n_power_iterations", n_power_iterations, example=1)
        _check_int(owner, "init_power_iterations", init_power_iterations, minimum=0, example=20)
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not coeff > 0:
            raise ValueError(f"{owner}: `coeff` must be a number > 0, got {coeff!r}. Pass e.g. coeff=0.9.")
        self.layer = layer
        self.coeff, self.eps, self.n_power_iterations = float(coeff), float(eps), n_power_iterations
        V = layer.kernel[...]
        if norm == "weight":
            self.g = nnx.Param(jnp.sqrt(jnp.sum(V * V, axis=tuple(range(V.ndim - 1)))))
        else:
            u = jax.random.normal(rngs.params(), (V.shape[-1],), V.dtype)
            self.u = PowerIterationState(_safe_normalize(u, self.eps))
            if init_power_iterations:
                self.update_power_iteration(init_power_iterations)

    def _matrix(self):
        V = self.layer.kernel[...]
        return V.reshape(-1, V.shape[-1])

    def update_power_iteration(self, num_iterations: Optional[int] = None) -> jax.Array:
        """Run power iterations on the kernel and store `u` (spectral only; call outside the solve).

        Args:
          num_iterations: iterations to run (default `n_power_iterations`).

        Returns:
          The new estimate of the kernel's spectral norm (no gradient).
        """
        if self.norm != "spectral":
            raise ValueError(
                "NormalizedLayer.update_power_iteration: only spectral normalization has a power "
                f"iteration; this layer uses norm={self.norm!r}."
            )
        n = self.n_power_iterations if num_iterations is None else num_iterations
        _check_int("NormalizedLayer.update_power_iteration", "num_iterations", n, example=1)
        W = jax.lax.stop_gradient(self._matrix())
        u = jax.lax.stop_gradient(self.u[...]).astype(W.dtype)
        for _ in range(n):
            u = _safe_normalize(W.T @ _safe_normalize(W @ u, self.eps), self.eps)
        self.u[...] = u
        return jnp.sqrt(jnp.sum(jnp.square(W @ u)))

    @property
    def kernel(self) -> jax.Array:
        """The effective (normalized) kernel, shaped like the wrapped layer's."""
        V = self.layer.kernel[...]
        if self.norm == "weight":
            axes = tuple(range(V.ndim - 1))
            sq = jnp.sum(V * V, axis=axes)
            pos = sq > 0
            return jnp.where(pos, V * (self.g[...] / jnp.sqrt(jnp.where(pos, sq, 1.0))), 0.0)
        u = jax.lax.stop_gradient(self.u[...]).astype(V.dtype)
        sigma = jnp.sqrt(jnp.sum(jnp.square(self._matrix() @ u)))
        return V * (self.coeff / jnp.maximum(sigma, self.eps))

    def plain(self) -> nnx.Module:
        """A copy of the wrapped layer with the effective kernel folded in (what `remove_norm` keeps)."""
        graphdef, state = nnx.split(self.layer)
        pure = nnx.to_pure_dict(state)
        pure["kernel"] = jax.lax.stop_gradient(self.kernel)
        return nnx.merge(graphdef, pure)

    def __call__(self, *args, **kwargs):
        # A fresh layer with the effective kernel, built functionally: nothing is written, so
        # this is allowed inside a DEQ solve and differentiates through `kernel`.
        graphdef, state = nnx.split(self.layer)
        pure = nnx.to_pure_dict(state)
        pure["kernel"] = self.kernel
        return nnx.merge(graphdef, pure)(*args, **kwargs)


def _children(module: nnx.Module, kinds) -> list:
    """`(parent, key, node)` for every node of a type in `kinds` inside `module`, not inside a
    `NormalizedLayer` unless `kinds` asks for those."""
    found, inside = [], []
    nodes = dict(nnx.iter_graph(module))
    for path, node in sorted(nodes.items(), key=lambda kv: len(kv[0])):
        if not path or any(path[:len(p)] == p for p in inside):
            continue
        if isinstance(node, NormalizedLayer):
            inside.append(path)
        if isinstance(node, kinds):
            found.append((nodes[path[:-1]], path[-1], node))
    return found


def _replace(parent, key, new) -> None:
    if isinstance(key, int):
        parent[key] = new
    else:
        setattr(parent, key, new)


def apply_norm(module: nnx.Module, norm: str = "weight", *, rngs: Optional[nnx.Rngs] = None,
               coeff: float = 1.0, n_power_iterations: int = 1, init_power_iterations: int = 20,
               exclude: Sequence[str] = ()) -> int:
    """Weight- or spectrally normalize every `nnx.Linear` / `nnx.Conv` inside `module`, in place.

    Each such layer is replaced in its parent by `NormalizedLayer(layer, norm=norm, ...)`; the
    cell's code is untouched (it calls the attribute as before). With `norm="weight"` the
    function is unchanged at first (`g = ||V||`); with `"spectral"` every kernel is scaled to
    spectral norm `coeff`. Layers already normalized are left alone. Call it before building
    the optimizer (the parameters change: `g`, the power-iteration state `u`).

    Args:
      module: an `nnx.Module` (a DEQ cell, a `deq.nn.DEQ`, a whole model).
      norm: `"weight"` or `"spectral"`.
      rngs: random key source for the power-iteration vectors (default `nnx.Rngs(0)`).
      coeff: target spectral norm (spectral only).
      n_power_iterations: power iterations per `reset_norm` (spectral only).
      init_power_iterations: power iterations at construction (spectral only).
      exclude: attribute names (the last part of a layer's path, e.g. `"head"`) left as they are.

    Returns:
      The number of layers normalized.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deq
      >>> cell = deq.nn.TransformerCell(8, 2, rngs=nnx.Rngs(0))  # qkv, proj, fc1, fc2: nnx.Linear
      >>> apply_norm(cell, "spectral", coeff=0.9), type(cell.fc1).__name__
      (4, 'NormalizedLayer')
      >>> round(float(jnp.linalg.norm(cell.fc1.kernel, 2)), 3)
      0.9
      >>> remove_norm(cell), type(cell.fc1).__name__
      (4, 'Linear')

    References:
      torchdeq's `apply_norm` (Geng & Kolter, "TorchDEQ: A Library for Deep Equilibrium
      Models", 2023).
    """
    owner = "apply_norm"
    if not isinstance(module, nnx.Module):
        raise TypeError(f"{owner}: `module` must be an nnx.Module, got {type(module).__name__}.")
    _check_norm(owner, norm)
    if isinstance(exclude, str):
        raise TypeError(f"{owner}: `exclude` must be a sequence of names, got the string {exclude!r}. "
                        f"Pass exclude=({exclude!r},).")
    rngs = nnx.Rngs(0) if rngs is None else rngs
    found = [(p, k, n) for p, k, n in _children(module, _WRAPPABLE) if str(k) not in set(exclude)]
    if isinstance(module, _WRAPPABLE):
        raise TypeError(
            f"{owner}: `module` is itself an {type(module).__name__}, which cannot be replaced in place. "
            "Wrap it directly: deq.nn.NormalizedLayer(layer, norm=..., rngs=...)."
        )
    for parent, key, layer in found:
        _replace(parent, key, NormalizedLayer(layer, norm=norm, rngs=rngs, coeff=coeff,
                                              n_power_iterations=n_power_iterations,
                                              init_power_iterations=init_power_iterations))
    return len(found)


def reset_norm(module: nnx.Module, num_iterations: Optional[int] = None) -> int:
    """Refresh every normalization inside `module` for the next training step (in place).

    Runs the power iteration of every spectrally normalized layer (`NormalizedLayer` with
    `norm="spectral"` and `SpectralNormDense`); weight normalization is recomputed from its
    parameters at each call and needs nothing. Call it once per training step, outside the
    solve (e.g. at the start of the step, or from a cell's `before_solve`).

    Args:
      module: an `nnx.Module`.
      num_iterations: override of each layer's `n_power_iterations`.

    Returns:
      The number of layers whose power iteration ran.

    Example:
      >>> from flax import nnx
      >>> import deq
      >>> cell = deq.nn.TransformerCell(8, 2, rngs=nnx.Rngs(0))
      >>> apply_norm(cell, "spectral"), reset_norm(cell)
      (4, 4)
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"reset_norm: `module` must be an nnx.Module, got {type(module).__name__}.")
    count = spectral_norm_step(module, num_iterations)
    for _, node in nnx.iter_graph(module):
        if isinstance(node, NormalizedLayer) and node.norm == "spectral":
            node.update_power_iteration(num_iterations)
            count += 1
    return count


def remove_norm(module: nnx.Module) -> int:
    """Undo `apply_norm`: replace every `NormalizedLayer` inside `module` by its plain layer
    with the effective kernel folded in (the function is unchanged; `g` and `u` are dropped).

    Args:
      module: an `nnx.Module`.

    Returns:
      The number of layers restored.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deq
      >>> cell = deq.nn.TransformerCell(8, 2, rngs=nnx.Rngs(0))
      >>> _ = apply_norm(cell, "weight")
      >>> remove_norm(cell), type(cell.fc2).__name__
      (4, 'Linear')
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"remove_norm: `module` must be an nnx.Module, got {type(module).__name__}.")
    found = _children(module, NormalizedLayer)
    for parent, key, wrapper in found:
        _replace(parent, key, wrapper.plain())
    return len(found)


# `inspect.signature` and `help` of every module class above show its real arguments.
from .cells import _show_init_signatures  # noqa: E402

_show_init_signatures(globals(), __name__)
