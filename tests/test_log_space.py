"""Probabilities, NLLs and entropies in log space: logits of ±1e4 in float32 and float64 give
finite values equal to float64 log-space references computed here, independently."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from torch import nn

import fastlla
from fastlla import metrics
from fastlla.predictive import (
    class_probabilities,
    log_class_probabilities,
    monte_carlo,
    predictive_entropy,
)

F64 = torch.float64


def eps(dtype):
    return torch.finfo(dtype).eps


def huge_gaussian(B=8, C=4, seed=0):
    """Logits spread by up to ±1e4 (float64) and well-conditioned covariances."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(B, C, generator=g, dtype=F64) * 1e4
    mean[0] = torch.tensor([1e4, -1e4, 0.0, 5e3], dtype=F64)[:C]
    mean[1] = torch.tensor([3.0, -2.0, 1.0, 0.5], dtype=F64)[:C]  # a moderate row too
    A = torch.randn(B, C, C, generator=g, dtype=F64)
    cov = A @ A.mT / C + 0.1 * torch.eye(C, dtype=F64)
    return mean, cov


def ref_log_probit(mean, cov):
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    return torch.log_softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1)


def ref_log_bridge(mean, cov):
    """Hobbhahn et al.: α_k = (1 − 2/K + e^{μ_k} Σ_l e^{−μ_l} / K²) / Σ_kk, mean α/Σα, evaluated
    with logaddexp/logsumexp (float64)."""
    K = mean.shape[-1]
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    b = mean + torch.logsumexp(-mean, -1, keepdim=True) - 2 * math.log(K)
    const = torch.full_like(b, math.log(1 - 2 / K) if K > 2 else -math.inf)
    return torch.log_softmax(torch.logaddexp(const, b) - torch.log(var), -1)


def ref_log_bridge_corrected(mean, cov):
    """The bridge of the Gaussian conditioned on Σ_c f_c = 0 (laplace-torch's "bridge"):
    μ − Σ1(1ᵀμ)/(1ᵀΣ1), Σ − Σ11ᵀΣ/(1ᵀΣ1), in float64."""
    mean, cov = mean.double(), cov.double()
    row = cov.sum(-1)
    total = row.sum(-1, keepdim=True)
    mean = mean - row * mean.sum(-1, keepdim=True) / total
    cov = cov - row[:, :, None] * row[:, None, :] / total[:, :, None]
    return ref_log_bridge(mean, cov)


REFS = {
    "probit": ref_log_probit,
    "bridge_uncorrected": ref_log_bridge,
    "bridge": ref_log_bridge_corrected,
}


def assert_log_close(got, ref, dtype, scale):
    """Each entry within 16 ulps of the logits' magnitude ``scale`` (rounding of inputs and of
    a few operations on numbers that large)."""
    assert bool(torch.isfinite(got).all()), got
    tol = 16 * eps(dtype) * max(scale, 1.0)
    err = float((got.double() - ref).abs().max())
    assert err <= tol, (err, tol)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("link", ["probit", "bridge_uncorrected", "bridge"])
def test_log_links_at_huge_logits_match_float64_references(link, dtype):
    mean, cov = huge_gaussian()
    m, S = mean.to(dtype), cov.to(dtype)
    ref = REFS[link](m.double(), S.double())
    scale = float(mean.abs().max())
    got = log_class_probabilities(m, S, link)
    assert got.dtype == dtype
    assert_log_close(got, ref, dtype, scale)
    probs = class_probabilities(m, S, link)
    assert bool(torch.isfinite(probs).all())
    tol = 16 * eps(dtype) * scale
    torch.testing.assert_close(probs.double(), ref.exp(), rtol=tol, atol=16 * eps(dtype))


def test_bridge_reference_is_the_published_formula_at_moderate_logits():
    mean, cov = huge_gaussian()
    mean, cov = mean[1:2], cov[1:2]
    K = mean.shape[-1]
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    alpha = (1 - 2 / K + mean.exp() * (-mean).exp().sum(-1, keepdim=True) / K**2) / var
    torch.testing.assert_close(ref_log_bridge(mean, cov).exp(), alpha / alpha.sum(-1, keepdim=True))


@pytest.mark.parametrize("C", [1, 2, 3])
def test_bridge_small_class_counts(C):
    mean = torch.tensor([[1e4, -1e4, 0.0][:C]], dtype=torch.float32)
    cov = torch.eye(C).expand(1, C, C)
    got = log_class_probabilities(mean, cov, "bridge_uncorrected")
    if C == 1:
        assert torch.equal(got, torch.zeros(1, 1))
    else:
        assert_log_close(got, ref_log_bridge(mean.double(), cov.double()), torch.float32, 1e4)


def op_logit_differences(S, B, seed):
    """The fused op's draws for C = 2, Σ = I: sample s's logit difference ``d_s = ε₀ − ε₁``,
    read back from the op (mean 0) as ``k·p̄(k) − (k−1)·p̄(k−1) = sigmoid(d_{k−1})``."""
    zero = torch.zeros(B, 2, dtype=F64)
    eye = torch.eye(2, dtype=F64).expand(B, 2, 2).contiguous()
    sums = [monte_carlo(zero, eye, n_samples=k, seed=seed)[:, 0] * k for k in range(1, S + 1)]
    p = torch.stack([sums[0]] + [sums[k] - sums[k - 1] for k in range(1, S)])  # (S, B)
    return torch.logit(p)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_log_monte_carlo_at_huge_logits_matches_a_float64_reference(dtype):
    S, seed = 16, 5
    mean = torch.tensor([[1e4, -1e4], [-5e3, 5e3], [30.0, -30.0], [0.3, -0.2]], dtype=F64)
    B = mean.shape[0]
    d = op_logit_differences(S, B, seed)  # (S, B)
    delta = (mean[:, 0] - mean[:, 1]) + d  # sample logit differences
    ref = torch.stack(
        [
            torch.logsumexp(-nn.functional.softplus(-delta), 0) - math.log(S),
            torch.logsumexp(-nn.functional.softplus(delta), 0) - math.log(S),
        ],
        dim=-1,
    )
    eye = torch.eye(2, dtype=dtype).expand(B, 2, 2).contiguous()
    got = log_class_probabilities(mean.to(dtype), eye, "mc", n_samples=S, seed=seed)
    assert_log_close(got, ref, dtype, 2e4)
    # and the log-space path draws what the fused op draws
    probs = class_probabilities(mean.to(dtype), eye, "mc", n_samples=S, seed=seed)
    torch.testing.assert_close(got.exp(), probs, rtol=16 * eps(dtype) * 2e4, atol=16 * eps(dtype))


def test_log_monte_carlo_equals_the_op_on_a_general_covariance():
    mean, cov = huge_gaussian(B=5, C=4, seed=3)
    mean = mean / 1e4  # moderate logits: every probability representable
    got = log_class_probabilities(mean, cov, "mc", n_samples=30, seed=2)
    torch.testing.assert_close(got.exp(), monte_carlo(mean, cov, 30, seed=2), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- NLL / grid search
def confident_problem(seed=0):
    """A very confident classifier and a validation set with one confidently wrong point."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        model[2].weight.mul_(60)
        model[2].bias.zero_()
    X = torch.randn(64, 2, generator=g)
    with torch.no_grad():
        y = model(X).argmax(-1)
        Xv = torch.randn(40, 2, generator=g)
        yv = model(Xv).argmax(-1)
        margins = (model(Xv)[:, 0] - model(Xv)[:, 1]).abs()
        i = int(margins.argmax())
        yv[i] = 1 - yv[i]  # the most confident point, mislabelled
    assert float(margins.max()) > 100  # its probability underflows in float32
    return model, [(X[:32], y[:32]), (X[32:], y[32:])], [(Xv[:20], yv[:20]), (Xv[20:], yv[20:])]


def tol(nll_sum):
    """float32 logits and covariances, 40 points: a few float32 ulps of each term, summed."""
    return 1e-5 * abs(nll_sum) + 1e-3


@pytest.mark.parametrize("link", ["probit", "bridge"])
def test_gridsearch_nll_is_finite_and_picks_the_reference_minimiser(link):
    model, train, val = confident_problem()
    la = fastlla.ExactLLA(model, "classification").fit(train)
    grid = [1.0, 10.0, 100.0, 1e3, 1e4]
    xv = torch.cat([x for x, _ in val])
    yv = torch.cat([y for _, y in val])
    f, feats = la._outputs_and_features(xv)
    ref, mine = {}, {}
    for delta in grid:
        cov = la._covariance_from_features(feats, delta, 1.0)
        logp = REFS[link](f.double(), cov.double())
        ref[delta] = float(-logp.gather(1, yv[:, None]).sum())
        mine[delta] = float(la._nll_sum(f, cov, yv, link))
        assert math.isfinite(mine[delta])
        assert abs(mine[delta] - ref[delta]) <= tol(ref[delta]), (delta, mine, ref)
    best = min(ref, key=ref.get)
    second = sorted(ref.values())[1]
    assert second - ref[best] > 2 * tol(ref[best])  # a minimiser the rounding cannot move
    assert la.optimize_prior_precision("gridsearch", val, grid=grid, link_approx=link) == best


def test_huge_logit_bridge_predictions_of_an_estimator_are_finite():
    model, train, val = confident_problem(seed=1)
    la = fastlla.ExactLLA(model, "classification").fit(train)
    x = torch.cat([x for x, _ in val]) * 10  # farther out: larger logits
    mean, cov = la.predictive_distribution(x)
    assert float(mean.abs().max()) > 500
    probs = la(x, link_approx="bridge")
    ref = ref_log_bridge_corrected(mean.double(), cov.double()).exp()
    torch.testing.assert_close(probs.double(), ref, rtol=0, atol=16 * eps(torch.float32) * 1e3)


# --------------------------------------------------------------------------- entropy, metrics
def test_entropy_of_probabilities_with_exact_zeros_is_finite():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    expected = torch.tensor(scipy.stats.entropy(probs.double().numpy(), axis=-1))
    torch.testing.assert_close(predictive_entropy(probs).double(), expected, rtol=1e-6, atol=1e-7)
    logp = torch.log(probs)  # −inf where p = 0
    torch.testing.assert_close(
        predictive_entropy(logp, log_probs=True).double(), expected, rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_nll_metric_from_log_probabilities_at_huge_logits(dtype):
    mean, _ = huge_gaussian()
    y = torch.tensor([1, 0, 2, 3, 1, 0, 2, 3])
    logp = torch.log_softmax(mean.to(dtype), -1)
    ref = float(-torch.log_softmax(mean.to(dtype).double(), -1).gather(1, y[:, None]).mean())
    got = metrics.nll(logp, y, log_probs=True)
    assert abs(got - ref) <= 16 * eps(dtype) * abs(ref)
    # from probabilities the underflowed ones can only be capped (documented)
    assert metrics.nll(logp.exp(), y) < ref
    with pytest.raises(ValueError, match="log-sum-exp"):
        metrics.nll(mean, y, log_probs=True)  # logits, not log-probabilities
    with pytest.raises(ValueError, match="NaN"):
        metrics.nll(torch.full((2, 3), math.nan), torch.tensor([0, 1]), log_probs=True)
    with pytest.raises(ValueError, match="labels"):
        metrics.nll(logp, y + 4, log_probs=True)


def test_log_monte_carlo_takes_one_sample_and_refuses_none():
    """One draw is allowed (its log-probabilities are a log-softmax of one logit sample, equal to
    the fused op's single draw); zero draws are refused."""
    from fastlla.predictive import log_monte_carlo, monte_carlo

    g = torch.Generator().manual_seed(4)
    mean = torch.randn(5, 3, generator=g, dtype=torch.float64)
    a = torch.randn(5, 3, 3, generator=g, dtype=torch.float64)
    cov = a @ a.mT + 0.1 * torch.eye(3, dtype=torch.float64)
    one = log_monte_carlo(mean, cov, n_samples=1, seed=2)
    torch.testing.assert_close(one.exp(), monte_carlo(mean, cov, n_samples=1, seed=2))
    torch.testing.assert_close(one.logsumexp(-1), torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_samples"):
        log_monte_carlo(mean, cov, n_samples=0)
