"""What a solve returns: the fixed point and its statistics."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax


class RESULTS:
    """Integer result codes found in `Stats.result`, with what each means and what to try.

    ====  ============  ==================================================================
    code  name          meaning
    ====  ============  ==================================================================
    0     CONVERGED     `||f(z) - z|| <= atol + rtol ||f(z)||` at the returned value
                        (for an adjoint solve: `<= atol + rtol ||dL/dz*||`)
    1     MAX_STEPS     `max_steps` steps without meeting the test (with `rtol = atol = 0`,
                        a fixed budget, this is the expected outcome)
    2     NONFINITE     an iterate or its image under `f` held NaN or inf; the solve stopped
                        at the last finite iterate
    3     DIVERGED      the iterates grew past `divergence_limit` times the scale of the
                        start (`max(||z0||, ||f(z0)||)`): no fixed point was being
                        approached, whatever the relative residual said
    ====  ============  ==================================================================

    Example:
      >>> import deq
      >>> deq.RESULTS.name(3), deq.RESULTS.CONVERGED
      ('DIVERGED', 0)
      >>> deq.RESULTS.describe(1).split(":")[0]
      'did not converge within max_steps'
    """

    CONVERGED = 0
    MAX_STEPS = 1
    NONFINITE = 2
    DIVERGED = 3

    names = {CONVERGED: "CONVERGED", MAX_STEPS: "MAX_STEPS", NONFINITE: "NONFINITE", DIVERGED: "DIVERGED"}

    messages = {
        CONVERGED: "converged: ||f(z) - z|| <= atol + rtol * ||f(z)||",
        MAX_STEPS: (
            "did not converge within max_steps: increase `max_steps`, loosen `rtol`/`atol`, use "
            "Anderson or Broyden instead of plain iteration, or use a contractive cell"
        ),
        NONFINITE: (
            "an iterate or f(iterate) became NaN or inf, so the solve stopped at the last finite "
            "iterate: damp the solver (`damping` < 1), lower the learning rate, check the input "
            "for NaN/inf, or use a contractive cell"
        ),
        DIVERGED: (
            "the iterates grew without bound (past `divergence_limit` times the scale of the "
            "start), so no fixed point was being approached: f may have none (e.g. an affine map "
            "with a unit eigenvalue), or the solver is unstable on it: damp it, use a contractive "
            "cell, or raise the solver's `divergence_limit` if the fixed point really is that far"
        ),
    }

    def __init__(self, *args, **kwargs):
        raise TypeError(
            "deq.RESULTS is a namespace of result codes, not a constructor: use "
            "deq.RESULTS.name(code) for the name, deq.RESULTS.describe(code) for the meaning, "
            "or compare with deq.RESULTS.CONVERGED."
        )

    @classmethod
    def name(cls, code) -> str:
        """The name of a result code (`'CONVERGED'`, ...), or `'UNKNOWN(<code>)'`."""
        code = int(code)
        return cls.names.get(code, f"UNKNOWN({code})")

    @classmethod
    def describe(cls, code) -> str:
        """What a result code means and what to try."""
        return cls.messages.get(int(code), f"unknown result code {code}")


def _dataclass_pytree(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@_dataclass_pytree
class Stats:
    """Statistics of a solve. Per sample (shape `(B,)`) when `batch_axis=0`, scalars otherwise.

    Attributes:
      num_steps: solver steps taken (each step costs one evaluation of `f`, plus backtracking
        evaluations for `Broyden(line_search=True)`).
      residual_norm: `||f(z) - z||` (l2 over all leaves of one sample) at the returned value.
      converged: whether the stopping test `residual_norm <= atol + rtol * min(||f(z)||, 100 s0)`
        (`s0 = max(||z0||, ||f(z0)||)`) held at the returned value.
      result: a code from `deq.RESULTS`: CONVERGED, MAX_STEPS, NONFINITE or DIVERGED
        (`deq.RESULTS.name(code)`, `deq.RESULTS.describe(code)`).
      residual_history: `||f(z_k) - z_k||` at each step `k = 0..max_steps` (NaN after the
        solve stopped for that sample), shape `(..., max_steps + 1)`.
      lipschitz: a Lipschitz constant of `f` in `z` attached by `deq.Certificate.attach` (None
        otherwise): a proven bound or an estimate, as the certificate's `guaranteed` says.
      error_bound: an upper bound on `||z - z*||` when the solve was asked for a certificate
        (None otherwise); see `deq.certify`.
    """

    num_steps: Any
    residual_norm: Any
    converged: Any
    result: Any
    residual_history: Any
    lipschitz: Optional[Any] = None
    error_bound: Optional[Any] = None

    def summary(self) -> str:
        """One line for a log: converged count, result codes, steps and the largest residual.

        Example:
          >>> import jax.numpy as jnp, deq
          >>> sol = deq.fixed_point(lambda z, a: 0.5 * z + a, jnp.zeros((2, 3)), jnp.ones((2, 3)), batch_axis=0)
          >>> sol.stats.summary().split(";")[0]
          'forward: 2/2 converged (2 CONVERGED)'
        """
        return _summary(self.num_steps, self.residual_norm, self.converged, self.result, "forward")


@_dataclass_pytree
class Solution:
    """The result of `deq.fixed_point`.

    Attributes:
      value: pytree shaped like `z0`: the lowest-residual finite iterate seen (for a converged
        sample, the iterate that passed the stopping test).
      stats: a `Stats` with the forward solve's statistics.
      aux: with `has_aux=True`, the auxiliary output of `f` at the returned iterate,
        `f(value, args)[1]` (differentiable); None otherwise.
    """

    value: Any
    stats: Stats
    aux: Any = None


def _summary(num_steps, residual, converged, result, what: str) -> str:
    import numpy as np

    steps = np.atleast_1d(np.asarray(num_steps, dtype=np.float64))
    res = np.atleast_1d(np.asarray(residual, dtype=np.float64))
    conv = np.atleast_1d(np.asarray(converged)).astype(bool)
    codes = np.atleast_1d(np.asarray(result)).astype(np.int64)
    counts = ", ".join(f"{int((codes == c).sum())} {RESULTS.name(c)}" for c in np.unique(codes))
    finite = res[np.isfinite(res)]
    worst = f"{finite.max():.3e}" if finite.size else "nan"
    return (f"{what}: {conv.sum()}/{conv.size} converged ({counts}); steps mean {steps.mean():.1f}, "
            f"max {steps.max():.0f}; largest residual {worst}")


@_dataclass_pytree
class BackwardStats:
    """Statistics of the backward (adjoint) solve of `deq.IFT`, delivered as a cotangent.

    A forward pass cannot return what its backward pass has not computed yet, so these arrive
    the way gradients do: pass a zero probe, `deq.BackwardStats.probe(batch)`, to
    `deq.fixed_point(..., backward_stats=probe)` (or `deq.nn.DEQ(..., backward_stats=probe)`)
    and differentiate with respect to it; its "gradient" is a `BackwardStats` holding the
    adjoint's statistics (as floating arrays). It works inside `jax.jit`, `nnx.jit` and
    `jax.vmap`; used by several solves in one loss, the probe receives their sum.

    Attributes (per sample, shape `(B,)`, for a probe of `batch=B`; aggregated over the batch for
    a probe of `batch=None`: the mean number of steps, the largest residual, the fraction of
    samples converged and the largest result code):
      num_steps: adjoint solver steps (-1 for `deq.GMRES`, which does not report them).
      residual_norm: the adjoint residual `||J^T u + g - u||` at the returned `u`.
      converged: 1.0 where `residual_norm <= atol + rtol ||g||` (`g = dL/dz*`), else 0.0.
      result: a `deq.RESULTS` code.

    Backward strategies without an adjoint solve (`PhantomGrad`, `JFB`, `Unrolled`) leave the
    probe's cotangent at zero.

    Example:
      >>> import jax, jax.numpy as jnp, deq
      >>> f = lambda z, a: jnp.tanh(0.5 * z + a)
      >>> def loss(a, probe):
      ...     return deq.fixed_point(f, jnp.zeros((4, 3)), a, batch_axis=0, backward_stats=probe).value.sum()
      >>> grads, bstats = jax.grad(loss, argnums=(0, 1))(jnp.ones((4, 3)), deq.BackwardStats.probe(4))
      >>> bstats.converged.tolist(), bstats.num_steps.shape
      ([1.0, 1.0, 1.0, 1.0], (4,))
    """

    num_steps: Any
    residual_norm: Any
    converged: Any
    result: Any

    @classmethod
    def probe(cls, batch: Optional[int] = None, dtype: Any = None) -> "BackwardStats":
        """A zero probe: per sample for `batch=B` (shape `(B,)`), aggregated for `batch=None`."""
        import jax.numpy as jnp

        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 0):
            raise ValueError(f"BackwardStats.probe: `batch` must be None or an integer >= 0, got {batch!r}. "
                             "Pass the batch size of the solve (batch_axis=0), or None.")
        shape = () if batch is None else (batch,)
        z = jnp.zeros(shape, jnp.float32 if dtype is None else dtype)
        return cls(num_steps=z, residual_norm=z, converged=z, result=z)

    def summary(self) -> str:
        """One line: how many adjoint solves converged, their steps and largest residual."""
        return _summary(self.num_steps, self.residual_norm, self.converged, self.result, "backward")


def probe_cotangent(probe, out):
    """The cotangent of a `BackwardStats` probe: the adjoint loop output `out`, shaped like it."""
    if probe is None:
        return None
    import jax.numpy as jnp

    if not isinstance(probe, BackwardStats):
        raise TypeError(f"`backward_stats` must be a deq.BackwardStats probe, got {type(probe).__name__}. "
                        "Pass deq.BackwardStats.probe(batch_size).")
    fields = {
        "num_steps": out.num_steps.astype(jnp.float32),
        "residual_norm": out.residual,
        "converged": out.converged.astype(jnp.float32),
        "result": out.result.astype(jnp.float32),
    }
    ref = probe.num_steps
    if jnp.ndim(ref) == 0:
        fields = {
            "num_steps": jnp.mean(fields["num_steps"]),
            "residual_norm": jnp.max(jnp.where(jnp.isnan(fields["residual_norm"]), jnp.inf, fields["residual_norm"])),
            "converged": jnp.mean(fields["converged"]),
            "result": jnp.max(fields["result"]),
        }
    elif jnp.shape(ref) != jnp.shape(fields["num_steps"]):
        raise ValueError(f"`backward_stats`: the probe has shape {jnp.shape(ref)} but the solve has "
                         f"{jnp.shape(fields['num_steps'])[0]} sample(s). Pass "
                         f"deq.BackwardStats.probe({jnp.shape(fields['num_steps'])[0]}) (or probe(None) for totals).")
    return BackwardStats(**{k: jnp.asarray(v).astype(jnp.result_type(getattr(probe, k))) for k, v in fields.items()})
