"""Training loop for classifiers (DEQ or explicit): optimizer, jitted steps, `fit`, evaluation.

The model contract: any `flax.nnx.Module` with `model(x) -> (logits, info)`, where `logits` is
`(..., num_classes)`, integer targets are shaped like `logits[..., 0]`, and `info` is a dict of
scalar diagnostics (for DEQs `forward_steps`, `residual`, `converged_frac`; `{}` for explicit
nets). `model.eval()` / `model.train()` switch modes; evaluation always runs in eval mode.

The pieces are small and stateless: `make_optimizer` builds the optax chain, `train_step` and
`eval_step` are `nnx.jit`-compiled, `batch_stream` gives the data order as a pure function of
`(seed, epoch)`, and `fit` glues them together, returning a `History` (statistics are returned,
never printed). `fit` writes JSON lines / TensorBoard logs and orbax checkpoints when asked, and
resumes a killed run exactly from its last checkpoint. The same code runs data-parallel over all
devices: the batch is sharded on a `"data"` mesh axis and parameters are replicated.

What is recorded per training step: `loss` (cross-entropy), `accuracy`, `grad_norm`, `lr`,
`step_time` (wall seconds, after `block_until_ready`; the first step of a `fit` call includes
compilation), `aux_loss` when an extra loss is active, and every entry of the model's `info`
(forward solver steps, final residual, ...; an entry named like one of these fields is recorded
as `model_<name>`), and `skipped` (1.0 when the step's update was not applied because it was
non-finite, see below). Beside the forward statistics, the adjoint (backward) solve of every
`deq.nn.DEQ` layer differentiated by `deq.IFT` is recorded: `backward_steps` (mean adjoint
steps over the batch), `backward_residual` (largest `||J^T u + g - u||`), `backward_converged_frac`
and `backward_result` (largest `deq.RESULTS` code). They come from the gradient of the layers'
`deq.nn.BackwardProbe` variables, which `fit` adds for the run (`deq.nn.enable_backward_stats`)
and removes at the end; `train_step` differentiates them with the parameters and returns them
apart, so the optimizer, the gradient norm and clipping see the parameters' gradient only.

Nothing goes on silently with bad data. Before the first step `fit` checks both splits: inputs
must be finite (the first bad sample is named) and targets integer class indices in
`[0, num_classes)`, with `num_classes` taken from `dataset.num_classes` when the dataset records
it and from the width of the model's logits (the first bad target is named with its value).
Inside the jitted `train_step` the update is applied only if the loss, the gradient and the
updated parameters are all finite; otherwise everything is left as it was.
`fit` then stops with `NonFiniteError` naming the step (the model keeps its last finite
parameters, and no checkpoint of that step is written), or, with
`TrainConfig(skip_nonfinite=True)`, records the step as skipped and goes on.

Checkpoints that cannot be read (truncated or missing files) are reported with their path: `fit`
resumes from the newest intact one with a warning (the unreadable newer ones are renamed
`<step>.corrupt` so the run can write those steps again), and raises `CheckpointError` when none
can be read. A `checkpoint_dir` that is a file or is not writable fails before the first step.
Checkpoints hold the model's state without its `BackwardProbe` variables (always zero), so they
read the same with or without the probes, and checkpoints written before the probes existed resume.

A solve with `throw=True` that fails inside `fit` (or a `deq.NonConvergenceWarning` turned into
an error) arrives as one `deq.SolveError`, as outside `jax.jit` (see `deq.clean_errors`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import numbers
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deq._errors import clean_errors
from deq.backward import IFT
from deq.data import iterate_batches, num_batches
from deq.distributed import check_same, is_primary
from deq.nn._layer import DEQ, BackwardProbe, backward_stats, enable_backward_stats
from deq.regularize import JacobianSchedule

__all__ = [
    "CheckpointError",
    "History",
    "NonFiniteError",
    "TrainConfig",
    "batch_stream",
    "cross_entropy",
    "epoch_seed",
    "eval_step",
    "evaluate",
    "fit",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "replicate",
    "restore_checkpoint",
    "shard_batch",
    "total_steps_for",
    "train_step",
]

_FORMAT_VERSION = 1
# The adjoint statistics of a training step (see `_backward_metrics`).
_BACKWARD_KEYS = ("backward_steps", "backward_residual", "backward_converged_frac", "backward_result")
# Record keys set by the trainer; a model info entry with one of these names gets a "model_" prefix.
_RESERVED = frozenset({
    "kind", "step", "epoch", "loss", "accuracy", "grad_norm", "aux_loss", "lr", "step_time",
    "eval_time", "loss_sum", "correct_sum", "count", "skipped", *_BACKWARD_KEYS,
})
# Config fields that change the trajectory: a resumed run must use the same values.
_TRAJECTORY_FIELDS = (
    "learning_rate", "weight_decay", "warmup_steps", "total_steps", "epochs", "clip_norm",
    "batch_size", "seed", "jacobian_reg",
)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    """A training step gave a non-finite loss, gradient or update, so `fit` stopped.

    The step's update was not applied: the model and optimizer hold the state after the last
    finite step, and no checkpoint of the failing step was written.

    Attributes:
      step: the failing step (optimizer updates counted from 1, as in the records).
      what: what was non-finite: `"loss"`, `"gradient"` or `"update"` (the updated parameters).
      record: the failing step's train record (`loss`, `grad_norm`, ... as computed).
      history: the `History` of the run up to the step before.

    Example:
      >>> from deq.train import NonFiniteError
      >>> issubclass(NonFiniteError, RuntimeError)
      True
    """

    def __init__(self, message: str, *, step: int, what: str, record: dict, history: History):
        super().__init__(message)
        self.step, self.what, self.record, self.history = step, what, record, history


class CheckpointError(RuntimeError):
    """No checkpoint in a `checkpoint_dir` (or not the one asked for) can be read.

    Raised when files of every checkpoint are truncated, missing or unreadable; not when the
    checkpoint is intact but was saved from a differently built model (that is a `ValueError`).

    Attributes:
      paths: the unreadable checkpoint directories, newest first.

    Example:
      >>> from deq.train import CheckpointError
      >>> issubclass(CheckpointError, RuntimeError)
      True
    """

    def __init__(self, message: str, *, paths: Sequence[str]):
        super().__init__(message)
        self.paths = list(paths)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyper-parameters and I/O settings of a training run (immutable).

    Exactly one of `total_steps` and `epochs` must be given.

    Args:
      learning_rate: peak learning rate of the warm-up + cosine-decay schedule (> 0).
      weight_decay: decoupled weight decay; AdamW when > 0, Adam when 0.
      warmup_steps: linear warm-up steps from 0 to `learning_rate` (< the total steps).
      total_steps: number of optimizer steps, or None to use `epochs`.
      epochs: number of passes over the training set (incomplete last batches are dropped),
        or None to use `total_steps`.
      clip_norm: clip gradients to this global norm (`optax.clip_by_global_norm`); None = off.
      batch_size: training batch size; must be divisible by the number of devices.
      eval_batch_size: evaluation batch size (None = `batch_size`); divisible by the devices.
      eval_every: evaluate on the test split every this many steps (0 = only at the end; the
        end of the run is always evaluated).
      seed: non-negative integer; the data order is a pure function of `(seed, epoch)` and the
        key given to `aux_loss_fn` at step `s` is `fold_in(key(seed), s)`.
      jacobian_reg: weight of the extra loss `aux_loss_fn(model, x, key)` passed to `fit`
        (e.g. a Jacobian Frobenius-norm estimate); 0 turns it off. A
        `deq.regularize.JacobianSchedule(weight, every=k, start_step=..., ramp_steps=...)`
        applies it on one step in `k` with a warm-up of its weight; on the other steps the
        extra loss is not computed at all (and the record has no `aux_loss`).
      log_dir: directory for `metrics.jsonl` (one JSON record per step and per evaluation,
        rewritten by each `fit` call from its history) and TensorBoard files; None = no files.
      checkpoint_dir: directory of orbax checkpoints; `fit` resumes from the latest one found
        there. None = no checkpoints.
      checkpoint_every: save a checkpoint every this many steps (and at the end of the run).
      max_checkpoints: how many recent checkpoints to keep.
      progress: show a tqdm progress bar (only when stderr is a terminal).
      tensorboard: also write TensorBoard event files to `log_dir` (needs `tensorboardX`).
      skip_nonfinite: what `fit` does when a step's loss, gradient or update is non-finite
        (the update is never applied either way). False (default): stop with `NonFiniteError`
        naming the step. True: skip that update and go on; the step's record has `skipped=1.0`
        and `History.skipped_steps` counts them. It does not change the steps already taken,
        so a run stopped by the error may be resumed with it switched on.
      backward_stats: record the adjoint statistics of the model's `deq.nn.DEQ` layers with an
        IFT backward (`backward_steps`, ...) at every step. True (default): `fit` gives those
        layers `deq.nn.BackwardProbe` variables for the run, unless the model holds probes
        already. False: the model is left as it is (probes it holds still report). The
        parameters are the same either way.

    Example:
      >>> from deq.train import TrainConfig
      >>> cfg = TrainConfig(learning_rate=1e-3, total_steps=100, batch_size=32)
      >>> cfg.weight_decay, cfg.clip_norm
      (0.0, 1.0)
    """

    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    total_steps: int | None = None
    epochs: int | None = None
    clip_norm: float | None = 1.0
    batch_size: int = 64
    eval_batch_size: int | None = None
    eval_every: int = 0
    seed: int = 0
    jacobian_reg: float | JacobianSchedule = 0.0
    log_dir: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1000
    max_checkpoints: int = 3
    progress: bool = True
    tensorboard: bool = False
    skip_nonfinite: bool = False
    backward_stats: bool = True

    def __post_init__(self) -> None:
        _check_number("learning_rate", self.learning_rate, minimum=0.0, strict=True)
        _check_number("weight_decay", self.weight_decay, minimum=0.0)
        if not isinstance(self.jacobian_reg, JacobianSchedule):
            _check_number("jacobian_reg", self.jacobian_reg, minimum=0.0)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("eval_every", self.eval_every, minimum=0)
        _check_int("checkpoint_every", self.checkpoint_every, minimum=1)
        _check_int("max_checkpoints", self.max_checkpoints, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        if self.seed >= 2**32:
            raise ValueError(f"TrainConfig: seed must be < 2**32, got {self.seed}. Pass e.g. seed=0.")
        if self.eval_batch_size is not None:
            _check_int("eval_batch_size", self.eval_batch_size, minimum=1)
        if self.clip_norm is not None:
            _check_number("clip_norm", self.clip_norm, minimum=0.0, strict=True)
        if (self.total_steps is None) == (self.epochs is None):
            raise ValueError(
                "TrainConfig: pass exactly one of total_steps and epochs, got "
                f"total_steps={self.total_steps!r}, epochs={self.epochs!r}. "
                "E.g. TrainConfig(total_steps=1000) or TrainConfig(epochs=10)."
            )
        if self.total_steps is not None:
            _check_int("total_steps", self.total_steps, minimum=1)
            _check_warmup(self.warmup_steps, self.total_steps)
        if self.epochs is not None:
            _check_int("epochs", self.epochs, minimum=1)
        for name in ("progress", "tensorboard", "skip_nonfinite", "backward_stats"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TrainConfig: {name} must be a bool, got {getattr(self, name)!r}.")
        if self.tensorboard and self.log_dir is None:
            raise ValueError("TrainConfig: tensorboard=True needs a log_dir, e.g. log_dir='runs/exp1'.")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(
            f"TrainConfig: {name} must be an integer >= {minimum}, got {value!r}. "
            f"Pass e.g. {name}={max(minimum, 1)}."
        )


def _check_number(name: str, value: Any, *, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        relation = ">" if strict else ">="
        raise ValueError(f"TrainConfig: {name} must be a finite number {relation} {minimum}, got {value!r}.")


def _batches_per_epoch(num_train: int, batch_size: int) -> int:
    """Full batches per epoch; an error when there is not even one."""
    per_epoch = num_batches(num_train, batch_size)
    if num_train == 0:
        raise ValueError("there are no training samples (the training split is empty): pass a dataset "
                         "with at least batch_size training samples.")
    if per_epoch < 1:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {num_train} training samples, so an "
            f"epoch has no full batch. Pass batch_size<={num_train}."
        )
    return per_epoch


def _check_warmup(warmup_steps: int, total_steps: int) -> None:
    if warmup_steps >= total_steps:
        raise ValueError(
            f"TrainConfig: warmup_steps ({warmup_steps}) must be smaller than the total number of "
            f"steps ({total_steps}). Lower warmup_steps or train longer."
        )


def total_steps_for(config: TrainConfig, num_train: int) -> int:
    """Number of optimizer steps a run takes: `total_steps`, or `epochs` full passes.

    Args:
      config: the run's `TrainConfig`.
      num_train: number of training samples.

    Returns:
      `config.total_steps`, or `config.epochs * (num_train // config.batch_size)`.

    Example:
      >>> from deq.train import TrainConfig, total_steps_for
      >>> total_steps_for(TrainConfig(epochs=3, batch_size=10), num_train=105)
      30
    """
    if config.total_steps is not None:
        return int(config.total_steps)
    per_epoch = _batches_per_epoch(num_train, config.batch_size)
    total = int(config.epochs) * per_epoch
    _check_warmup(config.warmup_steps, total)
    return total


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


def make_schedule(config: TrainConfig, *, total_steps: int | None = None) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate`, then cosine decay to 0 at the last step.

    Args:
      config: the run's `TrainConfig`.
      total_steps: the run's length; defaults to `config.total_steps` (required when the
        config uses `epochs`: see `total_steps_for`).

    Returns:
      An optax schedule, `step -> learning rate` (the rate used by update number `step`, from 0).

    Example:
      >>> from deq.train import TrainConfig, make_schedule
      >>> s = make_schedule(TrainConfig(learning_rate=1.0, warmup_steps=10, total_steps=110))
      >>> float(s(0)), float(s(10)), float(s(110))
      (0.0, 1.0, 0.0)
    """
    total = _resolve_total(config, total_steps)
    if config.warmup_steps == 0:
        return optax.cosine_decay_schedule(config.learning_rate, decay_steps=total)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=total,
        end_value=0.0,
    )


def make_optimizer(config: TrainConfig, *, total_steps: int | None = None) -> optax.GradientTransformation:
    """Gradient clipping, then Adam (AdamW when `weight_decay > 0`) on `make_schedule`.

    Args:
      config: the run's `TrainConfig`.
      total_steps: the run's length; defaults to `config.total_steps`.

    Returns:
      An `optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp
      >>> from deq.train import TrainConfig, make_optimizer
      >>> tx = make_optimizer(TrainConfig(total_steps=100, weight_decay=1e-4, clip_norm=1.0))
      >>> params = {"w": jnp.ones(3)}
      >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
      >>> updates["w"].shape
      (3,)
    """
    total = _resolve_total(config, total_steps)
    return _optimizer(config.learning_rate, config.weight_decay, config.warmup_steps, total, config.clip_norm)


@functools.lru_cache(maxsize=64)
def _optimizer(learning_rate, weight_decay, warmup_steps, total_steps, clip_norm) -> optax.GradientTransformation:
    # Memoized: equal settings give the same (stateless) object, so `nnx.Optimizer`s built from
    # it share a graph definition and `train_step` is not recompiled for every `fit` call.
    config = TrainConfig(learning_rate=learning_rate, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, total_steps=total_steps, clip_norm=clip_norm)
    schedule = make_schedule(config)
    if weight_decay > 0:
        base = optax.adamw(schedule, weight_decay=weight_decay)
    else:
        base = optax.adam(schedule)
    if clip_norm is None:
        return base
    return optax.chain(optax.clip_by_global_norm(clip_norm), base)


@functools.lru_cache(maxsize=16)
def _lr_table(learning_rate: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """The learning rate of every update of a run (one compiled evaluation of the schedule)."""
    config = TrainConfig(learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=total_steps)
    table = np.asarray(jax.jit(jax.vmap(make_schedule(config)))(np.arange(total_steps)), np.float64)
    table.flags.writeable = False
    return table


def _resolve_total(config: TrainConfig, total_steps: int | None) -> int:
    total = config.total_steps if total_steps is None else total_steps
    if total is None:
        raise ValueError(
            "this config sets epochs, not total_steps, so the schedule length is unknown: pass "
            "total_steps=total_steps_for(config, num_train)."
        )
    if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total!r}.")
    _check_warmup(config.warmup_steps, int(total))
    return int(total)


# --------------------------------------------------------------------------------------------
# Loss and jitted steps
# --------------------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-target softmax cross-entropy and correctness.

    Args:
      logits: `(..., num_classes)` unnormalized log-probabilities.
      labels: integer targets shaped like `logits[..., 0]`.

    Returns:
      `(losses, correct)`, both float32 shaped like `labels`.

    Example:
      >>> import jax.numpy as jnp
      >>> from deq.train import cross_entropy
      >>> losses, correct = cross_entropy(jnp.array([[2.0, 0.0], [0.0, 2.0]]), jnp.array([0, 0]))
      >>> correct.tolist()
      [1.0, 0.0]
    """
    if logits.shape[:-1] != labels.shape:
        hint = (" The targets are shaped like the logits: if they are one-hot, pass class indices, "
                "y.argmax(axis=-1)." if labels.shape == logits.shape else "")
        raise ValueError(
            f"the model's logits {logits.shape} do not match the targets {labels.shape}: expected "
            f"logits shaped targets.shape + (num_classes,) = {labels.shape + (logits.shape[-1],)}.{hint}"
        )
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return losses, correct


def _call_model(model, x):
    out = model(x)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
        raise TypeError(
            f"the model must return (logits, info) with info a dict of scalar diagnostics, got "
            f"{type(out).__name__}. Return e.g. (logits, {{}}) from an explicit network."
        )
    logits, info = out
    return logits, {
        (f"model_{k}" if str(k) in _RESERVED else str(k)): jnp.mean(jnp.asarray(v, jnp.float32))
        for k, v in info.items()
    }


def _loss(model, x, y, key, aux_loss_fn, aux_weight, aux_scale=None):
    logits, info = _call_model(model, x)
    losses, correct = cross_entropy(logits, y)
    loss = jnp.mean(losses)
    metrics = {"loss": loss, "accuracy": jnp.mean(correct), **info}
    total = loss
    if aux_loss_fn is not None and aux_weight:
        aux = jnp.asarray(aux_loss_fn(model, x, key), jnp.float32)
        metrics["aux_loss"] = aux
        total = loss + aux_weight * aux * (1.0 if aux_scale is None else aux_scale)
    return total, metrics


@nnx.jit(static_argnames=("aux_loss_fn", "aux_weight"))
def train_step(model, optimizer, x, y, key=None, *, aux_loss_fn=None, aux_weight=0.0, aux_scale=None):
    """One optimizer step on a batch: cross-entropy (+ `aux_weight * aux_loss_fn`), grads, update.

    Updates `model` and `optimizer` in place (compiled with `nnx.jit`). Inputs may be sharded
    over a mesh (see `shard_batch`); the loss is the mean over the global batch either way.

    Args:
      model: an `nnx.Module` with `model(x) -> (logits, info)`, in train mode.
      optimizer: an `nnx.Optimizer(model, tx, wrt=nnx.Param)`.
      x: input batch.
      y: integer targets shaped like `logits[..., 0]`.
      key: a JAX PRNG key passed to `aux_loss_fn` (may be None when there is none).
      aux_loss_fn: optional static callable `aux_loss_fn(model, x, key) -> scalar`.
      aux_weight: static float multiplying the extra loss; 0 skips it.
      aux_scale: optional traced scalar multiplying `aux_weight` (a weight schedule without
        recompiling: `fit` passes `JacobianSchedule(step) / weight`); None means 1.

    The update is applied only if the loss, the gradient (its global norm) and the updated
    parameters (`nnx.Param`) are all finite. Otherwise the floating-point state of `model` and
    `optimizer` (parameters, optimizer moments, model statistics) is left as it was and
    `skipped` is 1.0; integer counters (the optimizer's step, RNG counts) still advance, so the
    learning-rate schedule stays tied to the step index. Other state is not scanned: a buffer
    may be infinite on purpose (a `-inf` mask), and Adam's moments are finite when the gradient
    norm is.

    When the model holds `deq.nn.BackwardProbe` variables (`deq.nn.enable_backward_stats`;
    `fit` adds them), the loss is differentiated with respect to them too, and their gradient,
    the adjoint statistics, is split off before the update: the optimizer, `grad_norm` and the
    finiteness test see the parameters' gradient only, and the probes stay zero.

    Returns:
      Dict of scalar arrays: `loss` (cross-entropy), `accuracy`, `grad_norm`, `skipped` (1.0
      when the update was not applied, else 0.0), `aux_loss` (when active), the mean of each
      entry of the model's `info`, and with probes the adjoint statistics of the `deq.nn.DEQ`
      layers differentiated by `deq.IFT`: `backward_steps` (mean adjoint steps over the batch),
      `backward_residual` (largest adjoint residual `||J^T u + g - u||`),
      `backward_converged_frac` (fraction of samples converged) and `backward_result` (largest
      `deq.RESULTS` code); over several such layers the mean steps, the largest residual, the
      smallest fraction and the largest code. A layer called twice in one loss reports the sum
      of its two solves' figures (see `deq.nn.BackwardProbe`).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> from deq.train import train_step
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.linear = nnx.Linear(4, 3, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.linear(x), {}
      >>> model = Net(nnx.Rngs(0))
      >>> opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
      >>> m = train_step(model, opt, jnp.ones((8, 4)), jnp.zeros(8, jnp.int32))
      >>> sorted(m)
      ['accuracy', 'grad_norm', 'loss', 'skipped']
    """
    before = _pure_state(model), _pure_state(optimizer)
    probed = _has_probes(model)
    wrt = nnx.Any(nnx.Param, BackwardProbe) if probed else nnx.Param
    grad_fn = nnx.value_and_grad(_loss, has_aux=True, argnums=nnx.DiffState(0, wrt))
    (total, metrics), grads = grad_fn(model, x, y, key, aux_loss_fn, aux_weight, aux_scale)
    if probed:  # the probes' "gradient" is the adjoint's statistics: never an update
        probes, grads = nnx.split_state(grads, BackwardProbe, ...)
        metrics.update(_backward_metrics(model, probes))
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    # Only the new parameters are scanned: with a finite gradient norm Adam's moments are finite,
    # and scanning the whole optimizer state too would double the memory traffic of the update.
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm) & _all_finite(nnx.state(model, nnx.Param))
    after = _pure_state(model), _pure_state(optimizer)
    for obj, old, new in zip((model, optimizer), before, after):
        kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o) if _is_float(n) else n, new, old)
        _set_pure_state(obj, kept)
    metrics["grad_norm"] = grad_norm
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return metrics


def _has_probes(model) -> bool:
    return bool(jax.tree.leaves(nnx.state(model, BackwardProbe)))


def _adjoint_layers(model) -> dict[tuple, DEQ]:
    """The `deq.nn.DEQ` layers of `model` whose backward solves an adjoint system (`deq.IFT`),
    by path; the other strategies leave their probe at zero, which would read as unconverged."""
    return {tuple(path): m for path, m in nnx.iter_modules(model)
            if isinstance(m, DEQ) and isinstance(m.backward, IFT)}


def _backward_metrics(model, probes) -> dict[str, jax.Array]:
    """The record entries `_BACKWARD_KEYS` from the probes' gradient (nothing without a layer)."""
    layers = _adjoint_layers(model)
    stats = [s for path, s in backward_stats(probes).items() if path[:-1] in layers]
    if not stats:
        return {}

    def over_layers(reduce, field):
        return reduce(jnp.stack([jnp.asarray(getattr(s, field), jnp.float32) for s in stats]))

    return dict(zip(_BACKWARD_KEYS, (
        over_layers(jnp.mean, "num_steps"), over_layers(jnp.max, "residual_norm"),
        over_layers(jnp.min, "converged"), over_layers(jnp.max, "result"),
    )))


def _is_float(a: Any) -> bool:
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.inexact)


def _all_finite(tree: Any) -> jax.Array:
    """One boolean: every floating-point leaf of `tree` is finite (jit-compatible)."""
    flags = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree) if _is_float(a)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def _pure_state(obj: Any, *filters) -> dict:
    return nnx.to_pure_dict(nnx.state(obj, *filters))


def _set_pure_state(obj: Any, values: dict, *filters) -> None:
    state = nnx.state(obj, *filters)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(obj, state)


@nnx.jit
def eval_step(model, x, y, mask):
    """Summed loss and correct count over the real (`mask`) samples of a batch, plus model info.

    Args:
      model: an `nnx.Module` with `model(x) -> (logits, info)` (put it in eval mode first).
      x: input batch.
      y: integer targets shaped like `logits[..., 0]`.
      mask: `(batch,)` float weights, 1 for real samples and 0 for padding.

    Returns:
      Dict of scalar arrays: `loss_sum`, `correct_sum`, `count` (number of targets counted) and
      the batch mean of each entry of the model's `info`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.train import eval_step
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.linear = nnx.Linear(4, 3, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.linear(x), {}
      >>> out = eval_step(Net(nnx.Rngs(0)), jnp.ones((4, 4)), jnp.zeros(4, jnp.int32),
      ...                 jnp.array([1.0, 1.0, 1.0, 0.0]))
      >>> float(out["count"])
      3.0
    """
    logits, info = _call_model(model, x)
    losses, correct = cross_entropy(logits, y)
    weight = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (y.ndim - 1)), y.shape)
    return {
        "loss_sum": jnp.sum(losses * weight),
        "correct_sum": jnp.sum(correct * weight),
        "count": jnp.sum(weight),
        **info,
    }


# --------------------------------------------------------------------------------------------
# Devices: mesh, sharding, replication
# --------------------------------------------------------------------------------------------


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D data-parallel mesh with axis `"data"` over `devices` (default: all devices).

    Args:
      devices: the devices to use; None means `jax.devices()`.

    Returns:
      A `jax.sharding.Mesh` of shape `(len(devices),)` with an `Auto` (compiler-propagated) axis.

    Example:
      >>> from deq.train import make_mesh
      >>> make_mesh().axis_names
      ('data',)
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), ("data",), (AxisType.Auto,), devices=devices)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a pytree of arrays on `mesh`, split along axis 0 over the `"data"` axis.

    Args:
      batch: pytree of arrays whose leading (batch) size is divisible by the mesh size.
      mesh: a mesh from `make_mesh`.

    Returns:
      The same pytree of `jax.Array`s with `NamedSharding(mesh, P("data"))`.

    Example:
      >>> import numpy as np
      >>> from deq.train import make_mesh, shard_batch
      >>> x = shard_batch(np.zeros((4, 2)), make_mesh())
      >>> x.shape
      (4, 2)
    """
    n = mesh.devices.size
    for leaf in jax.tree_util.tree_leaves(batch):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % n:
            raise ValueError(
                f"the batch size must be divisible by the number of devices ({n}) for "
                f"data-parallel training, got an array of shape {np.shape(leaf)}. Pass a "
                f"batch_size that is a multiple of {n}."
            )
    sharding = NamedSharding(mesh, P("data"))
    if sharding.is_fully_addressable:
        return jax.device_put(batch, sharding)
    # Several processes: every process holds the same global batch and feeds only the rows its
    # own devices hold (`make_array_from_callback` reads just the addressable shards' indices).
    return jax.tree.map(lambda a: _global_array(np.asarray(a), sharding), batch)


def _global_array(a: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array over a multi-process `sharding` from a copy of it in every process."""
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copy a pytree of arrays (or an `nnx` object's state, in place) to every device of `mesh`.

    Args:
      tree: a pytree of arrays, or an `nnx.Module` / `nnx.Optimizer` (its state is replicated
        in place and the object returned).
      mesh: a mesh from `make_mesh`.

    Returns:
      The replicated pytree, or the same `nnx` object.

    Example:
      >>> import jax.numpy as jnp
      >>> from deq.train import make_mesh, replicate
      >>> replicate({"w": jnp.ones(2)}, make_mesh())["w"].sharding.is_fully_replicated
      True
    """
    sharding = NamedSharding(mesh, P())
    put = (functools.partial(jax.device_put, device=sharding) if sharding.is_fully_addressable
           else lambda t: jax.tree.map(lambda a: _replicated(a, sharding), t))
    if isinstance(tree, (nnx.Module, nnx.Optimizer)) or _is_graph_node(tree):
        nnx.update(tree, put(nnx.state(tree)))
        return tree
    return put(tree)


def _replicated(a: Any, sharding: NamedSharding) -> Any:
    """`a` (the same value in every process) replicated over a multi-process `sharding`."""
    if _is_key(a):
        return jax.random.wrap_key_data(_replicated(jax.random.key_data(a), sharding), impl=jax.random.key_impl(a))
    if isinstance(a, jax.Array) and a.sharding == sharding:
        return a
    return _global_array(np.asarray(jax.device_get(a)) if isinstance(a, jax.Array) else np.asarray(a), sharding)


def _is_graph_node(x: Any) -> bool:
    base = getattr(nnx, "Pytree", None) or getattr(nnx, "Object", None)
    return base is not None and isinstance(x, base)


def _bound_train_step(model, optimizer) -> Callable[..., dict]:
    """`train_step` with `model` and `optimizer` bound, via `nnx.cached_partial` when available.

    The cached version skips re-traversing the object graphs on every call (several times less
    Python overhead for small models); it shares the Variables with `model` and `optimizer`, so
    their state stays current. Build it after any mode switch: the cached graph keeps the modes
    it was built with.
    """
    try:
        with nnx.set_graph_mode(True), nnx.set_graph_updates(True):
            return nnx.cached_partial(train_step, model, optimizer)
    except (AttributeError, ValueError, TypeError):  # older/newer flax without the graph-mode API
        return functools.partial(train_step, model, optimizer)


def _check_divisible(name: str, size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if size % n:
        raise ValueError(
            f"{name}={size} must be divisible by the number of devices ({n}) for data-parallel "
            f"training. Pass {name}={max(n, size - size % n)} (a multiple of {n})."
        )


# --------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of one epoch: a pure function of `(seed, epoch)`.

    Args:
      seed: the run's seed (`TrainConfig.seed`).
      epoch: epoch index from 0.

    Returns:
      A non-negative integer < 2**32 for `iterate_batches(..., seed=...)`.

    Example:
      >>> from deq.train import epoch_seed
      >>> epoch_seed(0, 1) == epoch_seed(0, 1) != epoch_seed(0, 2)
      True
    """
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def batch_stream(
    x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, start_step: int = 0,
    total_steps: int | None = None,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Shuffled training batches from step `start_step` on, reproducible from `(seed, epoch)`.

    Epoch `e` visits the data in the order `iterate_batches(x, y, batch_size,
    seed=epoch_seed(seed, e))` (incomplete final batch dropped), so starting at step `s` gives
    exactly the batches an uninterrupted run sees from step `s` on.

    Args:
      x: training inputs.
      y: training targets.
      batch_size: samples per batch.
      seed: the run's seed.
      start_step: index of the first step to produce (0-based).
      total_steps: stop before this step; None = never stop.

    Returns:
      An iterator of `(step, epoch, xb, yb)`.

    Example:
      >>> import numpy as np
      >>> from deq.train import batch_stream
      >>> x = y = np.arange(6)
      >>> full = [yb.tolist() for _, _, _, yb in batch_stream(x, y, 2, seed=0, total_steps=5)]
      >>> tail = [yb.tolist() for _, _, _, yb in batch_stream(x, y, 2, seed=0, start_step=3, total_steps=5)]
      >>> tail == full[3:]
      True
    """
    per_epoch = _batches_per_epoch(len(x), batch_size)
    step = int(start_step)
    epoch, position = divmod(step, per_epoch)
    while total_steps is None or step < total_steps:
        batches = iterate_batches(x, y, batch_size, seed=epoch_seed(seed, epoch), epochs=1)
        for xb, yb in itertools.islice(batches, position, None):
            if total_steps is not None and step >= total_steps:
                return
            yield step, epoch, xb, yb
            step += 1
        epoch, position = epoch + 1, 0


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate(
    model: nnx.Module, x: np.ndarray, y: np.ndarray, batch_size: int, *, mesh: Mesh | None = None,
    stream_slots: int | None = None,
) -> dict[str, float]:
    """Accuracy, mean cross-entropy and mean model info over `(x, y)`, in the model's current mode.

    Call `model.eval()` first for eval-mode solver settings (`fit` does). Every sample counts
    exactly once: the last batch is padded (with repeated samples, masked out of the loss and
    accuracy) so a single compiled shape is used.

    Args:
      model: an `nnx.Module` with `model(x) -> (logits, info)`.
      x: inputs, leading axis = samples.
      y: integer targets.
      batch_size: samples per batch, divisible by the mesh size.
      mesh: data-parallel mesh (default `make_mesh()`: all devices).
      stream_slots: evaluate the whole of `x` in one call with continuous batching instead
        (`deq.nn.stream(model, x, slots=stream_slots)`: every `deq.nn.DEQ` of the model solves
        with that many slots, refilled as samples converge; `batch_size` is then unused). One
        device only.

    Returns:
      `{"loss", "accuracy", **info}` as floats; `info` entries are averaged over batches
      weighted by the number of real samples in each.

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from deq.train import evaluate
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.linear = nnx.Linear(4, 3, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.linear(x), {"depth": 1.0}
      >>> out = evaluate(Net(nnx.Rngs(0)), np.ones((10, 4), np.float32), np.zeros(10, np.int32), 4)
      >>> sorted(out), out["depth"]
      (['accuracy', 'depth', 'loss'], 1.0)
    """
    mesh = make_mesh() if mesh is None else mesh
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"evaluate needs matching non-empty x and y, got {x.shape} and {y.shape}.")
    if stream_slots is not None:
        return _evaluate_streamed(model, x, y, stream_slots, mesh)
    _check_divisible("batch_size", batch_size, mesh)
    totals: dict[str, float] = {}
    info_sums: dict[str, float] = {}
    for start in range(0, len(x), batch_size):
        real = min(batch_size, len(x) - start)
        idx = start + np.arange(batch_size) % real  # pad by repeating this batch's samples
        mask = (np.arange(batch_size) < real).astype(np.float32)
        xb, yb, mb = shard_batch((x[idx], y[idx], mask), mesh)
        out = jax.device_get(eval_step(model, xb, yb, mb))
        for k in ("loss_sum", "correct_sum", "count"):
            totals[k] = totals.get(k, 0.0) + float(out.pop(k))
        for k, v in out.items():
            info_sums[k] = info_sums.get(k, 0.0) + float(v) * real
    result = {"loss": totals["loss_sum"] / totals["count"], "accuracy": totals["correct_sum"] / totals["count"]}
    result.update({k: v / len(x) for k, v in info_sums.items()})
    return result


def _evaluate_streamed(model, x, y, slots, mesh) -> dict[str, float]:
    """`evaluate` over all of `x` at once, every DEQ layer solving with continuous batching."""
    from .nn import stream

    if mesh.size != 1:
        raise ValueError(
            f"evaluate: `stream_slots` evaluates on one device, but the mesh has {mesh.size} devices. "
            "Pass mesh=deq.train.make_mesh(jax.devices()[:1]), or drop stream_slots to evaluate in batches."
        )
    logits, info = stream(model, jnp.asarray(x), slots=slots)
    losses, correct = cross_entropy(logits, jnp.asarray(y))
    out = {"loss": float(jnp.mean(losses)), "accuracy": float(jnp.mean(correct))}
    out.update({k: float(v) for k, v in jax.device_get(info).items()})
    return out


# --------------------------------------------------------------------------------------------
# History
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class History:
    """What `fit` returns: one dict per training step and per evaluation.

    Attributes:
      train: records `{"kind": "train", "step", "epoch", "loss", "accuracy", "grad_norm",
        "skipped", "lr", "step_time", **info}`, plus the adjoint statistics `backward_steps`,
        `backward_residual`, `backward_converged_frac`, `backward_result` for DEQs (see
        `train_step`); `step` counts optimizer updates from 1.
      eval: records `{"kind": "eval", "step", "epoch", "loss", "accuracy", "eval_time", **info}`
        on the test split.
      start_step: the step this `fit` call started from (> 0 when it resumed a checkpoint).
      run_time: wall seconds of the `fit` call (including compilation and evaluation).
      stopped_early: whether a callback stopped the run.

    Example:
      >>> from deq.train import History
      >>> h = History(eval=[{"kind": "eval", "step": 10, "loss": 0.5, "accuracy": 0.9}])
      >>> h.test_accuracy, h.test_loss
      (0.9, 0.5)
    """

    train: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    eval: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    start_step: int = 0
    run_time: float = 0.0
    stopped_early: bool = False

    @property
    def test_accuracy(self) -> float | None:
        """Accuracy of the last evaluation (the end of the run), or None."""
        return self.eval[-1]["accuracy"] if self.eval else None

    @property
    def test_loss(self) -> float | None:
        """Cross-entropy of the last evaluation (the end of the run), or None."""
        return self.eval[-1]["loss"] if self.eval else None

    @property
    def skipped_steps(self) -> int:
        """Training steps whose update was skipped as non-finite (`TrainConfig.skip_nonfinite`)."""
        return sum(1 for r in self.train if r.get("skipped"))

    @property
    def steps_per_second(self) -> float | None:
        """Training steps per second of step time in this `fit` call, excluding its first
        (compiling) step; None when fewer than two steps ran."""
        times = [r["step_time"] for r in self.train if r["step"] > self.start_step + 1]
        return len(times) / sum(times) if times and sum(times) > 0 else None

    def metric(self, name: str, kind: str = "train") -> np.ndarray:
        """The values of `name` across the `kind` ("train" or "eval") records, as a float array
        (NaN where a record lacks it)."""
        records = {"train": self.train, "eval": self.eval}[kind]
        return np.array([r.get(name, np.nan) for r in records], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (see `from_dict`): a copy, never the live record lists.

        Checkpoints are written asynchronously; handing orbax the live lists could let records
        appended after the save (the steps after the checkpoint) leak into it if the write ran
        late, and a resumed run would replay them (suspected cause of one flaky resume test).
        """
        return {"train": [dict(r) for r in self.train], "eval": [dict(r) for r in self.eval]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        """Rebuild the records saved by `to_dict`."""
        return cls(train=[dict(r) for r in data["train"]], eval=[dict(r) for r in data["eval"]])


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


class _Logger:
    """Writes records to `log_dir/metrics.jsonl` and, optionally, TensorBoard."""

    def __init__(self, config: TrainConfig, history: History, start_step: int, *, write: bool = True):
        self._file = None
        self._writer = None
        if config.log_dir is None or not write:  # several processes: process 0 writes
            return
        log_dir = Path(config.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        if config.tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "TrainConfig(tensorboard=True) needs tensorboardX: pip install tensorboardX "
                    "(or pip install 'deq-jax[tensorboard]')."
                ) from e
            self._writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)
        # Rewrite the file from the (possibly restored) history: a resumed run's log then
        # matches an uninterrupted run's, without records the killed run wrote after its checkpoint.
        self._file = open(log_dir / "metrics.jsonl", "w", buffering=1)
        for record in sorted(history.train + history.eval, key=lambda r: (r["step"], r["kind"] != "train")):
            self._file.write(json.dumps(record) + "\n")

    def log(self, record: Mapping[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()


def _progress_bar(config: TrainConfig, total: int, start: int, *, enabled: bool = True):
    from tqdm.auto import tqdm

    enabled = enabled and config.progress and sys.stderr is not None and sys.stderr.isatty()
    return tqdm(total=total, initial=start, disable=not enabled, unit="step", desc="fit", dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _is_key(a: Any) -> bool:
    return hasattr(a, "dtype") and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def _to_saveable(state) -> dict:
    """nnx state as a pure dict with PRNG keys replaced by their raw data (orbax stores arrays)."""
    return jax.tree.map(lambda a: jax.random.key_data(a) if _is_key(a) else a, nnx.to_pure_dict(state))


def _target(state: nnx.State) -> dict:
    """Abstract restore target (shapes, dtypes, shardings) for `_to_saveable(state)`."""
    import orbax.checkpoint as ocp

    return jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(state))


# What a checkpoint holds of an object: all its state but the backward probes (always zero, and
# present only while `fit` runs), so checkpoints read the same with and without them.
_CHECKPOINTED = nnx.Not(BackwardProbe)


def _load_into(obj: Any, saved: dict) -> None:
    restored = jax.tree.map(
        lambda t, s: jax.random.wrap_key_data(s, impl=jax.random.key_impl(t)) if _is_key(t) else s,
        _pure_state(obj, _CHECKPOINTED), saved,
    )
    _set_pure_state(obj, restored, _CHECKPOINTED)


def _checkpoint_path(checkpoint_dir: str | Path) -> Path:
    """`checkpoint_dir` as an absolute path, created if missing and checked to be writable."""
    path = Path(checkpoint_dir).absolute()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is" if p == path else f"lies under {str(p)!r}, which is"
                raise ValueError(
                    f"TrainConfig.checkpoint_dir={str(checkpoint_dir)!r} {where} an existing file, "
                    "not a directory. Pass a directory path (it is created if missing), or move the "
                    "file away."
                )
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".deq-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(
            f"TrainConfig.checkpoint_dir={str(checkpoint_dir)!r} is not a writable directory "
            f"({e.strerror or e}). Pass a directory you can write to, or fix its permissions."
        ) from e
    return path


def _open_manager(path: Path, config: TrainConfig):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        path, options=ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints, create=True),
    )


def _save(manager, step: int, model, optimizer, meta: dict) -> None:
    import orbax.checkpoint as ocp

    manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(_to_saveable(nnx.state(model, _CHECKPOINTED))),
            optimizer=ocp.args.StandardSave(_to_saveable(nnx.state(optimizer, _CHECKPOINTED))),
            meta=ocp.args.JsonSave(meta),
        ),
    )


def restore_checkpoint(
    checkpoint_dir: str | Path, model: nnx.Module, optimizer: nnx.Optimizer | None = None, *,
    step: int | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by `fit` into `model` (and `optimizer`) in place.

    Args:
      checkpoint_dir: the run's `TrainConfig.checkpoint_dir`.
      model: a model with the same structure as the saved one (e.g. freshly built).
      optimizer: optionally, an `nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)`.
      step: the step to load; None = the newest one that can be read (a warning names each
        newer checkpoint that cannot: truncated, missing or garbled files).

    Raises:
      CheckpointError: no checkpoint can be read (or not the `step` asked for); the message
        names the unreadable paths.
      ValueError: the checkpoint is intact but was saved from a differently built model.

    Returns:
      The checkpoint's metadata: `step`, `epoch`, `batch_in_epoch`, `config` and `history`
      (a `History.to_dict()`).

    Example:
      >>> import tempfile, numpy as np
      >>> from flax import nnx
      >>> from deq.data import Dataset
      >>> from deq.train import TrainConfig, fit, restore_checkpoint
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.linear = nnx.Linear(4, 2, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.linear(x), {}
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=(32, 4)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int32)
      >>> ds = Dataset(x, y, x, y, 2, "toy", (4,))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = fit(Net(nnx.Rngs(0)), ds, TrainConfig(total_steps=4, batch_size=8, checkpoint_dir=d))
      ...     meta = restore_checkpoint(d, Net(nnx.Rngs(1)))
      >>> meta["step"]
      4
    """
    import orbax.checkpoint as ocp

    path = Path(checkpoint_dir).absolute()
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
    try:
        if step is None:
            meta = _restore_newest(manager, model, optimizer)
            if meta is None:
                raise FileNotFoundError(f"no checkpoint found in {str(path)!r}.")
            return meta
        if step not in manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint of step {step} in {str(path)!r}; it has steps {sorted(manager.all_steps())}."
            )
        try:
            restored = _read(manager, step, model, optimizer)
        except _Unreadable as e:
            raise CheckpointError(f"the checkpoint of step {step} cannot be read: {e}.",
                                  paths=[str(e.step_dir)]) from e
        return _load(restored, model, optimizer)
    finally:
        manager.close()


class _Unreadable(Exception):
    """A checkpoint whose files cannot be read (truncated, missing, garbled): not a user error."""

    def __init__(self, step: int, step_dir: Path, path: Path, reason: str):
        super().__init__(f"{str(path)!r} ({reason})")
        self.step, self.step_dir, self.path, self.reason = step, step_dir, path, reason


def _restore_newest(manager, model, optimizer, *, check: Callable[[dict], None] | None = None,
                    set_aside: bool = False) -> dict[str, Any] | None:
    """Load the newest readable checkpoint into `model` (and `optimizer`); None when there is none.

    Unreadable newer checkpoints are skipped with a warning (and, with `set_aside`, renamed
    `<step>.corrupt` so that those steps can be saved again); `CheckpointError` when every one is
    unreadable. `check(meta)` runs before anything is loaded, so a refused checkpoint leaves the
    model untouched.
    """
    unreadable: list[_Unreadable] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = _read(manager, step, model, optimizer, check=check)
        except _Unreadable as e:
            unreadable.append(e)
            continue
        meta = _load(restored, model, optimizer)
        if unreadable:
            moved = [_set_aside(e.step_dir) for e in unreadable] if set_aside else []
            if moved:
                manager.reload()
            one, names = len(moved) == 1, ", ".join(repr(str(m)) for m in moved)
            renamed = (f". {'It was' if one else 'They were'} renamed {names}: delete "
                       f"{'it' if one else 'them'} when no longer needed." if moved else ".")
            warnings.warn(
                f"{'resumed from' if set_aside else 'loaded'} the checkpoint of step {step} in "
                f"{str(manager.directory)!r}, the newest that can be read; newer checkpoints cannot: "
                + "; ".join(f"step {e.step}: {e}" for e in unreadable) + renamed,
                stacklevel=3,
            )
        return meta
    if unreadable:
        raise CheckpointError(
            f"no checkpoint in {str(manager.directory)!r} can be read: "
            + "; ".join(f"step {e.step}: {e}" for e in unreadable)
            + ". Restore them from a copy, or start over with fit(..., resume=False) (which deletes "
            "them) or a new checkpoint_dir.",
            paths=[str(e.step_dir) for e in unreadable],
        )
    return None


def _set_aside(step_dir: Path) -> Path:
    target, n = step_dir.with_name(f"{step_dir.name}.corrupt"), 1
    while target.exists():
        target, n = step_dir.with_name(f"{step_dir.name}.corrupt-{n}"), n + 1
    step_dir.rename(target)
    return target


def _read(manager, step: int, model, optimizer, *,
          check: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Read checkpoint `step` (nothing is loaded yet): its metadata first, passed to `check`, then
    the arrays. `_Unreadable` if its files are damaged or its parameters non-finite; `ValueError`
    if it was saved from a differently built model."""
    import orbax.checkpoint as ocp

    step_dir = Path(manager.directory) / str(step)
    targets = {"model": _target(nnx.state(model, _CHECKPOINTED))}
    if optimizer is not None:
        targets["optimizer"] = _target(nnx.state(optimizer, _CHECKPOINTED))
    try:  # orbax and tensorstore raise many types for damaged files: diagnosed by _diagnose
        meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:  # noqa: BLE001
        _diagnose(step, step_dir, {}, e)
    if check is not None:  # e.g. the run's settings, before a restore that may fail on them
        check(meta)
    items = {name: ocp.args.StandardRestore(t) for name, t in targets.items()}
    try:
        restored = dict(manager.restore(step, args=ocp.args.Composite(**items)))
    except Exception as e:  # noqa: BLE001
        _diagnose(step, step_dir, targets, e)
    bad = _first_nonfinite(restored["model"], only=_param_paths(model))
    if bad is not None:
        raise _Unreadable(step, step_dir, step_dir / "model", f"parameter {bad!r} holds non-finite values")
    return {**restored, "meta": meta}


def _diagnose(step: int, step_dir: Path, targets: dict, error: Exception):
    """Raise the right error for a failed restore: unreadable files, or a different structure."""
    import orbax.checkpoint as ocp

    meta_file = step_dir / "meta" / "metadata"
    try:
        json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise _Unreadable(step, step_dir, meta_file, _first_line(e)) from error
    for name, target in targets.items():
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                saved = checkpointer.metadata(step_dir / name).item_metadata
        except Exception as e:  # noqa: BLE001
            raise _Unreadable(step, step_dir, step_dir / name, _first_line(e)) from error
        if saved is None:  # orbax could not read the item's metadata: the files are damaged
            raise _Unreadable(step, step_dir, step_dir / name, _first_line(error)) from error
        diffs = _structure_diffs(getattr(saved, "tree", saved), target)
        if diffs:
            raise ValueError(
                f"could not restore the checkpoint at step {step} of {str(step_dir.parent)!r} into this "
                f"{name}: its structure differs from the saved one ({'; '.join(diffs)}). Build the "
                "model and config exactly as in the run that saved it, or use a new checkpoint_dir."
            ) from error
    raise _Unreadable(step, step_dir, step_dir, _first_line(error)) from error


def _structure_diffs(saved: Any, target: Any, limit: int = 3) -> list[str]:
    def table(tree):
        return {_path_str(p): (tuple(leaf.shape), str(leaf.dtype))
                for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    old, new = table(saved), table(target)
    diffs = [f"{k!r} is not in this one" for k in old if k not in new]
    diffs += [f"{k!r} is not in the checkpoint" for k in new if k not in old]
    diffs += [f"{k!r} saved {old[k][1]}{list(old[k][0])} vs now {new[k][1]}{list(new[k][0])}"
              for k in new if k in old and old[k] != new[k]]
    return diffs[:limit] + ([f"{len(diffs) - limit} more"] if len(diffs) > limit else [])


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_nonfinite(tree: Any, only: frozenset[str] | None = None) -> str | None:
    """Path of the first floating-point leaf of `tree` (among the paths `only`, if given)
    holding a NaN or inf, or None."""
    leaves = [(p, a) for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]
              if _is_float(a) and (only is None or _path_str(p) in only)]
    flags = jax.device_get([jnp.all(jnp.isfinite(a)) for _, a in leaves])
    return next((_path_str(p) for (p, _), ok in zip(leaves, flags) if not ok), None)


def _param_paths(model) -> frozenset[str]:
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return frozenset(_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def _load(restored: dict, model, optimizer) -> dict[str, Any]:
    _load_into(model, restored["model"])
    if optimizer is not None:
        _load_into(optimizer, restored["optimizer"])
    return dict(restored["meta"])


def _check_resume(meta: Mapping[str, Any], config: TrainConfig, num_train: int) -> None:
    saved = meta.get("config", {})
    diffs = [
        f"{name}: checkpoint {saved.get(name)!r} vs now {getattr(config, name)!r}"
        for name in _TRAJECTORY_FIELDS
        if saved.get(name) != _saved_form(getattr(config, name))
    ]
    if meta.get("num_train") != num_train:
        diffs.append(f"number of training samples: checkpoint {meta.get('num_train')} vs now {num_train}")
    if diffs:
        raise ValueError(
            f"cannot resume from the checkpoint in {config.checkpoint_dir!r}: it was written by a run "
            f"with different settings ({'; '.join(diffs)}). Use the same config and data to resume, "
            "a new checkpoint_dir to start over, or fit(..., resume=False) to ignore it."
        )


def _saved_form(value: Any) -> Any:
    """A config value as `dataclasses.asdict(config)` stores it (a schedule becomes a dict)."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _meta(step: int, epoch: int, per_epoch: int, config: TrainConfig, num_train: int, history: History) -> dict:
    return {
        "format": _FORMAT_VERSION,
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": step - epoch * per_epoch,
        "epoch_seed": epoch_seed(config.seed, epoch),
        "num_train": num_train,
        "config": dataclasses.asdict(config),
        "history": history.to_dict(),
    }


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------

Callback = Callable[[dict[str, Any]], "bool | None"]


def _train_record(step: int, epoch: int, metrics: Mapping[str, Any], lr: float, step_time: float) -> dict:
    """The record of one training step: every per-step statistic is added here."""
    return {"kind": "train", "step": step, "epoch": epoch,
            **{k: float(v) for k, v in jax.device_get(metrics).items()},
            "lr": float(lr), "step_time": step_time}


def _nonfinite_error(record: Mapping[str, Any], config: TrainConfig, history: History) -> NonFiniteError:
    step, loss, grad_norm = record["step"], record["loss"], record["grad_norm"]
    losses = f"loss={loss}" + (f", aux_loss={record['aux_loss']}" if "aux_loss" in record else "")
    if not (math.isfinite(loss) and math.isfinite(record.get("aux_loss", 0.0))):
        what, detail = "loss", f"the loss is not finite ({losses})"
    elif not math.isfinite(grad_norm):
        what, detail = "gradient", f"the gradient is not finite (global norm {grad_norm}; {losses})"
    else:
        what = "update"
        detail = f"the updated parameters are not finite ({losses}, gradient norm {grad_norm})"
    message = (
        f"fit: training step {step} (epoch {record['epoch']}) is non-finite: {detail}. The update was "
        "not applied, so the model keeps its parameters "
        + (f"after step {step - 1}" if step > 1 else "from before training")
        + (" and no checkpoint of this step was written" if config.checkpoint_dir is not None else "")
        + ". Look for inputs that overflow inside the model, lower learning_rate (now "
        f"{config.learning_rate}) or clip gradients (clip_norm={config.clip_norm}), or pass "
        "TrainConfig(skip_nonfinite=True) to skip such steps."
    )
    partial = History(train=list(history.train), eval=list(history.eval), start_step=history.start_step)
    return NonFiniteError(message, step=step, what=what, record=dict(record), history=partial)


# --------------------------------------------------------------------------------------------
# Data checks (before the first step)
# --------------------------------------------------------------------------------------------


def _check_dataset(dataset: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int | None]:
    """The four arrays, checked: non-empty, finite inputs, integer targets in range."""
    arrays = []
    for name in ("x_train", "y_train", "x_test", "y_test"):
        if not hasattr(dataset, name):
            raise TypeError(
                "fit: dataset must have x_train, y_train, x_test and y_test arrays (e.g. a "
                f"deq.data.Dataset), got a {type(dataset).__name__} without {name!r}."
            )
        arrays.append(np.asarray(getattr(dataset, name)))
    num_classes = getattr(dataset, "num_classes", None)
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1
    ):
        raise ValueError(f"fit: dataset.num_classes must be an integer >= 1 (or None), got {num_classes!r}.")
    source = f"dataset.num_classes = {num_classes}"
    for split, (x, y) in (("train", arrays[:2]), ("test", arrays[2:])):
        if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
            raise ValueError(
                f"fit: dataset.x_{split} and y_{split} must have one entry per sample along axis 0, "
                f"got shapes {x.shape} and {y.shape}."
            )
        if len(x) == 0:
            raise ValueError(
                f"fit: the {split} split is empty (dataset.x_{split} has shape {x.shape}); fit trains on "
                "x_train and evaluates on x_test, so both need samples."
            )
        _check_inputs(f"x_{split}", x)
        _check_targets(f"y_{split}", y, num_classes, source)
    return (*arrays, None if num_classes is None else int(num_classes))


def _check_inputs(name: str, x: np.ndarray) -> None:
    if not (np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.bool_)):
        raise TypeError(f"fit: dataset.{name} must be a numeric array, got dtype {x.dtype}.")
    if not np.issubdtype(x.dtype, np.inexact):
        return
    finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if not finite.all():
        i = int(np.argmin(finite))
        value = x[i][~np.isfinite(x[i])].flat[0]
        raise ValueError(
            f"fit: dataset.{name}[{i}] holds a non-finite value ({value}) ({int((~finite).sum())} of the "
            f"{len(x)} samples hold one). One such sample makes the loss and every parameter non-finite: "
            "drop or repair these samples (e.g. with np.isfinite(x).all(axis=1) as a mask) before fit."
        )


def _one_hot_hint(y: Any, width: int | None) -> str:
    y = np.asarray(y)
    one_hot = y.ndim >= 2 and (width is None or y.shape[-1] == width)
    if one_hot and np.isin(y, (0, 1)).all() and (y.sum(-1) == 1).all():
        return (f" The targets {y.shape} look one-hot: pass class indices instead, "
                "y.argmax(axis=-1).astype(np.int32).")
    return ""


def _check_targets(name: str, y: np.ndarray, limit: int | None, source: str) -> None:
    """Integer targets in `[0, limit)` (only `>= 0` when `limit` is None)."""
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(
            f"fit: dataset.{name} must hold integer class indices, got dtype {y.dtype} (e.g. "
            f"{name}[0] = {y.reshape(len(y), -1)[0, 0]!r})." + _one_hot_hint(y, limit)
            + " If they are class indices stored as another type, pass y.astype(np.int32)."
        )
    bad = y < 0 if limit is None else (y < 0) | (y >= limit)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        where = ", ".join(map(str, index))
        allowed = "be >= 0" if limit is None else f"lie in [0, {limit}) ({source})"
        raise ValueError(
            f"fit: dataset.{name}[{where}] = {y[index]} is not a class index: targets must {allowed}; "
            f"{int(bad.sum())} of the {y.size} targets in {name} are out of range. Fix or drop those "
            "samples (there is no ignore index: a -1 'unlabelled' marker is not skipped)"
            + (", or give the model more outputs." if limit is not None else ".")
        )


def _check_model(model, x_train, y_train, x_test, y_test, batch_size: int, num_classes: int | None) -> None:
    """Trace the model on one batch's shapes (nothing is compiled or run): the output contract,
    the targets' shape and the logits width against every target; finite parameters."""
    probes = [(x_train, y_train)]
    if x_test.shape[1:] != x_train.shape[1:] or y_test.shape[1:] != y_train.shape[1:]:
        probes.append((x_test, y_test))
    for x, y in probes:
        spec = (jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), x.dtype),
                jax.ShapeDtypeStruct((batch_size, *y.shape[1:]), y.dtype))

        def logits_of(m, xb, yb):
            logits, _ = _call_model(m, xb)
            cross_entropy(logits, yb)  # checks the targets' shape at trace time
            return logits

        width = nnx.eval_shape(logits_of, model, *spec).shape[-1]
    if num_classes is None or width < num_classes:
        source = f"the model outputs {width} logits per target"
        _check_targets("y_train", y_train, width, source)
        _check_targets("y_test", y_test, width, source)
    bad = _first_nonfinite(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    if bad is not None:
        raise ValueError(
            f"fit: the model's parameter {bad!r} holds non-finite values before training: every step "
            "would be non-finite. Build (or restore) the model afresh."
        )


def _check_processes_agree(model, *, dataset_arrays, config: TrainConfig, mesh: Mesh, resume: bool) -> None:
    """Several processes: the same config, data, initial parameters and mesh in all of them (a
    `ValueError` naming what differs, raised in every process), before anything is replicated."""
    if jax.process_count() == 1:
        return
    names = ("x_train", "y_train", "x_test", "y_test")
    check_same("fit", {
        "config": dataclasses.asdict(config), "resume": resume, **dict(zip(names, dataset_arrays)),
        "mesh": [list(mesh.axis_names), list(mesh.devices.shape)],
        "initial parameters": jax.device_get(_pure_state(model, nnx.Param)),
    })


def fit(
    model: nnx.Module,
    dataset: Any,
    config: TrainConfig,
    *,
    callbacks: Sequence[Callback] | None = None,
    aux_loss_fn: Callable[[nnx.Module, jax.Array, jax.Array], jax.Array] | None = None,
    resume: bool = True,
    mesh: Mesh | None = None,
) -> History:
    """Train `model` in place on `dataset.x_train` / `y_train`; evaluate on `x_test` / `y_test`.

    Each step draws the next batch of `batch_stream`, shards it over the mesh and runs
    `train_step` (Adam/AdamW from `make_optimizer`). The test split is evaluated (in
    `model.eval()` mode, then back to `model.train()`) every `eval_every` steps and at the end.
    With `checkpoint_dir`, model + optimizer state and the run's position (step, epoch, batch
    in epoch, history) are saved every `checkpoint_every` steps and at the end; a later `fit`
    with the same config resumes from the latest checkpoint and reproduces the uninterrupted
    run exactly (same batches, same keys, same parameters, same records apart from timings).
    Every train record holds the step's forward statistics (the model's `info`) and, for models
    with `deq.nn.DEQ` layers differentiated by `deq.IFT`, the adjoint's beside them
    (`backward_steps`, `backward_residual`, `backward_converged_frac`, `backward_result`; see
    `train_step` and `TrainConfig.backward_stats`). A solve with `throw=True` that fails
    raises one `deq.SolveError`.

    Args:
      model: `nnx.Module` with `model(x) -> (logits, info)`; trained in place and left in
        train mode, with the same variables as given.
      dataset: object with `x_train`, `y_train`, `x_test`, `y_test` arrays (a `deq.data.Dataset`).
      config: a `TrainConfig`.
      callbacks: callables `callback(record) -> bool | None` called with every train and eval
        record; returning True stops the run after this step (it is then evaluated and
        checkpointed, and `History.stopped_early` is set).
      aux_loss_fn: extra loss `aux_loss_fn(model, x, key) -> scalar`, weighted by
        `config.jacobian_reg` (required when that is > 0, ignored when it is 0), e.g. a
        Jacobian Frobenius-norm estimate for DEQs. Must be hashable (a function, not a lambda
        re-created each call, to avoid recompiling).
      resume: resume from the latest checkpoint in `config.checkpoint_dir` (True), or start
        from scratch and DELETE the checkpoints already there (False).
      mesh: data-parallel mesh (default `make_mesh()`: all devices).

    Returns:
      A `History` (train and eval records, `test_accuracy`, `test_loss`, `steps_per_second`).

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from deq.data import load_digits
      >>> from deq.train import TrainConfig, fit
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.l1, self.l2 = nnx.Linear(64, 64, rngs=rngs), nnx.Linear(64, 10, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.l2(nnx.relu(self.l1(x.reshape(x.shape[0], -1)))), {}
      >>> history = fit(MLP(nnx.Rngs(0)), load_digits(), TrainConfig(epochs=5, batch_size=64,
      ...               learning_rate=3e-3, progress=False))
      >>> history.test_accuracy > 0.9
      True
    """
    callbacks = list(callbacks or [])
    if not isinstance(config, TrainConfig):
        raise TypeError(f"fit: config must be a deq.train.TrainConfig, got {type(config).__name__}.")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"fit: model must be a flax.nnx.Module, got {type(model).__name__}.")
    schedule = (config.jacobian_reg if isinstance(config.jacobian_reg, JacobianSchedule)
                else JacobianSchedule(weight=float(config.jacobian_reg)))
    if schedule.weight > 0 and aux_loss_fn is None:
        raise ValueError(
            f"fit: config.jacobian_reg={config.jacobian_reg} > 0 needs aux_loss_fn(model, x, key) -> "
            "scalar (e.g. a Jacobian Frobenius-norm estimate). Pass aux_loss_fn=... or jacobian_reg=0."
        )
    aux_weight = schedule.weight
    aux = aux_loss_fn if aux_weight > 0 else None
    x_train, y_train, x_test, y_test, num_classes = _check_dataset(dataset)
    num_train = len(x_train)
    per_epoch = _batches_per_epoch(num_train, config.batch_size)
    total = total_steps_for(config, num_train)
    eval_batch_size = config.eval_batch_size or config.batch_size
    mesh = make_mesh() if mesh is None else mesh
    _check_divisible("batch_size", config.batch_size, mesh)
    _check_divisible("eval_batch_size", eval_batch_size, mesh)
    checkpoint_path = None if config.checkpoint_dir is None else _checkpoint_path(config.checkpoint_dir)
    model.train()
    _check_model(model, x_train, y_train, x_test, y_test, config.batch_size, num_classes)
    _check_processes_agree(model, dataset_arrays=(x_train, y_train, x_test, y_test), config=config,
                           mesh=mesh, resume=resume)

    started = time.perf_counter()
    lrs = _lr_table(config.learning_rate, config.warmup_steps, total)
    optimizer = nnx.Optimizer(model, make_optimizer(config, total_steps=total), wrt=nnx.Param)
    base_key = jax.random.key(config.seed)

    history, start = History(), 0
    manager = logger = bar = None
    # The adjoint statistics: probes for the run, removed at the end (the model's state is then
    # as it was given); a model that holds probes already keeps them.
    add_probes = config.backward_stats and not _has_probes(model) and bool(_adjoint_layers(model))
    try:
        if add_probes:
            enable_backward_stats(model)
        replicate(model, mesh)
        replicate(optimizer, mesh)
        manager = None if checkpoint_path is None else _open_manager(checkpoint_path, config)
        meta = None
        if manager is not None and resume:
            meta = _restore_newest(manager, model, optimizer, set_aside=True,
                                   check=lambda m: _check_resume(m, config, num_train))
        if meta is not None:
            history, start = History.from_dict(meta["history"]), int(meta["step"])
        elif manager is not None:
            for old_step in manager.all_steps():  # orbax would silently keep a stale step
                manager.delete(old_step)
        history.start_step = start
        primary = is_primary()
        logger = _Logger(config, history, start, write=primary)
        bar = _progress_bar(config, total, start, enabled=primary)

        def emit(record: dict[str, Any]) -> bool:
            (history.train if record["kind"] == "train" else history.eval).append(record)
            logger.log(record)
            return any(bool(cb(record)) for cb in callbacks)

        def run_eval(step: int, epoch: int) -> bool:
            t0 = time.perf_counter()
            model.eval()
            try:
                with clean_errors():
                    result = evaluate(model, x_test, y_test, eval_batch_size, mesh=mesh)
            finally:
                model.train()
            record = {"kind": "eval", "step": step, "epoch": epoch, **result,
                      "eval_time": time.perf_counter() - t0}
            return emit(record)

        model.train()
        step_fn = _bound_train_step(model, optimizer)
        step, epoch = start, start // per_epoch
        for index, epoch, xb, yb in batch_stream(
            x_train, y_train, config.batch_size, seed=config.seed, start_step=start, total_steps=total
        ):
            xb, yb = shard_batch((xb, yb), mesh)
            weight = schedule(index) if aux is not None else 0.0
            key = None if weight == 0 else jax.random.fold_in(base_key, index)
            t0 = time.perf_counter()
            with clean_errors():  # a failed solve with throw=True: one deq.SolveError
                if weight == 0:  # no penalty on this step: not computed at all
                    metrics = jax.block_until_ready(step_fn(xb, yb, None))
                else:
                    metrics = jax.block_until_ready(step_fn(
                        xb, yb, key, aux_loss_fn=aux, aux_weight=aux_weight,
                        aux_scale=jnp.float32(weight / aux_weight)))
            step_time = time.perf_counter() - t0
            step = index + 1
            record = _train_record(step, epoch, metrics, lrs[index], step_time)
            if record["skipped"] and not config.skip_nonfinite:
                logger.log(record)
                raise _nonfinite_error(record, config, history)
            stop = emit(record)
            if stop or step == total or (config.eval_every and step % config.eval_every == 0):
                stop = run_eval(step, epoch) or stop
            if manager is not None and (stop or step == total or step % config.checkpoint_every == 0):
                _save(manager, step, model, optimizer,
                      _meta(step, step // per_epoch, per_epoch, config, num_train, history))
                if jax.process_count() > 1:
                    # Across processes orbax commits a save at the next barrier (the next save):
                    # a run killed before it would find no checkpoint. Commit it now.
                    manager.wait_until_finished()
            bar.update(1)
            if bar.n % max(1, total // 200) == 0:
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}", refresh=False)
            if stop:
                history.stopped_early = True
                break
        if not history.eval or history.eval[-1]["step"] != step:
            run_eval(step, max(step - 1, 0) // per_epoch)
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
        if add_probes:
            enable_backward_stats(model, enable=False)
    history.run_time = time.perf_counter() - started
    return history
