r"""Monotone parametrizations of the equilibrium weight: dense and convolutional.

Both parametrize `W = (1 - m) I - A^T A + B - B^T`, so that

.. math:: I - W = m I + A^\top A + (B^\top - B) \succeq m I

for every value of `A` and `B` (the skew part `B^T - B` does not contribute to the symmetric
part): `I - W` is `m`-strongly monotone by construction, and the equilibrium
`z = relu(W z + U x + b)` exists, is unique, and is found by operator splitting
(`deq.monotone.ForwardBackward`, `deq.monotone.PeacemanRachford`).

An operator is a pytree (its arrays are leaves, `m` and the padding are static), so it passes
through `jax.jit`, `jax.grad` and `jax.vmap`. Every method acts on a batch: arrays with a
leading axis `B` followed by the per-sample state shape (`(n,)` dense, `(H, W, C)` conv).

References:
  Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deq._linalg import spectral_norm


def _register(cls, data, meta):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))


def _check_m(owner: str, m: Any) -> None:
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
        raise ValueError(
            f"{owner}: the monotonicity margin `m` must be a positive number, got {m!r}. "
            "It guarantees I - W >= m I; pass e.g. m=0.5 (larger m: faster, better-conditioned "
            "solves but a more constrained W)."
        )


def _cg_tol(dtype) -> float:
    """Relative tolerance of inner conjugate-gradient solves: about eps^(3/4) of the dtype."""
    return float(jnp.finfo(dtype).eps) ** 0.75


# --------------------------------------------------------------------------------------------
# Dense
# --------------------------------------------------------------------------------------------


class _DenseResolvent:
    """`(I + alpha (I - W))^{-1}` from one LU factorization, applied to rows `(B, n)`."""

    def __init__(self, lu_piv):
        self.lu_piv = lu_piv

    def solve(self, v):
        return jax.scipy.linalg.lu_solve(self.lu_piv, v.T, trans=0).T

    def solve_T(self, v):
        return jax.scipy.linalg.lu_solve(self.lu_piv, v.T, trans=1).T


class MonotoneDense:
    r"""The dense monotone parametrization: `W = (1 - m) I - A^T A + B - B^T`, input `U x + b`.

    .. math::
        z^\star = \mathrm{relu}(W z^\star + U x + b), \qquad
        I - W = m I + A^\top A + B^\top - B \succeq m I .

    A pytree of parameters (`A`, `B`: `(n, n)`; `U`: `(n, d)`; `b`: `(n,)`) with the static
    margin `m`. Methods act on rows: `z` is `(batch, n)`, `x` is `(batch, d)`.

    Args:
      A: `(n, n)`, the symmetric positive semidefinite part `A^T A`.
      B: `(n, n)`, the skew-symmetric part `B - B^T`.
      U: `(n, d)` input weight.
      b: `(n,)` bias.
      m: the strong-monotonicity margin `m > 0`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deq.monotone import MonotoneDense
      >>> op = MonotoneDense.init(jax.random.PRNGKey(0), 3, 5, m=0.5)
      >>> W = op.weight()
      >>> sym = jnp.eye(5) - (W + W.T) / 2
      >>> bool(jnp.linalg.eigvalsh(sym).min() >= 0.5 - 1e-5)
      True

    References:
      Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
    """

    A: Any
    B: Any
    U: Any
    b: Any
    m: float = 1.0

    @classmethod
    def init(cls, key, in_features: int, hidden: int, *, m: float = 1.0, scale: float = 1.0,
             dtype=jnp.float32) -> "MonotoneDense":
        """Random parameters: `A`, `B` with i.i.d. `N(0, scale^2 / (3 n))` entries (so their
        spectral norms are about `1.15 scale`), LeCun-normal `U`, zero `b`."""
        _check_m("MonotoneDense", m)
        n, d = hidden, in_features
        flat = jax.random.normal(key, (2 * n * n + n * d,), dtype)  # one draw: one compilation
        s = scale / math.sqrt(3 * n)
        A = s * flat[: n * n].reshape(n, n)
        B = s * flat[n * n: 2 * n * n].reshape(n, n)
        U = flat[2 * n * n:].reshape(n, d) / math.sqrt(d)
        return cls(A, B, U, jnp.zeros((n,), dtype), float(m))

    @property
    def hidden(self) -> int:
        return self.A.shape[0]

    def weight(self) -> jax.Array:
        """The `(n, n)` matrix `W = (1 - m) I - A^T A + B - B^T`."""
        n = self.A.shape[0]
        eye = jnp.eye(n, dtype=self.A.dtype)
        return (1 - self.m) * eye - self.A.T @ self.A + self.B - self.B.T

    def state_shape(self, x_shape) -> tuple:
        """Per-sample state shape for a per-sample input shape."""
        return (self.hidden,)

    def inject(self, x):
        """`U x + b` for rows `x` of shape `(batch, d)`."""
        return x @ self.U.T + self.b

    def matvec(self, z):
        """`W z` for rows `z` of shape `(batch, n)`."""
        return z @ self.weight().T

    def rmatvec(self, z):
        """`W^T z` for rows `z` of shape `(batch, n)`."""
        return z @ self.weight()

    def lipschitz(self, shape=None):
        """`L = ||I - W||_2` exactly (largest singular value; a guaranteed upper bound should
        the SVD fail, see `deq._linalg.spectral_norm`)."""
        n = self.A.shape[0]
        return spectral_norm(jnp.eye(n, dtype=self.A.dtype) - self.weight())

    def resolvent(self, alpha, shape=None) -> _DenseResolvent:
        """`(I + alpha (I - W))^{-1}` as an object with `solve(v)` and `solve_T(v)` (its
        transpose), both from one LU factorization computed here."""
        n = self.A.shape[0]
        eye = jnp.eye(n, dtype=self.A.dtype)
        N = eye + alpha * (eye - self.weight())
        return _DenseResolvent(jax.scipy.linalg.lu_factor(N))


MonotoneDense = _register(MonotoneDense, data=("A", "B", "U", "b"), meta=("m",))


# --------------------------------------------------------------------------------------------
# Convolutional
# --------------------------------------------------------------------------------------------

_DN = ("NHWC", "HWIO", "NHWC")
PADDINGS = ("circular", "zero")


def conv(K, z, padding: str):
    """Stride-1 'same' cross-correlation of NHWC `z` with the HWIO kernel `K`.

    `padding="circular"` wraps around the borders (the operator is then diagonalized by the
    2-D FFT); `"zero"` pads with zeros. The low-side padding is `(k - 1) // 2` in both cases.
    """
    dt = jnp.result_type(K, z)
    K, z = K.astype(dt), z.astype(dt)
    kh, kw = K.shape[:2]
    if padding == "circular":
        ph, pw = (kh - 1) // 2, (kw - 1) // 2
        z = jnp.pad(z, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)), mode="wrap")
        pad = "VALID"
    else:
        pad = "SAME"
    return jax.lax.conv_general_dilated(z, K, (1, 1), pad, dimension_numbers=_DN)


def conv_transpose(K, y, padding: str):
    """The exact adjoint of `conv(K, ., padding)`: `<conv(K, x), y> = <x, conv_transpose(K, y)>`.

    Computed as the linear transpose of the convolution itself (what its VJP applies), so the
    pair is adjoint to rounding error for either padding.
    """
    shape = jax.ShapeDtypeStruct(y.shape[:-1] + (K.shape[2],), y.dtype)
    (x,) = jax.linear_transpose(lambda z: conv(K, z, padding), shape)(y)
    return x


def conv_symbol(K, H: int, W: int):
    r"""The Fourier symbol of the circular convolution `conv(K, ., "circular")` on `H x W` images.

    Returns `K_hat` of shape `(H, W, C_out, C_in)` (complex) with
    `fft2(conv(K, z))[w] = K_hat[w] @ fft2(z)[w]` at every frequency `w`:

    .. math:: \hat K(\omega) = \sum_{d} e^{2\pi i\, \omega \cdot (d - p) / N} K[d]^\top .
    """
    kh, kw = K.shape[:2]
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    ctype = jnp.result_type(K.dtype, jnp.complex64)
    fh = jnp.exp(2j * np.pi * np.outer(np.arange(H), np.arange(kh) - ph) / H).astype(ctype)
    fw = jnp.exp(2j * np.pi * np.outer(np.arange(W), np.arange(kw) - pw) / W).astype(ctype)
    return jnp.einsum("ha,wb,abio->hwoi", fh, fw, K.astype(ctype))


def _herm(M):
    return jnp.conj(jnp.swapaxes(M, -1, -2))


class _FFTResolvent:
    """`(I + alpha (I - W))^{-1}` for circular convolutions: one `C x C` inverse per frequency."""

    def __init__(self, inv, dtype):
        self.inv = inv  # (H, W, C, C) complex
        self.dtype = dtype

    def _apply(self, M, v):
        vh = jnp.fft.fft2(v, axes=(1, 2))
        xh = jnp.einsum("hwoi,bhwi->bhwo", M, vh)
        return jnp.real(jnp.fft.ifft2(xh, axes=(1, 2))).astype(self.dtype)

    def solve(self, v):
        return self._apply(self.inv, v)

    def solve_T(self, v):
        return self._apply(_herm(self.inv), v)


def _batched_cg(A, b, x0, tol, maxiter):
    """Conjugate gradients for `A x = b`, `A` symmetric positive definite acting on each sample
    of a batch (leading axis) independently: per-sample step sizes and stopping at
    `||r|| <= tol ||b||`."""
    axes = tuple(range(1, b.ndim))
    dot = lambda u, v: jnp.sum(u * v, axis=axes)
    expand = lambda s: s.reshape(s.shape + (1,) * (b.ndim - 1))
    r = b - A(x0)
    rs = dot(r, r)
    thresh = tol**2 * dot(b, b)

    def cond(c):
        k, _, _, _, rs = c
        return (k < maxiter) & jnp.any(rs > thresh)

    def body(c):
        k, x, r, p, rs = c
        Ap = A(p)
        active = rs > thresh
        pAp = dot(p, Ap)
        a = jnp.where(active & (pAp > 0), rs / jnp.where(pAp > 0, pAp, 1), 0)
        x = x + expand(a) * p
        r = r - expand(a) * Ap
        rs_new = jnp.where(active, dot(r, r), rs)
        beta = jnp.where(active & (rs > 0), rs_new / jnp.where(rs > 0, rs, 1), 0)
        p = jnp.where(expand(active), r + expand(beta) * p, p)
        return k + 1, x, r, p, rs_new

    _, x, _, _, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), x0, r, r, rs))
    return x


class _CGResolvent:
    """`(I + alpha (I - W))^{-1}` matrix-free, by conjugate gradients on the normal equations,
    per sample (zero padding, where the FFT does not diagonalize the operator)."""

    def __init__(self, op, alpha, maxiter):
        self.op, self.alpha, self.maxiter = op, alpha, maxiter

    def _N(self, v, transpose):
        mv = self.op.rmatvec if transpose else self.op.matvec
        return (1 + self.alpha) * v - self.alpha * mv(v)

    def _solve(self, v, transpose):
        N = lambda u: self._N(u, transpose)
        NT = lambda u: self._N(u, not transpose)
        x0 = v / (1 + self.alpha * self.op.m)
        # N^{-1} v solves N^T N x = N^T v; N^{-T} v solves N N^T x = N v.
        return _batched_cg(lambda u: NT(N(u)), NT(v), x0, _cg_tol(v.dtype), self.maxiter)

    def solve(self, v):
        return self._solve(v, False)

    def solve_T(self, v):
        return self._solve(v, True)


class MonotoneConv:
    r"""The convolutional monotone parametrization on NHWC feature maps.

    .. math::
        W z = (1 - m) z - A^\top (A z) + B z - B^\top z, \qquad
        z^\star = \mathrm{relu}(W z^\star + U * x + b),

    where `A z`, `B z` are stride-1 'same' convolutions with `C x C` kernels (circular or zero
    padding) and `A^T`, `B^T` are their exact adjoints (transposed convolutions), so
    `I - W = m I + A^T A + B^T - B ⪰ m I` holds for the operator actually applied. `U * x` is a
    zero-padded 'same' convolution from the input channels.

    With circular padding every convolution is diagonalized by the 2-D FFT (a `C x C` matrix
    per frequency), which gives the exact `||I - W||_2` and an exact, cheap resolvent
    `(I + alpha (I - W))^{-1}` for Peaceman-Rachford. With zero padding the resolvent is
    computed by conjugate gradients and `||I - W||_2` is replaced by an upper bound.

    Args:
      A: `(k, k, C, C)` HWIO kernel of the positive semidefinite part `A^T A`.
      B: `(k, k, C, C)` HWIO kernel of the skew part `B - B^T`.
      U: `(k_u, k_u, C_in, C)` HWIO input kernel.
      b: `(C,)` bias.
      m: the strong-monotonicity margin `m > 0`.
      padding: `"circular"` or `"zero"`.
      cg_maxiter: most conjugate-gradient iterations per resolvent (zero padding only).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from deq.monotone import MonotoneConv
      >>> op = MonotoneConv.init(jax.random.PRNGKey(0), 1, 4, m=0.5)
      >>> z = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 4))
      >>> float(jnp.vdot(z, z - op.matvec(z))) >= 0.5 * float(jnp.vdot(z, z)) - 1e-3
      True

    References:
      Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
    """

    A: Any
    B: Any
    U: Any
    b: Any
    m: float = 1.0
    padding: str = "circular"
    cg_maxiter: int = 200

    @classmethod
    def init(cls, key, in_channels: int, channels: int, *, kernel_size: int = 3,
             input_kernel_size: int = 3, m: float = 1.0, scale: float = 1.0,
             padding: str = "circular", dtype=jnp.float32) -> "MonotoneConv":
        """Random parameters: `A`, `B` with i.i.d. `N(0, scale^2 / (3 k^2 C))` entries, LeCun
        normal `U`, zero `b`."""
        _check_m("MonotoneConv", m)
        if padding not in PADDINGS:
            raise ValueError(f"MonotoneConv: `padding` must be one of {PADDINGS}, got {padding!r}.")
        k, ku, c, ci = kernel_size, input_kernel_size, channels, in_channels
        na, nu = k * k * c * c, ku * ku * ci * c
        flat = jax.random.normal(key, (2 * na + nu,), dtype)  # one draw: one compilation
        s = scale / math.sqrt(3 * k * k * c)
        A = s * flat[:na].reshape(k, k, c, c)
        B = s * flat[na: 2 * na].reshape(k, k, c, c)
        U = flat[2 * na:].reshape(ku, ku, ci, c) / math.sqrt(ku * ku * ci)
        return cls(A, B, U, jnp.zeros((c,), dtype), float(m), padding)

    @property
    def channels(self) -> int:
        return self.A.shape[-1]

    def state_shape(self, x_shape) -> tuple:
        """Per-sample state shape `(H, W, C)` for a per-sample input shape `(H, W, C_in)`."""
        return tuple(x_shape[:2]) + (self.channels,)

    def inject(self, x):
        """`U * x + b` for NHWC `x`."""
        return conv(self.U, x, "zero") + self.b

    def _A(self, z):
        return conv(self.A, z, self.padding)

    def _AT(self, z):
        return conv_transpose(self.A, z, self.padding)

    def _B(self, z):
        return conv(self.B, z, self.padding)

    def _BT(self, z):
        return conv_transpose(self.B, z, self.padding)

    def matvec(self, z):
        """`W z = (1 - m) z - A^T A z + B z - B^T z` for NHWC `z`."""
        return (1 - self.m) * z - self._AT(self._A(z)) + self._B(z) - self._BT(z)

    def rmatvec(self, z):
        """`W^T z = (1 - m) z - A^T A z - B z + B^T z` for NHWC `z`."""
        return (1 - self.m) * z - self._AT(self._A(z)) + self._BT(z) - self._B(z)

    def _symbols(self, H, W):
        Ah, Bh = conv_symbol(self.A, H, W), conv_symbol(self.B, H, W)
        return Ah, Bh

    def monotone_symbol(self, H: int, W: int):
        """The Fourier symbol of `I - W` with circular padding: `(H, W, C, C)` complex."""
        Ah, Bh = self._symbols(H, W)
        eye = jnp.eye(self.channels, dtype=Ah.dtype)
        return self.m * eye + _herm(Ah) @ Ah - Bh + _herm(Bh)

    def lipschitz(self, shape):
        """`||I - W||_2` on `(H, W, C)` maps: exact for circular padding (largest singular value
        over the FFT symbols); an upper bound for zero padding, where the zero-padded operators
        are compressions of circular ones on an `(H + k - 1) x (W + k - 1)` canvas:
        `||I - W|| <= m + ||A_c||^2 + ||B_c - B_c^T||`."""
        H, W = shape[0], shape[1]
        if self.padding == "circular":
            return spectral_norm(self.monotone_symbol(H, W)).astype(self.A.dtype)
        k = max(self.A.shape[0], self.A.shape[1])
        Ah, Bh = self._symbols(H + k - 1, W + k - 1)
        return (self.m + spectral_norm(Ah) ** 2 + spectral_norm(Bh - _herm(Bh))).astype(self.A.dtype)

    def resolvent(self, alpha, shape):
        """`(I + alpha (I - W))^{-1}` on `(H, W, C)` maps, with `solve(v)` and `solve_T(v)`:
        per-frequency `C x C` inverses (circular padding, exact) or conjugate gradients
        (zero padding)."""
        if self.padding == "circular":
            M = self.monotone_symbol(shape[0], shape[1])
            eye = jnp.eye(self.channels, dtype=M.dtype)
            return _FFTResolvent(jnp.linalg.inv(eye + alpha * M), self.A.dtype)
        return _CGResolvent(self, alpha, self.cg_maxiter)


MonotoneConv = _register(MonotoneConv, data=("A", "B", "U", "b"), meta=("m", "padding", "cg_maxiter"))
