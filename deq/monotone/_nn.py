r"""Flax NNX layers for monotone operator equilibrium networks.

`MonDEQ` (dense) and `MonDEQConv` (convolutional, NHWC) hold the parameters `A`, `B`, `U`, `b`
as `nnx.Param`\ s and solve `z* = relu(W z* + U x + b)` with
`deq.monotone.monotone_fixed_point`; `MonDEQClassifier` adds a linear head and returns
`(logits, info)` like the other models of the library.

References:
  Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from .._api import strict_kwargs
from ..nn import solution_info
from ..nn._checks import check_input, check_nonempty_batch, check_state_like, flatten_input
from ._operators import PADDINGS, MonotoneConv, MonotoneDense, _check_m
from ._splitting import _METHODS, PeacemanRachford, monotone_fixed_point

__all__ = ["MonDEQ", "MonDEQConv", "MonDEQClassifier"]


def _check_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: `{name}` must be an int >= 1, got {value!r}.")


def _check_method(owner: str, name: str, value, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, _METHODS):
        raise TypeError(
            f"{owner}: `{name}` must be deq.monotone.PeacemanRachford(...) or "
            f"deq.monotone.ForwardBackward(...), got {value!r}."
        )


class _MonDEQBase(nnx.Module):
    """Shared call logic: method selection (train/eval), solve, return value."""

    def _configure(self, owner, m, method, backward, eval_method, throw):
        _check_m(owner, m)
        method = PeacemanRachford() if method is None else method
        _check_method(owner, "method", method, allow_none=False)
        _check_method(owner, "backward", backward, allow_none=True)
        _check_method(owner, "eval_method", eval_method, allow_none=True)
        if not isinstance(throw, bool):
            raise TypeError(f"{owner}: `throw` must be a bool, got {throw!r}.")
        self.m = float(m)
        self.method = method
        self.backward = backward
        self.eval_method = eval_method
        self.throw = throw
        self.deterministic = False

    def set_view(self, deterministic: Optional[bool] = None):
        """Used by `nnx.view`, `.eval()` and `.train()`: eval mode solves with `eval_method`."""
        if deterministic is not None:
            self.deterministic = deterministic

    def active_method(self, method=None):
        """The method a call uses: `method` if given, else `eval_method` in eval mode, else `method`."""
        if method is not None:
            _check_method(type(self).__name__, "method", method, allow_none=False)
            return method
        if self.deterministic and self.eval_method is not None:
            return self.eval_method
        return self.method

    def _check_call(self, x, z0, sample_layout: str, size: int, size_name: str, state_size: int):
        """Check `x` (rank, last axis, dtype) and `z0` (the state's shape) before the solve."""
        owner = type(self).__name__
        sample_ndim = sample_layout.count(",") + 1
        one = f"({sample_layout}{',' if sample_ndim == 1 else ''})"
        x = check_input(
            owner, x, layout=f"(batch, {sample_layout}) or {one} for one sample",
            ndim=(sample_ndim, sample_ndim + 1), last=size, last_name=size_name,
            fix=f"Pass x of shape (batch, {sample_layout}), or build the layer with {size_name}=<x's last axis>."
            + (" Add a channel axis with x[..., None] for grayscale images." if sample_ndim == 3 else ""),
        )
        batched = jnp.ndim(x) == sample_ndim + 1
        if z0 is not None:
            state = jax.ShapeDtypeStruct(jnp.shape(x)[:-1] + (state_size,), jnp.result_type(x))
            check_state_like(owner, z0, state, "layer's state")
        if batched:
            check_nonempty_batch(owner, x, z0)
        return x, (0 if batched else None)

    def _solve(self, x, z0, return_solution, method, batch_axis):
        op = self.operator()
        sol = monotone_fixed_point(
            op, x, method=self.active_method(method), backward=self.backward, z0=z0,
            batch_axis=batch_axis, throw=self.throw,
        )
        return sol if return_solution else sol.value


class MonDEQ(_MonDEQBase):
    r"""A dense monotone equilibrium layer: returns `z*` with `z* = relu(W z* + U x + b)`.

    .. math::
        W = (1 - m) I - A^\top A + B - B^\top, \qquad I - W \succeq m I,

    so the equilibrium exists and is unique for every input and every value of the parameters,
    and the splitting `method` converges to it (no step-size tuning for Peaceman-Rachford,
    which is the default). Gradients are implicit: the adjoint problem is solved with the same
    splitting (`backward`, default: `method`), so memory does not grow with the steps.
    Drop-in like `deq.nn.DEQ`: `layer(x)`, `layer(x, return_solution=True)`, `.eval()` selects
    `eval_method`.

    Args:
      in_features: `d`, the input size.
      hidden: `n`, the state size.
      m: strong-monotonicity margin `m > 0` (larger: faster solves, more constrained `W`).
      rngs: `nnx.Rngs` for the initialization.
      method: forward splitting method (default `PeacemanRachford()`).
      backward: splitting method of the adjoint solve (default: `method`).
      eval_method: method in eval mode (`layer.eval()`); None uses `method`.
      init_scale: `A` and `B` start with i.i.d. `N(0, init_scale^2 / (3 n))` entries.
      param_dtype: dtype of the parameters.
      throw: raise from compiled code when a solve does not converge.

    Call Args:
      x: `(batch, in_features)`, or `(in_features,)` for one sample.
      z0: starting point (warm start), shaped like the state.
      return_solution: return the `deq.Solution` (`.value`, `.stats`) instead of `z*`.
      method: per-call method override.

    Returns:
      `z*` of shape `(batch, hidden)` (or `(hidden,)`), or a `deq.Solution`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.monotone import MonDEQ
      >>> layer = MonDEQ(3, 8, m=0.5, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((4, 3))
      >>> layer(x).shape
      (4, 8)
      >>> sol = layer(x, return_solution=True)
      >>> bool(sol.stats.converged.all()), sol.stats.num_steps.shape
      (True, (4,))
      >>> grads = nnx.grad(lambda l: jnp.sum(l(x) ** 2))(layer)
      >>> grads["A"].shape
      (8, 8)

    References:
      Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
      Ryu & Boyd, "A primer on monotone operator methods", Appl. Comput. Math. 2016.
    """

    @strict_kwargs
    def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs, m: float = 1.0, method=None,
                 backward=None, eval_method=None, init_scale: float = 1.0, param_dtype=jnp.float32,
                 throw: bool = False):
        _check_int("MonDEQ", "in_features", in_features)
        _check_int("MonDEQ", "hidden", hidden)
        self._configure("MonDEQ", m, method, backward, eval_method, throw)
        op = MonotoneDense.init(rngs.params(), in_features, hidden, m=m, scale=init_scale, dtype=param_dtype)
        self.A = nnx.Param(op.A)
        self.B = nnx.Param(op.B)
        self.U = nnx.Param(op.U)
        self.b = nnx.Param(op.b)
        self.in_features, self.hidden = in_features, hidden

    def operator(self) -> MonotoneDense:
        """The functional `MonotoneDense` of the current parameters."""
        return MonotoneDense(self.A[...], self.B[...], self.U[...], self.b[...], self.m)

    def weight(self) -> jax.Array:
        """The `(hidden, hidden)` matrix `W`."""
        return self.operator().weight()

    @strict_kwargs
    def __call__(self, x, z0=None, *, return_solution: bool = False, method=None):
        x, batch_axis = self._check_call(x, z0, f"{self.in_features}", self.in_features, "in_features", self.hidden)
        return self._solve(x, z0, return_solution, method, batch_axis)


class MonDEQConv(_MonDEQBase):
    r"""A convolutional monotone equilibrium layer on NHWC maps: `z* = relu(W z* + U * x + b)`.

    .. math::
        W z = (1 - m) z - A^\top (A z) + B z - B^\top z, \qquad I - W \succeq m I,

    with `C x C` convolutions `A`, `B` (stride 1, 'same', circular or zero padding) and their
    exact adjoints, and a zero-padded `C_in -> C` input convolution `U`. With circular padding
    (default) Peaceman-Rachford inverts `I + alpha (I - W)` exactly in the Fourier domain; with
    zero padding it uses conjugate gradients.

    Args:
      in_channels: `C_in`.
      channels: `C`, the state's channels.
      rngs: `nnx.Rngs` for the initialization.
      kernel_size: size `k` of the `A`, `B` kernels.
      input_kernel_size: size of the `U` kernel.
      m: strong-monotonicity margin `m > 0`.
      padding: `"circular"` or `"zero"`.
      method: forward splitting method (default `PeacemanRachford()`).
      backward: splitting method of the adjoint solve (default: `method`).
      eval_method: method in eval mode; None uses `method`.
      init_scale: `A`, `B` start with i.i.d. `N(0, init_scale^2 / (3 k^2 C))` entries.
      param_dtype: dtype of the parameters.
      throw: raise from compiled code when a solve does not converge.

    Call Args:
      x: `(batch, H, W, in_channels)`, or `(H, W, in_channels)` for one sample.
      z0: starting point shaped like the state.
      return_solution: return the `deq.Solution` instead of `z*`.
      method: per-call method override.

    Returns:
      `z*` of shape `(batch, H, W, channels)`, or a `deq.Solution`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.monotone import MonDEQConv
      >>> layer = MonDEQConv(1, 4, m=0.5, rngs=nnx.Rngs(0))
      >>> sol = layer(jnp.ones((2, 8, 8, 1)), return_solution=True)
      >>> sol.value.shape, bool(sol.stats.converged.all())
      ((2, 8, 8, 4), True)

    References:
      Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
    """

    @strict_kwargs
    def __init__(self, in_channels: int, channels: int, *, rngs: nnx.Rngs, kernel_size: int = 3,
                 input_kernel_size: int = 3, m: float = 1.0, padding: str = "circular", method=None,
                 backward=None, eval_method=None, init_scale: float = 1.0, param_dtype=jnp.float32,
                 throw: bool = False):
        for name, v in (("in_channels", in_channels), ("channels", channels),
                        ("kernel_size", kernel_size), ("input_kernel_size", input_kernel_size)):
            _check_int("MonDEQConv", name, v)
        if padding not in PADDINGS:
            raise ValueError(f"MonDEQConv: `padding` must be one of {PADDINGS}, got {padding!r}.")
        self._configure("MonDEQConv", m, method, backward, eval_method, throw)
        op = MonotoneConv.init(rngs.params(), in_channels, channels, kernel_size=kernel_size,
                               input_kernel_size=input_kernel_size, m=m, scale=init_scale,
                               padding=padding, dtype=param_dtype)
        self.A = nnx.Param(op.A)
        self.B = nnx.Param(op.B)
        self.U = nnx.Param(op.U)
        self.b = nnx.Param(op.b)
        self.padding = padding
        self.in_channels, self.channels = in_channels, channels

    def operator(self) -> MonotoneConv:
        """The functional `MonotoneConv` of the current parameters."""
        return MonotoneConv(self.A[...], self.B[...], self.U[...], self.b[...], self.m, self.padding)

    @strict_kwargs
    def __call__(self, x, z0=None, *, return_solution: bool = False, method=None):
        x, batch_axis = self._check_call(x, z0, f"H, W, {self.in_channels}", self.in_channels, "in_channels",
                                         self.channels)
        return self._solve(x, z0, return_solution, method, batch_axis)


class MonDEQClassifier(nnx.Module):
    r"""A monotone equilibrium classifier: flatten, `MonDEQ`, linear head.

    .. math::
        z^\star = \mathrm{relu}(W z^\star + U\,\mathrm{vec}(x) + b), \qquad
        \mathrm{logits} = V z^\star + c .

    Returns `(logits, info)` like the library's other models, where `info` holds batch means of
    the forward solve: `forward_steps`, `residual` and `converged_frac` (see
    `deq.nn.solution_info`).

    Args:
      in_features: size of the flattened input (e.g. 64 for 8x8 digits).
      hidden: size of the equilibrium state.
      num_classes: number of classes.
      rngs: `nnx.Rngs`.
      m, method, backward, eval_method, init_scale, param_dtype, throw: passed to `MonDEQ`.

    Call Args:
      x: `(batch, ...)` inputs with `prod(...) == in_features` (flattened here).

    Returns:
      `(logits (batch, num_classes), info)`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.monotone import MonDEQClassifier
      >>> model = MonDEQClassifier(64, 32, 10, rngs=nnx.Rngs(0))
      >>> logits, info = model(jnp.ones((5, 8, 8, 1)))
      >>> logits.shape, sorted(info), float(info["converged_frac"])
      ((5, 10), ['converged_frac', 'forward_steps', 'residual'], 1.0)

    References:
      Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
    """

    @strict_kwargs
    def __init__(self, in_features: int, hidden: int, num_classes: int, *, rngs: nnx.Rngs,
                 m: float = 1.0, method=None, backward=None, eval_method=None, init_scale: float = 1.0,
                 param_dtype=jnp.float32, throw: bool = False):
        _check_int("MonDEQClassifier", "num_classes", num_classes)
        self.deq = MonDEQ(in_features, hidden, rngs=rngs, m=m, method=method, backward=backward,
                          eval_method=eval_method, init_scale=init_scale, param_dtype=param_dtype,
                          throw=throw)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs, param_dtype=param_dtype)
        self.in_features = in_features

    def __call__(self, x):
        x = flatten_input("MonDEQClassifier", x, self.in_features)
        sol = self.deq(x, return_solution=True)
        return self.head(sol.value), solution_info(sol)


# `inspect.signature` and `help` of every module class above show its real arguments.
from ..nn.cells import _show_init_signatures  # noqa: E402

_show_init_signatures(globals(), __name__)
