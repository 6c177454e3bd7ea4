"""deq: deep equilibrium models in JAX.

Solve `z* = f(z*, args)` with Anderson, Broyden or damped iteration, differentiate it with the
implicit function theorem (or phantom gradients, JFB, unrolling), and use it as a Flax layer.

The public API, one line per piece (each has its own docstring with an example):

Solving
    fixed_point(f, z0, args, *, solver=Anderson(), backward=IFT(), batch_axis=None, ...)
        the one entry point: returns a Solution; composes with jit, vmap and grad.
    fixed_point_stream(f, z0, args, xs, *, solver, slots=64)
        inference over a dataset by continuous batching: slots refilled as samples converge.
    fixed_point_compact(f, z0, args, xs, *, solver, backward=IFT(), buckets=3)
        a training batch whose active rows shrink into smaller buckets; IFT gradients.
Solvers (forward; every one takes rtol, atol, max_steps)
    Anderson, Broyden, FixedPointIteration  -- type-II Anderson, limited-memory Broyden, damped iteration
    ReversibleIteration(damping=0.5)        -- the reversible coupled iteration (pairs with Reversible)
    Fallback(solvers=(...))                 -- per-sample hand-over to the next solver on trouble
    JaxoptSolver(jaxopt_cls, ...)           -- any jaxopt fixed-point solver inside fixed_point
    GMRES                                   -- a Krylov solver for IFT's linear adjoint system
    AbstractSolver, Best                    -- write your own solver (init / step on packed rows)
Backward strategies (how a solve is differentiated)
    IFT(solver=None)       -- implicit function theorem: one adjoint solve, memory independent of steps
    PhantomGrad, JFB       -- phantom gradient (Geng et al. 2021), Jacobian-free backprop (Fung et al. 2022)
    Unrolled               -- backprop through every solver step: the reference
    Reversible             -- exact gradient of ReversibleIteration by reversing its steps (McCallum et al. 2025)
    SHINE(refine=0)        -- the adjoint from the forward Broyden's inverse estimate (Ramzi et al. 2022);
                              refine=0 is Broyden-preconditioned JFB; fixed_point(..., adjoint_init=u)
                              warm-starts IFT's adjoint (the gradient w.r.t. u is the new adjoint)
    AbstractBackward       -- the base class
What a solve returns
    Solution(value, stats)  -- the lowest-residual iterate and its Stats
    Stats                   -- num_steps, residual_norm, converged, result, residual_history; .summary()
    RESULTS                 -- result codes CONVERGED, MAX_STEPS, NONFINITE, DIVERGED;
                               RESULTS.name(code), RESULTS.describe(code) (what to try)
    BackwardStats           -- the IFT adjoint's statistics, received as a cotangent: BackwardStats.probe(batch)
Failures
    SolveError, clean_errors()  -- the exception of a failed solve (throw=True), and the context manager
                                   that delivers it from your own jax.jit
    NonConvergenceWarning       -- an IFT adjoint that did not converge
Guarantees and stabilizers
    certify, certify_estimate, Certificate, certified_argmax  -- per-sample error bounds ||z - z*||,
                                   certified predictions of a linear head
    lipschitz_estimate, spectral_radius_estimate  -- power iteration at the fixed point
    jacobian_frobenius, jacobian_penalty           -- Jacobian regularization (module deq.regularize)
    fixed_point_correction, correction_loss        -- fixed-point correction over several iterates
Submodules
    deq.nn        -- Flax NNX: the DEQ layer, cells (DenseCell, ConvCell, ...), contractive and
                     normalized cells, ready classifiers (deq.nn.models), solution_info
    deq.linen     -- the same DEQ layer for Flax Linen
    deq.monotone  -- monotone operator DEQs (MonDEQ, MonDEQConv, MonDEQClassifier) and splitting solvers
    deq.data      -- offline datasets (load_digits, load_mnist1d, load_algorithmic, local MNIST /
                     CIFAR-10 / text .npz files), iterate_batches
    deq.train     -- (import deq.train) fit(model, dataset, TrainConfig(...)): a training loop with
                     schedules, logs, checkpoints and data parallelism
"""

from ._fixed_point import fixed_point as fixed_point
from ._stream import fixed_point_stream as fixed_point_stream
from ._compact import fixed_point_compact as fixed_point_compact
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
from .backward import Reversible as Reversible
from .backward import SHINE as SHINE
from .solvers import GMRES as GMRES
from .solvers import AbstractSolver as AbstractSolver
from .solvers import Best as Best
from .solvers import Anderson as Anderson
from .solvers import Broyden as Broyden
from .solvers import FixedPointIteration as FixedPointIteration
from .solvers import ReversibleIteration as ReversibleIteration
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
