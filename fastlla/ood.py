"""Out-of-distribution scores from the linearised predictive ``N(f(x), Σ(x))``.

Every score is per input, shape (B,), and *larger for inputs that look more out of
distribution*, so it feeds :func:`fastlla.metrics.auroc` as it is. The kinds (``KINDS``):

``"entropy"``
    Entropy ``−Σ_c p_c log p_c`` (nats) of the predictive class probabilities ``p`` of
    ``link_approx`` (default probit), from log-probabilities. Needs classes.
``"max_probability"``
    ``1 − max_c p_c`` of the same predictive. Needs classes.
``"mutual_information"``
    ``H[E p] − E H[p]`` (nats) over ``n_samples`` draws ``f_s ~ N(f(x), Σ(x))``, ``p =
    softmax(f_s)``, in log space: the epistemic part of the entropy. Needs classes.
``"logdet"``
    ``½ log det Σ(x)``: the differential entropy of the logit Gaussian up to a constant (the
    paper's score). Includes the direction ``1`` (a shift of every logit), which the softmax
    cannot see and the softmax GGN does not constrain (for a network whose output layer has a
    bias, ``Σ(x)`` keeps the prior's variance there), and scales with ``‖J(x)‖²``: on ReLU
    networks it can rank unfamiliar inputs *below* the data (``docs/ood.md``).
``"logdet_softmax"``
    ``½ log det(QᵀΣ(x)Q)``, ``Q`` an orthonormal basis of the ``C − 1`` directions orthogonal to
    ``1``: the entropy of the centred logits ``f − mean_c f_c``, all the softmax sees. Needs
    ``C ≥ 2``.
``"variance_ratio"``
    ``tr(QᵀΣ(x)Q) / tr(QᵀΣ₀(x)Q)`` with ``Σ₀(x)`` the predictive covariance under the prior
    (the same features or Jacobians, no data): the share of the prior's variance the data left,
    in ``[0, 1]``; near 1 where the training data say nothing about ``f(x)``. Without classes
    (regression) the whole ``Σ``: ``tr Σ / tr Σ₀``.
``"logdet_ratio"``
    ``½ log det(QᵀΣQ) − ½ log det(QᵀΣ₀Q)`` (≤ 0; regression: the whole ``Σ``): minus the
    information the training data carry about the centred logits at ``x`` (nats), 0 where they
    carry none. Invariant to the scale of ``J(x)``.

The log-determinants are computed from the eigenvalues in float64; a covariance that is
singular in the directions used gives ``−inf`` (a degenerate Gaussian). The prior covariance is
``J(x) D⁻¹ J(x)ᵀ`` for :class:`~fastlla.ExactLLA` (``D`` the prior precision, scalar or
diagonal) and ``g(x)ᵀg(x)/δ`` (plus the residual block ``r(x)/δ`` when on) for
:class:`~fastlla.ScaLLA`, whose posterior is over its feature weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .functional import batch_size
from .laplace import LaplaceBase
from .predictive import gaussian_samples, log_class_probabilities

__all__ = ["KINDS", "DEFAULT_KIND", "ood_score", "ood_scores", "gaussian_ood_scores"]

KINDS = (
    "entropy",
    "max_probability",
    "mutual_information",
    "logdet",
    "logdet_softmax",
    "variance_ratio",
    "logdet_ratio",
)
#: the kind ``ood_score`` uses by default (the evidence: ``docs/ood.md``)
DEFAULT_KIND = "entropy"

_CLASS_KINDS = {"entropy", "max_probability", "mutual_information", "logdet_softmax"}
_PRIOR_KINDS = {"variance_ratio", "logdet_ratio"}


def ood_score(
    la: LaplaceBase,
    x: Any,
    kind: str = DEFAULT_KIND,
    *,
    link_approx: str = "probit",
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> Tensor:
    """An out-of-distribution score per input of ``x``, larger for more OOD inputs.

    Parameters
    ----------
    la : a fitted :class:`~fastlla.ExactLLA` or :class:`~fastlla.ScaLLA`, at its current ``δ``
        (and ``σ``, ``T``).
    x : a batch of inputs, as for ``la(x)``.
    kind : one of :data:`KINDS` (see the module's docstring); default :data:`DEFAULT_KIND`.
    link_approx : the predictive of ``"entropy"`` and ``"max_probability"`` (``la(x,
        link_approx=...)``'s options; ``"mc"`` draws ``n_samples`` as ``la`` does, from
        ``seed``).
    n_samples : draws of ``"mutual_information"`` (and of ``link_approx="mc"``).
    generator : a ``torch.Generator`` for ``"mutual_information"``'s draws; without one a
        generator seeded with ``seed`` (a call is reproducible; the global RNG is never used).

    Returns
    -------
    Tensor (B,) in the estimator's dtype: nats for the entropies, the mutual information and
    the log-determinants, a ratio in ``[0, 1]`` for ``"variance_ratio"``.

    Raises
    ------
    TypeError for an estimator that is not a fastlla Laplace estimator; ``ValueError`` for an
    unknown ``kind``, a kind that needs classes on a regression (or reward-model) predictive,
    ``n_samples < 1``; :class:`~fastlla.NotFittedError` before ``fit``,
    :class:`~fastlla.ModelChangedError` if the model changed since; the input errors of
    ``la(x)``.
    """
    return ood_scores(
        la, x, (kind,), link_approx=link_approx, n_samples=n_samples, generator=generator,
        seed=seed,
    )[kind]  # fmt: skip


def ood_scores(
    la: LaplaceBase,
    x: Any,
    kinds: Sequence[str] = KINDS,
    *,
    link_approx: str = "probit",
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """:func:`ood_score` for several ``kinds`` from one pass over ``x`` (one network pass,
    one set of features or Jacobians): ``{kind: scores (B,)}``. Arguments and errors as
    :func:`ood_score`."""
    if not isinstance(la, LaplaceBase):
        raise TypeError(
            f"fastlla: ood_score needs a fastlla ExactLLA or ScaLLA, got {type(la).__name__}"
        )
    kinds = _parse_kinds(kinds)
    regression = la._predicts_regression(False)
    needs_classes = sorted(set(kinds) & _CLASS_KINDS)
    if regression and needs_classes:
        raise ValueError(
            f"fastlla: the OOD score kind(s) {needs_classes} need class probabilities; this "
            "estimator's predictive is a regression's (use 'logdet', 'variance_ratio' or "
            "'logdet_ratio')"
        )
    _check_samples(kinds, link_approx, n_samples)
    x = la._prediction_inputs(x)
    if batch_size(x) == 0:
        return {k: torch.empty(0, dtype=la.dtype, device=la.device) for k in kinds}
    f, features = la._outputs_and_features(x)
    la._check_outputs(f, n_outputs=la._expected_outputs(False))
    delta = la._delta()
    cov = la._covariance_from_features(features, delta, la.data_scale)
    prior = None
    if set(kinds) & _PRIOR_KINDS:
        prior = la._prior_covariance_from_features(features, delta)
    if generator is None and "mutual_information" in kinds:
        generator = torch.Generator(device=la.device).manual_seed(int(seed))
    return gaussian_ood_scores(
        f, cov, kinds, prior_cov=prior, classification=not regression,
        link_approx=link_approx, n_samples=n_samples, generator=generator, seed=seed,
    )  # fmt: skip


def gaussian_ood_scores(
    mean: Tensor,
    cov: Tensor,
    kinds: Sequence[str] = KINDS,
    *,
    prior_cov: Tensor | None = None,
    classification: bool = True,
    link_approx: str = "probit",
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """The scores of ``kinds`` for Gaussians ``N(mean, cov)`` over the outputs: ``mean``
    (B, C), ``cov`` (B, C, C), ``prior_cov`` (B, C, C) the prior predictive covariance (needed
    by ``"variance_ratio"`` and ``"logdet_ratio"``). ``classification=False``: the outputs are a
    regression's (no centring; class kinds refused). ``generator`` (``"mutual_information"``)
    is required when that kind is asked for. Returns ``{kind: (B,)}``."""
    kinds = _parse_kinds(kinds)
    if mean.dim() != 2 or cov.shape != (*mean.shape, mean.shape[-1]):
        raise ValueError(
            f"fastlla: need mean (B, C) and cov (B, C, C), got {tuple(mean.shape)} and "
            f"{tuple(cov.shape)}"
        )
    if not classification and set(kinds) & _CLASS_KINDS:
        raise ValueError(f"fastlla: {sorted(set(kinds) & _CLASS_KINDS)} need classes")
    if set(kinds) & _PRIOR_KINDS and (prior_cov is None or prior_cov.shape != cov.shape):
        raise ValueError(
            "fastlla: 'variance_ratio' and 'logdet_ratio' need prior_cov shaped like cov"
        )
    _check_samples(kinds, link_approx, n_samples)
    C = mean.shape[-1]
    if classification and C < 2 and set(kinds) & (_CLASS_KINDS | _PRIOR_KINDS):
        raise ValueError("fastlla: class OOD scores need at least 2 classes")
    out: dict[str, Tensor] = {}
    logp = None
    for kind in kinds:
        if kind in ("entropy", "max_probability"):
            if logp is None:
                logp = log_class_probabilities(mean, cov, link_approx, n_samples, seed)
            if kind == "entropy":
                out[kind] = _entropy(logp)
            else:
                out[kind] = -torch.expm1(logp.max(dim=-1).values)  # 1 − max p, from log p
        elif kind == "mutual_information":
            if generator is None:
                raise ValueError("fastlla: 'mutual_information' needs a torch.Generator")
            out[kind] = mutual_information(mean, cov, n_samples, generator)
        elif kind == "logdet":
            out[kind] = _half_logdet(cov).to(cov.dtype)
        else:
            Q = _centred_basis(C, cov) if classification else None
            post = _restrict(cov, Q)
            if kind == "logdet_softmax":
                out[kind] = _half_logdet(post).to(cov.dtype)
            elif kind == "variance_ratio":
                prior = _restrict(prior_cov.to(cov.dtype), Q)
                tr0 = torch.diagonal(prior, dim1=-2, dim2=-1).sum(-1)
                tr = torch.diagonal(post, dim1=-2, dim2=-1).sum(-1)
                out[kind] = tr / tr0
            else:  # logdet_ratio
                prior = _restrict(prior_cov.to(cov.dtype), Q)
                out[kind] = (_half_logdet(post) - _half_logdet(prior)).to(cov.dtype)
    return out


def mutual_information(
    mean: Tensor, cov: Tensor, n_samples: int, generator: torch.Generator
) -> Tensor:
    """``H[E_s p_s] − E_s H[p_s]`` (B,) in nats, ``p_s = softmax(f_s)``, ``f_s ~ N(mean,
    cov)`` drawn by :func:`~fastlla.predictive.gaussian_samples`'s rule from ``generator``
    (``n_samples`` of them), all in log space."""
    f = gaussian_samples(mean, cov, int(n_samples), generator)  # (S, B, C)
    logp = torch.log_softmax(f, dim=-1)
    log_mean = torch.logsumexp(logp, dim=0) - math.log(int(n_samples))
    return _entropy(log_mean) - _entropy(logp).mean(0)


# --------------------------------------------------------------------------- helpers
def _parse_kinds(kinds: Any) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    for kind in kinds:
        if kind not in KINDS:
            options = ", ".join(repr(k) for k in KINDS)
            raise ValueError(f"fastlla: unknown OOD score kind {kind!r}; use one of {options}")
    return kinds


def _check_samples(kinds: tuple[str, ...], link_approx: str, n_samples: int) -> None:
    sampled = "mutual_information" in kinds or (
        str(getattr(link_approx, "value", link_approx)) == "mc"
        and {"entropy", "max_probability"} & set(kinds)
    )
    if sampled and int(n_samples) < 1:
        raise ValueError(f"fastlla: n_samples must be at least 1, got {n_samples}")


def _entropy(logp: Tensor) -> Tensor:
    """``−Σ p log p`` over the last dimension from log-probabilities (``−∞`` entries give 0)."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def _centred_basis(C: int, like: Tensor) -> Tensor:
    """An orthonormal basis (C, C − 1) of the directions orthogonal to ``1`` (Helmert's)."""
    Q = torch.zeros(C, C - 1, dtype=like.dtype, device=like.device)
    for k in range(1, C):
        Q[:k, k - 1] = 1.0 / math.sqrt(k * (k + 1))
        Q[k, k - 1] = -k / math.sqrt(k * (k + 1))
    return Q


def _restrict(cov: Tensor, Q: Tensor | None) -> Tensor:
    """``QᵀΣQ`` (B, C−1, C−1), or ``Σ`` itself when ``Q`` is ``None``."""
    return cov if Q is None else Q.mT @ cov @ Q


def _half_logdet(cov: Tensor) -> Tensor:
    """``½ log det`` (B,) from the eigenvalues in float64; ``−inf`` where one is ``≤ 0``."""
    A = cov.double()
    evals = torch.linalg.eigvalsh(0.5 * (A + A.mT))
    logs = torch.where(evals > 0, evals.clamp_min(torch.finfo(A.dtype).tiny).log(),
                       torch.full_like(evals, -math.inf))  # fmt: skip
    return 0.5 * logs.sum(-1)
