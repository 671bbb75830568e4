"""fastlla: scalable Linearized Laplace Approximation through a surrogate neural kernel.

The public API is :data:`__all__`; the modules hold the rest (``fastlla.metrics``,
``fastlla.augment``, ``fastlla.distributed``, ...). See ``docs/architecture.md``.
"""

from . import _ops  # noqa: F401  (registers the torch.ops.fastlla operators)
from .distributed import DistributedMismatchError
from .exact import ExactLLA
from .export import Predictor
from .factory import Laplace
from .laplace import ModelChangedError, NotFittedError
from .ood import ood_score
from .posterior import NotPositiveDefiniteError
from .predictive import Likelihood
from .scalla import ScaLLA

__all__ = [
    "ExactLLA",
    "ScaLLA",
    "Laplace",
    "Predictor",
    "ood_score",
    "Likelihood",
    "NotFittedError",
    "ModelChangedError",
    "NotPositiveDefiniteError",
    "DistributedMismatchError",
]
