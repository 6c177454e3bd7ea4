"""The API explains itself: `help(deq)` maps every public piece, and `inspect.signature` of every
public Flax module shows its real arguments (NNX's metaclass alone shows `(*args, **kwargs)`)."""

from __future__ import annotations

import inspect
import types

import pytest
from flax import nnx

import deq
import deq.monotone
import deq.nn
import deq.nn.models


def test_package_docstring_maps_the_public_api():
    doc = deq.__doc__
    public = [n for n in dir(deq) if not n.startswith("_")]
    missing = [n for n in public
               if not isinstance(getattr(deq, n), types.ModuleType) and n not in doc]
    assert missing == [], f"deq.__doc__ does not mention {missing}"
    for module in ("deq.nn", "deq.linen", "deq.monotone", "deq.data", "deq.train"):
        assert module in doc
    assert "RESULTS.name(code)" in doc and "RESULTS.describe(code)" in doc
    assert "help(deq)" not in doc  # it is what help(deq) shows, not a pointer elsewhere


def _public_modules():
    seen = {}
    for namespace in (deq.nn, deq.nn.models, deq.monotone):
        for name in dir(namespace):
            obj = getattr(namespace, name)
            if (not name.startswith("_") and isinstance(obj, type) and issubclass(obj, nnx.Module)):
                seen[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return sorted(seen.items())


MODULES = _public_modules()


def test_there_are_modules_to_check():
    names = [n for n, _ in MODULES]
    for expected in ("deq.nn._layer.DEQ", "deq.nn.cells.DenseCell", "deq.nn.models.DEQClassifier",
                     "deq.nn.contractive.ContractiveDense", "deq.nn.normalization.SpectralNormDense",
                     "deq.monotone._nn.MonDEQ"):
        assert expected in names


@pytest.mark.parametrize("name,cls", MODULES, ids=[n for n, _ in MODULES])
def test_signature_is_the_real_one(name, cls):
    sig = inspect.signature(cls)
    kinds = {p.kind for p in sig.parameters.values()}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds, f"{name}{sig}"
    init = inspect.signature(cls.__init__)
    assert list(sig.parameters) == list(init.parameters)[1:]  # the same arguments, without self
    assert "rngs" in sig.parameters or name.endswith(".DEQ")


def test_subclass_and_instance_signatures():
    """A user's subclass shows its own `__init__`; an instance shows its `__call__`."""

    class MyCell(deq.nn.DenseCell):
        def __init__(self, width, *, rngs, scale=2.0):
            super().__init__(width, rngs=rngs)

    assert list(inspect.signature(MyCell).parameters) == ["width", "rngs", "scale"]
    cell = deq.nn.DenseCell(4, rngs=nnx.Rngs(0))
    assert list(inspect.signature(cell).parameters) == ["z", "x"]
    assert "features" in inspect.signature(deq.nn.DenseCell).parameters
    text = inspect.getdoc(deq.nn.DenseCell) or ""
    assert text  # help() has the class docstring to show, under the real signature
