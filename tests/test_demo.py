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
        "ExactLLA, δ by init (default)", "ExactLLA, δ by marglik", "ExactLLA, δ by val NLL",
        "ScaLLA, δ by init (default)", "ScaLLA, δ by marglik", "ScaLLA, δ by val NLL",
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


def test_ood_table_aurocs_by_kind_and_set():
    """The demo's OOD table cells: one AUROC per score kind and OOD set, the entropy one equal to
    sklearn's AUROC of the entropy of the estimator's own probit predictive."""
    import torch
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader, TensorDataset

    from fastlla import ExactLLA
    from fastlla.apps.demo import OOD_COLUMNS, OOD_KINDS, ood_aurocs

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    la = ExactLLA(model, "classification", prior_precision=0.5).fit(DataLoader(TensorDataset(x, y), batch_size=10))
    x_in = torch.randn(20, 4, generator=g, dtype=torch.float64)
    oods = {"near": 2 * torch.randn(15, 4, generator=g, dtype=torch.float64),
            "far": 5 + torch.randn(10, 4, generator=g, dtype=torch.float64)}  # fmt: skip
    got = ood_aurocs(la, x_in, oods)
    assert set(got) == {f"ood_{k}_{s}" for k in OOD_KINDS for s in oods}
    assert {key for key, _, _ in OOD_COLUMNS[1:]} == set(got)

    def entropy(z):
        p = la(z, link_approx="probit")
        return -(p * p.log()).sum(-1)

    for name, z in oods.items():
        labels = [0] * len(x_in) + [1] * len(z)
        ref = roc_auc_score(labels, torch.cat([entropy(x_in), entropy(z)]).numpy())
        assert got[f"ood_entropy_{name}"] == pytest.approx(ref, abs=1e-12)
        assert 0.0 <= got[f"ood_variance_ratio_{name}"] <= 1.0
