"""Fixed-point solvers: each a frozen configuration with `init` and `step`."""

from ._base import AbstractSolver as AbstractSolver
from ._base import Best as Best
from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .fixed_point_iteration import FixedPointIteration as FixedPointIteration
from .reversible import ReversibleIteration as ReversibleIteration
from .gmres import GMRES as GMRES
from .fallback import Fallback as Fallback
