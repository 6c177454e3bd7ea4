"""Packing a pytree state into a `(B, n)` matrix: one row per independent problem.

Solvers only ever see `(B, n)` arrays in a compute dtype of at least float32; `f` only ever
sees pytrees in their original dtypes. With `batch_axis=None` the whole state is one problem
(`B = 1`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Packer:
    treedef: Any
    shapes: tuple  # per-sample shapes of each leaf
    dtypes: tuple
    batch: Optional[int]  # None when unbatched
    dtype: Any  # compute dtype

    @property
    def sizes(self) -> tuple:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def rows(self) -> int:
        return 1 if self.batch is None else self.batch

    def pack(self, tree) -> jax.Array:
        leaves = jax.tree_util.tree_leaves(tree)
        flat = [jnp.reshape(leaf, (self.rows, -1)).astype(self.dtype) for leaf in leaves]
        return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=1)

    def unpack(self, x: jax.Array):
        splits = np.cumsum(self.sizes)[:-1].tolist()
        parts = jnp.split(x, splits, axis=1) if splits else [x]
        lead = () if self.batch is None else (self.batch,)
        leaves = [p.reshape(lead + s).astype(d) for p, s, d in zip(parts, self.shapes, self.dtypes)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def compute_dtype(dtypes) -> Any:
    """The dtype solver arithmetic runs in: the widest leaf dtype, at least float32."""
    return jnp.result_type(jnp.float32, *dtypes)


def make_packer(z0, batch_axis: Optional[int]) -> Packer:
    leaves, treedef = jax.tree_util.tree_flatten(z0)
    dtypes = tuple(jnp.result_type(leaf) for leaf in leaves)
    if batch_axis is None:
        shapes = tuple(tuple(jnp.shape(leaf)) for leaf in leaves)
        batch = None
    else:
        batch = jnp.shape(leaves[0])[0]
        shapes = tuple(tuple(jnp.shape(leaf)[1:]) for leaf in leaves)
    return Packer(treedef, shapes, dtypes, batch, compute_dtype(dtypes))


def row_norm(x: jax.Array) -> jax.Array:
    """l2 norm of each row of a `(B, n)` array."""
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=1))


def where_rows(mask: jax.Array, new, old):
    """Row-wise select over a pytree whose leaves all have leading axis `B`."""

    def sel(a, b):
        m = jnp.reshape(mask, mask.shape + (1,) * (jnp.ndim(a) - 1))
        return jnp.where(m, a, b)

    return jax.tree_util.tree_map(sel, new, old)
