"""The contracts every implementation of every fastlla op keeps.

Each op has up to four implementations: the native CPU (and CUDA) kernel, the pure-PyTorch
reference, and the fake kernel that serves meta tensors and ``FakeTensorMode``. They must accept
and reject the same inputs with the same message, so a table of invalid inputs is run against
all of them. Also: arguments on different devices (a meta tensor among CPU ones) raise instead
of returning uninitialised memory; autograd sees the in-place writes of ``random_tangents`` and
``ggn_accumulate``; ops without a derivative formula raise when differentiated;
``kernel_matching_loss`` is twice differentiable; ``mc_softmax`` caps ``n_samples``; and
``cholesky_update`` reads only the lower triangle of ``L`` on every backend.
"""

from __future__ import annotations

import re

import pytest
import torch
from testing import NATIVE, assert_close, device, make, random_factor, strided  # noqa: F401
from torch._subclasses.fake_tensor import FakeTensorMode

import fastlla._ops as ops
from fastlla import reference

F = torch.ops.fastlla
CAP = ops.MAX_MC_SAMPLES


def _valid(device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, tuple]:
    """Valid arguments of every op (small)."""
    kw = dict(dtype=dtype, device=device)
    L = random_factor(3, dtype, device)
    return {
        "kernel_matching_loss": (make(6, 3, **kw), make(6, 2, seed=1, **kw), 3),
        "kernel_matching_loss_backward": (
            torch.tensor(1.0, **kw), make(6, 3, **kw), make(6, 2, seed=1, **kw), 3),
        "ggn_accumulate": (torch.zeros(3, 3, **kw), make(4, 3, 2, **kw), make(4, 2, seed=1, **kw)),
        "cholesky_update": (L, make(3, 2, **kw), False),
        "predictive_covariance": (L, make(4, 3, 2, **kw)),
        "predictive_variance": (L, make(4, 3, 2, **kw)),
        "mc_softmax": (make(4, 2, **kw), 0.5 * make(4, 2, 2, seed=1, **kw).tril(), 3, 0),
        "random_tangents": (torch.zeros(2, 5, **kw), 0, 1, "gaussian"),
    }


def _invalid(device: str) -> list[tuple[str, tuple, str]]:
    """(op, arguments, fragment of the message) for inputs every backend must reject."""
    kw = dict(dtype=torch.float32, device=device)
    v = _valid(device)
    phi, z = v["kernel_matching_loss"][:2]
    g = torch.tensor(1.0, **kw)
    h, phi3, logits = v["ggn_accumulate"]
    L, W = v["cholesky_update"][:2]
    mean, scale = v["mc_softmax"][:2]
    out = torch.zeros(2, 5, **kw)
    return [
        ("kernel_matching_loss", (None, z, 3), "phi must be a tensor, got None"),
        ("kernel_matching_loss", (phi[0], z, 3), "phi must be 2-D, got shape (3,)"),
        ("kernel_matching_loss", (phi, z[None], 3), "z must be 2-D, got shape (1, 6, 2)"),
        ("kernel_matching_loss", (phi.int(), z, 3),
         "phi must be float32 or float64, got torch.int32"),
        ("kernel_matching_loss", (phi, z.double(), 3),
         "z must have the dtype of phi (torch.float32), got torch.float64"),
        ("kernel_matching_loss", (phi, z[:5], 3),
         "phi and z must have the same number of rows, got 6 and 5"),
        ("kernel_matching_loss", (phi, z, 7), "n_train must lie in [0, 6]"),
        ("kernel_matching_loss", (phi, z, -5), "n_train must lie in [0, 6]"),
        ("kernel_matching_loss_backward", (g, phi, z, 9), "n_train must lie in [0, 6]"),
        ("kernel_matching_loss_backward", (g.expand(2), phi, z, 3),
         "grad must hold one element, got shape (2,)"),
        ("kernel_matching_loss_backward", (g, phi, z.double(), 3), "z must have the dtype of phi"),
        ("ggn_accumulate", (None, phi3, None), "h must be a tensor, got None"),
        ("ggn_accumulate", (make(3, 4, **kw), phi3, None), "h must be square, got shape (3, 4)"),
        ("ggn_accumulate", (strided(h), phi3, None), "h must be contiguous"),
        ("ggn_accumulate", (h.long(), phi3.long(), None), "h must be float32 or float64"),
        ("ggn_accumulate", (h, phi, None), "phi must be 3-D"),
        ("ggn_accumulate", (h, make(4, 2, 2, **kw), None), "phi must be (N, M, C) with M = 3"),
        ("ggn_accumulate", (h, phi3, make(4, 3, **kw)), "logits must be (N, C) = (4, 2)"),
        ("ggn_accumulate", (h, phi3, make(4, **kw)), "logits must be 2-D"),
        ("ggn_accumulate", (h, phi3.double(), None), "phi must have the dtype of h"),
        ("ggn_accumulate", (h, phi3, logits.double()), "logits must have the dtype of h"),
        ("cholesky_update", (None, W, False), "L must be a tensor, got None"),
        ("cholesky_update", (make(3, 2, **kw), W, False), "L must be square"),
        ("cholesky_update", (L, make(4, 1, **kw), False), "W must be (M, k) with M = 3"),
        ("cholesky_update", (L, make(3, **kw), False), "W must be 2-D"),
        ("cholesky_update", (L, W.double(), False), "W must have the dtype of L"),
        ("cholesky_update", (L.long(), W.long(), True), "L must be float32 or float64"),
        ("predictive_covariance", (L[None], phi3), "L must be 2-D"),
        ("predictive_covariance", (L, make(2, 4, 2, **kw)), "phi must be (B, M, C) with M = 3"),
        ("predictive_covariance", (L, make(2, 3, **kw)), "phi must be 3-D"),
        ("predictive_variance", (L, None), "phi must be a tensor, got None"),
        ("predictive_variance", (L.double(), phi3), "phi must have the dtype of L"),
        ("predictive_variance", (L.long(), phi3.long()), "L must be float32 or float64"),
        ("mc_softmax", (mean, make(4, 2, 3, **kw), 2, 0), "scale_tril must be (B, C, C)"),
        ("mc_softmax", (mean, scale, 0, 0), "n_samples must be at least 1, got 0"),
        ("mc_softmax", (mean, scale, CAP + 1, 0),
         f"n_samples must be at most {CAP} (2^20), got {CAP + 1}"),
        ("mc_softmax", (mean, scale, 2**40, 0), "n_samples must be at most"),
        ("mc_softmax", (mean, scale, 2**62, 0), "n_samples must be at most"),
        ("mc_softmax", (mean[0], scale, 1, 0), "mean must be 2-D"),
        ("mc_softmax", (mean.int(), scale.int(), 1, 0), "mean must be float32 or float64"),
        ("random_tangents", (out, 0, 0, "uniform"),
         "distribution must be one of ('rademacher', 'gaussian'), got 'uniform'"),
        ("random_tangents", (strided(out), 0, 0, "gaussian"), "out must be contiguous"),
        ("random_tangents", (out[0], 0, 0, "gaussian"), "out must be 2-D"),
        ("random_tangents", (out.long(), 0, 0, "gaussian"), "out must be float32 or float64"),
        ("random_tangents", (out.clone().requires_grad_(), 0, 0, "gaussian"),
         "out must not require grad"),
        ("random_tangents", (torch.ones(2, 5, **kw).requires_grad_() * 2.0, 0, 0, "rademacher"),
         "out must not require grad"),
    ]


def _to_meta(x):
    """The same tensor on the meta device: strides and requires_grad (leaf or not) kept."""
    if not isinstance(x, torch.Tensor):
        return x
    m = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    if x.requires_grad:
        m.requires_grad_()
        if x.grad_fn is not None:
            m = m * 1
    return m


def _first_line(fn, args) -> str:
    with pytest.raises(RuntimeError) as info:
        fn(*args)
    return str(info.value).splitlines()[0]


def _snapshot(args):
    return [
        (a.detach().clone(), a._version) if isinstance(a, torch.Tensor) and a.device.type != "meta"
        else None
        for a in args
    ]


def _assert_unchanged(args, snap):
    for a, s in zip(args, snap):
        if s is not None:
            assert torch.equal(a.detach(), s[0]) and a._version == s[1], "a failed call wrote"


@pytest.mark.parametrize("case", range(len(_invalid("cpu"))))
def test_every_backend_rejects_the_same_inputs(device, case):
    name, args, fragment = _invalid(device)[case]
    op = getattr(F, name)
    snap = _snapshot(args)
    # The dispatcher: native kernel when the library is loaded, else the checked reference.
    expected = _first_line(op, args)
    assert expected.startswith(f"fastlla::{name}: ") and fragment in expected, expected
    _assert_unchanged(args, snap)
    # The reference kernel itself, whichever backend the dispatcher picked.
    assert _first_line(ops._REFERENCE_KERNELS[name], args) == expected
    _assert_unchanged(args, snap)
    # The fake kernel, on meta tensors and under FakeTensorMode (same device names there).
    meta = tuple(_to_meta(a) for a in args)
    assert _first_line(op, meta) == expected.replace(device, "meta")
    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        assert _first_line(op, fake) == expected


@pytest.mark.parametrize("name", list(ops.SCHEMAS))
def test_valid_inputs_pass_every_backend(name):
    """Control for the table above: the checks reject only what is invalid."""
    args = _valid()[name]
    getattr(F, name)(*args)
    ops._REFERENCE_KERNELS[name](*args)
    getattr(F, name)(*(_to_meta(a) for a in args))
    with FakeTensorMode() as mode:
        getattr(F, name)(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))


def _mixed_device_cases():
    cases = []
    for name, args in _valid().items():
        positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        if len(positions) < 2:
            continue
        for i in positions:
            for meta_is_odd in (True, False):
                cases.append((name, i, meta_is_odd))
    return cases


@pytest.mark.parametrize("name,position,meta_is_odd", _mixed_device_cases())
def test_mixed_meta_and_cpu_arguments_raise(name, position, meta_is_odd):
    """One meta argument among CPU ones (or the reverse) raises; no CPU argument is written."""
    args = _valid()[name]
    odd = (lambda a: _to_meta(a)) if meta_is_odd else (lambda a: a)
    rest = (lambda a: a) if meta_is_odd else (lambda a: _to_meta(a))
    mixed = tuple(
        (odd(a) if i == position else rest(a)) if isinstance(a, torch.Tensor) else a
        for i, a in enumerate(args)
    )
    snap = _snapshot(mixed)
    message = _first_line(getattr(F, name), mixed)
    assert message.startswith(f"fastlla::{name}: "), message
    assert re.search(r"must be on the device of \w+ \((cpu|meta)\), got (cpu|meta)", message)
    _assert_unchanged(mixed, snap)
    assert _first_line(ops._REFERENCE_KERNELS[name], mixed) == message


# --------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("name", list(ops.SCHEMAS))
def test_opcheck_with_inputs_that_require_grad(name):
    """Schema, fake kernel and the autograd registration (every op has one) agree."""
    args = list(_valid(dtype=torch.float64)[name])
    if name not in ("ggn_accumulate", "random_tangents"):  # mutated arguments cannot
        i = 1 if name == "kernel_matching_loss_backward" else 0
        args[i] = args[i].clone().requires_grad_()
    torch.library.opcheck(
        getattr(F, name).default, tuple(args),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


# --------------------------------------------------------------------------- mutation
def test_random_tangents_overwrite_is_seen_by_autograd():
    a = make(2, 5, dtype=torch.float64, device="cpu").requires_grad_()
    x = make(2, 5, dtype=torch.float64, device="cpu", seed=1)
    y = (a * x).sum()  # autograd saves x: d y / d a = x (the old values)
    version = x._version
    ops.random_tangents(x, 0, 0, "gaussian")
    assert x._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    # Filled before the forward pass, the gradient is the new x (oracle: d Σ a·x / d a = x).
    y = (a * x).sum()
    y.backward()
    assert torch.equal(a.grad, x)


def test_random_tangents_rejects_out_that_requires_grad_and_keeps_the_gradient():
    """The case of the report: `out` in the graph is refused, so the gradient stays right."""
    a = make(2, 5, dtype=torch.float64, device="cpu").requires_grad_()
    out = a * 1.0
    y = (out * out).sum()
    with pytest.raises(RuntimeError, match="out must not require grad"):
        ops.random_tangents(out, 0, 0, "gaussian")
    assert out._version == 0 and torch.equal(out.detach(), a.detach())
    y.backward()
    assert_close(a.grad, 2 * a.detach(), torch.float64)
    leaf = torch.zeros(2, 5, requires_grad=True)
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode), pytest.raises(RuntimeError, match="require grad"):
            ops.random_tangents(leaf, 0, 0, "gaussian")
    assert not leaf.detach().any()


def test_failed_in_place_calls_keep_the_version():
    out = torch.empty(2, 5)
    with pytest.raises(RuntimeError):
        ops.random_tangents(out, 0, 0, "uniform")
    h = torch.zeros(3, 3)
    with pytest.raises(RuntimeError):
        ops.ggn_accumulate(h, make(4, 2, 2, dtype=torch.float32, device="cpu"))
    assert out._version == 0 and h._version == 0


def test_ggn_accumulate_overwrite_is_seen_by_autograd():
    kw = dict(dtype=torch.float64, device="cpu")
    a = make(3, 3, **kw).requires_grad_()
    h = torch.zeros(3, 3, **kw)
    y = (a * h).sum()
    ops.ggn_accumulate(h, make(4, 3, 2, **kw))
    assert h._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_ggn_accumulate_passes_the_gradient_of_h():
    kw = dict(dtype=torch.float64, device="cpu")
    a = make(3, 3, **kw).requires_grad_()
    phi, logits = make(4, 3, 2, seed=1, **kw), make(4, 2, seed=2, **kw)
    h = 2.0 * a
    ops.ggn_accumulate(h, phi, logits)
    w = make(3, 3, seed=3, **kw)
    (h * w).sum().backward()
    # Oracle: h = 2a + GGN(phi) with GGN constant in a, so d Σ w·h / d a = 2w.
    assert_close(a.grad, 2 * w, torch.float64)
    p = torch.softmax(logits, -1)
    lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    expected = 2 * a.detach() + torch.einsum("nmc,ncd,nkd->mk", phi, lam, phi)
    assert_close(h.detach(), expected, torch.float64)
    # A leaf h that requires grad: the usual in-place error in grad mode, allowed without it.
    leaf = torch.zeros(3, 3, **kw, requires_grad=True)
    with pytest.raises(RuntimeError, match="h is a leaf that requires grad"):
        ops.ggn_accumulate(leaf, phi, logits)
    assert not leaf.detach().any()
    with torch.no_grad():
        ops.ggn_accumulate(leaf, phi, logits)
    assert_close(leaf.detach(), expected - 2 * a.detach(), torch.float64)


@pytest.mark.parametrize("which", ["phi", "logits"])
def test_ggn_accumulate_not_differentiable_in_phi_or_logits(which):
    kw = dict(dtype=torch.float64, device="cpu")
    phi, logits = make(4, 3, 2, **kw), make(4, 2, seed=1, **kw)
    expected = torch.zeros(3, 3, **kw)
    ops.ggn_accumulate(expected, phi, logits)
    (phi if which == "phi" else logits).requires_grad_()
    h = torch.zeros(3, 3, **kw)
    ops.ggn_accumulate(h, phi, logits)  # accepted: features straight from a network
    assert_close(h.detach(), expected, torch.float64)
    with pytest.raises(RuntimeError, match=re.escape(
            f"fastlla::ggn_accumulate: not differentiable with respect to {which}")):
        h.sum().backward()


# --------------------------------------------------------------------------- derivatives
def _no_derivative_cases():
    """(op, argument names, arguments); each named argument in turn requires grad."""
    v = _valid(dtype=torch.float64)
    big = make(8, 3, 2, dtype=torch.float64, device="cpu")  # B·C ≥ 2M: another CPU path
    return [
        ("cholesky_update", ("L", "W"), v["cholesky_update"]),
        ("predictive_covariance", ("L", "phi"), v["predictive_covariance"]),
        ("predictive_covariance", ("L", "phi"), (v["predictive_covariance"][0], big)),
        ("predictive_variance", ("L", "phi"), v["predictive_variance"]),
        ("predictive_variance", ("L", "phi"), (v["predictive_variance"][0], big)),
        ("mc_softmax", ("mean", "scale_tril"), v["mc_softmax"]),
        ("kernel_matching_loss_backward", ("grad", "phi", "z"),
         v["kernel_matching_loss_backward"]),
    ]


@pytest.mark.parametrize("case", range(len(_no_derivative_cases())))
def test_ops_without_a_formula_raise_when_differentiated(case):
    name, names, args = _no_derivative_cases()[case]
    op = getattr(F, name)
    expected = op(*args)
    for i, arg_name in enumerate(names):
        grad_args = list(args)
        grad_args[i] = args[i].clone().requires_grad_()
        out = op(*grad_args)  # the forward pass is unaffected
        outs = out if isinstance(out, tuple) else (out,)
        for got, want in zip(outs, expected if isinstance(expected, tuple) else (expected,)):
            assert_close(got.detach(), want, torch.float64)
        with pytest.raises(RuntimeError, match=re.escape(
                f"fastlla::{name}: not differentiable with respect to {arg_name}")):
            sum(o.sum() for o in outs).backward()


def _materialised_loss(phi, z, n_train):
    """Oracle: mean((ΦΦᵀ − K̂)²) over the R×R Gram with the cross blocks of K̂ zeroed."""
    R = phi.shape[0]
    mask = torch.zeros(R, R, dtype=torch.bool)
    mask[:n_train, :n_train] = True
    mask[n_train:, n_train:] = True
    return ((phi @ phi.T - (z @ z.T) * mask) ** 2).mean()


def test_kernel_matching_loss_double_backward():
    kw = dict(dtype=torch.float64, device="cpu")
    phi = make(7, 3, **kw).requires_grad_()
    z = make(7, 2, seed=1, **kw).requires_grad_()
    fn = lambda p, q: F.kernel_matching_loss(p, q, 4)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (phi, z))
    # Hessian-vector product against the materialised loss's (independent oracle).
    v_phi, v_z = make(7, 3, seed=2, **kw), make(7, 2, seed=3, **kw)

    def hvp(loss_fn):
        g = torch.autograd.grad(loss_fn(phi, z, 4), (phi, z), create_graph=True)
        return torch.autograd.grad((g[0] * v_phi).sum() + (g[1] * v_z).sum(), (phi, z))

    for got, want in zip(hvp(F.kernel_matching_loss), hvp(_materialised_loss)):
        assert_close(got, want, torch.float64)


# --------------------------------------------------------------------------- mc_softmax cap
@pytest.mark.skipif(not NATIVE, reason="2^20 draws through the reference take minutes")
def test_mc_softmax_runs_at_the_cap():
    mean = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    scale = torch.tensor([[[1.0, 0.0], [0.5, 0.8]]], dtype=torch.float64)
    got = ops.mc_softmax(mean, scale, CAP, 3)
    torch.testing.assert_close(got.sum(-1), torch.ones(1, dtype=torch.float64))
    # Oracle: an independent Monte-Carlo estimate from 2^18 torch.randn draws. Both average
    # values in [0, 1] (sd ≤ 1/2): standard errors 2^-11 and 2^-10; 5 of them bound the gap.
    eps = torch.randn(2**18, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    truth = torch.softmax(mean + eps @ scale[0].T, -1).mean(0)
    assert (got[0] - truth).abs().max() < 5 * (2**-10 + 2**-11)


def test_mc_softmax_reference_in_several_chunks_matches_the_op(device):
    """The reference draws samples in vectorised chunks; the op's sample order is per draw."""
    kw = dict(dtype=torch.float64, device=device)
    mean = make(40, 5, **kw)
    scale = 0.5 * make(40, 5, 5, seed=1, **kw).tril()
    n = 3 * (2**16 // 200) + 7  # three full chunks of the reference and a partial one
    got = ops.mc_softmax(mean, scale, n, 11)
    want = ops._REFERENCE_KERNELS["mc_softmax"](mean, scale, n, 11)
    assert_close(got, want, torch.float64)


# --------------------------------------------------------------------------- cholesky_update
@pytest.mark.parametrize("downdate", [False, True])
def test_cholesky_update_reads_only_the_lower_triangle(device, downdate):
    kw = dict(dtype=torch.float64, device=device)
    L = random_factor(5, torch.float64, device)
    W = 0.3 * make(5, 2, seed=1, **kw)
    junk = L + torch.triu(make(5, 5, seed=2, **kw), 1)  # garbage above the diagonal
    A = L @ L.mT + (-1 if downdate else 1) * W @ W.mT
    oracle = torch.linalg.cholesky(A)
    for fn in (ops.cholesky_update, ops._REFERENCE_KERNELS["cholesky_update"]):
        assert_close(fn(junk, W, downdate), oracle, torch.float64)
