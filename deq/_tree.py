"""Packing a pytree state into a `(B, n)` matrix: one row per independent problem.

Solvers only ever see `(B, n)` arrays in the solver dtype (by default the widest leaf dtype, at
least float32; `fixed_point(..., solver_dtype=...)` names another); `f` only ever sees pytrees in
their original dtypes. With `batch_axis=None` the whole state is one problem
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


def check_solver_dtype(owner: str, solver_dtype) -> Any:
    """Validate a user-named solver dtype; return it as a `jnp.dtype` (None stays None)."""
    if solver_dtype is None:
        return None
    try:
        dt = jnp.dtype(solver_dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        got = repr(solver_dtype) if dt is None else dt.name
        raise TypeError(
            f"{owner}: `solver_dtype` (the dtype of the solver's state, histories and stopping test) "
            f"must be a real floating dtype, got {got}. Pass e.g. solver_dtype=jnp.float32, or None for "
            f"the widest dtype of the state's leaves (at least float32)."
        )
    if jax.dtypes.canonicalize_dtype(dt) != dt:
        raise ValueError(
            f"{owner}: `solver_dtype={dt.name}` needs 64-bit mode, which is off (JAX would silently "
            f"compute in {jax.dtypes.canonicalize_dtype(dt).name}). Enable it with "
            f"jax.config.update('jax_enable_x64', True), or pass solver_dtype=jnp.float32."
        )
    return dt


def make_packer(z0, batch_axis: Optional[int], dtype=None) -> Packer:
    """The packer of `z0`'s structure; `dtype` (None: `compute_dtype` of its leaves) is the solver's."""
    leaves, treedef = jax.tree_util.tree_flatten(z0)
    dtypes = tuple(jnp.result_type(leaf) for leaf in leaves)
    if batch_axis is None:
        shapes = tuple(tuple(jnp.shape(leaf)) for leaf in leaves)
        batch = None
    else:
        batch = jnp.shape(leaves[0])[0]
        shapes = tuple(tuple(jnp.shape(leaf)[1:]) for leaf in leaves)
    return Packer(treedef, shapes, dtypes, batch, compute_dtype(dtypes) if dtype is None else dtype)


def _scaled_row_norm(x: jax.Array) -> jax.Array:
    """`row_norm` by scaling each row by a power of two near its largest magnitude (slow path)."""
    info = jnp.finfo(x.dtype)
    m = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=1))
    ok = (m > 0) & jnp.isfinite(m)
    # Scale by a power of two near 1/m: exact, and (clipped) never a subnormal number, which
    # the CPU would flush to zero (XLA turns `x / m` into `x * (1 / m)`, so dividing is unsafe).
    _, e = jnp.frexp(jnp.where(ok, m, 1.0))
    e = jnp.clip(e, info.minexp + 2, info.maxexp - 2)
    s = jnp.sum(jnp.square(x * jnp.ldexp(jnp.ones_like(m), -e)[:, None]), axis=1)
    # sqrt has no derivative at 0: guard it so an all-zero row differentiates to 0, not NaN.
    pos = ok & (s > 0)
    norm = jnp.where(pos, jnp.ldexp(jnp.sqrt(jnp.where(pos, s, 1.0)), e), 0.0)
    norm = jnp.minimum(norm, info.max)
    # A row with a NaN or inf entry has m = NaN or inf: that is its norm, as it should be.
    return jnp.where(ok | (m == 0), norm, m)


def row_norm(x: jax.Array) -> jax.Array:
    """l2 norm of each row of a `(B, n)` array, free of overflow and underflow.

    The norm of a row of finite numbers is finite (up to the dtype's largest value) however
    large or small they are: `||(1e30, 1e30)||` in float32 is `1.4e30`, not `inf`. A row holding
    NaN or inf gets a NaN or inf norm; an all-zero row has norm 0 and derivative 0.

    The plain sum of squares is used where it is safe (one fused reduction, the usual case);
    only when some row's sum overflowed or fell into the range where squares lose precision
    are the rows recomputed by scaling them by a power of two (`lax.cond`, so the usual
    path costs nothing more). `row_norms` does several arrays under one condition.
    """
    return row_norms(x)[0]


def row_norms(*xs: jax.Array) -> tuple:
    """`row_norm` of each argument, with one `lax.cond` for the slow path of all of them."""
    xs = [jnp.asarray(x) for x in xs]
    sums, unsafe, plain = [], [], []
    for x in xs:
        info = jnp.finfo(x.dtype)
        s = jnp.sum(jnp.square(x), axis=1)
        # Squares of magnitudes below sqrt(tiny) underflow (to zero, on a CPU that flushes
        # subnormals): redo every row whose sum is that small, exact zeros included, or overflowed.
        unsafe.append(~(s < info.max) | (s < float(info.tiny) ** 0.5))
        plain.append(jnp.where(s > 0, jnp.sqrt(jnp.where(s > 0, s, 1.0)), jnp.where(jnp.isnan(s), s, 0.0)))
    any_unsafe = jnp.any(jnp.stack([jnp.any(u) for u in unsafe]))

    def slow():
        # The barrier keeps XLA from constant-folding this branch when x is a constant (a zero
        # initial state inside jit): folding a (256, 8192) zero state's scaled norm took 5 s of
        # compile time (a "slow_operation_alarm") for a reduction that costs microseconds at run time.
        ys = jax.lax.optimization_barrier(xs)
        return tuple(jnp.where(u, _scaled_row_norm(y), p) for y, u, p in zip(ys, unsafe, plain))

    return jax.lax.cond(any_unsafe, slow, lambda: tuple(plain))


def where_rows(mask: jax.Array, new, old):
    """Row-wise select over a pytree whose leaves all have leading axis `B`."""

    def sel(a, b):
        m = jnp.reshape(mask, mask.shape + (1,) * (jnp.ndim(a) - 1))
        return jnp.where(m, a, b)

    return jax.tree_util.tree_map(sel, new, old)
