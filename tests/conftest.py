"""Shared pytest configuration.

The core tests (``tests/test_core_*.py``) check numerics in float64. Rather than enabling
``jax_enable_x64`` for the whole session (which would change the default dtype under every other
test file), x64 is switched on with ``jax.enable_x64`` for the duration of each ``test_core_*``
module only, by an autouse module-scoped fixture. Everything in those modules (tests, hypothesis
examples, module-scoped fixtures that depend on it) therefore runs with x64; tests of float32 or
bfloat16 behaviour create those dtypes explicitly.

Nothing here runs at import time, so collecting the core tests never changes global state.
"""

from __future__ import annotations

import os

import jax
import pytest


def _is_core_module(request: pytest.FixtureRequest) -> bool:
    return os.path.basename(str(request.module.__file__)).startswith("test_core_")


@pytest.fixture(scope="module", autouse=True)
def _x64_for_core_tests(request: pytest.FixtureRequest):
    """float64 for the core test modules, and only for them."""
    if not _is_core_module(request):
        yield
        return
    with jax.enable_x64(True):
        yield


@pytest.fixture
def x64(request: pytest.FixtureRequest):
    """Request float64 explicitly from a test outside the core modules."""
    with jax.enable_x64(True):
        yield
