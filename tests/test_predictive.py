"""Link approximations and OOD scores against independent formulas (numpy, scipy, torch.distributions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from fastlla.predictive import (
    Likelihood,
    LinkApprox,
    class_probabilities,
    gaussian_logit_entropy,
    laplace_bridge,
    max_probability,
    monte_carlo,
    predictive_entropy,
    probit,
)

from testing import eps_tolerance  # noqa: E402

DT = torch.float64


def gaussian(B=4, C=3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(B, C, generator=g, dtype=DT) * 2
    A = torch.randn(B, C, C, generator=g, dtype=DT) * scale
    cov = A @ A.mT + 0.1 * torch.eye(C, dtype=DT)
    return mean, cov


# --------------------------------------------------------------------------- probit
def numpy_probit(mean, cov):
    mu, S = mean.numpy(), cov.numpy()
    out = np.empty_like(mu)
    for b in range(mu.shape[0]):
        k = mu[b] / np.sqrt(1.0 + np.pi / 8.0 * np.diag(S[b]))
        e = np.exp(k - k.max())
        out[b] = e / e.sum()
    return out


@pytest.mark.parametrize("C", [2, 3, 7])
def test_probit_matches_formula(C):
    mean, cov = gaussian(5, C, seed=C)
    got = probit(mean, cov)
    np.testing.assert_allclose(got.numpy(), numpy_probit(mean, cov), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, rtol=1e-13)
    torch.testing.assert_close(class_probabilities(mean, cov, "probit"), got, rtol=0, atol=0)
    # Zero covariance gives back the softmax; more variance flattens the prediction.
    tol = eps_tolerance(DT, n=mean.shape[-1])  # a C-term normalisation
    torch.testing.assert_close(probit(mean, 0 * cov), torch.softmax(mean, -1), rtol=tol, atol=tol)
    assert bool((probit(mean, 100 * cov).max(-1).values < got.max(-1).values).all())


# --------------------------------------------------------------------------- Laplace bridge
def numpy_bridge(mean, cov):
    """Hobbhahn et al. (2022): α_k = (1 − 2/K + e^{μ_k}/K² Σ_l e^{−μ_l}) / Σ_kk; mean α/Σα."""
    mu, S = mean.numpy(), cov.numpy()
    K = mu.shape[-1]
    out = np.empty_like(mu)
    for b in range(mu.shape[0]):
        var = np.diag(S[b])
        alpha = np.array(
            [(1 - 2 / K + np.exp(mu[b, k]) / K**2 * np.exp(-mu[b]).sum()) / var[k] for k in range(K)]
        )
        out[b] = alpha / alpha.sum()
    return out


@pytest.mark.parametrize("C", [2, 3, 10])
def test_laplace_bridge_matches_formula(C):
    mean, cov = gaussian(6, C, seed=10 + C)
    got = laplace_bridge(mean, cov, "bridge_uncorrected")
    np.testing.assert_allclose(got.numpy(), numpy_bridge(mean, cov), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(class_probabilities(mean, cov, "bridge_uncorrected"), got, rtol=0, atol=0)


def numpy_zero_mean(mean, cov):
    """laplace-torch's zero-mean correction, written out in numpy."""
    mu, S = mean.numpy().copy(), cov.numpy().copy()
    for b in range(mu.shape[0]):
        one = np.ones(mu.shape[1])
        s1, total = S[b] @ one, one @ S[b] @ one
        mu[b] = mu[b] - s1 * mu[b].sum() / total
        S[b] = S[b] - np.outer(s1, s1) / total
    return torch.from_numpy(mu), torch.from_numpy(S)


@pytest.mark.parametrize("C", [2, 3, 10])
def test_laplace_bridge_variants_match_laplace_torch_formulas(C):
    """``"bridge"``: the bridge of the zero-mean-corrected Gaussian; ``"bridge_norm"``: that,
    with the mean diagonal variance scaled to √(C/2) — laplace-torch's two formulas."""
    mean, cov = gaussian(6, C, seed=30 + C)
    m0, S0 = numpy_zero_mean(mean, cov)
    assert np.allclose(m0.sum(-1).numpy(), 0, atol=1e-12)  # the corrected logits sum to zero
    got = laplace_bridge(mean, cov)
    np.testing.assert_allclose(got.numpy(), numpy_bridge(m0, S0), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(class_probabilities(mean, cov, "bridge"), got, rtol=0, atol=0)
    var = np.diagonal(S0.numpy(), axis1=1, axis2=2)
    s = var.mean(1) / np.sqrt(C / 2)
    mn, Sn = m0 / torch.from_numpy(np.sqrt(s))[:, None], S0 / torch.from_numpy(s)[:, None, None]
    norm = laplace_bridge(mean, cov, "bridge_norm")
    np.testing.assert_allclose(norm.numpy(), numpy_bridge(mn, Sn), rtol=1e-10, atol=1e-14)
    # Different formulas, different answers.
    assert float((got - laplace_bridge(mean, cov, "bridge_uncorrected")).abs().max()) > 1e-3


def test_laplace_bridge_large_logits_stay_finite():
    # The formula depends on μ only through e^{μ_k} Σ_l e^{−μ_l}, which a shift leaves unchanged,
    # so the oracle at μ equals the value at μ + 800 (where a naive exp overflows).
    mean, cov = gaussian(4, 5, seed=3)
    shifted = laplace_bridge(mean + 800.0, cov, "bridge_uncorrected")
    assert bool(torch.isfinite(shifted).all())
    np.testing.assert_allclose(shifted.numpy(), numpy_bridge(mean, cov), rtol=1e-10)


# --------------------------------------------------------------------------- Monte Carlo
def test_monte_carlo_matches_large_sample_estimate():
    mean, cov = gaussian(3, 4, seed=21, scale=1.5)
    n_code = 300  # the reference op draws one sample per Python step
    got = monte_carlo(mean, cov, n_samples=n_code, seed=5)
    torch.manual_seed(1234)
    dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    draws = torch.softmax(dist.sample((100_000,)), dim=-1)  # (n, B, C)
    ref = draws.mean(0)
    sd = draws.std(0)
    se = sd * math.sqrt(1 / n_code + 1 / draws.shape[0])
    z = ((got - ref) / se).abs()
    assert float(z.max()) < 5.0, float(z.max())
    # Sharp enough to see the difference from the plug-in softmax and from probit.
    assert float(((torch.softmax(mean, -1) - ref) / se).abs().max()) > 5.0
    torch.testing.assert_close(got.sum(-1), torch.ones(3, dtype=DT), rtol=1e-12, atol=1e-12)


def test_monte_carlo_seeded():
    mean, cov = gaussian(3, 4, seed=22)
    a = monte_carlo(mean, cov, n_samples=50, seed=7)
    b = monte_carlo(mean, cov, n_samples=50, seed=7)
    c = monte_carlo(mean, cov, n_samples=50, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(class_probabilities(mean, cov, "mc", n_samples=50, seed=7), a)
    # With (numerically) zero covariance every draw is the mean.
    d = monte_carlo(mean, 1e-30 * torch.eye(4, dtype=DT).expand(3, 4, 4), n_samples=5)
    torch.testing.assert_close(d, torch.softmax(mean, -1), rtol=1e-12, atol=1e-12)


def test_monte_carlo_first_draws_are_the_op_normals():
    """One draw is softmax(μ + L ε): ε must be standard normal across many (b, c) cells."""
    B, C = 20000, 2
    mean = torch.zeros(B, C, dtype=DT)
    cov = torch.eye(C, dtype=DT).expand(B, C, C).contiguous()
    p = monte_carlo(mean, cov, n_samples=1, seed=3)
    # For C = 2 with identity cov, logit difference ε₀ − ε₁ ~ N(0, 2): p₀ = sigmoid(ε₀ − ε₁).
    d = torch.logit(p[:, 0]).numpy() / math.sqrt(2)
    assert scipy.stats.kstest(d, "norm").pvalue > 1e-4
    # Unit variance, to within 5 standard errors of the sample variance (√(2/n)).
    assert abs(d.var() - 1) < 5 * math.sqrt(2 / B)
    assert abs(d.mean()) < 5 / math.sqrt(B)


# --------------------------------------------------------------------------- OOD scores
def test_predictive_entropy_and_max_probability():
    mean, _ = gaussian(6, 5, seed=30)
    probs = torch.softmax(mean, -1)
    probs[0] = torch.tensor([1.0, 0, 0, 0, 0], dtype=DT)  # a zero probability contributes 0
    ent = predictive_entropy(probs)
    np.testing.assert_allclose(ent.numpy(), scipy.stats.entropy(probs.numpy(), axis=-1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(max_probability(probs).numpy(), 1 - probs.numpy().max(-1), rtol=1e-14)


def test_gaussian_logit_entropy_is_half_logdet():
    _, cov = gaussian(5, 4, seed=31)
    got = gaussian_logit_entropy(cov)
    sign, logdet = np.linalg.slogdet(cov.numpy())
    assert (sign > 0).all()
    np.testing.assert_allclose(got.numpy(), 0.5 * logdet, rtol=1e-12)


# --------------------------------------------------------------------------- bad input
def test_unknown_link_and_likelihood():
    mean, cov = gaussian(2, 3)
    with pytest.raises(ValueError, match="link_approx"):
        class_probabilities(mean, cov, "sigmoid")
    with pytest.raises(ValueError, match="likelihood"):
        Likelihood.parse("poisson")
    assert LinkApprox.parse("bridge") is LinkApprox.BRIDGE
    assert Likelihood.parse("regression") is Likelihood.REGRESSION


def test_monte_carlo_bad_samples():
    mean, cov = gaussian(2, 3)
    with pytest.raises(RuntimeError, match="n_samples"):
        monte_carlo(mean, cov, n_samples=0)
