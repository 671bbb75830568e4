"""ExactLLA's contracts at its edges: subnetwork indices, ``load_state_dict`` validation (every
refusal names what is wrong and changes nothing), states in another precision, and the cached
Cholesky factor of a per-layer prior (reused when nothing changed, never when ``δ`` or ``σ``
did). Oracles: explicit Jacobians and GGNs (``Oracle`` of ``test_laplace_compat``)."""

from __future__ import annotations

import re

import pytest
import torch

import fastlla.exact
from fastlla import ExactLLA, Laplace
from fastlla.laplace import NotFittedError
from test_laplace_compat import Oracle, data, loader, model_for, rel_err
from testing import oracle_jacobian

P = sum(p.numel() for p in model_for().parameters())


# --------------------------------------------------------------------------- subnetworks
@pytest.mark.parametrize(
    "bad",
    [[0, 1], torch.tensor([[0, 1]]), torch.tensor([], dtype=torch.long), torch.tensor([0.0]),
     torch.tensor([True]), torch.tensor([1 + 0j])],
)  # fmt: skip
def test_subnetwork_indices_must_be_a_1d_integer_tensor(bad):
    msg = "fastlla: subnetwork_indices must be a non-empty 1-D integer tensor"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        Laplace(model_for(), "regression", "subnetwork", "full", subnetwork_indices=bad)


def test_subnetwork_index_range_repeats_and_frozen_parameters():
    for bad in (torch.tensor([P]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match=re.escape(f"must lie in [0, {P - 1}]")):
            Laplace(model_for(), "regression", "subnetwork", "full", subnetwork_indices=bad)
    with pytest.raises(ValueError, match="^fastlla: subnetwork_indices must not repeat an index$"):
        Laplace(model_for(), "regression", "subnetwork", "full", subnetwork_indices=torch.tensor([2, 2]))
    model = model_for()
    model.fc1.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=re.escape("frozen parameters ['fc1.weight']")):
        Laplace(model, "regression", "subnetwork", "full", subnetwork_indices=torch.tensor([0, P - 1]))


def test_single_index_subnetwork_is_the_one_column():
    model = model_for()
    X, y = data("regression")
    la = Laplace(model, "regression", "subnetwork", "full", torch.tensor([P - 1]), 0.5, 0.8)
    la.fit(loader(X, y))
    assert la.n_params == 1
    full = Oracle(model, "regression", X, y)
    g = float(full.G[P - 1, P - 1])
    Xs = data("regression", N=3, seed=4)[0]
    col = oracle_jacobian(model, Xs)[..., P - 1 :]  # (3, C, 1)
    ref = col @ col.mT / (g / 0.25 + 0.8)
    assert rel_err(la.predictive_distribution(Xs)[1], ref) < 1e-10


# --------------------------------------------------------------------------- load_state_dict
def fitted(form="weight", likelihood="regression", **kw):
    X, y = data(likelihood, N=16 if form == "weight" else 6)
    return ExactLLA(model_for(), likelihood, form=form, **kw).fit(loader(X, y)), X


def test_a_state_without_subset_is_all_weights():
    la, X = fitted()
    state = la.state_dict()
    del state["subset_of_weights"], state["last_layer_name"]
    other = ExactLLA(la.model, "regression")
    other.load_state_dict(state)
    assert torch.equal(other.predictive_distribution(X)[1], la.predictive_distribution(X)[1])
    last = Laplace(la.model, "regression", "last_layer", "full")
    with pytest.raises(ValueError, match="is for subset_of_weights='all', this estimator is 'last_layer'"):
        last.load_state_dict(state)


def test_a_state_for_another_last_layer_is_refused():
    X, y = data("regression")
    model = model_for()
    a = Laplace(model, "regression", "last_layer", "full", last_layer_name="fc1").fit(loader(X, y))
    b = Laplace(model, "regression", "last_layer", "full", last_layer_name="fc2")
    with pytest.raises(ValueError, match="is for the last layer 'fc1', this estimator's is 'fc2'"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(NotFittedError):
        b.predictive_distribution(X)
    pending = Laplace(model, "regression", "last_layer", "full")  # adopts the saved layer once
    pending.load_state_dict(a.state_dict())
    assert pending.last_layer_name == "fc1"
    b_fitted = Laplace(model, "regression", "last_layer", "full", last_layer_name="fc2").fit(loader(X, y))
    with pytest.raises(ValueError, match="is for the last layer 'fc2', this estimator's is 'fc1'"):
        pending.load_state_dict(b_fitted.state_dict())
    c = Laplace(model, "regression", "last_layer", "full").fit(loader(X, y))  # located: fc2
    with pytest.raises(ValueError, match="is for the last layer 'fc1', this estimator's is 'fc2'"):
        c.load_state_dict(a.state_dict())
    assert c.n_params == 12  # still fc2's weights


@pytest.mark.parametrize("form", ["weight", "function"])
def test_state_keys_of_the_other_form_and_chunk_size(form):
    la, X = fitted(form)
    state = la.state_dict()
    key, other = ("H", "jhat") if form == "weight" else ("jhat", "H")
    bad = dict(state, **{other: state[key]})
    fresh = ExactLLA(la.model, "regression", form=form)
    with pytest.raises(ValueError, match=re.escape(f"a {form}-space state_dict holds {key!r} (and not {other!r})")):
        fresh.load_state_dict(bad)
    fresh.load_state_dict(dict(state, chunk_size=1))
    assert fresh.chunk_size == 1 and fresh.fitted_form == form
    assert torch.equal(fresh.predictive_distribution(X)[1], la.predictive_distribution(X)[1])


@pytest.mark.parametrize("form", ["weight", "function"])
def test_a_state_in_another_precision_loads_in_the_estimators(form):
    X, y = data("regression", N=16 if form == "weight" else 6)
    model = model_for().float()
    la = ExactLLA(model, "regression", form=form).fit(loader(X.float(), y.float()))
    state = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in la.state_dict().items()}  # fmt: skip
    other = ExactLLA(model, "regression", form=form)
    other.load_state_dict(state)
    f, cov = other.predictive_distribution(X.float())
    assert cov.dtype == torch.float32
    assert torch.equal(cov, la.predictive_distribution(X.float())[1])  # float32 → 64 → 32 is exact


def test_symmetry_check_of_a_saved_ggn():
    la, X = fitted()
    state = la.state_dict()
    H = state["H"]
    m = float(H.abs().max())
    off = H - torch.diag(torch.diag(H))
    # rounding-level asymmetry, relative to the largest entry, is accepted even where the
    # entry itself is tiny
    i, j = divmod(int((off.abs() + torch.eye(P, dtype=H.dtype) * 1e300).argmin()), P)
    near = H.clone()
    near[i, j] += 1e-8 * m
    ExactLLA(la.model, "regression").load_state_dict(dict(state, H=near))
    # a real asymmetry is refused, however large the entry
    i, j = divmod(int(off.abs().argmax()), P)
    far = H.clone()
    far[i, j] *= 1.5
    with pytest.raises(ValueError, match=r"^fastlla: state_dict\['H'\] is not symmetric$"):
        ExactLLA(la.model, "regression").load_state_dict(dict(state, H=far))


# --------------------------------------------------------------------------- per-layer prior
def test_per_layer_factor_is_reused_only_while_delta_and_sigma_hold(monkeypatch):
    model = model_for()
    X, y = data("regression")
    la = ExactLLA(model, "regression", sigma_noise=0.7).fit(loader(X, y))
    oracle = Oracle(model, "regression", X, y)
    Xs = data("regression", N=3, seed=5)[0]
    sizes = [p.numel() for p in model.parameters()]
    calls = []
    real = fastlla.exact_predictive.psd_safe_cholesky
    monkeypatch.setattr(
        fastlla.exact_predictive, "psd_safe_cholesky", lambda A: calls.append(1) or real(A)
    )

    def check(layer_delta, sigma):
        d = torch.cat([torch.full((n,), v, dtype=torch.float64) for n, v in zip(sizes, layer_delta)])
        ref = oracle.predictive_cov(Xs, d, sigma=sigma)
        assert rel_err(la.predictive_distribution(Xs)[1], ref) < 1e-9

    la.prior_precision = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    check([0.5, 2.0, 1.0, 3.0], 0.7)
    check([0.5, 2.0, 1.0, 3.0], 0.7)
    assert len(calls) == 1  # the same δ and σ: one factorisation
    la.prior_precision = torch.tensor([0.5, 2.0, 1.0, 4.0], dtype=torch.float64)
    check([0.5, 2.0, 1.0, 4.0], 0.7)
    la.sigma_noise = 0.3
    check([0.5, 2.0, 1.0, 4.0], 0.3)
    assert len(calls) == 3


def test_last_layer_is_located_without_hooks_on_the_users_module(monkeypatch):
    """The last layer is read from a tapped stand-in of the network: no hook is registered on
    the user's module (another thread's pass would record into it), and it is laplace-torch's
    choice — the last module with parameters that runs, here registered before the body."""

    class HeadFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.head = torch.nn.Linear(4, 2)
            self.body = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())

        def forward(self, x):
            return self.head(self.body(x))

    def no_hooks(*args, **kwargs):
        raise AssertionError("a hook was registered on the user's module")

    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", no_hooks)
    monkeypatch.setattr(torch.nn.Module, "register_forward_pre_hook", no_hooks)
    X, y = data("regression")
    model = HeadFirst().double()
    la = Laplace(model, "regression", "last_layer", "full").fit(loader(X, y))
    assert la.last_layer_name == "head" and la.n_params == 10
    J = oracle_jacobian(model, X)[..., :10]  # head.weight, head.bias come first
    ref = torch.einsum("ncp,ncq->pq", J, J)
    assert rel_err(la.posterior.H, ref) < 1e-12
