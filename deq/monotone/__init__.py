r"""Monotone operator equilibrium networks (monDEQ): equilibria whose existence, uniqueness and
convergence are guaranteed.

The weight is parametrized as `W = (1 - m) I - A^T A + B - B^T`, so `I - W ⪰ m I` for every
`A`, `B` (`MonotoneDense`, `MonotoneConv`), and the equilibrium `z = relu(W z + U x + b)` is
found by operator splitting (`ForwardBackward`, `PeacemanRachford`) through
`monotone_fixed_point`, with implicit gradients from the same splitting applied to the adjoint
problem. `MonDEQ`, `MonDEQConv` and `MonDEQClassifier` are the Flax NNX layers and model.

References:
  Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
  Ryu & Boyd, "A primer on monotone operator methods", Appl. Comput. Math. 2016.
"""

from ._nn import MonDEQ as MonDEQ
from ._nn import MonDEQClassifier as MonDEQClassifier
from ._nn import MonDEQConv as MonDEQConv
from ._operators import MonotoneConv as MonotoneConv
from ._operators import MonotoneDense as MonotoneDense
from ._operators import conv as conv
from ._operators import conv_symbol as conv_symbol
from ._operators import conv_transpose as conv_transpose
from ._splitting import ForwardBackward as ForwardBackward
from ._splitting import PeacemanRachford as PeacemanRachford
from ._splitting import monotone_fixed_point as monotone_fixed_point

__all__ = [
    "ForwardBackward",
    "MonDEQ",
    "MonDEQClassifier",
    "MonDEQConv",
    "MonotoneConv",
    "MonotoneDense",
    "PeacemanRachford",
    "conv",
    "conv_symbol",
    "conv_transpose",
    "monotone_fixed_point",
]
