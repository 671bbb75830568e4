"""The fidelity harness (probe Gram, Eckart–Young floors, training curves) and the training
options it measured: the exact last-layer block, orthogonal tangents, the residual-variance
correction and the automatic iteration budget."""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastlla
from fastlla.apps.fidelity import FidelityCurve, ProbeGram, eckart_young_floor, feature_rows
from fastlla.functional import NetworkFunction
from fastlla.projections import ProjectionSampler
from fastlla.surrogate import LastLayerSurrogate, last_layer_surrogate

DTYPE = torch.float64


def make_problem(n: int = 48, d: int = 4, C: int = 3, seed: int = 0, hidden: int = 6):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, C)).to(DTYPE)
    X = torch.randn(n, d, generator=g, dtype=DTYPE)
    y = model(X).argmax(-1)
    loader = DataLoader(TensorDataset(X, y), batch_size=8)
    x_test = torch.randn(9, d, generator=g, dtype=DTYPE)
    return model, loader, x_test


def jacobian_rows(model, x):
    J = NetworkFunction(model).jacobian(x)  # (B, C, P)
    return J.reshape(-1, J.shape[-1])


# --------------------------------------------------------------------------- harness
def test_eckart_young_floor_matches_best_rank_m_approximation():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 7, generator=g, dtype=DTYPE)
    K = A @ A.mT
    evals, evecs = torch.linalg.eigh(K)
    floors = eckart_young_floor(evals, [0, 2, 5, 7, 20])
    assert floors[0] == pytest.approx(1.0)
    assert floors[7] == pytest.approx(0.0, abs=1e-7)
    assert floors[20] == 0.0
    for m in (2, 5):
        top = evecs[:, -m:]
        best = top @ torch.diag(evals[-m:]) @ top.mT
        assert floors[m] == pytest.approx(float((K - best).norm() / K.norm()), rel=1e-10)


def test_probe_gram_is_the_ntk_and_exact_features_have_zero_error():
    model, _, x = make_problem()
    probe = ProbeGram(model, x, chunk_size=4)
    J = jacobian_rows(model, x)
    assert torch.allclose(probe.kappa, J @ J.mT, rtol=1e-12, atol=1e-12)
    phi = NetworkFunction(model).jacobian(x).mT  # g(x) = J(x)ᵀ, (B, P, C)
    assert probe.error(phi) < 1e-12
    assert probe.error(torch.zeros_like(phi)) == pytest.approx(1.0)
    assert probe.floor(probe.n_params) < 1e-6
    assert feature_rows(phi).shape == (x.shape[0] * 3, probe.n_params)


def fake_clock(monkeypatch, slow_calls: int = 0, slow: float = 1.0, tick: float = 1e-3) -> list:
    """Replace ``time.perf_counter`` by a clock that advances ``tick`` per reading (``slow`` for
    the first ``slow_calls`` readings); tests advance ``clock[0]`` themselves to spend time."""
    clock, calls = [0.0], [0]

    def perf_counter() -> float:
        calls[0] += 1
        clock[0] += slow if calls[0] <= slow_calls else tick
        return clock[0]

    monkeypatch.setattr(time, "perf_counter", perf_counter)
    return clock


def test_fit_callback_records_a_curve_without_its_own_time(monkeypatch):
    model, loader, x = make_problem()
    probe = ProbeGram(model, x)
    clock = fake_clock(monkeypatch)

    class SlowCurve(FidelityCurve):
        def __call__(self, step, la):
            clock[0] += 100.0  # the callback's own time
            super().__call__(step, la)

    curve = SlowCurve(probe)
    la = fastlla.ScaLLA(model, "classification", n_features=8, last_layer=False)
    la.fit(loader, iterations=25, n_projections=4, lr=3e-3, progress_bar=False,
           callback=curve, callback_every=10)  # fmt: skip
    assert [p["step"] for p in curve.points] == [10, 20, 25]
    assert [p["jvp_passes"] for p in curve.points] == [40, 80, 100]
    seconds = [p["seconds"] for p in curve.points]
    assert seconds == sorted(seconds)
    # the 3 × 100 s of callback time is excluded from the training clock
    assert la.history[-1]["seconds"] < 100.0
    assert la.history[-1]["seconds"] == pytest.approx(seconds[-1])
    assert curve.final == pytest.approx(la.kernel_fidelity(x, method="exact"), rel=1e-9)


# --------------------------------------------------------------------------- exact last layer
@pytest.mark.parametrize("rank", [None, 3])
def test_last_layer_block_is_exact_and_the_residual_target_is_the_rest(rank):
    model, loader, x = make_problem()
    network = NetworkFunction(model)
    s = last_layer_surrogate(model, 5, 3, network.n_params, rank=rank)
    s.fit_basis(b for b, _ in loader)
    J = network.jacobian(x)  # (B, C, P)
    head = [n.startswith("2.") for n in network.names]
    sizes = network.numels
    mask = torch.cat([torch.full((k,), h) for k, h in zip(sizes, head)])
    J_head = J[..., mask].reshape(-1, int(mask.sum()))
    exact = feature_rows(s.exact_features(x))
    if rank is None:
        assert s.n_exact == 7 * 3
        assert torch.allclose(exact @ exact.mT, J_head @ J_head.mT, atol=1e-12)
    # JVP minus the block's share = lower layers' JVP + the dropped head directions
    sampler = ProjectionSampler(network, 5, "rademacher", seed=1)
    tangents = sampler.tangents(0, x.device, DTYPE)
    _, z = sampler.project(x, 0, tangents)
    residual = z - s.head_jvp(tangents, s.psi(x), network.names)
    flat = torch.cat([tangents[n].reshape(5, -1) for n in network.names], dim=1)
    v_low = flat[:, ~mask]
    expected = torch.einsum("bcp,sp->sbc", J[..., ~mask], v_low)
    if rank is not None:  # plus V (I − UUᵀ) ψ
        psi = s.psi(x)
        perp = psi - (psi @ s.basis) @ s.basis.mT
        w = torch.cat([tangents["2.weight"], tangents["2.bias"].unsqueeze(-1)], dim=-1)
        expected = expected + torch.einsum("sch,bh->sbc", w, perp)
        assert torch.allclose(s.residual_diagonal(psi), perp.square().sum(-1))
    assert torch.allclose(residual, expected, atol=1e-12)
    # surrogate output = [learned ; exact]
    out = s(x)
    assert out.shape == (x.shape[0], 5 + s.n_exact, 3)
    assert torch.equal(out[:, 5:], s.exact_features(x))


def test_last_layer_auto_resolution():
    model, loader, _ = make_problem()
    la = fastlla.ScaLLA(model, "classification", n_features=4)
    la.fit(loader, iterations=2, progress_bar=False)
    assert isinstance(la.surrogate, LastLayerSurrogate) and la.n_features == 4 + 7 * 3
    ctx = DataLoader(TensorDataset(torch.randn(16, 4, dtype=DTYPE)), batch_size=8)
    biased = fastlla.ScaLLA(model, "classification", n_features=4)
    biased.fit(loader, context_loader=ctx, iterations=2, progress_bar=False)
    assert isinstance(biased.surrogate, LastLayerSurrogate) and biased.n_features == 4 + 7 * 3
    frozen, _, _ = make_problem()
    frozen[2].weight.requires_grad_(False)
    la = fastlla.ScaLLA(frozen, "classification", n_features=4)
    la.fit(loader, iterations=2, progress_bar=False)
    assert la.last_layer_used is False
    with pytest.raises(ValueError, match="trainable"):
        fastlla.ScaLLA(frozen, "classification", n_features=4, last_layer=True).fit(
            loader, iterations=1, progress_bar=False
        )
    with pytest.raises(TypeError, match="last_layer"):
        fastlla.ScaLLA(model, "classification", last_layer="yes")


def test_last_layer_training_reduces_error_and_round_trips():
    model, loader, x = make_problem(n=64)
    errors = {}
    for iterations in (1, 300):
        la = fastlla.ScaLLA(model, "classification", n_features=4, last_layer=True, seed=2)
        la.fit(loader, iterations=iterations, n_projections=8, lr=3e-3, progress_bar=False)
        errors[iterations] = la.kernel_fidelity(x, method="exact")
    assert errors[300] < 0.7 * errors[1]
    state = la.state_dict()
    again = fastlla.ScaLLA(model, "classification", n_features=4, last_layer=True)
    again.load_state_dict(state)
    assert torch.equal(again.predictive_distribution(x)[1], la.predictive_distribution(x)[1])


# --------------------------------------------------------------------------- tangents
def test_orthogonal_tangents_are_an_orthogonal_frame_of_norm_sqrt_p():
    model, _, _ = make_problem()
    network = NetworkFunction(model)
    P = network.n_params
    for S in (5, P + 3):  # more tangents than parameters: blocks of P
        sampler = ProjectionSampler(network, S, "orthogonal", seed=4)
        flat = torch.cat([t.reshape(S, -1) for t in sampler.tangents(7, "cpu", DTYPE).values()], 1)
        block = flat[: min(S, P)]
        gram = block @ block.mT
        assert torch.allclose(gram, P * torch.eye(block.shape[0], dtype=DTYPE), atol=1e-9)
        again = torch.cat([t.reshape(S, -1) for t in sampler.tangents(7, "cpu", DTYPE).values()], 1)
        assert torch.equal(flat, again)
    with pytest.raises(ValueError, match="distribution"):
        ProjectionSampler(network, 2, "hadamard")


# --------------------------------------------------------------------------- residual variance
def exact_residual(la, x):
    J = NetworkFunction(la.model).jacobian(x)
    with torch.no_grad():
        phi = la._surrogate_features(x)
    r = J @ J.mT - phi.mT @ phi
    evals, evecs = torch.linalg.eigh(0.5 * (r + r.mT))
    return (evecs * evals.clamp_min(0).unsqueeze(-2)) @ evecs.mT


@pytest.mark.parametrize("last_layer", [False, True])
def test_jvp_residual_estimates_the_missing_kernel_block(last_layer):
    model, loader, x = make_problem()
    la = fastlla.ScaLLA(model, "classification", n_features=3, last_layer=last_layer)
    la.fit(loader, iterations=30, progress_bar=False)
    with torch.no_grad():
        estimate = la._residual_block(x, la._surrogate_features(x), "jvp", n_projections=6000)
        truth = exact_residual(la, x)
    assert float((estimate - truth).norm() / truth.norm()) < 0.1


def test_residual_variance_adds_the_prior_term_and_can_be_switched():
    model, loader, x = make_problem()
    # the plain surrogate with a linear head: the loose tolerance below is set on the residual
    # it leaves
    la = fastlla.ScaLLA(model, "classification", n_features=3, residual_variance="head",
                        prior_precision=2.0, head_width=0, gate=False)  # fmt: skip
    la.fit(loader, iterations=200, lr=3e-3, progress_bar=False)
    la.residual_variance = False
    _, plain = la.predictive_distribution(x)
    for mode in ("head", "jvp"):
        la.residual_variance = mode
        _, cov = la.predictive_distribution(x)
        with torch.no_grad():
            r = la._residual_block(x, la._surrogate_features(x), mode)
        assert torch.allclose(cov, plain + r / 2.0, atol=1e-10)
        assert bool((torch.linalg.eigvalsh(cov - plain) > -1e-10).all())
    # the learned head tracks the true residual block (loosely: 200 noisy steps)
    with torch.no_grad():
        head = la._residual_block(x, la._surrogate_features(x), "head")
    truth = exact_residual(la, x)
    assert float((head - truth).norm() / truth.norm()) < 0.6
    # saved and restored with the estimator
    la.residual_variance = "head"
    state = la.state_dict()
    again = fastlla.ScaLLA(model, "classification", n_features=3, residual_variance="head",
                           prior_precision=2.0)  # fmt: skip
    again.load_state_dict(state)
    assert torch.equal(again.predictive_distribution(x)[1], la.predictive_distribution(x)[1])
    with pytest.raises(ValueError, match="residual_variance"):
        fastlla.ScaLLA(model, "classification", residual_variance="exact")
    plain_la = fastlla.ScaLLA(model, "classification", n_features=3, residual_variance=False)
    plain_la.fit(loader, iterations=2, progress_bar=False)
    assert plain_la.residual_head is None and plain_la.residual_mode is False
    plain_la.residual_variance = "head"
    with pytest.raises(RuntimeError, match="head"):
        plain_la.predictive_distribution(x)


def test_residual_variance_auto_is_the_head_when_one_was_trained():
    model, loader, x = make_problem()
    la = fastlla.ScaLLA(model, "classification", n_features=3)
    la.fit(loader, iterations=0, progress_bar=False)
    assert la.residual_mode is False and la._features(x).residual is None
    la.fit(loader, iterations=3, progress_bar=False)
    assert la.residual_mode == "head"
    feats = la._features(x)
    k = 0 if feats.kron is None else feats.kron.shape[1]
    assert feats.phi.shape[1] + k * 3 == la.n_features
    assert feats.residual.shape == (x.shape[0], 3, 3)


def test_residual_variance_auto_is_off_for_regression():
    model, loader, x = make_problem()
    X, _ = loader.dataset.tensors
    with torch.no_grad():
        y = model(X)
    reg = DataLoader(TensorDataset(X, y), batch_size=8)
    la = fastlla.ScaLLA(model, "regression", n_features=3)
    la.fit(reg, iterations=3, progress_bar=False)
    assert la.residual_head is None and la.residual_mode is False
    la = fastlla.ScaLLA(model, "regression", n_features=3, residual_variance="head")
    la.fit(reg, iterations=3, progress_bar=False)
    assert la.residual_mode == "head"


# --------------------------------------------------------------------------- iteration budget
def test_auto_iterations_follow_the_time_budget():
    model, loader, _ = make_problem()
    la = fastlla.ScaLLA(model, "classification", n_features=4)
    with pytest.warns(UserWarning, match="allowed only 1 kernel-matching steps"):
        la.fit(loader, iterations="auto", time_budget=1e-6, progress_bar=False)
    assert len(la.history) == 1  # no lower bound overrides the budget: a warning instead
    with pytest.raises(ValueError, match="iterations"):
        la.fit(loader, iterations="many", progress_bar=False)
    with pytest.raises(ValueError, match="time_budget"):
        la.fit(loader, iterations="auto", time_budget=0.0, progress_bar=False)


@pytest.mark.parametrize("budget", [2.0, 7.9, 60.0])
def test_auto_iterations_stop_within_one_step_of_the_time_budget(monkeypatch, budget):
    """Steps of 0.5 s on a fake clock (one reading per step): a budget shorter than the timing
    probe (10 steps) or than 200 steps is honoured — training stops at the first step that ends
    at or past it, or at the horizon estimated from the step time — and a warning says how few steps it allowed; no warning at 200 steps."""
    model, loader, _ = make_problem()
    fake_clock(monkeypatch, tick=0.5)
    la = fastlla.ScaLLA(model, "classification", n_features=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la.fit(loader, iterations="auto", time_budget=budget, progress_bar=False)
    trained = la.history[-1]["seconds"]
    assert abs(trained - budget) < 0.5 + 1e-9, (trained, len(la.history))  # within one step
    assert len(la.history) in (math.floor(budget / 0.5), math.ceil(budget / 0.5))
    few = [w for w in caught if "kernel-matching steps" in str(w.message)]
    assert len(few) == (len(la.history) < 200)


def test_auto_iterations_fill_the_time_budget(monkeypatch):
    """Slow first steps must not make ``"auto"`` stop far short of its budget (re-estimated).

    On a fake clock — the first readings take 1 s each, every later one 20 ms — the training
    time must end within one step of the budget, whatever the machine's speed."""
    model, loader, _ = make_problem()
    fake_clock(monkeypatch, slow_calls=3, slow=1.0, tick=0.02)
    la = fastlla.ScaLLA(model, "classification", n_features=4)
    budget = 10.0
    la.fit(loader, iterations="auto", time_budget=budget, progress_bar=False)
    trained = la.history[-1]["seconds"]
    assert len(la.history) > 200  # the lower bound alone would stop at 200 steps (≈ 7 s)
    assert abs(trained - budget) <= 0.05 * budget, (trained, len(la.history))
