"""Networks as users bring them, read by running them: the output layer and penultimate features
found by execution and verified (``f = W φ + b``), the fallback surrogate where that fails,
per-token heads, half precision, and the default surrogate's size rule — each against ExactLLA
or a count."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastlla
from fastlla.network_head import NetworkHead, find_head
from fastlla.surrogate import default_surrogate_size

D, H, C = 4, 16, 3


@pytest.fixture(scope="module")
def trained():
    """A small classifier trained on iris (standardised), its data and a loader."""
    from sklearn.datasets import load_iris

    Xn, yn = load_iris(return_X_y=True)
    X = torch.tensor((Xn - Xn.mean(0)) / Xn.std(0), dtype=torch.float32)
    y = torch.tensor(yn)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
    loader = DataLoader(TensorDataset(X, y), batch_size=50)
    return net.eval(), X, y, loader


class HeadFirst(nn.Module):
    """The function of ``net``, its head registered before the body, and a frozen identity
    nn.Linear inside the body (the last *registered* Linear)."""

    def __init__(self, net):
        super().__init__()
        self.head = net[2]
        self.body = nn.Sequential(net[0], net[1], nn.Linear(H, H))
        with torch.no_grad():
            self.body[2].weight.copy_(torch.eye(H))
            self.body[2].bias.zero_()
        self.body[2].requires_grad_(False)

    def forward(self, x):
        return self.head(self.body(x))


class Transformed(nn.Module):
    """``net``'s logits transformed after its last nn.Linear by ``how``."""

    def __init__(self, net, how):
        super().__init__()
        self.net, self.how = net, how

    def forward(self, x):
        z = self.net(x)
        if self.how == "affine":
            return z * 2 + 1
        if self.how == "reference":
            return torch.cat([z[:, :2], torch.zeros_like(z[:, :1])], 1)
        if self.how == "log_softmax":
            return torch.log_softmax(z, -1)
        raise AssertionError(self.how)


class TwiceApplied(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.body, self.head, self.mix = net[:2], net[2], nn.Linear(C, H)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.head(self.body(x)))))


def test_find_head_reads_the_network_by_running_it(trained):
    net, X, _, _ = trained
    assert find_head(net, X) == NetworkHead("2", "2", H, "", ("0", "1", "2"))
    head = find_head(HeadFirst(copy.deepcopy(net)), X)  # registration order would say body.2
    assert (head.output_layer, head.gate) == ("head", None)  # reads a Linear, not an activation
    for how in ("affine", "reference", "log_softmax"):
        head = find_head(Transformed(net, how), X)
        assert head.output_layer is None and head.feature_layer == "net.2", how
        assert "transformed after it" in head.reason or "values per input" in head.reason
    head = find_head(TwiceApplied(copy.deepcopy(net)), X)
    assert head.output_layer is None and "runs 2 times" in head.reason
    conv = nn.Sequential(nn.Unflatten(1, (1, D)), nn.Conv1d(1, C, D), nn.Flatten())
    assert find_head(conv, X).feature_layer is None
    # the verification is to float tolerance: a change of one ulp-scale is accepted, 1e-3 is not
    nudged = copy.deepcopy(net)
    with torch.no_grad():
        nudged[2].bias.add_(1e-3)
    assert find_head(nudged, X).output_layer == "2"
    assert find_head(Transformed(net, "affine"), X).output_layer is None
    assert not any(m._forward_hooks for m in net.modules())


def _relative(S, S_ex):
    return float((S - S_ex).norm() / S_ex.norm())


def _scalla(model, loader, iterations=200, **kw):
    return fastlla.ScaLLA(model, "classification", n_features=32, seed=0, **kw).fit(
        loader, iterations=iterations, progress_bar=False
    )


@pytest.fixture(scope="module")
def baseline(trained):
    """ScaLLA's covariance error against ExactLLA on the untransformed network with the same
    kind of surrogate the fallback builds (learned features of the last Linear's input only):
    the kernel fidelity the transformed networks are held to."""
    net, X, _, loader = trained
    _, S_ex = fastlla.ExactLLA(net, "classification").fit(loader).predictive_distribution(X)
    la = _scalla(net, loader, last_layer=False, gate=False, residual_variance=False)
    _, S = la.predictive_distribution(X)
    return _relative(S, S_ex)


@pytest.mark.parametrize("how", ["head_first", "affine", "reference", "log_softmax"])
def test_transformed_logits_agree_with_exact_lla(trained, baseline, how):
    """Oracle: ExactLLA of the same model. A network whose logits are transformed after the last
    Linear falls back (with a warning) and is held to the untransformed network's fidelity; a
    head registered first is read correctly and keeps the exact block."""
    net, X, _, loader = trained
    model = HeadFirst(copy.deepcopy(net)) if how == "head_first" else Transformed(net, how)
    _, S_ex = fastlla.ExactLLA(model, "classification").fit(loader).predictive_distribution(X)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la = _scalla(model, loader)
    fallback = [w for w in caught if "assumes nothing" in str(w.message)]
    assert bool(fallback) == (how != "head_first")
    assert la.last_layer_used is (how == "head_first")
    _, S = la.predictive_distribution(X)
    err = _relative(S, S_ex)
    ratio = float(S.diagonal(dim1=1, dim2=2).mean() / S_ex.diagonal(dim1=1, dim2=2).mean())
    print(f"{how}: rel.err {err:.3f} (baseline {baseline:.3f}), mean variance ratio {ratio:.2f}")
    assert err <= 1.5 * baseline + 0.05
    assert 0.75 <= ratio <= 1.33


class Tokens(nn.Module):
    """An LLM-style per-token head: (B, T) token ids → (B, T, C) logits, ``pool`` over tokens."""

    def __init__(self, pool=None):
        super().__init__()
        self.embed, self.body = nn.Embedding(11, 6), nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head, self.pool = nn.Linear(8, C), pool

    def forward(self, ids):
        z = self.head(self.body(self.embed(ids)))
        if self.pool == "last":
            return z[:, -1]
        if self.pool == "mean":
            return z.mean(1)
        if self.pool == "sum":  # W Σφ + T·b: not W ψ + b for the pooled ψ = Σφ
            return z.sum(1)
        return z


def token_data():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 11, (60, 5), generator=g)
    return ids, DataLoader(TensorDataset(ids, ids[:, -1] % C), batch_size=30)


@pytest.mark.parametrize("estimator", ["ExactLLA", "ScaLLA"])
def test_per_token_outputs_are_refused_up_front(estimator):
    torch.manual_seed(0)
    _, loader = token_data()
    la = getattr(fastlla, estimator)(Tokens(), "classification")
    with pytest.raises(ValueError, match=r"shape \(30, 5, 3\).*per-token head.*\[:, -1\]"):
        la.fit(loader) if estimator == "ExactLLA" else la.fit(loader, iterations=1, progress_bar=False)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_per_token_head_with_last_token_or_pooled_output_agrees_with_exact_lla(pool):
    """A head run per token whose outputs the network takes at the last token or averages is
    the output layer with pooled features ψ (exact last-layer block, any sequence length).
    ScaLLA's predictive is held to ExactLLA's of the same model, to a few times its own kernel
    error."""
    torch.manual_seed(0)
    ids, loader = token_data()
    model = Tokens(pool).eval()
    assert find_head(model, ids[:4]) == NetworkHead("head", "head", 8, "", None, pooled=True)
    _, S_ex = fastlla.ExactLLA(model, "classification").fit(loader).predictive_distribution(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        la = _scalla(model, loader)
    assert la.last_layer_used is True
    _, S = la.predictive_distribution(ids)
    ratio = float(S.diagonal(dim1=1, dim2=2).mean() / S_ex.diagonal(dim1=1, dim2=2).mean())
    kernel_err = la.kernel_fidelity(ids[:30])
    print(f"{pool}: rel.err {_relative(S, S_ex):.3f}, variance ratio {ratio:.2f}, kernel {kernel_err:.3f}")
    assert kernel_err <= 0.3  # the learned kernel fits this network
    # the predictive follows from the kernel: its error is held to a few times the kernel's
    assert _relative(S, S_ex) <= 2 * kernel_err + 0.1
    assert abs(ratio - 1) <= 2 * kernel_err + 0.1
    short = ids[:5, :3]  # another sequence length: the same ψ, the exported predictor agrees
    mean, cov = la.predictive_distribution(short)
    _, cov_ex = fastlla.ExactLLA(model, "classification").fit(loader).predictive_distribution(short)
    assert _relative(cov, cov_ex) <= 2 * kernel_err + 0.1
    torch.testing.assert_close(la.export()(short), fastlla.predictive.probit(mean, cov))


def test_per_token_head_pooled_otherwise_needs_a_surrogate():
    """Summed over tokens (``W Σφ + T·b``) the head is not the output layer, and its per-token
    input is no fixed-size feature: ScaLLA refuses up front (ExactLLA fits)."""
    torch.manual_seed(0)
    ids, loader = token_data()
    model = Tokens("sum").eval()
    assert find_head(model, ids[:4]).feature_layer is None
    la = fastlla.ScaLLA(model, "classification", n_features=4)
    with pytest.raises(ValueError, match=r"per position.*last token.*pass surrogate="):
        la.fit(loader, iterations=1, progress_bar=False)
    fastlla.ExactLLA(model, "classification").fit(loader)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["ExactLLA", "ScaLLA"])
def test_half_precision_networks_agree_with_float32(trained, estimator, dtype):
    """Oracle: the same estimator on a float32 copy of the same (rounded) weights. The network
    runs in its dtype, everything after it in float32, so the two agree to a tolerance set by
    the half dtype's ε (the network's outputs and JVPs carry its rounding; ScaLLA's 30 training
    steps may amplify it a little: 32ε)."""
    net, X, y, loader = trained
    half = copy.deepcopy(net).to(dtype)
    full = copy.deepcopy(half).float()
    eps = torch.finfo(dtype).eps

    def fit(model, cast):
        data = [(x.to(cast), t) for x, t in loader]
        if estimator == "ExactLLA":
            return fastlla.ExactLLA(model, "classification").fit(data)
        return fastlla.ScaLLA(model, "classification", n_features=16, seed=0).fit(
            data, iterations=30, progress_bar=False
        )

    la, ref = fit(half, dtype), fit(full, torch.float32)
    mean, S = la.predictive_distribution(X[:32].to(dtype))
    mean_ref, S_ref = ref.predictive_distribution(X[:32])
    assert mean.dtype == S.dtype == la(X[:4]).dtype == torch.float32
    assert float((mean - mean_ref).abs().max()) <= 16 * eps * float(mean_ref.abs().max())
    assert _relative(S, S_ref) <= (16 if estimator == "ExactLLA" else 32) * eps
    assert all(p.dtype == dtype for p in half.parameters())  # the network keeps its dtype
    if estimator == "ScaLLA":
        with pytest.raises(TypeError, match="float32 copy"):
            la.export()


def test_state_dict_keeps_the_head_read_at_fit(trained):
    """A fresh estimator loads the fitted state without data and predicts the same, for a
    verified head registered first and for the fallback."""
    net, X, _, loader = trained
    for model in (HeadFirst(copy.deepcopy(net)), Transformed(net, "affine")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la = fastlla.ScaLLA(model, "classification", n_features=8).fit(
                loader, iterations=3, progress_bar=False
            )
        fresh = fastlla.ScaLLA(model, "classification", n_features=8)
        fresh.load_state_dict(la.state_dict())
        assert fresh.head == la.head
        for a, b in zip(fresh.predictive_distribution(X[:7]), la.predictive_distribution(X[:7])):
            assert torch.equal(a, b)
        exported = la.export()
        mean, cov = la.predictive_distribution(X[:7])
        torch.testing.assert_close(exported(X[:7]), fastlla.predictive.probit(mean, cov))


def _built_size(la):
    sur = la.surrogate
    return sum(p.numel() for p in getattr(sur, "learned", sur).parameters())


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1024)),  # case 19
        lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 300)),
        lambda: Transformed(nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 3000)), "affine"),
    ],
    ids=["decoder_C1024", "relu_C300", "fallback_C3000"],
)
def test_default_surrogate_obeys_the_size_rule(make):
    """Many outputs: the default surrogate is at most max(100·P, 8M) parameters (head_width and
    gate 'auto' give way first, then a default n_features); the count matches the built one."""
    from fastlla.scalla_settings import SURROGATE_MAX_RATIO, SURROGATE_MIN_PARAMS

    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(16, 8)
    loader = [(x, model(x).detach())]
    P = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = fastlla.ScaLLA(model, "regression").fit(loader, iterations=0, progress_bar=False)
    size = _built_size(la)
    assert size <= max(SURROGATE_MAX_RATIO * P, SURROGATE_MIN_PARAMS)
    width = getattr(getattr(la.surrogate, "learned", la.surrogate), "head_width", 0)
    C = model(x).shape[1]
    assert size == default_surrogate_size(model, la.head, la.n_learned, C, width, la.gate_used)
    explicit = fastlla.ScaLLA(model, "regression", n_features=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explicit.fit(loader, iterations=0, progress_bar=False)
    assert explicit.n_learned == 128  # an explicit n_features is the user's choice


def test_size_rule_leaves_the_digits_cnn_and_demo_defaults_unchanged():
    from fastlla.apps.models import MLP, DigitsCNN

    torch.manual_seed(0)
    for model, x, M in ((DigitsCNN(10), torch.randn(8, 64), None), (MLP(10, 1, hidden=(50, 50)), torch.randn(8, 10), 64)):
        lik = "classification" if M is None else "regression"
        y = model(x).argmax(-1) if M is None else model(x).detach()
        la = fastlla.ScaLLA(model.eval(), lik, n_features=M).fit([(x, y)], iterations=0, progress_bar=False)
        assert la.n_learned == (M or 128) and la.gate_used and la.last_layer_used is True
        assert la.surrogate.learned.head_width == 512


@pytest.mark.parametrize("which", ["conv_output", "single_linear"])
def test_a_network_without_an_output_linear_needs_a_surrogate(trained, which):
    _, X, y, loader = trained
    torch.manual_seed(0)
    if which == "conv_output":
        model = nn.Sequential(nn.Unflatten(1, (1, D)), nn.Conv1d(1, C, D), nn.Flatten())
    else:
        model = nn.Linear(D, C)
    la = fastlla.ScaLLA(model, "classification", n_features=4)
    with pytest.raises(ValueError, match="pass surrogate="):
        la.fit(loader, iterations=1, progress_bar=False)
    assert la.surrogate is None and not la._fitted  # a refused fit leaves it unfitted


def test_regression_logits_affine_after_the_last_linear_agrees_with_exact_lla():
    """Regression: ``2f + 1`` falls back and is held to the untransformed network's fidelity
    with the same kind of surrogate (the NTK scales by 4; so do ExactLLA's variances' terms)."""
    g = torch.Generator().manual_seed(5)
    X = torch.rand(80, 2, generator=g) * 4 - 2
    Y = torch.sin(X.sum(1, keepdim=True)) + 0.1 * torch.randn(80, 1, generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        (net(X) - Y).square().mean().backward()
        opt.step()
    net.eval()
    loader = DataLoader(TensorDataset(X, Y), batch_size=40)
    errors = {}
    for name, model, kw in (
        ("base", net, dict(last_layer=False, gate=False)),
        ("affine", Transformed(net, "affine"), {}),
    ):
        _, S_ex = fastlla.ExactLLA(model, "regression", sigma_noise=0.1).fit(loader).predictive_distribution(X)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            la = fastlla.ScaLLA(model, "regression", sigma_noise=0.1, n_features=32, **kw).fit(
                loader, iterations=200, progress_bar=False
            )
        assert any("assumes nothing" in str(w.message) for w in caught) == (name == "affine")
        _, S = la.predictive_distribution(X)
        errors[name] = (_relative(S, S_ex), float(S.mean() / S_ex.mean()))
    print(errors)
    assert errors["affine"][0] <= 1.5 * errors["base"][0] + 0.05
    assert 0.75 <= errors["affine"][1] <= 1.33
