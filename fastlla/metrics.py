"""Evaluation metrics for classification, regression and OOD detection.

Every function takes tensors (anything :func:`torch.as_tensor` accepts), computes in float64 and
returns a Python ``float``. Inputs are checked, never silently broadcast: a shape mismatch, an
empty input, non-finite values, probabilities that are not probabilities (e.g. logits) or labels
out of range raise :class:`ValueError`.

Classification: ``probs`` ``(N, C)`` rows on the simplex, ``y`` ``(N,)`` integer labels in
``[0, C)``. Regression: ``mean`` and ``y`` of the same shape ``(N,)`` or ``(N, D)``, ``var``
(the predictive variance of each output, observation noise included) broadcastable to it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "nll",
    "ece",
    "brier",
    "auroc",
    "gaussian_nll",
    "crps_gaussian",
    "rmse",
]

_PROB_TOL = 1e-3  # float32 softmax / MC averages sum to 1 only up to rounding


def _tensor(x, name: str) -> Tensor:
    t = torch.as_tensor(x).detach()
    if t.numel() == 0:
        raise ValueError(f"fastlla: {name} is empty")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"fastlla: {name} contains NaN or Inf")
    return t


def _check_classification(probs, y) -> tuple[Tensor, Tensor]:
    """Validated ``(probs (N, C) float64, y (N,) int64)``."""
    p, t = _tensor(probs, "probs"), _tensor(y, "y")
    if p.dim() != 2:
        raise ValueError(f"fastlla: probs must be (N, C), got shape {tuple(p.shape)}")
    if t.dim() != 1 or t.shape[0] != p.shape[0]:
        raise ValueError(
            f"fastlla: y must be (N,) = ({p.shape[0]},) labels, got shape {tuple(t.shape)}"
        )
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise ValueError("fastlla: y must hold integer class labels")
    t = t.long()
    n_classes = p.shape[1]
    if int(t.min()) < 0 or int(t.max()) >= n_classes:
        raise ValueError(
            f"fastlla: labels must lie in [0, {n_classes}), got [{int(t.min())}, {int(t.max())}]"
        )
    p = p.double()
    if float(p.min()) < -_PROB_TOL or float(p.max()) > 1 + _PROB_TOL:
        raise ValueError("fastlla: probs must lie in [0, 1] (were logits passed?)")
    if float((p.sum(1) - 1).abs().max()) > _PROB_TOL:
        raise ValueError("fastlla: each row of probs must sum to 1 (were logits passed?)")
    return p, t


def _check_regression(mean, y, var=None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validated float64 ``(mean, y, var)``, ``var`` broadcast to ``mean``'s shape."""
    m, t = _tensor(mean, "mean").double(), _tensor(y, "y").double()
    if m.shape != t.shape:
        # no broadcasting: (N, 1) against (N,) would silently become (N, N)
        raise ValueError(
            f"fastlla: mean {tuple(m.shape)} and y {tuple(t.shape)} must have the same shape"
        )
    if var is None:
        return m, t, None
    v = _tensor(var, "var").double()
    try:
        shape = torch.broadcast_shapes(v.shape, m.shape)
    except RuntimeError:
        shape = None
    if shape != m.shape:
        raise ValueError(
            f"fastlla: var {tuple(v.shape)} must broadcast to mean's shape {tuple(m.shape)}"
        )
    if float(v.min()) <= 0:
        raise ValueError("fastlla: var must be positive")
    return m, t, v.expand(m.shape)


def accuracy(probs: Tensor, y: Tensor) -> float:
    """Fraction of inputs whose most probable class is the label.

    Parameters
    ----------
    probs : Tensor, (N, C)
    y : Tensor, (N,)
    """
    p, t = _check_classification(probs, y)
    return float((p.argmax(1) == t).double().mean())


def nll(probs: Tensor, y: Tensor, log_probs: bool = False) -> float:
    """Mean negative log-likelihood ``-1/N Σ_n log p_n[y_n]``.

    From probabilities, a zero probability on the label (e.g. one that underflowed in float32)
    is clamped at the smallest positive float64, so it costs about 708, not ``inf``; pass
    log-probabilities (``log_probs=True``, e.g. from
    :func:`fastlla.predictive.log_class_probabilities`) for the exact value. Log-probabilities
    may be ``−∞`` but not NaN or ``+∞``, and each row must log-sum-exp to 0.

    Parameters
    ----------
    probs : Tensor, (N, C) probabilities, or log-probabilities with ``log_probs=True``
    y : Tensor, (N,)
    log_probs : bool
    """
    if log_probs:
        logp, t = _check_log_probs(probs, y)
        return float(-logp.gather(1, t[:, None]).mean())
    p, t = _check_classification(probs, y)
    p_y = p.gather(1, t[:, None]).squeeze(1).clamp_min(torch.finfo(torch.float64).tiny)
    return float(-p_y.log().mean())


def _check_log_probs(log_probs, y) -> tuple[Tensor, Tensor]:
    """Validated ``(log_probs (N, C) float64, y (N,) int64)``."""
    lp = torch.as_tensor(log_probs).detach()
    if lp.numel() == 0:
        raise ValueError("fastlla: log_probs is empty")
    if not lp.is_floating_point() or bool(torch.isnan(lp).any()) or bool((lp == math.inf).any()):
        raise ValueError("fastlla: log-probabilities must be floats without NaN or +Inf")
    lp = lp.double()
    if lp.dim() != 2:
        raise ValueError(f"fastlla: log_probs must be (N, C), got shape {tuple(lp.shape)}")
    # the label checks of the probability path, on the probabilities these stand for
    _, t = _check_classification(torch.ones_like(lp) / lp.shape[1], y)
    if float(lp.max()) > _PROB_TOL or float(torch.logsumexp(lp, 1).abs().max()) > _PROB_TOL:
        raise ValueError(
            "fastlla: each row of log_probs must log-sum-exp to 0 (were logits or "
            "probabilities passed?)"
        )
    return lp, t


def ece(probs: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of the top label, with equal-width confidence bins.

    ``ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|`` where the confidence of an input is its
    largest probability, the prediction its argmax (first index on ties), and bin ``b`` holds
    confidences in ``(b/n_bins, (b+1)/n_bins]`` (a confidence of exactly 0 goes to bin 0).

    Parameters
    ----------
    probs : Tensor, (N, C)
    y : Tensor, (N,)
    n_bins : int
    """
    if int(n_bins) < 1:
        raise ValueError(f"fastlla: n_bins must be >= 1, got {n_bins}")
    p, t = _check_classification(probs, y)
    conf, pred = p.max(1)
    n_bins = int(n_bins)
    # b / n_bins exactly (not linspace), so bin edges are reproducible bit for bit
    edges = torch.arange(n_bins + 1, dtype=torch.float64, device=p.device) / n_bins
    idx = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    gap = (pred == t).double() - conf
    per_bin = torch.zeros(n_bins, dtype=torch.float64, device=p.device).index_add_(0, idx, gap)
    # |B_b|/N · |acc_b − conf_b| = |Σ_{n∈B_b} (correct_n − conf_n)| / N
    return float(per_bin.abs().sum() / len(t))


def brier(probs: Tensor, y: Tensor) -> float:
    """Multi-class Brier score ``1/N Σ_n Σ_c (p_nc − 1{c = y_n})²`` (in ``[0, 2]``).

    For two classes it is twice scikit-learn's binary ``brier_score_loss`` of ``p_n1``.

    Parameters
    ----------
    probs : Tensor, (N, C)
    y : Tensor, (N,)
    """
    p, t = _check_classification(probs, y)
    onehot = torch.nn.functional.one_hot(t, p.shape[1]).double()
    return float(((p - onehot) ** 2).sum(1).mean())


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """Area under the ROC curve for telling OOD inputs from in-distribution ones.

    OOD is the positive class and a *higher* score means "more OOD" (e.g. predictive entropy;
    negate max-probability scores). 0.5 is chance, 1 is perfect separation; ties count half.

    Parameters
    ----------
    scores_in : Tensor, (N_in,)
        Scores of in-distribution inputs.
    scores_out : Tensor, (N_out,)
        Scores of OOD inputs.
    """
    from sklearn.metrics import roc_auc_score

    s_in, s_out = _tensor(scores_in, "scores_in"), _tensor(scores_out, "scores_out")
    if s_in.dim() != 1 or s_out.dim() != 1:
        raise ValueError(
            f"fastlla: scores must be 1-D, got {tuple(s_in.shape)} and {tuple(s_out.shape)}"
        )
    scores = torch.cat([s_in.double().cpu(), s_out.double().cpu()]).numpy()
    labels = torch.cat([torch.zeros(len(s_in)), torch.ones(len(s_out))]).numpy()
    return float(roc_auc_score(labels, scores))


def gaussian_nll(mean: Tensor, var: Tensor, y: Tensor) -> float:
    """Mean Gaussian negative log-likelihood ``½ log(2π var) + (y − mean)² / (2 var)``.

    Averaged over points and outputs (each output an independent Gaussian).

    Parameters
    ----------
    mean : Tensor, (N,) or (N, D)
    var : Tensor, broadcastable to ``mean``
        Predictive variance, positive.
    y : Tensor, same shape as ``mean``
    """
    m, t, v = _check_regression(mean, y, var)
    return float((0.5 * (torch.log(2 * math.pi * v) + (t - m) ** 2 / v)).mean())


def crps_gaussian(mean: Tensor, var: Tensor, y: Tensor) -> float:
    """Mean continuous ranked probability score of Gaussian predictions (closed form).

    ``CRPS(N(μ, σ²), y) = σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π]`` with ``z = (y − μ)/σ``, i.e.
    ``∫ (F(t) − 1{t ≥ y})² dt``; lower is better, in the units of ``y``. Averaged over points and
    outputs.

    Parameters
    ----------
    mean : Tensor, (N,) or (N, D)
    var : Tensor, broadcastable to ``mean``
    y : Tensor, same shape as ``mean``
    """
    m, t, v = _check_regression(mean, y, var)
    sigma = v.sqrt()
    z = (t - m) / sigma
    pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    cdf = torch.special.ndtr(z)
    return float((sigma * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))).mean())


def rmse(mean: Tensor, y: Tensor) -> float:
    """Root mean squared error over points and outputs.

    Parameters
    ----------
    mean : Tensor, (N,) or (N, D)
    y : Tensor, same shape as ``mean``
    """
    m, t, _ = _check_regression(mean, y)
    return float(((m - t) ** 2).mean().sqrt())
