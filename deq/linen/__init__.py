"""Flax Linen layers for deep equilibrium models.

`DEQ` is the Linen counterpart of `deq.nn.DEQ` (same solve, same gradients);
`solution_info` summarises a solve's statistics as batch means.
"""

from ..nn._layer import solution_info as solution_info
from ._layer import DEQ as DEQ

__all__ = ["DEQ", "solution_info"]
