"""fastlla: scalable Linearized Laplace Approximation through a surrogate neural kernel."""
from . import _ops
