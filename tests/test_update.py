"""Streaming updates: ``ScaLLA.update`` against a refit over all the data, and refused input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastlla
from fastlla import _ops, posterior
from fastlla.laplace import NotFittedError

DTYPE = torch.float64
D, C, M = 4, 3, 6


def make_problem(likelihood: str, n: int = 60, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 10), nn.Tanh(), nn.Linear(10, C)).to(DTYPE)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, D, generator=g, dtype=DTYPE)
    with torch.no_grad():
        f = model(X)
    if likelihood == "classification":
        y = torch.distributions.Categorical(logits=f).sample()
    else:
        y = f + 0.3 * torch.randn(n, C, generator=g, dtype=DTYPE)
    return model, X, y


def loader(X, y, batch_size=7):
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


def fitted(likelihood, model, X, y, surrogate=None):
    sigma = 0.5 if likelihood == "regression" else 1.0
    la = fastlla.ScaLLA(
        model, likelihood, n_features=M, surrogate=surrogate, prior_precision=0.7, sigma_noise=sigma
    )
    return la.fit(loader(X, y), iterations=0, progress_bar=False)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def predictive_factor(post):
    """The Cholesky factor the predictive uses: the reordered one of the factored last-layer
    block when there is one (ScaLLA's default), else the plain one."""
    return post._kron_chol if post._kron_chol is not None else post._chol


def snapshot(la):
    p = la.posterior
    return (
        p.H.clone(),
        None if predictive_factor(p) is None else predictive_factor(p).clone(),
        (p._chol_key, p._kron_key),
        la.n_data,
        la._loglik_stat,
        float(la.log_marginal_likelihood()),
    )


def assert_unchanged(la, before):
    H, chol, key, n, stat, lml = before
    assert torch.equal(la.posterior.H, H)
    assert (la.posterior._chol_key, la.posterior._kron_key) == key
    factor = predictive_factor(la.posterior)
    assert (chol is None and factor is None) or torch.equal(factor, chol)
    assert la.n_data == n and la._loglik_stat == stat
    assert float(la.log_marginal_likelihood()) == lml


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_update_equals_refit(likelihood, monkeypatch):
    model, X, y = make_problem(likelihood)
    la = fitted(likelihood, model, X[:25], y[:25])
    x_test = X[:5]
    la.predictive_distribution(x_test)  # caches the Cholesky factor for (δ, s)
    cached = predictive_factor(la.posterior)
    assert cached is not None

    calls = []
    native_update = _ops.cholesky_update
    monkeypatch.setattr(_ops, "cholesky_update", lambda *a: calls.append(1) or native_update(*a))
    la.update(loader(X[25:40], y[25:40], batch_size=4))
    la.update(loader(X[40:], y[40:], batch_size=20))  # 20·C > 2M columns: compressed by QR
    assert len(calls) == 2  # the cached factor was updated, not refactorised
    assert predictive_factor(la.posterior) is not cached

    def refuse(*args, **kwargs):
        raise AssertionError("refactorised after update")

    monkeypatch.setattr(posterior, "psd_safe_cholesky", refuse)
    mean_u, cov_u = la.predictive_distribution(x_test)
    monkeypatch.undo()

    ref = fitted(likelihood, model, X, y, surrogate=la.surrogate)
    mean_r, cov_r = ref.predictive_distribution(x_test)
    assert la.n_data == ref.n_data == X.shape[0]
    assert rel(la.posterior.H, ref.posterior.H) < 1e-12
    assert rel(predictive_factor(la.posterior), predictive_factor(ref.posterior)) < 1e-12
    assert torch.equal(mean_u, mean_r)
    assert rel(cov_u, cov_r) < 1e-12
    for delta in (0.01, 0.7, 50.0):
        a, b = float(la.log_marginal_likelihood(delta)), float(ref.log_marginal_likelihood(delta))
        assert abs(a - b) <= 1e-11 * abs(b)
    # hyper-parameters re-optimised after the update (eigenvalues recomputed from the new H)
    sigma_too = likelihood == "regression"
    d_u = la.optimize_prior_precision("marglik", optimize_sigma_noise=sigma_too)
    d_r = ref.optimize_prior_precision("marglik", optimize_sigma_noise=sigma_too)
    assert math.isclose(d_u, d_r, rel_tol=1e-6)
    assert math.isclose(la.sigma_noise, ref.sigma_noise, rel_tol=1e-6)
    # predictions at the new hyper-parameters (located to ~1e-8): a fresh factor, still equal
    assert rel(la.predictive_distribution(x_test)[1], ref.predictive_distribution(x_test)[1]) < 1e-6


def test_update_float32_within_float_tolerance():
    model, X, y = make_problem("classification")
    model = model.float()
    X = X.float()
    la = fitted("classification", model, X[:30], y[:30])
    la.predictive_distribution(X[:4])
    la.update(loader(X[30:], y[30:]))
    ref = fitted("classification", model, X, y, surrogate=la.surrogate)
    assert rel(la.predictive_distribution(X[:4])[1], ref.predictive_distribution(X[:4])[1]) < 1e-4


def test_update_without_cached_factor_and_after_load():
    model, X, y = make_problem("classification")
    la = fitted("classification", model, X[:30], y[:30])
    assert predictive_factor(la.posterior) is None
    la.update(loader(X[30:], y[30:]))
    assert predictive_factor(la.posterior) is None  # nothing to update: factorised on demand
    ref = fitted("classification", model, X, y, surrogate=la.surrogate)
    assert rel(la.predictive_distribution(X[:4])[1], ref.predictive_distribution(X[:4])[1]) < 1e-12
    # a saved posterior keeps absorbing data
    other = fastlla.ScaLLA(model, "classification", n_features=M)
    saved = fitted("classification", model, X[:30], y[:30], la.surrogate).state_dict()
    other.load_state_dict(saved)
    other.update(loader(X[30:], y[30:]))
    assert rel(other.posterior.H, ref.posterior.H) < 1e-12


def _bad_loaders(likelihood, X, y):
    good = list(loader(X[:14], y[:14]))  # two good batches before the bad one
    if likelihood == "classification":
        yield "float labels", good + [(X[14:20], y[14:20].double())]
        yield "labels out of range", good + [(X[14:20], torch.full((6,), C))]
        yield "2-D labels", good + [(X[14:20], y[14:20, None])]
    else:
        yield "wrong number of outputs", good + [(X[14:20], y[14:20, :2])]
        yield "NaN targets", good + [(X[14:20], torch.full_like(y[14:20], math.nan))]
    yield "wrong input shape", good + [(X[14:20, :2], y[14:20])]
    yield "NaN inputs", good + [(torch.full_like(X[14:20], math.nan), y[14:20])]
    yield "inputs and targets disagree", good + [(X[14:20], y[14:19])]
    yield "not pairs", good + [X[14:20]]
    yield "empty", []


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_refused_update_leaves_the_posterior_untouched(likelihood):
    model, X, y = make_problem(likelihood)
    la = fitted(likelihood, model, X[:30], y[:30])
    la.predictive_distribution(X[:3])
    for name, batches in _bad_loaders(likelihood, X[30:], y[30:]):
        before = snapshot(la)
        with pytest.raises((ValueError, RuntimeError, TypeError)):
            la.update(batches)
        assert_unchanged(la, before), name


def test_update_refuses_a_surrogate_with_other_features():
    model, X, y = make_problem("classification")
    la = fitted("classification", model, X[:30], y[:30])
    before = snapshot(la)

    class OneMore(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            phi = self.inner(x)
            return torch.cat([phi, phi[:, :1]], dim=1)

    la.surrogate = OneMore(la.surrogate)
    with pytest.raises(ValueError, match="features"):
        la.update(loader(X[30:], y[30:]))
    assert_unchanged(la, before)


def test_update_before_fit():
    model, X, y = make_problem("classification")
    with pytest.raises(NotFittedError):
        fastlla.ScaLLA(model, "classification").update(loader(X, y))
