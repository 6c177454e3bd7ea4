"""deq: deep equilibrium models in JAX.

Solve `z* = f(z*, args)` with Anderson, Broyden or damped iteration, differentiate it with the
implicit function theorem (or phantom gradients, JFB, unrolling), and use it as a Flax layer.
"""

from ._fixed_point import fixed_point as fixed_point
from ._solution import RESULTS as RESULTS
from ._solution import Solution as Solution
from ._solution import Stats as Stats
from .backward import IFT as IFT
from .backward import JFB as JFB
from .backward import AbstractBackward as AbstractBackward
from .backward import NonConvergenceWarning as NonConvergenceWarning
from .backward import PhantomGrad as PhantomGrad
from .backward import Unrolled as Unrolled
from .solvers import GMRES as GMRES
from .solvers import AbstractSolver as AbstractSolver
from .solvers import Anderson as Anderson
from .solvers import Broyden as Broyden
from .solvers import FixedPointIteration as FixedPointIteration

__version__ = "0.1.0"
