"""Flax NNX layers for deep equilibrium models.

`DEQ` wraps any `nnx.Module` cell `cell(z, x) -> z` into a layer returning the fixed point
`z* = cell(z*, x)`; `SolverConstant` marks non-trainable buffers a cell may read during the
solve; `solution_info` summarises a solve's statistics. Cells and models built on `DEQ` live in
`deq.nn.cells` and `deq.nn.models` and are re-exported here.
"""

import importlib as _importlib

from ._layer import DEQ as DEQ
from ._layer import SolverConstant as SolverConstant
from ._layer import solution_info as solution_info

__all__ = ["DEQ", "SolverConstant", "solution_info"]


def _optional(name):
    """Import `deq.nn.<name>`, or None if that module itself does not exist."""
    try:
        return _importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:  # a missing dependency inside the module still raises
        if e.name != f"{__name__}.{name}":
            raise
        return None


if _optional("cells") is not None:
    from .cells import *  # noqa: F401,F403
    from . import cells as _cells

    __all__ += [n for n in getattr(_cells, "__all__", []) if n not in __all__]

if _optional("models") is not None:
    from .models import *  # noqa: F401,F403
    from . import models as _models

    __all__ += [n for n in getattr(_models, "__all__", []) if n not in __all__]
