"""Backward strategies: how a fixed point is differentiated."""

from ._base import AbstractBackward as AbstractBackward
from ._base import NonConvergenceWarning as NonConvergenceWarning
from .approximate import JFB as JFB
from .approximate import PhantomGrad as PhantomGrad
from .approximate import Unrolled as Unrolled
from .ift import IFT as IFT
from .reversible import Reversible as Reversible
from .shine import SHINE as SHINE
