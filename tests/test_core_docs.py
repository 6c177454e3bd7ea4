"""Every example in the core modules' docstrings runs and prints what it shows."""

import doctest
import importlib

import pytest

CORE_MODULES = [
    "deq._fixed_point", "deq.solvers._base", "deq.solvers.anderson", "deq.solvers.broyden",
    "deq.solvers.fixed_point_iteration", "deq.solvers.gmres", "deq.solvers.fallback",
    "deq.backward.ift", "deq._solution", "deq._errors", "deq.backward.approximate", "deq.regularize", "deq.certify", "deq.interop",
]


@pytest.mark.parametrize("name", CORE_MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
