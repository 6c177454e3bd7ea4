"""A small zoo of fixed-point problems with known answers, shared by the core tests.

Conventions:
  * The maps (`linear_map`, `tanh_cell`, ...) are module-level functions, so repeated solves with
    the same shapes hit `deq.fixed_point`'s compilation cache (the suite stays fast).
  * Every `make_*` builder takes a seed and returns plain numpy float64 arrays. Nothing here
    touches JAX at import time: the arrays become float64 or float32 JAX arrays only inside the
    tests (float64 under the core tests' x64 fixture).
  * Unbatched maps act on one sample; `batched_*` maps act row-wise on a leading batch axis, as
    `batch_axis=0` requires.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- shared configs
#
# Solver configurations are static (hashed) arguments of the compiled solve: tests that share
# the same map, shapes and configuration share one compilation. Reuse these where possible.

TIGHT = dict(rtol=0.0, atol=1e-12, max_steps=1000)
"""Tight float64 tolerances; max_steps is large enough for plain iteration at contraction 0.95."""

N = 6
"""State size of the shared linear problems."""

CELL_N, CELL_D = 5, 3
"""State and input sizes of the shared tanh cell."""


def solvers(**kw) -> dict:
    """Every forward solver (Broyden with and without line search) with the same tolerances."""
    import deq

    return {
        "iteration": deq.FixedPointIteration(**kw),
        "anderson": deq.Anderson(**kw),
        "broyden": deq.Broyden(**kw),
        "broyden_ls": deq.Broyden(line_search=True, **kw),
    }


# ----------------------------------------------------------------------------- matrices


def orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def with_spectral_norm(rng: np.random.Generator, n: int, norm: float, m: int | None = None) -> np.ndarray:
    """A random (n, m) matrix whose largest singular value is exactly `norm`."""
    a = rng.normal(size=(n, n if m is None else m))
    return norm * a / np.linalg.norm(a, 2)


def symmetric_with_spectrum(rng: np.random.Generator, eigenvalues) -> np.ndarray:
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    q = orthogonal(rng, eigenvalues.size)
    a = q @ np.diag(eigenvalues) @ q.T
    return 0.5 * (a + a.T)


# ----------------------------------------------------------------------------- linear maps


def linear_map(z, p):
    """f(z) = A z + b."""
    return p["A"] @ z + p["b"]


def batched_linear_map(z, p):
    """Row-wise f(z_i) = A z_i + b_i for z of shape (B, n)."""
    return z @ p["A"].T + p["b"]


@dataclasses.dataclass
class Linear:
    A: np.ndarray
    b: np.ndarray  # (n,) or (B, n)

    @property
    def args(self) -> dict:
        return {"A": self.A, "b": self.b}

    @property
    def z_star(self) -> np.ndarray:
        """The analytic fixed point: solve (I - A) z = b (row-wise when b is batched)."""
        n = self.A.shape[0]
        return np.linalg.solve(np.eye(n) - self.A, self.b.T).T

    @property
    def spectral_radius(self) -> float:
        return float(np.max(np.abs(np.linalg.eigvals(self.A))))

    @property
    def spectral_norm(self) -> float:
        return float(np.linalg.norm(self.A, 2))


def make_linear(seed: int, n: int, norm: float = 0.5, batch: int | None = None) -> Linear:
    """A contraction: ||A||_2 = norm < 1."""
    rng = np.random.default_rng(seed)
    A = with_spectral_norm(rng, n, norm)
    b = rng.normal(size=(n,) if batch is None else (batch, n))
    return Linear(A, b)


def make_slow(seed: int, n: int = 8, rate: float = 0.95) -> Linear:
    """A slow contraction: symmetric, spectrum in [0, rate] with `rate` itself an eigenvalue, so
    plain iteration contracts the error by exactly `rate` per step along the slowest direction."""
    rng = np.random.default_rng(seed)
    eig = np.linspace(0.0, rate, n)
    A = symmetric_with_spectrum(rng, eig)
    # b with a unit component along the slowest eigenvector, so iteration really is slow.
    b = rng.normal(size=n)
    return Linear(A, b)


def make_divergent(seed: int, n: int = 6, low: float = -1.5, high: float = 0.5) -> Linear:
    """Plain iteration diverges (an eigenvalue `low` < -1) but I - A is invertible (its spectrum is
    [1 - high, 1 - low] = [0.5, 2.5]), so Anderson/Broyden (Krylov-like on linear maps) converge."""
    rng = np.random.default_rng(seed)
    A = symmetric_with_spectrum(rng, np.linspace(low, high, n))
    b = rng.normal(size=n)
    return Linear(A, b)


# ----------------------------------------------------------------------------- tanh cells


def tanh_cell(z, args):
    """f(z) = tanh(W z + U x + b) with nested-dict params: args = (params, x)."""
    params, x = args
    inner = params["inner"]
    return jnp.tanh(params["W"] @ z + inner["U"] @ x + inner["b"])


def batched_tanh_cell(z, args):
    """Row-wise tanh cell: z (B, n), x (B, d)."""
    params, x = args
    inner = params["inner"]
    return jnp.tanh(z @ params["W"].T + x @ inner["U"].T + inner["b"])


@dataclasses.dataclass
class TanhCell:
    params: dict  # {"W": (n, n), "inner": {"U": (n, d), "b": (n,)}}
    x: np.ndarray  # (d,) or (B, d)

    @property
    def args(self):
        return (self.params, self.x)

    @property
    def n(self) -> int:
        return self.params["W"].shape[0]

    @property
    def contraction(self) -> float:
        """A Lipschitz bound of the cell in z (tanh is 1-Lipschitz)."""
        return float(np.linalg.norm(self.params["W"], 2))


def make_tanh_cell(seed: int, n: int, d: int, contraction: float = 0.5, batch: int | None = None,
                   x_scale=1.0) -> TanhCell:
    rng = np.random.default_rng(seed)
    params = {
        "W": with_spectral_norm(rng, n, contraction),
        "inner": {"U": rng.normal(size=(n, d)) / math.sqrt(d), "b": 0.5 * rng.normal(size=n)},
    }
    x = rng.normal(size=(d,) if batch is None else (batch, d))
    x = x * (np.reshape(x_scale, (-1, 1)) if batch is not None else x_scale)
    return TanhCell(params, x)


def tanh_cell_fixed_point_residual(cell: TanhCell, z) -> float:
    """||f(z) - z|| computed in numpy, independently of the library."""
    p = cell.params
    fz = np.tanh(np.asarray(z) @ p["W"].T + cell.x @ p["inner"]["U"].T + p["inner"]["b"])
    return float(np.linalg.norm(fz - np.asarray(z)))


# ----------------------------------------------------------------------------- pytree states

LEAF_SHAPES = {"a": (3,), "b": (2, 2)}
STATE_SIZE = 7


def flatten_state(z: dict, batch: bool = False):
    lead = z["a"].shape[:1] if batch else ()
    return jnp.concatenate([jnp.reshape(z["a"], lead + (-1,)), jnp.reshape(z["b"], lead + (-1,))], axis=-1)


def unflatten_state(v, batch: bool = False):
    lead = v.shape[:1] if batch else ()
    return {"a": v[..., :3].reshape(lead + (3,)), "b": v[..., 3:].reshape(lead + (2, 2))}


def dict_linear_map(z, p):
    """A linear map on the dict state {"a": (3,), "b": (2, 2)} that mixes the two leaves."""
    return unflatten_state(p["A"] @ flatten_state(z) + p["b"])


def batched_dict_linear_map(z, p):
    """Row-wise `dict_linear_map` on {"a": (B, 3), "b": (B, 2, 2)}; p["b"] is (B, 7)."""
    return unflatten_state(flatten_state(z, True) @ p["A"].T + p["b"], True)


def make_dict_linear(seed: int, norm: float = 0.6, batch: int | None = None) -> Linear:
    return make_linear(seed, STATE_SIZE, norm, batch)


def dict_z_star(problem: Linear, batch: bool = False) -> dict:
    z = problem.z_star
    return {"a": z[..., :3].reshape(z.shape[:-1] + (3,)), "b": z[..., 3:].reshape(z.shape[:-1] + (2, 2))}


# ----------------------------------------------------------------------------- failing maps


def square_plus_two(z, args):
    """z**2 + 2: no real fixed point; iteration from 1 blows up to inf after ~10 steps."""
    return z**2 + 2.0


def nan_beyond_ten(z, args):
    """2 z + 1 (diverging) that returns NaN once |z| > 10."""
    return jnp.where(jnp.abs(z) > 10.0, jnp.nan, 2.0 * z + 1.0)


# ----------------------------------------------------------------------------- helpers


def tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def tree_norm(a):
    return jnp.sqrt(tree_vdot(a, a))


def cosine(a, b) -> float:
    return float(tree_vdot(a, b) / (tree_norm(a) * tree_norm(b)))


def tree_axpy(alpha, x, y):
    """alpha * x + y over pytrees."""
    return jax.tree_util.tree_map(lambda u, v: alpha * u + v, x, y)


def tree_max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def random_like(seed: int, tree: Any):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: rng.normal(size=np.shape(a)), tree)


def central_difference(fun, x, v, eps: float = 1e-5) -> float:
    """(fun(x + eps v) - fun(x - eps v)) / (2 eps): the derivative of `fun` at `x` along `v`."""
    return float((fun(tree_axpy(eps, v, x)) - fun(tree_axpy(-eps, v, x))) / (2 * eps))


# ----------------------------------------------------------------------------- numpy references


def tanh_cell_solve_np(cell: TanhCell, iters: int = 400) -> np.ndarray:
    """The fixed point of an (unbatched) contractive tanh cell by plain iteration in numpy."""
    p = cell.params
    shift = p["inner"]["U"] @ cell.x + p["inner"]["b"]
    z = np.zeros(cell.n)
    for _ in range(iters):
        z = np.tanh(p["W"] @ z + shift)
    return z


def tanh_cell_loss_np(cell: TanhCell, c: np.ndarray) -> float:
    return float(c @ tanh_cell_solve_np(cell))


def tanh_cell_grad_np(cell: TanhCell, c: np.ndarray) -> dict:
    """The exact (implicit-function-theorem) gradient of `c . z*` w.r.t. the params, in numpy.

    With D = diag(1 - z*^2), J = D W and u = (I - J^T)^{-1} c:
    dL/dW = (D u) z*^T, dL/dU = (D u) x^T, dL/db = D u.
    """
    p = cell.params
    z = tanh_cell_solve_np(cell)
    D = 1.0 - z**2
    J = D[:, None] * p["W"]
    u = np.linalg.solve(np.eye(cell.n) - J.T, c)
    Du = D * u
    return {"W": np.outer(Du, z), "inner": {"U": np.outer(Du, cell.x), "b": Du}}


def tanh_cell_jfb_grad_np(cell: TanhCell, c: np.ndarray) -> dict:
    """The JFB gradient: the vector-Jacobian product of f(sg(z*), params) with c."""
    z = tanh_cell_solve_np(cell)
    Dc = (1.0 - z**2) * c
    return {"W": np.outer(Dc, z), "inner": {"U": np.outer(Dc, cell.x), "b": Dc}}


def with_params(cell: TanhCell, params) -> TanhCell:
    return TanhCell(params, cell.x)


def tree_rel_err(a, b) -> float:
    """||a - b|| / ||b|| over all leaves."""
    diff = jax.tree_util.tree_map(lambda x, y: np.asarray(x) - np.asarray(y), a, b)
    return float(np.sqrt(sum(np.sum(d**2) for d in jax.tree_util.tree_leaves(diff)))
                 / np.sqrt(sum(np.sum(np.asarray(y) ** 2) for y in jax.tree_util.tree_leaves(b))))
