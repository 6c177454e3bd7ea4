r"""Interoperability: plug jaxopt's fixed-point solvers into `deq.fixed_point`.

`JaxoptSolver(jaxopt.AndersonAcceleration, history_size=5)` is a deq solver (an
`AbstractSolver`) that runs a jaxopt fixed-point solver's public `init_state` / `update` inside
deq's driver loop. Everything else stays deq's: the stopping test, per-sample stopping with
`batch_axis=0`, best-iterate tracking, statistics and the backward strategy (`deq.IFT()` by
default; jaxopt's own implicit differentiation is not used). deq's own solvers stay the
default and are usually faster (see the cost note on `JaxoptSolver`).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any

import jax
import jax.numpy as jnp

from ._api import check_tolerances
from ._tree import where_rows
from .solvers import AbstractSolver

__all__ = ["JaxoptSolver"]

# Options of jaxopt solvers that deq decides itself.
_RESERVED = {
    "fixed_point_fun": "deq supplies the fixed-point map itself",
    "maxiter": "deq's driver loop stops the solve: pass max_steps=... to JaxoptSolver instead",
    "tol": "deq's stopping test is ||f(z) - z|| <= atol + rtol ||f(z)||: pass rtol=/atol= to JaxoptSolver",
    "has_aux": "deq's cells return the state only (no auxiliary output)",
    "implicit_diff": "differentiation is chosen by deq.fixed_point's `backward` argument (deq.IFT() by default)",
    "implicit_diff_solve": "differentiation is chosen by deq.fixed_point's `backward` argument, e.g. deq.IFT(solver=...)",
}


def _row_map(F, x):
    """A per-row view `(p, x, fx) -> F(p)` of the row-wise packed map `F: (B, n) -> (B, n)`.

    `p`, `x`, `fx` may be in a wider dtype than `x` (jaxopt's working dtype, see `_work_dtype`):
    `F` is evaluated in the state's dtype and its value cast back.

    jaxopt works on one sample's vector, so its `init_state`/`update` are `vmap`ped over the
    rows of the batch. `F` cannot be applied to one row (it unpacks to a fixed batch size), so
    this function has a custom batching rule that evaluates `F` once on the whole `(B, n)`
    batch. When jaxopt asks for `F` at exactly the current iterate of every row (whose value
    the driver already has), the evaluation is skipped. Values `F` closes over are passed
    explicitly (`jax.closure_convert`), as `custom_vmap` requires.

    Returns `(row, consts)`: jaxopt calls `row(p, x, fx, *consts)` for one row.
    """
    F_conv, consts = jax.closure_convert(F, x)
    dtype = x.dtype

    def apply(p, x, fx, consts):
        hit = jnp.all(p == x)
        return jax.lax.cond(hit, lambda: fx, lambda: F_conv(p.astype(dtype), *consts).astype(fx.dtype))

    rows = x.shape[0]

    @jax.custom_batching.custom_vmap
    def row(p, x, fx, *consts):
        # Unbatched: only traced for its output shape (JaxoptSolver always vmaps over the
        # rows, which goes through `_rule`); `F` takes all `rows` rows, so with more than one
        # the value at the current iterate stands in.
        if rows == 1:
            return apply(p[None], x[None], fx[None], consts)[0]
        return fx

    @row.def_vmap
    def _rule(axis_size, in_batched, p, x, fx, *consts):
        if any(in_batched[3:]):
            raise NotImplementedError(
                "deq.JaxoptSolver: the fixed-point map's closed-over values are batched over the "
                "rows of the state; pass per-sample inputs through `args` of deq.fixed_point."
            )
        p, x, fx = (
            a if b else jnp.broadcast_to(a, (axis_size,) + jnp.shape(a))
            for a, b in zip((p, x, fx), in_batched[:3])
        )
        return apply(p, x, fx, consts), True

    return row, consts


def _work_dtype(x):
    """The dtype jaxopt runs in: the state's, widened to JAX's default float dtype.

    jaxopt creates part of its state (Anderson's Gram matrix, its least-squares system) in the
    default float dtype, which is float64 when x64 is enabled; giving it float32 iterates
    then makes its steps change dtype. Running jaxopt in the default dtype avoids that.
    """
    return jnp.promote_types(x.dtype, jnp.result_type(float))


def _strong(tree, like=None):
    """Cast every leaf to a strong (non-weak) dtype: that of `like`'s leaf, or its own."""
    if like is None:
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(jnp.result_type(a)), tree)
    return jax.tree_util.tree_map(lambda a, b: jnp.asarray(a).astype(b.dtype), tree, like)


@dataclasses.dataclass(frozen=True, init=False)
class JaxoptSolver(AbstractSolver):
    r"""Use a jaxopt fixed-point solver (e.g. `jaxopt.AndersonAcceleration`) as a deq solver.

    An adapter (composition, public jaxopt API only): at each step of deq's driver loop it
    calls `jaxopt_cls(fixed_point_fun=..., **options).update(z, state)`, and
    `init_state(z0)` at the start. jaxopt's solvers act on one vector, so `init_state` and
    `update` are `jax.vmap`-ped over the rows of the packed `(B, n)` state: with
    `batch_axis=0` every sample runs its own jaxopt solver (its own Anderson weights) and stops
    on its own, exactly like deq's solvers; with `batch_axis=None`, `B = 1`. The fixed-point
    map is still evaluated once per call on the whole batch (a custom batching rule).

    The iterates are jaxopt's (`z_{k+1}` = the `params` returned by `update`):

    .. math:: (z_{k+1}, s_{k+1}) = \texttt{update}(z_k, s_k), \qquad
              \text{stop when } \|f(z_k) - z_k\| \le \texttt{atol} + \texttt{rtol}\,\|f(z_k)\|,

    and deq's driver evaluates `f(z_{k+1})` for its stopping test. Cost: one evaluation of `f`
    per step for `jaxopt.FixedPointIteration` (jaxopt's evaluation at the current iterate is
    served from the driver's), two for `jaxopt.AndersonAcceleration` once its history is full
    (jaxopt evaluates `f` at its extrapolated point, which it does not return). deq's own
    `deq.Anderson` needs one, which is why it stays the default. jaxopt runs in the state's
    dtype widened to JAX's default float dtype (float64 when x64 is enabled), because it
    builds part of its state in that dtype; deq's iterates keep their own dtype.

    jaxopt's `maxiter`, `tol`, `implicit_diff`, `implicit_diff_solve`, `has_aux` and
    `fixed_point_fun` are decided by deq and are refused as options: use `max_steps`,
    `rtol`/`atol` here, and `backward=` of `deq.fixed_point` (IFT by default) for gradients.

    Args:
      jaxopt_cls: a jaxopt fixed-point solver class taking `fixed_point_fun`, such as
        `jaxopt.FixedPointIteration` or `jaxopt.AndersonAcceleration`.
      rtol: relative tolerance of deq's stopping test.
      atol: absolute tolerance of deq's stopping test.
      max_steps: most steps.
      options: the jaxopt options as a tuple of `(name, value)` pairs (built from the keyword
        arguments; kept as a sorted tuple so the solver stays hashable).
      **kwargs: jaxopt options, e.g. `history_size=5, beta=1.0, ridge=1e-5`; values must be
        hashable (numbers, strings, booleans).

    Example:
      >>> import jax, jax.numpy as jnp, jaxopt, deq
      >>> from deq.interop import JaxoptSolver
      >>> f = lambda z, x: jnp.tanh(0.5 * z + x)
      >>> solver = JaxoptSolver(jaxopt.AndersonAcceleration, history_size=5, ridge=1e-6, atol=1e-8)
      >>> sol = deq.fixed_point(f, jnp.zeros(3), jnp.ones(3), solver=solver)
      >>> ref = deq.fixed_point(f, jnp.zeros(3), jnp.ones(3), solver=deq.Anderson(atol=1e-8))
      >>> bool(sol.stats.converged), bool(jnp.allclose(sol.value, ref.value, atol=1e-6))
      (True, True)
      >>> jax.grad(lambda x: deq.fixed_point(f, jnp.zeros(3), x, solver=solver).value.sum())(jnp.ones(3)).shape
      (3,)

    References:
      Blondel, Berthet, Cuturi, Frostig, Hoyer, Llinares-Lopez, Pedregosa & Vert, "Efficient
      and Modular Implicit Differentiation", NeurIPS 2022 (jaxopt).
      Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011.
    """

    jaxopt_cls: Any
    options: tuple = ()
    rtol: float = 1e-5
    atol: float = 1e-6
    max_steps: int = 100

    def __init__(self, jaxopt_cls, *, rtol: float = 1e-5, atol: float = 1e-6, max_steps: int = 100,
                 options: tuple = (), **kwargs):
        owner = "JaxoptSolver"
        if not isinstance(jaxopt_cls, type) or not all(
            callable(getattr(jaxopt_cls, m, None)) for m in ("init_state", "update")
        ):
            raise TypeError(
                f"{owner}: `jaxopt_cls` must be a jaxopt fixed-point solver class with init_state "
                f"and update (e.g. jaxopt.AndersonAcceleration), got {jaxopt_cls!r}. Pass the "
                "class itself, not an instance."
            )
        try:
            params = inspect.signature(jaxopt_cls).parameters
        except (TypeError, ValueError):  # pragma: no cover - jaxopt classes are dataclasses
            params = {}
        if "fixed_point_fun" not in params:
            raise TypeError(
                f"{owner}: `jaxopt_cls` {jaxopt_cls.__name__} does not take a `fixed_point_fun`, so "
                "it is not a fixed-point solver. Use jaxopt.FixedPointIteration or "
                "jaxopt.AndersonAcceleration."
            )
        opts = dict(options)
        opts.update(kwargs)
        valid = [n for n in params if n not in _RESERVED]
        for name in opts:
            if name in _RESERVED:
                raise ValueError(f"{owner}: the jaxopt option `{name}` is not accepted: {_RESERVED[name]}.")
            if name not in params:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" Did you mean `{close[0]}`?" if close else ""
                raise TypeError(
                    f"{owner}: {jaxopt_cls.__name__} has no option `{name}`. Expected one of: "
                    f"{', '.join(valid)}.{hint}"
                )
        items = tuple(sorted(opts.items()))
        try:
            hash(items)
        except TypeError as e:
            raise TypeError(
                f"{owner}: jaxopt option values must be hashable (numbers, strings, booleans), got "
                f"{dict(items)!r}. Pass plain Python values."
            ) from e
        try:
            jaxopt_cls(fixed_point_fun=lambda z: z, **dict(items))
        except Exception as e:  # noqa: BLE001 - report jaxopt's own validation
            raise ValueError(f"{owner}: {jaxopt_cls.__name__} rejected the options {dict(items)!r}: {e}") from e
        object.__setattr__(self, "jaxopt_cls", jaxopt_cls)
        object.__setattr__(self, "options", items)
        object.__setattr__(self, "rtol", rtol)
        object.__setattr__(self, "atol", atol)
        object.__setattr__(self, "max_steps", max_steps)
        check_tolerances(self)

    def build(self, F, x):
        """The jaxopt solver for the packed map `F` at `x`, and the constants to pass it."""
        row, consts = _row_map(F, x)
        return self.jaxopt_cls(fixed_point_fun=row, **dict(self.options)), consts

    def init(self, F, x, fx):
        solver, consts = self.build(F, x)
        wd = _work_dtype(x)
        state = jax.vmap(lambda xr, fxr: solver.init_state(xr, xr, fxr, *consts))(x.astype(wd), fx.astype(wd))
        return _strong(state)

    def step(self, F, x, fx, state, active, best):
        solver, consts = self.build(F, x)
        wd = _work_dtype(x)
        out = jax.vmap(lambda xr, sr, fxr: solver.update(xr, sr, xr, fxr, *consts))(
            x.astype(wd), state, fx.astype(wd))
        x_new = jnp.where(active[:, None], out.params.astype(x.dtype), x)
        new_state = where_rows(active, _strong(out.state, state), state)
        return x_new, F(x_new), new_state


jax.tree_util.register_static(JaxoptSolver)
