"""From a Gaussian over the outputs to predictions: link approximations and OOD scores.

Every estimator produces, per input, the network's own output ``f(x)`` as the mean and a
``C×C`` covariance ``Σ(x)``. Classification turns ``N(f, Σ)`` into class probabilities
(probit, Laplace bridge or Monte Carlo); regression adds the observation noise ``σ²``.
Each link has a log-space twin (``log_probit``, ``log_laplace_bridge``, ``log_monte_carlo``,
:func:`log_class_probabilities`) that every NLL uses: finite for logits of any spread, where a
probability underflows to 0 in float32.
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
    "softmax_hessian_factor",
    "LinkApprox",
    "probit",
    "laplace_bridge",
    "monte_carlo",
    "class_probabilities",
    "log_probit",
    "log_laplace_bridge",
    "log_monte_carlo",
    "log_class_probabilities",
    "predictive_entropy",
    "max_probability",
    "gaussian_logit_entropy",
    "PredType",
    "standard_normal",
    "gaussian_samples",
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
        return {Likelihood: "likelihood", PredType: "pred_type"}.get(cls, "link_approx")


class Likelihood(_Option):
    """Observation model of the network's outputs."""

    CLASSIFICATION = "classification"
    """Categorical over ``softmax(f(x))``; the GGN uses the softmax Hessian."""
    REGRESSION = "regression"
    """Gaussian ``N(f(x), σ² I)``; the GGN uses ``I/σ²``."""
    REWARD_MODELING = "reward_modeling"
    """laplace-torch's reward modelling: fitted as classification over preference pairs (the
    model maps ``(B, 2, ...)`` pairs to ``(B, 2)`` logits), predicted as regression of the
    reward (``(B, ...)`` inputs to ``(B, 1)``) without observation noise."""


class PredType(_Option):
    """Which predictive: the linearized network's, or the network's own at sampled weights."""

    GLM = "glm"
    """The linearized network ``f(x) + J(x)(θ − θ*)`` under the Gaussian posterior."""
    NN = "nn"
    """The network itself at weights sampled from the posterior (Monte Carlo)."""


class LinkApprox(_Option):
    """How ``E[softmax(f)]`` under ``f ~ N(μ, Σ)`` is approximated."""

    PROBIT = "probit"
    """``softmax(μ / √(1 + π/8 · diag Σ))`` (MacKay's probit approximation)."""
    BRIDGE = "bridge"
    """Mean of the Dirichlet given by the Laplace bridge (Hobbhahn et al., 2022) after the
    zero-mean correction (the Gaussian conditioned on ``Σ_c f_c = 0``), as laplace-torch."""
    BRIDGE_NORM = "bridge_norm"
    """The corrected bridge with laplace-torch's variance normalisation (mean diagonal variance
    scaled to ``√(C/2)``)."""
    BRIDGE_UNCORRECTED = "bridge_uncorrected"
    """The Laplace bridge of ``N(μ, diag Σ)`` without the zero-mean correction (fastlla's
    ``"bridge"`` before version 0.2)."""
    MC = "mc"
    """Monte-Carlo average of ``softmax`` over samples of ``N(μ, Σ)``."""


def _variances(cov: Tensor) -> Tensor:
    """The variances (B, C) of ``cov``: (B, C, C) covariances, or (B, C) variances already."""
    return cov if cov.dim() == 2 else torch.diagonal(cov, dim1=-2, dim2=-1)


def log_probit(mean: Tensor, cov: Tensor) -> Tensor:
    """Log-probabilities of the probit approximation, (B, C): a log-softmax, finite for any
    finite logits (no probability underflows to ``log 0``)."""
    return torch.log_softmax(mean / torch.sqrt(1.0 + math.pi / 8.0 * _variances(cov)), dim=-1)


def probit(mean: Tensor, cov: Tensor) -> Tensor:
    """Probit approximation; ``mean`` (B, C), ``cov`` (B, C, C) or the variances (B, C) →
    probabilities (B, C)."""
    return torch.softmax(mean / torch.sqrt(1.0 + math.pi / 8.0 * _variances(cov)), dim=-1)


def _bridge_log_alpha(mean: Tensor, cov: Tensor) -> Tensor:
    """``log α`` of the Laplace bridge's Dirichlet, (B, C), in log space throughout.

    ``log α_c = log(1 − 2/C + e^{b_c}) − log Σ_cc`` with ``b_c = μ_c + log Σ_j e^{−μ_j} − 2 log C``
    (a ``logaddexp``; ``b`` is invariant to a shift of ``μ``): no ``exp`` of a logit, so logits
    of any spread stay finite.
    """
    C = mean.shape[-1]
    var = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(torch.finfo(cov.dtype).tiny)
    b = mean + torch.logsumexp(-mean, dim=-1, keepdim=True) - 2 * math.log(C)
    if C <= 2:  # 1 − 2/C = 0 (C = 1: a single class, probability 1 whatever α is)
        return b - torch.log(var)
    return torch.logaddexp(b, torch.full_like(b, math.log(1.0 - 2.0 / C))) - torch.log(var)


def zero_mean_correction(mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """``N(μ, Σ)`` (B, C), (B, C, C) conditioned on ``1ᵀf = 0`` — the softmax is invariant to
    a shift of the logits, and the Laplace bridge assumes logits that sum to zero:
    ``μ − Σ1 (1ᵀμ)/(1ᵀΣ1)``, ``Σ − Σ11ᵀΣ/(1ᵀΣ1)`` (Hobbhahn et al., 2022; laplace-torch's
    ``"bridge"``). A zero covariance is left as it is."""
    row = cov.sum(-1)  # Σ1, (B, C)
    total = row.sum(-1, keepdim=True)  # 1ᵀΣ1, (B, 1)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    weight = torch.where(total > 0, row / safe, torch.zeros_like(row))
    mean = mean - weight * mean.sum(-1, keepdim=True)
    cov = cov - weight.unsqueeze(-1) * row.unsqueeze(-2)
    return mean, cov


def _bridge_inputs(mean: Tensor, cov: Tensor, link: LinkApprox) -> tuple[Tensor, Tensor]:
    """The mean and covariance each bridge variant applies :func:`_bridge_log_alpha` to."""
    if link is LinkApprox.BRIDGE_UNCORRECTED:
        return mean, cov
    mean, cov = zero_mean_correction(mean, cov)
    if link is LinkApprox.BRIDGE_NORM:  # laplace-torch: mean diagonal variance → √(C/2)
        var = torch.diagonal(cov, dim1=-2, dim2=-1)
        scale = var.mean(-1, keepdim=True) / math.sqrt(mean.shape[-1] / 2)
        scale = scale.clamp_min(torch.finfo(cov.dtype).tiny)
        mean = mean / scale.sqrt()
        cov = cov / scale.unsqueeze(-1)
    return mean, cov


def log_laplace_bridge(mean: Tensor, cov: Tensor, variant: str | LinkApprox = "bridge") -> Tensor:
    """Log of :func:`laplace_bridge`, (B, C): ``log_softmax(log α)``."""
    link = LinkApprox.parse(variant)
    return torch.log_softmax(_bridge_log_alpha(*_bridge_inputs(mean, cov, link)), dim=-1)


def laplace_bridge(mean: Tensor, cov: Tensor, variant: str | LinkApprox = "bridge") -> Tensor:
    """Laplace bridge: the mean ``α/Σα = softmax(log α)`` of the Dirichlet matching the
    Gaussian over the logits, finite for logits of any spread.

    ``variant``: ``"bridge"`` (zero-mean corrected, laplace-torch's default formula),
    ``"bridge_norm"`` (also variance-normalised, laplace-torch's) or ``"bridge_uncorrected"``
    (the bridge of ``N(μ, diag Σ)`` as it is).
    """
    link = LinkApprox.parse(variant)
    return torch.softmax(_bridge_log_alpha(*_bridge_inputs(mean, cov, link)), dim=-1)


def monte_carlo(mean: Tensor, cov: Tensor, n_samples: int = 100, seed: int = 0) -> Tensor:
    """Monte-Carlo predictive with the fused, seedable ``fastlla::mc_softmax`` op."""
    scale_tril = psd_safe_cholesky(cov)
    return _ops.mc_softmax(mean.contiguous(), scale_tril.contiguous(), n_samples, seed)


def log_monte_carlo(mean: Tensor, cov: Tensor, n_samples: int = 100, seed: int = 0) -> Tensor:
    """Log of :func:`monte_carlo` in log space: ``logsumexp_s log_softmax(μ + Lε_s) − log S``.

    The same draws ``ε_s`` as the fused op (keyed by ``(seed, s, b, c)``), so
    ``log_monte_carlo(...).exp()`` equals :func:`monte_carlo` up to rounding; a class whose
    every sampled probability underflows still gets its finite log-probability. Memory
    ``O(S·B·C)``.
    """
    from .reference import _normal

    if int(n_samples) < 1:
        raise ValueError(f"fastlla: n_samples must be at least 1, got {n_samples}")
    B, C = mean.shape
    scale_tril = psd_safe_cholesky(cov)
    b = torch.arange(B, device=mean.device).unsqueeze(1).expand(B, C)
    c = torch.arange(C, device=mean.device).unsqueeze(0).expand(B, C)
    eps = torch.stack([_normal(int(seed), s, b, c) for s in range(int(n_samples))])  # (S, B, C)
    f = mean + (scale_tril @ eps.to(mean.dtype).unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(torch.log_softmax(f, dim=-1), dim=0) - math.log(int(n_samples))


def log_class_probabilities(
    mean: Tensor,
    cov: Tensor,
    link_approx: str | LinkApprox = LinkApprox.PROBIT,
    n_samples: int = 100,
    seed: int = 0,
) -> Tensor:
    """Log class probabilities (B, C) from the Gaussian over the logits, in log space (what
    every NLL uses: finite where a probability underflows)."""
    link = LinkApprox.parse(link_approx)
    if link is LinkApprox.PROBIT:
        return log_probit(mean, cov)
    if link is LinkApprox.MC:
        return log_monte_carlo(mean, cov, n_samples=n_samples, seed=seed)
    return log_laplace_bridge(mean, cov, link)


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
    if link is LinkApprox.MC:
        return monte_carlo(mean, cov, n_samples=n_samples, seed=seed)
    return laplace_bridge(mean, cov, link)


# --------------------------------------------------------------------------- sampling
def standard_normal(
    shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``N(0, 1)`` draws of ``shape`` from ``generator`` (on the generator's device, then moved
    to ``device``): the global RNG is neither read nor advanced."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def gaussian_samples(
    mean: Tensor, cov: Tensor, n_samples: int, generator: torch.Generator
) -> Tensor:
    """Draws of ``N(mean_b, cov_b)`` for each input ``b``, independent across inputs.

    ``mean`` (B, C); ``cov`` (B, C, C), or (B, C) variances (a diagonal covariance: the
    ``C×C`` matrices are never formed). Returns (S, B, C). The standard normals are drawn as
    (B, C, S) from ``generator``: for one input they are the draws of laplace-torch's
    ``normal_samples`` with the same generator (laplace-torch reuses one (C, S) draw for every
    input of a batch). A full ``cov`` is factorised by :func:`~fastlla.posterior.psd_safe_cholesky`.
    """
    if int(n_samples) < 1:
        raise ValueError(f"fastlla: n_samples must be at least 1, got {n_samples}")
    B, C = mean.shape
    eps = standard_normal((B, C, int(n_samples)), generator, mean.dtype, mean.device)
    if cov.dim() == 2:
        f = mean.unsqueeze(-1) + cov.clamp_min(0.0).sqrt().unsqueeze(-1) * eps
    else:
        f = mean.unsqueeze(-1) + psd_safe_cholesky(cov) @ eps
    return f.permute(2, 0, 1)


# --------------------------------------------------------------------------- OOD scores
# Each score is larger for inputs that look more out-of-distribution.
def predictive_entropy(probs: Tensor, log_probs: bool = False) -> Tensor:
    """``−Σ_c p_c log p_c`` per input, (B,); a zero probability contributes 0.

    ``log_probs=True``: ``probs`` holds log-probabilities (e.g. from
    :func:`log_class_probabilities`), whose ``−∞`` entries contribute 0.
    """
    if log_probs:
        p = probs.exp()
        return -torch.where(p > 0, p * probs, torch.zeros_like(p)).sum(dim=-1)
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def max_probability(probs: Tensor) -> Tensor:
    """``1 − max_c p_c`` per input, (B,) (one minus the confidence)."""
    return 1.0 - probs.max(dim=-1).values


def gaussian_logit_entropy(cov: Tensor) -> Tensor:
    """``½ log det Σ`` per input, (B,): the entropy of the logit Gaussian up to a constant."""
    L = psd_safe_cholesky(cov)
    return torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(dim=-1)


def softmax_hessian_factor(logits: Tensor) -> Tensor:
    """``R`` with ``R Rᵀ = diag(p) − p pᵀ``, ``p = softmax(logits)``: ``diag(√p) − p √pᵀ``.

    ``logits`` (N, C) → (N, C, C).
    """
    p = torch.softmax(logits, dim=-1)
    sqrt_p = p.sqrt()
    return torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)
