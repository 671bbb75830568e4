"""From a Gaussian over the outputs to predictions: link approximations and OOD scores.

Every estimator produces, per input, the network's own output ``f(x)`` as the mean and a
``C×C`` covariance ``Σ(x)``. Classification turns ``N(f, Σ)`` into class probabilities
(probit, Laplace bridge or Monte Carlo); regression adds the observation noise ``σ²``.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from . import _ops
from .posterior import psd_safe_cholesky

__all__ = [
    "Likelihood",
    "LinkApprox",
    "probit",
    "laplace_bridge",
    "monte_carlo",
    "class_probabilities",
    "predictive_entropy",
    "max_probability",
    "gaussian_logit_entropy",
]


class _Option(str, Enum):
    """A string option; ``parse`` accepts the member or its value, and names the valid ones."""

    @classmethod
    def parse(cls, value):
        try:
            return cls(value)
        except ValueError:
            options = ", ".join(repr(m.value) for m in cls)
            raise ValueError(
                f"fastlla: unknown {cls._option_name()} {value!r}; use one of {options}"
            ) from None

    @classmethod
    def _option_name(cls) -> str:
        return "likelihood" if cls is Likelihood else "link_approx"


class Likelihood(_Option):
    """Observation model of the network's outputs."""

    CLASSIFICATION = "classification"
    """Categorical over ``softmax(f(x))``; the GGN uses the softmax Hessian."""
    REGRESSION = "regression"
    """Gaussian ``N(f(x), σ² I)``; the GGN uses ``I/σ²``."""


class LinkApprox(_Option):
    """How ``E[softmax(f)]`` under ``f ~ N(μ, Σ)`` is approximated."""

    PROBIT = "probit"
    """``softmax(μ / √(1 + π/8 · diag Σ))`` (MacKay's probit approximation)."""
    BRIDGE = "bridge"
    """Mean of the Dirichlet given by the Laplace bridge (Hobbhahn et al., 2022)."""
    MC = "mc"
    """Monte-Carlo average of ``softmax`` over samples of ``N(μ, Σ)``."""


def probit(mean: Tensor, cov: Tensor) -> Tensor:
    """Probit approximation; ``mean`` (B, C), ``cov`` (B, C, C) → probabilities (B, C)."""
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    return torch.softmax(mean / torch.sqrt(1.0 + math.pi / 8.0 * var), dim=-1)


def laplace_bridge(mean: Tensor, cov: Tensor) -> Tensor:
    """Laplace bridge: the Dirichlet matching ``N(mean, diag cov)``, returned as its mean."""
    C = mean.shape[-1]
    var = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(torch.finfo(cov.dtype).tiny)
    # exp(μ_c) Σ_j exp(−μ_j) computed in log space: it is invariant to a shift of μ.
    log_term = mean + torch.logsumexp(-mean, dim=-1, keepdim=True) - 2 * math.log(C)
    alpha = (1.0 - 2.0 / C + torch.exp(log_term)) / var
    return alpha / alpha.sum(dim=-1, keepdim=True)


def monte_carlo(mean: Tensor, cov: Tensor, n_samples: int = 100, seed: int = 0) -> Tensor:
    """Monte-Carlo predictive with the fused, seedable ``fastlla::mc_softmax`` op."""
    scale_tril = psd_safe_cholesky(cov)
    return _ops.mc_softmax(mean.contiguous(), scale_tril.contiguous(), n_samples, seed)


def class_probabilities(
    mean: Tensor,
    cov: Tensor,
    link_approx: str | LinkApprox = LinkApprox.PROBIT,
    n_samples: int = 100,
    seed: int = 0,
) -> Tensor:
    """Class probabilities (B, C) from the Gaussian over the logits."""
    link = LinkApprox.parse(link_approx)
    if link is LinkApprox.PROBIT:
        return probit(mean, cov)
    if link is LinkApprox.BRIDGE:
        return laplace_bridge(mean, cov)
    return monte_carlo(mean, cov, n_samples=n_samples, seed=seed)


# --------------------------------------------------------------------------- OOD scores
# Each score is larger for inputs that look more out-of-distribution.
def predictive_entropy(probs: Tensor) -> Tensor:
    """``−Σ_c p_c log p_c`` per input, (B,)."""
    return -(probs * torch.log(probs.clamp_min(1e-300))).sum(dim=-1)


def max_probability(probs: Tensor) -> Tensor:
    """``1 − max_c p_c`` per input, (B,) (one minus the confidence)."""
    return 1.0 - probs.max(dim=-1).values


def gaussian_logit_entropy(cov: Tensor) -> Tensor:
    """``½ log det Σ`` per input, (B,): the entropy of the logit Gaussian up to a constant."""
    L = psd_safe_cholesky(cov)
    return torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(dim=-1)
