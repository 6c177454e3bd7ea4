r"""Variational dropout for DEQ cells: one mask per forward pass, the same at every solver step.

Ordinary dropout (`nnx.Dropout`) draws a new mask at every call. Inside a DEQ cell that is
every solver step, so `z*` would be the fixed point of a different function at each step and
the solve would not converge; `deq.nn.DEQ` refuses it. Variational dropout (Gal & Ghahramani
2016, used by the DEQ-Transformer of Bai et al. 2019) draws **one** mask per forward pass and
holds it fixed over all the solver steps, so the cell stays one function `f(z, x)` during the
solve.

`VariationalDropout` does this without any mutable state inside the solve: it keeps a random
key as a `DropoutKey` (a `deq.nn.SolverConstant`, read-only during the solve) and recomputes
its mask from that key at each call, so every call of one forward pass applies the same mask.
The key is advanced once per forward pass, outside the solve, by `resample()`:
`deq.nn.DEQ` calls `resample_dropout(cell)` on its cell before every training-mode solve, and
explicit networks (an unrolled twin, a stack of blocks) call `resample_dropout(self)` at the
start of their `__call__`. In eval mode (`model.eval()`, which sets `deterministic=True`) the
layer is the identity and the key does not move.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ._layer import SolverConstant

__all__ = ["DropoutKey", "VariationalDropout", "resample_dropout"]


class DropoutKey(SolverConstant):
    """The random key of a `VariationalDropout`: read-only in the solve, advanced by `resample()`.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from deq.nn.dropout import DropoutKey
      >>> isinstance(DropoutKey(jax.random.key(0)), nnx.Param)
      False
    """


class VariationalDropout(nnx.Module):
    r"""Dropout whose mask is drawn once per forward pass and shared by every call in it.

    .. math::
        \mathrm{drop}(h) = h \odot \frac{m}{1 - p}, \qquad
        m \sim \mathrm{Bernoulli}(1 - p) \ \text{elementwise, fixed within a forward pass},

    with the mask `m` shaped like `h` except along `broadcast_axes`, where it has size 1 (the
    same mask for every position of a sequence with `broadcast_axes=(1,)`, as in variational
    RNN dropout). The mask is a function of the layer's `DropoutKey` and of `h`'s shape only,
    so the calls that the solver makes within one forward pass all apply the same mask, and
    `deq.nn.DEQ` accepts the layer inside a cell. `resample()` advances the key (a new mask for
    the next forward pass); `deq.nn.DEQ` does it for every `VariationalDropout` in its cell
    before each training-mode solve.

    Args:
      rate: the probability `p` in `[0, 1)` of zeroing an entry.
      rngs: random key source; the key is drawn from its `rng_collection` stream (the default
        stream when that stream is absent).
      broadcast_axes: axes of `h` along which the mask is shared (size 1), e.g. `(1,)` for
        `(B, T, d)` sequences.
      deterministic: the identity (eval mode); `model.eval()` / `model.train()` set it.
      rng_collection: the `nnx.Rngs` stream to draw the key from.

    Returns:
      Calling the layer on `h` returns `h * m / (1 - p)` (or `h` when deterministic or `p = 0`).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn import VariationalDropout
      >>> drop = VariationalDropout(0.5, rngs=nnx.Rngs(dropout=0), broadcast_axes=(1,))
      >>> h = jnp.ones((2, 3, 4))
      >>> bool((drop(h) == drop(h)).all())  # one mask until resample()
      True
      >>> bool((drop(h)[:, 0] == drop(h)[:, 2]).all())  # shared over axis 1
      True
      >>> drop.resample(); sorted(set(drop(h).ravel().tolist()))
      [0.0, 2.0]
      >>> drop.eval(); bool((drop(h) == h).all())
      True

    References:
      Gal & Ghahramani, "A Theoretically Grounded Application of Dropout in Recurrent Neural
      Networks", NeurIPS 2016.
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    def __init__(self, rate: float, *, rngs: nnx.Rngs, broadcast_axes: Sequence[int] = (),
                 deterministic: bool = False, rng_collection: str = "dropout"):
        owner = "VariationalDropout"
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"{owner}: `rate` must be a number in [0, 1), got {rate!r}. Pass e.g. rate=0.1.")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(
                f"{owner}: `rngs` must be an nnx.Rngs, got {type(rngs).__name__}. "
                "Pass e.g. rngs=nnx.Rngs(0, dropout=1)."
            )
        axes = (broadcast_axes,) if isinstance(broadcast_axes, int) else tuple(broadcast_axes)
        if any(isinstance(a, bool) or not isinstance(a, int) for a in axes):
            raise TypeError(
                f"{owner}: `broadcast_axes` must be a tuple of ints, got {broadcast_axes!r}. "
                "Pass e.g. broadcast_axes=(1,) to share the mask over the positions of (B, T, d)."
            )
        if not isinstance(deterministic, bool):
            raise TypeError(f"{owner}: `deterministic` must be a bool, got {deterministic!r}.")
        self.rate = float(rate)
        self.broadcast_axes = axes
        self.deterministic = deterministic
        stream = rng_collection if rng_collection in rngs else "default"
        self.key = DropoutKey(rngs[stream]())

    def resample(self) -> None:
        """Advance the key: the next forward pass uses a new mask. Call it outside the solve
        (`deq.nn.DEQ` does, before each training-mode solve); does nothing when deterministic."""
        if not self.deterministic and self.rate > 0:
            self.key[...] = jax.random.split(self.key[...])[0]

    def mask(self, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        """The current mask `m / (1 - p)` for an input of `shape` (broadcast axes of size 1).

        Args:
          shape: the shape of the input `h`.
          dtype: the mask's dtype.

        Returns:
          The scaled mask (entries `0` or `1 / (1 - p)`).
        """
        shape = tuple(shape)
        bad = [a for a in self.broadcast_axes if not -len(shape) <= a < len(shape)]
        if bad:
            raise ValueError(
                f"VariationalDropout: `broadcast_axes`={self.broadcast_axes} names axis {bad[0]}, but the "
                f"input has shape {shape} ({len(shape)} axes). Build the layer with axes of the input it drops."
            )
        axes = {a % len(shape) for a in self.broadcast_axes}
        mask_shape = tuple(1 if i in axes else n for i, n in enumerate(shape))
        keep = jax.random.bernoulli(self.key[...], 1.0 - self.rate, mask_shape)
        return keep.astype(dtype) / jnp.asarray(1.0 - self.rate, dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0:
            return h
        h = jnp.asarray(h)
        if not jnp.issubdtype(h.dtype, jnp.floating):
            raise TypeError(
                f"VariationalDropout: the input must be floating point, got {h.dtype.name}{list(h.shape)}. "
                "Drop features, not integer ids (embed them first)."
            )
        return h * self.mask(h.shape, h.dtype)

    def set_view(self, deterministic: bool | None = None):
        """Used by `nnx.view`.

        Args:
          deterministic: if True, the layer is the identity (evaluation mode).
        """
        if deterministic is not None:
            self.deterministic = deterministic


def resample_dropout(module: nnx.Module) -> int:
    """Advance the key of every `VariationalDropout` inside `module` (a new mask per layer).

    Call it once per forward pass, outside any fixed-point solve: at the start of an explicit
    network's `__call__`, or in a DEQ cell's `before_solve` (`deq.nn.DEQ` already calls it on
    its cell before each training-mode solve). Layers in eval mode are left as they are.

    Args:
      module: any `nnx.Module` (a model, a cell, or a `VariationalDropout` itself).

    Returns:
      The number of `VariationalDropout` layers found (a Python int).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn import VariationalDropout, resample_dropout
      >>> drop = VariationalDropout(0.5, rngs=nnx.Rngs(0))
      >>> before = drop(jnp.ones(16))
      >>> resample_dropout(drop), bool((drop(jnp.ones(16)) == before).all())
      (1, False)
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"resample_dropout: `module` must be an nnx.Module, got {type(module).__name__}.")
    count = 0
    for _, node in nnx.iter_graph(module):
        if isinstance(node, VariationalDropout):
            node.resample()
            count += 1
    return count


# `inspect.signature` and `help` of every module class above show its real arguments.
from .cells import _show_init_signatures  # noqa: E402

_show_init_signatures(globals(), __name__)
