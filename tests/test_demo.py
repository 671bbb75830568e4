"""The demo's per-method δ tables (the diabetes one: small enough for the suite)."""

import math

import pytest

pytest.importorskip("sklearn")

from fastlla.apps.demo import DemoConfig, diabetes_quality  # noqa: E402


def test_diabetes_quality_rows():
    cfg = DemoConfig(regression_iterations=5, progress_bar=False)
    rows = diabetes_quality(cfg, log=lambda *_: None)
    names = [r.method for r in rows]
    assert names == [
        "MAP",
        "ExactLLA, δ by marglik", "ExactLLA, δ by val NLL",
        "ScaLLA, δ by marglik", "ScaLLA, δ by val NLL",
    ]  # fmt: skip
    for row in rows:
        assert all(math.isfinite(v) for v in row.values.values()), row
    # Every Laplace predictive mean is the network's output (the linearisation point), so the
    # RMSE is the MAP's in every row; the noise σ is exact LLA's marglik one throughout.
    assert len({round(r.values["rmse"], 6) for r in rows}) == 1
    assert len({r.values["sigma"] for r in rows}) == 1
    # δ by validation NLL comes from the default grid 10^-4 … 10^4.
    for row in rows[1:]:
        assert 1e-4 * (1 - 1e-9) <= row.values["delta"] <= 1e4 * (1 + 1e-9)


def test_regression_scores_add_the_noise_variance():
    """The demo's regression NLL and CRPS are those of N(mean, var + σ²), against scipy."""
    import numpy as np
    import scipy.stats
    import torch

    from fastlla.apps.demo import _regression_scores

    g = torch.Generator().manual_seed(0)
    mean = torch.randn(50, 1, generator=g, dtype=torch.float64)
    var = torch.rand(50, 1, generator=g, dtype=torch.float64) * 0.3
    y = mean + torch.randn(50, 1, generator=g, dtype=torch.float64)
    sigma = 0.7
    scores = _regression_scores(mean, var, sigma, y)
    sd = (var + sigma**2).sqrt().numpy()
    nll = -scipy.stats.norm.logpdf(y.numpy(), mean.numpy(), sd).mean()
    w = (y.numpy() - mean.numpy()) / sd  # Gneiting & Raftery's closed form of the Gaussian CRPS
    crps = (sd * (w * (2 * scipy.stats.norm.cdf(w) - 1) + 2 * scipy.stats.norm.pdf(w) - 1 / np.sqrt(np.pi))).mean()
    assert abs(scores["nll"] - nll) <= 1e-10 * abs(nll)
    assert abs(scores["crps"] - crps) <= 1e-10 * abs(crps)
    assert scores["rmse"] == pytest.approx(float(((y - mean) ** 2).mean().sqrt()), rel=1e-12)
