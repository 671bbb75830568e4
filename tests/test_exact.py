"""ExactLLA against an independent oracle.

The oracle never calls fastlla: Jacobians come from per-sample, per-output
``torch.autograd.grad`` loops (one row at a time), the GGN is summed explicitly,
the posterior covariance is ``torch.linalg.inv(G + δI)`` and the evidence uses ``slogdet``.
Everything runs in float64 on tiny models.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from fastlla import ExactLLA
from testing import TwoInput, call_model, eps_tolerance, n_inputs, oracle_jacobian
from fastlla.exact import softmax_hessian_factor
from fastlla.laplace import NotFittedError

DT = torch.float64
REL = 1e-8


# --------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self, d_in=3, hidden=6, n_out=3, squeeze=False):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)
        self.squeeze = squeeze

    def forward(self, x):
        out = self.fc2(torch.tanh(self.fc1(x)))
        return out.squeeze(-1) if self.squeeze else out


class FrozenBN(nn.Module):
    """A frozen first-layer weight (large, so counting it in ‖θ‖² would show) and BatchNorm."""

    def __init__(self, d_in=3, hidden=5, n_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, n_out)
        with torch.no_grad():
            self.fc1.weight.mul_(4.0)
            self.bn.running_mean.copy_(torch.randn(hidden) * 0.5)
            self.bn.running_var.copy_(torch.rand(hidden) + 0.5)
            self.bn.weight.copy_(1.0 + 0.3 * torch.randn(hidden))
            self.bn.bias.copy_(0.3 * torch.randn(hidden))
        self.fc1.weight.requires_grad_(False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def make_model(kind: str, n_out: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = {"mlp": MLP, "frozen_bn": FrozenBN, "two_input": TwoInput}[kind](n_out=n_out)
    return model.to(DT).eval()


def make_inputs(kind: str, input_kind: str, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3, generator=g, dtype=DT)
    if kind != "two_input":
        return a
    b = torch.randn(n, 2, generator=g, dtype=DT)
    return (a, b) if input_kind == "tuple" else {"a": a, "b": b}


# --------------------------------------------------------------------------- oracle
def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


class Oracle:
    """Dense linearized Laplace: ``G``, ``inv(G + δI)``, slogdet evidence."""

    def __init__(self, model, likelihood, X, y):
        self.model, self.likelihood = model, likelihood
        with torch.no_grad():
            self.f = call_model(model, X).reshape(n_inputs(X), -1)
        self.J = oracle_jacobian(model, X)
        N, C, P = self.J.shape
        self.P = P
        if likelihood == "classification":
            p = torch.softmax(self.f, dim=-1)
            lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            self.loglik_cls = float(torch.log_softmax(self.f, -1)[torch.arange(N), y].sum())
        else:
            lam = torch.eye(C, dtype=DT).expand(N, C, C)
            self.y = y.reshape(N, C)
        G = torch.zeros(P, P, dtype=DT)
        for n in range(N):
            G += self.J[n].T @ lam[n] @ self.J[n]
        self.G1 = G  # at σ = 1
        self.theta2 = float(sum(p.detach().square().sum() for p in trainable(model)))

    def G(self, sigma=1.0):
        return self.G1 / sigma**2 if self.likelihood == "regression" else self.G1

    def loglik(self, sigma=1.0):
        if self.likelihood == "classification":
            return self.loglik_cls
        dist = torch.distributions.Normal(self.f, torch.tensor(sigma, dtype=DT))
        return float(dist.log_prob(self.y).sum())

    def posterior_cov(self, delta, sigma=1.0):
        return torch.linalg.inv(self.G(sigma) + delta * torch.eye(self.P, dtype=DT))

    def predictive_cov(self, Xs, delta, sigma=1.0):
        Js = oracle_jacobian(self.model, Xs)
        S = self.posterior_cov(delta, sigma)
        return Js @ S @ Js.mT

    def log_det_ratio(self, delta, sigma=1.0):
        sign, logdet = torch.linalg.slogdet(torch.eye(self.P, dtype=DT) + self.G(sigma) / delta)
        assert sign > 0
        return float(logdet)

    def marglik(self, delta, sigma=1.0):
        return (
            self.loglik(sigma)
            - 0.5 * delta * self.theta2
            - 0.5 * self.log_det_ratio(delta, sigma)
        )


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-300))


def make_labels(likelihood, n, n_out, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    if likelihood == "classification":
        return torch.randint(0, n_out, (n,), generator=g)
    return torch.randn(n, n_out, generator=g, dtype=DT)


def loader(X, y, batch=7):
    n = n_inputs(X)
    return [
        (
            take_range(X, a, min(a + batch, n)),
            y[a : min(a + batch, n)],
        )
        for a in range(0, n, batch)
    ]


def take_range(x, a, b):
    if isinstance(x, torch.Tensor):
        return x[a:b]
    if isinstance(x, dict):
        return {k: v[a:b] for k, v in x.items()}
    return tuple(v[a:b] for v in x)


# --------------------------------------------------------------------------- oracle comparison
CASES = [
    # (likelihood, model kind, input kind, n_out, sigma)
    ("classification", "mlp", "tensor", 3, 1.0),
    ("regression", "mlp", "tensor", 2, 0.7),
    ("classification", "frozen_bn", "tensor", 3, 1.0),
    ("regression", "two_input", "tuple", 2, 1.6),
    ("classification", "two_input", "dict", 3, 1.0),
]


@pytest.mark.parametrize("form", ["weight", "function"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_exact_matches_oracle(case, form):
    likelihood, kind, input_kind, n_out, sigma = case
    model = make_model(kind, n_out)
    N = 16
    X = make_inputs(kind, input_kind, N, seed=1)
    y = make_labels(likelihood, N, n_out, seed=1)
    Xs = make_inputs(kind, input_kind, 5, seed=2)
    delta = 0.8
    la = ExactLLA(model, likelihood, prior_precision=delta, sigma_noise=sigma, form=form, chunk_size=4)
    la.fit(loader(X, y))
    assert la.fitted_form == form
    oracle = Oracle(model, likelihood, X, y)
    assert la.n_params == oracle.P

    mean, cov = la.predictive_distribution(Xs)
    with torch.no_grad():
        f_star = call_model(model, Xs).reshape(5, -1)
    torch.testing.assert_close(mean, f_star, rtol=1e-12, atol=1e-12)
    assert cov.shape == (5, n_out, n_out)
    assert rel_err(cov, oracle.predictive_cov(Xs, delta, sigma)) < REL

    # Another δ after a first prediction (the cached factorisation must follow δ).
    la.prior_precision = 3.0
    _, cov3 = la.predictive_distribution(Xs)
    assert rel_err(cov3, oracle.predictive_cov(Xs, 3.0, sigma)) < REL
    la.prior_precision = delta
    if likelihood == "regression":  # and σ (the data scale 1/σ²)
        la.sigma_noise = 2 * sigma
        _, cov_s = la.predictive_distribution(Xs)
        assert rel_err(cov_s, oracle.predictive_cov(Xs, delta, 2 * sigma)) < REL
        la.sigma_noise = sigma

    for d in (0.05, delta, 20.0):
        ref = oracle.marglik(d, sigma)
        got = float(la.log_marginal_likelihood(d))
        assert abs(got - ref) <= REL * abs(ref), (d, got, ref)
        ref_ldr = oracle.log_det_ratio(d, sigma)
        assert abs(float(la.log_det_ratio(d)) - ref_ldr) <= REL * abs(ref_ldr)
    if likelihood == "regression":
        for s in (0.3, 2.5):
            ref = oracle.marglik(delta, s)
            got = float(la.log_marginal_likelihood(delta, s))
            assert abs(got - ref) <= REL * abs(ref), (s, got, ref)
    # as in laplace-torch, the evidence stores the (δ, σ) it was last given
    assert float(la.prior_precision) == (delta if likelihood == "regression" else 20.0)
    assert float(la.sigma_noise) == (2.5 if likelihood == "regression" else 1.0)
    la.prior_precision, la.sigma_noise = delta, sigma

    # The estimator's call: probit probabilities, or (mean, cov [+ σ²I]).
    ref_cov = oracle.predictive_cov(Xs, delta, sigma)
    if likelihood == "classification":
        probs = la(Xs, link_approx="probit")
        var = torch.diagonal(ref_cov, dim1=-2, dim2=-1)
        ref_p = torch.softmax(f_star / torch.sqrt(1 + math.pi / 8 * var), -1)
        assert rel_err(probs, ref_p) < REL
    else:
        m, v = la(Xs)
        assert rel_err(v, ref_cov) < REL
        m, v = la(Xs, include_noise=True)
        assert rel_err(v, ref_cov + sigma**2 * torch.eye(n_out, dtype=DT)) < REL
        torch.testing.assert_close(m, f_star, rtol=1e-12, atol=1e-12)


def test_frozen_parameter_excluded_from_theta_norm():
    model = make_model("frozen_bn", 3)
    frozen = model.fc1.weight
    la = ExactLLA(model, "classification")
    # θ has only the trainable parameters and ‖θ*‖² counts only them.
    assert la.n_params == sum(p.numel() for p in model.parameters()) - frozen.numel()
    X = make_inputs("frozen_bn", "tensor", 8, seed=3)
    y = make_labels("classification", 8, 3, seed=3)
    la.fit(loader(X, y))
    oracle = Oracle(model, "classification", X, y)
    total2 = float(sum(p.detach().square().sum() for p in model.parameters()))
    # Swap in the wrong ‖θ*‖² and the evidence must differ (the check can fail).
    assert abs(oracle.theta2 - total2) > 1.0
    ref = oracle.marglik(2.0)
    assert abs(float(la.log_marginal_likelihood(2.0)) - ref) <= REL * abs(ref)


def test_batchnorm_uses_running_statistics():
    """In eval mode the prediction uses the running stats, not the batch's own."""
    model = make_model("frozen_bn", 3)
    X = make_inputs("frozen_bn", "tensor", 8, seed=4)
    y = make_labels("classification", 8, 3, seed=4)
    model.train()  # ExactLLA must put it in eval mode
    la = ExactLLA(model, "classification").fit(loader(X, y))
    assert not model.training
    running = model.bn.running_mean.clone()
    mean, _ = la.predictive_distribution(X[:3])
    torch.testing.assert_close(model.bn.running_mean, running, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(mean, model(X[:3]), rtol=1e-12, atol=1e-12)


def test_auto_form_picks_smaller_size():
    model = make_model("mlp", 3)  # P = 3*6+6 + 6*3+3 = 45
    P = sum(p.numel() for p in model.parameters())
    many = make_inputs("mlp", "tensor", 20, seed=5)  # N·C = 60 ≥ P → weight
    few = make_inputs("mlp", "tensor", 6, seed=5)  # N·C = 18 < P → function
    la = ExactLLA(model, "classification").fit(loader(many, make_labels("classification", 20, 3, 5)))
    assert P <= 60 and la.fitted_form == "weight"
    la = ExactLLA(model, "classification").fit(loader(few, make_labels("classification", 6, 3, 5)))
    assert la.fitted_form == "function"


def test_one_output_regression_model_returning_1d():
    model = MLP(n_out=1, squeeze=True).to(DT).eval()
    X = make_inputs("mlp", "tensor", 10, seed=6)
    y = make_labels("regression", 10, 1, seed=6).reshape(-1)
    la = ExactLLA(model, "regression", prior_precision=0.5, sigma_noise=0.4).fit(loader(X, y))
    oracle = Oracle(model, "regression", X, y)
    _, cov = la.predictive_distribution(X[:4])
    assert cov.shape == (4, 1, 1)
    assert rel_err(cov, oracle.predictive_cov(X[:4], 0.5, 0.4)) < REL
    ref = oracle.marglik(0.5, 0.4)
    assert abs(float(la.log_marginal_likelihood()) - ref) <= REL * abs(ref)


def test_softmax_hessian_factor():
    logits = torch.randn(4, 5, dtype=DT) * 2
    R = softmax_hessian_factor(logits)
    p = torch.softmax(logits, -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    tol = eps_tolerance(DT, n=lam.shape[-1])  # a C-term product of entries ≤ 1
    torch.testing.assert_close(R @ R.mT, lam, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- hyper-parameters
@functools.lru_cache(maxsize=None)
def trained_classifier(seed=0):
    """An MLP fitted by a short MAP run on noisy labels (overconfident in places); cached."""
    torch.manual_seed(seed)
    X = torch.randn(60, 3, dtype=DT)
    logits_true = torch.stack([X[:, 0] + X[:, 1], X[:, 1] - X[:, 2], -X[:, 0]], -1) * 2
    y = torch.distributions.Categorical(logits=logits_true).sample()
    model = MLP(n_out=3).to(DT)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[:30]), y[:30]).backward()
        opt.step()
    return model.eval(), X[:30], y[:30], X[30:], y[30:]


@pytest.mark.parametrize("form", ["weight", "function"])
def test_marglik_optimisation_finds_oracle_maximiser(form):
    model, X, y, _, _ = trained_classifier()
    la = ExactLLA(model, "classification", form=form).fit(loader(X, y))
    delta = la.optimize_prior_precision("marglik")
    assert delta == la.prior_precision
    oracle = Oracle(model, "classification", X, y)
    log_grid = np.linspace(-6, 6, 1201)
    values = np.array([oracle.marglik(math.exp(t)) for t in log_grid])
    best = int(values.argmax())
    assert 0 < best < len(log_grid) - 1  # an interior maximum: the test is meaningful
    step = log_grid[1] - log_grid[0]
    assert abs(math.log(delta) - log_grid[best]) <= step
    # The returned δ is at least as good as the best grid point (up to round-off).
    assert oracle.marglik(delta) >= values[best] - 1e-9 * abs(values[best])


def test_marglik_optimisation_with_sigma_noise():
    torch.manual_seed(1)
    model = make_model("mlp", 2, seed=1)
    X = make_inputs("mlp", "tensor", 24, seed=7)
    with torch.no_grad():
        y = model(X) + 0.3 * torch.randn(24, 2, dtype=DT)
    la = ExactLLA(model, "regression", sigma_noise=1.0).fit(loader(X, y))
    la.optimize_prior_precision("marglik", optimize_sigma_noise=True)
    oracle = Oracle(model, "regression", X, y)
    from scipy.optimize import minimize

    res = minimize(
        lambda t: -oracle.marglik(math.exp(t[0]), math.exp(t[1])),
        x0=[0.0, 0.0],
        method="Nelder-Mead",
        options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 4000},
    )
    best = -res.fun
    got = oracle.marglik(float(la.prior_precision), float(la.sigma_noise))
    assert got >= best - 1e-6 * abs(best), (got, best)
    assert abs(math.log(la.sigma_noise) - res.x[1]) < 1e-3
    assert abs(math.log(la.prior_precision) - res.x[0]) < 1e-2


def oracle_probit_nll(oracle, Xv, yv, delta):
    with torch.no_grad():
        f = call_model(oracle.model, Xv)
    var = torch.diagonal(oracle.predictive_cov(Xv, delta), dim1=-2, dim2=-1)
    logp = torch.log_softmax(f / torch.sqrt(1 + math.pi / 8 * var), -1)
    return float(-logp[torch.arange(len(yv)), yv].mean())


def test_gridsearch_picks_oracle_nll_minimiser():
    model, X, y, Xv, yv = trained_classifier()
    la = ExactLLA(model, "classification").fit(loader(X, y))
    grid = [float(d) for d in np.logspace(-2, 3, 11)]
    delta = la.optimize_prior_precision("gridsearch", val_loader=loader(Xv, yv), grid=grid)
    oracle = Oracle(model, "classification", X, y)
    nll = np.array([oracle_probit_nll(oracle, Xv, yv, d) for d in grid])
    order = np.argsort(nll)
    assert nll[order[1]] - nll[order[0]] > 1e-6  # no tie: the choice is well defined
    assert 0 < order[0] < len(grid) - 1  # an interior minimum: the test is meaningful
    assert delta == grid[order[0]]


def test_gridsearch_regression_picks_oracle_nll_minimiser():
    model = make_model("mlp", 2, seed=2)
    X = make_inputs("mlp", "tensor", 40, seed=16)
    with torch.no_grad():  # the model is "wrong" away from where it fits: NLL trades off δ
        y = model(X) + 0.2 * torch.randn(40, 2, dtype=DT) + 0.5 * X[:, :1] ** 2
    sigma = 0.3
    la = ExactLLA(model, "regression", sigma_noise=sigma).fit(loader(X[:20], y[:20]))
    grid = [float(d) for d in np.logspace(-3, 3, 13)]
    delta = la.optimize_prior_precision("gridsearch", val_loader=loader(X[20:], y[20:]), grid=grid)
    oracle = Oracle(model, "regression", X[:20], y[:20])
    with torch.no_grad():
        f = model(X[20:])
    nll = []
    for d in grid:
        var = torch.diagonal(oracle.predictive_cov(X[20:], d, sigma), dim1=-2, dim2=-1) + sigma**2
        nll.append(float(-torch.distributions.Normal(f, var.sqrt()).log_prob(y[20:]).sum()))
    nll = np.array(nll)
    order = np.argsort(nll)
    assert nll[order[1]] - nll[order[0]] > 1e-6
    assert 0 < order[0] < len(grid) - 1, nll
    assert delta == grid[order[0]]


def test_optimize_prior_precision_bad_arguments():
    model, X, y, _, _ = trained_classifier()
    la = ExactLLA(model, "classification").fit(loader(X, y))
    with pytest.raises(ValueError):
        la.optimize_prior_precision("nonsense")
    with pytest.raises(ValueError):
        la.optimize_prior_precision("gridsearch")  # no val_loader


# --------------------------------------------------------------------------- saving
@pytest.mark.parametrize("form", ["weight", "function"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_state_dict_round_trip(form, likelihood):
    n_out = 3 if likelihood == "classification" else 2
    sigma = 1.0 if likelihood == "classification" else 0.6
    model = make_model("mlp", n_out)
    X = make_inputs("mlp", "tensor", 12, seed=8)
    y = make_labels(likelihood, 12, n_out, seed=8)
    la = ExactLLA(model, likelihood, prior_precision=0.7, sigma_noise=sigma, form=form)
    la.fit(loader(X, y))
    buf = io.BytesIO()
    torch.save(la.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    other = ExactLLA(model, likelihood, prior_precision=5.0, sigma_noise=1.0 if sigma == 1.0 else 2.0)
    other.load_state_dict(state)
    Xs = make_inputs("mlp", "tensor", 4, seed=9)
    a, b = la.predictive_distribution(Xs), other.predictive_distribution(Xs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert float(la.log_marginal_likelihood()) == float(other.log_marginal_likelihood())
    if likelihood == "classification":
        assert torch.equal(la(Xs, link_approx="bridge"), other(Xs, link_approx="bridge"))


def test_state_dict_from_other_model_raises():
    model = make_model("mlp", 3)
    X = make_inputs("mlp", "tensor", 12, seed=8)
    y = make_labels("classification", 12, 3, seed=8)
    state = ExactLLA(model, "classification").fit(loader(X, y)).state_dict()
    with pytest.raises(ValueError):  # another architecture
        ExactLLA(make_model("frozen_bn", 3), "classification").load_state_dict(state)
    with pytest.raises(ValueError):  # same architecture, other weights
        ExactLLA(make_model("mlp", 3, seed=123), "classification").load_state_dict(state)
    with pytest.raises(ValueError):  # other likelihood
        ExactLLA(model, "regression").load_state_dict(state)


# --------------------------------------------------------------------------- bad input
def test_unknown_likelihood():
    with pytest.raises(ValueError, match="likelihood"):
        ExactLLA(make_model("mlp", 3), "poisson")


def test_model_without_trainable_parameters():
    model = make_model("mlp", 3).requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        ExactLLA(model, "classification")


@pytest.mark.parametrize("form", ["auto", "weight", "function"])
def test_empty_loader(form):
    la = ExactLLA(make_model("mlp", 3), "classification", form=form)
    with pytest.raises(ValueError, match="empty"):
        la.fit([])
    empty = torch.utils.data.TensorDataset(torch.empty(0, 3, dtype=DT), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        la.fit(torch.utils.data.DataLoader(empty, batch_size=4))


def test_nan_inputs():
    model = make_model("mlp", 3)
    X = make_inputs("mlp", "tensor", 8, seed=10)
    y = make_labels("classification", 8, 3, seed=10)
    bad = X.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ExactLLA(model, "classification").fit(loader(bad, y))
    la = ExactLLA(model, "classification").fit(loader(X, y))
    with pytest.raises(ValueError, match="NaN"):
        la.predictive_distribution(bad)
    inf = X.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(ValueError):
        la(inf)
    two = make_model("two_input", 3)
    with pytest.raises(ValueError, match="NaN"):
        ExactLLA(two, "classification").fit([({"a": bad, "b": X[:, :2]}, y)])


@pytest.mark.parametrize("labels", [[0, 1, 3], [-1, 0, 1], [0.0, 1.0, 2.0]])
def test_labels_out_of_range(labels):
    model = make_model("mlp", 3)
    X = make_inputs("mlp", "tensor", 3, seed=11)
    with pytest.raises(ValueError, match="label"):
        ExactLLA(model, "classification").fit([(X, torch.tensor(labels))])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_label_dtypes(dtype):
    model, X, y, Xv, yv = trained_classifier()
    ref = ExactLLA(model, "classification").fit(loader(X, y))
    la = ExactLLA(model, "classification").fit(loader(X, y.to(dtype)))
    assert float(la.log_marginal_likelihood()) == float(ref.log_marginal_likelihood())
    grid = [0.1, 1.0, 10.0]
    a = la.optimize_prior_precision("gridsearch", val_loader=loader(Xv, yv.to(dtype)), grid=grid)
    assert a == ref.optimize_prior_precision("gridsearch", val_loader=loader(Xv, yv), grid=grid)


def test_boolean_labels_rejected():
    model = make_model("mlp", 3)
    X = make_inputs("mlp", "tensor", 3, seed=11)
    with pytest.raises(ValueError, match="label"):
        ExactLLA(model, "classification").fit([(X, torch.tensor([True, False, True]))])


def test_one_shot_iterator_loader():
    model = make_model("mlp", 3)
    X = make_inputs("mlp", "tensor", 10, seed=14)
    y = make_labels("classification", 10, 3, seed=14)
    batches = loader(X, y, batch=4)
    with pytest.raises(TypeError, match="re-iterable"):  # not a misleading "empty loader"
        ExactLLA(model, "classification").fit(iter(batches))
    la = ExactLLA(model, "classification", form="weight").fit(iter(batches))
    ref = ExactLLA(model, "classification", form="weight").fit(batches)
    assert la.n_data == 10
    assert float(la.log_marginal_likelihood()) == float(ref.log_marginal_likelihood())


def test_non_finite_targets_and_outputs():
    X = make_inputs("mlp", "tensor", 4, seed=15)
    y = torch.zeros(4, 2, dtype=DT)
    y[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ExactLLA(make_model("mlp", 2), "regression").fit([(X, y)])
    model = make_model("mlp", 3)
    with torch.no_grad():
        model.fc2.bias[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ExactLLA(model, "classification").fit([(X, torch.tensor([0, 1, 2, 0]))])


def test_regression_target_shape_mismatch():
    model = make_model("mlp", 2)
    X = make_inputs("mlp", "tensor", 4, seed=12)
    with pytest.raises(ValueError):
        ExactLLA(model, "regression").fit([(X, torch.zeros(4, 3, dtype=DT))])


def test_predict_before_fit():
    la = ExactLLA(make_model("mlp", 3), "classification")
    X = make_inputs("mlp", "tensor", 2, seed=13)
    for call in (
        lambda: la(X),
        lambda: la.predictive_distribution(X),
        lambda: la.log_marginal_likelihood(),
        lambda: la.optimize_prior_precision(),
        lambda: la.state_dict(),
    ):
        with pytest.raises(NotFittedError):
            call()


def test_bad_hyper_parameters():
    model = make_model("mlp", 3)
    for kwargs in ({"prior_precision": 0.0}, {"prior_precision": float("nan")}, {"form": "dense"}):
        with pytest.raises(ValueError):
            ExactLLA(model, "classification", **kwargs)
    with pytest.raises(ValueError):  # σ only applies to regression
        ExactLLA(model, "classification", sigma_noise=0.5)


@pytest.mark.parametrize("form", ["weight", "function"])
def test_fit_too_big_for_memory_is_refused_up_front(form, monkeypatch):
    """The memory a fit needs is computed before any Jacobian: 2·P² entries (GGN and its
    Cholesky factor) in weight form, N·C·P + 2·(N·C)² in function form (plus one chunk of
    Jacobians); a fit that needs more than is available raises MemoryError naming the number."""
    import fastlla.exact as exact_module

    model = make_model("mlp", 3)
    X = make_inputs("mlp", "tensor", 10, seed=21)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    loader = [(X[:5], y[:5]), (X[5:], y[5:])]
    la = ExactLLA(model, "classification", form=form, chunk_size=4)
    P, C, N, item = la.n_params, 3, 10, 8
    need = (2 * P * P if form == "weight" else N * C * P + 2 * (N * C) ** 2) + 4 * C * P
    assert exact_module.available_memory("cpu") > 0
    monkeypatch.setattr(exact_module, "available_memory", lambda device: need * item - 1)
    calls = []
    monkeypatch.setattr(la, "_jacobians", lambda x: calls.append(x))
    with pytest.raises(MemoryError, match=f"{need * item / 2**30:.1f} GiB"):
        la.fit(loader)
    assert calls == [] and not la._fitted  # refused before any Jacobian
    monkeypatch.setattr(exact_module, "available_memory", lambda device: need * item)
    monkeypatch.undo()
    ExactLLA(model, "classification", form=form).fit(loader)  # fits when the memory is there
