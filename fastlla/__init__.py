"""fastlla: scalable Linearized Laplace Approximation through a surrogate neural kernel."""

from . import _ops, augment
from .exact import ExactLLA
from .factory import Laplace
from .scalla import ScaLLA

__all__ = ["ExactLLA", "Laplace", "ScaLLA"]
