"""What a solve returns: the fixed point and its statistics."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax


class RESULTS:
    """Integer result codes found in `Stats.result`, with what each means and what to try."""

    CONVERGED = 0
    MAX_STEPS = 1
    NONFINITE = 2

    messages = {
        CONVERGED: "converged: ||f(z) - z|| <= atol + rtol * ||f(z)||",
        MAX_STEPS: (
            "did not converge within max_steps: increase `max_steps`, loosen `rtol`/`atol`, use "
            "Anderson or Broyden instead of plain iteration, or use a contractive cell"
        ),
        NONFINITE: (
            "the residual became NaN or inf, so the solve stopped at the last finite iterate: "
            "damp the solver (`damping` < 1), lower the learning rate, or use a contractive cell"
        ),
    }

    @classmethod
    def describe(cls, code: int) -> str:
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
      converged: whether `residual_norm <= atol + rtol * ||f(z)||` was reached.
      result: a code from `deq.RESULTS` (converged, max_steps reached, non-finite residual).
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


@_dataclass_pytree
class Solution:
    """The result of `deq.fixed_point`.

    Attributes:
      value: pytree shaped like `z0`: the lowest-residual finite iterate seen (for a converged
        sample, the iterate that passed the stopping test).
      stats: a `Stats` with the forward solve's statistics.
    """

    value: Any
    stats: Stats
