"""Metrics against independent oracles: scikit-learn, scipy, and direct per-sample loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, roc_auc_score

from fastlla import metrics


def _random_probs(n: int, c: int, seed: int, sharp: float = 3.0):
    """Random (N, C) float64 probabilities and (N,) labels."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(sharp * torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, c, (n,), generator=g)
    return probs, y


# ------------------------------------------------------------------------------ classification


@pytest.mark.parametrize("n,c,seed", [(1, 2, 0), (50, 2, 1), (200, 10, 2), (37, 3, 3)])
def test_accuracy_and_nll_match_sklearn(n, c, seed):
    probs, y = _random_probs(n, c, seed)
    assert metrics.accuracy(probs, y) == pytest.approx(
        accuracy_score(y.numpy(), probs.argmax(1).numpy()), abs=1e-15
    )
    expected = log_loss(y.numpy(), probs.numpy(), labels=list(range(c)))
    assert metrics.nll(probs, y) == pytest.approx(expected, rel=1e-12)


def test_nll_float32_and_zero_probability_is_finite():
    probs, y = _random_probs(64, 5, 4)
    expected = log_loss(y.numpy(), probs.numpy(), labels=list(range(5)))
    assert metrics.nll(probs.float(), y) == pytest.approx(expected, rel=1e-5)
    zero = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    value = metrics.nll(zero, torch.tensor([1, 0]))
    assert math.isfinite(value) and value > 100  # clamped, not inf


def _ece_loop(probs: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    """Top-label ECE, one sample at a time: bin b holds confidences in (b/n, (b+1)/n]."""
    n = len(y)
    count = [0] * n_bins
    correct = [0.0] * n_bins
    conf_sum = [0.0] * n_bins
    for i in range(n):
        row = list(probs[i])
        conf = max(row)
        pred = row.index(conf)  # first maximum, like argmax
        b = 0
        for k in range(n_bins):
            if k / n_bins < conf <= (k + 1) / n_bins:
                b = k
        count[b] += 1
        correct[b] += float(pred == y[i])
        conf_sum[b] += conf
    return sum(
        count[b] / n * abs(correct[b] / count[b] - conf_sum[b] / count[b])
        for b in range(n_bins)
        if count[b]
    )


@pytest.mark.parametrize("n,c,seed,n_bins", [(300, 10, 0, 15), (100, 2, 1, 15), (80, 4, 2, 5),
                                             (1, 3, 3, 15), (60, 3, 4, 1)])
def test_ece_matches_per_sample_loop(n, c, seed, n_bins):
    probs, y = _random_probs(n, c, seed, sharp=2.0)
    expected = _ece_loop(probs.numpy(), y.numpy(), n_bins)
    assert metrics.ece(probs, y, n_bins=n_bins) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_ece_bin_edges_and_ties():
    # confidences exactly on bin edges (0.5, 0.6, 1.0 with 10 bins) and an argmax tie
    probs = torch.tensor(
        [[0.5, 0.5, 0.0], [0.6, 0.4, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]],
        dtype=torch.float64,
    )
    y = torch.tensor([1, 0, 0, 2, 0])
    expected = _ece_loop(probs.numpy(), y.numpy(), 10)
    assert metrics.ece(probs, y, n_bins=10) == pytest.approx(expected, abs=1e-15)
    # perfectly confident and right: zero; confident and always wrong: one
    eye = torch.eye(4, dtype=torch.float64)
    assert metrics.ece(eye, torch.arange(4)) == 0.0
    assert metrics.ece(eye, (torch.arange(4) + 1) % 4) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_brier_binary_matches_sklearn(seed):
    probs, y = _random_probs(120, 2, seed)
    # sklearn's binary Brier is mean (p1 - y)^2; the multi-class sum over both columns doubles it
    expected = 2.0 * brier_score_loss(y.numpy(), probs[:, 1].numpy())
    assert metrics.brier(probs, y) == pytest.approx(expected, rel=1e-12)


def test_brier_multiclass_matches_loop():
    probs, y = _random_probs(90, 7, 5)
    total = 0.0
    for i in range(len(y)):
        for c in range(7):
            total += (float(probs[i, c]) - (1.0 if c == int(y[i]) else 0.0)) ** 2
    assert metrics.brier(probs, y) == pytest.approx(total / len(y), rel=1e-12)


# ------------------------------------------------------------------------------------- AUROC


def _auroc_pairs(s_in: np.ndarray, s_out: np.ndarray) -> float:
    """Mann–Whitney: P(score_out > score_in) + ½ P(tie), over all pairs."""
    wins = sum((o > i) + 0.5 * (o == i) for o in s_out for i in s_in)
    return wins / (len(s_in) * len(s_out))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_pairwise_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    s_in = rng.normal(0.0, 1.0, 40).round(1)  # rounding makes ties
    s_out = rng.normal(0.8, 1.0, 25).round(1)
    value = metrics.auroc(torch.from_numpy(s_in), torch.from_numpy(s_out))
    assert value == pytest.approx(_auroc_pairs(s_in, s_out), abs=1e-12)
    labels = np.r_[np.zeros(40), np.ones(25)]
    assert value == pytest.approx(roc_auc_score(labels, np.r_[s_in, s_out]), abs=1e-12)


def test_auroc_orientation():
    assert metrics.auroc(torch.tensor([0.0, 0.1]), torch.tensor([1.0, 2.0])) == 1.0
    assert metrics.auroc(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.1])) == 0.0


# ---------------------------------------------------------------------------------- regression


def _regression_case(shape, seed):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=g, dtype=torch.float64)
    var = torch.rand(shape, generator=g, dtype=torch.float64) * 2 + 0.05
    y = mean + var.sqrt() * torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    return mean, var, y


@pytest.mark.parametrize("shape", [(30,), (25, 3), (1, 1)])
def test_gaussian_nll_matches_scipy(shape):
    mean, var, y = _regression_case(shape, 0)
    expected = -stats.norm.logpdf(y.numpy(), loc=mean.numpy(), scale=np.sqrt(var.numpy())).mean()
    assert metrics.gaussian_nll(mean, var, y) == pytest.approx(expected, rel=1e-12)


def test_gaussian_nll_scalar_variance_broadcasts():
    mean, _, y = _regression_case((20, 2), 1)
    expected = -stats.norm.logpdf(y.numpy(), loc=mean.numpy(), scale=0.3).mean()
    var = torch.tensor(0.09, dtype=torch.float64)
    assert metrics.gaussian_nll(mean, var, y) == pytest.approx(expected, rel=1e-12)
    assert metrics.gaussian_nll(mean.float(), torch.full((20, 1), 0.09), y.float()) == (
        pytest.approx(expected, rel=1e-5)
    )


def _crps_quad(mu: float, sigma: float, y: float) -> float:
    """∫ (F(t) − 1{t ≥ y})² dt by adaptive quadrature, split at y where the integrand jumps."""
    cdf = stats.norm(mu, sigma).cdf
    lo, hi = min(mu, y) - 12 * sigma, max(mu, y) + 12 * sigma
    left = integrate.quad(lambda t: cdf(t) ** 2, lo, y, epsabs=1e-13, epsrel=1e-12, limit=200)[0]
    right = integrate.quad(lambda t: (cdf(t) - 1) ** 2, y, hi, epsabs=1e-13, epsrel=1e-12,
                           limit=200)[0]  # fmt: skip
    return left + right


def test_crps_matches_numerical_integration():
    mean, var, y = _regression_case((12, 2), 2)
    expected = np.mean([
        _crps_quad(float(m), math.sqrt(float(v)), float(t))
        for m, v, t in zip(mean.flatten(), var.flatten(), y.flatten())
    ])  # fmt: skip
    assert metrics.crps_gaussian(mean, var, y) == pytest.approx(expected, rel=1e-8)


def test_crps_limits():
    # at y = μ, CRPS = σ (2φ(0) − 1/√π) = σ (√2 − 1)/√π
    sigma = 0.7
    z = torch.zeros(3, dtype=torch.float64)
    value = metrics.crps_gaussian(z, torch.full((3,), sigma**2, dtype=torch.float64), z)
    assert value == pytest.approx(sigma * (math.sqrt(2) - 1) / math.sqrt(math.pi), rel=1e-12)
    # tiny variance: CRPS → |y − μ|
    value = metrics.crps_gaussian(torch.tensor([0.0]), torch.tensor([1e-16]), torch.tensor([2.5]))
    assert value == pytest.approx(2.5, rel=1e-7)


def test_rmse_matches_numpy():
    mean, _, y = _regression_case((40, 2), 3)
    expected = np.sqrt(np.mean((mean.numpy() - y.numpy()) ** 2))
    assert metrics.rmse(mean, y) == pytest.approx(expected, rel=1e-12)
    assert metrics.rmse(y, y) == 0.0


def test_all_return_python_floats():
    probs, y = _random_probs(10, 3, 0)
    mean, var, t = _regression_case((10,), 0)
    values = [
        metrics.accuracy(probs, y), metrics.nll(probs, y), metrics.ece(probs, y),
        metrics.brier(probs, y), metrics.auroc(probs[:, 0], probs[:, 1]),
        metrics.gaussian_nll(mean, var, t), metrics.crps_gaussian(mean, var, t),
        metrics.rmse(mean, t),
    ]  # fmt: skip
    assert all(type(v) is float for v in values)


# --------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("fn", [metrics.accuracy, metrics.nll, metrics.ece, metrics.brier])
def test_classification_bad_inputs(fn):
    probs, y = _random_probs(8, 3, 0)
    with pytest.raises(ValueError, match="empty"):
        fn(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        fn(probs, y[:5])
    with pytest.raises(ValueError, match=r"\(N,\)"):
        fn(probs, y[:, None])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        fn(probs[0], y[:1])
    with pytest.raises(ValueError, match="labels"):
        fn(probs, torch.tensor([0, 1, 2, 3, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="labels"):
        fn(probs, torch.tensor([-1, 1, 2, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="integer"):
        fn(probs, y.double() + 0.5)
    with pytest.raises(ValueError, match="logits"):
        fn(torch.randn(8, 3) * 5, y)  # logits, not probabilities
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.full((8, 3), float("nan")), y)


def test_ece_rejects_bad_bins():
    probs, y = _random_probs(8, 3, 0)
    with pytest.raises(ValueError, match="n_bins"):
        metrics.ece(probs, y, n_bins=0)


def test_auroc_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        metrics.auroc(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="empty"):
        metrics.auroc(torch.tensor([1.0]), torch.tensor([]))
    with pytest.raises(ValueError, match="1-D"):
        metrics.auroc(torch.ones(3, 2), torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc(torch.tensor([float("nan")]), torch.tensor([1.0]))


@pytest.mark.parametrize("fn", [metrics.gaussian_nll, metrics.crps_gaussian])
def test_regression_bad_inputs(fn):
    mean, var, y = _regression_case((6, 1), 0)
    with pytest.raises(ValueError, match="same shape"):
        fn(mean, var, y[:, 0])  # (N, 1) against (N,) must not broadcast to (N, N)
    with pytest.raises(ValueError, match="broadcast"):
        fn(mean, var[:3], y)
    with pytest.raises(ValueError, match="positive"):
        fn(mean, torch.zeros_like(var), y)
    with pytest.raises(ValueError, match="empty"):
        fn(torch.empty(0), torch.empty(0), torch.empty(0))
    with pytest.raises(ValueError, match="NaN"):
        fn(mean, var, torch.full_like(y, float("inf")))
    with pytest.raises(ValueError, match="same shape"):
        metrics.rmse(mean, y[:, 0])
