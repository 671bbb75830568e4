"""psd_safe_cholesky and FeaturePosterior against explicit dense linear algebra."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastlla.posterior import FeaturePosterior, NotPositiveDefiniteError, psd_safe_cholesky

from testing import eps_tolerance

DT = torch.float64


def random_pd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=DT)
    return A @ A.T + n * torch.eye(n, dtype=DT)


def singular_psd():
    """PSD with an exactly zero pivot (rows 0 and 1 equal): Cholesky fails deterministically."""
    A = torch.zeros(4, 4, dtype=DT)
    A[:2, :2] = 1.0
    A[2:, 2:] = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT)
    assert int(torch.linalg.cholesky_ex(A).info) > 0
    return A


# --------------------------------------------------------------------------- Cholesky
def test_cholesky_positive_definite_no_warning():
    A = random_pd(6, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L = psd_safe_cholesky(A)
    assert torch.equal(L, torch.tril(L))
    assert bool((torch.diagonal(L) > 0).all())
    torch.testing.assert_close(L @ L.T, A, rtol=1e-13, atol=1e-13)


def test_cholesky_singular_psd_warns_and_succeeds():
    A = singular_psd()
    with pytest.warns(RuntimeWarning, match="jitter"):
        L = psd_safe_cholesky(A)
    assert bool(torch.isfinite(L).all())
    assert torch.equal(L, torch.tril(L))
    # Jitter is relative to mean(diag A) = 1.25 and escalates at most to 1e-6 (float64).
    torch.testing.assert_close(L @ L.T, A, rtol=0, atol=1.25e-6 + 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        psd_safe_cholesky(A, warn=False)  # silenced on request


def test_cholesky_singular_float32():
    A = singular_psd().float()
    with pytest.warns(RuntimeWarning):
        L = psd_safe_cholesky(A)
    torch.testing.assert_close(L @ L.T, A, rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_indefinite_raises(dtype):
    A = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=dtype)
    with pytest.raises(NotPositiveDefiniteError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            psd_safe_cholesky(A)
    assert issubclass(NotPositiveDefiniteError, RuntimeError)


@pytest.mark.parametrize("where", [(0, 0), (2, 1)])
def test_cholesky_nan_raises_value_error(where):
    A = random_pd(3, seed=2)
    A[where] = float("nan")
    A[where[::-1]] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        psd_safe_cholesky(A)


def test_cholesky_non_finite_anywhere_raises():
    # Cholesky reads only the lower triangle: a NaN above the diagonal must still be caught,
    # and an Inf on the diagonal must not "factorise" into an Inf factor.
    A = random_pd(3, seed=2)
    A[0, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        psd_safe_cholesky(A)
    B = random_pd(3, seed=2)
    B[1, 1] = float("inf")
    with pytest.raises(ValueError, match="Inf"):
        psd_safe_cholesky(B)
    C = torch.stack([random_pd(3, seed=3), random_pd(3, seed=4)])
    C[1, 2, 0] = float("-inf")
    with pytest.raises(ValueError):
        psd_safe_cholesky(C)


def test_cholesky_batched_only_failing_entry_jittered():
    good0, good2 = random_pd(4, seed=3), random_pd(4, seed=4)
    A = torch.stack([good0, singular_psd(), good2])
    with pytest.warns(RuntimeWarning):
        L = psd_safe_cholesky(A)
    # The positive-definite entries are factorised without any jitter.
    for i, good in ((0, good0), (2, good2)):
        ref = torch.linalg.cholesky(good)
        tol = eps_tolerance(DT, n=4)  # batched and single LAPACK calls may sum in other orders
        torch.testing.assert_close(L[i], ref, rtol=tol, atol=tol * float(ref.abs().max()))
    torch.testing.assert_close(L[1] @ L[1].T, A[1], rtol=0, atol=1.25e-6 + 1e-12)
    assert bool(torch.isfinite(L[1]).all())


def test_cholesky_batched_one_indefinite_raises():
    A = torch.stack([random_pd(2, seed=5), torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=DT)])
    with pytest.raises(NotPositiveDefiniteError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            psd_safe_cholesky(A)


# --------------------------------------------------------------------------- FeaturePosterior
def ggn(M=6, N=5, C=3, seed=0, rank_deficient=False):
    """H = Σ Φ_n Λ_n Φ_nᵀ with softmax Hessians, built densely."""
    g = torch.Generator().manual_seed(seed)
    Phi = torch.randn(N, M, C, generator=g, dtype=DT)
    if rank_deficient:
        Phi[:, -1] = 0.0  # feature M−1 never active: H is singular
    p = torch.softmax(torch.randn(N, C, generator=g, dtype=DT), -1)
    H = torch.zeros(M, M, dtype=DT)
    for n in range(N):
        lam = torch.diag(p[n]) - torch.outer(p[n], p[n])
        H += Phi[n] @ lam @ Phi[n].T
    return H


def explicit_cov(H, phi, delta, s):
    A_inv = torch.linalg.inv(s * H + delta * torch.eye(H.shape[0], dtype=DT))
    return phi.mT @ A_inv @ phi


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_log_det_ratio_matches_slogdet(rank_deficient):
    H = ggn(rank_deficient=rank_deficient)
    post = FeaturePosterior(H)
    eye = torch.eye(6, dtype=DT)
    for delta, s in ((1.0, 1.0), (0.01, 1.0), (3.0, 0.25), (1e3, 4.0)):
        sign, ref = torch.linalg.slogdet(eye + s * H / delta)
        assert sign > 0
        got = post.log_det_ratio(delta, s)
        assert abs(float(got) - float(ref)) <= 1e-10 * max(1.0, abs(float(ref)))


def test_covariance_and_variance_match_explicit_inverse():
    H = ggn(seed=1)
    post = FeaturePosterior(H)
    g = torch.Generator().manual_seed(7)
    phi = torch.randn(4, 6, 3, generator=g, dtype=DT)
    for delta, s in ((0.5, 1.0), (2.0, 1 / 0.7**2)):
        ref = explicit_cov(H, phi, delta, s)
        cov = post.covariance(phi, delta, s)
        torch.testing.assert_close(cov, ref, rtol=1e-10, atol=1e-12)
        var = post.variance(phi, delta, s)
        torch.testing.assert_close(var, torch.diagonal(ref, dim1=-2, dim2=-1), rtol=1e-10, atol=1e-12)
    expected = 3.0 * H + 2.0 * torch.eye(6, dtype=DT)
    tol = eps_tolerance(DT, n=2)  # a scaled sum of two terms, in any order
    torch.testing.assert_close(
        post.precision(2.0, 3.0), expected, rtol=tol, atol=tol * float(expected.abs().max())
    )
    # Non-contiguous features give the same answer.
    phi_nc = torch.randn(4, 3, 6, generator=g, dtype=DT).mT
    assert not phi_nc.is_contiguous()
    torch.testing.assert_close(post.covariance(phi_nc, 0.5), explicit_cov(H, phi_nc, 0.5, 1.0), rtol=1e-10, atol=1e-12)


def test_cache_follows_hyper_parameters():
    H = ggn(seed=2)
    post = FeaturePosterior(H)
    phi = torch.randn(3, 6, 2, dtype=DT)
    settings = [(1.0, 1.0), (0.1, 1.0), (0.1, 5.0), (1.0, 1.0), (1.0, 5.0)]
    for delta, s in settings:
        torch.testing.assert_close(
            post.covariance(phi, delta, s), explicit_cov(H, phi, delta, s), rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(
            post.variance(phi, delta, s),
            torch.diagonal(explicit_cov(H, phi, delta, s), dim1=-2, dim2=-1),
            rtol=1e-10,
            atol=1e-12,
        )


def test_posterior_symmetrises_and_checks_h():
    H = ggn(seed=3)
    skew = torch.zeros_like(H)
    skew[0, 1], skew[1, 0] = 1e-3, -1e-3
    post = FeaturePosterior(H + skew)
    tol = eps_tolerance(DT, n=2)  # (A + Aᵀ)/2
    torch.testing.assert_close(post.H, H, rtol=tol, atol=tol * float(H.abs().max()))
    torch.testing.assert_close(post.eigvals, torch.linalg.eigvalsh(H).clamp_min(0), rtol=1e-12, atol=1e-12)
    assert post.n_features == 6
    with pytest.raises(ValueError):
        FeaturePosterior(torch.zeros(3, 4, dtype=DT))
    bad = H.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError):
        FeaturePosterior(bad)


@pytest.mark.parametrize("m, k, C", [(4, 3, 2), (1, 1, 1), (5, 2, 3)])
def test_kron_covariance_matches_the_formed_features(m, k, C):
    """Features [G; a ⊗ I_C] in factored form give the explicit-inverse covariance of the
    formed (B, m + k·C, C) features, for several (δ, s), and follow updates of H."""
    g = torch.Generator().manual_seed(11)
    M = m + k * C
    X = torch.randn(3 * M, M, generator=g, dtype=DT)
    H = X.mT @ X
    post = FeaturePosterior(H)
    G = torch.randn(5, m, C, generator=g, dtype=DT)
    a = torch.randn(5, k, generator=g, dtype=DT)
    eye = torch.eye(C, dtype=DT)
    formed = torch.cat([G, (a[:, :, None, None] * eye).reshape(5, k * C, C)], dim=1)
    for delta, s in ((0.3, 1.0), (4.0, 2.5), (0.3, 1.0)):
        ref = explicit_cov(post.H, formed, delta, s)
        torch.testing.assert_close(post.covariance(G, delta, s, kron=a), ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            post.variance(G, delta, s, kron=a), torch.diagonal(ref, dim1=-2, dim2=-1),
            rtol=1e-9, atol=1e-12,
        )
    W = torch.randn(M, 2, generator=g, dtype=DT)
    post.update(W)
    ref = explicit_cov(H + W @ W.mT, formed, 0.3, 1.0)
    torch.testing.assert_close(post.covariance(G, 0.3, 1.0, kron=a), ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="Kronecker"):
        post.covariance(G, 0.3, 1.0, kron=a[:, :-1] if k > 1 else a[:-1])
