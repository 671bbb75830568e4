"""The exported predictor: equal to the estimator, under torch.compile(fullgraph=True) and
torch.export, and through torch.save of its state_dict into a fresh predictor."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastlla
from fastlla.export import Predictor

D, C, M = 5, 3, 8


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C)).to(dtype)


@pytest.fixture(scope="module", params=["classification", "regression"])
def fitted(request):
    likelihood = request.param
    model = make_model()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, D, generator=g)
    with torch.no_grad():
        y = model(X).argmax(-1) if likelihood == "classification" else model(X) + 0.1
    sigma = 0.3 if likelihood == "regression" else 1.0
    la = fastlla.ScaLLA(model, likelihood, n_features=M, prior_precision=2.0, sigma_noise=sigma)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=16), iterations=5, progress_bar=False)
    return la, torch.randn(6, D, generator=g)


def expected(la, x, output):
    if output == "gaussian":
        return la.predictive_distribution(x)
    return la(x, link_approx=output)


def close(a, b, tol=1e-5):
    if isinstance(a, tuple):
        return all(close(u, v, tol) for u, v in zip(a, b, strict=True))
    return torch.allclose(a, b, rtol=tol, atol=tol * b.abs().max().item())


def outputs(la):
    if la.likelihood.value == "classification":
        return ["probit", "bridge", "gaussian"]
    return ["gaussian"]


def test_predictor_matches_the_estimator(fitted):
    la, x = fitted
    for output in outputs(la):
        for ops in ("torch", "fastlla"):
            predictor = la.export(output=output) if ops == "torch" else Predictor.from_estimator(
                la, output=output, ops=ops
            )
            assert type(predictor) is Predictor and isinstance(predictor, nn.Module)
            assert not any(p.requires_grad for p in predictor.parameters())
            with torch.no_grad():
                assert close(predictor(x), expected(la, x, output)), (output, ops)
    if la.likelihood.value == "regression":
        mean, cov = la(x, include_noise=True)
        got = la.export(include_noise=True)(x)
        assert close(got, (mean, cov))


def test_predictor_is_independent_of_the_estimator(fitted):
    la, x = fitted
    predictor = la.export()
    before = predictor(x)
    la.prior_precision *= 10  # later changes to the estimator do not leak into the predictor
    try:
        assert close(predictor(x), before, tol=0)
    finally:
        la.prior_precision /= 10


@pytest.mark.parametrize("ops", ["torch", "fastlla"])
def test_predictor_compiles_with_fullgraph(fitted, ops):
    la, x = fitted
    predictor = Predictor.from_estimator(la, ops=ops)
    compiled = torch.compile(predictor, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert close(compiled(x), predictor(x))


def test_predictor_torch_export(fitted):
    la, x = fitted
    predictor = la.export()
    program = torch.export.export(predictor, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("fastlla" in t for t in targets)  # pure torch ops: runs without fastlla
    with torch.no_grad():
        assert close(program.module()(x), predictor(x))
        x2 = torch.randn(6, D)
        assert close(program.module()(x2), predictor(x2))


def test_predictor_state_dict_round_trip(fitted, tmp_path):
    la, x = fitted
    predictor = la.export()
    torch.save(predictor.state_dict(), tmp_path / "predictor.pt")
    fresh = Predictor.like(make_model(seed=123), la.likelihood, n_outputs=C, n_features=M)
    assert not close(fresh(x), predictor(x))
    fresh.load_state_dict(torch.load(tmp_path / "predictor.pt", weights_only=True))
    with torch.no_grad():
        assert close(fresh(x), predictor(x), tol=0)
    wrong = Predictor.like(make_model(), la.likelihood, n_outputs=C, n_features=M + 1)
    with pytest.raises((ValueError, RuntimeError)):
        wrong.load_state_dict(predictor.state_dict())


def test_predictor_bad_options(fitted):
    la, _ = fitted
    with pytest.raises(ValueError, match="output"):
        la.export(output="softmax")
    if la.likelihood.value == "regression":
        with pytest.raises(ValueError, match="classification"):
            la.export(output="probit")
    with pytest.raises(ValueError, match="ops"):
        Predictor.from_estimator(la, ops="cuda")


def test_like_builds_the_modules_scalla_builds_from_the_same_options():
    """``Predictor.like`` builds through :mod:`fastlla.scalla_settings`, as ScaLLA does: the same
    options give modules whose states load into each other; a wrong option is refused."""
    model = make_model()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(32, D, generator=g)
    with torch.no_grad():
        y = model(X).argmax(-1)
    options = dict(n_features=5, head_width=3, gate=False, seed=4)
    la = fastlla.ScaLLA(model, "classification", **options)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=16), iterations=2, progress_bar=False)
    fresh = Predictor.like(
        make_model(seed=9), "classification", n_outputs=C, sigma_noise=1.0, **options
    )
    fresh.load_state_dict(la.export().state_dict())
    assert fresh.residual_head is not None  # "auto" for classification, as the fit left it
    x = torch.randn(4, D, generator=g)
    assert torch.allclose(fresh(x), la.export()(x))
    with pytest.raises(TypeError):
        Predictor.like(make_model(), "classification", n_outputs=C, heads=2)
    with pytest.raises(ValueError, match="head_width"):
        Predictor.like(make_model(), "classification", n_outputs=C, head_width=-1)
