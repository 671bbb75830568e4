"""A Hugging Face ``transformers`` BERT through fastlla: dict batches, SDPA attention, frozen layers.

The network is ``BertForSequenceClassification`` from a tiny randomly initialised ``BertConfig``
(no weights are downloaded) with ``attn_implementation="sdpa"``, the default of
``AutoModel.from_pretrained``; on CPU its attention takes the flash kernel, which has no
forward-mode derivative unless fastlla switches it (checked below). It is used as the README
recommends: a wrapper module returning the logits, fed dict batches
``{"input_ids", "attention_mask", "labels"}`` (laplace-torch's ``dict_key_y``), with padded
sequences of different lengths.

Oracle: ``J(x)`` from one ``torch.autograd.grad`` call per input and output on a float64 copy
(``tests/testing.py: oracle_jacobian``, math SDPA backend), independent of fastlla. ScaLLA's JVP
targets must equal ``J(x) v``, ExactLLA's Jacobians must equal ``J(x)``, and both estimators
must fit — over all parameters and over the top block + head with the rest frozen.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastlla
from fastlla.forward_ad import forward_ad_kernels
from fastlla.functional import NetworkFunction
from fastlla.projections import ProjectionSampler
from testing import DTYPES, assert_close, oracle_jacobian

transformers = pytest.importorskip("transformers")

# torch-internal warnings: forward-mode AD scripts its JVP decompositions on first use; ExactLLA's
# vmapped reverse mode falls back to a loop over the flash SDPA kernel's backward (slower, exact).
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]

N, T, VOCAB, C = 6, 7, 50, 3
LENGTHS = [7, 5, 3, 7, 2, 6]  # padded batch: every row but two has masked positions


class Logits(nn.Module):
    """A Hugging Face classifier as fastlla takes it: keyword inputs in, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def bert(dtype: torch.dtype = torch.float32) -> Logits:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=C,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).to(dtype).eval()
    assert model.config._attn_implementation == "sdpa"
    return Logits(model)


def freeze_below_top_block(net: Logits) -> Logits:
    """Only the last encoder block, the pooler and the classifier stay trainable."""
    net.requires_grad_(False)
    bert_model = net.model.bert
    for part in (bert_model.encoder.layer[-1], bert_model.pooler, net.model.classifier):
        part.requires_grad_(True)
    return net


def batch(seed: int = 0, n: int = N) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor((LENGTHS * n)[:n])
    return {
        "input_ids": torch.randint(1, VOCAB, (n, T), generator=g),
        "attention_mask": (torch.arange(T) < lengths[:, None]).long(),
        "labels": torch.randint(0, C, (n,), generator=g),
    }


def inputs(b: dict) -> dict:
    return {k: v for k, v in b.items() if k != "labels"}


def reverse_mode_jacobian(net: nn.Module, x: dict) -> torch.Tensor:
    """(N, C, P) in float64, trainable parameters in the model's order (math SDPA kernels)."""
    with sdpa_kernel(SDPBackend.MATH):
        return oracle_jacobian(copy.deepcopy(net).double(), x)


def flags() -> tuple:
    cuda = torch.backends.cuda
    return (
        torch.backends.mha.get_fastpath_enabled(),
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        cuda.math_sdp_enabled(),
    )


def test_sdpa_attention_needs_fastllas_kernel_switch():
    """Without fastlla's context, a JVP through this BERT reaches the flash SDPA kernel, which
    has no forward-mode derivative; so the tests below do test the switch."""
    net, x = bert(), inputs(batch())
    params = {n: p.detach() for n, p in net.named_parameters()}
    tangents = {n: torch.randn(2, *p.shape) for n, p in params.items()}

    def one(t):
        return jvp(lambda p: functional_call(net, p, (), x), (params,), (t,))[1]

    with torch.no_grad(), pytest.raises(NotImplementedError, match="scaled_dot_product"):
        vmap(one)(tangents)
    before = flags()
    with torch.no_grad(), forward_ad_kernels(rnn=False):
        assert torch.isfinite(vmap(one)(tangents)).all()
    assert flags() == before


@pytest.mark.parametrize("frozen", [False, True], ids=["all", "top_block"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_jvps_and_jacobians_match_explicit_jacobians(dtype, frozen):
    net = bert(dtype)
    if frozen:
        freeze_below_top_block(net)
    x = inputs(batch())
    J = reverse_mode_jacobian(net, x)  # (N, C, P)
    P = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert J.shape == (N, C, P) and float(J.abs().max()) > 0
    assert (P < sum(p.numel() for p in net.parameters())) == frozen

    # ScaLLA's training targets: z_s = J(x) v_s by forward-mode AD through SDPA attention
    network = NetworkFunction(net)
    assert network.n_params == P
    sampler = ProjectionSampler(network, 3, "gaussian", seed=1)
    tangents = sampler.tangents(0, torch.device("cpu"), dtype)
    before = flags()
    f, z = sampler.project(x, 0, tangents)
    assert flags() == before
    V = torch.cat([tangents[n].reshape(3, -1) for n in network.names], dim=1).double()
    assert z.shape == (3, N, C) and z.dtype == dtype
    assert_close(z, torch.einsum("bcp,sp->sbc", J, V), dtype, scale=5.0)
    with torch.no_grad():
        assert_close(f, net(**x), dtype)

    # ExactLLA's explicit Jacobians (reverse mode, fastlla's chunks) against the oracle
    ex = fastlla.ExactLLA(net, "classification")
    assert_close(ex._jacobians(x), J, dtype, scale=5.0)


@pytest.mark.parametrize("frozen", [False, True], ids=["all", "top_block"])
def test_scalla_and_exactlla_fit_on_dict_batches(frozen):
    net = bert()
    if frozen:
        freeze_below_top_block(net)
    loader = [batch(0), batch(1)]  # dict batches; "labels" is laplace-torch's dict_key_y
    test = inputs(batch(2, n=4))
    before = flags()
    sc = fastlla.ScaLLA(net, "classification", n_features=8, head_width=16)
    sc.fit(loader, iterations=3, n_projections=4, progress_bar=False)
    ex = fastlla.ExactLLA(net, "classification").fit(loader)
    assert flags() == before
    assert sc.network.n_params == ex.n_params == sum(
        p.numel() for p in net.parameters() if p.requires_grad
    )
    with torch.no_grad():
        logits = net(**test)
    for la in (sc, ex):
        mean, cov = la.predictive_distribution(test)
        assert_close(mean, logits, torch.float32)
        assert cov.shape == (4, C, C) and torch.isfinite(cov).all()
        assert float(torch.linalg.eigvalsh(cov.double()).min()) > -1e-6 * float(cov.abs().max())
        probs = la(test)
        assert torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-5)
    # ScaLLA's kernel error from its own Jacobians against the oracle's NTK
    with torch.no_grad():
        phi = sc._surrogate_features(test).double()  # (B, M, C)
    rows = phi.permute(0, 2, 1).reshape(-1, phi.shape[1])
    J = reverse_mode_jacobian(net, test).reshape(rows.shape[0], -1)
    kappa = J @ J.mT
    expected = float(torch.linalg.norm(rows @ rows.mT - kappa) / torch.linalg.norm(kappa))
    assert sc.kernel_fidelity(test, method="exact") == pytest.approx(expected, rel=1e-3)
    assert sc.kernel_fidelity(test, method="jvp", n_projections=8) >= 0
    assert flags() == before


def test_model_output_object_is_refused_with_the_fix():
    """The bare Hugging Face model returns a ModelOutput, not a tensor: a clear error."""
    net = bert().model
    for make in (fastlla.ScaLLA, fastlla.ExactLLA):
        la = make(net, "classification")
        kwargs = {"iterations": 1, "progress_bar": False} if make is fastlla.ScaLLA else {}
        with pytest.raises(TypeError, match=r"SequenceClassifierOutput.*\.logits"):
            la.fit([batch()], **kwargs)
