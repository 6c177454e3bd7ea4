"""A safeguarded chain of solvers: each sample hands over to the next solver when one fails."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .._api import check_positive_int, check_range, check_tolerances, frozen
from .._tree import row_norm, where_rows
from ._base import AbstractSolver, Best
from .anderson import Anderson
from .broyden import Broyden
from .fixed_point_iteration import FixedPointIteration


class FallbackState(NamedTuple):
    """The state of `Fallback` (every leaf has leading axis `B`).

    Attributes:
      states: one state per solver of the chain (a tuple), each for all `B` rows; a row's
        state for solver `i` is meaningful only while the row is on stage `i`.
      stage: `(B,)` int32, the index of the solver each sample is currently using.
      best_x: `(B, n)` the lowest-residual finite iterate of each sample so far.
      best_fx: `(B, n)` `F(best_x)`.
      best_res: `(B,)` its residual (`inf` if none is finite).
      ref_res: `(B,)` the best residual when the current stall count started.
      stall: `(B,)` int32, steps since the best residual last fell below
        `stall_factor * ref_res`.
    """

    states: tuple
    stage: jax.Array
    best_x: jax.Array
    best_fx: jax.Array
    best_res: jax.Array
    ref_res: jax.Array
    stall: jax.Array


def _default_chain():
    return (Anderson(), Broyden(), FixedPointIteration(damping=0.5))


@frozen
class Fallback(AbstractSolver):
    r"""A safeguarded chain of solvers (composition): hand over to the next on failure.

    Each sample of a batch starts with `solvers[0]`. After every step the sample's residual
    `r = ||F(z) - z||` is compared with the lowest residual it has reached so far, `r_best`
    (over all stages), and the sample **hands over** to the next solver of the chain when

    1. *non-finite*: `r` is NaN or inf;
    2. *growth*: `r > growth * r_best`;
    3. *stagnation*: `r_best` has not fallen below `stall_factor` times its value of
       `patience` steps ago (i.e. `patience` consecutive steps without an improvement by
       the factor `stall_factor`).

    At a hand-over the next solver is initialised (its `init`) at the sample's best iterate so
    far, and that best iterate is returned as the step's iterate, so the solve continues from
    the best point, never from the failed one. The last solver of the chain never hands over:
    it runs until the stopping test or `max_steps`; if its residual turns non-finite, the
    driver stops the sample cleanly (`converged=False`, `result=RESULTS.NONFINITE`) and
    returns the lowest-residual finite iterate, so the value never contains NaN unless the
    starting point does.

    Samples of a batch can be on different stages: at each step, every solver whose stage is
    occupied by at least one active sample takes a step (under `lax.cond`, so solvers with no
    sample on their stage cost nothing; when all samples share a stage a step costs what that
    solver's step costs).

    The chain's own `rtol`, `atol` and `max_steps` govern the solve (the driver's stopping
    test and total step budget); those of the solvers in the chain are ignored.

    Args:
      solvers: the chain, a non-empty tuple of deq solvers (default `(Anderson(), Broyden(),
        FixedPointIteration(damping=0.5))`); a `Fallback` may itself be an element.
      rtol: relative tolerance of the stopping test `||f(z) - z|| <= atol + rtol ||f(z)||`.
      atol: absolute tolerance of the same test.
      max_steps: most steps of the whole chain.
      patience: `>= 1`; steps without an improvement by `stall_factor` before handing over.
      growth: `>= 1`; hand over when the residual exceeds `growth` times the best one.
      stall_factor: in `(0, 1]`; the improvement factor that resets the stall count.

    Example:
      >>> import jax.numpy as jnp, deq
      >>> from deq.solvers.fallback import Fallback
      >>> A = -1.5 * jnp.eye(2)  # plain iteration z <- A z + 1 diverges
      >>> f = lambda z, b: A @ z + b
      >>> chain = Fallback(solvers=(deq.FixedPointIteration(), deq.FixedPointIteration(damping=0.5)),
      ...                  atol=1e-6, rtol=0.0, max_steps=200)
      >>> sol = deq.fixed_point(f, jnp.zeros(2), jnp.ones(2), solver=chain)
      >>> bool(sol.stats.converged), [round(v, 4) for v in sol.value.tolist()]
      (True, [0.4, 0.4])

    References:
      Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011.
      Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019 (Broyden for DEQs).
    """

    solvers: tuple = None  # None: the default chain
    rtol: float = 1e-5
    atol: float = 1e-6
    max_steps: int = 100
    patience: int = 10
    growth: float = 10.0
    stall_factor: float = 0.9

    def __post_init__(self):
        owner = type(self).__name__
        solvers = _default_chain() if self.solvers is None else self.solvers
        if isinstance(solvers, AbstractSolver):
            raise TypeError(
                f"{owner}: `solvers` must be a tuple of solvers, got the single solver {solvers!r}. "
                f"Pass solvers=({type(solvers).__name__}(...), ...)."
            )
        if isinstance(solvers, list):
            solvers = tuple(solvers)
        if not isinstance(solvers, tuple) or not solvers:
            raise TypeError(
                f"{owner}: `solvers` must be a non-empty tuple of deq solvers, got {solvers!r}. "
                "Pass e.g. solvers=(deq.Anderson(), deq.Broyden(), deq.FixedPointIteration(damping=0.5))."
            )
        for i, s in enumerate(solvers):
            if not isinstance(s, AbstractSolver):
                raise TypeError(
                    f"{owner}: `solvers[{i}]` must be a deq forward solver (deq.Anderson(), "
                    f"deq.Broyden(), deq.FixedPointIteration(), ...), got {s!r}."
                )
        object.__setattr__(self, "solvers", solvers)
        check_tolerances(self)
        check_positive_int(owner, "patience", self.patience, example=10)
        check_range(owner, "growth", self.growth, 1.0, float("inf"), lo_open=False)
        check_range(owner, "stall_factor", self.stall_factor, 0.0, 1.0)

    def init(self, F, x, fx) -> FallbackState:
        B = x.shape[0]
        res = row_norm(fx - x)
        res = jnp.where(jnp.isfinite(res), res, jnp.inf)
        states = tuple(s.init(F, x, fx) for s in self.solvers)
        return FallbackState(
            states=states,
            stage=jnp.zeros((B,), jnp.int32),
            best_x=x,
            best_fx=fx,
            best_res=res,
            ref_res=res,
            stall=jnp.zeros((B,), jnp.int32),
        )

    def step(self, F, x, fx, state: FallbackState, active, best):
        last = len(self.solvers) - 1
        x_new, fx_new = x, fx
        states = list(state.states)
        # The stages restart from this solver's own best point, so they see it as theirs.
        best = Best(state.best_x, state.best_fx, state.best_res)
        for i, solver in enumerate(self.solvers):
            on = active & (state.stage == i)

            def run(ops, solver=solver, on=on):
                xi, fxi, si = ops
                return solver.step(F, xi, fxi, si, on, best)

            xi, fxi, si = jax.lax.cond(jnp.any(on), run, lambda ops: ops, (x, fx, states[i]))
            x_new = where_rows(on, xi, x_new)
            fx_new = where_rows(on, fxi, fx_new)
            states[i] = where_rows(on, si, states[i])

        res = row_norm(fx_new - x_new)
        finite = jnp.isfinite(res)
        better = active & finite & (res < state.best_res)
        best_x = where_rows(better, x_new, state.best_x)
        best_fx = where_rows(better, fx_new, state.best_fx)
        best_res = jnp.where(better, res, state.best_res)
        progressed = best_res <= self.stall_factor * state.ref_res
        ref_res = jnp.where(active & progressed, best_res, state.ref_res)
        stall = jnp.where(progressed, 0, state.stall + 1)
        stall = jnp.where(active, stall, state.stall)

        failed = ~finite | (res > self.growth * best_res) | (stall >= self.patience)
        hand = active & failed & (state.stage < last)
        stage = jnp.where(hand, state.stage + 1, state.stage)
        x_new = where_rows(hand, best_x, x_new)
        fx_new = where_rows(hand, best_fx, fx_new)
        ref_res = jnp.where(hand, best_res, ref_res)
        stall = jnp.where(hand, 0, stall)
        for j in range(1, len(self.solvers)):
            start = hand & (stage == j)
            fresh = jax.lax.cond(
                jnp.any(start),
                lambda s, solver=self.solvers[j]: solver.init(F, best_x, best_fx),
                lambda s: s,
                states[j],
            )
            states[j] = where_rows(start, fresh, states[j])
        new_state = FallbackState(
            states=tuple(states), stage=stage, best_x=best_x, best_fx=best_fx,
            best_res=best_res, ref_res=ref_res, stall=stall,
        )
        return x_new, fx_new, new_state


__all__ = ["Fallback", "FallbackState"]
