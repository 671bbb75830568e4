"""The initialisation prior (``optimize_prior_precision(method="init")``, issue 15).

Oracles: the closed-form second moments of PyTorch's initialisers (Kaiming-uniform
``U(±1/√fan_in)`` for ``nn.Linear``/``nn.Conv2d`` weights and biases: ``E[θ²] = 1/(3·fan_in)``;
Xavier-uniform for ``nn.MultiheadAttention``'s input projection: ``2/(fan_in + fan_out)``;
constants for ``nn.LayerNorm``), and ``P / Σ numel·E[θ²]`` written out from them. The measured
moments are means of at least ``MIN_ENTRIES`` i.i.d. squares, so they are compared within five
standard errors: for ``U(±a)`` the relative standard deviation of ``θ²`` is ``√(4/5)``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastlla import ExactLLA, ScaLLA
from fastlla.init_prior import MIN_ENTRIES, init_second_moments
from test_laplace_compat import data, loader

# five standard errors of a mean of MIN_ENTRIES squares of a uniform variable
UNIFORM_TOL = 5 * math.sqrt(4 / 5) / math.sqrt(MIN_ENTRIES)


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 7), nn.LayerNorm(7),
        nn.ReLU(), nn.Linear(7, 3),
    ).double()  # fmt: skip


def kaiming(fan_in):
    return 1 / (3 * fan_in)


EXPECTED = {  # name: E[θ²] of the initialisation
    "0.weight": kaiming(9), "0.bias": kaiming(9), "3.weight": kaiming(64), "3.bias": kaiming(64),
    "4.weight": 1.0, "4.bias": 0.0, "6.weight": kaiming(7), "6.bias": kaiming(7),
}  # fmt: skip


def test_second_moments_are_those_of_the_initialisers():
    model = net()
    names = list(EXPECTED)
    got = init_second_moments(model, names)
    for name, g in zip(names, got.tolist()):
        want = EXPECTED[name]
        assert g == pytest.approx(want, rel=UNIFORM_TOL, abs=0), name


def test_multihead_attention_uses_its_own_initialiser():
    E = 16
    attn = nn.MultiheadAttention(E, 2)
    got = init_second_moments(attn, ["in_proj_weight", "in_proj_bias", "out_proj.weight"])
    xavier = 2 / (E + 3 * E)  # in_proj_weight is (3E, E): fan_in E, fan_out 3E
    assert float(got[0]) == pytest.approx(xavier, rel=UNIFORM_TOL)
    assert float(got[1]) == 0.0  # zeroed by _reset_parameters
    assert float(got[2]) == pytest.approx(kaiming(E), rel=UNIFORM_TOL)


def test_the_model_and_the_global_rng_are_left_as_they_were():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    init_second_moments(model, list(EXPECTED))
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_parameter_without_an_initialiser_is_a_clear_error():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.lin(x) * self.scale

    model = Scaled().double()
    X, y = data("classification")
    la = ExactLLA(model, "classification").fit(loader(X, y))
    before = la.prior_precision
    with pytest.raises(ValueError, match=r"parameter 'scale'.*no reset_parameters"):
        la.optimize_prior_precision("init")
    assert torch.equal(la.prior_precision, before)


def oracle_scalar(model, names):
    numel = {n: p.numel() for n, p in model.named_parameters()}
    return sum(numel[n] for n in names) / sum(numel[n] * EXPECTED[n] for n in names)


def fitted(cls, **kw):
    model = net()
    g = torch.Generator().manual_seed(0)
    X = torch.rand(24, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    fit_kw = {"iterations": 3} if cls is ScaLLA else {}
    return model, cls(model, "classification", **kw).fit(loader(X, y, batch=8), **fit_kw)


@pytest.mark.parametrize("cls", [ExactLLA, ScaLLA])
def test_scalar_init_prior_is_the_isotropic_prior_of_the_initialisation(cls):
    model, la = fitted(cls)
    got = la.optimize_prior_precision("init")
    assert type(got) is float
    assert got == pytest.approx(oracle_scalar(model, list(EXPECTED)), rel=UNIFORM_TOL)
    assert float(la.prior_precision) == got


def test_layerwise_and_diag_init_priors():
    model, la = fitted(ExactLLA)
    names = list(EXPECTED)
    scalar = la.optimize_prior_precision("init")
    layerwise = la.optimize_prior_precision("init", prior_structure="layerwise")
    assert layerwise.shape == (len(names),)
    for name, d in zip(names, layerwise.tolist()):
        # the zero-initialised LayerNorm bias gets the isotropic value, not an infinite one
        want = scalar if EXPECTED[name] == 0 else 1 / EXPECTED[name]
        assert d == pytest.approx(want, rel=2 * UNIFORM_TOL), name
    diag = la.optimize_prior_precision("init", prior_structure="diag")
    sizes = torch.tensor([p.numel() for p in model.parameters()])
    assert torch.equal(diag, torch.repeat_interleave(layerwise, sizes))


def test_subnetwork_init_prior_counts_only_the_chosen_entries():
    model = net()
    names = list(EXPECTED)
    sizes = [p.numel() for p in model.parameters()]
    start = {n: s for n, s in zip(names, [0, *torch.tensor(sizes).cumsum(0).tolist()])}
    # two entries of the first conv weight, three of the last linear's bias
    idx = torch.tensor([start["0.weight"], start["0.weight"] + 1, *range(start["6.bias"], start["6.bias"] + 3)])
    _, y = data("classification", n_out=3)
    X = torch.rand(16, 1, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    la = ExactLLA(model, "classification", subset_of_weights="subnetwork", subnetwork_indices=idx)
    la.fit(loader(X, y))
    got = la.optimize_prior_precision("init")
    want = 5 / (2 * EXPECTED["0.weight"] + 3 * EXPECTED["6.bias"])
    assert got == pytest.approx(want, rel=UNIFORM_TOL)
    with pytest.raises(ValueError, match="layerwise' does not apply"):
        la.optimize_prior_precision("init", prior_structure="layerwise")
    assert float(la.prior_precision) == got


def test_scalla_takes_only_the_scalar_init_prior_and_loses_nothing():
    _, la = fitted(ScaLLA)
    la.prior_precision = 2.5
    with pytest.raises(ValueError, match="'layerwise' does not apply to ScaLLA"):
        la.optimize_prior_precision("init", prior_structure="layerwise")
    with pytest.raises(ValueError, match="takes a scalar prior_precision"):
        la.optimize_prior_precision("init", prior_structure="diag")
    assert float(la.prior_precision) == 2.5


def test_val_loader_with_init_warns():
    _, la = fitted(ExactLLA)
    X, y = data("classification")
    with pytest.warns(UserWarning, match="val_loader is ignored by method='init'"):
        la.optimize_prior_precision("init", val_loader=[(X, y)])


def test_the_default_is_init_without_and_gridsearch_with_a_validation_set():
    _, la = fitted(ExactLLA)
    init = la.optimize_prior_precision("init")
    la.prior_precision = 1.0
    assert la.optimize_prior_precision() == init
    X = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    grid = [0.5, 2.0, 8.0]
    want = la.optimize_prior_precision("gridsearch", loader(X, y), grid=grid)
    la.prior_precision = 1.0
    assert la.optimize_prior_precision(val_loader=loader(X, y), grid=grid) == want


@pytest.mark.parametrize("kw", [{"n_steps": 5}, {"lr": 0.5}, {"init_prior_prec": 2.0}])
def test_adam_keywords_without_marglik_are_refused(kw):
    _, la = fitted(ExactLLA)
    la.prior_precision = 3.0
    with pytest.raises(ValueError, match=f"{next(iter(kw))} go with method='marglik'"):
        la.optimize_prior_precision(**kw)
    assert float(la.prior_precision) == 3.0


def test_init_with_sigma_maximises_the_evidence_over_sigma_at_the_init_prior():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    X, y = data("regression", N=24)
    la = ExactLLA(model, "regression", sigma_noise=1.0).fit(loader(X, y))
    la.optimize_prior_precision("init")
    assert float(la.sigma_noise) == 1.0  # σ moves only when asked
    delta = la.optimize_prior_precision("init", optimize_sigma_noise=True)
    sigma = float(la.sigma_noise)  # (log_marginal_likelihood(δ, σ) stores what it is given)
    log_s = torch.tensor(math.log(sigma), dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(la.log_marginal_likelihood(delta, log_s.exp()), log_s)
    assert abs(float(g)) < 1e-4 * len(X)  # a stationary point of the evidence in log σ
    best = float(la.log_marginal_likelihood(delta, sigma))
    for s in (0.5, 2.0):  # and its maximum
        assert float(la.log_marginal_likelihood(delta, sigma * s)) < best


def test_a_network_not_drawn_from_its_modules_initialisers_is_warned_about():
    """A tensor whose trained values are far smaller than its initialiser's draws (here scaled
    by 0.1 after construction, as a pre-trained transformers model's std-0.02 init would be)
    is named in a warning; the network as drawn gives none."""
    import warnings

    model, la = fitted(ExactLLA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la.optimize_prior_precision()
    with torch.no_grad():
        model[3].weight.mul_(0.1)  # mean square 100x below the init's
    X = torch.rand(24, 1, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    la = ExactLLA(model, "classification").fit(loader(X, torch.randint(0, 3, (24,)), batch=8))
    with pytest.warns(UserWarning, match=r"of '3.weight' are over 10x smaller") as record:
        la.optimize_prior_precision()
    assert len(record) == 1 and record[0].filename == __file__
    # a tensor of few entries may end anywhere in training: the 3-entry output bias scaled the
    # same way is not named
    with torch.no_grad():
        model[3].weight.mul_(10)
        model[6].bias.mul_(0.01)
    la = ExactLLA(model, "classification").fit(loader(X, torch.randint(0, 3, (24,)), batch=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la.optimize_prior_precision()
