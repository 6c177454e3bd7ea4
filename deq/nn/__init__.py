"""Flax NNX layers for deep equilibrium models.

`DEQ` wraps any `nnx.Module` cell `cell(z, x) -> z` into a layer returning the fixed point
`z* = cell(z*, x)`; `SolverConstant` marks non-trainable buffers a cell may read during the
solve; `solution_info` summarises a solve's statistics as batch means.

The public names of `deq.nn.cells`, `deq.nn.models`, `deq.nn.normalization` and
`deq.nn.contractive` and `deq.nn.dropout` (cells, models, normalised and contractive layers,
variational dropout, built on `DEQ`) are
re-exported here; a submodule that does not exist is skipped, any other import error is raised.
"""

import importlib as _importlib

from ._layer import DEQ as DEQ
from ._layer import BackwardProbe as BackwardProbe
from ._layer import backward_stats as backward_stats
from ._layer import enable_backward_stats as enable_backward_stats
from ._layer import SolverConstant as SolverConstant
from ._layer import solution_info as solution_info
from ._stream import stream as stream

__all__ = ["DEQ", "SolverConstant", "BackwardProbe", "backward_stats", "enable_backward_stats", "solution_info", "stream"]


def _optional(name):
    """Import `deq.nn.<name>`, or None if that module itself does not exist."""
    try:
        return _importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:  # a missing dependency inside the module still raises
        if e.name != f"{__name__}.{name}":
            raise
        return None


def _reexport(name):
    """`from .<name> import *` (its `__all__`, else its public names), if the module exists."""
    module = _optional(name)
    if module is None:
        return
    public = getattr(module, "__all__", None)
    if public is None:
        public = [n for n in vars(module) if not n.startswith("_")]
    globals().update({n: getattr(module, n) for n in public})
    __all__.extend(n for n in public if n not in __all__)


for _name in ("cells", "models", "normalization", "contractive", "dropout"):
    _reexport(_name)
del _name
