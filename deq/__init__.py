"""deq: deep equilibrium models in JAX.

Solve `z* = f(z*, args)` with Anderson, Broyden or damped iteration, differentiate it with the
implicit function theorem (or phantom gradients, JFB, unrolling), and use it as a Flax layer.
"""

from ._fixed_point import fixed_point as fixed_point
from ._errors import SolveError as SolveError
from ._errors import clean_errors as clean_errors
from ._solution import RESULTS as RESULTS
from ._solution import BackwardStats as BackwardStats
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
from .solvers import Best as Best
from .solvers import Anderson as Anderson
from .solvers import Broyden as Broyden
from .solvers import FixedPointIteration as FixedPointIteration
from .solvers.fallback import Fallback as Fallback
from .interop import JaxoptSolver as JaxoptSolver
from .regularize import correction_loss as correction_loss
from .regularize import fixed_point_correction as fixed_point_correction
from .regularize import jacobian_frobenius as jacobian_frobenius
from .regularize import jacobian_penalty as jacobian_penalty
from .certify import Certificate as Certificate
from .certify import certified_argmax as certified_argmax
from .certify import certify as certify
from .certify import certify_estimate as certify_estimate
from .certify import lipschitz_estimate as lipschitz_estimate
from .certify import spectral_radius_estimate as spectral_radius_estimate
from . import data as data
from . import monotone as monotone
from . import nn as nn
from . import linen as linen

__version__ = "0.1.0"
