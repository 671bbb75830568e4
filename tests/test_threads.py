"""Prediction is thread-safe: threads predicting at once with one fitted estimator (or two
estimators sharing one network) get the answers of serial calls, for every estimator and
option, and no prediction leaves anything (hooks, parameters) changed on the user's network."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastlla
from fastlla.export import Predictor
from testing import assert_close, single_thread

D, C, M = 5, 3, 8
N_THREADS, REPEATS = 8, 3


one_intra_op_thread = pytest.fixture(autouse=True)(single_thread)


def make_model(n_out: int, seed: int = 0) -> nn.Module:
    """``Linear → Tanh → Linear`` with the head nested one level below the root (name ``"1"``),
    so the gated structure and the exact last-layer block both apply."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Sequential(nn.Linear(D, 16), nn.Tanh()), nn.Linear(16, n_out))


def make_data(model: nn.Module, likelihood: str):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(48, D, generator=g)
    with torch.no_grad():
        out = model(X)
    y = out.argmax(-1) if likelihood == "classification" else out + 0.1 * torch.randn(
        out.shape, generator=g
    )
    # batches of different sizes: features of another thread's batch cannot pass unnoticed
    inputs = [torch.randn(5 + i, D, generator=g) for i in range(N_THREADS)]
    return DataLoader(TensorDataset(X, y), batch_size=16), inputs


def hook_state(model: nn.Module) -> list:
    return [
        (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for name, m in model.named_modules()
    ]


def parameter_state(model: nn.Module) -> list:
    return [(n, p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()]


def check_parameters_unchanged(model: nn.Module, before: list) -> None:
    after = dict(model.named_parameters())
    assert list(after) == [n for n, *_ in before]
    for name, p, value, requires_grad in before:
        assert after[name] is p and p.requires_grad == requires_grad
        assert torch.equal(p.detach(), value)


def assert_same(actual, expected) -> None:
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e)
        return
    assert actual.shape == expected.shape
    assert_close(actual, expected, expected.dtype)


def check_threaded(predictors: list, inputs: list, model: nn.Module, oracles: list | None = None):
    """Every ``predictor(x)`` from ``N_THREADS`` threads at once (released together, each on its
    own inputs, ``REPEATS`` rounds) equals its serial answer (that of ``oracles``, when given:
    the threads then make the predictors' first calls); the network keeps no hook and no
    changed parameter."""
    hooks, params = hook_state(model), parameter_state(model)
    serial = [[predict(x) for x in inputs] for predict in (oracles or predictors)]
    results: dict = {}
    errors: list = []
    barrier = threading.Barrier(N_THREADS)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for r in range(REPEATS):
                for k, predict in enumerate(predictors):
                    j = (i + r + k) % len(inputs)
                    results[i, r, k] = (j, predict(inputs[j]))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} threads raised, first: {errors[0]!r}"
    assert len(results) == N_THREADS * REPEATS * len(predictors)
    wrong = 0
    for (_, _, k), (j, value) in results.items():
        try:
            assert_same(value, serial[k][j])
        except AssertionError:
            wrong += 1
    assert wrong == 0, f"{wrong} of {len(results)} threaded predictions differ from serial ones"
    assert hook_state(model) == hooks
    check_parameters_unchanged(model, params)


LINKS = [
    dict(link_approx="probit"), dict(link_approx="bridge"), dict(link_approx="mc", n_samples=20)
]

SCALLA_CASES = [
    # (likelihood, estimator options); the comment says what it exercises
    ("classification", {}),  # defaults: gated learned features, exact block, residual head
    ("classification", dict(gate=False)),  # plain learned features beside the exact block
    ("classification", dict(gate=False, last_layer=2)),  # exact block of rank 2
    ("classification", dict(gate=False, last_layer=False)),  # no exact block; residual head
    ("classification", dict(residual_variance=False)),
    ("classification", dict(residual_variance="jvp")),  # JVPs at prediction
    ("classification", dict(gate=False, last_layer=False, residual_variance="jvp")),
    ("regression", {}),
    ("regression", dict(residual_variance="head")),
    ("regression", dict(gate=False, last_layer=False, residual_variance="jvp")),
]


def predictors_of(la) -> list:
    """Every public prediction of ``la`` with its options."""
    calls = [la.predictive_distribution, lambda x: la(x, pred_type="glm")]
    if la.likelihood.value == "classification":
        calls += [lambda x, kw=kw: la(x, **kw) for kw in LINKS]
    else:
        calls += [lambda x: la(x, include_noise=True)]
    return calls


@pytest.mark.parametrize(
    "likelihood,options", SCALLA_CASES, ids=[f"{lk[:5]}-{o}" for lk, o in SCALLA_CASES]
)
def test_scalla_prediction_is_thread_safe(likelihood, options):
    model = make_model(C if likelihood == "classification" else 2)
    loader, inputs = make_data(model, likelihood)
    la = fastlla.ScaLLA(model, likelihood, n_features=M, **options)
    la.fit(loader, iterations=3, progress_bar=False)
    check_threaded(predictors_of(la), inputs, model)


@pytest.mark.parametrize("form", ["weight", "function"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_exact_prediction_is_thread_safe(likelihood, form):
    model = make_model(C if likelihood == "classification" else 2)
    loader, inputs = make_data(model, likelihood)
    la = fastlla.ExactLLA(model, likelihood, form=form).fit(loader)
    check_threaded(predictors_of(la), inputs, model)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_exported_predictor_is_thread_safe(likelihood):
    model = make_model(C if likelihood == "classification" else 2)
    loader, inputs = make_data(model, likelihood)
    la = fastlla.ScaLLA(model, likelihood, n_features=M)
    la.fit(loader, iterations=3, progress_bar=False)
    outputs = ["probit", "bridge", "gaussian"] if likelihood == "classification" else ["gaussian"]
    predictors = [la.export(output=o) for o in outputs]
    predictors += [Predictor.from_estimator(la, output=outputs[0], ops="fastlla")]
    if likelihood == "regression":
        predictors.append(la.export(include_noise=True))
    check_threaded(predictors, inputs, predictors[0].model)
    check_threaded([la], inputs, model)  # the estimator still predicts as before


def test_estimators_sharing_a_network_predict_at_once():
    """ExactLLA's Jacobians, ScaLLA's one-pass output and features and its JVP residual all
    run on the same network object from different threads."""
    model = make_model(C)
    loader, inputs = make_data(model, "classification")
    exact = fastlla.ExactLLA(model, "classification").fit(loader)
    gated = fastlla.ScaLLA(model, "classification", n_features=M).fit(
        loader, iterations=3, progress_bar=False
    )
    jvp = fastlla.ScaLLA(model, "classification", n_features=M, residual_variance="jvp").fit(
        loader, iterations=3, progress_bar=False
    )
    check_threaded([exact, gated, jvp, lambda x: model(x).detach()], inputs, model)


def test_prediction_leaves_the_network_as_it_was():
    """Serial prediction too: no hook is left (or added while it runs), no parameter changes."""
    model = make_model(C)
    loader, inputs = make_data(model, "classification")
    la = fastlla.ScaLLA(model, "classification", n_features=M).fit(
        loader, iterations=3, progress_bar=False
    )
    seen = []
    probe = model[1].register_forward_pre_hook(
        lambda mod, args: seen.append((len(mod._forward_pre_hooks), len(mod._forward_hooks)))
    )
    hooks, params = hook_state(model), parameter_state(model)
    for predict in predictors_of(la):
        predict(inputs[0])
    assert seen and set(seen) == {(1, 0)}  # only the probe itself, on every pass
    assert hook_state(model) == hooks
    check_parameters_unchanged(model, params)
    probe.remove()


def test_first_predictions_are_thread_safe():
    """Threads making an estimator's first predictions (nothing cached yet: the Cholesky factors
    are computed by whichever thread comes first) agree with a warm estimator's answers."""
    model = make_model(C)
    loader, inputs = make_data(model, "classification")
    short = dict(iterations=3, progress_bar=False)
    for estimator, options, fit in [
        (fastlla.ScaLLA, {}, short),  # the Kronecker factors
        (fastlla.ScaLLA, dict(last_layer=False, gate=False), short),  # the plain factor
        (fastlla.ExactLLA, dict(form="function"), {}),
    ]:
        warm = estimator(model, "classification", **options).fit(loader, **fit)
        state = warm.state_dict()
        cold = [estimator(model, "classification", **options) for _ in range(REPEATS)]
        for la in cold:
            la.load_state_dict(state)
        # each round uses a fresh estimator: REPEATS cold starts, N_THREADS threads each
        rounds = iter(range(N_THREADS * REPEATS))
        lock = threading.Lock()

        def predict(x):
            with lock:
                k = next(rounds) // N_THREADS
            return cold[k](x)

        check_threaded([predict], inputs, model, oracles=[warm])


@pytest.mark.parametrize("gated", [True, False])
def test_shared_trunk_prediction_is_thread_safe(gated):
    """A surrogate reading the network's own trunk (``shared_trunk``): its input is read in the
    network's pass each prediction makes, per call."""
    from fastlla.network_head import find_head
    from fastlla.surrogate import last_layer_surrogate

    model = make_model(C)
    loader, inputs = make_data(model, "classification")
    x0 = next(iter(loader))[0]
    n_params = sum(p.numel() for p in model.parameters())
    surrogate = last_layer_surrogate(
        model, M, C, n_params, head_width=8, gated=gated, head=find_head(model, x0),
        generator=torch.Generator().manual_seed(0), shared_trunk=True,
    )  # fmt: skip
    la = fastlla.ScaLLA(model, "classification", surrogate=surrogate)
    la.fit(loader, iterations=3, progress_bar=False)
    assert la.surrogate.shared_trunk_input is not None
    check_threaded(predictors_of(la), inputs, model)


def test_distilled_prediction_is_thread_safe():
    """The distilled gated map's variances come from features whitened inside the map, whose
    whitened mean and basis are cached per posterior factor: threads making the first
    predictions (and after the prior precision changes) agree with serial calls."""
    model = make_model(C)
    loader, inputs = make_data(model, "classification")
    la = fastlla.ScaLLA(model, "classification", n_features=M)
    la.fit(loader, iterations=3, progress_bar=False)
    learned = la.surrogate.learned
    assert learned.distil((x for x, _ in loader), tolerance=1.0) > 0  # a loose tolerance: rank 8
    la.fit(loader, iterations=0, progress_bar=False)  # the posterior on the distilled features
    assert learned.distilled
    serial = fastlla.ScaLLA(model, "classification", n_features=M)
    serial.load_state_dict(la.state_dict())
    assert serial.surrogate.learned.distilled
    check_threaded([la], inputs, model, oracles=[serial])
    la.prior_precision = serial.prior_precision = 3.0
    check_threaded([la], inputs, model, oracles=[serial])
    assert learned._whitened_map is not None
