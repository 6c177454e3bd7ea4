"""Spectral norms that stay finite: the SVD with a QR retry, and cheap guaranteed bounds.

Shared by the contractive cells (`deq.nn.contractive`, whose exact bound is differentiated) and
the monotone operators (`deq.monotone`, whose Lipschitz constant sets the splitting step size).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.lax import linalg as lax_linalg


def safe_sqrt(s):
    """`sqrt(s)` for `s >= 0`, with a zero (not NaN) gradient at `s = 0`."""
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


def svd_with_retry(M, compute_uv):
    """JAX's default SVD of `M` (batched over leading axes), redone by the QR-based algorithm
    where it returned non-finite values.

    Training drives the top of a normalized weight's spectrum together, and on such a matrix
    (128 x 128, float32, top singular values equal to 6 digits; met training on MNIST-1D) the
    default CPU SVD (LAPACK's divide and conquer, gesdd) returned NaN singular vectors where the
    QR-based one (gesvd, about twice as slow here) did not. The retry runs only when needed.
    """
    out = lax_linalg.svd(M, full_matrices=False, compute_uv=compute_uv)
    outs = out if compute_uv else (out,)
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(o)) for o in outs]))
    return jax.lax.cond(
        ok, lambda: out,
        lambda: lax_linalg.svd(M, full_matrices=False, compute_uv=compute_uv,
                               algorithm=lax_linalg.SvdAlgorithm.QR))


def cheap_bounds(M):
    """Frobenius and Hölder (`sqrt(||M||_1 ||M||_inf)`) upper bounds on `||M||_2`, per matrix
    of a batch `(..., m, n)` (real or complex)."""
    a = jnp.abs(M)
    # Scale by the largest entry so the sum of squares neither underflows nor overflows.
    scale = jax.lax.stop_gradient(jnp.max(a, axis=(-2, -1), keepdims=True))
    scale = jnp.where(scale > 0, scale, 1.0)
    frob = scale[..., 0, 0] * safe_sqrt(jnp.sum(jnp.square(a / scale), axis=(-2, -1)))
    holder = safe_sqrt(jnp.max(jnp.sum(a, axis=-2), axis=-1)) * safe_sqrt(jnp.max(jnp.sum(a, axis=-1), axis=-1))
    return frob, holder


def spectral_norm(M):
    """The largest spectral norm `max_i ||M_i||_2` over a batch `(..., m, n)` of matrices.

    Exact (largest singular value, by `svd_with_retry`); a matrix on which both SVD algorithms
    fail contributes the smaller of its `cheap_bounds` instead, so the result is always finite
    (for finite `M`) and never below the true value.
    """
    s = jnp.max(svd_with_retry(M, compute_uv=False), axis=-1)
    return jnp.max(jnp.where(jnp.isfinite(s), s, jnp.minimum(*cheap_bounds(M))))
