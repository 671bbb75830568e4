"""The predictive's cheaper paths compute what the plain formulas compute: the gated surrogate's
features and gradients (one accumulated map to ``H``, one batched product) against the einsum of
its definition, the diagonal of the Kronecker-factored covariance read from ``kron_gram``
against the diagonal of the full covariance, and the probit read from the variances against
the probit of the full covariance — each in float64, to tolerances from ε and the sizes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fastlla
from fastlla.posterior import FeaturePosterior, kron_gram
from fastlla.predictive import probit
from fastlla.surrogate import GatedSurrogate

from testing import eps_tolerance  # noqa: E402

D, h, C = 6, 12, 4


def gated_model(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 10), nn.Tanh(), nn.Linear(10, h), nn.ReLU(), nn.Linear(h, C))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.to(dtype).eval()


def reference_features(s: GatedSurrogate, x):
    """``g[m, c] = scale · Σ_j H[j, m] σ'(z_j) W[c, j]``, ``H = linear(u) + mlp(u)`` as defined."""
    model = s._model[0]
    with torch.no_grad():
        phi = model[:4](x)
    u = s.trunk(x).reshape(x.shape[0], -1)
    H = s.linear(u) + (s.mlp(u) if s.mlp is not None else 0)
    H = H.view(x.shape[0], s.hidden, s.n_features)
    gated = s.gate(phi)[:, None, :] * s.head_weight
    return torch.einsum("bjm,bcj->bmc", H, gated) * s.output_scale


@pytest.mark.parametrize("width", [0, 16])
def test_gated_features_and_gradients_match_their_definition(width):
    model = gated_model()
    s = GatedSurrogate(model, 7, C, width, generator=torch.Generator().manual_seed(1)).double()
    s.output_scale.fill_(1.7)
    x = torch.randn(9, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = s(x)
    want = reference_features(s, x)
    assert got.shape == (9, 7, C)
    n = 10 + width + h  # terms accumulated into one feature
    tol = eps_tolerance(torch.float64, n)
    scale = float(want.detach().abs().max())
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)
    weights = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = [p for p in s.parameters() if p.requires_grad]
    g_got = torch.autograd.grad((got * weights).sum(), params)
    g_want = torch.autograd.grad((want * weights).sum(), params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max() + 1e-300))


def random_posterior(M, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(M, 3 * M, dtype=torch.float64, generator=g)
    return FeaturePosterior(F @ F.mT / M)


@pytest.mark.parametrize("k", [1, 5])
def test_kron_diagonal_from_the_gram_is_the_diagonal_of_the_covariance(k):
    m, B = 6, 11
    M = m + k * C
    post = random_posterior(M)
    g = torch.Generator().manual_seed(4)
    phi = torch.randn(B, m, C, dtype=torch.float64, generator=g)
    a = torch.randn(B, k, dtype=torch.float64, generator=g)
    full = post.covariance(phi, 0.7, 1.3, a)
    var = post.variance(phi, 0.7, 1.3, a)
    assert post._kron_gram is not None  # the gram path ran
    eye = torch.eye(C, dtype=a.dtype)
    dense = torch.cat([phi, (a[:, :, None, None] * eye).reshape(B, k * C, C)], dim=1)
    A = post.precision(0.7, 1.3)
    reference = torch.diagonal(dense.mT @ torch.linalg.solve(A, dense), dim1=1, dim2=2)
    cond = float(torch.linalg.cond(A))
    tol = eps_tolerance(torch.float64, M, cond)
    torch.testing.assert_close(var, torch.diagonal(full, dim1=1, dim2=2), rtol=tol, atol=tol * float(reference.max()))
    torch.testing.assert_close(var, reference, rtol=tol, atol=tol * float(reference.max()))
    Q = kron_gram(post._kron_factors(0.7, 1.3, m, C)[0], C)
    assert Q.shape == (k, C * k)
    torch.testing.assert_close(Q.view(k, C, k), Q.view(k, C, k).permute(2, 1, 0))  # Q_c symmetric


@pytest.mark.parametrize("kind", ["ScaLLA", "ExactLLA"])
def test_probit_from_the_variances_is_the_probit_of_the_covariance(kind):
    model = gated_model()
    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, D, dtype=torch.float64, generator=g)
    y = model(X).argmax(-1)
    batches = [(X[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
    if kind == "ScaLLA":
        la = fastlla.ScaLLA(model, "classification", n_features=8, head_width=8)
        la.fit(batches, iterations=5, progress_bar=False)
        assert la.gate_used and la.last_layer_used is True and la.residual_mode == "head"
    else:
        la = fastlla.ExactLLA(model, "classification").fit(batches)
    x = X[:7] + 0.1
    mean, cov = la.predictive_distribution(x)
    got = la(x)
    want = probit(mean, cov)
    tol = eps_tolerance(torch.float64, la.n_params)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert not torch.equal(want, torch.softmax(mean, -1))  # the variances matter
    mean_d, var = la.predictive_distribution(x, diagonal_output=True)
    torch.testing.assert_close(var, torch.diagonal(cov, dim1=1, dim2=2), rtol=tol, atol=tol * float(var.max()))


def test_an_infinite_variance_is_refused_on_the_variance_path():
    model = gated_model()
    X = torch.randn(20, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    batches = [(X, model(X).argmax(-1))]
    la = fastlla.ScaLLA(model, "classification", n_features=4, head_width=4)
    la.fit(batches, iterations=2, progress_bar=False)
    with torch.no_grad():
        la.surrogate.learned.output_scale.fill_(math.inf)
    with pytest.raises(ValueError, match="NaN or Inf"):
        la(X[:3])
    with pytest.raises(ValueError, match="NaN or Inf"):
        la.predictive_distribution(X[:3], diagonal_output=True)
