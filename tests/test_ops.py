"""Tests of the fastlla ops (``torch.ops.fastlla.*``), whichever backend implements them.

Every op is compared with its pure-PyTorch reference (:mod:`fastlla.reference`) and, because the
op *is* the reference when the compiled library is disabled, with at least one independent
oracle: the materialised BC×BC loss, an explicit per-sample GGN, ``cholesky(LLᵀ ± WWᵀ)``,
``Φᵀ A⁻¹ Φ`` through ``torch.linalg.inv``, a pure-Python lowbias32 and sample statistics.
Also: gradcheck, opcheck, torch.compile, bad inputs (same message on the native and the
reference path), the schema mirror and the backend report.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from testing import (  # noqa: F401  (fixtures)
    DEVICES,
    NATIVE,
    assert_close,
    device,
    dtype,
    eps_tolerance,
    make,
    random_factor,
    strided,
)

import fastlla._ops as ops
from fastlla import reference

F = torch.ops.fastlla


# --------------------------------------------------------------------------- registration
def test_schemas_match_registered_ops():
    for name, schema in ops.SCHEMAS.items():
        registered = str(getattr(F, name).default._schema)
        assert registered == f"fastlla::{name}{schema}"


def test_backends_report_native_cpu_when_loaded():
    assert set(ops.BACKENDS) == set(ops.SCHEMAS)
    for name, per_device in ops.BACKENDS.items():
        assert set(per_device) == {"CPU", "CUDA"}
        if NATIVE:
            assert per_device["CPU"] == "native", name
        else:
            assert per_device["CPU"] == "reference", name
    assert "fastlla native library" in ops.backend_report()
    version = ops.cuda_version()
    assert isinstance(version, int) and (version == -1 or version >= 1000)


# --------------------------------------------------------------------------- loss
def materialised_loss(phi, z, n_train):
    """The authors' formulation: mean((ΦΦᵀ − K̂)²) over the BC×BC Gram, cross blocks zeroed."""
    R = phi.shape[0]
    target = z @ z.T
    mask = torch.zeros(R, R, dtype=torch.bool, device=phi.device)
    mask[:n_train, :n_train] = True
    mask[n_train:, n_train:] = True
    return ((phi @ phi.T - target * mask) ** 2).mean()


LOSS_SHAPES = [  # (R, M, S, n_train or None = all rows)
    (1, 1, 1, None),
    (6, 4, 1, 3),
    (30, 7, 5, None),
    (30, 7, 5, 0),
    (30, 7, 5, 11),
    (30, 7, 5, 29),
    (40, 520, 3, 20),  # large M
    (0, 5, 2, None),  # zero rows
]


@pytest.mark.parametrize("R,M,S,n_train", LOSS_SHAPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_kernel_matching_loss(device, dtype, R, M, S, n_train, contiguous):
    n = R if n_train is None else n_train
    phi = make(R, M, dtype=dtype, device=device, seed=1, scale=0.3)
    z = make(R, S, dtype=dtype, device=device, seed=2)
    if not contiguous:
        phi, z = strided(phi), strided(z)
    phi_ref = phi.detach().double().requires_grad_()
    z_ref = z.detach().double().requires_grad_()
    if R == 0:
        expected = phi_ref.sum() * 0 + z_ref.sum() * 0
    else:
        expected = materialised_loss(phi_ref, z_ref, n)
    expected.backward()

    a, b = phi.detach().requires_grad_(), z.detach().requires_grad_()
    loss = ops.kernel_matching_loss(a, b, n)
    assert loss.shape == () and loss.dtype == dtype and loss.device.type == device
    loss.backward()
    assert_close(loss.detach(), expected.detach(), dtype)
    assert_close(a.grad, phi_ref.grad, dtype)
    assert_close(b.grad, z_ref.grad, dtype)
    # Against the reference (the oracle of the native kernel) in the same dtype.
    got = F.kernel_matching_loss(phi, z, n)
    assert_close(got, reference.kernel_matching_loss(phi, z, n), dtype)
    grad = torch.tensor(0.7, dtype=dtype, device=device)
    for got, want in zip(
        F.kernel_matching_loss_backward(grad, phi, z, n),
        reference.kernel_matching_loss_backward(grad, phi, z, n),
    ):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("n_train", [0, 4, 10])
def test_kernel_matching_loss_gradcheck(device, n_train):
    phi = make(10, 4, dtype=torch.float64, device=device, seed=3).requires_grad_()
    z = make(10, 3, dtype=torch.float64, device=device, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, q: ops.kernel_matching_loss(p, q, n_train), (phi, z))


def test_kernel_matching_loss_1e10_against_materialised_bbcc(device):
    """Value and gradient equal the B×B×C×C formulation to 1e-10 relative (float64)."""
    B, C, M, S = 6, 3, 5, 4
    phi = make(B * C, M, dtype=torch.float64, device=device, seed=5).requires_grad_()
    z = make(B * C, S, dtype=torch.float64, device=device, seed=6)
    g = phi.reshape(B, C, M)
    zz = z.reshape(B, C, S)
    q = torch.einsum("icm,jdm->ijcd", g, g)
    k = torch.einsum("ics,jds->ijcd", zz, zz)
    expected = ((q - k) ** 2).mean()
    (grad_expected,) = torch.autograd.grad(expected, phi)
    loss = ops.kernel_matching_loss(phi, z)
    (grad,) = torch.autograd.grad(loss, phi)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10 * float(expected.abs()))
    torch.testing.assert_close(
        grad, grad_expected, rtol=1e-10, atol=1e-10 * float(grad_expected.abs().max())
    )


# --------------------------------------------------------------------------- GGN
def explicit_ggn(phi, logits):
    """Σ_n Φ_n Λ_n Φ_nᵀ with Λ_n built explicitly per input (float64)."""
    phi = phi.double()
    N, M, C = phi.shape
    if logits is None:
        lam = torch.eye(C, dtype=torch.float64, device=phi.device).expand(N, C, C)
    else:
        p = torch.softmax(logits.double(), dim=-1)
        lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.einsum("nmc,ncd,nkd->mk", phi, lam, phi)


GGN_SHAPES = [(1, 1, 1), (1, 3, 1), (7, 5, 4), (300, 9, 10), (0, 4, 3), (8, 512, 3)]


@pytest.mark.parametrize("N,M,C", GGN_SHAPES)
@pytest.mark.parametrize("classification", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
def test_ggn_accumulate(device, dtype, N, M, C, classification, contiguous):
    phi = make(N, M, C, dtype=dtype, device=device, seed=7)
    logits = make(N, C, dtype=dtype, device=device, seed=8, scale=2.0) if classification else None
    h0 = make(M, M, dtype=dtype, device=device, seed=9)
    if not contiguous:
        phi = strided(phi)
        logits = strided(logits) if logits is not None else None
    expected = h0.double() + explicit_ggn(phi, logits)
    h = h0.clone()
    ptr = h.data_ptr()
    out = ops.ggn_accumulate(h, phi, logits)
    assert out is h and h.data_ptr() == ptr  # in place
    assert_close(h, expected, dtype, scale=2)
    h_ref = h0.clone()
    reference.ggn_accumulate(h_ref, phi, logits)
    assert_close(h, h_ref, dtype, scale=2)


# --------------------------------------------------------------------------- Cholesky update
CHOL_SHAPES = [(1, 1), (1, 0), (5, 1), (5, 3), (64, 4), (520, 2)]


@pytest.mark.parametrize("M,k", CHOL_SHAPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_cholesky_update_and_downdate(device, dtype, M, k, contiguous):
    L = random_factor(M, dtype, device, seed=M)
    W = make(M, k, dtype=dtype, device=device, seed=10, scale=0.5)
    if not contiguous:
        L, W = strided(L), strided(W)
    A = L.double() @ L.double().T
    Wd = W.double()
    up = F.cholesky_update(L, W, False)
    assert up.is_contiguous() and up.dtype == dtype
    assert_close(up, torch.linalg.cholesky(A + Wd @ Wd.T), dtype, scale=10)
    assert_close(up, reference.cholesky_update(L, W, False), dtype, scale=10)
    assert torch.equal(up.triu(1), torch.zeros_like(up))
    # Downdating the update gives L back.
    down = ops.cholesky_update(up, W, downdate=True)
    assert_close(down, L.contiguous(), dtype, scale=100)


def test_cholesky_update_negative_diagonal_factor(device):
    L = random_factor(6, torch.float64, device, seed=1)
    flipped = L * torch.tensor([1.0, -1, 1, -1, -1, 1], dtype=torch.float64, device=device)
    W = make(6, 2, dtype=torch.float64, device=device, seed=2)
    expected = torch.linalg.cholesky(L @ L.T + W @ W.T)
    torch.testing.assert_close(ops.cholesky_update(flipped, W), expected)


def test_cholesky_downdate_not_positive_definite(device, dtype):
    L = random_factor(8, dtype, device)
    W = make(8, 1, dtype=dtype, device=device, scale=10.0)
    with pytest.raises(RuntimeError, match="fastlla::cholesky_update: the downdated matrix is not"):
        ops.cholesky_update(L, W, downdate=True)


# --------------------------------------------------------------------------- predictive
# The CPU kernel solves directly when B·C < 2M and otherwise forms L⁻¹ and runs register blocks
# of up to 12 rows (c) against two-vector panels: the shapes reach both paths, one input per
# block (C ≥ 7), several (C = 1, packed C ≤ 6), several blocks per input (C = 13), the BLAS Gram
# (C > 16), and M off the panel width (16 float64 / 32 float32 columns), large M included.
PRED_SHAPES = [
    (1, 1, 1), (4, 6, 1), (5, 7, 3), (1024 // 8, 40, 10), (0, 4, 2), (3, 512, 2),
    (40, 9, 1), (30, 17, 3), (9, 33, 13), (5, 20, 25), (103, 520, 10),
]


@pytest.mark.parametrize("B,M,C", PRED_SHAPES)
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("isa", ["avx512", "blas"])
def test_predictive_covariance_and_variance(device, dtype, B, M, C, contiguous, isa, monkeypatch):
    # On CPUs with AVX-512 the kernel uses its own micro-kernel unless told not to (then BLAS).
    if isa == "blas":
        monkeypatch.setenv("FASTLLA_DISABLE_AVX512", "1")
    L = random_factor(M, dtype, device, seed=11)
    phi = make(B, M, C, dtype=dtype, device=device, seed=12)
    if not contiguous:
        L, phi = strided(L), strided(phi)
    Ld = L.double()
    A_inv = torch.linalg.inv(Ld @ Ld.T)
    expected = phi.double().mT @ A_inv @ phi.double()
    cov = ops.predictive_covariance(L, phi)
    var = ops.predictive_variance(L, phi)
    assert cov.shape == (B, C, C) and var.shape == (B, C)
    assert_close(cov, expected, dtype, scale=10)
    assert_close(var, torch.diagonal(expected, dim1=-2, dim2=-1), dtype, scale=10)
    assert_close(cov, reference.predictive_covariance(L, phi), dtype, scale=10)
    assert_close(var, reference.predictive_variance(L, phi), dtype, scale=10)


# --------------------------------------------------------------------------- random numbers
def lowbias32(x: int) -> int:
    """Pure-Python uint32 'lowbias32' (independent of the reference's int64 emulation)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def python_hash4(a: int, b: int, c: int, d: int) -> int:
    h = lowbias32((a & 0xFFFFFFFF) ^ 0x9E3779B9)
    h = lowbias32(h ^ (b & 0xFFFFFFFF))
    h = lowbias32(h ^ (c & 0xFFFFFFFF))
    return lowbias32(h ^ (d & 0xFFFFFFFF))


def python_normal(seed: int, step: int, row: int, col: int) -> float:
    u1 = (python_hash4(seed, step, 2 * row, col) + 0.5) / 2**32
    u2 = (python_hash4(seed, step, 2 * row + 1, col) + 0.5) / 2**32
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def test_lowbias32_known_values():
    # Published test vector of lowbias32 (Wellons' hash-prospector): lowbias32(0) == 0.
    assert lowbias32(0) == 0
    got = reference.hash4(1, 2, torch.tensor([3, 2**32 - 1]), torch.tensor([4, 5]))
    assert got.tolist() == [python_hash4(1, 2, 3, 4), python_hash4(1, 2, 2**32 - 1, 5)]


@pytest.mark.parametrize("S,P", [(1, 1), (3, 257), (2, 5000), (0, 4), (2, 0)])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("seed,step", [(0, 0), (-3, 2**33 + 5)])
def test_random_tangents(device, dtype, S, P, distribution, seed, step):
    out = torch.full((S, P), float("nan"), dtype=dtype, device=device)
    ptr = out.data_ptr()
    assert ops.random_tangents(out, seed, step, distribution) is out and out.data_ptr() == ptr
    expected = torch.empty(S, P, dtype=dtype, device=device)
    reference.random_tangents(expected, seed, step, distribution)
    if distribution == "rademacher":
        assert torch.equal(out, expected)  # bit-for-bit
        assert bool(((out == 1) | (out == -1)).all())
    else:
        # Same counters; only libm's log/cos may differ from torch's in the last bit.
        # Box–Muller: a log, a sqrt and a cos, each within a few ulps, on values of order 1–5.
        tol = eps_tolerance(dtype, n=4)
        torch.testing.assert_close(out, expected, rtol=tol, atol=5 * tol)
    for s, p in [(0, 0), (S - 1, P - 1), (S // 2, P // 3)]:
        if S and P:
            if distribution == "rademacher":
                bit = python_hash4(seed, step, 2 * s, p) >> 31
                assert out[s, p].item() == 1 - 2 * bit
            else:
                assert out[s, p].item() == pytest.approx(python_normal(seed, step, s, p), rel=1e-6)
    again = torch.empty_like(out)
    ops.random_tangents(again, seed, step, distribution)
    assert torch.equal(out, again)  # regenerable from (seed, step)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_random_tangents_statistics(device, distribution):
    n = 40_000
    out = torch.empty(2, n // 2, dtype=torch.float64, device=device)
    ops.random_tangents(out, 11, 3, distribution)
    x = out.flatten()
    # E = 0, Var = 1 for both; the sample mean has sd 1/√n, the sample variance sd ≤ √(2/n)
    # (exactly 0 for ±1 entries), so 5 standard deviations of slack.
    assert abs(x.mean().item()) < 5 / math.sqrt(n)
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / n) + 1e-12
    if distribution == "gaussian":
        assert abs((x**4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # kurtosis of N(0, 1)
    other = torch.empty_like(out)
    ops.random_tangents(other, 11, 4, distribution)
    assert abs((x * other.flatten()).mean().item()) < 5 / math.sqrt(n)  # independent steps
    # Rows (tangents) are independent of each other too.
    assert abs((out[0] * out[1]).mean().item()) < 5 / math.sqrt(n / 2)


@pytest.mark.parametrize("B,C", [(1, 1), (7, 4), (0, 3), (33, 10)])
@pytest.mark.parametrize("n_samples", [1, 17])
def test_mc_softmax(device, dtype, B, C, n_samples):
    mean = make(B, C, dtype=dtype, device=device, seed=13)
    scale = make(B, C, C, dtype=dtype, device=device, seed=14, scale=0.5).tril()
    got = ops.mc_softmax(mean, strided(scale), n_samples, seed=5)
    assert got.shape == (B, C) and got.dtype == dtype
    assert_close(got, reference.mc_softmax(mean, scale, n_samples, 5), dtype, scale=5)
    if B:
        assert_close(got.sum(-1), torch.ones(B, dtype=dtype, device=device), dtype)
    # Independent oracle: the same draws from pure-Python normals.
    if B and n_samples == 1:
        b = B - 1
        eps = torch.tensor(
            [python_normal(5, 0, b, c) for c in range(C)], dtype=torch.float64, device=device
        )
        f = mean[b].double() + scale[b].double() @ eps
        assert_close(got[b], torch.softmax(f, -1), dtype, scale=5)


def test_mc_softmax_zero_scale_and_statistics(device):
    mean = make(5, 4, dtype=torch.float64, device=device, seed=15)
    zero = torch.zeros(5, 4, 4, dtype=torch.float64, device=device)
    torch.testing.assert_close(ops.mc_softmax(mean, zero, 3), torch.softmax(mean, -1))
    # C = 2, f = (σε, 0): E[softmax(f)_0] = E[sigmoid(σε)] = 1/2 by symmetry; B rows × S
    # samples are independent draws, each in [0, 1] (sd ≤ 1/2).
    B, S, sigma = 2000, 10, 2.0
    scale = torch.zeros(B, 2, 2, dtype=torch.float64, device=device)
    scale[:, 0, 0] = sigma
    got = ops.mc_softmax(torch.zeros(B, 2, dtype=torch.float64, device=device), scale, S, 9)
    assert abs(got[:, 0].mean().item() - 0.5) < 5 * 0.5 / math.sqrt(B * S)
    # and a positive σ spreads the draws: the row averages vary.
    assert got[:, 0].std().item() > 0.05


# --------------------------------------------------------------------------- opcheck, compile
def _opcheck_cases(device, dtype):
    kw = dict(dtype=dtype, device=device)
    phi = make(12, 5, **kw).requires_grad_()
    z = make(12, 3, seed=1, **kw).requires_grad_()
    L = random_factor(5, dtype, device)
    return {
        "kernel_matching_loss": (phi, z, 7),
        "kernel_matching_loss_backward": (
            torch.tensor(1.0, **kw), phi.detach(), z.detach(), 7),
        "ggn_accumulate": (make(5, 5, **kw), make(6, 5, 3, **kw), make(6, 3, **kw)),
        "cholesky_update": (L, make(5, 2, **kw), False),
        "predictive_covariance": (L, make(4, 5, 3, **kw)),
        "predictive_variance": (L, make(4, 5, 3, **kw)),
        "mc_softmax": (make(4, 3, **kw), make(4, 3, 3, **kw).tril(), 5, 1),
        "random_tangents": (torch.empty(2, 9, **kw), 1, 2, "gaussian"),
    }


@pytest.mark.parametrize("name", list(ops.SCHEMAS))
def test_opcheck(device, dtype, name):
    args = _opcheck_cases(device, dtype)[name]
    torch.library.opcheck(getattr(F, name).default, args)
    if name == "ggn_accumulate":  # the optional argument absent
        torch.library.opcheck(getattr(F, name).default, (args[0], args[1], None))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def step(phi, z, L, feats):
        loss = ops.kernel_matching_loss(phi, z, 6)
        cov = ops.predictive_covariance(L, feats)
        return loss, cov

    kw = dict(dtype=torch.float64, device=device)
    args = (make(10, 4, **kw), make(10, 2, seed=1, **kw), random_factor(4, torch.float64, device),
            make(3, 4, 2, seed=2, **kw))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), step(*args)):
        torch.testing.assert_close(got, want)
    # Gradients flow through the compiled graph too.
    phi = args[0].clone().requires_grad_()
    compiled(phi, *args[1:])[0].backward()
    phi_ref = args[0].clone().requires_grad_()
    step(phi_ref, *args[1:])[0].backward()
    torch.testing.assert_close(phi.grad, phi_ref.grad)


# --------------------------------------------------------------------------- bad inputs
def _bad_inputs(device):
    """(op name, args, a fragment of the expected message naming the argument)."""
    kw = dict(dtype=torch.float32, device=device)
    phi, z = make(6, 3, **kw), make(6, 2, **kw)
    h, phi3 = make(3, 3, **kw), make(4, 3, 2, **kw)
    L = random_factor(3, torch.float32, device)
    return [
        ("kernel_matching_loss", (phi[0], z, 3), "phi must be 2-D, got shape (3,)"),
        ("kernel_matching_loss", (phi, z[None], 3), "z must be 2-D"),
        ("kernel_matching_loss", (phi.int(), z, 3),
         "phi must be float32 or float64, got torch.int32"),
        ("kernel_matching_loss", (phi, z.double(), 3),
         "z must have the dtype of phi (torch.float32)"),
        ("kernel_matching_loss", (phi, z[:5], 3), "phi and z must have the same number of rows"),
        ("kernel_matching_loss", (phi, z, 7), "n_train must lie in [0, 6]"),
        ("kernel_matching_loss", (phi, z, -1), "n_train must lie in [0, 6]"),
        ("kernel_matching_loss_backward", (torch.tensor(1.0), phi, z, 9), "n_train must lie in"),
        ("ggn_accumulate", (make(3, 4, **kw), phi3, None), "h must be square"),
        ("ggn_accumulate", (h, phi3, None), None),  # control: valid input, must pass
        ("ggn_accumulate", (strided(h), phi3, None), "h must be contiguous"),
        ("ggn_accumulate", (h, phi, None), "phi must be 3-D"),
        ("ggn_accumulate", (h, make(4, 2, 2, **kw), None), "phi must be (N, M, C) with M = 3"),
        ("ggn_accumulate", (h, phi3, make(4, 3, **kw)), "logits must be (N, C) = (4, 2)"),
        ("ggn_accumulate", (h, phi3.double(), None), "phi must have the dtype of h"),
        ("ggn_accumulate", (h, phi3, make(4, 2, **kw).double()), "logits must have the dtype of h"),
        ("cholesky_update", (make(3, 2, **kw), make(3, 1, **kw), False), "L must be square"),
        ("cholesky_update", (L, make(4, 1, **kw), False), "W must be (M, k) with M = 3"),
        ("cholesky_update", (L, make(3, **kw), False), "W must be 2-D"),
        ("cholesky_update", (L, make(3, 1, **kw).double(), False), "W must have the dtype of L"),
        ("predictive_covariance", (L[None], phi3, ), "L must be 2-D"),
        ("predictive_covariance", (L, make(2, 4, 2, **kw)), "phi must be (B, M, C) with M = 3"),
        ("predictive_variance", (L.double(), phi3), "phi must have the dtype of L"),
        ("predictive_variance", (L.long(), phi3.long()), "L must be float32 or float64"),
        ("mc_softmax", (make(4, 3, **kw), make(4, 3, 2, **kw), 2, 0),
         "scale_tril must be (B, C, C)"),
        ("mc_softmax", (make(4, 3, **kw), make(4, 3, 3, **kw), 0, 0),
         "n_samples must be at least 1"),
        ("mc_softmax", (make(4, **kw), make(4, 3, 3, **kw), 1, 0), "mean must be 2-D"),
        ("random_tangents", (torch.empty(2, 4, **kw), 0, 0, "uniform"),
         "distribution must be one of ('rademacher', 'gaussian'), got 'uniform'"),
        ("random_tangents", (strided(torch.empty(2, 4, **kw)), 0, 0, "gaussian"),
         "out must be contiguous"),
        ("random_tangents", (torch.empty(4, **kw), 0, 0, "gaussian"), "out must be 2-D"),
        ("random_tangents", (torch.empty(2, 4, dtype=torch.int64, device=device), 0, 0, "gaussian"),
         "out must be float32 or float64"),
    ]


def _message(fn, args) -> str:
    with pytest.raises(RuntimeError) as info:
        fn(*args)
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("case", range(len(_bad_inputs("cpu"))))
def test_bad_inputs_raise_naming_the_argument(device, case):
    name, args, fragment = _bad_inputs(device)[case]
    if fragment is None:  # a control case that must pass
        getattr(F, name)(*args)
        return
    native = _message(getattr(F, name), args)
    assert native.startswith(f"fastlla::{name}: "), native
    assert fragment in native, native
    # The reference path (used without the compiled library) says exactly the same.
    assert _message(ops._REFERENCE_KERNELS[name], args) == native


@pytest.mark.skipif("cuda" not in DEVICES, reason="device mismatch needs a second device")
@pytest.mark.parametrize(
    "name", ["kernel_matching_loss", "predictive_covariance", "ggn_accumulate"]
)
def test_device_mismatch(name):
    cpu, cuda = dict(device="cpu"), dict(device="cuda")
    args = {
        "kernel_matching_loss": (torch.randn(4, 3, **cpu), torch.randn(4, 2, **cuda), 4),
        "predictive_covariance": (torch.eye(3, **cpu), torch.randn(2, 3, 2, **cuda)),
        "ggn_accumulate": (torch.zeros(3, 3, **cpu), torch.randn(2, 3, 2, **cuda), None),
    }[name]
    for fn in (getattr(F, name), ops._REFERENCE_KERNELS[name]):
        with pytest.raises(RuntimeError, match=re.escape("must be on the device of")):
            fn(*args)


def test_inputs_that_require_grad(device):
    """Ops without a derivative accept inputs that require grad (e.g. features from a network)."""
    kw = dict(dtype=torch.float64, device=device)
    phi = make(600, 6, 3, **kw).requires_grad_()
    L = random_factor(6, torch.float64, device)
    h = torch.zeros(6, 6, **kw)
    with torch.no_grad():
        expected = explicit_ggn(phi, None)
    ops.ggn_accumulate(h, phi, None)
    torch.testing.assert_close(h, expected)
    cov = ops.predictive_covariance(L, phi)
    torch.testing.assert_close(cov.detach(), reference.predictive_covariance(L, phi.detach()))
    # The loss's forward pass runs its row blocks in parallel under autograd.
    phi2 = make(3000, 4, **kw).requires_grad_()
    z = make(3000, 2, seed=1, **kw)
    ops.kernel_matching_loss(phi2, z, 1000).backward()
    grad = reference.kernel_matching_loss_backward(torch.tensor(1.0, **kw), phi2.detach(), z, 1000)
    torch.testing.assert_close(phi2.grad, grad[0])


@pytest.mark.skipif(
    not NATIVE or os.environ.get("FASTLLA_TEST_HEADER", "0") in ("", "0"),
    reason="compiles a C++ extension (~40 s): set FASTLLA_TEST_HEADER=1 with the native library",
)
def test_public_header_from_another_extension(tmp_path):
    """csrc/fastlla.h lets another extension call the ops through the dispatcher, autograd too."""
    from torch.utils.cpp_extension import load_inline

    src = r"""
    #include <fastlla.h>
    at::Tensor call_loss(at::Tensor phi, at::Tensor z, int64_t n) {
      return fastlla::kernel_matching_loss(phi, z, n);
    }
    at::Tensor call_cov(at::Tensor L, at::Tensor phi) {
      return fastlla::predictive_covariance(L, phi);
    }
    void call_ggn(at::Tensor h, at::Tensor phi) { fastlla::ggn_accumulate(h, phi); }
    void call_tangents(at::Tensor out) { fastlla::random_tangents(out, 1, 2, "gaussian"); }
    int64_t call_cuda_version() { return fastlla::cuda_version(); }
    """
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    ext = load_inline(
        "fastlla_header_check", cpp_sources=[src], extra_include_paths=[csrc],
        functions=["call_loss", "call_cov", "call_ggn", "call_tangents", "call_cuda_version"],
        build_directory=str(tmp_path),
    )
    phi = make(12, 4, dtype=torch.float64, device="cpu").requires_grad_()
    z = make(12, 3, dtype=torch.float64, device="cpu", seed=1)
    loss = ext.call_loss(phi, z, 5)
    loss.backward()
    torch.testing.assert_close(loss, reference.kernel_matching_loss(phi.detach(), z, 5))
    grad = reference.kernel_matching_loss_backward(torch.tensor(1.0, dtype=torch.float64),
                                                   phi.detach(), z, 5)[0]
    torch.testing.assert_close(phi.grad, grad)
    L = random_factor(4, torch.float64, "cpu")
    feats = make(2, 4, 3, dtype=torch.float64, device="cpu")
    torch.testing.assert_close(ext.call_cov(L, feats), reference.predictive_covariance(L, feats))
    h = torch.zeros(4, 4)
    ext.call_ggn(h, feats.float())
    torch.testing.assert_close(h, explicit_ggn(feats, None).float())
    got, want = torch.empty(2, 5), torch.empty(2, 5)
    ext.call_tangents(got)
    ops.random_tangents(want, 1, 2, "gaussian")
    assert torch.equal(got, want)
    assert ext.call_cuda_version() == ops.cuda_version()
