"""Anderson's safeguards, step by step: restart from the driver's best point on growth and on
stagnation, the damped fallback when the mixing weights fail their check, and derivatives
through all of them (`deq.Unrolled`). float64 (conftest: every `test_core_*` module)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq

ACTIVE = jnp.ones((1,), bool)


def _best(F, x):
    fx = F(x)
    return deq.Best(x, fx, jnp.linalg.norm(fx - x, axis=1))


def _unpack(state):
    return dict(count=int(state.count[0]), stale=int(state.stale[0]), to_best=bool(state.to_best[0]))


def test_growth_restarts_from_the_drivers_best_point():
    F = lambda x: 0.5 * x + 1.0  # noqa: E731  fixed point 2
    s = deq.Anderson(history_size=3, growth_limit=10.0, patience=0, damping=0.5)
    best = _best(F, jnp.full((1, 2), 1.9))  # residual 0.071
    x = jnp.full((1, 2), -10.0)
    x1, fx1, st1 = s.step(F, x, F(x), s.init(F, x, F(x)), ACTIVE, best)
    # The step lands at residual 3 sqrt(2) / 2 > 10 x 0.071: the next step restarts from best.
    assert float(jnp.linalg.norm(fx1 - x1)) > 10 * float(best.res[0])
    assert _unpack(st1)["to_best"]
    x2, fx2, st2 = s.step(F, x1, fx1, st1, ACTIVE, best)
    np.testing.assert_allclose(x2, best.x + 0.5 * (best.fx - best.x), rtol=0, atol=1e-15)
    np.testing.assert_allclose(fx2, F(x2), rtol=0, atol=1e-15)
    assert _unpack(st2) == dict(count=1, stale=0, to_best=False)  # history restarted at x2


def test_no_restart_while_the_residual_stays_below_the_growth_limit():
    F = lambda x: 0.5 * x + 1.0  # noqa: E731
    s = deq.Anderson(history_size=3, growth_limit=10.0, patience=0)
    x = jnp.full((1, 2), -10.0)
    best = _best(F, x)
    x1, fx1, st1 = s.step(F, x, F(x), s.init(F, x, F(x)), ACTIVE, best)
    assert not _unpack(st1)["to_best"]
    assert _unpack(st1)["count"] == 1  # one difference: the start and x1


def test_stagnation_restarts_after_patience_steps():
    F = lambda x: x + 1.0  # noqa: E731  no fixed point: the residual never improves
    s = deq.Anderson(history_size=3, growth_limit=1e6, patience=3)
    x = jnp.zeros((1, 2))
    best = _best(F, x)
    fx, st = F(x), s.init(F, x, F(x))
    flags = []
    for _ in range(4):
        x, fx, st = s.step(F, x, fx, st, ACTIVE, best)
        flags.append(_unpack(st))
    assert [f["to_best"] for f in flags] == [False, False, True, False]
    assert [f["stale"] for f in flags][:3] == [1, 2, 0]


@pytest.mark.parametrize("patience", [0, 3])
def test_failed_weights_fall_back_to_a_damped_step_and_restart(patience):
    # max_coefficient=1 rejects any extrapolating mix (a weight outside [-1, 1]).
    A = jnp.array([[0.9, 0.3], [-0.3, 0.9]])
    F = lambda x: x @ A.T + 1.0  # noqa: E731
    s = deq.Anderson(history_size=3, max_coefficient=1.0, damping=0.5, patience=patience)
    x = jnp.zeros((1, 2))
    best = _best(F, x)
    fx, st = F(x), s.init(F, x, F(x))
    seen_fallback = False
    for _ in range(6):
        _, alpha, ok = s.mix(st)
        x_new, fx_new, st_new = s.step(F, x, fx, st, ACTIVE, best)
        if not bool(ok[0]):
            seen_fallback = True
            np.testing.assert_allclose(x_new, x + 0.5 * (fx - x), rtol=0, atol=1e-14)
            assert _unpack(st_new)["count"] == 1
        else:
            np.testing.assert_allclose(jnp.sum(alpha), 1.0, atol=1e-12)
            assert float(jnp.max(jnp.abs(alpha))) <= 1.0
        x, fx, st = x_new, fx_new, st_new
    assert seen_fallback


def _unrolled_value(a, solver):
    F = lambda z, a: jnp.tanh(jnp.array([[0.9, 0.4], [-0.4, 0.9]]) @ z + a)  # noqa: E731
    return deq.fixed_point(F, jnp.zeros(2), a, solver=solver, backward=deq.Unrolled()).value.sum()


@pytest.mark.parametrize("solver", [
    deq.Anderson(rtol=0.0, atol=1e-300, max_steps=12, max_coefficient=1.0),  # safeguard fires
    deq.Anderson(rtol=0.0, atol=1e-300, max_steps=12, growth_limit=1.0001, patience=2),  # restarts
])
def test_unrolled_gradients_through_the_safeguards_are_finite_and_exact(solver):
    a = jnp.array([0.3, -0.2])
    g = jax.grad(_unrolled_value)(a, solver)
    assert bool(jnp.all(jnp.isfinite(g)))
    eps = 1e-6
    fd = np.array([(_unrolled_value(a + eps * e, solver) - _unrolled_value(a - eps * e, solver)) / (2 * eps)
                   for e in np.eye(2)])
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
