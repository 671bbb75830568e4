"""Standard layers through fastlla's JVPs: a zoo of small networks against reverse mode.

Each network (≤ ~2k parameters) runs in float32 and float64. The JVP targets ScaLLA trains on
(``ProjectionSampler.project``, i.e. ``NetworkFunction.jvp`` under ``forward_ad_kernels``) are
compared with ``J(x) v`` from an explicit float64 Jacobian built row by row with
``torch.autograd.grad`` (reverse mode, SDPA math backend) — independent of fastlla. A short ScaLLA
fit (kernel matching, residual ``"jvp"`` mode, ``kernel_fidelity(method="jvp")``) and an
ExactLLA fit must run, and torch's global kernel flags (oneDNN, cuDNN, the MHA fast path, the
SDPA backends) must be the same after every call as before.

Several networks take the kernels that have no forward-mode derivative when nothing switches
them (the MHA / TransformerEncoder fast path, SDPA flash attention on CPU, oneDNN RNN in
float32); ``test_zoo_reaches_kernels_without_forward_ad`` checks that they do.
"""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastlla
from fastlla.forward_ad import forward_ad_kernels
from fastlla.functional import NetworkFunction
from fastlla.projections import ProjectionSampler
from testing import DTYPES, assert_close, call_model, oracle_jacobian

# torch's forward-mode AD scripts its JVP decompositions on first use (a torch-internal warning).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

N, L, D = 12, 5, 8  # inputs, sequence length, model width


def flags() -> tuple:
    """torch's process-global kernel switches, read through torch's public API."""
    cuda = torch.backends.cuda
    return (
        torch.backends.mkldnn.enabled,
        torch.backends.cudnn.enabled,
        torch.backends.mha.get_fastpath_enabled(),
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        cuda.math_sdp_enabled(),
        cuda.cudnn_sdp_enabled(),
    )


# ---------------------------------------------------------------------------------- the zoo
class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.pool = nn.AdaptiveMaxPool1d(3)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.pool(F.gelu(self.conv(x))).flatten(1))


class ConvResNet(nn.Module):
    """Conv2d, BatchNorm2d (eval, non-trivial statistics), a residual block, max/avg pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 1.5)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = F.max_pool2d(h + F.silu(self.block(h)), 2)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln = nn.Linear(5, 8), nn.LayerNorm(8)
        self.fc2, self.gn = nn.Linear(8, 8), nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = F.silu(self.ln(self.fc1(x)))
        return self.head(torch.tanh(self.gn(self.fc2(h))))


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids).mean(1)))


class RecurrentNet(nn.Module):
    def __init__(self, kind: str, layers: int = 1, pool: str = "last"):
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 6, num_layers=layers, batch_first=True)
        self.pool = pool
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1] if self.pool == "last" else out.mean(1))


class AttentionNet(nn.Module):
    """Self-attention with ``nn.MultiheadAttention`` (q, k, v the same tensor: fast path)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((h + a).mean(1))


class EncoderLayerNet(nn.Module):
    def __init__(self, norm_first: bool):
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.enc = nn.TransformerEncoderLayer(
            D, 2, dim_feedforward=16, dropout=0.1, batch_first=True, norm_first=norm_first
        )
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)).mean(1))


class DecoderLayerNet(nn.Module):
    """Two inputs (a dict batch): target sequence and memory."""

    def __init__(self, norm_first: bool):
        super().__init__()
        self.tgt, self.mem = nn.Linear(3, D), nn.Linear(3, D)
        self.dec = nn.TransformerDecoderLayer(
            D, 2, dim_feedforward=16, dropout=0.1, batch_first=True, norm_first=norm_first
        )
        self.head = nn.Linear(D, 2)

    def forward(self, tgt, memory):
        return self.head(self.dec(self.tgt(tgt), self.mem(memory)).mean(1))


class MaskedEncoderNet(nn.Module):
    """``nn.TransformerEncoder`` with every fast-path condition met (eval, batch_first, a key
    padding mask: nested tensors); masked mean pooling, as a text classifier does."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, D)
        layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=16, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x, mask):
        h = self.enc(self.inp(x), src_key_padding_mask=~mask)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


class SDPANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(3, 3 * D)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(a.transpose(1, 2).reshape(B, T, D).mean(1))


def _sequence(g, dtype):
    return torch.randn(N, L, 3, generator=g, dtype=torch.float64).to(dtype)


ZOO = {
    # name: (constructor, inputs(generator, dtype), likelihood)
    "conv1d": (Conv1dNet, lambda g, dt: torch.randn(N, 2, 8, generator=g).to(dt), "classification"),
    "conv2d_bn_residual": (
        ConvResNet, lambda g, dt: torch.randn(N, 1, 6, 6, generator=g).to(dt), "classification"
    ),
    "layernorm_groupnorm": (
        NormNet, lambda g, dt: torch.randn(N, 5, generator=g).to(dt), "regression"
    ),
    "embedding": (  # integer inputs
        EmbeddingNet, lambda g, dt: torch.randint(0, 20, (N, L), generator=g), "classification"
    ),
    "rnn_last": (lambda: RecurrentNet("RNN"), _sequence, "regression"),
    "lstm2_last": (lambda: RecurrentNet("LSTM", layers=2), _sequence, "regression"),
    "gru_mean": (lambda: RecurrentNet("GRU", pool="mean"), _sequence, "classification"),
    "multihead_attention": (AttentionNet, _sequence, "classification"),
    "encoder_layer_post_norm": (lambda: EncoderLayerNet(False), _sequence, "classification"),
    "encoder_layer_pre_norm": (lambda: EncoderLayerNet(True), _sequence, "regression"),
    "decoder_layer_post_norm": (
        lambda: DecoderLayerNet(False),
        lambda g, dt: {"tgt": _sequence(g, dt)[:, :4], "memory": _sequence(g, dt)},
        "classification",
    ),
    "decoder_layer_pre_norm": (
        lambda: DecoderLayerNet(True),
        lambda g, dt: {"tgt": _sequence(g, dt)[:, :4], "memory": _sequence(g, dt)},
        "regression",
    ),
    "transformer_encoder_fast_path": (
        MaskedEncoderNet,
        lambda g, dt: {
            "x": _sequence(g, dt),
            "mask": torch.arange(L) < torch.randint(2, L + 1, (N, 1), generator=g),
        },
        "classification",
    ),
    "scaled_dot_product_attention": (SDPANet, _sequence, "regression"),
}


def build(name: str, dtype: torch.dtype):
    make_model, make_inputs, likelihood = ZOO[name]
    torch.manual_seed(0)
    model = make_model().to(dtype).eval()
    x = make_inputs(torch.Generator().manual_seed(1), dtype)
    return model, x, likelihood


def reverse_mode_jacobian(model, x):
    """(N, C, P) in float64 from a float64 copy of the model: the oracle (math SDPA kernels)."""
    model64 = copy.deepcopy(model).double()
    def up(v):
        return v.double() if v.is_floating_point() else v

    x64 = {k: up(v) for k, v in x.items()} if isinstance(x, dict) else up(x)
    with sdpa_kernel(SDPBackend.MATH):
        return oracle_jacobian(model64, x64)


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(ZOO))
def test_jvp_targets_match_reverse_mode_jacobian(name, dtype):
    model, x, _ = build(name, dtype)
    assert sum(p.numel() for p in model.parameters()) <= 2200
    before = flags()
    net = NetworkFunction(model)
    sampler = ProjectionSampler(net, 3, "gaussian", seed=1)
    tangents = sampler.tangents(0, torch.device("cpu"), dtype)
    f, z = sampler.project(x, 0, tangents)
    assert flags() == before
    J = reverse_mode_jacobian(model, x)  # (N, C, P)
    V = torch.cat([tangents[n].reshape(3, -1) for n in net.names], dim=1).double()  # (S, P)
    assert z.shape == (3, *J.shape[:2]) and z.dtype == dtype
    assert_close(z, torch.einsum("bcp,sp->sbc", J, V), dtype, scale=5.0)
    with torch.no_grad():
        assert_close(f, call_model(model, x).reshape(f.shape), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(ZOO))
def test_short_fits_leave_the_kernel_flags_alone(name, dtype):
    model, x, likelihood = build(name, dtype)
    g = torch.Generator().manual_seed(2)
    C = model.head.out_features
    if likelihood == "classification":
        y = torch.randint(0, C, (N,), generator=g)
    else:
        y = torch.randn(N, C, generator=g, dtype=torch.float64).to(dtype)
    half = N // 2
    def take(a, b):
        return {k: v[a:b] for k, v in x.items()} if isinstance(x, dict) else x[a:b]

    loader = [(take(0, half), y[:half]), (take(half, N), y[half:])]
    before = flags()
    sc = fastlla.ScaLLA(model, likelihood, n_features=8, residual_variance="jvp", head_width=16)
    sc.fit(loader, iterations=3, n_projections=4, progress_bar=False)
    assert flags() == before
    mean, cov = sc.predictive_distribution(take(0, 3))  # residual "jvp": 64 JVPs
    assert flags() == before
    assert mean.shape == (3, C) and cov.shape == (3, C, C) and torch.isfinite(cov).all()
    assert float(torch.linalg.eigvalsh(cov.double()).min()) > -1e-6 * float(cov.abs().max())
    err = sc.kernel_fidelity(take(0, 4), method="jvp", n_projections=4)
    assert flags() == before and err >= 0
    ex = fastlla.ExactLLA(model, likelihood).fit(loader)
    _, cov_ex = ex.predictive_distribution(take(0, 3))
    assert flags() == before and torch.isfinite(cov_ex).all()


def _raw_jvp(model, x):
    """``vmap(jvp)`` of the model's outputs, with whatever kernels torch picks by default."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.randn(2, *p.shape, dtype=p.dtype) for n, p in params.items()}

    def one(t):
        return jvp(lambda p: call_model_functional(model, p, x), (params,), (t,))[1]

    with torch.no_grad():
        return vmap(one)(tangents)


def call_model_functional(model, params, x):
    args, kwargs = ((), x) if isinstance(x, dict) else ((x,), {})
    return torch.func.functional_call(model, params, args, kwargs)


@pytest.mark.parametrize(
    "name,op",
    [
        ("lstm2_last", "mkldnn_rnn_layer"),
        ("multihead_attention", "_native_multi_head_attention"),
        ("encoder_layer_post_norm", "_transformer_encoder_layer_fwd"),
        ("transformer_encoder_fast_path", "_nested_tensor_from_mask|_transformer_encoder_layer_fwd"),
        ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"),
    ],
)
def test_zoo_reaches_kernels_without_forward_ad(name, op):
    """Without fastlla's switches these float32 networks hit kernels lacking forward AD (so the
    zoo does test the switches). Fails if a torch release adds forward AD to them: then the
    switches may be relaxed."""
    if name == "lstm2_last" and not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    model, x, _ = build(name, torch.float32)
    before = flags()
    with pytest.raises(NotImplementedError, match=op):
        _raw_jvp(model, x)
    assert flags() == before
    z = _raw_jvp_inside(model, x)
    assert torch.isfinite(z).all() and flags() == before


def _raw_jvp_inside(model, x):
    with forward_ad_kernels():
        return _raw_jvp(model, x)


def test_user_settings_are_restored_not_reset():
    """Non-default flags the user chose come back as they were (not torch's defaults)."""
    saved = flags()
    model, x, _ = build("lstm2_last", torch.float32)
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_math_sdp(False)  # the context turns math on, then off again
        torch._C._set_mkldnn_enabled(False)
        chosen = flags()
        net = NetworkFunction(model)
        net.jvp(x, net.unflatten(torch.randn(2, net.n_params)))
        assert flags() == chosen
    finally:
        torch.backends.mha.set_fastpath_enabled(saved[2])
        torch.backends.cuda.enable_flash_sdp(saved[3])
        torch.backends.cuda.enable_math_sdp(saved[5])
        torch._C._set_mkldnn_enabled(saved[0])
    assert flags() == saved


def test_nested_and_concurrent_users_restore_once():
    """Two threads overlap in ``forward_ad_kernels``: the one leaving first must not restore the
    flags under the other; the last one out restores them."""
    before = flags()
    safe_rnn = (False, False, False, False, False, True, False)
    inside, release, done = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def holder():
        with forward_ad_kernels(rnn=True):
            inside.set()
            release.wait(10)
            seen.append(flags())
        done.set()

    t = threading.Thread(target=holder)
    t.start()
    assert inside.wait(10)
    with forward_ad_kernels(rnn=False):  # nested attention-only user, leaves first
        with forward_ad_kernels():  # re-entrant in this thread
            assert flags() == safe_rnn
        assert flags() == safe_rnn
    assert flags() == safe_rnn  # the other thread is still inside
    release.set()
    assert done.wait(10)
    t.join()
    assert seen == [safe_rnn]
    assert flags() == before
    with forward_ad_kernels(rnn=False):  # attention only: oneDNN / cuDNN untouched
        assert flags()[:2] == before[:2] and flags()[2:] == safe_rnn[2:]
    assert flags() == before


class _NoJVP(torch.autograd.Function):
    """tanh with a backward (and vmap rule) but no forward-mode derivative."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class NoJVPAct(nn.Module):
    def forward(self, x):
        return _NoJVP.apply(x)


def test_op_without_forward_ad_is_named_with_its_module():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), NoJVPAct())
    model = nn.Sequential(nn.Linear(3, 4), inner, nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    before = flags()
    la = fastlla.ScaLLA(model, "classification", n_features=4)
    named = r"custom autograd\.Function in module '1\.1' \(NoJVPAct\)"
    with pytest.raises(NotImplementedError, match=named):
        la.fit([(x, y)], iterations=2, progress_bar=False)
    assert flags() == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    ex = fastlla.ExactLLA(model, "classification").fit([(x, y)])  # reverse mode works
    assert torch.isfinite(ex.predictive_distribution(x)[1]).all()


# ------------------------------------------------------------------ networks fastlla refuses
class MCDropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(F.dropout(torch.relu(self.fc1(x)), p=0.2, training=True))


@pytest.mark.parametrize("estimator", ["ScaLLA", "ExactLLA"])
def test_network_random_in_eval_mode_is_refused(estimator):
    torch.manual_seed(0)
    X, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    la = getattr(fastlla, estimator)(MCDropoutNet(), "classification")
    kwargs = {"iterations": 2, "progress_bar": False} if estimator == "ScaLLA" else {}
    with pytest.raises(ValueError, match="random in eval mode"):
        la.fit([(X[:10], y[:10]), (X[10:], y[10:])], **kwargs)


@pytest.mark.parametrize("estimator", ["ScaLLA", "ExactLLA"])
def test_probability_outputs_warn_and_logits_do_not(estimator):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    kwargs = {"iterations": 2, "progress_bar": False} if estimator == "ScaLLA" else {}
    make = getattr(fastlla, estimator)
    with pytest.warns(UserWarning, match="look like probabilities"):
        make(nn.Sequential(net, nn.Softmax(dim=-1)), "classification").fit([(X, y)], **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make(net, "classification").fit([(X, y)], **kwargs)
    assert not [w for w in caught if "probabilities" in str(w.message)]


@pytest.mark.parametrize("estimator", ["ScaLLA", "ExactLLA"])
def test_input_without_batch_dimension_is_refused(estimator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))  # 1 output: no shape clash
    X, y = torch.randn(20, 6), torch.randn(20)
    kwargs = {"iterations": 2, "progress_bar": False} if estimator == "ScaLLA" else {}
    la = getattr(fastlla, estimator)(model, "regression").fit([(X, y)], **kwargs)
    with pytest.raises(ValueError, match="need a batch dimension"):
        la(X[0])
    mean, var = la(X[:1])
    assert mean.shape == (1, 1) and var.shape == (1, 1, 1)
