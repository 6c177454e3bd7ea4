"""Input checks shared by the layers, cells and models of `deq.nn`, `deq.linen` and `deq.monotone`.

Every check runs at trace time (it reads shapes and dtypes only) and raises a `ValueError` or
`TypeError` naming the owner, the argument, what was expected, what was got and the fix, before
the input reaches a raw XLA error (`dot_general requires contracting dimensions ...`) or the
solver's packing code.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

_Ranks = Union[int, Sequence[int], None]


def describe(x) -> str:
    """`float32[5, 8]` for an array; the leaves joined by ', ' for a pytree."""
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves:
        return "an empty pytree"
    return ", ".join(_describe_leaf(l) for l in leaves)


def _describe_leaf(a) -> str:
    try:
        return f"{jnp.dtype(jnp.result_type(a)).name}{list(jnp.shape(a))}"
    except TypeError:
        return type(a).__name__


def _as_array(owner: str, name: str, x, layout: str):
    """`x` if it is an array (or a tracer), a numpy-convertible value as an array, else a TypeError."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return x
    try:
        return jnp.asarray(x)
    except TypeError:
        raise TypeError(
            f"{owner}: `{name}` must be an array shaped {layout}, got {type(x).__name__}. "
            f"Pass a jax or numpy array, e.g. {name}=jnp.asarray(...)."
        ) from None


def check_input(
    owner: str,
    x,
    *,
    layout: str,
    ndim: _Ranks = None,
    min_ndim: Optional[int] = None,
    last: Optional[int] = None,
    last_name: str = "in_features",
    dtype: Optional[str] = "floating",
    name: str = "x",
    fix: str = "",
):
    """Check the rank, the trailing size and the dtype kind of an array input; return it as an array.

    Args:
      owner: the layer or model named at the start of the message, e.g. "DenseCell".
      x: the input.
      layout: the expected shape in words, e.g. "(batch, 8)".
      ndim: the allowed rank(s), or None.
      min_ndim: the smallest allowed rank, or None.
      last: the expected size of the last axis, or None.
      last_name: the constructor argument that sets `last`, e.g. "in_features".
      dtype: "floating", "integer", or None (any).
      name: the argument's name in the message.
      fix: how to fix a wrong shape (appended to the shape messages).

    Raises:
      ValueError: wrong rank or wrong last axis.
      TypeError: not an array, or the wrong dtype kind.
    """
    x = _as_array(owner, name, x, layout)
    got = _describe_leaf(x)
    shape = jnp.shape(x)
    fix = f" {fix}" if fix else ""
    ranks = (ndim,) if isinstance(ndim, int) else (tuple(ndim) if ndim is not None else None)
    if (ranks is not None and len(shape) not in ranks) or (min_ndim is not None and len(shape) < min_ndim):
        if ranks is not None:
            want = " or ".join(str(r) for r in ranks)
        else:
            want = f"at least {min_ndim}"
        raise ValueError(
            f"{owner}: `{name}` must be shaped {layout} ({want} axes), got {got} "
            f"({len(shape)} axes).{fix}"
        )
    if last is not None and (not shape or shape[-1] != last):
        raise ValueError(
            f"{owner}: `{name}` must have a last axis of size {last_name}={last}, i.e. be shaped "
            f"{layout}, got {got}.{fix}"
        )
    kind = jnp.result_type(x)
    if dtype == "floating" and not jnp.issubdtype(kind, jnp.floating):
        raise TypeError(
            f"{owner}: `{name}` must be floating point (real), got {got}. Cast it, e.g. "
            f"{name}.astype(jnp.float32) (scale integer pixels to [0, 1] first, e.g. / 255)."
        )
    if dtype == "integer" and not jnp.issubdtype(kind, jnp.integer):
        raise TypeError(
            f"{owner}: `{name}` must hold integer ids, got {got}. Pass ids as integers, e.g. "
            f"{name}.astype(jnp.int32)."
        )
    return x


def flatten_input(owner: str, x, in_features: int):
    """`x` reshaped to `(batch, in_features)` after checking it has that many entries per sample."""
    x = _as_array(owner, "x", x, f"(batch, {in_features})")
    if jnp.ndim(x) < 1:
        raise ValueError(
            f"{owner}: `x` must have a leading batch axis, shaped (batch, {in_features}) or (batch, ...) "
            f"with {in_features} entries per sample, got {_describe_leaf(x)}. Pass x[None] for one sample."
        )
    per_sample = math.prod(jnp.shape(x)[1:])
    if per_sample != in_features:
        raise ValueError(
            f"{owner}: `x` must have in_features={in_features} features per sample (after "
            f"flattening its non-batch axes), got {_describe_leaf(x)} ({per_sample} features). Pass x "
            f"shaped (batch, {in_features}), or build the model with in_features={per_sample}."
        )
    check_input(owner, x, layout=f"(batch, {in_features})")
    return jnp.reshape(x, (jnp.shape(x)[0], per_sample))


def check_nonempty_batch(owner: str, x, z0=None, name: str = "x") -> None:
    """Refuse a batch of zero samples (axis 0 of size 0) before it reaches the solver."""
    for tree, tree_name in ((x, name), (z0, "z0")):
        for leaf in jax.tree_util.tree_leaves(tree):
            shape = jnp.shape(leaf)
            if shape and shape[0] == 0:
                raise ValueError(
                    f"{owner}: `{tree_name}` holds an empty batch ({describe(tree)}, axis 0 of size "
                    "0); a fixed-point solve needs at least one sample. Skip empty batches before "
                    "calling the layer (e.g. `if x.shape[0]: ...`)."
                )


def check_state_like(owner: str, z0, expected, what: str) -> None:
    """Raise if `z0` is not shaped like `expected` (a pytree of arrays or ShapeDtypeStructs)."""
    same_tree = jax.tree_util.tree_structure(z0) == jax.tree_util.tree_structure(expected)
    shapes = [tuple(jnp.shape(l)) for l in jax.tree_util.tree_leaves(z0)]
    want = [tuple(jnp.shape(l)) for l in jax.tree_util.tree_leaves(expected)]
    if not same_tree or shapes != want:
        raise ValueError(
            f"{owner}: the given `z0` ({describe(z0)}) does not match the {what} "
            f"({describe(expected)}). Pass z0 shaped like the layer's output for this x (e.g. the "
            "fixed point of a previous call, as a warm start), or omit z0."
        )
