"""ScaLLA against its oracles: exact LLA (through an exact-Jacobian surrogate) and the authors'
materialised kernel-matching loss; plus training behaviour, saving and bad input."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastlla
from fastlla import _ops
from fastlla.functional import NetworkFunction
from fastlla.laplace import NotFittedError
from fastlla.projections import stack_rows
from fastlla.scalla_settings import Settings

DTYPE = torch.float64


class JacobianSurrogate(nn.Module):
    """``g(x) = J(x)ᵀ`` (M = P): with it ScaLLA *is* exact weight-space LLA."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.network = NetworkFunction(model)

    def forward(self, x):
        return self.network.jacobian(x).mT


def make_problem(likelihood: str, n: int = 40, d: int = 4, C: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, C)).to(DTYPE)
    X = torch.randn(n, d, generator=g, dtype=DTYPE)
    if likelihood == "classification":
        y = model(X).argmax(-1)
        flip = torch.rand(n, generator=g) < 0.2
        y[flip] = torch.randint(0, C, (int(flip.sum()),), generator=g)
    else:
        with torch.no_grad():
            y = model(X) + 0.3 * torch.randn(n, C, generator=g, dtype=DTYPE)
    loader = DataLoader(TensorDataset(X, y), batch_size=8)
    x_test = torch.randn(7, d, generator=g, dtype=DTYPE)
    return model, loader, x_test


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- the key test
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("form", ["weight", "function"])
def test_exact_jacobian_surrogate_equals_exact_lla(likelihood, form):
    model, loader, x_test = make_problem(likelihood)
    sigma = 0.4 if likelihood == "regression" else 1.0
    exact = fastlla.ExactLLA(model, likelihood, prior_precision=0.3, sigma_noise=sigma, form=form)
    exact.fit(loader)
    scalla = fastlla.ScaLLA(
        model, likelihood, surrogate=JacobianSurrogate(model), prior_precision=0.3, sigma_noise=sigma
    )
    scalla.fit(loader, iterations=0, progress_bar=False)
    assert scalla.n_features == exact.n_params

    mean_e, cov_e = exact.predictive_distribution(x_test)
    mean_s, cov_s = scalla.predictive_distribution(x_test)
    assert rel(mean_s, mean_e) < 1e-12
    assert rel(cov_s, cov_e) < 1e-8
    for delta in (0.01, 0.3, 30.0):
        lml_e = exact.log_marginal_likelihood(delta)
        lml_s = scalla.log_marginal_likelihood(delta)
        assert abs(float(lml_s - lml_e)) <= 1e-8 * abs(float(lml_e))
    # the optimum of a smooth function is located to about √eps: compare at that precision
    assert math.isclose(
        scalla.optimize_prior_precision("marglik"),
        exact.optimize_prior_precision("marglik"),
        rel_tol=1e-6,
    )


# --------------------------------------------------------------------------- the loss
def authors_loss(phi: torch.Tensor, z: torch.Tensor, n_train: int) -> torch.Tensor:
    """The authors' formulation: materialised ``B×B×C×C`` tensors, ``mean((K̂ − Q)²)``.

    ``phi`` (B, M, C) features, ``z`` (S, B, C) JVPs; inputs ``[n_train, B)`` are context
    points, whose target cross-covariances with the training inputs are zero.
    """
    S = z.shape[0]
    K = torch.einsum("sic,sjd->ijcd", z, z) / S
    Q = torch.einsum("imc,jmd->ijcd", phi, phi)
    keep = torch.zeros(phi.shape[0], phi.shape[0], dtype=torch.bool)
    keep[:n_train, :n_train] = True
    keep[n_train:, n_train:] = True
    K = K * keep[:, :, None, None]
    return ((K - Q) ** 2).mean()


@pytest.mark.parametrize("n_train", [10, 6, 0])
def test_kernel_matching_loss_equals_authors_materialised_loss(n_train):
    g = torch.Generator().manual_seed(1)
    B, M, C, S = 10, 5, 3, 4
    phi = torch.randn(B, M, C, generator=g, dtype=DTYPE, requires_grad=True)
    z = torch.randn(S, B, C, generator=g, dtype=DTYPE)
    expected = authors_loss(phi, z, n_train)
    (grad_expected,) = torch.autograd.grad(expected, phi)

    rows = phi.permute(0, 2, 1).reshape(B * C, M)
    ours = _ops.kernel_matching_loss(rows, stack_rows(z), n_train * C)
    (grad_ours,) = torch.autograd.grad(ours, phi)
    assert abs(float(ours.detach() - expected.detach())) <= 1e-10 * float(expected.detach())
    assert rel(grad_ours, grad_expected) < 1e-10


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("residual", [False, "head", "jvp"])
@pytest.mark.parametrize("rank", [True, 4])
def test_predictive_with_factored_last_layer_equals_the_formed_features(residual, rank):
    """The predictive path (one network pass, exact last-layer block kept as a ⊗ I_C) gives
    the covariance of the fully formed features g(x) through the dense Cholesky solve."""
    model, loader, x_test = make_problem("classification")
    la = fastlla.ScaLLA(model, "classification", n_features=5, last_layer=rank,
                        residual_variance=residual, prior_precision=0.7)
    la.fit(loader, iterations=3, progress_bar=False)
    f, cov = la.predictive_distribution(x_test)
    feats = la._features(x_test)
    assert feats.kron is not None and feats.phi.shape[1] == 5
    with torch.no_grad():
        phi = la._surrogate_features(x_test)  # (B, 5 + k·C, C), formed
        dense = la.posterior.covariance(phi, 0.7, la.data_scale)
        if residual == "head":
            R = la.residual_head(x_test)  # ψ through its own forward pass
            dense = dense + R @ R.mT / 0.7
        elif residual == "jvp":
            dense = dense + la._residual_block(x_test, phi, "jvp") / 0.7
    torch.testing.assert_close(f, model(x_test).detach(), rtol=0, atol=0)
    torch.testing.assert_close(cov, dense, rtol=1e-9, atol=1e-12)


def test_non_finite_surrogate_at_prediction_is_refused_clearly():
    model, loader, x_test = make_problem("classification")
    la = fastlla.ScaLLA(model, "classification", n_features=5)
    la.fit(loader, iterations=2, progress_bar=False)
    with torch.no_grad():  # every weight: a distilled gated map leaves some unused
        for p in la.surrogate.parameters():
            p.fill_(float("nan"))
    with pytest.raises(ValueError, match="surrogate's output contains NaN"):
        la.predictive_distribution(x_test)


def test_head_width_adds_a_hidden_layer_that_saves_and_exports():
    import copy

    from fastlla.export import Predictor

    model, loader, x_test = make_problem("classification")
    la = fastlla.ScaLLA(model, "classification", n_features=4, head_width=6, gate=False)
    la.fit(loader, iterations=3, progress_bar=False)
    head = getattr(la.surrogate, "learned", la.surrogate).head
    assert isinstance(head, nn.Sequential) and head[0].out_features == 6
    cov = la.predictive_distribution(x_test)[1]
    other = fastlla.ScaLLA(model, "classification", n_features=4)  # built from the saved state
    other.load_state_dict(la.state_dict())
    assert other.head_width == 6
    torch.testing.assert_close(other.predictive_distribution(x_test)[1], cov)
    fresh = Predictor.like(copy.deepcopy(model), "classification", n_outputs=3, n_features=4,
                           head_width=6, gate=False, predictor_options={"output": "gaussian"})
    fresh.load_state_dict(la.export(output="gaussian").state_dict())
    torch.testing.assert_close(fresh(x_test)[1], cov, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="head_width"):
        fastlla.ScaLLA(model, "classification", head_width=-1)


# --------------------------------------------------------------------------- gated surrogate
def gated_net(activation: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), activation, nn.Linear(5, 3)
    ).to(DTYPE)


@pytest.mark.parametrize(
    "activation", [nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.LeakyReLU(0.1)], ids=lambda a: type(a).__name__
)
def test_gated_features_equal_the_jacobian_through_the_exact_gate(activation):
    """Oracle: with ``H = (∂z/∂θ) Q`` from explicit Jacobians of the penultimate pre-activation
    ``z``, the gated features equal ``J(x) Q`` — the network's own Jacobian of every parameter
    below the head, projected — for every class."""
    from fastlla.network_head import gated_structure, penultimate
    from fastlla.surrogate import GatedSurrogate

    model = gated_net(activation)
    assert gated_structure(model) == ("2", "3", "4")
    x = torch.randn(9, 4, dtype=DTYPE)
    lower = [p for p in model.parameters()][:4]  # the two Linear layers below the head
    Q = torch.randn(sum(p.numel() for p in lower), 7, dtype=DTYPE)

    def flat_jacobian(fn):
        jac = torch.autograd.functional.jacobian(lambda *ps: fn(ps), tuple(lower))
        return torch.cat([j.reshape(*j.shape[:2], -1) for j in jac], dim=-1)  # (B, out, P_lower)

    def run(params, upto):
        h = torch.tanh(x @ params[0].T + params[1])
        z = h @ params[2].T + params[3]
        return z if upto == "z" else model[4](model[3](z))

    expected = torch.einsum("bcp,pm->bmc", flat_jacobian(lambda ps: run(ps, "f")), Q)
    H = torch.einsum("bjp,pm->bjm", flat_jacobian(lambda ps: run(ps, "z")), Q)
    sur = GatedSurrogate(model, n_features=7, n_outputs=3, width=4)
    sur.hidden_features = lambda u: H  # the exact class-independent part
    assert sur.check(x)
    got = sur.features(penultimate(model, "4", x, bias=False), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sur(x), expected, rtol=1e-10, atol=1e-12)  # φ read by a hook


def test_gate_auto_uses_the_structure_only_where_the_forward_pass_has_it():
    from fastlla.network_head import gated_structure
    from fastlla.surrogate import GatedSurrogate

    model = gated_net(nn.ReLU())
    X = torch.randn(24, 4, dtype=DTYPE)
    loader = DataLoader(TensorDataset(X, model(X).argmax(-1)), batch_size=8)
    la = fastlla.ScaLLA(model, "classification", n_features=5).fit(loader, iterations=3, progress_bar=False)
    assert la.gate_used and isinstance(la.surrogate.learned, GatedSurrogate)
    # GELU's derivative is not a function of its output: no gate
    assert gated_structure(gated_net(nn.GELU())) is None
    la = fastlla.ScaLLA(gated_net(nn.GELU()), "classification", n_features=5)
    assert not la.fit(loader, iterations=1, progress_bar=False).gate_used

    class SkipsActivation(nn.Module):  # registered Linear → ReLU → Linear, but never runs the ReLU
        def __init__(self):
            super().__init__()
            self.a, self.relu, self.head = nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.a(x)))

    odd = SkipsActivation().to(DTYPE)
    assert gated_structure(odd) == ("a", "relu", "head")
    la = fastlla.ScaLLA(odd, "classification", n_features=5).fit(loader, iterations=1, progress_bar=False)
    assert not la.gate_used and not isinstance(la.surrogate.learned, GatedSurrogate)
    with pytest.raises(ValueError, match="does not feed"):
        fastlla.ScaLLA(odd, "classification", gate=True).fit(loader, iterations=1, progress_bar=False)
    with pytest.raises(ValueError, match="gate=True needs"):
        fastlla.ScaLLA(model, "classification", gate=True, last_layer=False).fit(loader, iterations=1)
    with pytest.raises(ValueError, match="gate must be"):
        fastlla.ScaLLA(model, "classification", gate="yes")


def test_gated_surrogate_saves_and_exports():
    import copy

    from fastlla.export import Predictor

    model = gated_net(nn.ReLU())
    X = torch.randn(24, 4, dtype=DTYPE)
    loader = DataLoader(TensorDataset(X, model(X).argmax(-1)), batch_size=8)
    la = fastlla.ScaLLA(model, "classification", n_features=5, head_width=6)
    la.fit(loader, iterations=4, progress_bar=False)
    assert la.gate_used
    x_test = torch.randn(5, 4, dtype=DTYPE)
    cov = la.predictive_distribution(x_test)[1]
    other = fastlla.ScaLLA(model, "classification", n_features=5)
    other.load_state_dict(la.state_dict())
    assert other.gate_used and other.surrogate.learned.head_width == 6
    torch.testing.assert_close(other.predictive_distribution(x_test)[1], cov)
    fresh = Predictor.like(copy.deepcopy(model), "classification", n_outputs=3, n_features=5,
                           head_width=6, predictor_options={"output": "gaussian"})
    fresh.load_state_dict(la.export(output="gaussian").state_dict())
    torch.testing.assert_close(fresh(x_test)[1], cov, rtol=1e-6, atol=1e-9)
    exported = torch.export.export(la.export(output="gaussian"), (x_test,))
    torch.testing.assert_close(exported.module()(x_test)[1], cov, rtol=1e-6, atol=1e-9)


def test_training_reduces_kernel_error():
    model, loader, x_test = make_problem("classification", n=64)
    errors = []
    for iterations in (1, 400):
        la = fastlla.ScaLLA(model, "classification", n_features=16, seed=3)
        la.fit(loader, iterations=iterations, n_projections=8, lr=3e-3, progress_bar=False)
        errors.append(la.kernel_fidelity(x_test, method="exact"))
    assert errors[1] < 0.6 * errors[0]
    assert errors[1] < 0.5


def test_jvp_fidelity_estimate_agrees_with_exact():
    model, loader, x_test = make_problem("regression", n=32)
    la = fastlla.ScaLLA(model, "regression", n_features=8, seed=0)
    la.fit(loader, iterations=50, progress_bar=False)
    exact = la.kernel_fidelity(x_test, method="exact")
    estimate = la.kernel_fidelity(x_test, method="jvp", n_projections=400)
    assert abs(estimate - exact) < 0.15 * exact + 0.02


def cross_kernel_share(la: fastlla.ScaLLA, x_t, x_u) -> float:
    """``‖Q_TU‖_F / √(‖Q_TT‖_F ‖Q_UU‖_F)``: 0 when training and context kernels separate."""
    with torch.no_grad():  # the surrogate's features (``_features`` may add a residual block)
        phi_t = la._surrogate_features(x_t).permute(0, 2, 1).reshape(-1, la.n_features)
        phi_u = la._surrogate_features(x_u).permute(0, 2, 1).reshape(-1, la.n_features)
    tt, uu, tu = (phi_t @ phi_t.mT).norm(), (phi_u @ phi_u.mT).norm(), (phi_t @ phi_u.mT).norm()
    return float(tu / (tt * uu).sqrt())


def test_context_points_decorrelate_context_from_training_kernel():
    model, loader, _ = make_problem("classification", n=64)
    g = torch.Generator().manual_seed(5)
    x_context = 4.0 + torch.randn(64, 4, generator=g, dtype=DTYPE)
    context = DataLoader(TensorDataset(x_context), batch_size=8)
    x_train = loader.dataset.tensors[0]
    share = {}
    for name, ctx in (("plain", None), ("biased", context)):
        # the paper's bias on a fully learned kernel: the exact last-layer block (on by default)
        # is the network's own kernel and is not decorrelated
        la = fastlla.ScaLLA(model, "classification", n_features=16, seed=0, last_layer=False)
        la.fit(loader, context_loader=ctx, iterations=300, lr=3e-3, progress_bar=False)
        share[name] = cross_kernel_share(la, x_train, x_context)
    # measured over three model seeds: plain 0.67-0.76, biased 0.37-0.42
    assert share["biased"] < 0.75 * share["plain"]


def test_regression_predictive_adds_noise_on_request():
    model, loader, x_test = make_problem("regression")
    la = fastlla.ScaLLA(model, "regression", n_features=8, sigma_noise=0.5)
    la.fit(loader, iterations=5, progress_bar=False)
    mean, f_var = la(x_test)
    _, y_var = la(x_test, include_noise=True)
    eye = torch.eye(f_var.shape[-1], dtype=DTYPE)
    assert torch.allclose(y_var - f_var, 0.25 * eye.expand_as(f_var))
    assert torch.equal(mean, model(x_test).detach())


def test_mixup_mixes_pairs_of_the_batch():
    x = torch.randn(9, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    out = fastlla.augment.mixup(x, step=4)
    assert out.shape == x.shape and torch.equal(out[:5], x[4:])  # kept rows, then 4 mixtures
    assert torch.equal(out, fastlla.augment.mixup(x, step=4))  # seeded by the step
    for row in out[5:]:  # each mixture lies on the segment between two rows of the batch
        found = False
        for a in x:
            for b in x:
                d = a - b
                lam = float((row - b) @ d / (d @ d)) if float(d @ d) > 0 else 0.0
                found |= 0 <= lam <= 1 and torch.allclose(lam * a + (1 - lam) * b, row)
        assert found


def test_augment_auto_is_mixup_for_regression_only_and_bad_values_lose_nothing():
    resolved = {}
    for likelihood in ("regression", "classification"):
        model, loader, x_test = make_problem(likelihood)
        la = fastlla.ScaLLA(model, likelihood, n_features=8, seed=0)
        la.fit(loader, iterations=2, progress_bar=False)
        resolved[likelihood] = la._train_config["augment"]
    assert resolved == {"regression": fastlla.augment.mixup, "classification": None}
    _, cov = la.predictive_distribution(x_test)
    with pytest.raises(ValueError, match="augment must be"):
        la.fit(loader, iterations=2, augment="cutout", progress_bar=False)
    assert torch.equal(la.predictive_distribution(x_test)[1], cov)


@pytest.mark.parametrize("link", ["probit", "bridge", "mc"])
def test_classification_probabilities_are_distributions(link):
    model, loader, x_test = make_problem("classification")
    la = fastlla.ScaLLA(model, "classification", n_features=8)
    la.fit(loader, iterations=5, progress_bar=False)
    probs = la(x_test, link_approx=link, n_samples=50)
    assert probs.shape == (7, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(7, dtype=DTYPE))
    assert (probs > 0).all()


# --------------------------------------------------------------------------- structured models
class TwoInputNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(2, 6)
        self.norm = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 2)

    def forward(self, left, right):
        return self.out(torch.tanh(self.norm(self.a(left) + self.b(right))))


def test_dict_inputs_batchnorm_and_frozen_parameters():
    g = torch.Generator().manual_seed(0)
    model = TwoInputNet().to(DTYPE)
    model.norm.running_mean.normal_(generator=g)
    model.b.weight.requires_grad_(False)
    model.eval()
    n = 24
    xs = {"left": torch.randn(n, 3, generator=g, dtype=DTYPE), "right": torch.randn(n, 2, generator=g, dtype=DTYPE)}
    y = torch.randint(0, 2, (n,), generator=g)

    class DictData(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {k: v[i] for k, v in xs.items()}, y[i]

    loader = DataLoader(DictData(), batch_size=6)
    la = fastlla.ScaLLA(model, "classification", n_features=6)
    la.fit(loader, iterations=10, progress_bar=False)
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert la.network.n_params == expected
    probs = la({k: v[:5] for k, v in xs.items()})
    assert probs.shape == (5, 2)
    # the default surrogate's trunk is a trainable copy; the user's model is untouched
    assert not model.b.weight.requires_grad
    exact = fastlla.ExactLLA(model, "classification").fit(loader)
    assert exact.n_params == expected


# --------------------------------------------------------------------------- saving
def test_state_dict_round_trip_is_exact():
    model, loader, x_test = make_problem("classification")
    la = fastlla.ScaLLA(model, "classification", n_features=8, prior_precision=2.0)
    la.fit(loader, iterations=20, progress_bar=False)
    la.optimize_prior_precision("marglik")
    state = la.state_dict()
    restored = fastlla.ScaLLA(model, "classification", n_features=8)
    restored.load_state_dict(state)
    assert restored.prior_precision == la.prior_precision
    assert torch.equal(restored.predictive_distribution(x_test)[1], la.predictive_distribution(x_test)[1])
    assert float(restored.log_marginal_likelihood()) == float(la.log_marginal_likelihood())


def test_state_dict_from_another_model_is_refused():
    model, loader, _ = make_problem("classification")
    la = fastlla.ScaLLA(model, "classification", n_features=8)
    la.fit(loader, iterations=2, progress_bar=False)
    other, _, _ = make_problem("classification", seed=1)
    with torch.no_grad():
        other[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="other weights"):
        fastlla.ScaLLA(other, "classification", n_features=8).load_state_dict(la.state_dict())
    wider = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 3)).to(DTYPE)
    with pytest.raises(ValueError, match="other parameters"):
        fastlla.ScaLLA(wider, "classification", n_features=8).load_state_dict(la.state_dict())
    with pytest.raises(ValueError, match="likelihood"):
        fastlla.ScaLLA(model, "regression", n_features=8).load_state_dict(la.state_dict())


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_clearly():
    model, loader, x_test = make_problem("classification")
    with pytest.raises(ValueError, match="unknown likelihood"):
        fastlla.ScaLLA(model, "poisson")
    with pytest.raises(ValueError, match="prior_precision"):
        fastlla.ScaLLA(model, "classification", prior_precision=-1.0)
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fastlla.ScaLLA(frozen, "classification")

    la = fastlla.ScaLLA(model, "classification", n_features=4)
    with pytest.raises(NotFittedError):
        la(x_test)
    with pytest.raises(RuntimeError, match="fit"):
        la.kernel_fidelity(x_test)
    with pytest.raises(ValueError, match="empty"):
        la.fit(DataLoader(TensorDataset(torch.empty(0, 4, dtype=DTYPE), torch.empty(0, dtype=torch.long))))
    bad_x = loader.dataset.tensors[0].clone()
    bad_x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        la.fit(DataLoader(TensorDataset(bad_x, loader.dataset.tensors[1]), batch_size=8), iterations=1)
    bad_y = loader.dataset.tensors[1].clone()
    bad_y[0] = 7
    with pytest.raises(ValueError, match="labels"):
        la.fit(DataLoader(TensorDataset(loader.dataset.tensors[0], bad_y), batch_size=8), iterations=0)
    empty_context = DataLoader(TensorDataset(torch.empty(0, 4, dtype=DTYPE)), batch_size=4)
    with pytest.raises(ValueError, match="context_loader"):
        la.fit(loader, context_loader=empty_context, iterations=2, progress_bar=False)
    with pytest.raises(ValueError, match="n_projections"):
        la.fit(loader, iterations=2, n_projections=0, progress_bar=False)

    class FlatSurrogate(nn.Module):
        def forward(self, x):
            return x  # (B, d): not (B, M, C)

    with pytest.raises(ValueError, match=r"\(B, M, C\)"):
        fastlla.ScaLLA(model, "classification", surrogate=FlatSurrogate()).fit(loader, iterations=0)

    class NaNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3).to(DTYPE)

        def forward(self, x):
            return self.lin(x) * float("nan")

    with pytest.raises(ValueError, match="outputs contain NaN"):
        fastlla.ScaLLA(NaNNet(), "classification", n_features=4).fit(loader, iterations=0)


def test_settings_record_what_auto_became_and_survive_a_weights_only_round_trip(tmp_path):
    from fastlla.scalla_settings import Settings

    model, loader, _ = make_problem("classification")
    la = fastlla.ScaLLA(model, "classification", n_features=6)
    assert la.settings is None and "last_layer='auto'" in repr(la) and "not fitted" in repr(la)
    la.fit(loader, iterations=2, progress_bar=False)
    s = la.settings
    assert isinstance(s, Settings) and s.n_learned == 6
    assert (la.last_layer_used, la.gate_used) == (s.last_layer, s.gate)
    assert s.last_layer is True  # (8 + 1)·3 exact features ≤ 1024
    assert s.head_width == 512  # penultimate width 8 < 512
    assert f"head_width={s.head_width}" in repr(la) and "fitted)" in repr(la)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.gate = not s.gate
    torch.save(la.state_dict(), tmp_path / "la.pt")
    state = torch.load(tmp_path / "la.pt", weights_only=True)
    keys = ("last_layer", "gate", "head_width", "n_learned", "residual_variance", "augment")
    assert {k: state[k] for k in keys} == s.as_dict()
    fresh = fastlla.ScaLLA(copy.deepcopy(model), "classification", n_features=6)
    fresh.load_state_dict(state)
    assert fresh.settings == s and repr(fresh) == repr(la)


class TokenRegressor(nn.Module):
    """Integer token inputs (B, T) → (B, C): ``augment="auto"`` must not mix them."""

    def __init__(self, C: int = 2):
        super().__init__()
        self.embed, self.out = nn.Embedding(11, 4), nn.Linear(4, C)

    def forward(self, x):
        return self.out(torch.tanh(self.embed(x).mean(1)))


def _image_regression(n: int = 16):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)).to(DTYPE)
    X = torch.randn(n, 1, 4, 4, generator=g, dtype=DTYPE)
    with torch.no_grad():
        y = model(X) + 0.1 * torch.randn(n, 2, generator=g, dtype=DTYPE)
    return model, DataLoader(TensorDataset(X, y), batch_size=8)


def _token_regression(n: int = 16):
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = TokenRegressor().to(DTYPE)
    X = torch.randint(0, 11, (n, 5), generator=g)
    with torch.no_grad():
        y = model(X) + 0.1 * torch.randn(n, 2, generator=g, dtype=DTYPE)
    return model, DataLoader(TensorDataset(X, y), batch_size=8)


def test_settings_record_what_every_auto_became_at_fit():
    """One record, made at fit by scalla_settings.resolve: residual_variance="auto" is the head
    for classification (when kernel matching runs) and off for regression; augment="auto" is
    mixup for regression on floating-point tensors (tabular or image-like), nothing for
    classification or integer tokens; a user's surrogate has no surrogate settings. The options
    themselves stay as given, and the training used what the record says."""
    model, loader, _ = make_problem("classification")
    la = fastlla.ScaLLA(model, "classification", n_features=6)
    assert "residual_variance='auto'" in repr(la)
    la.fit(loader, iterations=2, progress_bar=False)
    s = la.settings
    assert (s.residual_variance, s.augment) == ("head", None)
    assert la.residual_head is not None and la.residual_mode == "head"
    assert (la.residual_variance, la.last_layer, la.gate, la.head_width) == ("auto",) * 4
    la.fit(loader, iterations=0, progress_bar=False)  # a refit keeps the surrogate's record
    assert la.settings == s  # and the head it trained (the surrogate did not move)
    fresh = fastlla.ScaLLA(model, "classification", n_features=6)
    assert fresh.fit(loader, iterations=0, progress_bar=False).settings.residual_variance is False
    assert fresh.residual_head is None
    used = []
    la = fastlla.ScaLLA(model, "classification", n_features=6, residual_variance="jvp")
    la.fit(loader, iterations=2, augment=lambda x, step: used.append(step) or x, progress_bar=False)
    assert (la.settings.residual_variance, la.settings.augment) == ("jvp", "callable")
    assert used == [0, 1] and la.residual_head is None
    la.fit(loader, iterations=1, augment="mixup", progress_bar=False)
    assert la.settings.augment == "mixup" and la._train_config["augment"] is fastlla.augment.mixup

    reg_model, reg_loader, _ = make_problem("regression")
    for model_, loader_, augment in (
        (reg_model, reg_loader, "mixup"),  # tabular floats
        (*_image_regression(), "mixup"),  # image-like floats
        (*_token_regression(), None),  # integer tokens
    ):
        la = fastlla.ScaLLA(model_, "regression", n_features=4, head_width=0)
        la.fit(loader_, iterations=1, progress_bar=False)
        assert (la.settings.residual_variance, la.settings.augment) == (False, augment)
        assert la._train_config["augment"] is (fastlla.augment.mixup if augment else None)
        assert la.residual_head is None and la.residual_mode is False
    la = fastlla.ScaLLA(reg_model, "regression", n_features=4)
    la.fit(reg_loader, iterations=1, augment=None, progress_bar=False)
    assert la.settings.augment is None

    user = fastlla.ScaLLA(model, "classification", surrogate=JacobianSurrogate(model))
    user.fit(loader, iterations=0, progress_bar=False)
    assert user.settings == Settings(None, None, None, None, False, None)
    assert user.settings.user_surrogate
    assert repr(user).startswith("ScaLLA('classification', surrogate=<user's>, residual_variance=")
    assert user.last_layer_used == "auto" and user.n_learned == 128  # the options, unresolved


def test_settings_round_trip_through_the_state_dict_and_show_in_repr():
    """The record is saved under its field names, read back by a fresh estimator (for the
    default surrogate and a user's), and repr shows every field — and the correction in force
    where the attribute was switched after the fit."""
    model, loader, x = make_problem("regression")
    la = fastlla.ScaLLA(model, "regression", n_features=5, residual_variance="head")
    la.fit(loader, iterations=2, progress_bar=False)
    s = la.settings
    assert (s.residual_variance, s.augment, s.head_width) == ("head", "mixup", 512)
    for k, v in s.as_dict().items():
        assert f"{k}={v!r}" in repr(la)
    state = la.state_dict()
    fresh = fastlla.ScaLLA(model, "regression", n_features=5)  # residual_variance="auto"
    fresh.load_state_dict(state)
    assert fresh.settings == s and fresh.residual_mode == "head" and repr(fresh) == repr(la)
    assert torch.equal(fresh.predictive_distribution(x)[1], la.predictive_distribution(x)[1])
    la.residual_variance = False  # switched after the fit: the record stays, repr says both
    assert la.settings == s and repr(la).endswith("residual_mode=False, seed=0, fitted)")
    assert la.state_dict()["residual_variance"] == "head"

    cls_model, cls_loader, _ = make_problem("classification")
    user = fastlla.ScaLLA(cls_model, "classification", surrogate=JacobianSurrogate(cls_model))
    user.fit(cls_loader, iterations=0, progress_bar=False)
    other = fastlla.ScaLLA(cls_model, "classification", surrogate=JacobianSurrogate(cls_model))
    other.load_state_dict(user.state_dict())
    assert other.settings == user.settings and repr(other) == repr(user)


def test_an_older_state_without_the_new_settings_still_loads():
    """A state saved before the record held residual_variance and augment: the correction is
    the head it holds, the augmentation "unrecorded"; the predictive is the same."""
    model, loader, x = make_problem("classification")
    la = fastlla.ScaLLA(model, "classification", n_features=6)
    la.fit(loader, iterations=2, progress_bar=False)
    old = {k: v for k, v in la.state_dict().items() if k not in ("residual_variance", "augment")}
    fresh = fastlla.ScaLLA(model, "classification", n_features=6)
    fresh.load_state_dict(old)
    assert fresh.settings == dataclasses.replace(la.settings, augment="unrecorded")
    assert torch.equal(fresh.predictive_distribution(x)[1], la.predictive_distribution(x)[1])
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['augment'\]"):
        fastlla.ScaLLA(model, "classification").load_state_dict(
            {k: v for k, v in la.state_dict().items() if k != "augment"}
        )
