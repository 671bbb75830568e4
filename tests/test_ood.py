"""fastlla.ood_score against oracles: explicit Jacobians and posterior covariance in float64
for ExactLLA (both forms, scalar and per-layer prior, classification and regression); ScaLLA's
prior covariance from its features (and residual block); the mutual information against a
direct Monte-Carlo computation with the same generator; errors; no global RNG use."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastlla
from fastlla.ood import DEFAULT_KIND, KINDS, gaussian_ood_scores, ood_scores
from testing import eps_tolerance, oracle_jacobian

DTYPE = torch.float64
C = 3


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def problem(likelihood: str = "classification", n: int = 40, d: int = 4):
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, C)).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE))
    X = torch.randn(n, d, generator=g, dtype=DTYPE)
    with torch.no_grad():
        if likelihood == "classification":
            y = model(X).argmax(-1)
        else:
            y = model(X) + 0.3 * torch.randn(n, C, generator=g, dtype=DTYPE)
    x_test = torch.cat([torch.randn(5, d, generator=g, dtype=DTYPE),
                        4 * torch.randn(3, d, generator=g, dtype=DTYPE)])  # fmt: skip
    return model, DataLoader(TensorDataset(X, y), batch_size=16), X, x_test


def centred_basis(c: int) -> torch.Tensor:
    """An orthonormal basis of 1^⊥ from a QR of [1, e_1, ..., e_{C-1}] (not Helmert's)."""
    M = torch.cat([torch.ones(c, 1, dtype=DTYPE), torch.eye(c, dtype=DTYPE)[:, : c - 1]], 1)
    return torch.linalg.qr(M).Q[:, 1:]


def oracle_scores(f, cov, prior, classification=True) -> dict[str, torch.Tensor]:
    """Every deterministic kind, straight from the definitions."""
    out = {"logdet": 0.5 * torch.linalg.slogdet(cov)[1]}
    if classification:
        Q = centred_basis(f.shape[-1])
        post, pri = Q.mT @ cov @ Q, Q.mT @ prior @ Q
        p = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * torch.diagonal(cov, dim1=1, dim2=2)), -1)
        out["entropy"] = -(p * p.log()).sum(-1)
        out["max_probability"] = 1 - p.max(-1).values
        out["logdet_softmax"] = 0.5 * torch.linalg.slogdet(post)[1]
    else:
        post, pri = cov, prior
    tr = lambda A: torch.diagonal(A, dim1=1, dim2=2).sum(-1)  # noqa: E731
    out["variance_ratio"] = tr(post) / tr(pri)
    out["logdet_ratio"] = 0.5 * (torch.linalg.slogdet(post)[1] - torch.linalg.slogdet(pri)[1])
    return out


def exact_oracle(model, X, x_test, likelihood, delta_diag, sigma=1.0):
    """``(f, J P⁻¹ Jᵀ, J D⁻¹ Jᵀ)`` from explicit Jacobians, ``P = sG + D``."""
    J = oracle_jacobian(model, X)
    with torch.no_grad():
        fX, f = model(X), model(x_test)
    if likelihood == "classification":
        p = torch.softmax(fX, -1)
        Lam, s = torch.diag_embed(p) - p[:, :, None] * p[:, None, :], 1.0
    else:
        Lam, s = torch.eye(C, dtype=DTYPE).expand(len(X), C, C), 1.0 / sigma**2
    G = torch.einsum("ncp,ncd,ndq->pq", J, Lam, J)
    Jx = oracle_jacobian(model, x_test)
    P = s * G + torch.diag(delta_diag)
    return f, Jx @ torch.linalg.solve(P, Jx.mT), (Jx / delta_diag) @ Jx.mT, torch.linalg.cond(P)


@pytest.mark.parametrize("form", ["weight", "function"])
@pytest.mark.parametrize("prior", ["scalar", "layerwise"])
def test_exact_lla_scores_match_the_explicit_jacobian_oracle(form, prior):
    model, loader, X, x_test = problem()
    delta = 0.7 if prior == "scalar" else torch.tensor([0.3, 1.1, 2.0, 0.5], dtype=DTYPE)
    la = fastlla.ExactLLA(model, "classification", prior_precision=delta, form=form).fit(loader)
    sizes = [p.numel() for p in model.parameters()]
    diag = (torch.full((sum(sizes),), 0.7, dtype=DTYPE) if prior == "scalar"
            else torch.repeat_interleave(delta, torch.tensor(sizes)))  # fmt: skip
    f, cov, prior_cov, cond = exact_oracle(model, X, x_test, "classification", diag)
    got = ood_scores(la, x_test, tuple(k for k in KINDS if k != "mutual_information"))
    want = oracle_scores(f, cov, prior_cov)
    # Σ comes from a solve with P (condition number cond) over P or N·C terms
    tol = eps_tolerance(DTYPE, max(la.n_params, len(X) * C), float(cond))
    for kind, value in want.items():
        scale = max(1.0, float(value.abs().max()))
        assert torch.allclose(got[kind], value, rtol=tol, atol=tol * scale), kind
    assert (got["variance_ratio"] <= 1 + tol).all() and (got["logdet_ratio"] <= tol).all()


def test_regression_kinds_match_the_oracle_and_class_kinds_are_refused():
    model, loader, X, x_test = problem("regression")
    la = fastlla.ExactLLA(model, "regression", prior_precision=0.4, sigma_noise=0.5).fit(loader)
    diag = torch.full((la.n_params,), 0.4, dtype=DTYPE)
    f, cov, prior_cov, cond = exact_oracle(model, X, x_test, "regression", diag, sigma=0.5)
    want = oracle_scores(f, cov, prior_cov, classification=False)
    got = ood_scores(la, x_test, tuple(want))
    tol = eps_tolerance(DTYPE, max(la.n_params, len(X) * C), float(cond))
    for kind, value in want.items():
        assert torch.allclose(got[kind], value, rtol=tol, atol=tol * max(1.0, float(value.abs().max()))), kind
    for kind in ("entropy", "max_probability", "mutual_information", "logdet_softmax"):
        with pytest.raises(ValueError, match=rf"OOD score kind\(s\) \['{kind}'\] need class probabilities"):
            fastlla.ood_score(la, x_test, kind)


def test_mutual_information_matches_a_direct_monte_carlo_with_the_same_generator():
    model, loader, _, x_test = problem()
    la = fastlla.ExactLLA(model, "classification", prior_precision=0.7).fit(loader)
    S = 500
    got = fastlla.ood_score(la, x_test, "mutual_information", n_samples=S,
                            generator=torch.Generator().manual_seed(11))  # fmt: skip
    f, cov = la.predictive_distribution(x_test)
    eps = torch.randn(len(x_test), C, S, generator=torch.Generator().manual_seed(11), dtype=DTYPE)
    samples = f[:, :, None] + torch.linalg.cholesky(cov) @ eps  # (B, C, S)
    p = torch.softmax(samples, dim=1)
    pbar = p.mean(-1)
    mi = -(pbar * pbar.log()).sum(-1) + (p * p.log()).sum(1).mean(-1)
    tol = eps_tolerance(DTYPE, S * C)
    assert torch.allclose(got, mi, rtol=tol, atol=tol)
    assert (got > 0).all()
    # the seed route: reproducible, and another seed gives other draws
    a = fastlla.ood_score(la, x_test, "mutual_information", seed=5)
    assert torch.equal(a, fastlla.ood_score(la, x_test, "mutual_information", seed=5))
    assert not torch.equal(a, fastlla.ood_score(la, x_test, "mutual_information", seed=6))


@pytest.mark.parametrize("residual", [False, "head"])
def test_scalla_prior_covariance_is_its_feature_prior(residual):
    model, loader, _, x_test = problem()
    la = fastlla.ScaLLA(model, "classification", n_features=6, prior_precision=0.9,
                        residual_variance=residual, seed=0)  # fmt: skip
    la.fit(loader, iterations=5, progress_bar=False)
    assert la.residual_mode == (residual or False)
    Js, f = la.jacobians(x_test)  # the dense features g(x)ᵀ (B, C, M)
    _, cov = la.predictive_distribution(x_test)
    residual_block = cov - la.functional_variance(Js)  # r(x)/δ (zero without the residual)
    assert (residual_block.norm() > 1e-6 * cov.norm()) == bool(residual)
    prior_cov = Js @ Js.mT / 0.9 + residual_block
    got = ood_scores(la, x_test, tuple(k for k in KINDS if k != "mutual_information"))
    want = oracle_scores(f, cov, prior_cov)
    tol = eps_tolerance(la.dtype, la.n_features, 1e4)
    for kind, value in want.items():
        assert torch.allclose(got[kind], value.to(got[kind].dtype), rtol=tol,
                              atol=tol * max(1.0, float(value.abs().max()))), kind  # fmt: skip


def test_errors_and_edge_cases():
    model, loader, _, x_test = problem()
    la = fastlla.ExactLLA(model, "classification", prior_precision=0.7)
    with pytest.raises(fastlla.NotFittedError):
        fastlla.ood_score(la, x_test)
    la.fit(loader)
    with pytest.raises(ValueError, match="unknown OOD score kind 'variance'"):
        fastlla.ood_score(la, x_test, "variance")
    with pytest.raises(TypeError, match="needs a fastlla ExactLLA or ScaLLA"):
        fastlla.ood_score(model, x_test)
    with pytest.raises(ValueError, match="n_samples must be at least 1"):
        fastlla.ood_score(la, x_test, "mutual_information", n_samples=0)
    with pytest.raises(ValueError, match="batch dimension"):
        fastlla.ood_score(la, x_test[0])
    with pytest.raises(RuntimeError):  # the network refuses inputs of the wrong width
        fastlla.ood_score(la, x_test[:, :3])
    with pytest.raises(ValueError, match="need prior_cov"):
        gaussian_ood_scores(torch.zeros(2, C), torch.eye(C).expand(2, C, C), ["variance_ratio"])
    empty = fastlla.ood_score(la, x_test[:0])
    assert empty.shape == (0,) and empty.dtype == la.dtype
    assert DEFAULT_KIND in KINDS and fastlla.ood_score(la, x_test).shape == (len(x_test),)


def test_no_global_rng_use():
    model, loader, _, x_test = problem()
    la = fastlla.ExactLLA(model, "classification", prior_precision=0.7).fit(loader)
    state = torch.get_rng_state()
    ood_scores(la, x_test, KINDS, link_approx="mc")
    assert torch.equal(state, torch.get_rng_state())
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    fastlla.ood_score(la, x_test, "mutual_information", generator=g)
    assert not torch.equal(before, g.get_state())  # a given generator is the one drawn from


class _RewardNet(nn.Module):
    """``(B, 2, d)`` pairs → ``(B, 2)``, ``(B, d)`` → ``(B, 1)`` (laplace-torch's convention)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.f = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(DTYPE)
        with torch.no_grad():
            for p in self.f.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE))

    def forward(self, x):
        return self.f(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], 2) if x.dim() == 3 else self.f(x)


def test_reward_model_scores_are_the_reward_regression_s():
    g = torch.Generator().manual_seed(0)
    Xp, yp = torch.randn(20, 2, 3, generator=g, dtype=DTYPE), torch.randint(0, 2, (20,), generator=g)
    model = _RewardNet()
    la = fastlla.ExactLLA(model, "reward_modeling", prior_precision=0.5)
    la.fit(DataLoader(TensorDataset(Xp, yp), batch_size=5))
    x = torch.randn(4, 3, generator=g, dtype=DTYPE)
    _, var = la(x)  # the reward's variance (B, 1, 1)
    J = oracle_jacobian(model, x)  # (B, 1, P)
    got = ood_scores(la, x, ("logdet", "variance_ratio"))
    tol = eps_tolerance(DTYPE, la.n_params, 1e3)
    assert torch.allclose(got["logdet"], 0.5 * var[:, 0, 0].log(), rtol=tol, atol=tol)
    prior = (J @ J.mT)[:, 0, 0] / 0.5
    assert torch.allclose(got["variance_ratio"], var[:, 0, 0] / prior, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="need class probabilities"):
        fastlla.ood_score(la, x, "entropy")
