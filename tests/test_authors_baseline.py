"""The authors' ScaLLA baseline (``bench/suite/authors.py``) against their recipe.

Oracles: their FMNIST surrogate (``ConvHead``) rebuilt by hand, explicit Jacobians
(``torch.func.jacrev``) and explicit ``B×B×C×C`` sums for the loss, explicit GGN / inverse for the
posterior, the loader's epochs for the sampler; and the project rules (no global state changed).
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import pytest
import torch
from testing import eps_tolerance
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench", "suite"))
import authors as A


class Net(nn.Module):
    """Their FMNIST network (``examples/FMNIST/unified_bayesipy.py``), on 1×8×8 inputs."""

    def __init__(self, hidden: int = 12, n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 2 * 2, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, n_classes)

    def forward(self, x):
        return self.fc(self.classifier(self.features(x)))


class ConvHead(nn.Module):
    """Their surrogate for that network, written as they wrote theirs (hand-made architecture
    copy, last layer ``Linear(h, M·C)``, output ``× √(P/M)``)."""

    def __init__(self, n_features: int, scale_params: int, hidden: int = 12, n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 2 * 2, hidden), nn.ReLU(), nn.Linear(hidden, n_features * n_classes)
        )  # fmt: skip
        self.scale = math.sqrt(scale_params / n_features)
        self.n_features, self.n_classes = n_features, n_classes

    def forward(self, x):
        out = self.classifier(self.features(x))
        return self.scale * out.reshape(x.shape[0], self.n_features, self.n_classes)


def trained_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Equal to ``rtol`` relative to the largest entry of ``expected``."""
    atol = rtol * max(float(expected.abs().max()), 1e-30)
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- the surrogate


def test_surrogate_is_their_convhead_drawn_from_the_same_seed():
    """Same architecture, same fresh init draws as their ConvHead after ``manual_seed(seed)``
    (not the network's weights), output ``× √(P/M)``; the network is not touched."""
    model, x, M = trained_net(), images(6), 7
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = A.authors_surrogate(model, M, x, seed=3)
    torch.manual_seed(3)
    theirs = ConvHead(M, n_params(model))
    ours = [p for p in g.parameters()]
    ref = [p for p in theirs.parameters()]
    assert [p.shape for p in ours] == [p.shape for p in ref]
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
    assert float(g.scale) == pytest.approx(math.sqrt(n_params(model) / M), rel=1e-7)
    with torch.no_grad():
        close(g(x), theirs(x), eps_tolerance(torch.float32, 64))
        assert g(x).shape == (6, M, 10)
    for name, p in model.named_parameters():  # fresh, not the network's weights
        assert not torch.equal(p, dict(g.body.named_parameters())[name]) or name.startswith("fc")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in g.parameters())


def test_surrogate_seed_changes_the_draw_and_keeps_the_global_rng():
    model, x = trained_net(), images(4)
    state = torch.random.get_rng_state()
    a = A.authors_surrogate(model, 5, x, seed=0)
    b = A.authors_surrogate(model, 5, x, seed=0)
    c = A.authors_surrogate(model, 5, x, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.body.fc.weight, c.body.fc.weight)


class HeadRegisteredFirst(nn.Module):
    """The output layer is registered before the layer that runs last-but-one."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(6, 3)
        self.hidden = nn.Linear(4, 6)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def test_surrogate_replaces_the_layer_that_produces_the_output_found_by_running():
    torch.manual_seed(0)
    model, x = HeadRegisteredFirst().eval(), torch.randn(5, 4)
    g = A.authors_surrogate(model, 2, x)
    assert g.body.out.weight.shape == (2 * 3, 6)
    assert g.body.hidden.weight.shape == (6, 4)
    assert g(x).shape == (5, 2, 3)


def test_surrogate_of_a_batchnorm_network_in_train_mode():
    """The output width is read in eval mode (batch-norm on one input), the user's mode kept;
    batch-norm's running statistics are reset with the rest."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    model(torch.randn(16, 4))  # running statistics away from their reset values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = A.authors_surrogate(model, 2, torch.randn(5, 4))
    assert model.training and model[1].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(g.body[1].running_mean, torch.zeros(6))
    assert torch.equal(g.body[1].running_var, torch.ones(6))
    assert g.body[3].weight.shape == (6, 6)


class RawParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(x * self.w)


def test_surrogate_refuses_parameters_it_cannot_reinitialise():
    with pytest.raises(ValueError, match=r"reset_parameters: \['w'\]"):
        A.authors_surrogate(RawParameter(), 2, torch.randn(3, 4))
    with pytest.raises(ValueError, match="n_features must be at least 1"):
        A.authors_surrogate(trained_net(), 0, images(2))


def test_surrogate_refuses_an_output_that_is_not_one_linear_layer():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    with pytest.raises(ValueError, match="not verified to be one nn.Linear"):
        A.authors_surrogate(model, 2, torch.randn(3, 4))


# --------------------------------------------------------------------------- the loss


def explicit_loss(model, surrogate, x, seed_state, n_train, zero):
    """Their loss from explicit Jacobians and explicit sums, float64."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator()
    g.set_state(seed_state)
    v = {
        n: torch.sign(torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.5)
        for n, p in params.items()
    }
    jac = jacrev(lambda ps: functional_call(model, ps, (x,)))(params)  # name -> (B, C, *shape)
    z = sum((jac[n].double() * v[n].double()).flatten(2).sum(-1) for n in params)  # (B, C)
    with torch.no_grad():
        phi = surrogate(x).double()  # (B, M, C)
    B, _, C = phi.shape
    total = 0.0
    for i in range(B):
        for j in range(B):
            cross = n_train is not None and zero and ((i < n_train) != (j < n_train))
            for a in range(C):
                for b in range(C):
                    k = 0.0 if cross else float(z[i, a] * z[j, b])
                    q = float((phi[i, :, a] * phi[j, :, b]).sum())
                    total += (k - q) ** 2
    return total / (B * B * C * C), z


@pytest.mark.parametrize("n_train,zero", [(None, False), (3, False), (3, True), (2, True)])
def test_loss_equals_explicit_bbcc_sum_with_explicit_jacobians(n_train, zero):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).eval()
    x = torch.randn(5, 3)
    g = A.authors_surrogate(model, 3, x, seed=2)
    la = A.AuthorsScaLLA(model, g, "classification", seed=7)
    state = la.generator.get_state()
    expected, z = explicit_loss(model, g, x, state, n_train, zero)
    la.generator.set_state(state)
    close(la._true_jacobian(x).double(), z, eps_tolerance(torch.float32, 40))
    la.generator.set_state(state)
    with torch.no_grad():
        loss = la.kernel_loss(x, n_train, zero, None)
    assert expected > 0
    assert float(loss) == pytest.approx(expected, rel=eps_tolerance(torch.float32, 5 * 5 * 16, 10))


def test_weight_decay_adds_the_parameter_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).eval()
    x = torch.randn(4, 3)
    la = A.AuthorsScaLLA(model, A.authors_surrogate(model, 2, x), "classification", seed=1)
    state = la.generator.get_state()
    with torch.no_grad():
        plain = la.kernel_loss(x, None, False, None)
        la.generator.set_state(state)
        decayed = la.kernel_loss(x, None, False, 0.5)
    with torch.no_grad():
        norm = torch.cat([p.reshape(-1) for p in la.feature_model.parameters()]).norm()
    assert float(decayed - plain) == pytest.approx(0.5 * float(norm), rel=1e-5)


# --------------------------------------------------------------------------- the loop


def indexed(n: int, width: int = 3) -> TensorDataset:
    """Inputs whose first feature is their index (identifiable in a batch)."""
    x = torch.randn(n, width, generator=torch.Generator().manual_seed(n))
    x[:, 0] = torch.arange(n, dtype=x.dtype)
    return TensorDataset(x, torch.zeros(n, dtype=torch.long))


def test_sampler_covers_each_item_once_per_epoch_and_context_likewise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    train, context = indexed(15), indexed(10)
    context.tensors[0][:, 0] += 100
    la = A.AuthorsScaLLA(
        model, A.authors_surrogate(model, 2, train.tensors[0][:5]), "classification"
    )
    seen = []
    original = la.kernel_loss

    def spy(x, n_train, zero, wd):
        seen.append((x[:, 0].round().long().tolist(), n_train))
        return original(x, n_train, zero, wd)

    la.kernel_loss = spy
    gen = torch.Generator().manual_seed(0)
    loaders = (DataLoader(train, batch_size=5, shuffle=True, generator=gen),
               DataLoader(context, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(1)))  # fmt: skip
    la.fit(6, *loaders, zero_crossed_variances=True, optimize_hyper_parameters=False)
    assert len(seen) == 6 and all(n == 5 and len(ids) == 10 for ids, n in seen)
    train_ids = [ids[:5] for ids, _ in seen]
    ctx_ids = [ids[5:] for ids, _ in seen]

    def flat(batches):
        return [i for ids in batches for i in ids]

    for epoch in range(2):  # 3 steps per training epoch, 2 per context epoch
        assert sorted(flat(train_ids[3 * epoch : 3 * epoch + 3])) == list(range(15))
    for epoch in range(3):
        assert sorted(flat(ctx_ids[2 * epoch : 2 * epoch + 2])) == list(range(100, 110))
    assert flat(train_ids[:3]) != flat(train_ids[3:])  # a fresh permutation per epoch


def test_unequal_batches_split_as_theirs_with_a_warning_or_at_the_training_batch():
    """Theirs (default): half the concatenated batch, a warning where the training batch is
    shorter; deviation 3 (``split_at_train_batch``): the training batch's size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    for option, expected in ((False, [(10, 5), (7, 3)]), (True, [(10, 5), (7, 2)])):
        g = A.authors_surrogate(model, 2, torch.randn(2, 3))
        la = A.AuthorsScaLLA(model, g, "classification")
        splits = []
        original = la.kernel_loss

        def spy(x, n, z, wd, splits=splits, original=original):
            splits.append((x.shape[0], n))
            return original(x, n, z, wd)

        la.kernel_loss = spy
        loaders = (DataLoader(indexed(7), batch_size=5), DataLoader(indexed(10), batch_size=5))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            la.fit(2, *loaders, zero_crossed_variances=True, optimize_hyper_parameters=False,
                   split_at_train_batch=option)  # fmt: skip
        assert splits == expected
        messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
        assert any("at 3 rows" in m and "has 2" in m for m in messages) != option


def test_fit_trains_the_surrogate_and_changes_no_global_state():
    model = trained_net()
    model.train()  # a user's flag to be restored
    flags = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = images(20), torch.arange(20) % 10
    g = A.authors_surrogate(model, 4, x[:5])
    w0 = g.body.fc.weight.clone()
    la = A.AuthorsScaLLA(model, g, "classification", seed=0)
    state = torch.random.get_rng_state()
    losses, exact = la.fit(8, A.authors_loader(x, y), lr=5e-5, optimize_hyper_parameters=False)
    probs = la.predict_proba(x[:3], n_samples=16)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(losses) == 8 and exact == [] and la.steps == 8
    assert not torch.equal(w0, g.body.fc.weight)  # trained
    assert probs.shape == (3, 10)
    close(probs.sum(-1), torch.ones(3), eps_tolerance(torch.float32, 16))


def test_time_budget_and_callback():
    model = trained_net()
    x = images(10)
    la = A.AuthorsScaLLA(model, A.authors_surrogate(model, 3, x[:5]), "classification")
    calls = []
    la.fit(10**6, A.authors_loader(x), optimize_hyper_parameters=False, callback=lambda s, t: calls.append((s, t)),
           callback_every=3, time_budget=0.05)  # fmt: skip
    assert la.train_seconds >= 0.05 and la.steps < 10**6
    assert calls[-1] == (la.steps, la.train_seconds)
    assert all(s % 3 == 0 for s, _ in calls[:-1])


# --------------------------------------------------------------------------- posterior and predictive


def test_ggn_posterior_and_marginal_likelihood_equal_explicit_formulas():
    model = trained_net()
    x, y = images(12), torch.arange(12) % 10
    g = A.authors_surrogate(model, 4, x[:5])
    la = A.AuthorsScaLLA(model, g, "classification", prior_precision=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    la.fit(2, loader, optimize_hyper_parameters=False)
    g.train()  # their GGN pass runs with the surrogate in train mode
    with torch.no_grad():
        phi, f = g(x).double(), model(x).double()
    p = f.softmax(-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    H = torch.einsum("nma,nab,nkb->mk", phi, lam, phi)
    tol = eps_tolerance(torch.float32, 12 * 10 * 10, 10)
    close(la.H.double(), H, tol)
    P = H + torch.eye(4, dtype=torch.float64)
    cov = torch.linalg.inv(P + 1e-6 * torch.eye(4, dtype=torch.float64))
    cond = float(torch.linalg.cond(P))
    close(la.posterior_covariance.double(), cov, eps_tolerance(torch.float32, 40, cond))
    # their marginal likelihood: −Σ_batches mean CE − ½(log det P − M log δ + δ‖θ*‖²)
    ce = sum(
        float(nn.functional.cross_entropy(f[a : a + 5], y[a : a + 5])) for a in range(0, 12, 5)
    )
    theta = torch.cat([q.detach().reshape(-1) for q in model.parameters()]).double()
    delta = 2.0
    P2 = H + delta * torch.eye(4, dtype=torch.float64)
    expected = -ce - 0.5 * (
        float(torch.logdet(P2)) - 4 * math.log(delta) + delta * float(theta @ theta)
    )
    got = float(la.log_marginal_likelihood(torch.tensor(delta)))
    assert got == pytest.approx(
        expected, rel=eps_tolerance(torch.float32, 40, float(torch.linalg.cond(P2)))
    )
    mean, block = la.predictive_covariance(x[:4])
    mean2, block2 = la.predictive_covariance(x[:4], full_cross=False)
    assert torch.equal(mean, mean2)
    close(block, block2, eps_tolerance(torch.float32, 40))
    g.eval()
    with torch.no_grad():
        phi4 = g(x[:4]).double()
    expected_block = torch.einsum("npa,pq,nqb->nab", phi4, la.posterior_covariance.double(), phi4)
    close(block.double(), expected_block, tol)


def test_scale_tril_from_precision():
    A_ = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P = A_ @ A_.T + 6 * torch.eye(6, dtype=torch.float64)
    L = A._scale_tril_from_precision(P)
    assert torch.equal(L, L.tril())
    close(
        L @ L.T, torch.linalg.inv(P), eps_tolerance(torch.float64, 6, float(torch.linalg.cond(P)))
    )


def test_published_sampling_uses_the_transposed_factor():
    """Their metric samples ``f + Lᵀ z``: covariance ``LᵀL``; ``as_published=False``: ``LLᵀ``."""
    model = trained_net()
    x = images(10)
    la = A.AuthorsScaLLA(model, A.authors_surrogate(model, 3, x[:5]), "classification")
    la.fit(1, A.authors_loader(x), optimize_hyper_parameters=False)
    L = torch.tensor([[1.0, 0.0], [3.0, 0.1]])
    mean = torch.tensor([[3.0, 0.0]])
    la.predictive_covariance = lambda x, full_cross=True: (mean, (L @ L.T)[None])
    n = 4000
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 1, 2, generator=torch.Generator().manual_seed(0))
    p_pub = la.predict_proba(x[:1], n_samples=n, generator=g)
    expected_pub = (mean + torch.einsum("sna,nab->snb", z, L[None])).softmax(-1).mean(0)
    close(p_pub, expected_pub, eps_tolerance(torch.float32, 2))
    p_fix = la.predict_proba(
        x[:1], n_samples=n, generator=torch.Generator().manual_seed(0), as_published=False
    )
    expected_fix = (mean + z @ L.T).softmax(-1).mean(0)
    close(p_fix, expected_fix, eps_tolerance(torch.float32, 2))
    assert float((p_pub - p_fix).abs().max()) > 0.03  # var(f₁ − f₂): 9.4 against 4.0


def test_authors_fit_curve_on_a_probe():
    from fastlla.apps.fidelity import ProbeGram

    model = trained_net()
    x = images(40)
    probe = ProbeGram(model, images(6, seed=5))
    out = A.authors_fit(model, x, probe, seconds=0.2, n_features=5, max_iterations=12)
    curve = out["curve"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] == out["iterations"] <= 12
    assert all(a["seconds"] <= b["seconds"] for a, b in zip(curve, curve[1:]))
    assert out["final_error"] == curve[-1]["error"] > 0
