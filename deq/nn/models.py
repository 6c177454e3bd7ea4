r"""Ready-made models: DEQ classifiers and language models, and their explicit twins.

Every model is an `nnx.Module` whose `__call__(x)` returns `(logits, info)`:

- `logits`: `(B, num_classes)` (or `(B, T, num_classes)` for per-token models);
- `info`: a dict of scalar diagnostics. DEQ models return `deq.nn.solution_info(sol)` of their
  fixed-point solve (`forward_steps`, `residual`, `converged_frac`, batch means); explicit
  networks return `{"depth": K}`.

A DEQ model is `encoder -> DEQ layer -> head`: the encoder computes the input injection once
(so the cell does not recompute it at every solver step), the layer finds `z* = cell(z*, u)`,
and the head maps `z*` to logits.

**Explicit twins.** For each DEQ classifier built on `DenseCell`/`ConvCell` there are two
explicit networks with the same encoder and head, started from `z_0 = 0`:

- `UnrolledClassifier` / `ConvUnrolledClassifier`: the *same* cell applied `depth` times with
  tied weights, `z_{k+1} = f(z_k, u)`, trained by ordinary backprop. It has exactly the DEQ's
  parameter count, whatever the depth.
- `ResNetClassifier` / `ConvResNetClassifier`: `depth` *different* cells (untied weights),
  `z_{k+1} = f_k(z_k, u)`, a residual network (each cell contains the skip `z + ...`). At equal
  width it has about `depth` times the cell parameters of the DEQ, so the DEQ has FEWER
  parameters. Two constructors:

  * equal width: `ResNetClassifier(in_features, hidden, num_classes, depth=K, rngs=...)`, the
    DEQ's `hidden` (same per-layer compute, about K times the cell parameters);
  * matched parameters: `ResNetClassifier.matched(count_params(deq_model), in_features,
    num_classes, depth=K, rngs=...)`, the width whose parameter count is closest to the target
    (`matched_resnet_hidden`), narrower than the DEQ.

Matching is printed, not assumed: use `count_params` and `param_table`.

**Language models.** Three causal character/token LMs built from the same block
(`TransformerCell`: pre-LN, input injection, causal attention) with the same embedding and
head: `TransformerDEQLM` (the block as a DEQ cell), `UnrolledTransformerLM` (the same block
applied `depth` times with tied weights, ordinary backprop; exactly the DEQ's parameters) and
`TransformerLM` (`depth` untied blocks; `TransformerLM.matched(count_params(deq_lm), ...)`
picks the width with the DEQ's parameter count). Each takes `dropout=p`: a
`deq.nn.VariationalDropout` on the block's output, one mask per forward pass shared by all
positions and all solver steps (or all unrolled applications of the tied block).

**Defaults and training notes.** DEQ models solve with `default_solver()` (Anderson, rtol 1e-3,
at most 30 steps) and differentiate with `default_backward()` (IFT with an Anderson adjoint,
rtol 1e-3, at most 30 steps). In our check on sklearn digits, `DEQClassifier(64, 128, 10)` with
Adam (2e-3, cosine decay), batch 64 and 8 epochs reached 97.5-98.6% test accuracy (3 seeds);
with `hidden=64`, occasional loss spikes coincided with the forward solve failing for a few
samples, and clipping the gradient norm at 1.0 removed them. Watch `info["converged_frac"]`.

References:
  Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
  Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models", NeurIPS 2020.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ..backward import IFT
from ..solvers import Anderson
from ._checks import check_input, check_nonempty_batch, flatten_input
from .cells import ConvCell, DenseCell, MultiscaleCell, TransformerCell

__all__ = [
    "ConvDEQClassifier",
    "ConvResNetClassifier",
    "ConvUnrolledClassifier",
    "DEQClassifier",
    "MultiscaleDEQClassifier",
    "ResNetClassifier",
    "TransformerDEQClassifier",
    "TransformerDEQLM",
    "TransformerLM",
    "UnrolledClassifier",
    "UnrolledTransformerLM",
    "count_params",
    "matched_conv_resnet_channels",
    "matched_resnet_hidden",
    "matched_transformer_width",
    "matched_width",
    "param_table",
]


def default_solver() -> Anderson:
    """The models' default forward solver: `Anderson(rtol=1e-3, atol=1e-5, max_steps=30)`.

    Tolerances suited to training in float32 (the fixed point is needed to about the accuracy
    of the gradient, not to machine precision). The 30-step budget is the usual one in DEQ
    papers and suffices on digits; on harder tasks it can be too small (measured: hidden-128
    dense DEQ on MNIST-1D, 20% of test solves stopped at 30 steps, and training with 100 steps
    gained about 1 point of test accuracy). Watch `info["converged_frac"]` and raise
    `max_steps` if it drops (`benchmarks.deq_vs_explicit` uses 100).
    """
    return Anderson(rtol=1e-3, atol=1e-5, max_steps=30)


def default_backward() -> IFT:
    """The models' default backward: `IFT` with an `Anderson(rtol=1e-3, max_steps=30)` adjoint.

    Looser and cheaper than `IFT()`'s own default adjoint (`rtol=1e-4, max_steps=100`); an
    adjoint that misses it is reported by a `deq.NonConvergenceWarning`. On MNIST-1D (hidden
    128) it failed for some sample in a third of the training steps; pass
    `backward=deq.IFT()` there.
    """
    return IFT(solver=Anderson(rtol=1e-3, atol=1e-6, max_steps=30))


def _make_deq(cell, solver, backward, eval_solver):
    from ._layer import DEQ  # the layer lives in deq.nn._layer

    return DEQ(
        cell,
        solver=default_solver() if solver is None else solver,
        backward=default_backward() if backward is None else backward,
        batch_axis=0,
        eval_solver=eval_solver,
    )


def _solve(layer, u, owner: str, x, adjoint_init=None):
    from ._layer import solution_info

    check_nonempty_batch(owner, x)
    sol = layer(u, return_solution=True, adjoint_init=adjoint_init)
    return sol.value, solution_info(sol)


def _check_int(owner: str, name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: `{name}` must be an int >= {minimum}, got {value!r}.")


def _check_image(owner: str, x: jax.Array, in_channels: int) -> jax.Array:
    return check_input(
        owner, x, layout=f"NHWC images (B, H, W, {in_channels})", ndim=4, last=in_channels,
        last_name="in_channels",
        fix="Add a channel axis with x[..., None] for grayscale images, a batch axis with x[None] for "
            "one image, or build the model with in_channels=<x's channels>.",
    )


def _depth_info(depth: int) -> dict:
    return {"depth": jnp.asarray(depth, jnp.int32)}


def _dense_cell(owner: str, hidden: int, rngs: nnx.Rngs, cell, cell_hidden, use_norm, init_scale):
    """The dense models' cell: `cell` if given (checked), else a `DenseCell` built from the rest."""
    if cell is None:
        return DenseCell(hidden, cell_hidden, rngs=rngs, use_norm=True if use_norm is None else use_norm,
                         init_scale=0.1 if init_scale is None else init_scale)
    given = [n for n, v in (("cell_hidden", cell_hidden), ("use_norm", use_norm), ("init_scale", init_scale))
             if v is not None]
    if given:
        raise ValueError(
            f"{owner}: {', '.join(f'`{n}`' for n in given)} configure the default DenseCell and cannot be "
            f"combined with `cell`. Set them on the cell you pass, or drop `cell`."
        )
    if not isinstance(cell, nnx.Module) or not callable(cell):
        raise TypeError(f"{owner}: `cell` must be an nnx.Module with __call__(z, u) -> z, got {type(cell).__name__}.")
    for name in ("features", "in_features"):
        size = getattr(cell, name, None)
        if size is not None and size != hidden:
            raise ValueError(
                f"{owner}: `cell` maps states of size hidden={hidden} with injections of the same size, "
                f"but its `{name}` is {size}. Build it as e.g. ContractiveDense({hidden}, {hidden}, rngs=...)."
            )
    return cell


# --------------------------------------------------------------------------------------------
# Dense classifiers: DEQ, tied unrolled twin, untied ResNet twin.
# --------------------------------------------------------------------------------------------


class _DenseBase(nnx.Module):
    """Encoder `Linear(in_features, hidden)` and head `Linear(hidden, num_classes)`."""

    def _init_io(self, owner, in_features, hidden, num_classes, rngs):
        for name, v in (("in_features", in_features), ("hidden", hidden), ("num_classes", num_classes)):
            _check_int(owner, name, v)
        self.in_features, self.hidden, self.num_classes = in_features, hidden, num_classes
        self.encoder = nnx.Linear(in_features, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def _encode(self, x):
        return self.encoder(flatten_input(type(self).__name__, x, self.in_features))


class DEQClassifier(_DenseBase):
    r"""Fully connected DEQ classifier: `Linear` encoder -> DEQ(`DenseCell`) -> `Linear` head.

    .. math::
        u = U \,\mathrm{flatten}(x) + b, \qquad z^* = f_\theta(z^*, u), \qquad
        \text{logits} = V z^* + c,

    with `f_theta` a `DenseCell(hidden, cell_hidden)`, solved by `solver` and differentiated by
    `backward` (implicit differentiation by default).

    Args:
      in_features: input features per sample (inputs are flattened, e.g. 64 for 8x8 digits,
        40 for MNIST-1D).
      hidden: state size of the DEQ.
      num_classes: number of classes.
      rngs: random key source.
      cell_hidden: inner width of the cell (default `hidden`).
      solver: forward solver (default `deq.nn.models.default_solver()`).
      backward: backward strategy (default `deq.nn.models.default_backward()`).
      eval_solver: solver in eval mode (`model.eval()`); None uses `solver`.
      use_norm: passed to `DenseCell` (default True).
      init_scale: passed to `DenseCell` (default 0.1).
      cell: another cell `f(z, u)` to use instead of `DenseCell`, with states and injections of
        size `hidden`, e.g. a provably contractive `deq.nn.ContractiveDense(hidden, hidden,
        rngs=rngs)`; then `cell_hidden`, `use_norm` and `init_scale` must be left unset.

    Call Args:
      x: the input batch.
      adjoint_init: with the `deq.IFT` backward, a warm start `(B, hidden)` for the adjoint
        solve, passed to the DEQ layer (see `deq.nn.DEQ`); its gradient is the newly solved
        adjoint. None (the default) starts it from `dL/dz*`, IFT's cold start.

    Returns:
      Calling the model returns `(logits (B, num_classes), info)` with `info` from
      `deq.nn.solution_info`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.models import DEQClassifier
      >>> model = DEQClassifier(64, 32, 10, rngs=nnx.Rngs(0))
      >>> logits, info = model(jnp.ones((4, 8, 8, 1)))
      >>> print(logits.shape, sorted(info))
      (4, 10) ['converged_frac', 'forward_steps', 'residual']

      With a cell whose convergence is proven (a contraction in `z`, Lipschitz 0.9):

      >>> from deq.nn import ContractiveDense
      >>> cell = ContractiveDense(32, 32, rngs=nnx.Rngs(1), lipschitz=0.9, activation="relu")
      >>> logits, info = DEQClassifier(64, 32, 10, rngs=nnx.Rngs(0), cell=cell)(jnp.ones((4, 64)))
      >>> float(info["converged_frac"])
      1.0

    References:
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, *, rngs: nnx.Rngs,
                 cell_hidden: int | None = None, solver=None, backward=None, eval_solver=None,
                 use_norm: bool | None = None, init_scale: float | None = None, cell: nnx.Module | None = None):
        self._init_io("DEQClassifier", in_features, hidden, num_classes, rngs)
        cell = _dense_cell("DEQClassifier", hidden, rngs, cell, cell_hidden, use_norm, init_scale)
        self.deq = _make_deq(cell, solver, backward, eval_solver)

    def __call__(self, x, *, adjoint_init=None):
        z, info = _solve(self.deq, self._encode(x), type(self).__name__, x, adjoint_init)
        return self.head(z), info


class UnrolledClassifier(_DenseBase):
    r"""Explicit twin of `DEQClassifier`: the same cell applied `depth` times with tied weights.

    .. math:: z_0 = 0, \qquad z_{k+1} = f_\theta(z_k, u), \quad k = 0..K-1, \qquad
              \text{logits} = V z_K + c.

    Same encoder, cell and head as `DEQClassifier` (identical parameter count, independent of
    `depth`); trained by ordinary backprop through the `K` steps.

    Args:
      in_features: input features per sample (inputs are flattened).
      hidden: state size.
      num_classes: number of classes.
      depth: `K`, the number of applications of the cell.
      rngs: random key source.
      cell_hidden: inner width of the cell (default `hidden`).
      use_norm: passed to `DenseCell` (default True).
      init_scale: passed to `DenseCell` (default 0.1).
      cell: another cell to use instead of `DenseCell`, as in `DEQClassifier` (the twin of a
        `DEQClassifier` built with the same kind of cell).

    Returns:
      Calling the model returns `(logits (B, num_classes), {"depth": K})`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.models import UnrolledClassifier
      >>> model = UnrolledClassifier(64, 32, 10, depth=6, rngs=nnx.Rngs(0))
      >>> logits, info = model(jnp.ones((4, 64)))
      >>> print(logits.shape, int(info["depth"]))
      (4, 10) 6
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, depth: int = 6, *, rngs: nnx.Rngs,
                 cell_hidden: int | None = None, use_norm: bool | None = None, init_scale: float | None = None,
                 cell: nnx.Module | None = None):
        self._init_io("UnrolledClassifier", in_features, hidden, num_classes, rngs)
        _check_int("UnrolledClassifier", "depth", depth)
        self.depth = depth
        self.cell = _dense_cell("UnrolledClassifier", hidden, rngs, cell, cell_hidden, use_norm, init_scale)

    def __call__(self, x):
        return self.head(self._unroll(self._encode(x))), _depth_info(self.depth)

    def _unroll(self, u):
        """`z_K` from `z_0 = 0` and the injection `u`."""
        z = self.cell.init_state(u)
        for _ in range(self.depth):
            z = self.cell(z, u)
        return z


class ResNetClassifier(_DenseBase):
    r"""Explicit residual network twin of `DEQClassifier`: `depth` different (untied) cells.

    .. math:: z_0 = 0, \qquad z_{k+1} = f_{\theta_k}(z_k, u), \quad k = 0..K-1, \qquad
              \text{logits} = V z_K + c,

    each `f_theta_k` a `DenseCell` (which contains the residual skip `z + ...`), with the
    `DEQClassifier`'s encoder and head. At equal `hidden` it has about `K` times the DEQ's cell
    parameters; `ResNetClassifier.matched(target, ...)` picks the width whose count is closest
    to `target` instead.

    Args:
      in_features: input features per sample (inputs are flattened).
      hidden: state size.
      num_classes: number of classes.
      depth: `K`, the number of residual cells.
      rngs: random key source.
      cell_hidden: inner width of every cell (default `hidden`).
      use_norm: passed to `DenseCell`.
      init_scale: passed to `DenseCell`.

    Returns:
      Calling the model returns `(logits (B, num_classes), {"depth": K})`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.models import ResNetClassifier, count_params
      >>> model = ResNetClassifier(64, 32, 10, depth=4, rngs=nnx.Rngs(0))
      >>> logits, info = model(jnp.ones((4, 64)))
      >>> print(logits.shape, int(info["depth"]))
      (4, 10) 4
      >>> small = ResNetClassifier.matched(5000, 64, 10, depth=4, rngs=nnx.Rngs(0))
      >>> print(small.hidden, count_params(small))
      19 5083
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, depth: int = 6, *, rngs: nnx.Rngs,
                 cell_hidden: int | None = None, use_norm: bool = True, init_scale: float = 0.1):
        self._init_io("ResNetClassifier", in_features, hidden, num_classes, rngs)
        _check_int("ResNetClassifier", "depth", depth)
        self.depth = depth
        self.cells = nnx.List(
            [DenseCell(hidden, cell_hidden, rngs=rngs, use_norm=use_norm, init_scale=init_scale) for _ in range(depth)]
        )

    @classmethod
    def matched(cls, target_params: int, in_features: int, num_classes: int, depth: int = 6, *,
                rngs: nnx.Rngs, **kwargs) -> "ResNetClassifier":
        """The `ResNetClassifier` whose parameter count is closest to `target_params`.

        Args:
          target_params: the count to match, e.g. `count_params(deq_model)`.
          in_features: input features.
          num_classes: number of classes.
          depth: number of residual cells.
          rngs: random key source.
          **kwargs: other constructor arguments (`use_norm`, `init_scale`); `cell_hidden` is
            not allowed (the inner width follows `hidden`).

        Returns:
          A `ResNetClassifier` of width `matched_resnet_hidden(...)`.
        """
        hidden = matched_resnet_hidden(target_params, in_features, num_classes, depth, **kwargs)
        return cls(in_features, hidden, num_classes, depth, rngs=rngs, **kwargs)

    def __call__(self, x):
        u = self._encode(x)
        z = self.cells[0].init_state(u)
        for cell in self.cells:
            z = cell(z, u)
        return self.head(z), _depth_info(self.depth)


# --------------------------------------------------------------------------------------------
# Convolutional classifiers.
# --------------------------------------------------------------------------------------------


class _ConvBase(nnx.Module):
    """Stem `Conv(in_channels, channels, 3x3)`; head: global average pool -> `Linear`."""

    def _init_io(self, owner, in_channels, channels, num_classes, rngs):
        for name, v in (("in_channels", in_channels), ("channels", channels), ("num_classes", num_classes)):
            _check_int(owner, name, v)
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        self.stem = nnx.Conv(in_channels, channels, (3, 3), rngs=rngs)
        self.head = nnx.Linear(channels, num_classes, rngs=rngs)

    def _encode(self, x):
        return self.stem(_check_image(type(self).__name__, x, self.in_channels))

    def _readout(self, z):
        return self.head(jnp.mean(z, axis=(1, 2)))


def _conv_cell(channels, rngs, hidden_channels, num_groups, init_scale):
    return ConvCell(channels, rngs=rngs, hidden_channels=hidden_channels, num_groups=num_groups,
                    init_scale=init_scale)


class ConvDEQClassifier(_ConvBase):
    r"""Convolutional DEQ classifier (NHWC): conv stem -> DEQ(`ConvCell`) -> pool -> `Linear`.

    .. math::
        u = \mathrm{Conv}_{3\times3}(x), \qquad z^* = f_\theta(z^*, u), \qquad
        \text{logits} = V \,\mathrm{mean}_{h,w}(z^*) + c.

    Args:
      in_channels: input channels (1 for digits as `(8, 8, 1)`).
      channels: state channels.
      num_classes: number of classes.
      rngs: random key source.
      hidden_channels: inner channels of the cell (default `channels`).
      num_groups: GroupNorm groups (default gcd(channels, 4)).
      solver: forward solver (default `deq.nn.models.default_solver()`).
      backward: backward strategy (default `deq.nn.models.default_backward()`).
      eval_solver: solver in eval mode; None uses `solver`.
      init_scale: passed to `ConvCell`.

    Returns:
      Calling the model returns `(logits (B, num_classes), info)`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.models import ConvDEQClassifier
      >>> model = ConvDEQClassifier(1, 16, 10, rngs=nnx.Rngs(0))
      >>> logits, info = model(jnp.ones((2, 8, 8, 1)))
      >>> print(logits.shape, sorted(info))
      (2, 10) ['converged_frac', 'forward_steps', 'residual']

    References:
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, rngs: nnx.Rngs,
                 hidden_channels: int | None = None, num_groups: int | None = None, solver=None,
                 backward=None, eval_solver=None, init_scale: float = 0.1):
        self._init_io("ConvDEQClassifier", in_channels, channels, num_classes, rngs)
        cell = _conv_cell(channels, rngs, hidden_channels, num_groups, init_scale)
        self.deq = _make_deq(cell, solver, backward, eval_solver)

    def __call__(self, x):
        z, info = _solve(self.deq, self._encode(x), type(self).__name__, x)
        return self._readout(z), info


class ConvUnrolledClassifier(_ConvBase):
    r"""Explicit twin of `ConvDEQClassifier`: its `ConvCell` applied `depth` times (tied weights).

    .. math:: z_0 = 0, \qquad z_{k+1} = f_\theta(z_k, u), \quad k = 0..K-1.

    Same parameter count as `ConvDEQClassifier` for any depth.

    Args:
      in_channels: input channels.
      channels: state channels.
      num_classes: number of classes.
      depth: `K`.
      rngs: random key source.
      hidden_channels: inner channels of the cell (default `channels`).
      num_groups: GroupNorm groups.
      init_scale: passed to `ConvCell`.

    Returns:
      Calling the model returns `(logits (B, num_classes), {"depth": K})`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.models import ConvUnrolledClassifier
      >>> model = ConvUnrolledClassifier(1, 16, 10, depth=4, rngs=nnx.Rngs(0))
      >>> print(model(jnp.ones((2, 8, 8, 1)))[0].shape)
      (2, 10)
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, depth: int = 6, *, rngs: nnx.Rngs,
                 hidden_channels: int | None = None, num_groups: int | None = None, init_scale: float = 0.1):
        self._init_io("ConvUnrolledClassifier", in_channels, channels, num_classes, rngs)
        _check_int("ConvUnrolledClassifier", "depth", depth)
        self.depth = depth
        self.cell = _conv_cell(channels, rngs, hidden_channels, num_groups, init_scale)

    def __call__(self, x):
        u = self._encode(x)
        z = self.cell.init_state(u)
        for _ in range(self.depth):
            z = self.cell(z, u)
        return self._readout(z), _depth_info(self.depth)


class ConvResNetClassifier(_ConvBase):
    r"""Explicit convolutional ResNet twin of `ConvDEQClassifier`: `depth` untied `ConvCell`\ s.

    .. math:: z_0 = 0, \qquad z_{k+1} = f_{\theta_k}(z_k, u), \quad k = 0..K-1.

    At equal `channels` it has about `K` times the DEQ's cell parameters;
    `ConvResNetClassifier.matched(target, ...)` picks the channel count closest to `target`.

    Args:
      in_channels: input channels.
      channels: state channels.
      num_classes: number of classes.
      depth: `K`, the number of residual cells.
      rngs: random key source.
      hidden_channels: inner channels of every cell (default `channels`).
      num_groups: GroupNorm groups.
      init_scale: passed to `ConvCell`.

    Returns:
      Calling the model returns `(logits (B, num_classes), {"depth": K})`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.models import ConvResNetClassifier
      >>> model = ConvResNetClassifier(1, 16, 10, depth=3, rngs=nnx.Rngs(0))
      >>> print(model(jnp.ones((2, 8, 8, 1)))[0].shape)
      (2, 10)
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, depth: int = 6, *, rngs: nnx.Rngs,
                 hidden_channels: int | None = None, num_groups: int | None = None, init_scale: float = 0.1):
        self._init_io("ConvResNetClassifier", in_channels, channels, num_classes, rngs)
        _check_int("ConvResNetClassifier", "depth", depth)
        self.depth = depth
        self.cells = nnx.List(
            [_conv_cell(channels, rngs, hidden_channels, num_groups, init_scale) for _ in range(depth)]
        )

    @classmethod
    def matched(cls, target_params: int, in_channels: int, num_classes: int, depth: int = 6, *,
                rngs: nnx.Rngs, multiple_of: int = 1, **kwargs) -> "ConvResNetClassifier":
        """The `ConvResNetClassifier` whose parameter count is closest to `target_params`.

        Args:
          target_params: the count to match, e.g. `count_params(conv_deq_model)`.
          in_channels: input channels.
          num_classes: number of classes.
          depth: number of residual cells.
          rngs: random key source.
          multiple_of: only consider channel counts that are multiples of this (e.g. the
            GroupNorm group count when `num_groups` is fixed).
          **kwargs: other constructor arguments (`num_groups`, `init_scale`).

        Returns:
          A `ConvResNetClassifier` with `matched_conv_resnet_channels(...)` channels.
        """
        channels = matched_conv_resnet_channels(target_params, in_channels, num_classes, depth,
                                                multiple_of=multiple_of, **kwargs)
        return cls(in_channels, channels, num_classes, depth, rngs=rngs, **kwargs)

    def __call__(self, x):
        u = self._encode(x)
        z = self.cells[0].init_state(u)
        for cell in self.cells:
            z = cell(z, u)
        return self._readout(z), _depth_info(self.depth)


class MultiscaleDEQClassifier(nnx.Module):
    r"""Multiscale DEQ classifier (MDEQ-style): conv stem -> DEQ(`MultiscaleCell`) -> head.

    .. math::
        u = \mathrm{Conv}_{3\times3}(x), \qquad (z_0^*, \dots, z_{n-1}^*) = f_\theta(z^*, u),
        \qquad \text{logits} = V \big[\mathrm{mean}_{h,w} z_0^*, \dots,
        \mathrm{mean}_{h,w} z_{n-1}^*\big] + c,

    i.e. every resolution is average-pooled and the pooled features are concatenated.

    Args:
      in_channels: input channels.
      channels: channels per resolution, finest first (2 or 3 entries).
      num_classes: number of classes.
      rngs: random key source.
      num_groups: GroupNorm groups (default gcd(c, 4) per resolution).
      solver: forward solver (default `deq.nn.models.default_solver()`).
      backward: backward strategy (default `deq.nn.models.default_backward()`).
      eval_solver: solver in eval mode; None uses `solver`.
      init_scale: passed to `MultiscaleCell`.

    Returns:
      Calling the model returns `(logits (B, num_classes), info)`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.models import MultiscaleDEQClassifier
      >>> model = MultiscaleDEQClassifier(1, (8, 16), 10, rngs=nnx.Rngs(0))
      >>> logits, info = model(jnp.ones((2, 8, 8, 1)))
      >>> print(logits.shape)
      (2, 10)

    References:
      Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models", NeurIPS 2020.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], num_classes: int, *, rngs: nnx.Rngs,
                 num_groups: int | None = None, solver=None, backward=None, eval_solver=None,
                 init_scale: float = 0.1):
        owner = "MultiscaleDEQClassifier"
        _check_int(owner, "in_channels", in_channels)
        _check_int(owner, "num_classes", num_classes)
        channels = tuple(channels)
        cell = MultiscaleCell(channels, rngs=rngs, num_groups=num_groups, init_scale=init_scale)
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        self.stem = nnx.Conv(in_channels, channels[0], (3, 3), rngs=rngs)
        self.deq = _make_deq(cell, solver, backward, eval_solver)
        self.head = nnx.Linear(sum(channels), num_classes, rngs=rngs)

    def __call__(self, x):
        u = self.stem(_check_image(type(self).__name__, x, self.in_channels))
        z, info = _solve(self.deq, u, type(self).__name__, x)
        pooled = jnp.concatenate([jnp.mean(zi, axis=(1, 2)) for zi in z], axis=-1)
        return self.head(pooled), info


# --------------------------------------------------------------------------------------------
# Sequence models.
# --------------------------------------------------------------------------------------------


class _DroppedBlock(nnx.Module):
    """A cell followed by a `VariationalDropout` on its output: `z -> drop(cell(z, x))`.

    The mask is shared over the positions (axis 1) and drawn once per forward pass
    (`deq.nn.DEQ` resamples it before each training-mode solve; explicit models call
    `resample_dropout` at the start of their `__call__`)."""

    def __init__(self, cell, rate: float, rngs: nnx.Rngs):
        from .dropout import VariationalDropout

        self.cell = cell
        self.drop = VariationalDropout(rate, rngs=rngs, broadcast_axes=(1,))

    def check_input(self, x, *, batched: bool = True):
        return self.cell.check_input(x, batched=batched)

    def init_state(self, x):
        return self.cell.init_state(x)

    def __call__(self, z, x):
        return self.drop(self.cell(z, x))


def _lm_block(owner, d_model, num_heads, rngs, mlp_ratio, init_scale, dropout):
    """The LM models' block: a causal `TransformerCell`, with variational dropout if `dropout > 0`."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{owner}: `dropout` must be a number in [0, 1), got {dropout!r}. Pass e.g. dropout=0.1.")
    cell = TransformerCell(d_model, num_heads, rngs=rngs, mlp_ratio=mlp_ratio, causal=True, init_scale=init_scale)
    return _DroppedBlock(cell, float(dropout), rngs) if dropout > 0 else cell


class _SequenceInput(nnx.Module):
    """Token checks and the injection `u = E[x] + P` shared by the sequence models."""

    def _inject(self, tokens):
        tokens = self._check_tokens(tokens)
        T = tokens.shape[1]
        if T > self.max_len:
            raise ValueError(
                f"{type(self).__name__}: `tokens` has sequence length {T} (shape {tuple(tokens.shape)}), "
                f"which exceeds max_len={self.max_len}; build the model with max_len>={T} or cut the sequences."
            )
        if self.vocab_size is not None:
            # Out-of-range ids would be clamped or wrapped (-1 reads the last row) by the lookup:
            # map them past the table, where the lookup returns NaN, so the solve reports
            # non-convergence instead of a plausible answer.
            bad = (tokens < 0) | (tokens >= self.vocab_size)
            tokens = jnp.where(bad, self.vocab_size, tokens)
        return tokens, self.embed(tokens) + self.pos[...][:T]

    def _check_tokens(self, tokens):
        owner = type(self).__name__
        if self.vocab_size is None:
            return check_input(
                owner, tokens, layout=f"(B, T, {self.in_features})", ndim=3, last=self.in_features,
                name="tokens", fix=f"Pass float features of shape (B, T, {self.in_features}) (e.g. bits[..., None]).",
            )
        fix = "For float features (B, T, F) build the model with vocab_size=None, in_features=F."
        tokens = check_input(owner, tokens, layout="(B, T)", ndim=2, dtype=None, name="tokens", fix=fix)
        if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
            raise TypeError(
                f"{owner}: `tokens` must be integer token ids in [0, vocab_size={self.vocab_size}) of shape "
                f"(B, T), got {jnp.dtype(jnp.result_type(tokens)).name}{list(jnp.shape(tokens))}. {fix}"
            )
        if not isinstance(tokens, jax.core.Tracer) and tokens.size:
            lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
            if lo < 0 or hi >= self.vocab_size:
                fix = ("remove the negative ids (padding or masks)" if lo < 0
                       else f"build the model with vocab_size>={hi + 1}")
                raise ValueError(
                    f"{owner}: `tokens` must be ids in [0, vocab_size={self.vocab_size}), got values in "
                    f"[{lo}, {hi}]. Encode the text with the model's vocabulary, or {fix}."
                )
        return jnp.asarray(tokens)

class TransformerDEQClassifier(_SequenceInput):
    r"""Transformer DEQ on sequences: embedding -> DEQ(`TransformerCell`) -> `Linear` head.

    .. math::
        u_t = E[x_t] + P_t, \qquad z^* = f_\theta(z^*, u), \qquad
        \text{logits}_t = V z_t^* + c,

    with learned token (`E`) and position (`P`) embeddings. Inputs are integer tokens `(B, T)`;
    with `vocab_size=None` and `in_features=F` they are float features `(B, T, F)` instead (e.g.
    the bits `(B, T, 1)` of `deq.data.make_prefix_parity`) and `E` is a `Linear(F, d_model)`. With `per_token=True` the logits are
    per position, `(B, T, num_classes)` (e.g. prefix parity, tagging); otherwise the sequence
    is pooled to `(B, num_classes)`: the mean over positions, or the last position when
    `causal=True` (the only one that has seen the whole sequence).

    Args:
      vocab_size: number of token ids (inputs are integers in `[0, vocab_size)`), or None for
        float feature inputs (then give `in_features`).
      d_model: model width (the DEQ state is `(B, T, d_model)`).
      num_heads: attention heads.
      num_classes: number of classes (per position or per sequence).
      rngs: random key source.
      max_len: longest sequence accepted (size of the position table).
      mlp_ratio: MLP expansion factor of the cell.
      causal: causal attention mask.
      per_token: per-position logits instead of a pooled sequence prediction.
      solver: forward solver (default `deq.nn.models.default_solver()`).
      backward: backward strategy (default `deq.nn.models.default_backward()`).
      eval_solver: solver in eval mode; None uses `solver`.
      in_features: feature size of float inputs, with `vocab_size=None`.
      init_scale: passed to `TransformerCell`.
      dropout: rate of a `deq.nn.VariationalDropout` on the cell's output (one mask per
        forward pass, shared by positions and solver steps; needs `causal=True`); 0 = none.

    Returns:
      Calling the model on int tokens `(B, T)` (or float features `(B, T, in_features)`) returns
      `(logits, info)`, logits `(B, num_classes)` or `(B, T, num_classes)` with `per_token=True`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.models import TransformerDEQClassifier
      >>> model = TransformerDEQClassifier(2, 16, 2, 2, max_len=12, rngs=nnx.Rngs(0),
      ...                                  causal=True, per_token=True)
      >>> logits, info = model(jnp.zeros((3, 10), jnp.int32))
      >>> print(logits.shape)
      (3, 10, 2)
      >>> bits = TransformerDEQClassifier(None, 16, 2, 2, in_features=1, max_len=12, rngs=nnx.Rngs(0))
      >>> print(bits(jnp.ones((3, 10, 1)))[0].shape)
      (3, 2)

    References:
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    def __init__(self, vocab_size: int | None, d_model: int, num_heads: int, num_classes: int, *,
                 rngs: nnx.Rngs, max_len: int = 512, mlp_ratio: int = 4, causal: bool = False,
                 per_token: bool = False, solver=None, backward=None, eval_solver=None,
                 in_features: int | None = None, init_scale: float = 0.1, dropout: float = 0.0):
        owner = type(self).__name__
        if (vocab_size is None) == (in_features is None):
            raise ValueError(
                f"{owner}: give exactly one of `vocab_size` (integer token inputs) and `in_features` "
                f"(float feature inputs, with vocab_size=None); got vocab_size={vocab_size!r}, "
                f"in_features={in_features!r}."
            )
        for name, v in (("vocab_size", vocab_size), ("in_features", in_features)):
            if v is not None:
                _check_int(owner, name, v)
        for name, v in (("d_model", d_model), ("num_classes", num_classes), ("max_len", max_len)):
            _check_int(owner, name, v)
        self.vocab_size, self.in_features = vocab_size, in_features
        self.d_model, self.num_classes, self.max_len = d_model, num_classes, max_len
        self.causal, self.per_token = bool(causal), bool(per_token)
        if vocab_size is not None:
            self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        else:
            self.embed = nnx.Linear(in_features, d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d_model)))
        if dropout and not causal:
            raise ValueError(f"{owner}: `dropout` is only supported with causal=True, got dropout={dropout!r}.")
        if dropout:
            cell = _lm_block(owner, d_model, num_heads, rngs, mlp_ratio, init_scale, dropout)
        else:
            cell = TransformerCell(d_model, num_heads, rngs=rngs, mlp_ratio=mlp_ratio, causal=causal,
                                   init_scale=init_scale)
        self.deq = _make_deq(cell, solver, backward, eval_solver)
        self.head = nnx.Linear(d_model, num_classes, rngs=rngs)

    def __call__(self, tokens):
        tokens, u = self._inject(tokens)
        z, info = _solve(self.deq, u, type(self).__name__, tokens)
        if not self.per_token:
            z = z[:, -1] if self.causal else jnp.mean(z, axis=1)
        return self.head(z), info


class TransformerDEQLM(TransformerDEQClassifier):
    r"""Causal transformer DEQ language model: next-token logits at every position.

    A `TransformerDEQClassifier` with `causal=True`, `per_token=True` and
    `num_classes=vocab_size`: logits `(B, T, vocab_size)`, position `t` predicting token `t+1`.

    Causal up to the solver's tolerance only: the cell is causal, and so is its exact fixed
    point, but Anderson and Broyden compute one set of mixing weights and one stopping test per
    sequence, so an iterate at position `s` depends on later tokens by about the solve's
    residual (measured: at `rtol=1e-3`, changing token 32 moved earlier logits by up to 0.025,
    later ones by 3.7; below 1e-6 at a tolerance of 1e-11). The stopping step itself depends
    on the whole sequence too. Where exact causality matters, solve tightly, or use
    `deq.FixedPointIteration(rtol=0, atol=0, max_steps=k)`: a fixed budget of plain steps, each
    causal, is exactly causal.

    Args:
      vocab_size: number of token ids.
      d_model: model width.
      num_heads: attention heads.
      rngs: random key source.
      max_len: longest sequence accepted.
      mlp_ratio: MLP expansion factor of the cell.
      solver: forward solver (default `deq.nn.models.default_solver()`).
      backward: backward strategy (default `deq.nn.models.default_backward()`).
      eval_solver: solver in eval mode; None uses `solver`.
      init_scale: passed to `TransformerCell`.
      dropout: rate of a `deq.nn.VariationalDropout` on the cell's output (one mask per
        forward pass, shared by positions and solver steps); 0 = none.

    Returns:
      Calling the model on int tokens `(B, T)` returns `(logits (B, T, vocab_size), info)`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.models import TransformerDEQLM
      >>> lm = TransformerDEQLM(30, 16, 2, max_len=32, rngs=nnx.Rngs(0))
      >>> logits, info = lm(jnp.zeros((2, 8), jnp.int32))
      >>> print(logits.shape)
      (2, 8, 30)

    References:
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    def __init__(self, vocab_size: int, d_model: int, num_heads: int, *, rngs: nnx.Rngs, max_len: int = 512,
                 mlp_ratio: int = 4, solver=None, backward=None, eval_solver=None, init_scale: float = 0.1,
                 dropout: float = 0.0):
        _check_int("TransformerDEQLM", "vocab_size", vocab_size)
        super().__init__(vocab_size, d_model, num_heads, vocab_size, rngs=rngs, max_len=max_len,
                         mlp_ratio=mlp_ratio, causal=True, per_token=True, solver=solver,
                         backward=backward, eval_solver=eval_solver, init_scale=init_scale, dropout=dropout)


class _ExplicitLM(_SequenceInput):
    """Embedding, position table and head of the explicit LMs (the DEQ LM's, same shapes)."""

    def _init_io(self, owner, vocab_size, d_model, num_heads, depth, max_len, rngs):
        for name, v in (("vocab_size", vocab_size), ("d_model", d_model), ("num_heads", num_heads),
                        ("depth", depth), ("max_len", max_len)):
            _check_int(owner, name, v)
        self.vocab_size, self.in_features, self.d_model = vocab_size, None, d_model
        self.num_classes, self.max_len, self.depth = vocab_size, max_len, depth
        self.causal, self.per_token = True, True
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d_model)))

    def __call__(self, tokens):
        from .dropout import resample_dropout

        _, u = self._inject(tokens)
        check_nonempty_batch(type(self).__name__, u)
        resample_dropout(self)  # one mask per forward pass (a no-op in eval mode)
        z = jnp.zeros_like(u)
        for block in self._blocks():
            z = block(z, u)
        return self.head(z), _depth_info(self.depth)


class UnrolledTransformerLM(_ExplicitLM):
    r"""The DEQ language model's weight-tied twin: the same block applied `depth` times.

    .. math::
        u_t = E[x_t] + P_t, \qquad z^{(0)} = 0, \qquad z^{(k+1)} = f_\theta(z^{(k)}, u), \qquad
        \text{logits}_t = V z_t^{(K)} + c,

    with `f_theta` the causal `TransformerCell` of `TransformerDEQLM` and one set of weights
    for all `K = depth` applications, trained by ordinary backprop (memory linear in `K`). It
    has exactly the DEQ LM's parameters and structure (`embed`, `pos`, the cell, `head`), so a
    DEQ LM's state can be loaded into it: the twin is the DEQ solved by `K` steps of
    fixed-point iteration from zero.

    Args:
      vocab_size: number of token ids.
      d_model: model width.
      num_heads: attention heads.
      depth: applications `K` of the block.
      rngs: random key source.
      max_len: longest sequence accepted.
      mlp_ratio: MLP expansion factor of the block.
      init_scale: passed to `TransformerCell`.
      dropout: rate of a `deq.nn.VariationalDropout` on the block's output, one mask per
        forward pass shared by all `K` applications and positions; 0 = none.

    Returns:
      Calling the model on int tokens `(B, T)` returns `(logits (B, T, vocab_size), {"depth": K})`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.models import TransformerDEQLM, UnrolledTransformerLM, count_params
      >>> twin = UnrolledTransformerLM(30, 16, 2, depth=4, max_len=32, rngs=nnx.Rngs(0))
      >>> print(twin(jnp.zeros((2, 8), jnp.int32))[0].shape)
      (2, 8, 30)
      >>> count_params(twin) == count_params(TransformerDEQLM(30, 16, 2, max_len=32, rngs=nnx.Rngs(0)))
      True

    References:
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019 (the weight-tied baseline).
      Dehghani et al., "Universal Transformers", ICLR 2019.
    """

    def __init__(self, vocab_size: int, d_model: int, num_heads: int, depth: int = 6, *, rngs: nnx.Rngs,
                 max_len: int = 512, mlp_ratio: int = 4, init_scale: float = 0.1, dropout: float = 0.0):
        owner = "UnrolledTransformerLM"
        self._init_io(owner, vocab_size, d_model, num_heads, depth, max_len, rngs)
        self.cell = _lm_block(owner, d_model, num_heads, rngs, mlp_ratio, init_scale, dropout)
        self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

    def _blocks(self):
        return [self.cell] * self.depth


class TransformerLM(_ExplicitLM):
    r"""An explicit causal Transformer LM: `depth` untied copies of the DEQ LM's block.

    .. math::
        u_t = E[x_t] + P_t, \qquad z^{(0)} = 0, \qquad z^{(k+1)} = f_{\theta_k}(z^{(k)}, u), \qquad
        \text{logits}_t = V z_t^{(K)} + c,

    each `f_{theta_k}` a causal `TransformerCell` (pre-LN, input injection, causal attention)
    with its own weights. At equal width it has about `depth` times the DEQ's block
    parameters; `TransformerLM.matched(count_params(deq_lm), ...)` builds the width (a
    multiple of `num_heads`) whose count is closest to the DEQ's.

    Args:
      vocab_size: number of token ids.
      d_model: model width.
      num_heads: attention heads.
      depth: number of blocks `K`.
      rngs: random key source.
      max_len: longest sequence accepted.
      mlp_ratio: MLP expansion factor of the blocks.
      init_scale: passed to each `TransformerCell`.
      dropout: rate of a `deq.nn.VariationalDropout` on each block's output (one mask per
        block and forward pass, shared by positions); 0 = none.

    Returns:
      Calling the model on int tokens `(B, T)` returns `(logits (B, T, vocab_size), {"depth": K})`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.nn.models import TransformerDEQLM, TransformerLM, count_params
      >>> target = count_params(TransformerDEQLM(30, 32, 2, max_len=32, rngs=nnx.Rngs(0)))
      >>> lm = TransformerLM.matched(target, 30, 2, depth=4, max_len=32, rngs=nnx.Rngs(0))
      >>> print(lm.d_model, lm(jnp.zeros((2, 8), jnp.int32))[0].shape)
      16 (2, 8, 30)

    References:
      Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    def __init__(self, vocab_size: int, d_model: int, num_heads: int, depth: int = 6, *, rngs: nnx.Rngs,
                 max_len: int = 512, mlp_ratio: int = 4, init_scale: float = 0.1, dropout: float = 0.0):
        owner = "TransformerLM"
        self._init_io(owner, vocab_size, d_model, num_heads, depth, max_len, rngs)
        self.blocks = nnx.List([_lm_block(owner, d_model, num_heads, rngs, mlp_ratio, init_scale, dropout)
                                for _ in range(depth)])
        self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

    def _blocks(self):
        return list(self.blocks)

    @classmethod
    def matched(cls, target_params: int, vocab_size: int, num_heads: int, depth: int = 6, *, rngs: nnx.Rngs,
                **kwargs) -> "TransformerLM":
        """A `TransformerLM` whose width (a multiple of `num_heads`) gives the parameter count
        closest to `target_params` (see `matched_transformer_width`).

        Args:
          target_params: the count to match, e.g. `count_params(deq_lm)`.
          vocab_size: number of token ids.
          num_heads: attention heads.
          depth: number of blocks.
          rngs: random key source.
          **kwargs: other constructor arguments (`max_len`, `mlp_ratio`, `init_scale`, `dropout`).

        Returns:
          The model.
        """
        d = matched_transformer_width(target_params, vocab_size, num_heads, depth, **kwargs)
        return cls(vocab_size, d, num_heads, depth, rngs=rngs, **kwargs)


# --------------------------------------------------------------------------------------------
# Parameter counting and matching.
# --------------------------------------------------------------------------------------------


def count_params(model: nnx.Module) -> int:
    """The number of trainable scalars (`nnx.Param` entries) of `model`.

    Works on abstract models from `nnx.eval_shape` too.

    Args:
      model: an `nnx.Module`.

    Returns:
      The total size of its `nnx.Param` variables.

    Example:
      >>> from flax import nnx
      >>> from deq.nn.models import count_params
      >>> count_params(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
      16
    """
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    return int(sum(math.prod(jnp.shape(l)) for l in leaves))


def param_table(models: Mapping[str, nnx.Module], reference: str | None = None) -> str:
    """A text table of parameter counts, with each model's ratio to a reference model.

    Args:
      models: name -> model (insertion order is kept).
      reference: the name the ratios are relative to (default: the first model).

    Returns:
      The table as a string (print it).

    Example:
      >>> from flax import nnx
      >>> from deq.nn.models import param_table
      >>> print(param_table({"small": nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
      ...                    "big": nnx.Linear(6, 4, rngs=nnx.Rngs(0))}))
      model  params  vs small
      small      16     1.00x
      big        28     1.75x
    """
    if not models:
        raise ValueError("param_table: `models` is empty; pass a dict name -> model.")
    names = list(models)
    reference = names[0] if reference is None else reference
    if reference not in models:
        raise ValueError(f"param_table: `reference`={reference!r} is not one of {names}.")
    counts = {n: count_params(m) for n, m in models.items()}
    ref = counts[reference]
    rows = [(n, f"{c:,}", f"{c / ref:.2f}x" if ref else "-") for n, c in counts.items()]
    head = ("model", "params", f"vs {reference}")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    fmt = lambda r: f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}"
    return "\n".join([fmt(head)] + [fmt(r) for r in rows])


def matched_width(build: Callable[[int], nnx.Module], target_params: int, *, lo: int = 1, hi: int = 4096,
                  multiple_of: int = 1) -> int:
    """The width `w` (a multiple of `multiple_of` in `[lo, hi]`) with `count_params(build(w))`
    closest to `target_params`.

    Models are built abstractly (`nnx.eval_shape`, no parameter memory). The count must grow
    with the width. A quadratic through the counts at the three smallest widths gives a first
    guess (exact for the layers here, whose counts are quadratic in the width), and a walk from
    it finds the answer, so only a handful of models are built.

    Args:
      build: `w -> model`, e.g. `lambda w: ResNetClassifier(64, w, 10, 6, rngs=nnx.Rngs(0))`.
      target_params: the parameter count to match.
      lo: smallest width considered.
      hi: largest width considered.
      multiple_of: only widths that are multiples of this.

    Returns:
      The best width (ties go to the smaller width).

    Example:
      >>> from flax import nnx
      >>> from deq.nn.models import matched_width
      >>> matched_width(lambda w: nnx.Linear(10, w, rngs=nnx.Rngs(0)), 100)
      9
    """
    _check_int("matched_width", "target_params", target_params)
    _check_int("matched_width", "multiple_of", multiple_of)
    lo_k = max(1, -(-lo // multiple_of))
    hi_k = hi // multiple_of
    if hi_k < lo_k:
        raise ValueError(f"matched_width: no multiple of {multiple_of} in [{lo}, {hi}].")
    cache: dict[int, int] = {}

    def count(k):
        if k not in cache:
            cache[k] = count_params(nnx.eval_shape(lambda: build(k * multiple_of)))
        return cache[k]

    # First guess: the quadratic through three small widths, solved for the target.
    ks = [k for k in (lo_k, lo_k + 1, lo_k + 2) if k <= hi_k]
    k = lo_k
    if len(ks) == 3:
        c0, c1, c2 = (count(k) for k in ks)
        a = (c2 - 2 * c1 + c0) / 2.0
        b = (c1 - c0) - a * (2 * lo_k + 1)
        c = c0 - a * lo_k**2 - b * lo_k
        if a > 0:
            disc = b * b - 4 * a * (c - target_params)
            guess = (-b + math.sqrt(max(disc, 0.0))) / (2 * a)
        else:
            guess = (target_params - c) / b if b > 0 else lo_k
        k = int(min(max(round(guess), lo_k), hi_k))
    # Walk to the largest k with count(k) <= target (or lo_k), then pick the closer neighbour.
    while k < hi_k and count(k + 1) <= target_params:
        k += 1
    while k > lo_k and count(k) > target_params:
        k -= 1
    best = min((j for j in (k, k + 1) if j <= hi_k), key=lambda j: (abs(count(j) - target_params), j))
    return best * multiple_of


def matched_resnet_hidden(target_params: int, in_features: int, num_classes: int, depth: int, **kwargs) -> int:
    """The `ResNetClassifier` width whose parameter count is closest to `target_params`.

    Typically `target_params = count_params(deq_model)`: an untied ResNet with `depth` cells
    then has about the DEQ's parameters at a smaller width.

    Args:
      target_params: the count to match.
      in_features: input features.
      num_classes: number of classes.
      depth: number of residual cells.
      **kwargs: other `ResNetClassifier` arguments (`use_norm`, `init_scale`).

    Returns:
      The width `hidden`.

    Example:
      >>> from flax import nnx
      >>> from deq.nn.models import DEQClassifier, count_params, matched_resnet_hidden
      >>> target = count_params(DEQClassifier(64, 64, 10, rngs=nnx.Rngs(0)))
      >>> h = matched_resnet_hidden(target, 64, 10, depth=6)
      >>> print(target, h)
      13642 29
    """
    if "cell_hidden" in kwargs:
        raise ValueError("matched_resnet_hidden: `cell_hidden` is not supported (the inner width follows `hidden`).")
    return matched_width(
        lambda w: ResNetClassifier(in_features, w, num_classes, depth, rngs=nnx.Rngs(0), **kwargs), target_params
    )


def matched_conv_resnet_channels(target_params: int, in_channels: int, num_classes: int, depth: int, *,
                                 multiple_of: int = 1, **kwargs) -> int:
    """The `ConvResNetClassifier` channel count whose parameter count is closest to `target_params`.

    Args:
      target_params: the count to match, e.g. `count_params(conv_deq_model)`.
      in_channels: input channels.
      num_classes: number of classes.
      depth: number of residual cells.
      multiple_of: only channel counts that are multiples of this.
      **kwargs: other `ConvResNetClassifier` arguments (`num_groups`, `init_scale`).

    Returns:
      The channel count.

    Example:
      >>> from flax import nnx
      >>> from deq.nn.models import ConvDEQClassifier, count_params, matched_conv_resnet_channels
      >>> target = count_params(ConvDEQClassifier(1, 32, 10, rngs=nnx.Rngs(0)))
      >>> print(target, matched_conv_resnet_channels(target, 1, 10, depth=4))
      19338 16
    """
    if "hidden_channels" in kwargs:
        raise ValueError(
            "matched_conv_resnet_channels: `hidden_channels` is not supported (the inner width follows `channels`)."
        )
    return matched_width(
        lambda c: ConvResNetClassifier(in_channels, c, num_classes, depth, rngs=nnx.Rngs(0), **kwargs),
        target_params, multiple_of=multiple_of, hi=1024,
    )


def matched_transformer_width(target_params: int, vocab_size: int, num_heads: int, depth: int, **kwargs) -> int:
    """The `TransformerLM` width (a multiple of `num_heads`) with the parameter count closest to
    `target_params`.

    Args:
      target_params: the count to match, e.g. `count_params(TransformerDEQLM(...))`.
      vocab_size: number of token ids.
      num_heads: attention heads (the width is a multiple of it).
      depth: number of blocks.
      **kwargs: other `TransformerLM` arguments (`max_len`, `mlp_ratio`).

    Returns:
      The width `d_model`.

    Example:
      >>> from flax import nnx
      >>> from deq.nn.models import TransformerDEQLM, count_params, matched_transformer_width
      >>> target = count_params(TransformerDEQLM(98, 64, 4, max_len=128, rngs=nnx.Rngs(0)))
      >>> print(target, matched_transformer_width(target, 98, 4, depth=4, max_len=128))
      70946 36
    """
    _check_int("matched_transformer_width", "num_heads", num_heads)
    return matched_width(
        lambda w: TransformerLM(vocab_size, w, num_heads, depth, rngs=nnx.Rngs(0), **kwargs), target_params,
        multiple_of=num_heads,
    )


# `inspect.signature` and `help` of every module class above show its real arguments.
from .cells import _show_init_signatures  # noqa: E402

_show_init_signatures(globals(), __name__)
