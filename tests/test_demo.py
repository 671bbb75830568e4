"""The demo's per-method δ tables (the diabetes one: small enough for the suite)."""

import math

import pytest

pytest.importorskip("sklearn")

from fastlla.demo import DemoConfig, diabetes_quality  # noqa: E402


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
