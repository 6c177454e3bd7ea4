r"""Training-time regularizers for deep equilibrium models.

Two tools from the DEQ literature that make equilibrium models easier to solve and to train:

- **Jacobian regularization** (Bai, Koltun & Kolter 2021): penalise the Frobenius norm of the
  cell's Jacobian `J = df/dz` at the fixed point, estimated without building `J` by
  Hutchinson's trick with vector-Jacobian products. A small `||J||_F` keeps the fixed-point map
  well conditioned, so forward and backward solves stay short during training.
  (`jacobian_frobenius`, and `jacobian_penalty` for Flax NNX cells; `JacobianSchedule` applies
  it every `k` training steps with a warm-up of its weight, torchdeq's `jac_loss_freq`.)
- **Fixed-point correction** (DEQ-Flow, Bai, Geng, Satpathy & Koltun 2022): supervise a few
  intermediate iterates of the solve, each differentiated with a cheap backward strategy
  (phantom gradients by default), with weights increasing towards the final iterate.
  (`fixed_point_correction`, `correction_loss`; the supervised steps split the budget evenly,
  or are chosen explicitly with `steps=`, torchdeq's `indexing`.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from ._api import check_positive_int, strict_kwargs
from ._fixed_point import fixed_point
from ._solution import Solution, Stats
from .backward import AbstractBackward, PhantomGrad
from .solvers import AbstractSolver, Anderson

__all__ = [
    "jacobian_frobenius",
    "jacobian_penalty",
    "JacobianSchedule",
    "fixed_point_correction",
    "correction_loss",
    "Correction",
    "correction_weights",
]


# --------------------------------------------------------------------------------------------
# Shared helpers (also used by deq.certify)
# --------------------------------------------------------------------------------------------


def _check_f(owner: str, f) -> None:
    if not callable(f):
        raise TypeError(
            f"{owner}: `f` must be callable as f(z, args) -> z, got {type(f).__name__}. "
            "Pass the cell as a function, e.g. f = lambda z, p: jnp.tanh(p['W'] @ z + p['x'])."
        )


def _check_batch_axis(owner: str, batch_axis) -> None:
    if isinstance(batch_axis, bool) or batch_axis not in (None, 0):
        raise ValueError(
            f"{owner}: `batch_axis` must be None (the whole state is one problem) or 0 (axis 0 "
            f"of every leaf indexes samples), got {batch_axis!r}. Move the batch axis to the "
            "front and pass batch_axis=0."
        )


def _check_key(owner: str, key) -> None:
    ok = isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape[-1:] == (2,))
    )
    if not ok:
        got = type(key).__name__ if not isinstance(key, jax.Array) else f"{key.dtype}{list(key.shape)}"
        raise TypeError(
            f"{owner}: `key` must be a JAX random key, got {got}. Pass e.g. key=jax.random.key(0) "
            "(and split it between training steps)."
        )


def _check_z(owner: str, z, batch_axis) -> None:
    leaves = jax.tree_util.tree_leaves(z)
    if not leaves:
        raise ValueError(f"{owner}: `z` has no array leaves. Pass the state, e.g. the fixed point sol.value.")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"{owner}: every leaf of `z` must be a real floating-point array, got dtype "
                f"{jnp.result_type(leaf)}. Cast it, e.g. z.astype(jnp.float32)."
            )
    if batch_axis == 0:
        sizes = {jnp.shape(l)[0] if jnp.ndim(l) else None for l in leaves}
        if None in sizes or len(sizes) != 1:
            raise ValueError(
                f"{owner}: with batch_axis=0 every leaf of `z` needs the same leading (batch) "
                f"size, got shapes {[jnp.shape(l) for l in leaves]}. Give every leaf a leading "
                "batch axis, or pass batch_axis=None."
            )


def _tree_normal(key, tree):
    """Standard Gaussian pytree shaped and typed like `tree`."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    out = [jax.random.normal(k, jnp.shape(l), jnp.result_type(l)) for k, l in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _sq_norm(tree, batch_axis):
    """Squared l2 norm over all leaves: a scalar, or one per sample `(B,)` with batch_axis=0."""
    leaves = jax.tree_util.tree_leaves(tree)
    if batch_axis is None:
        return sum(jnp.sum(jnp.square(l)) for l in leaves)
    return sum(jnp.sum(jnp.reshape(jnp.square(l), (jnp.shape(l)[0], -1)), axis=1) for l in leaves)


def _scale(tree, s, batch_axis):
    """Multiply every leaf by `s` (a scalar, or `(B,)` broadcast along axis 0)."""

    def one(l):
        if batch_axis is None:
            return l * s.astype(l.dtype)
        return l * jnp.reshape(s, (-1,) + (1,) * (jnp.ndim(l) - 1)).astype(l.dtype)

    return jax.tree_util.tree_map(one, tree)


# --------------------------------------------------------------------------------------------
# Jacobian regularization
# --------------------------------------------------------------------------------------------


def jacobian_frobenius(f: Callable, z: Any, args: Any, key: jax.Array, num_probes: int = 1, *,
                       batch_axis: Optional[int] = None) -> jax.Array:
    r"""Hutchinson estimate of the squared Frobenius norm of the Jacobian `df/dz` at `z`.

    With Gaussian probes `v ~ N(0, I)` shaped like `f(z)`, the vector-Jacobian product
    `v^T J` has expected squared norm `||J||_F^2`:

    .. math::
        \mathbb{E}_v \|v^\top J\|_2^2 = \operatorname{tr}(J J^\top) = \|J\|_F^2, \qquad
        \widehat{\|J\|_F^2} = \frac{1}{K} \sum_{k=1}^{K} \|v_k^\top J_f(z)\|_2^2 .

    The estimate is unbiased, costs `num_probes` vector-Jacobian products (no Jacobian matrix
    is formed) and is differentiable with respect to `args` (and `z`), so it can be added to a
    training loss (Bai, Koltun & Kolter 2021 add `gamma * ||J||_F^2 / d` with `d` the state
    size; divide by `d` yourself to follow them). It works under `jax.jit`, `jax.vmap` and
    `jax.grad`.

    Args:
      f: the cell, `f(z, args) -> z`; `z` may be any pytree of real floating arrays.
      z: where to evaluate the Jacobian (typically the fixed point `sol.value`; pass
        `jax.lax.stop_gradient(z)` to send the penalty's gradient to `args` only, as Bai et al.).
      args: the cell's parameters and inputs; gradients of the estimate flow to them.
      key: a JAX random key for the probes.
      num_probes: `K >= 1`, the number of probes averaged (variance falls like `1/K`).
      batch_axis: None (`z` is one problem: the estimate of `||J||_F^2` for the whole state)
        or 0 (axis 0 of every leaf indexes samples: the *mean over samples* of the
        per-sample estimates, i.e. the total divided by the batch size). With batch_axis=0,
        `f` is expected not to mix samples (a block-diagonal Jacobian); otherwise the
        cross-sample blocks are included too.

    Returns:
      A scalar: the estimate of `||df/dz||_F^2` (batch_axis None) or of its mean over
      samples (batch_axis 0).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deq.regularize import jacobian_frobenius
      >>> f = lambda z, W: jnp.tanh(W @ z)
      >>> W, z = 0.5 * jnp.eye(3), jnp.zeros(3)  # J = 0.5 I, so ||J||_F^2 = 0.75
      >>> est = jacobian_frobenius(f, z, W, jax.random.key(0), num_probes=4000)
      >>> bool(abs(est - 0.75) < 0.05)
      True
      >>> jax.grad(lambda W: jacobian_frobenius(f, z, W, jax.random.key(1)))(W).shape
      (3, 3)

    References:
      Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
      smoothing splines", Commun. Stat. Simul. Comput. 1990.
      Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization",
      ICML 2021.
    """
    owner = "jacobian_frobenius"
    _check_f(owner, f)
    _check_key(owner, key)
    check_positive_int(owner, "num_probes", num_probes, example=1)
    _check_batch_axis(owner, batch_axis)
    _check_z(owner, z, batch_axis)
    fz, vjp = jax.vjp(lambda z_: f(z_, args), z)
    if jax.tree_util.tree_structure(fz) != jax.tree_util.tree_structure(z) or any(
        jnp.shape(a) != jnp.shape(b) for a, b in zip(jax.tree_util.tree_leaves(fz), jax.tree_util.tree_leaves(z))
    ):
        raise ValueError(
            f"{owner}: `f` must return a pytree shaped like `z`, got output shapes "
            f"{[jnp.shape(a) for a in jax.tree_util.tree_leaves(fz)]} for state shapes "
            f"{[jnp.shape(a) for a in jax.tree_util.tree_leaves(z)]}. Pass the cell's own state."
        )

    def one(k):
        (u,) = vjp(_tree_normal(k, fz))
        return _sq_norm(u, batch_axis)

    est = jnp.mean(jax.vmap(one)(jax.random.split(key, num_probes)), axis=0)
    return est if batch_axis is None else jnp.mean(est)


def _split_cell(owner: str, cell):
    try:
        from flax import nnx
    except ImportError as e:  # pragma: no cover - flax is a dependency
        raise ImportError(f"{owner} needs flax (pip install flax).") from e
    if not isinstance(cell, nnx.Module) or not callable(cell):
        raise TypeError(
            f"{owner}: `cell` must be a Flax NNX module with __call__(z, x) -> z, got "
            f"{type(cell).__name__}. For a plain function use deq.regularize.jacobian_frobenius."
        )
    graphdef, state = nnx.split(cell)

    def f(z, state_x):
        s, x_ = state_x
        return nnx.merge(graphdef, s)(z, x_)

    return f, state


@strict_kwargs
def jacobian_penalty(cell, z_star, x, key, num_probes: int = 1, *, batch_axis: Optional[int] = 0,
                     stop_gradient_z: bool = True) -> jax.Array:
    r"""One-line Jacobian regularizer for a Flax NNX cell: `E ||v^T d cell(z*, x)/dz||^2`.

    The Hutchinson estimate of `||d cell(z, x)/dz||_F^2` at `z = z*` (see
    `jacobian_frobenius`), with the cell split into `(graphdef, state)` internally so the
    estimate is differentiable with respect to the cell's parameters: call it inside the loss
    given to `nnx.grad` / `nnx.value_and_grad` and add `gamma * penalty` to the loss.

    .. math:: \mathcal{R}(\theta) = \frac{1}{B} \sum_{b=1}^{B} \frac{1}{K} \sum_{k=1}^K
              \|v_{bk}^\top \partial_z f_\theta(z^*_b, x_b)\|^2

    Args:
      cell: an `nnx.Module` with `__call__(z, x) -> z` (the same cell given to `deq.nn.DEQ`).
      z_star: the fixed point (e.g. `layer(x)` or `sol.value`), shape `(B, ...)` by default.
      x: the input passed to the cell.
      key: a JAX random key for the probes (split it every training step).
      num_probes: number of Gaussian probes `K >= 1`.
      batch_axis: 0 (default: axis 0 indexes samples; the result is the mean over samples of
        the per-sample estimates) or None (the estimate for the whole state).
      stop_gradient_z: treat `z*` as a constant (default, as Bai et al.: the penalty's
        gradient reaches the parameters only through the cell, with no second backward solve
        through the equilibrium).

    Returns:
      A scalar estimate (see `batch_axis`), differentiable w.r.t. the cell's parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.regularize import jacobian_penalty
      >>> class Cell(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.lin = nnx.Linear(4, 4, rngs=rngs)
      ...     def __call__(self, z, x):
      ...         return jnp.tanh(0.5 * self.lin(z) + x)
      >>> cell, x = Cell(nnx.Rngs(0)), jnp.ones((2, 4))
      >>> z = jnp.zeros((2, 4))
      >>> def loss(cell):
      ...     return jacobian_penalty(cell, z, x, jax.random.key(0))
      >>> grads = nnx.grad(loss)(cell)
      >>> grads["lin"]["kernel"].shape
      (4, 4)

    References:
      Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization",
      ICML 2021.
    """
    owner = "jacobian_penalty"
    if not isinstance(stop_gradient_z, bool):
        raise TypeError(f"{owner}: `stop_gradient_z` must be a bool, got {stop_gradient_z!r}.")
    f, state = _split_cell(owner, cell)
    if stop_gradient_z:
        z_star = jax.lax.stop_gradient(z_star)
    return jacobian_frobenius(f, z_star, (state, x), key, num_probes, batch_axis=batch_axis)


@dataclasses.dataclass(frozen=True)
class JacobianSchedule:
    r"""When, and how strongly, to apply the Jacobian penalty during training.

    The weight at (0-based) training step `s` is

    .. math::
        \gamma(s) = \begin{cases}
          \gamma \cdot \min\!\big(1, \tfrac{s - s_0 + 1}{R}\big)
            & s \ge s_0 \text{ and } (s - s_0) \bmod k = 0, \\
          0 & \text{otherwise,}
        \end{cases}

    with `gamma = weight`, `k = every`, `s_0 = start_step` and `R = ramp_steps` (no ramp when
    `R = 0`). Applying the penalty on one step in `k` (torchdeq's `jac_loss_freq`, Bai, Koltun &
    Kolter 2021 use a fraction of the steps) divides its extra cost (a vector-Jacobian product
    per probe) by `k`; the ramp lets the model fit the data before the penalty bites. A frozen
    dataclass, so it can sit in `deq.train.TrainConfig(jacobian_reg=JacobianSchedule(...))`,
    where `fit` skips the penalty's computation on the steps where the weight is 0.

    Args:
      weight: the weight `gamma >= 0` once ramped up.
      every: apply on one step in `every` (>= 1).
      start_step: no penalty before this step (>= 0).
      ramp_steps: linear ramp of the weight over this many steps after `start_step` (>= 0).

    Example:
      >>> from deq.regularize import JacobianSchedule
      >>> sched = JacobianSchedule(weight=2.0, every=2, ramp_steps=4)
      >>> [sched(s) for s in range(8)]
      [0.5, 0.0, 1.5, 0.0, 2.0, 0.0, 2.0, 0.0]
      >>> sched.active(3)
      False

    References:
      Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization",
      ICML 2021.
    """

    weight: float
    every: int = 1
    start_step: int = 0
    ramp_steps: int = 0

    def __post_init__(self):
        owner = "JacobianSchedule"
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf"):
            raise ValueError(f"{owner}: `weight` must be a finite number >= 0, got {w!r}. Pass e.g. weight=1.0.")
        check_positive_int(owner, "every", self.every, example=4)
        for name in ("start_step", "ramp_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{owner}: `{name}` must be an integer >= 0, got {v!r}. Pass e.g. {name}=0.")
        object.__setattr__(self, "weight", float(w))

    def active(self, step: int) -> bool:
        """Whether the penalty is computed at training step `step` (its weight is > 0)."""
        return self(step) > 0

    def __call__(self, step: int) -> float:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"JacobianSchedule: `step` must be an integer >= 0, got {step!r}.")
        s = step - self.start_step
        if s < 0 or s % self.every or self.weight == 0:
            return 0.0
        return self.weight * (min(1.0, (s + 1) / self.ramp_steps) if self.ramp_steps else 1.0)


# --------------------------------------------------------------------------------------------
# Fixed-point correction
# --------------------------------------------------------------------------------------------


class Correction(NamedTuple):
    """What `fixed_point_correction` returns (a NamedTuple: unpack it as `its, w, sol = ...`).

    Attributes:
      iterates: list of `num_points` states (pytrees shaped like `z0`), in solve order; the
        last one is `solution.value`. Each carries the gradient of the chosen backward
        strategy at that point.
      weights: `(num_points,)` array of loss weights (default increasing towards the end).
      solution: a `deq.Solution` for the whole solve (stats combined over the segments).
    """

    iterates: list
    weights: jax.Array
    solution: Solution


def correction_weights(num_points: int, gamma: float = 0.8) -> jax.Array:
    r"""The default fixed-point-correction weights `w_k = gamma^(K - 1 - k)`, `k = 0..K-1`.

    Increasing towards the final iterate (which gets weight 1), as in RAFT / DEQ-Flow.

    Args:
      num_points: `K >= 1`.
      gamma: decay in `(0, 1]`.

    Returns:
      A `(K,)` float array.

    Example:
      >>> from deq.regularize import correction_weights
      >>> correction_weights(3, 0.5).tolist()
      [0.25, 0.5, 1.0]

    References:
      Bai, Geng, Satpathy & Koltun, "Deep Equilibrium Optical Flow Estimation", CVPR 2022.
    """
    check_positive_int("correction_weights", "num_points", num_points, example=3)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(
            f"correction_weights: `gamma` must lie in (0, 1], got {gamma!r}. Pass e.g. gamma=0.8."
        )
    return jnp.asarray([float(gamma) ** (num_points - 1 - k) for k in range(num_points)])


def _segment_steps(max_steps: int, num_points: int) -> list[int]:
    base, extra = divmod(max_steps, num_points)
    return [base + (1 if k < extra else 0) for k in range(num_points)]


def _chosen_segments(owner: str, steps, max_steps: int, num_points) -> list[int]:
    """The segment lengths `s_k - s_{k-1}` of explicitly chosen steps, checked."""
    if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
        raise TypeError(
            f"{owner}: `steps` must be a sequence of solver step counts, got {steps!r}. "
            "Pass e.g. steps=(4, 8, 30)."
        )
    steps = list(steps)
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) for s in steps):
        raise ValueError(
            f"{owner}: `steps` must be a non-empty sequence of integers, got {steps!r}. Pass e.g. steps=(4, 8, 30)."
        )
    if steps[0] < 1 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(
            f"{owner}: `steps` must be strictly increasing integers >= 1 (the solver steps after which "
            f"iterates are supervised), got {steps}. Sort them and drop repeats, e.g. {sorted(set(s for s in steps if s >= 1))}."
        )
    if steps[-1] > max_steps:
        raise ValueError(
            f"{owner}: `steps` ends at step {steps[-1]}, beyond the solver's max_steps={max_steps}. "
            f"Raise the solver's max_steps to {steps[-1]} or drop the later steps."
        )
    if num_points is not None and num_points != len(steps):
        raise ValueError(
            f"{owner}: `num_points`={num_points} disagrees with the {len(steps)} entries of `steps`={steps}. "
            "Pass only steps (num_points follows), or make them agree."
        )
    return [b - a for a, b in zip([0] + steps[:-1], steps)]


def _with_max_steps(solver, steps: int):
    try:
        return dataclasses.replace(solver, max_steps=steps)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"fixed_point_correction: cannot set max_steps={steps} on the solver {solver!r} "
            f"({e}). Pass a deq solver dataclass with a `max_steps` field, such as deq.Anderson()."
        ) from e


@strict_kwargs
def fixed_point_correction(
    f: Callable,
    z0: Any,
    args: Any = None,
    *,
    solver: Optional[AbstractSolver] = None,
    num_points: Optional[int] = None,
    backward: Optional[AbstractBackward] = None,
    weights: Optional[Sequence[float]] = None,
    batch_axis: Optional[int] = None,
    steps: Optional[Sequence[int]] = None,
) -> Correction:
    r"""Fixed-point correction (DEQ-Flow): a solve split into segments, each end supervised.

    The solve of `z* = f(z*, args)` with `solver` is run as `K = num_points` consecutive
    segments of `deq.fixed_point`, segment `k` taking its share of `solver.max_steps` and
    starting from the (stop-gradient) value of segment `k - 1`. Each segment's value `z_k` is
    differentiated with `backward` (phantom gradients by default), so a loss on every iterate

    .. math:: \mathcal{L} = \sum_{k=0}^{K-1} w_k \, \ell(z_k), \qquad w_k = \gamma^{K-1-k}

    gives a denser, better-conditioned training signal than the final fixed point alone. Use
    `correction_loss(loss_fn, iterates, weights)` to form it.

    Implemented on top of `deq.fixed_point` without touching the solver: **the solver's
    history (Anderson's or Broyden's memory) restarts at each segment boundary**, so the
    segmented solve can take slightly more steps to reach a tolerance than one uninterrupted
    solve. A segment that starts converged takes zero steps. Each segment returns its
    lowest-residual iterate, from which the next segment starts.

    **Chosen steps** (torchdeq's `indexing`): with `steps=(s_1, ..., s_K)`, strictly increasing,
    the supervised iterates are those after `s_1, ..., s_K` solver steps (segment `k` runs
    `s_k - s_{k-1}` steps), e.g. `steps=(4, 8, 30)` to supervise two early iterates and the
    last. `s_K` must not exceed `solver.max_steps`; the solve ends at `s_K`. With a memoryless
    solver (`deq.FixedPointIteration`) the iterate after `s_k` steps is exactly `f^{s_k}(z0)`
    (unless the tolerance stops it earlier).

    Args:
      f: the cell, `f(z, args) -> z`.
      z0: initial state (pytree).
      args: parameters and inputs; gradients flow to them through every iterate.
      solver: a deq solver (default `deq.Anderson()`); its `max_steps` is the total budget,
        split as evenly as possible over the segments (it must be `>= num_points`), or the
        bound on `steps`.
      num_points: `K >= 1`, the number of supervised iterates (default 3, or `len(steps)`).
      backward: backward strategy for every iterate (default `deq.PhantomGrad()`, as DEQ-Flow).
      weights: `K` loss weights; default `correction_weights(K, 0.8)` (increasing).
      batch_axis: None or 0, as in `deq.fixed_point`.
      steps: the solver steps after which the iterates are taken, strictly increasing
        positive integers `<= solver.max_steps`; None splits `max_steps` evenly.

    Returns:
      A `Correction(iterates, weights, solution)`. `solution.stats` combines the segments:
      `num_steps` is the total, `residual_norm`/`converged`/`result` are the last segment's,
      and `residual_history` (length `max_steps + 1`, or `steps[-1] + 1`) concatenates the
      segments' histories (NaN where a segment stopped early).

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> from deq.regularize import correction_loss, fixed_point_correction
      >>> f = lambda z, a: jnp.tanh(0.5 * z + a)
      >>> def loss(a):
      ...     its, w, sol = fixed_point_correction(
      ...         f, jnp.zeros(3), a, solver=deq.Anderson(max_steps=30), num_points=3)
      ...     return correction_loss(lambda z: jnp.sum((z - 0.5) ** 2), its, w)
      >>> jax.grad(loss)(jnp.ones(3)).shape
      (3,)
      >>> its, w, sol = fixed_point_correction(f, jnp.zeros(3), jnp.ones(3), steps=(1, 2, 10),
      ...                                      solver=deq.FixedPointIteration(max_steps=10))
      >>> len(its), bool(jnp.allclose(its[1], f(f(jnp.zeros(3), 1.0), 1.0)))  # after 2 steps
      (3, True)

    References:
      Bai, Geng, Satpathy & Koltun, "Deep Equilibrium Optical Flow Estimation", CVPR 2022.
      Geng, Zhang, Bai, Wang & Lin, "On Training Implicit Models", NeurIPS 2021.
    """
    owner = "fixed_point_correction"
    _check_f(owner, f)
    solver = Anderson() if solver is None else solver
    backward = PhantomGrad() if backward is None else backward
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"{owner}: `solver` must be a deq solver such as deq.Anderson(), got {solver!r}.")
    if not isinstance(backward, AbstractBackward):
        raise TypeError(
            f"{owner}: `backward` must be a deq backward strategy such as deq.PhantomGrad(), got {backward!r}."
        )
    _check_batch_axis(owner, batch_axis)
    if steps is None:
        num_points = 3 if num_points is None else num_points
        check_positive_int(owner, "num_points", num_points, example=3)
        if solver.max_steps < num_points:
            raise ValueError(
                f"{owner}: `solver.max_steps` ({solver.max_steps}) must be at least `num_points` "
                f"({num_points}): each segment needs at least one step. Raise max_steps or lower num_points."
            )
        segments = _segment_steps(solver.max_steps, num_points)
    else:
        segments = _chosen_segments(owner, steps, solver.max_steps, num_points)
        num_points = len(segments)
    if weights is None:
        w = correction_weights(num_points)
    else:
        w = jnp.asarray(weights)
        if w.shape != (num_points,):
            raise ValueError(
                f"{owner}: `weights` must have one entry per point, shape ({num_points},), got "
                f"shape {w.shape}. Pass weights of length num_points, or None for gamma^(K-1-k)."
            )

    iterates, stats = [], []
    z = z0
    for seg in segments:
        sol = fixed_point(
            f, jax.lax.stop_gradient(z), args, solver=_with_max_steps(solver, seg),
            backward=backward, batch_axis=batch_axis,
        )
        iterates.append(sol.value)
        stats.append(sol.stats)
        z = sol.value
    last = stats[-1]
    hist = jnp.concatenate(
        [stats[0].residual_history] + [s.residual_history[..., 1:] for s in stats[1:]], axis=-1
    )
    combined = Stats(
        num_steps=sum(s.num_steps for s in stats),
        residual_norm=last.residual_norm,
        converged=last.converged,
        result=last.result,
        residual_history=hist,
    )
    return Correction(iterates, w, Solution(value=iterates[-1], stats=combined))


def correction_loss(loss_fn: Callable[[Any], jax.Array], iterates: Sequence[Any],
                    weights: Optional[Any] = None) -> jax.Array:
    r"""The weighted fixed-point-correction loss `sum_k w_k loss_fn(z_k)`.

    .. math:: \mathcal{L} = \sum_{k=0}^{K-1} w_k \, \ell(z_k)

    Args:
      loss_fn: maps one iterate (a state pytree) to a scalar loss.
      iterates: the `K` iterates, e.g. `fixed_point_correction(...).iterates`.
      weights: `K` weights; None for the default `correction_weights(K)` (`0.8^(K-1-k)`).

    Returns:
      A scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> from deq.regularize import correction_loss
      >>> its = [jnp.array(2.0), jnp.array(1.0)]
      >>> float(correction_loss(lambda z: z ** 2, its, [0.5, 1.0]))
      3.0

    References:
      Bai, Geng, Satpathy & Koltun, "Deep Equilibrium Optical Flow Estimation", CVPR 2022.
    """
    if not callable(loss_fn):
        raise TypeError(
            f"correction_loss: `loss_fn` must be callable as loss_fn(z) -> scalar, got "
            f"{type(loss_fn).__name__}."
        )
    if isinstance(iterates, Correction):
        iterates, weights = iterates.iterates, iterates.weights if weights is None else weights
    iterates = list(iterates)
    if not iterates:
        raise ValueError("correction_loss: `iterates` is empty. Pass fixed_point_correction(...).iterates.")
    w = correction_weights(len(iterates)) if weights is None else jnp.asarray(weights)
    if w.shape != (len(iterates),):
        raise ValueError(
            f"correction_loss: `weights` must have one entry per iterate, shape ({len(iterates)},), "
            f"got shape {w.shape}."
        )
    losses = [jnp.asarray(loss_fn(z)) for z in iterates]
    for k, l in enumerate(losses):
        if l.shape != ():
            raise ValueError(
                f"correction_loss: `loss_fn` must return a scalar, got shape {l.shape} for iterate "
                f"{k}. Reduce it, e.g. with jnp.mean."
            )
    w = w.astype(jnp.result_type(*losses)) if jnp.issubdtype(jnp.result_type(*losses), jnp.floating) else w
    return sum(w[k] * losses[k] for k in range(len(losses)))
