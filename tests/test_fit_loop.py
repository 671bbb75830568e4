"""ScaLLA's training loop as a user sees it: the progress bar obeys its flag, the callback is
called on schedule and its time is not charged to the training budget, and the MC link uses the
number of samples asked for."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastlla
from fastlla.predictive import monte_carlo


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    X = torch.randn(32, 4, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    return model, DataLoader(TensorDataset(X, y), batch_size=8), X


@pytest.mark.parametrize("flag", [False, True])
def test_progress_bar_follows_its_flag(flag, capsys):
    model, loader, _ = problem()
    la = fastlla.ScaLLA(model, "classification", n_features=4, gate=False)
    la.fit(loader, iterations=3, progress_bar=flag)
    err = capsys.readouterr().err
    assert ("ScaLLA kernel" in err) is flag, err


def test_callback_time_is_not_training_time(monkeypatch):
    """A fake clock: each reading advances 1 ms, and the callback spends 100 s. The recorded
    training seconds must contain only the loop's own time."""
    clock = [0.0]

    def fake_perf_counter() -> float:
        clock[0] += 1e-3
        return clock[0]

    calls = []

    def callback(step, la):
        calls.append(step)
        clock[0] += 100.0

    monkeypatch.setattr(time, "perf_counter", fake_perf_counter)
    model, loader, _ = problem()
    la = fastlla.ScaLLA(model, "classification", n_features=4, gate=False)
    la.fit(loader, iterations=6, callback=callback, callback_every=2, progress_bar=False)
    assert calls == [2, 4, 6]
    seconds = [h["seconds"] for h in la.history]
    assert seconds == sorted(seconds)
    # Three callbacks ran before the last record only if the time leaked: 100 s each.
    assert seconds[-1] < 1.0, seconds


@pytest.mark.parametrize("estimator", ["ScaLLA", "ExactLLA"])
def test_mc_link_uses_n_samples(estimator):
    """``la(x, link_approx="mc", n_samples=k, seed=s)`` is the MC average of ``k`` draws from the
    Gaussian predictive: with one draw every row is a softmax of a single logit sample, so it
    differs from a 5,000-draw average by far more than that average's standard error."""
    model, loader, X = problem()
    if estimator == "ScaLLA":
        la = fastlla.ScaLLA(model, "classification", n_features=4, gate=False, prior_precision=0.1)
        la.fit(loader, iterations=3, progress_bar=False)
    else:
        la = fastlla.ExactLLA(model, "classification", prior_precision=0.1).fit(loader)
    x = X[:6]
    mean, cov = la.predictive_distribution(x)
    for k in (1, 7, 5000):
        got = la(x, link_approx="mc", n_samples=k, seed=3)
        torch.testing.assert_close(got, monte_carlo(mean, cov, n_samples=k, seed=3))
    one, many = la(x, link_approx="mc", n_samples=1, seed=3), la(x, link_approx="mc", n_samples=5000)
    se_bound = 0.5 / 5000**0.5  # a probability's standard deviation is at most ½
    assert float((one - many).abs().max()) > 10 * se_bound
