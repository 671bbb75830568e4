"""What a public call may not change: the global RNG, the caller's modules, an earlier fit when
the call fails; and a fit that no longer matches its model is refused, not silently used."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fastlla
from fastlla.export import Predictor
from fastlla.laplace import ModelChangedError, NotFittedError
from fastlla.surrogate import seeded_linear

D, C = 5, 3


def make_model(seed=0):
    g = torch.Generator().manual_seed(seed)  # built without drawing from the global RNG
    layers = [nn.Linear(D, 16, device="meta"), nn.Tanh(), nn.Linear(16, C, device="meta")]
    model = nn.Sequential(*layers).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def make_batches(seed=1, n=48, batch=16, likelihood="classification"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=g)
    if likelihood == "classification":
        y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    else:
        y = torch.sin(X[:, :C]) + 0.1 * torch.randn(n, C, generator=g)
    return [(X[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


X_TEST = torch.randn(6, D, generator=torch.Generator().manual_seed(99))


def make_estimator(kind, model=None, likelihood="classification", **kw):
    model = make_model() if model is None else model
    if kind == "ScaLLA":
        return fastlla.ScaLLA(model, likelihood, n_features=8, **kw)
    return fastlla.ExactLLA(model, likelihood, **kw)


def fit(la, batches):
    if isinstance(la, fastlla.ScaLLA):
        return la.fit(batches, iterations=3, progress_bar=False)
    return la.fit(batches)


def snapshot(la):
    """Everything observable about a fitted estimator: predictions and its saved state."""
    return {
        "probs": la(X_TEST),
        "bridge": la(X_TEST, link_approx="bridge"),
        "state": copy.deepcopy(la.state_dict()),
    }


def assert_same(a, b, path="state"):
    """Bit-for-bit equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    else:
        assert a == b, path


KINDS = ["ScaLLA", "ExactLLA"]


# --------------------------------------------------------------------------- global RNG
def rng_unchanged(call):
    before = torch.get_rng_state()
    out = call()
    assert torch.equal(before, torch.get_rng_state()), "the global torch RNG state changed"
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_public_calls_leave_the_global_rng_alone(kind):
    batches = make_batches()
    la = make_estimator(kind)
    rng_unchanged(lambda: fit(la, batches))
    for link in ("probit", "bridge", "mc"):
        rng_unchanged(lambda: la(X_TEST, link_approx=link))
    rng_unchanged(lambda: la.predictive_distribution(X_TEST))
    rng_unchanged(lambda: la.optimize_prior_precision())
    rng_unchanged(lambda: la.optimize_prior_precision("gridsearch", batches, grid=[0.1, 1.0]))
    rng_unchanged(lambda: la.log_marginal_likelihood())
    state = rng_unchanged(la.state_dict)
    other = make_estimator(kind)
    rng_unchanged(lambda: other.load_state_dict(state))
    bad = batches[:2] + [(batches[2][0].clone().fill_(math.nan), batches[2][1])]
    with pytest.raises(ValueError):
        rng_unchanged(lambda: fit(make_estimator(kind), bad))  # fails part-way
    if kind == "ScaLLA":
        rng_unchanged(lambda: la.update(make_batches(seed=5, n=16)))
        rng_unchanged(lambda: la.kernel_fidelity(X_TEST, method="exact"))
        rng_unchanged(lambda: la.kernel_fidelity(X_TEST, method="jvp", n_projections=4))
        la.residual_variance = "jvp"
        rng_unchanged(lambda: la(X_TEST))
        la.residual_variance = "auto"
        predictor = rng_unchanged(la.export)
        rng_unchanged(lambda: predictor(X_TEST))
        fresh = rng_unchanged(
            lambda: Predictor.like(make_model(), "classification", n_outputs=C, n_features=8)
        )
        rng_unchanged(lambda: fresh.load_state_dict(predictor.state_dict()))
        # a fit whose surrogate trained, then failed in the posterior pass (label out of range)
        bad = batches[:2] + [(batches[2][0], batches[2][1].clone().fill_(C))]
        with pytest.raises(ValueError):
            rng_unchanged(lambda: fit(make_estimator(kind), bad))


def test_scalla_is_deterministic_given_its_seed_whatever_the_global_rng():
    batches = make_batches()
    probs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        la = fastlla.ScaLLA(make_model(), "classification", n_features=8, seed=3)
        probs.append(fit(la, batches)(X_TEST))
    assert torch.equal(probs[0], probs[1])
    other = fit(fastlla.ScaLLA(make_model(), "classification", n_features=8, seed=4), batches)
    assert not torch.equal(other(X_TEST), probs[0])  # the seed does reach the surrogate


def test_seeded_linear_draws_what_nn_linear_draws_after_manual_seed():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        expected = nn.Linear(7, 5)
    got = rng_unchanged(lambda: seeded_linear(7, 5, torch.Generator().manual_seed(11)))
    assert torch.equal(got.weight, expected.weight) and torch.equal(got.bias, expected.bias)


# --------------------------------------------------------------------------- caller's modules
def flags(model):
    return [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()]


@pytest.mark.parametrize("build", ["like", "constructor"])
def test_predictor_leaves_the_modules_it_is_given_as_they_were(build):
    model = make_model().train()
    model[0].bias.requires_grad_(False)
    before = flags(model)
    weights = copy.deepcopy(model.state_dict())
    if build == "like":
        predictor = Predictor.like(model, "classification", n_outputs=C, n_features=8)
    else:
        surrogate = nn.Sequential(nn.Linear(D, 8 * C), nn.Unflatten(1, (8, C))).train()
        s_before = flags(surrogate)
        predictor = Predictor(model, surrogate, 8, C, "classification")
        assert flags(surrogate) == s_before
    assert flags(model) == before
    assert_same(model.state_dict(), weights)
    assert not any(p.requires_grad for p in predictor.parameters())
    assert not predictor.model.training


# --------------------------------------------------------------------------- failed calls
def failing_loaders(kind, batches):
    """Re-fits that fail part-way, each with what it should raise."""
    nan_third = batches[:2] + [(batches[2][0].clone().fill_(math.nan), batches[2][1])]
    bad_label_third = batches[:2] + [(batches[2][0], batches[2][1].clone().fill_(C))]

    def interrupted():
        yield batches[0]
        raise KeyboardInterrupt

    class Interrupting:  # re-iterable; the second pass is interrupted
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            if self.passes > 1:
                return interrupted()
            return iter(batches)

    cases = [([], ValueError), (nan_third, ValueError), (bad_label_third, ValueError)]
    cases.append((Interrupting(), KeyboardInterrupt))
    if kind == "ScaLLA":
        cases.append((iter(batches), TypeError))  # read several times: one-shot refused
    else:
        cases.append((interrupted(), TypeError))  # form="auto" needs a re-iterable loader
    return cases


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_refit_leaves_the_earlier_fit_intact(kind):
    batches = make_batches()
    la = fit(make_estimator(kind), batches)
    before = snapshot(la)
    history = list(getattr(la, "history", []))
    for loader, error in failing_loaders(kind, make_batches(seed=2)):
        with pytest.raises(error):
            fit(la, loader)
        assert_same(snapshot(la), before)
        assert getattr(la, "history", []) == history
    if kind == "ExactLLA":  # a fixed form reads the loader once: a generator failing midway
        la.form = "function"

        def interrupted():
            yield from batches[:2]
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            la.fit(interrupted())
        assert_same(snapshot(la), before)


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_first_fit_leaves_the_estimator_unfitted(kind):
    la = make_estimator(kind)
    batches = make_batches()
    for loader, error in failing_loaders(kind, batches):
        with pytest.raises(error):
            fit(la, loader)
        with pytest.raises(NotFittedError):
            la(X_TEST)
        if kind == "ScaLLA":
            assert la.surrogate is None and la.residual_head is None
    fit(la, batches)  # and it can still be fitted
    expected = fit(make_estimator(kind), batches)(X_TEST)
    assert torch.equal(la(X_TEST), expected)


def _tampered(kind, state):
    """(name, tampered state, text the error must contain)."""
    out = []

    def add(name, change, text):
        s = dict(state)
        change(s)
        out.append(pytest.param(s, text, id=name))

    add("missing_key", lambda s: s.pop("n_data"), "n_data")
    add("unknown_key", lambda s: s.__setitem__("extra", 1), "extra")
    add("negative_n_data", lambda s: s.__setitem__("n_data", -5), "n_data")
    add("float_n_outputs", lambda s: s.__setitem__("n_outputs", 3.0), "n_outputs")
    add("nan_delta", lambda s: s.__setitem__("prior_precision", math.nan), "prior_precision")
    add("nan_loglik", lambda s: s.__setitem__("loglik_stat", math.nan), "loglik_stat")
    add("positive_loglik", lambda s: s.__setitem__("loglik_stat", 3.0), "loglik_stat")
    add("other_estimator", lambda s: s.__setitem__("estimator", "Other"), "Other")
    add("other_weights", lambda s: s.__setitem__(
        "model_signature", dict(s["model_signature"], param_norm2=1.0)), "other weights")
    key = "H" if "H" in state else "jhat"
    t = state[key]
    add(f"{key}_nan", lambda s: s.__setitem__(key, t.clone().fill_(math.nan)), key)
    add(f"{key}_extra_row", lambda s: s.__setitem__(key, torch.cat([t, t[:1]])), key)
    add(f"{key}_missing_column", lambda s: s.__setitem__(key, t[:, :-1]), key)
    add(f"{key}_integer", lambda s: s.__setitem__(key, t.long()), key)
    if kind == "ScaLLA":
        n = state["H"].shape[0]
        add("H_bigger", lambda s: s.__setitem__("H", torch.eye(n + 1)), "H")
        add("H_not_symmetric", lambda s: s.__setitem__("H", state["H"] + torch.triu(
            torch.ones(n, n), 1)), "H")
        sur = state["surrogate"]
        add("surrogate_basis_cut", lambda s: s.__setitem__(
            "surrogate", dict(sur, basis=sur["basis"][:, :-1])), "basis")
        name = next(k for k in sur if k.endswith("weight"))
        add("surrogate_missing_weight", lambda s: s.__setitem__(
            "surrogate", {k: v for k, v in sur.items() if k != name}), name)
        add("surrogate_nan", lambda s: s.__setitem__(
            "surrogate", dict(sur, **{name: sur[name].clone().fill_(math.nan)})), name)
        add("n_outputs_4", lambda s: s.__setitem__("n_outputs", 4), "n_outputs")
        add("n_features", lambda s: s.__setitem__("n_features", 9), "n_features")
        rh = state["residual_head"]
        add("residual_head_shape", lambda s: s.__setitem__(
            "residual_head", {k: v[:-1] if v.dim() else v for k, v in rh.items()}), "residual_head")
        # the settings record (scalla_settings.check_saved): each field's type, and coherence
        add("gate_not_bool", lambda s: s.__setitem__("gate", "yes"), "'gate'")
        add("last_layer_auto", lambda s: s.__setitem__("last_layer", "auto"), "'last_layer'")
        add("head_width_negative", lambda s: s.__setitem__("head_width", -1), "'head_width'")
        add("n_learned_too_big", lambda s: s.__setitem__("n_learned", n + 1), "'n_learned'")
        add("residual_auto", lambda s: s.__setitem__("residual_variance", "auto"),
            "'residual_variance'")
        add("residual_off_with_a_head", lambda s: s.__setitem__("residual_variance", False),
            "'residual_variance'")
        add("augment_unknown", lambda s: s.__setitem__("augment", "cutmix"), "'augment'")
        add("user_and_default_mixed", lambda s: s.__setitem__("last_layer", None), "'gate'")
        add("augment_missing", lambda s: s.pop("augment"), "'augment'")
        add("gate_without_its_block", lambda s: s.update(last_layer=False, gate=True), "'gate'")
    else:
        add("bad_form", lambda s: s.__setitem__("form", "other"), "form")
        add("chunk_size", lambda s: s.__setitem__("chunk_size", 0), "chunk_size")
    return out


def _states(kind):
    la = fit(make_estimator(kind, form="function") if kind == "ExactLLA" else make_estimator(kind),
             make_batches())
    return la.state_dict()


@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_state_dict_changes_nothing(kind):
    state = _states(kind)
    fitted = fit(make_estimator(kind), make_batches(seed=7))  # a different, good fit
    before = snapshot(fitted)
    for param in _tampered(kind, state):
        bad, text = param.values
        with pytest.raises((ValueError, TypeError), match=text):
            fitted.load_state_dict(bad)
        assert_same(snapshot(fitted), before, f"after {param.id}")
        fresh = make_estimator(kind)
        with pytest.raises((ValueError, TypeError), match=text):
            fresh.load_state_dict(bad)
        with pytest.raises(NotFittedError):
            fresh(X_TEST)
        if kind == "ScaLLA":
            assert fresh.surrogate is None
    # the untampered state still loads, and reproduces the fit exactly
    fitted.load_state_dict(state)
    again = make_estimator(kind)
    again.load_state_dict(state)
    assert torch.equal(fitted(X_TEST), again(X_TEST))


def test_exact_weight_space_state_with_a_wrong_size_is_refused():
    la = fit(make_estimator("ExactLLA", form="weight"), make_batches())
    state = la.state_dict()
    P = la.n_params
    for H in (torch.eye(P + 1), torch.eye(P)[:, :-1]):
        with pytest.raises(ValueError, match="'H'"):
            make_estimator("ExactLLA").load_state_dict(dict(state, H=H))
    with pytest.raises(ValueError, match="jhat"):
        make_estimator("ExactLLA").load_state_dict(dict(state, jhat=torch.zeros(2, P)))


# --------------------------------------------------------------------------- model changed
@pytest.mark.parametrize("kind", KINDS)
def test_a_model_changed_after_fit_is_refused_until_restored_or_refitted(kind):
    model = make_model()
    batches = make_batches()
    la = fit(make_estimator(kind, model=model), batches)
    p0 = la(X_TEST)
    assert torch.equal(la(X_TEST), p0)  # predicting changes nothing the check sees
    uses = [
        lambda: la(X_TEST),
        lambda: la.predictive_distribution(X_TEST),
        lambda: la.optimize_prior_precision(),
        la.state_dict,
    ]
    if kind == "ScaLLA":
        uses += [lambda: la.update(make_batches(seed=5, n=16)), la.export]

    # train mode: named, refused; eval again: as before
    model[1].train()
    for use in uses:
        with pytest.raises(ModelChangedError, match="train/eval"):
            use()
    model.eval()
    assert torch.equal(la(X_TEST), p0)

    # weights edited in place
    with torch.no_grad():
        model[2].weight.mul_(3)
    for use in uses:
        with pytest.raises(ModelChangedError, match="2.weight"):
            use()
    # weights replaced through load_state_dict (even by equal values: the fit cannot tell)
    model.load_state_dict(make_model().state_dict())
    with pytest.raises(ModelChangedError):
        la(X_TEST)
    # a parameter swapped for a new one
    model[0].bias = nn.Parameter(model[0].bias.detach().clone())
    with pytest.raises(ModelChangedError, match="0.bias"):
        la(X_TEST)
    fit(la, batches)  # refit: accepted again
    la(X_TEST)


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_binds_the_fit_to_the_model_as_it_is(kind):
    la = fit(make_estimator(kind), make_batches())
    model = make_model()
    other = make_estimator(kind, model=model)
    other.load_state_dict(la.state_dict())
    assert torch.equal(other(X_TEST), la(X_TEST))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(ModelChangedError):
        other(X_TEST)


def test_a_refused_predictor_state_leaves_the_predictor_as_it_was():
    la = fit(make_estimator("ScaLLA"), make_batches())
    predictor = la.export()
    other = fit(make_estimator("ScaLLA", seed=5), make_batches(seed=3)).export()
    before = copy.deepcopy(predictor.state_dict())
    out = predictor(X_TEST)
    bad = dict(other.state_dict())  # loads key by key until the bad one
    last = list(bad)[-3]
    bad[last] = torch.zeros(1, 2, 3)
    with pytest.raises(RuntimeError):
        predictor.load_state_dict(bad)
    assert_same(predictor.state_dict(), before)
    assert torch.equal(predictor(X_TEST), out)


@pytest.mark.parametrize("kind", KINDS)
def test_a_copied_estimator_keeps_its_fit_and_its_staleness(kind):
    la = fit(make_estimator(kind), make_batches())
    twin = copy.deepcopy(la)
    assert torch.equal(twin(X_TEST), la(X_TEST))
    with torch.no_grad():
        twin.model[0].weight.add_(1.0)
    with pytest.raises(ModelChangedError):
        twin(X_TEST)
    la(X_TEST)  # the original's model is another module
    with torch.no_grad():
        la.model[0].weight.add_(1.0)
    with pytest.raises(ModelChangedError):
        copy.deepcopy(la)(X_TEST)


# --------------------------------------------------------------------------- train mode
def train_mode_model(kind, seed=0):
    """A network with BatchNorm or dropout (whose train-mode forward updates buffers or draws
    from the global RNG), ending Linear → ReLU → Linear (the gated surrogate's structure)."""
    g = torch.Generator().manual_seed(seed)
    middle = nn.BatchNorm1d(16) if kind == "batchnorm" else nn.Dropout(0.5)
    model = nn.Sequential(nn.Linear(D, 16), middle, nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, C))  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if kind == "batchnorm":  # running statistics far from any batch's own
            model[1].running_mean.copy_(torch.randn(16, generator=g))
            model[1].running_var.copy_(torch.rand(16, generator=g) + 0.5)
    return model


def module_record(model):
    """Everything of a module a call could change: every parameter and buffer (values, identity,
    requires_grad), every training flag, the hooks, and the global RNG."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": [id(t) for t in [*model.parameters(), *model.buffers()]],
        "grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


@pytest.mark.parametrize("kind", ["batchnorm", "dropout"])
def test_public_calls_leave_a_network_in_train_mode_as_it_was(kind):
    """A network its user left in train mode: no public call updates its buffers, draws dropout
    masks from the global RNG or flips its flags; fastlla linearises the network as it predicts
    (eval mode), so the predictive mean is the eval-mode output."""
    from fastlla import network_head as nh

    model, batches = train_mode_model(kind), make_batches()
    x = batches[0][0]
    head = nh.find_head(model.eval(), x)
    assert head.output_layer == "5" and head.gate == ("3", "4", "5")
    model.train()
    before = module_record(model)

    def unchanged(call):
        out = call()
        after = module_record(model)
        assert_same(after, before, "module")
        return out

    probes = [
        lambda: nh.find_head(model, x),
        lambda: nh.gated_structure_runs(model, ("3", "4", "5"), x),
        lambda: nh.penultimate(model, "5", x),
        lambda: nh.penultimate(model, "5", x, pooled=True),
        lambda: nh.forward_with_penultimate(model, "5", x, head_is_output=True),
        lambda: nh.head_is_output(model, "5", x),
        lambda: nh.InputOf(model, "3")(x),
        lambda: call_tapped(nh, model, x),
        lambda: nh.without_module(model, "5")(x),
    ]
    assert unchanged(probes[0]) == head  # read as in eval mode
    for probe in probes[1:]:
        unchanged(probe)
    with torch.no_grad():
        f_eval = copy.deepcopy(model).eval()(X_TEST)
    for estimator, kw in [*((k, {}) for k in KINDS), ("ExactLLA", {"subset_of_weights": "last_layer"})]:
        la = make_estimator(estimator, model=model, **kw)
        model.train()  # the estimators put it in eval mode (as laplace-torch's); set it back
        before = module_record(model)
        unchanged(lambda: fit(la, batches))
        if estimator == "ScaLLA":
            assert la.gate_used
            unchanged(lambda: la.fit(batches, iterations="auto", time_budget=0.05,
                                     progress_bar=False))  # fmt: skip
            unchanged(lambda: la.kernel_fidelity(X_TEST, method="exact"))
            unchanged(lambda: la.kernel_fidelity(X_TEST, method="jvp", n_projections=4))
        mean, _ = unchanged(lambda: la.predictive_distribution(X_TEST))
        torch.testing.assert_close(mean, f_eval, rtol=1e-5, atol=1e-6)
        unchanged(lambda: la(X_TEST))
        unchanged(lambda: la(X_TEST, link_approx="bridge"))
        unchanged(lambda: la.log_marginal_likelihood())
        unchanged(lambda: la.optimize_prior_precision("gridsearch", batches, grid=[0.5, 2.0]))
        if estimator == "ScaLLA":
            predictor = unchanged(la.export)
            unchanged(lambda: predictor(X_TEST))


def call_tapped(nh, model, x):
    tapped, seen = nh.tapped_network(model, ["1", "5"])
    tapped(x)
    assert set(seen) == {"1", "5"}
