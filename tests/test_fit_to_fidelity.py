"""``bench/fidelity/fit_to_fidelity.py``: the harness's quick mode runs end to end and its
summary agrees with its own curves (correctness only; its quick numbers measure nothing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "bench" / "fidelity" / "fit_to_fidelity.py"


@pytest.fixture(scope="module")
def f2f():
    spec = importlib.util.spec_from_file_location("fit_to_fidelity", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reach_is_the_first_time_at_or_below_the_target(f2f):
    curve = [{"seconds": 0.0, "error": 0.9}, {"seconds": 1.0, "error": 0.5},
             {"seconds": 2.0, "error": 0.3}, {"seconds": 3.0, "error": 0.4}]  # fmt: skip
    assert f2f.reach(curve, 0.5) == 1.0
    assert f2f.reach(curve, 0.35) == 2.0
    assert f2f.reach(curve, 0.2) is None
    assert f2f.checkpoints(8.0, 4) == [0.5, 2.0, 4.5, 8.0]


def test_quick_run_writes_consistent_results(f2f, tmp_path):
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    out = f2f.main(["--quick", "--networks", "ood", "--out", str(tmp_path)])
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    results = {r["method"]: r for r in out["results"]}
    text = (tmp_path / "summary.md").read_text()
    assert set(results) == set(f2f.METHODS)
    floors = json.loads((tmp_path / "floors-ood.json").read_text())
    values = list(floors["floors"].values())
    assert all(a >= b for a, b in zip(values, values[1:]))  # Eckart–Young floors fall with rank
    for method, r in results.items():
        saved = json.loads((tmp_path / f"ood-{method}.json").read_text())
        assert saved["final_error"] == r["final_error"] == r["curve"][-1]["error"]
        assert r["n_params"] == 11_237 and r["n_features"] == 100
        q = r["quality"]
        assert q["nll"] > 0 and 0 <= q["acc"] <= 1 and 0 <= q["ece"] <= 1
        assert 0 <= q["auroc_entropy"] <= 1 and 0 <= q["auroc_logit"] <= 1
        assert f"| {method} | {q['nll']:.4f} | {q['acc']:.4f} |" in text
        steps = [p["step"] for p in r["curve"]]
        seconds = [p["seconds"] for p in r["curve"]]
        assert steps == sorted(steps) and seconds == sorted(seconds)
        assert r["curve"][-1]["step"] == r["iterations"]
        assert r["floor_total"] <= r["floor_M"]
        assert 0 < r["final_error"] < float("inf")  # quick runs: any finite relative error
    assert results["authors"]["n_features_total"] == 100
    assert results["fastlla"]["n_features_total"] > 100  # the exact last-layer block counts
    assert results["fastlla-nogate"]["settings"]["gate"] is False
    assert "QUICK MODE" in text and "P = 11,237" in text
    target = results["authors"]["final_error"]
    for method in ("fastlla", "fastlla-nogate"):
        t = f2f.reach(results[method]["curve"], target)
        row = next(line for line in text.splitlines() if line.startswith(f"| {method} ("))
        assert (f"| {t:.1f} s = 1/" in row) if t else ("not reached" in row)


def test_the_wide_network_has_the_documented_size(f2f):
    spec = f2f.NETWORKS["wide"]
    model = f2f.DigitsCNN(10, channels=spec["channels"], hidden=spec["hidden"])
    assert sum(p.numel() for p in model.parameters()) == 53_002
