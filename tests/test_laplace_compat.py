"""laplace-torch compatibility: hyper-parameters, evidence gradients, the factory, weight subsets.

Oracles: central finite differences (float64) for evidence gradients; explicit Jacobians from
``testing.oracle_jacobian`` with the GGN, posterior and evidence written out here
(``slogdet``, ``inv``); laplace-torch itself where it can be imported (skipped otherwise).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastlla
from fastlla import ExactLLA, Laplace, ScaLLA
from testing import eps_tolerance, oracle_jacobian

DT = torch.float64
REL = 1e-8  # float64 results of a few thousand products


class MLP(nn.Module):
    def __init__(self, d_in=3, hidden=5, n_out=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def data(likelihood, n_out=2, N=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 3, generator=g, dtype=DT)
    if likelihood == "classification":
        y = torch.randint(0, n_out, (N,), generator=g)
    else:
        y = torch.randn(N, n_out, generator=g, dtype=DT)
    return X, y


def loader(X, y, batch=5):
    return DataLoader(TensorDataset(X, y), batch_size=batch)


def model_for(n_out=2, seed=0):
    return MLP(n_out=n_out, seed=seed).double()


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# --------------------------------------------------------------------------- the oracle
class Oracle:
    """GGN, evidence and predictive covariance of the linearized model, written out."""

    def __init__(self, model, likelihood, X, y):
        self.model, self.likelihood = model, likelihood
        self.J = oracle_jacobian(model, X)  # (N, C, P)
        with torch.no_grad():
            f = model(X)
        if likelihood == "classification":
            p = torch.softmax(f, -1)
            lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
            self.stat = float(torch.log_softmax(f, -1).gather(1, y.view(-1, 1)).sum())
        else:
            lam = torch.eye(f.shape[1], dtype=DT).expand(f.shape[0], -1, -1)
            self.stat = float((y - f).square().sum())
        self.G = torch.einsum("ncp,ncd,ndq->pq", self.J, lam, self.J)
        self.theta = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
        self.N, self.C = f.shape

    def scale(self, sigma, T=1.0):
        return 1.0 / (sigma**2 * T) if self.likelihood == "regression" else 1.0 / T

    def marglik(self, d, sigma=1.0, T=1.0):
        d = torch.as_tensor(d, dtype=DT).expand(self.theta.numel())
        s = self.scale(sigma, T)
        if self.likelihood == "classification":
            loglik = self.stat / T
        else:
            loglik = -0.5 * s * self.stat - self.N * self.C * math.log(sigma * math.sqrt(2 * math.pi))
        logdet = torch.linalg.slogdet(s * self.G + torch.diag(d))[1] - d.log().sum()
        return float(loglik - 0.5 * (d * self.theta.square()).sum() - 0.5 * logdet)

    def predictive_cov(self, Xs, d, sigma=1.0, T=1.0):
        d = torch.as_tensor(d, dtype=DT).expand(self.theta.numel())
        Js = oracle_jacobian(self.model, Xs)
        cov = torch.linalg.inv(self.scale(sigma, T) * self.G + torch.diag(d))
        return Js @ cov @ Js.mT


def central_difference(fn, x: float, h: float) -> float:
    return (fn(x + h) - fn(x - h)) / (2 * h)


# --------------------------------------------------------------------------- evidence gradients
@pytest.mark.parametrize("form", ["weight", "function"])
def test_evidence_gradient_in_sigma_and_delta(form):
    """The reported case (δ = 0.5, σ = 0.3): autograd agrees with central differences."""
    model = model_for()
    X, y = data("regression")
    la = ExactLLA(model, "regression", 0.3, 0.5, form=form).fit(loader(X, y))
    delta = torch.tensor(0.5, dtype=DT, requires_grad=True)
    sigma = torch.tensor(0.3, dtype=DT, requires_grad=True)
    value = la.log_marginal_likelihood(delta, sigma)
    g_delta, g_sigma = torch.autograd.grad(value, [delta, sigma])
    fd_sigma = central_difference(lambda s: float(la.log_marginal_likelihood(0.5, s)), 0.3, 1e-5)
    fd_delta = central_difference(lambda d: float(la.log_marginal_likelihood(d, 0.3)), 0.5, 1e-5)
    assert abs(float(g_sigma) - fd_sigma) <= 1e-6 * abs(fd_sigma), (float(g_sigma), fd_sigma)
    assert abs(float(g_delta) - fd_delta) <= 1e-6 * abs(fd_delta), (float(g_delta), fd_delta)
    # the value itself against the written-out evidence
    oracle = Oracle(model, "regression", X, y)
    ref = oracle.marglik(0.5, 0.3)
    assert abs(float(value.detach()) - ref) <= REL * abs(ref)


@pytest.mark.parametrize("structure", ["layer", "parameter"])
@pytest.mark.parametrize("form", ["weight", "function"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_diagonal_prior_evidence_and_predictive(likelihood, form, structure):
    """Per-layer / per-parameter δ: evidence and covariance against the oracle with diag(δ);
    the evidence's gradient in δ against central differences."""
    model = model_for(n_out=3 if likelihood == "classification" else 2)
    X, y = data(likelihood, n_out=3 if likelihood == "classification" else 2)
    oracle = Oracle(model, likelihood, X, y)
    sizes = [p.numel() for p in model.parameters()]
    if structure == "layer":
        per = torch.tensor([0.3, 2.0, 0.7, 5.0], dtype=DT)
        diag = torch.repeat_interleave(per, torch.tensor(sizes))
    else:
        per = diag = torch.linspace(0.2, 4.0, sum(sizes), dtype=DT)
    sigma = 0.4 if likelihood == "regression" else 1.0
    la = ExactLLA(model, likelihood, sigma, per, form=form).fit(loader(X, y))
    assert la.fitted_form == form
    assert torch.equal(la.prior_precision, per)

    ref = oracle.marglik(diag, sigma)
    got = float(la.log_marginal_likelihood())
    assert abs(got - ref) <= REL * abs(ref), (got, ref)
    Xs = data(likelihood, n_out=3, N=4, seed=7)[0]
    _, cov = la.predictive_distribution(Xs)
    assert rel_err(cov, oracle.predictive_cov(Xs, diag, sigma)) < 1e-8

    d = per.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(la.log_marginal_likelihood(d), [d])
    for i in (0, len(per) - 1):
        def at(v, i=i):
            e = per.clone()
            e[i] = v
            return float(la.log_marginal_likelihood(e))

        fd = central_difference(at, float(per[i]), 1e-6)
        assert abs(float(grad[i]) - fd) <= 1e-6 * max(abs(fd), 1e-3), (i, float(grad[i]), fd)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_temperature_scales_ggn_and_loglik(likelihood):
    model = model_for()
    X, y = data(likelihood)
    oracle = Oracle(model, likelihood, X, y)
    sigma = 0.6 if likelihood == "regression" else 1.0
    la = ExactLLA(model, likelihood, sigma, 0.8, temperature=2.5).fit(loader(X, y))
    ref = oracle.marglik(0.8, sigma, T=2.5)
    assert abs(float(la.log_marginal_likelihood()) - ref) <= REL * abs(ref)
    Xs = data(likelihood, N=3, seed=5)[0]
    assert rel_err(la.predictive_distribution(Xs)[1], oracle.predictive_cov(Xs, 0.8, sigma, T=2.5)) < 1e-8
    with pytest.raises(ValueError, match="temperature"):
        ExactLLA(model, likelihood, temperature=0.0)


def test_scalla_evidence_gradient():
    model = model_for()
    X, y = data("regression")
    la = ScaLLA(model, "regression", 0.3, 0.5, n_features=6, seed=0)
    la.fit(loader(X, y), iterations=0, progress_bar=False)
    delta = torch.tensor(0.5, dtype=DT, requires_grad=True)
    sigma = torch.tensor(0.3, dtype=DT, requires_grad=True)
    g_delta, g_sigma = torch.autograd.grad(la.log_marginal_likelihood(delta, sigma), [delta, sigma])
    fd_sigma = central_difference(lambda s: float(la.log_marginal_likelihood(0.5, s)), 0.3, 1e-5)
    fd_delta = central_difference(lambda d: float(la.log_marginal_likelihood(d, 0.3)), 0.5, 1e-5)
    assert abs(float(g_sigma) - fd_sigma) <= 1e-6 * abs(fd_sigma)
    assert abs(float(g_delta) - fd_delta) <= 1e-6 * abs(fd_delta)
    with pytest.raises(ValueError, match="scalar prior_precision"):
        la.log_marginal_likelihood(torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match="ExactLLA"):
        ScaLLA(model, "regression", prior_precision=torch.ones(4))


def test_evidence_stores_tuned_hyper_parameters():
    """As in laplace-torch, values given to the evidence are stored (detached); a gradient loop
    leaves the tuned values in place and in the saved state."""
    model = model_for()
    X, y = data("regression")
    la = ExactLLA(model, "regression").fit(loader(X, y))
    log_d = torch.zeros((), dtype=DT, requires_grad=True)
    log_s = torch.zeros((), dtype=DT, requires_grad=True)
    opt = torch.optim.Adam([log_d, log_s], lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        (-la.log_marginal_likelihood(log_d.exp(), log_s.exp())).backward()
        opt.step()
    final_d, final_s = log_d.detach().exp(), log_s.detach().exp()
    la.log_marginal_likelihood(final_d, final_s)
    assert not la.prior_precision.requires_grad and not la.sigma_noise.requires_grad
    assert float(la.prior_precision) == float(final_d)
    assert float(la.sigma_noise) == float(final_s)
    state = la.state_dict()
    assert float(state["prior_precision"]) == float(final_d)
    assert float(state["sigma_noise"]) == float(final_s)
    # the tuned point beats the start (the gradient pointed somewhere useful)
    assert float(la.log_marginal_likelihood()) > float(la.log_marginal_likelihood(1.0, 1.0))


# --------------------------------------------------------------------------- validation
def test_hyper_parameters_checked_everywhere():
    """B9/B10: a zero, negative or non-finite δ or σ is refused where it enters, with one
    message style, and a refused value changes nothing."""
    model = model_for()
    X, y = data("regression")
    reg = ExactLLA(model, "regression", 0.5, 2.0).fit(loader(X, y))
    before = float(reg.log_marginal_likelihood())
    for bad in (-1.0, 0.0, float("nan"), float("inf"), torch.tensor([1.0, -1.0, 1.0, 1.0])):
        with pytest.raises(ValueError, match="prior_precision must be positive and finite"):
            reg.log_marginal_likelihood(prior_precision=bad)
        with pytest.raises(ValueError, match="prior_precision must be positive and finite"):
            reg.prior_precision = bad
        with pytest.raises(ValueError, match="prior_precision must be positive and finite"):
            ExactLLA(model, "regression", prior_precision=bad)
    for bad in (0.0, -0.3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma_noise must be positive and finite"):
            reg.log_marginal_likelihood(sigma_noise=bad)
        with pytest.raises(ValueError, match="sigma_noise must be positive and finite"):
            reg.sigma_noise = bad
        with pytest.raises(ValueError, match="sigma_noise must be positive and finite"):
            ScaLLA(model, "regression", sigma_noise=bad)
    for bad in ("1.0", None, True, torch.tensor([[1.0]])):
        with pytest.raises((TypeError, ValueError)):
            reg.prior_precision = bad
    with pytest.raises(ValueError, match="values"):  # neither per layer (4) nor per parameter
        reg.prior_precision = torch.ones(5)
    with pytest.raises(ValueError, match="single value"):
        reg.sigma_noise = torch.ones(2)
    assert float(reg.prior_precision) == 2.0 and float(reg.sigma_noise) == 0.5
    assert float(reg.log_marginal_likelihood()) == before

    clf = ExactLLA(model_for(), "classification").fit(loader(*data("classification")))
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        clf.prior_precision = 0.0
    probs = clf(X[:2])
    assert not torch.allclose(probs, torch.full_like(probs, 0.5))  # not the uniform answer
    with pytest.raises(ValueError, match="regression only"):
        clf.log_marginal_likelihood(sigma_noise=0.5)
    with pytest.raises(ValueError, match="regression only"):
        ExactLLA(model, "classification", 0.5)


def test_hyper_parameters_read_back_as_tensors():
    la = ExactLLA(model_for(), "regression", 0.5, 2.0)
    assert la.prior_precision.shape == (1,) and la.sigma_noise.shape == ()
    assert la.prior_precision.dtype == DT and la.sigma_noise.dtype == DT
    d = la.prior_precision
    d *= -1  # a copy: the estimator's value cannot be changed behind the check
    assert float(la.prior_precision) == 2.0
    la.prior_precision = torch.tensor(3.0)
    assert la.prior_precision.shape == (1,)
    P = la.n_params
    la.prior_precision = torch.full((P,), 0.5)
    assert la.prior_precision.shape == (P,)


def test_positional_order_and_laplace_torch_options():
    model = model_for()
    la = ExactLLA(model, "regression", 0.3, 0.5, 0.0, 2.0, False, "x", "t", None, None, None)
    assert float(la.sigma_noise) == 0.3 and float(la.prior_precision) == 0.5
    assert la.temperature == 2.0 and (la.dict_key_x, la.dict_key_y) == ("x", "t")
    s = ScaLLA(model, "regression", 0.3, 0.5, n_features=4)
    assert float(s.sigma_noise) == 0.3 and float(s.prior_precision) == 0.5 and s.n_features == 4
    with pytest.raises(TypeError):  # fastlla's own options are keyword-only
        ExactLLA(model, "regression", 1.0, 1.0, 0.0, 1.0, False, "x", "y", None, None, None, "weight")
    with pytest.raises(NotImplementedError, match="prior_mean"):
        ExactLLA(model, "regression", prior_mean=0.5)
    ExactLLA(model, "regression", prior_mean=torch.zeros(3))
    with pytest.raises(NotImplementedError, match="enable_backprop"):
        ScaLLA(model, "regression", enable_backprop=True)
    with pytest.warns(UserWarning, match="backend is ignored"):
        ExactLLA(model, "regression", backend=object)
    with pytest.warns(UserWarning, match="backend_kwargs is ignored"):
        ScaLLA(model, "regression", backend_kwargs={})


class KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = model_for()

    def forward(self, input_ids, attention_mask=None):
        return self.body(input_ids)


@pytest.mark.parametrize("key", ["labels", "target"])
def test_dict_batches(key):
    X, y = data("classification")
    net = KeywordNet()
    ref = ExactLLA(net, "classification").fit(loader(X, y))
    batches = [{"input_ids": X[i : i + 5], key: y[i : i + 5]} for i in range(0, 16, 5)]
    la = ExactLLA(net, "classification", dict_key_y=key).fit(batches)
    assert la.n_data == 16
    assert float(la.log_marginal_likelihood()) == pytest.approx(float(ref.log_marginal_likelihood()), rel=1e-12)
    with pytest.raises(ValueError, match="dict_key_y"):
        ExactLLA(net, "classification", dict_key_y="other").fit(batches)


# --------------------------------------------------------------------------- factory
def test_factory_structures():
    model = model_for()
    with pytest.raises(NotImplementedError) as err:
        Laplace(model, "classification")  # laplace-torch's default: last_layer + kron
    assert "hessian_structure='kron' is not implemented in fastlla; use hessian_structure='full'" in str(err.value)
    assert "'scalla'" in str(err.value)
    for structure in ("diag", "lowrank", "gp"):
        with pytest.raises(NotImplementedError, match=f"hessian_structure='{structure}'"):
            Laplace(model, "classification", "all", structure)
    with pytest.raises(ValueError, match="hessian_structure"):
        Laplace(model, "classification", "all", "dense")
    with pytest.raises(ValueError, match="subset_of_weights"):
        Laplace(model, "classification", "some", "full")
    with pytest.raises(ValueError, match="subset_of_weights='all'"):
        Laplace(model, "classification", "last_layer", "scalla")
    la = Laplace(model, "regression", "all", "full", 0.3, 0.5)
    assert isinstance(la, ExactLLA) and float(la.sigma_noise) == 0.3
    sc = Laplace(model, "regression", "all", "scalla", sigma_noise=0.3, n_features=4)
    assert isinstance(sc, ScaLLA) and sc.n_features == 4
    assert fastlla.Laplace is Laplace


def _last_layer_oracle(model, likelihood, X, y):
    frozen = copy.deepcopy(model)
    for name, p in frozen.named_parameters():
        p.requires_grad_(name.startswith("fc2."))
    return Oracle(frozen, likelihood, X, y)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_last_layer_matches_explicit_last_layer_ggn(likelihood):
    n_out = 3 if likelihood == "classification" else 2
    model = model_for(n_out=n_out)
    X, y = data(likelihood, n_out=n_out)
    sigma = 0.5 if likelihood == "regression" else 1.0
    la = Laplace(model, likelihood, "last_layer", "full", sigma_noise=sigma, prior_precision=0.7)
    la.fit(loader(X, y))
    assert la.last_layer_name == "fc2" and la.n_params == 6 * n_out
    oracle = _last_layer_oracle(model, likelihood, X, y)
    ref = oracle.marglik(0.7, sigma)
    assert abs(float(la.log_marginal_likelihood()) - ref) <= REL * abs(ref)
    Xs = data(likelihood, n_out=n_out, N=4, seed=3)[0]
    assert rel_err(la.predictive_distribution(Xs)[1], oracle.predictive_cov(Xs, 0.7, sigma)) < 1e-8
    # per-layer δ refers to the last layer's weight and bias
    la.prior_precision = torch.tensor([0.5, 3.0])
    diag = torch.cat([torch.full((5 * n_out,), 0.5), torch.full((n_out,), 3.0)]).double()
    ref = oracle.marglik(diag, sigma)
    assert abs(float(la.log_marginal_likelihood()) - ref) <= REL * abs(ref)
    # a saved last-layer state loads into a fresh estimator (which has not located the layer)
    other = Laplace(model, likelihood, "last_layer", "full", sigma_noise=sigma)
    other.load_state_dict(la.state_dict())
    assert float(other.log_marginal_likelihood()) == float(la.log_marginal_likelihood())


def test_last_layer_needs_a_linear_layer():
    class ConvLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.out = nn.Conv1d(1, 1, 3)

        def forward(self, x):
            return self.out(self.fc(x).unsqueeze(1)).squeeze(1)

    X, y = data("classification")
    la = Laplace(ConvLast().double(), "classification", "last_layer", "full")
    with pytest.raises(ValueError, match="not an nn.Linear"):
        la.fit(loader(X, y))
    la = Laplace(ConvLast().double(), "classification", "last_layer", "full", last_layer_name="fc")
    assert la.n_params == 16


def test_subnetwork_matches_selected_columns():
    model = model_for()
    X, y = data("regression")
    idx = torch.tensor([20, 3, 0, 17, 9, 26])
    la = Laplace(model, "regression", "subnetwork", "full", idx, 0.5, 0.8).fit(loader(X, y))
    assert la.n_params == 6 and float(la.sigma_noise) == 0.5
    full = Oracle(model, "regression", X, y)
    G = full.G[idx][:, idx]
    theta = full.theta[idx]
    s = 1 / 0.25
    logdet = torch.linalg.slogdet(s * G + 0.8 * torch.eye(6, dtype=DT))[1] - 6 * math.log(0.8)
    loglik = -0.5 * s * full.stat - full.N * full.C * math.log(0.5 * math.sqrt(2 * math.pi))
    ref = float(loglik - 0.5 * 0.8 * theta.square().sum() - 0.5 * logdet)
    assert abs(float(la.log_marginal_likelihood()) - ref) <= REL * abs(ref)
    Xs = data("regression", N=3, seed=4)[0]
    Js = oracle_jacobian(model, Xs)[..., idx]
    ref_cov = Js @ torch.linalg.inv(s * G + 0.8 * torch.eye(6, dtype=DT)) @ Js.mT
    assert rel_err(la.predictive_distribution(Xs)[1], ref_cov) < 1e-8
    for bad in (torch.tensor([0, 0]), torch.tensor([-1]), torch.tensor([1000]), torch.tensor([0.5])):
        with pytest.raises(ValueError, match="subnetwork_indices"):
            Laplace(model, "regression", "subnetwork", "full", subnetwork_indices=bad)
    with pytest.raises(ValueError, match="subnetwork_indices"):
        Laplace(model, "regression", "subnetwork", "full")


# --------------------------------------------------------------------------- optimize_prior_precision
def test_optimize_prior_precision_laplace_torch_keywords():
    model = model_for(n_out=3)
    X, y = data("classification", n_out=3)
    Xv, yv = data("classification", n_out=3, seed=9)
    la = ExactLLA(model, "classification").fit(loader(X, y))
    grid = torch.logspace(-2, 2, 9, dtype=DT).tolist()
    d = la.optimize_prior_precision(
        method="gridsearch", pred_type="glm", val_loader=loader(Xv, yv),
        log_prior_prec_min=-2, log_prior_prec_max=2, grid_size=9, link_approx="probit",
    )  # fmt: skip
    assert min(abs(d - g) for g in grid) <= 1e-12 * d

    def nll(probs, targets):  # laplace-torch's offline loss: the whole set at once
        return -probs.gather(1, targets.view(-1, 1)).log().sum()

    d_loss = la.optimize_prior_precision("gridsearch", val_loader=loader(Xv, yv), grid=grid, loss=nll)
    assert d_loss == pytest.approx(d, rel=1e-12)

    class Metric:  # torchmetrics-style running loss
        def reset(self):
            self.total = 0.0

        def update(self, probs, targets):
            self.total += float(nll(probs, targets))

        def compute(self):
            return torch.tensor(self.total)

    d_metric = la.optimize_prior_precision("gridsearch", val_loader=loader(Xv, yv), grid=grid, loss=Metric())
    assert d_metric == pytest.approx(d, rel=1e-12)

    with pytest.raises(ValueError, match="pred_type"):
        la.optimize_prior_precision(pred_type="nn")
    with pytest.raises(ValueError, match="prior_structure"):
        la.optimize_prior_precision(prior_structure="blocks")
    with pytest.warns(UserWarning, match="val_loader is ignored"):
        la.optimize_prior_precision(method="marglik", val_loader=loader(Xv, yv))


@pytest.mark.parametrize("structure", ["layerwise", "diag"])
def test_marglik_adam_structures(structure):
    """laplace-torch's Adam tuning of a per-layer / per-parameter δ: at its result the evidence
    is at least the scalar optimum's (a superset of priors) and its gradient is small."""
    model = model_for()
    X, y = data("regression")
    la = ExactLLA(model, "regression", 0.5).fit(loader(X, y))
    scalar = la.optimize_prior_precision("marglik")
    best_scalar = float(la.log_marginal_likelihood(scalar))
    d = la.optimize_prior_precision("marglik", prior_structure=structure, n_steps=400, lr=0.1)
    n = 4 if structure == "layerwise" else la.n_params
    assert isinstance(d, torch.Tensor) and d.shape == (n,)
    assert torch.equal(la.prior_precision, d)
    assert float(la.log_marginal_likelihood()) >= best_scalar - 1e-6
    log_d = d.log().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(la.log_marginal_likelihood(log_d.exp()), [log_d])
    assert float(g.abs().max()) < 0.05
    sc = ScaLLA(model, "regression", n_features=4).fit(loader(X, y), iterations=0, progress_bar=False)
    with pytest.raises(ValueError, match="ExactLLA"):
        sc.optimize_prior_precision("marglik", prior_structure="diag")
    assert float(sc.prior_precision) == 1.0


# --------------------------------------------------------------------------- laplace-torch
def _laplace_torch():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("laplace")


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_matches_laplace_torch_full(likelihood):
    lt = _laplace_torch()
    model = model_for()
    X, y = data(likelihood)
    sigma = 0.3 if likelihood == "regression" else 1.0
    ours = ExactLLA(model, likelihood, sigma, 0.5).fit(loader(X, y))
    theirs = lt.Laplace(model, likelihood, "all", "full", sigma_noise=sigma, prior_precision=0.5)
    theirs.fit(loader(X, y))
    kw = dict(dtype=DT, requires_grad=True)
    d1, s1, d2, s2 = (torch.tensor(v, **kw) for v in (0.5, sigma, 0.5, sigma))
    if likelihood == "regression":
        a, b = ours.log_marginal_likelihood(d1, s1), theirs.log_marginal_likelihood(d2, s2)
        grads = torch.autograd.grad(a, [d1, s1]), torch.autograd.grad(b, [d2, s2])
    else:
        a, b = ours.log_marginal_likelihood(d1), theirs.log_marginal_likelihood(d2)
        grads = torch.autograd.grad(a, [d1]), torch.autograd.grad(b, [d2])
    a, b = float(a.detach()), float(b.detach())
    assert abs(a - b) <= 1e-8 * abs(b)
    for g_ours, g_theirs in zip(*grads):
        assert abs(float(g_ours) - float(g_theirs)) <= 1e-7 * abs(float(g_theirs))
    # per-layer δ
    per = torch.tensor([0.3, 2.0, 0.7, 5.0], dtype=DT)
    a = float(ours.log_marginal_likelihood(per))
    b = float(theirs.log_marginal_likelihood(per.clone()).detach())
    assert abs(a - b) <= 1e-8 * abs(b)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_matches_laplace_torch_last_layer(likelihood):
    lt = _laplace_torch()
    model = model_for(n_out=3)
    X, y = data(likelihood, n_out=3)
    sigma = 0.4 if likelihood == "regression" else 1.0
    ours = Laplace(model, likelihood, "last_layer", "full", sigma_noise=sigma, prior_precision=0.7)
    ours.fit(loader(X, y))
    theirs = lt.Laplace(
        copy.deepcopy(model), likelihood, "last_layer", "full", sigma_noise=sigma, prior_precision=0.7
    )
    theirs.fit(loader(X, y))
    a, b = float(ours.log_marginal_likelihood()), float(theirs.log_marginal_likelihood())
    assert abs(a - b) <= 1e-8 * abs(b)
    Xs = data(likelihood, n_out=3, N=4, seed=3)[0]
    cov = ours.predictive_distribution(Xs)[1]
    if likelihood == "regression":
        _, f_var = theirs(Xs, pred_type="glm")
    else:
        f_var = theirs._glm_predictive_distribution(Xs)[1]
    # laplace-torch forms the covariance from an inverse square root of the precision
    # (a few more roundings than fastlla's triangular solve): float64 agreement to 1e-6
    assert rel_err(cov, f_var) < 1e-6
    if likelihood == "classification":  # the links on that covariance, laplace-torch's formulas
        for link in ("probit", "bridge", "bridge_norm"):
            p_ours = ours(Xs, link_approx=link)
            p_theirs = theirs(Xs, pred_type="glm", link_approx=link)
            assert rel_err(p_ours, p_theirs) < 1e-6, link


@pytest.mark.parametrize("estimator", ["ExactLLA", "ScaLLA"])
def test_state_dict_loads_with_weights_only(estimator):
    """``torch.load(..., weights_only=True)`` (torch's default) reads a saved state_dict: it
    holds plain tensors, numbers, strings and containers only; the reloaded estimator predicts
    the same probabilities."""
    import io

    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 4, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    loader = [(X[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))

    def make(m):
        if estimator == "ExactLLA":
            return fastlla.ExactLLA(m, "classification")
        return fastlla.ScaLLA(m, "classification", n_features=8)

    m = model()
    la = make(m)
    if estimator == "ExactLLA":
        la.fit(loader)
    else:
        la.fit(loader, iterations=3, progress_bar=False)
    buf = io.BytesIO()
    torch.save(la.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    again = make(m)
    again.load_state_dict(state)
    assert torch.equal(again(X[:5]), la(X[:5]))


# =========================================================================== predictions, samples,
# posterior properties (laplace-torch's API): oracles first, laplace-torch itself further below
def _diag_of(per_layer, model):
    sizes = torch.tensor([p.numel() for p in model.parameters()])
    return torch.repeat_interleave(per_layer, sizes)


def _tol(precision: torch.Tensor) -> float:
    """float64 tolerance for quantities through ``precision``'s inverse: ε·P·cond."""
    P = precision.shape[0]
    return eps_tolerance(DT, P, float(torch.linalg.cond(precision)))


@pytest.mark.parametrize("prior", ["scalar", "layer"])
@pytest.mark.parametrize("form", ["weight", "function"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_predictive_options_and_posterior_against_explicit_jacobians(likelihood, form, prior):
    """``diagonal_output``, ``joint``, ``functional_variance/covariance``, ``jacobians`` and the
    posterior properties, against the GGN, precision and Jacobians written out."""
    n_out = 3 if likelihood == "classification" else 2
    model = model_for(n_out=n_out)
    X, y = data(likelihood, n_out=n_out)
    oracle = Oracle(model, likelihood, X, y)
    sigma = 0.4 if likelihood == "regression" else 1.0
    delta = 0.7 if prior == "scalar" else torch.tensor([0.3, 2.0, 0.7, 5.0], dtype=DT)
    diag = torch.as_tensor(delta, dtype=DT).expand(oracle.theta.numel()) if prior == "scalar" else (
        _diag_of(delta, model)
    )
    la = ExactLLA(model, likelihood, sigma, delta, form=form).fit(loader(X, y))
    s = oracle.scale(sigma)
    precision = s * oracle.G + torch.diag(diag)
    cov = torch.linalg.inv(precision)
    tol = _tol(precision)

    Xs = data(likelihood, n_out=n_out, N=4, seed=7)[0]
    Js = oracle_jacobian(model, Xs)  # (4, C, P)
    f = model(Xs).detach()
    per_input = Js @ cov @ Js.mT
    joint = Js.reshape(-1, Js.shape[-1]) @ cov @ Js.reshape(-1, Js.shape[-1]).mT

    mean, var = la.predictive_distribution(Xs, diagonal_output=True)
    assert var.shape == (4, n_out) and torch.equal(mean, f)
    assert rel_err(var, torch.diagonal(per_input, dim1=-2, dim2=-1)) < tol
    flat, jcov = la.predictive_distribution(Xs, joint=True)
    assert flat.shape == (4 * n_out,) and jcov.shape == (4 * n_out, 4 * n_out)
    assert torch.equal(flat, f.reshape(-1))
    assert rel_err(jcov, joint) < tol
    assert rel_err(jcov[n_out:2 * n_out, :n_out], joint[n_out:2 * n_out, :n_out]) < tol  # across inputs
    assert rel_err(la.functional_variance(Js), per_input) < tol
    assert rel_err(la.functional_covariance(Js), joint) < tol
    J_ours, f_ours = la.jacobians(Xs)
    assert rel_err(J_ours, Js) < 1e-12 and torch.equal(f_ours, f)
    with pytest.raises(ValueError, match="Js must be"):
        la.functional_variance(Js[..., :-1])

    if likelihood == "regression":
        m, v = la(Xs, diagonal_output=True)
        assert v.shape == (4, n_out) and rel_err(v, var) < 1e-14
        m, v = la(Xs, diagonal_output=True, include_noise=True)
        assert rel_err(v, var + sigma**2) < 1e-14
        m, c = la(Xs, joint=True)
        assert m.shape == (4 * n_out,) and rel_err(c, joint) < tol
        with pytest.raises(ValueError, match="exclude"):
            la(Xs, joint=True, diagonal_output=True)
    else:
        with pytest.raises(ValueError, match="joint=True is a regression"):
            la(Xs, joint=True)
        probit = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * torch.diagonal(per_input, dim1=-2, dim2=-1)), -1)
        assert rel_err(la(Xs, diagonal_output=True), probit) < tol

    # laplace-torch's posterior properties
    assert la.n_params == oracle.theta.numel()
    assert torch.equal(la.mean, oracle.theta)
    assert rel_err(la.posterior_precision, precision) < 1e-12
    assert rel_err(la.posterior_covariance, cov) < tol
    S = la.posterior_scale
    assert torch.equal(S, torch.tril(S)) and rel_err(S @ S.mT, cov) < tol
    logdet_post = torch.linalg.slogdet(precision)[1]
    assert abs(float(la.log_det_posterior_precision) - float(logdet_post)) < tol * abs(float(logdet_post))
    assert abs(float(la.log_det_prior_precision) - float(diag.log().sum())) < 1e-12 * float(diag.log().abs().sum())
    ratio = float(logdet_post - diag.log().sum())
    assert abs(float(la.log_det_ratio) - ratio) < tol * abs(ratio)
    assert abs(float(la.scatter) - float((diag * oracle.theta.square()).sum())) < 1e-12 * float(la.scatter)
    value = oracle.theta + 0.05 * torch.linspace(-1, 1, oracle.theta.numel(), dtype=DT)
    ref = torch.distributions.MultivariateNormal(oracle.theta, precision_matrix=precision).log_prob(value)
    assert abs(float(la.log_prob(value)) - float(ref)) < tol * abs(float(ref))
    # the same value read as laplace-torch's property and called as fastlla's method
    assert float(la.log_det_ratio()) == float(la.log_det_ratio)
    assert float(la.log_likelihood) == float(la.log_likelihood())
    assert type(la.log_det_ratio + 0.0) is torch.Tensor


@pytest.mark.parametrize("prior", ["scalar", "layer"])
@pytest.mark.parametrize("form", ["weight", "function"])
def test_weight_samples_have_the_posterior_covariance(form, prior):
    """``sample``: weight space draws ``θ* + Sε`` (``S`` the posterior scale, ``ε`` from the
    generator); function space maps standard normals linearly (Matheron's rule) with the map's
    ``AAᵀ`` the posterior covariance written out."""
    model = model_for(n_out=3)
    X, y = data("classification", n_out=3)
    oracle = Oracle(model, "classification", X, y)
    delta = 0.6 if prior == "scalar" else torch.tensor([0.3, 2.0, 0.7, 5.0], dtype=DT)
    diag = torch.as_tensor(delta, dtype=DT).expand(oracle.theta.numel()) if prior == "scalar" else (
        _diag_of(delta, model)
    )
    la = ExactLLA(model, "classification", 1.0, delta, form=form).fit(loader(X, y))
    precision = oracle.G + torch.diag(diag)
    cov = torch.linalg.inv(precision)
    tol = _tol(precision)
    P = oracle.theta.numel()
    draws = la.sample(5, generator=torch.Generator().manual_seed(4))
    assert draws.shape == (5, P)
    if form == "weight":
        eps = torch.randn(5, P, generator=torch.Generator().manual_seed(4), dtype=DT)
        assert rel_err(draws, oracle.theta + eps @ la.posterior_scale.mT) < 1e-14
    else:
        A = la._function_space_draws(torch.eye(P + la._jhat.shape[0], dtype=DT))  # rows: Aᵀ
        assert rel_err(A.mT @ A, cov) < tol
        assert torch.equal(draws, la.sample(5, generator=torch.Generator().manual_seed(4)))


class _Subset(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = model_for(n_out=3)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("subset", ["all", "last_layer", "subnetwork"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_nn_predictive_runs_the_network_at_sampled_weights(likelihood, subset):
    """``pred_type="nn"``: the network itself at :meth:`sample`'s weights (the others held),
    against the model evaluated at those weights with ``vector_to_parameters`` on a copy; the
    user's model is left untouched."""
    model = model_for(n_out=3)
    X, y = data(likelihood, n_out=3)
    kw = {}
    if subset == "subnetwork":
        kw["subnetwork_indices"] = torch.tensor([0, 4, 7, 20, 31, 33])
    la = Laplace(model, likelihood, subset, "full", 0.5 if likelihood == "regression" else 1.0, 0.8, **kw)
    la.fit(loader(X, y))
    before = [p.detach().clone() for p in model.parameters()]
    Xs = data(likelihood, n_out=3, N=4, seed=7)[0]
    fs = la.functional_samples(Xs, "nn", n_samples=6, generator=torch.Generator().manual_seed(2))
    thetas = la.sample(6, generator=torch.Generator().manual_seed(2))
    ref = []
    for theta in thetas:
        copy_ = copy.deepcopy(model)
        flat = torch.nn.utils.parameters_to_vector(copy_.parameters()).detach()
        if subset == "all":
            flat = theta
        elif subset == "last_layer":
            flat = torch.cat([flat[: -theta.numel()], theta])
        else:
            flat[kw["subnetwork_indices"]] = theta
        torch.nn.utils.vector_to_parameters(flat, copy_.parameters())
        ref.append(copy_(Xs).detach())
    ref = torch.stack(ref)
    assert fs.shape == (6, 4, 3) and rel_err(fs, ref) < 1e-14
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    ps = la.predictive_samples(Xs, "nn", n_samples=6, generator=g())
    out = la(Xs, pred_type="nn", link_approx="mc", n_samples=6, generator=g())
    if likelihood == "classification":
        assert rel_err(ps, torch.softmax(ref, -1)) < 1e-14
        assert rel_err(out, torch.softmax(ref, -1).mean(0)) < 1e-14
    else:
        assert torch.equal(ps, fs)
        assert rel_err(out[0], ref.mean(0)) < 1e-14 and rel_err(out[1], ref.var(0)) < 1e-14
        with pytest.raises(ValueError, match="n_samples >= 2"):
            la(Xs, pred_type="nn", link_approx="mc", n_samples=1)
    with pytest.raises(ValueError, match="link_approx='mc'"):
        la(Xs, pred_type="nn")
    with pytest.raises(ValueError, match="pred_type"):
        la(Xs, pred_type="sampling")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    la.predictive_distribution(Xs)  # the fit still belongs to the model: nothing was written


def test_sampling_leaves_global_rng_alone_and_generators_reproduce():
    model = model_for(n_out=3)
    X, y = data("classification", n_out=3)
    Xs = X[:4]
    ex = ExactLLA(model, "classification", prior_precision=0.8).fit(loader(X, y))
    sc = ScaLLA(model, "classification", n_features=5, seed=0).fit(loader(X, y), iterations=3, progress_bar=False)
    state = torch.get_rng_state()
    for la in (ex, sc):
        a = la.functional_samples(Xs, n_samples=4)
        b = la.functional_samples(Xs, n_samples=4)
        assert not torch.equal(a, b)  # the estimator's own generator advances
        g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        assert torch.equal(la.predictive_samples(Xs, "nn", 4, generator=g1),
                           la.predictive_samples(Xs, "nn", 4, generator=g2))  # fmt: skip
        p1 = la(Xs, pred_type="nn", link_approx="mc", n_samples=8)
        assert torch.equal(p1, la(Xs, pred_type="nn", link_approx="mc", n_samples=8))  # seeded
        assert not torch.equal(p1, la(Xs, pred_type="nn", link_approx="mc", n_samples=8, seed=1))
        la(Xs, link_approx="mc", n_samples=8, diagonal_output=True)
        la(Xs, link_approx="mc", n_samples=8, generator=torch.Generator().manual_seed(1))
        with pytest.raises(TypeError, match="torch.Generator"):
            la.functional_samples(Xs, generator=3)
        with pytest.raises(ValueError, match="n_samples"):
            la.functional_samples(Xs, n_samples=0)
    ex.sample(3)
    assert torch.equal(torch.get_rng_state(), state)
    empty = Xs[:0]  # a batch of no inputs: empty results, the network not run
    for la in (ex, sc):
        assert la.functional_samples(empty, "nn", 3).shape == (3, 0, 3)
        assert la.predictive_distribution(empty, joint=True)[1].shape == (0, 0)
        assert la.predictive_distribution(empty, diagonal_output=True)[1].shape == (0, 3)
        assert la.jacobians(empty)[0].shape == (0, 3, la.n_params)
    with pytest.raises(NotImplementedError, match="functional_samples"):
        sc.sample(3)
    # ScaLLA's "nn" is its GLM draws (no weight-space posterior)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sc.functional_samples(Xs, "nn", 5, generator=g1), sc.functional_samples(Xs, "glm", 5, generator=g2))


def test_glm_samples_are_the_predictive_gaussian():
    """``functional_samples(glm)``: ``f + Lε`` per input with ``LLᵀ = Σ(x)`` and ``ε`` drawn as
    (B, C, S) from the generator; ``diagonal_output`` scales by the standard deviations only."""
    model = model_for(n_out=3)
    X, y = data("classification", n_out=3)
    la = ExactLLA(model, "classification", prior_precision=0.8).fit(loader(X, y))
    Xs = X[:4]
    f, cov = la.predictive_distribution(Xs)
    eps = torch.randn(4, 3, 7, generator=torch.Generator().manual_seed(5), dtype=DT)
    got = la.functional_samples(Xs, n_samples=7, generator=torch.Generator().manual_seed(5))
    ref = (f.unsqueeze(-1) + torch.linalg.cholesky(cov) @ eps).permute(2, 0, 1)
    assert rel_err(got, ref) < 1e-13
    got = la.functional_samples(Xs, n_samples=7, diagonal_output=True, generator=torch.Generator().manual_seed(5))
    std = torch.diagonal(cov, dim1=-2, dim2=-1).sqrt()
    assert rel_err(got, (f.unsqueeze(-1) + std.unsqueeze(-1) * eps).permute(2, 0, 1)) < 1e-13


@pytest.mark.parametrize("estimator", ["exact-weight", "exact-function", "scalla", "scalla-head"])
def test_diagonal_output_forms_no_output_block(estimator, monkeypatch):
    """The variance path computes row sums of squares: with every covariance routine that forms
    ``C×C`` blocks made to fail, ``diagonal_output=True`` still answers (C = 64) and equals the
    diagonal of the covariance (ScaLLA's residual head included: its factor ``R(x)`` is read,
    ``RRᵀ`` is not formed)."""
    C = 64
    model = MLP(n_out=C).double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, generator=g, dtype=DT)
    y = torch.randint(0, C, (6,), generator=g)
    if estimator.startswith("scalla"):
        residual = "head" if estimator == "scalla-head" else False
        la = ScaLLA(model, "classification", n_features=8, residual_variance=residual)
        la.fit(loader(X, y), iterations=2, progress_bar=False)
        assert la.residual_mode == residual
    else:
        la = ExactLLA(model, "classification", form=estimator.split("-")[1]).fit(loader(X, y))
    ref = torch.diagonal(la.predictive_distribution(X[:3])[1], dim1=-2, dim2=-1)

    def forbidden(*args, **kwargs):
        raise AssertionError("a C×C block was formed")

    from fastlla import _ops, posterior

    monkeypatch.setattr(_ops, "predictive_covariance", forbidden)
    monkeypatch.setattr(posterior.FeaturePosterior, "covariance", forbidden)
    monkeypatch.setattr(type(la), "_covariance_from_features", forbidden)
    if estimator == "scalla-head":
        assert float(torch.diagonal(la._residual_block(X[:3], None, "head"), dim1=-2, dim2=-1).abs().max()) > 0
    matmul = torch.Tensor.__matmul__

    def no_block(a, b):  # nor any product with a C×C result (J D⁻¹ Jᵀ, VᵀV)
        out = matmul(a, b)
        if out.dim() >= 2 and tuple(out.shape[-2:]) == (C, C):
            raise AssertionError("a C×C block was formed")
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", no_block)
    _, var = la.predictive_distribution(X[:3], diagonal_output=True)
    assert var.shape == (3, C) and rel_err(var, ref) < 1e-12


def test_scalla_posterior_lives_in_feature_space():
    """ScaLLA's laplace-torch properties are those of its ``M``-dimensional feature posterior:
    ``sH + δI``, its log-determinants, zero mean; ``jacobians`` are the features ``g(x)ᵀ``;
    ``joint`` has the per-input covariances (residual correction included) as diagonal blocks
    and ``g_bᵀ A⁻¹ g_b'`` off them."""
    model = model_for(n_out=3)
    X, y = data("classification", n_out=3)
    la = ScaLLA(model, "classification", prior_precision=0.9, n_features=5, seed=0)
    la.fit(loader(X, y), iterations=20, progress_bar=False)
    assert la.residual_mode == "head"  # so the residual correction is exercised
    M = la.n_features
    assert la.n_params == M and torch.equal(la.mean, torch.zeros(M, dtype=DT))
    H = la.posterior.H
    A = H + 0.9 * torch.eye(M, dtype=DT)
    assert rel_err(la.posterior_precision, A) < 1e-15
    tol = _tol(A)
    assert rel_err(la.posterior_covariance, torch.linalg.inv(A)) < tol
    assert abs(float(la.log_det_prior_precision) - M * math.log(0.9)) < 1e-12
    ref = float(torch.linalg.slogdet(A)[1])
    assert abs(float(la.log_det_posterior_precision) - ref) < tol * abs(ref)
    theta2 = sum(float(p.detach().square().sum()) for p in model.parameters())
    assert abs(float(la.scatter) - 0.9 * theta2) < 1e-12 * 0.9 * theta2
    Xs = X[:4]
    f, cov = la.predictive_distribution(Xs)
    Js, f2 = la.jacobians(Xs)
    assert Js.shape == (4, 3, M) and torch.equal(f, f2)
    feature_cov = Js @ torch.linalg.inv(A) @ Js.mT
    assert rel_err(la.functional_variance(Js), feature_cov) < tol
    _, var = la.predictive_distribution(Xs, diagonal_output=True)
    assert rel_err(var, torch.diagonal(cov, dim1=-2, dim2=-1)) < tol
    _, joint = la.predictive_distribution(Xs, joint=True)
    for b in range(4):
        assert rel_err(joint[3 * b:3 * b + 3, 3 * b:3 * b + 3], cov[b]) < tol
    flat = Js.reshape(12, M)
    off = (flat @ torch.linalg.inv(A) @ flat.mT)[3:6, :3]
    assert rel_err(joint[3:6, :3], off) < tol
    assert rel_err(la.functional_covariance(Js), flat @ torch.linalg.inv(A) @ flat.mT) < tol


@pytest.mark.parametrize("form", ["weight", "function"])
def test_fit_override_false_accumulates(form):
    """laplace-torch's ``fit(loader, override=False)``: the second loader's data join the first's
    — the same GGN, evidence and predictive as one fit over both; a failed accumulation changes
    nothing."""
    model = model_for(n_out=3)
    X, y = data("classification", n_out=3, N=20)
    one = ExactLLA(model, "classification", prior_precision=0.5, form=form).fit(loader(X, y))
    la = ExactLLA(model, "classification", prior_precision=0.5, form=form)
    la.fit(loader(X[:12], y[:12]), override=False)  # no earlier fit: a plain fit
    la.fit(loader(X[12:], y[12:]), override=False)
    assert la.n_data == 20 and la.fitted_form == form
    a, b = float(la.log_marginal_likelihood()), float(one.log_marginal_likelihood())
    assert abs(a - b) <= REL * abs(b)
    assert rel_err(la.posterior_precision, one.posterior_precision) < 1e-13
    assert rel_err(la.predictive_distribution(X[:3])[1], one.predictive_distribution(X[:3])[1]) < 1e-10
    before = (la.n_data, float(la.log_marginal_likelihood()))
    bad = X[:5].clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        la.fit([(X[:5], y[:5]), (bad, y[:5])], override=False)
    assert (la.n_data, float(la.log_marginal_likelihood())) == before
    la.fit(loader(X[12:], y[12:]))  # override=True (laplace-torch's default): a new fit
    assert la.n_data == 8


def test_scalla_fit_override_false_is_update():
    model = model_for(n_out=3)
    X, y = data("classification", n_out=3, N=20)
    la = ScaLLA(model, "classification", n_features=5, seed=0)
    la.fit(loader(X[:12], y[:12]), iterations=5, progress_bar=False)
    twin = copy.deepcopy(la)
    twin.update(loader(X[12:], y[12:]))
    la.fit(loader(X[12:], y[12:]), override=False, progress_bar=False)
    assert la.n_data == twin.n_data == 20
    assert torch.equal(la.posterior.H, twin.posterior.H)
    with pytest.raises(TypeError, match="override="):
        la.fit(loader(X, y), False)


# --------------------------------------------------------------------------- reward modelling
class RewardNet(nn.Module):
    """laplace-torch's reward-model convention: ``(B, 2, d)`` pairs → ``(B, 2)``, ``(B, d)`` → ``(B, 1)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, x):
        if x.dim() == 3:
            B, K, D = x.shape
            return self.f(x.reshape(-1, D)).reshape(B, K)
        return self.f(x)


def _pairs(N=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 2, 3, generator=g, dtype=DT), torch.randint(0, 2, (N,), generator=g)


@pytest.mark.parametrize("form", ["weight", "function"])
def test_reward_modeling_against_explicit_jacobians(form):
    """Fitted as classification over pairs (softmax GGN of the pair logits), predicted as a
    noise-free regression of the reward (Jacobians of single inputs); ``fitting=True`` gives the
    pair classification."""
    model = RewardNet().double()
    Xp, yp = _pairs()
    la = Laplace(model, "reward_modeling", "all", "full", prior_precision=0.5, form=form)
    la.fit(loader(Xp, yp))
    assert la.reward_modeling and la.likelihood.value == "classification"
    oracle = Oracle(model, "classification", Xp, yp)
    ref = oracle.marglik(0.5)
    assert abs(float(la.log_marginal_likelihood()) - ref) <= REL * abs(ref)
    precision = oracle.G + 0.5 * torch.eye(oracle.theta.numel(), dtype=DT)
    tol = _tol(precision)
    Xs = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    Js = oracle_jacobian(model, Xs)  # (4, 1, P)
    mean, var = la(Xs)
    assert mean.shape == (4, 1) and var.shape == (4, 1, 1)
    assert torch.equal(mean, model(Xs).detach())
    assert rel_err(var, Js @ torch.linalg.inv(precision) @ Js.mT) < tol
    assert la(Xs, diagonal_output=True)[1].shape == (4, 1)
    assert la.predictive_samples(Xs, n_samples=3).shape == (3, 4, 1)  # rewards, no softmax
    probs = la(Xp[:3], fitting=True)
    f, cov = la.predictive_distribution(Xp[:3], fitting=True)
    assert probs.shape == (3, 2) and rel_err(probs, fastlla.predictive.probit(f, cov)) < 1e-15
    state = la.state_dict()
    assert state["likelihood"] == "reward_modeling"
    with pytest.raises(ValueError, match="reward_modeling"):
        ExactLLA(model, "classification").load_state_dict(state)
    with pytest.raises(NotImplementedError, match="reward_modeling"):
        ScaLLA(model, "reward_modeling")


# --------------------------------------------------------------------------- against laplace-torch
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_sampling_predictive_options_and_properties_match_laplace_torch(likelihood):
    """laplace-torch's own ``FullLaplace`` given fastlla's GGN (its curvlinops GGN agrees to
    ~1e-8, checked in test_matches_laplace_torch_full): every quantity downstream — properties,
    weight samples with the same generator, ``"nn"`` draws, joint and diagonal predictives,
    ``functional_variance/covariance``, one-input GLM draws — agrees to 1e-10 (float64)."""
    lt = _laplace_torch()
    model = model_for()
    X, y = data(likelihood)
    sigma = 0.3 if likelihood == "regression" else 1.0
    ours = ExactLLA(model, likelihood, sigma, 0.5).fit(loader(X, y))
    theirs = lt.Laplace(copy.deepcopy(model), likelihood, "all", "full", sigma_noise=sigma, prior_precision=0.5)
    theirs.fit(loader(X, y))
    assert rel_err(ours._posterior_ggn(), theirs.H) < 1e-7
    theirs.H = ours._posterior_ggn().clone()
    tol = 1e-10
    for name in (
        "posterior_precision", "posterior_covariance", "posterior_scale", "log_det_ratio",
        "log_det_prior_precision", "log_det_posterior_precision", "scatter", "mean", "log_likelihood",
        "prior_precision_diag",
    ):  # fmt: skip
        assert rel_err(getattr(ours, name), getattr(theirs, name).detach()) < tol, name
    assert ours.n_params == theirs.n_params
    value = ours.mean + 0.1 * torch.linspace(-1, 1, ours.n_params, dtype=DT)
    assert rel_err(ours.square_norm(value), theirs.square_norm(value)) < tol
    for normalized in (True, False):
        assert rel_err(ours.log_prob(value, normalized), theirs.log_prob(value, normalized)) < tol

    def gens():
        return torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)

    g1, g2 = gens()
    assert rel_err(ours.sample(7, generator=g1), theirs.sample(7, generator=g2)) < tol
    Xs = X[:3]
    Js, _ = theirs.backend.jacobians(Xs)
    assert rel_err(ours.functional_variance(Js), theirs.functional_variance(Js)) < tol
    assert rel_err(ours.functional_covariance(Js), theirs.functional_covariance(Js)) < tol
    g1, g2 = gens()  # one input: the same standard normals
    assert rel_err(ours.functional_samples(Xs[:1], n_samples=6, generator=g1),
                   theirs.functional_samples(Xs[:1], n_samples=6, generator=g2)) < tol  # fmt: skip
    for method in ("functional_samples", "predictive_samples"):
        g1, g2 = gens()
        a = getattr(ours, method)(Xs, "nn", n_samples=6, generator=g1)
        b = getattr(theirs, method)(Xs, "nn", n_samples=6, generator=g2)
        assert rel_err(a, b) < tol, method
    with torch.random.fork_rng():  # laplace-torch's "nn" predictive draws from the global RNG
        torch.manual_seed(3)
        b = theirs(Xs, pred_type="nn", link_approx="mc", n_samples=20)
    a = ours(Xs, pred_type="nn", link_approx="mc", n_samples=20, generator=torch.Generator().manual_seed(3))
    if likelihood == "regression":
        assert rel_err(a[0], b[0]) < tol and rel_err(a[1], b[1]) < tol
        for kw in ({"joint": True}, {"diagonal_output": True}, {}):
            a, b = ours(Xs, **kw), theirs(Xs, pred_type="glm", **kw)
            assert a[1].shape == b[1].shape and rel_err(a[0], b[0]) < tol and rel_err(a[1], b[1]) < tol, kw
    else:
        assert rel_err(a, b) < tol
        with torch.random.fork_rng():
            torch.manual_seed(5)
            b = theirs(Xs[:1], pred_type="glm", link_approx="mc", n_samples=30, diagonal_output=True)
        a = ours(Xs[:1], link_approx="mc", n_samples=30, diagonal_output=True,
                 generator=torch.Generator().manual_seed(5))  # fmt: skip
        assert rel_err(a, b) < tol


def test_reward_modeling_matches_laplace_torch():
    lt = _laplace_torch()
    model = RewardNet().double()
    Xp, yp = _pairs()
    ours = Laplace(model, "reward_modeling", "all", "full", prior_precision=0.5).fit(loader(Xp, yp))
    theirs = lt.Laplace(copy.deepcopy(model), "reward_modeling", "all", "full", prior_precision=0.5)
    theirs.fit(loader(Xp, yp))
    a, b = float(ours.log_marginal_likelihood()), float(theirs.log_marginal_likelihood())
    assert abs(a - b) <= 1e-7 * abs(b)
    theirs.H = ours._posterior_ggn().clone()
    Xs = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    (m1, v1), (m2, v2) = ours(Xs), theirs(Xs, pred_type="glm")
    assert rel_err(m1, m2) < 1e-12 and rel_err(v1, v2) < 1e-10
    assert rel_err(ours(Xp[:3], fitting=True), theirs(Xp[:3], pred_type="glm", fitting=True)) < 1e-10


# =========================================================================== laplace-torch's
# documented workflows, written as its README and docs write them, with only the import swapped
# (``Laplace`` is fastlla's; with laplace-torch installed the full-structure ones also run on
# ``laplace.Laplace`` and are compared). README "Coming from laplace-torch" tabulates them.
STRUCTURES = ["full", "scalla"]


def _scalla_kw(structure, **extra):
    """ScaLLA's own options where the workflow picks it (a quick kernel fit for the tests)."""
    return dict(n_features=6, seed=0, **extra) if structure == "scalla" else {}


def _fit(la, train_loader, structure):
    if structure == "scalla":
        la.fit(train_loader, iterations=20, progress_bar=False)
    else:
        la.fit(train_loader)
    return la


def _sine(N=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(N, 1, generator=g, dtype=DT) * 8 - 4
    return X, torch.sin(X) + 0.3 * torch.randn(N, 1, generator=g, dtype=DT)


def _regression_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 1)).double()


def _evidence_loop(Laplace, model, train_loader, X_test, structure="full", n_epochs=100):
    """laplace-torch README, "Regression": fit, tune (δ, σ) by Adam on the evidence, predict."""
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure=structure,
                 **_scalla_kw(structure))  # fmt: skip
    _fit(la, train_loader, structure)
    log_prior, log_sigma = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
    hyper_optimizer = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
    for _ in range(n_epochs):
        hyper_optimizer.zero_grad()
        last = log_prior.exp(), log_sigma.exp()  # (the values the evidence stores)
        neg_marglik = -la.log_marginal_likelihood(*last)
        neg_marglik.backward()
        hyper_optimizer.step()
    f_mu, f_var = la(X_test, pred_type="glm")
    f_sigma = f_var.squeeze().sqrt()
    pred_std = torch.sqrt(f_sigma**2 + la.sigma_noise.item() ** 2)
    return la, last[0].detach(), last[1].detach(), f_mu, pred_std


@pytest.mark.parametrize("structure", STRUCTURES)
def test_workflow_regression_evidence_loop(structure):
    X, y = _sine()
    X_test = torch.linspace(-6, 6, 7, dtype=DT).unsqueeze(1)
    model = _regression_net()
    la, prior, sigma, f_mu, pred_std = _evidence_loop(Laplace, model, loader(X, y, 10), X_test, structure)
    # the tuned values are the stored ones, and the loop climbed the evidence
    assert float(la.prior_precision) == pytest.approx(float(prior), rel=1e-15)
    assert float(la.sigma_noise) == pytest.approx(float(sigma), rel=1e-15)
    assert float(la.log_marginal_likelihood()) > float(la.log_marginal_likelihood(math.e, math.e))
    assert 0.1 < float(sigma) < 1.0  # the data's noise is 0.3 (the reported bug ended at ~25,000)
    assert f_mu.shape == (7, 1) and pred_std.shape == (7,) and bool((pred_std > float(sigma)).all())
    if structure == "full" and _has_laplace_torch():
        import laplace

        _, p2, s2, mu2, std2 = _evidence_loop(laplace.Laplace, copy.deepcopy(model), loader(X, y, 10), X_test)
        # the same Adam loop on the same evidence (GGNs agree to ~1e-8)
        assert float(prior) == pytest.approx(float(p2), rel=1e-5)
        assert float(sigma) == pytest.approx(float(s2), rel=1e-5)
        assert rel_err(pred_std, std2) < 1e-5 and rel_err(f_mu, mu2) < 1e-12


def _has_laplace_torch() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import laplace  # noqa: F401
    except ImportError:
        return False
    return True


def _classification_data(N=40, seed=0, n_out=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 3, generator=g, dtype=DT)
    return X, (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()


@pytest.mark.parametrize("structure", STRUCTURES)
def test_workflow_quickstart_and_calibration(structure):
    """laplace-torch README quick start (marglik) and post-hoc calibration (gridsearch on a
    validation set), then the GLM predictive with each link."""
    X, y = _classification_data()
    Xv, yv = _classification_data(seed=1)
    model = model_for(n_out=3)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                 **_scalla_kw(structure))  # fmt: skip
    _fit(la, loader(X, y, 10), structure)
    la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
    delta_marglik = float(la.prior_precision)
    pred = la(Xv, pred_type="glm", link_approx="probit")
    assert pred.shape == (40, 3) and torch.allclose(pred.sum(-1), torch.ones(40, dtype=DT))
    for link in ("mc", "bridge", "bridge_norm"):
        assert la(Xv, pred_type="glm", link_approx=link).shape == (40, 3)
    la.optimize_prior_precision(method="gridsearch", pred_type="glm", link_approx="probit",
                                val_loader=loader(Xv, yv, 10), grid_size=21)  # fmt: skip
    grid = torch.logspace(-4, 4, 21, dtype=DT)
    delta_grid = float(la.prior_precision)
    assert float((grid - delta_grid).abs().min()) <= 1e-12 * delta_grid
    if structure == "full" and _has_laplace_torch():
        import laplace

        theirs = laplace.Laplace(copy.deepcopy(model), "classification", subset_of_weights="all",
                                 hessian_structure="full")  # fmt: skip
        theirs.fit(loader(X, y, 10))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
        d2 = float(theirs.prior_precision)  # Adam, 100 steps: near fastlla's exact maximiser
        assert delta_marglik == pytest.approx(d2, rel=0.02)
        assert float(la.log_marginal_likelihood(delta_marglik)) >= float(la.log_marginal_likelihood(d2)) - 1e-9
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs.optimize_prior_precision(method="gridsearch", pred_type="glm", link_approx="probit",
                                            val_loader=loader(Xv, yv, 10), grid_size=21)  # fmt: skip
        assert float(theirs.prior_precision) == pytest.approx(delta_grid, rel=1e-6)


class TinyLM(nn.Module):
    """laplace-torch's LLM wrapper convention: ``forward(self, data)`` reads a dict batch."""

    def __init__(self, n_out=2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 6)
        self.head = nn.Linear(6, n_out)

    def forward(self, data):
        mask = data["attention_mask"].unsqueeze(-1).to(self.embed.weight.dtype)
        h = (self.embed(data["input_ids"]) * mask).sum(1) / mask.sum(1)
        return self.head(h)


class TinyLMKeywords(nn.Module):
    """The same network with HuggingFace's keyword convention, ``forward(input_ids, ...)``."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        return self.lm({"input_ids": input_ids, "attention_mask": attention_mask})


def _token_batches(N=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (N, 5), generator=g)
    mask = torch.ones(N, 5, dtype=torch.long)
    mask[::3, 3:] = 0
    labels = (ids[:, 0] > 9).long()
    return [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8], "labels": labels[i:i + 8]}
            for i in range(0, N, 8)]  # fmt: skip


@pytest.mark.parametrize("subset,structure", [("all", "full"), ("last_layer", "full"), ("all", "scalla")])
def test_workflow_llm_dict_batches(subset, structure):
    """laplace-torch's HuggingFace/LLM workflow: dict batches with ``input_ids``,
    ``attention_mask`` and ``labels``, a model whose ``forward(self, data)`` takes the dict. The
    same network with a keyword forward is the reference: the same evidence and predictive."""
    lm = TinyLM().double()
    batches = _token_batches()
    la = Laplace(lm, "classification", subset_of_weights=subset, hessian_structure=structure,
                 **_scalla_kw(structure))  # fmt: skip
    _fit(la, batches, structure)
    la.optimize_prior_precision()
    test = {k: v for k, v in _token_batches(seed=1)[0].items() if k != "labels"}
    probs = la(test, pred_type="glm", link_approx="probit")
    assert probs.shape == (8, 2)
    ref = Laplace(TinyLMKeywords(lm), "classification", subset_of_weights=subset,
                  hessian_structure=structure, **_scalla_kw(structure))  # fmt: skip
    _fit(ref, batches, structure)
    ref.prior_precision = la.prior_precision
    assert float(la.log_marginal_likelihood()) == pytest.approx(float(ref.log_marginal_likelihood()), rel=1e-12)
    assert rel_err(probs, ref(test)) < 1e-12


def test_workflow_reward_modeling():
    """laplace-torch's reward-modelling workflow: fit on preference pairs, predict rewards."""
    model = RewardNet().double()
    Xp, yp = _pairs(40)
    la = Laplace(model, "reward_modeling", subset_of_weights="all", hessian_structure="full")
    la.fit(loader(Xp, yp, 10))
    la.optimize_prior_precision(method="marglik")
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    f_mu, f_var = la(x)
    assert f_mu.shape == (5, 1) and f_var.shape == (5, 1, 1) and bool((f_var > 0).all())
    assert la(Xp[:5], fitting=True).shape == (5, 2)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_workflow_serialization(structure, tmp_path):
    """laplace-torch docs, "Serialization": ``torch.save(la.state_dict())``, a new ``Laplace`` on
    the same model, ``load_state_dict(torch.load(...))`` (torch's default ``weights_only``)."""
    X, y = _classification_data()
    model = model_for(n_out=3)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                 **_scalla_kw(structure))  # fmt: skip
    _fit(la, loader(X, y, 10), structure)
    la.optimize_prior_precision(method="marglik")
    torch.save(la.state_dict(), tmp_path / "state_dict.bin")
    la2 = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                  **_scalla_kw(structure))  # fmt: skip
    la2.load_state_dict(torch.load(tmp_path / "state_dict.bin"))
    assert torch.equal(la2(X[:5], pred_type="glm"), la(X[:5], pred_type="glm"))
    assert torch.equal(la2.prior_precision, la.prior_precision)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_workflow_expectation_and_bayesian_optimization(structure):
    """laplace-torch README: an expectation under ``functional_samples`` (Monte Carlo) and the
    joint predictive of a candidate batch for Bayesian optimisation (``joint=True``); the Monte
    Carlo mean and covariance agree with the Gaussian's within 5 standard errors."""
    X, y = _sine()
    model = _regression_net()
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure=structure,
                 sigma_noise=0.3, **_scalla_kw(structure))  # fmt: skip
    _fit(la, loader(X, y, 10), structure)
    la.optimize_prior_precision(method="marglik")
    x = torch.linspace(-3, 3, 4, dtype=DT).unsqueeze(1)
    S = 4000
    f_samples = la.functional_samples(x, pred_type="glm", n_samples=S,
                                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert f_samples.shape == (S, 4, 1)
    expectation = torch.relu(f_samples).mean(0)  # e.g. an expected improvement over 0
    assert expectation.shape == (4, 1)
    f_mu, f_var = la(x, pred_type="glm")
    se = (f_var.squeeze(-1) / S).sqrt()
    assert bool(((f_samples.mean(0) - f_mu).abs() <= 5 * se).all())
    f_mu_joint, f_cov = la(x, pred_type="glm", joint=True)
    assert f_mu_joint.shape == (4,) and f_cov.shape == (4, 4)
    assert rel_err(torch.diagonal(f_cov), f_var.reshape(-1)) < 1e-10
    torch.linalg.cholesky(f_cov)  # a valid joint covariance (Thompson sampling of the batch)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_workflow_api_probe(structure):
    """Every laplace-torch attribute a user reads, with laplace-torch's types and shapes."""
    X, y = _classification_data()
    la = Laplace(model_for(n_out=3), "classification", subset_of_weights="all",
                 hessian_structure=structure, **_scalla_kw(structure))  # fmt: skip
    _fit(la, loader(X, y, 10), structure)
    P = la.n_params
    x = X[:4]
    tensors = {
        "prior_precision": (1,), "sigma_noise": (), "prior_mean": (), "mean": (P,),
        "posterior_precision": (P, P), "posterior_covariance": (P, P), "posterior_scale": (P, P),
        "log_det_ratio": (), "log_det_prior_precision": (), "log_det_posterior_precision": (),
        "scatter": (), "log_likelihood": (),
    }  # fmt: skip
    for name, shape in tensors.items():
        value = getattr(la, name)
        assert isinstance(value, torch.Tensor) and tuple(value.shape) == shape, name
    assert la.temperature == 1.0 and la.n_data == 40 and la.n_outputs == 3
    assert la.log_marginal_likelihood().shape == ()
    assert la(x).shape == (4, 3)
    assert la(x, pred_type="nn", link_approx="mc", n_samples=5).shape == (4, 3)
    assert la.predictive_distribution(x)[1].shape == (4, 3, 3)
    assert la.functional_samples(x, n_samples=5).shape == (5, 4, 3)
    assert la.predictive_samples(x, pred_type="nn", n_samples=5).shape == (5, 4, 3)
    Js, f = la.jacobians(x)
    assert la.functional_variance(Js).shape == (4, 3, 3)
    assert la.functional_covariance(Js).shape == (12, 12)
    if structure == "full":
        assert la.sample(6).shape == (6, P)
    else:
        with pytest.raises(NotImplementedError, match="functional_samples"):
            la.sample(6)
    assert set(la.state_dict()) >= {"prior_precision", "sigma_noise", "n_data", "n_outputs", "likelihood"}
    assert la.prior_precision_diag.shape == (P,)
    assert la.log_prob(la.mean).shape == () and float(la.square_norm(la.mean)) == 0.0
    assert torch.equal(la.predictive(x, "glm", "probit", 10), la(x))


@pytest.mark.parametrize("kind", ["ExactLLA", "ScaLLA"])
def test_log_det_ratio_and_log_likelihood_save_and_copy_as_plain_tensors(kind, tmp_path):
    """laplace-torch's properties are plain tensors: saving one (``torch.save``, loaded with
    torch's default ``weights_only=True``), pickling or deep-copying it must not carry the
    estimator fastlla's callable form refers to; the value is kept, and the call still works."""
    import pickle

    model = model_for()
    X, y = data("regression")
    if kind == "ExactLLA":
        la = ExactLLA(model, "regression", sigma_noise=0.7).fit(loader(X, y))
    else:
        la = ScaLLA(model, "regression", n_features=4, sigma_noise=0.7)
        la.fit(loader(X, y), iterations=1, progress_bar=False)
    values = {"log_det_ratio": la.log_det_ratio, "log_likelihood": la.log_likelihood}
    torch.save(values, tmp_path / "values.pt")
    loaded = torch.load(tmp_path / "values.pt")  # weights_only=True: torch's default
    copied = copy.deepcopy(values)
    pickled = pickle.loads(pickle.dumps(values))
    for name, value in values.items():
        for other in (loaded[name], copied[name], pickled[name]):
            assert type(other) is torch.Tensor
            assert torch.equal(other, value.as_subclass(torch.Tensor))
    assert len(pickle.dumps(values["log_det_ratio"])) < 2_000  # the value only, not the model
    assert float(la.log_det_ratio(2.0, 0.5)) == float(la._log_det_ratio_at(2.0, 0.5))
    assert float(la.log_det_ratio(2.0)) != float(la.log_det_ratio)
