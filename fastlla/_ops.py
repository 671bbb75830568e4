"""The one place that talks to ``torch.ops.fastlla``.

On import, the compiled library ``fastlla._C`` is loaded (unless ``FASTLLA_DISABLE_NATIVE=1``);
it declares every schema below with ``TORCH_LIBRARY`` and registers its CPU (and, when built
with CUDA, CUDA) kernels. When it is absent the same schemas are declared from Python. Every
(op, device) pair without a native kernel then gets the pure-PyTorch reference of
:mod:`fastlla.reference`, wrapped in the same input checks the C++ kernels make, so callers see
one set of ops and one set of errors whichever backend runs. Fake (meta) and autograd
registrations are shared by both paths; the fake kernels make the same checks too, so arguments
on different devices (a meta tensor among CPU ones included) raise instead of returning an
uninitialised tensor.

Autograd contract (every backend): ``kernel_matching_loss`` is differentiable in ``phi`` and ``z``
(twice); ``ggn_accumulate`` passes the gradient of ``h`` through; every other derivative raises
``fastlla::<op>: not differentiable with respect to <argument>`` when a backward pass reaches it.
The mutated arguments (``h`` of ``ggn_accumulate``, ``out`` of ``random_tangents``) have their
version counter bumped, so autograd detects a tensor overwritten after being saved for backward;
``out`` must not require grad.

:data:`BACKENDS` records which implementation each op uses on each device.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from torch import Tensor

from . import reference

__all__ = [
    "SCHEMAS",
    "BACKENDS",
    "NATIVE_LOADED",
    "kernel_matching_loss",
    "ggn_accumulate",
    "cholesky_update",
    "predictive_covariance",
    "predictive_variance",
    "mc_softmax",
    "random_tangents",
    "MAX_MC_SAMPLES",
    "cuda_version",
    "backend_report",
]

NAMESPACE = "fastlla"

# Mirror of the schemas in csrc/fastlla.cpp (a test checks they agree).
SCHEMAS: dict[str, str] = {
    "kernel_matching_loss": "(Tensor phi, Tensor z, int n_train) -> Tensor",
    "kernel_matching_loss_backward": (
        "(Tensor grad, Tensor phi, Tensor z, int n_train) -> (Tensor, Tensor)"
    ),
    "ggn_accumulate": "(Tensor(a!) h, Tensor phi, Tensor? logits) -> ()",
    "cholesky_update": "(Tensor L, Tensor W, bool downdate=False) -> Tensor",
    "predictive_covariance": "(Tensor L, Tensor phi) -> Tensor",
    "predictive_variance": "(Tensor L, Tensor phi) -> Tensor",
    "mc_softmax": "(Tensor mean, Tensor scale_tril, int n_samples, int seed) -> Tensor",
    "random_tangents": "(Tensor(a!) out, int seed, int step, str distribution) -> ()",
}
DEVICE_KEYS = ("CPU", "CUDA")
DISTRIBUTIONS = ("rademacher", "gaussian")
#: The most samples ``mc_softmax`` draws (2^20, as ``kMaxMcSamples`` in csrc/checks.h): far beyond
#: useful accuracy (the Monte-Carlo error falls as 1/√S) and a bound on every backend's run time.
MAX_MC_SAMPLES = 2**20


# --------------------------------------------------------------------------- input checks
# The same checks, with the same wording, as csrc/checks.h; used by the reference kernels.
def _check(cond: bool, op: str, message: str) -> None:
    if not cond:
        raise RuntimeError(f"fastlla::{op}: {message}")


def _check_defined(op: str, name: str, t: Tensor) -> None:
    _check(isinstance(t, Tensor), op, f"{name} must be a tensor, got None")


def _check_float(op: str, name: str, t: Tensor) -> None:
    _check(
        t.dtype in (torch.float32, torch.float64),
        op,
        f"{name} must be float32 or float64, got {t.dtype}",
    )


def _check_dim(op: str, name: str, t: Tensor, dim: int) -> None:
    _check_defined(op, name, t)
    _check(t.dim() == dim, op, f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_same(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    _check(
        t.dtype == ref.dtype,
        op,
        f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}",
    )
    _check(
        t.device == ref.device,
        op,
        f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}",
    )


def _check_square(op: str, name: str, t: Tensor) -> None:
    _check_dim(op, name, t, 2)
    _check(t.shape[0] == t.shape[1], op, f"{name} must be square, got shape {tuple(t.shape)}")


def check_kernel_matching_loss(phi: Tensor, z: Tensor, n_train: int, op: str = "") -> None:
    op = op or "kernel_matching_loss"
    _check_dim(op, "phi", phi, 2)
    _check_dim(op, "z", z, 2)
    _check_float(op, "phi", phi)
    _check_same(op, "z", z, "phi", phi)
    _check(
        phi.shape[0] == z.shape[0],
        op,
        f"phi and z must have the same number of rows, got {phi.shape[0]} and {z.shape[0]}",
    )
    _check(
        0 <= n_train <= phi.shape[0],
        op,
        f"n_train must lie in [0, {phi.shape[0]}] (the number of rows), got {n_train}",
    )


def check_kernel_matching_loss_backward(grad: Tensor, phi: Tensor, z: Tensor, n_train: int) -> None:
    op = "kernel_matching_loss_backward"
    check_kernel_matching_loss(phi, z, n_train, op)
    _check_defined(op, "grad", grad)
    _check(
        grad.numel() == 1, op, f"grad must hold one element, got shape {tuple(grad.shape)}"
    )
    _check(
        grad.device == phi.device,
        op,
        f"grad must be on the device of phi ({phi.device}), got {grad.device}",
    )


def check_ggn_accumulate(h: Tensor, phi: Tensor, logits: Tensor | None) -> None:
    op = "ggn_accumulate"
    _check_square(op, "h", h)
    _check_dim(op, "phi", phi, 3)
    _check_float(op, "h", h)
    _check_same(op, "phi", phi, "h", h)
    _check(h.is_contiguous(), op, "h must be contiguous (it is updated in place)")
    _check(
        phi.shape[1] == h.shape[0],
        op,
        f"phi must be (N, M, C) with M = {h.shape[0]} (the size of h), got {tuple(phi.shape)}",
    )
    if logits is not None:
        _check_dim(op, "logits", logits, 2)
        _check_same(op, "logits", logits, "h", h)
        _check(
            logits.shape[0] == phi.shape[0] and logits.shape[1] == phi.shape[2],
            op,
            f"logits must be (N, C) = {(phi.shape[0], phi.shape[2])}, "
            f"got {tuple(logits.shape)}",
        )


def check_cholesky_update(L: Tensor, W: Tensor, downdate: bool = False) -> None:
    op = "cholesky_update"
    _check_square(op, "L", L)
    _check_dim(op, "W", W, 2)
    _check_float(op, "L", L)
    _check_same(op, "W", W, "L", L)
    _check(
        W.shape[0] == L.shape[0],
        op,
        f"W must be (M, k) with M = {L.shape[0]} (the size of L), got {tuple(W.shape)}",
    )


def check_predictive(L: Tensor, phi: Tensor, op: str) -> None:
    _check_square(op, "L", L)
    _check_dim(op, "phi", phi, 3)
    _check_float(op, "L", L)
    _check_same(op, "phi", phi, "L", L)
    _check(
        phi.shape[1] == L.shape[0],
        op,
        f"phi must be (B, M, C) with M = {L.shape[0]} (the size of L), got {tuple(phi.shape)}",
    )


def check_mc_softmax(mean: Tensor, scale_tril: Tensor, n_samples: int, seed: int) -> None:
    op = "mc_softmax"
    _check_dim(op, "mean", mean, 2)
    _check_dim(op, "scale_tril", scale_tril, 3)
    _check_float(op, "mean", mean)
    _check_same(op, "scale_tril", scale_tril, "mean", mean)
    B, C = mean.shape
    _check(
        tuple(scale_tril.shape) == (B, C, C),
        op,
        f"scale_tril must be (B, C, C) = {(B, C, C)}, got {tuple(scale_tril.shape)}",
    )
    _check(n_samples >= 1, op, f"n_samples must be at least 1, got {n_samples}")
    _check(
        n_samples <= MAX_MC_SAMPLES,
        op,
        f"n_samples must be at most {MAX_MC_SAMPLES} (2^20), got {n_samples}",
    )


def check_random_tangents(out: Tensor, seed: int, step: int, distribution: str) -> None:
    op = "random_tangents"
    _check_dim(op, "out", out, 2)
    _check_float(op, "out", out)
    _check(
        not out.requires_grad,
        op,
        "out must not require grad (it is overwritten and has no derivative)",
    )
    _check(out.is_contiguous(), op, "out must be contiguous (it is filled in place)")
    _check(
        out.shape[1] < 2**32,
        op,
        f"out must have fewer than 2^32 columns, got {out.shape[1]}",
    )
    _check(
        distribution in DISTRIBUTIONS,
        op,
        f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}",
    )


def _cholesky_update_reference(L: Tensor, W: Tensor, downdate: bool = False) -> Tensor:
    # cholesky_ex returns a column-major factor; the fake (and native) output is row-major.
    return reference.cholesky_update(L, W, downdate).contiguous()


def _checked(check: Callable, kernel: Callable) -> Callable:
    # The dispatcher omits arguments equal to their schema default when it calls a Python
    # kernel (cholesky_update's `downdate`), so the check and the kernel must default them too.
    def run(*args):
        check(*args)
        return kernel(*args)

    run.__name__ = kernel.__name__
    return run


#: The input check of every op, shared by the reference and the fake kernels (and mirrored by
#: csrc/checks.h for the native CPU and CUDA kernels).
CHECKS: dict[str, Callable] = {
    "kernel_matching_loss": check_kernel_matching_loss,
    "kernel_matching_loss_backward": check_kernel_matching_loss_backward,
    "ggn_accumulate": check_ggn_accumulate,
    "cholesky_update": check_cholesky_update,
    "predictive_covariance": lambda L, phi: check_predictive(L, phi, "predictive_covariance"),
    "predictive_variance": lambda L, phi: check_predictive(L, phi, "predictive_variance"),
    "mc_softmax": check_mc_softmax,
    "random_tangents": check_random_tangents,
}

_REFERENCE_KERNELS: dict[str, Callable] = {
    "kernel_matching_loss": reference.kernel_matching_loss,
    "kernel_matching_loss_backward": reference.kernel_matching_loss_backward,
    "ggn_accumulate": reference.ggn_accumulate,
    "cholesky_update": _cholesky_update_reference,
    "predictive_covariance": reference.predictive_covariance,
    "predictive_variance": reference.predictive_variance,
    "mc_softmax": reference.mc_softmax,
    "random_tangents": reference.random_tangents,
}
_REFERENCE_KERNELS = {name: _checked(CHECKS[name], k) for name, k in _REFERENCE_KERNELS.items()}


# --------------------------------------------------------------------------- loading
def _load_native() -> bool:
    if os.environ.get("FASTLLA_DISABLE_NATIVE", "") not in ("", "0"):
        return False
    try:
        from . import _C  # noqa: F401  (registers the schemas and kernels)
    except ImportError as err:
        if os.environ.get("FASTLLA_REQUIRE_NATIVE", "") not in ("", "0"):
            raise
        warnings.warn(
            f"fastlla: compiled library unavailable ({err}); using the pure-PyTorch reference ops",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


NATIVE_LOADED = _load_native()
_lib_def = None if NATIVE_LOADED else torch.library.Library(NAMESPACE, "DEF")
if _lib_def is not None:
    for _name, _schema in SCHEMAS.items():
        _lib_def.define(_name + _schema)

_lib_impl = torch.library.Library(NAMESPACE, "IMPL")
BACKENDS: dict[str, dict[str, str]] = {}
for _name in SCHEMAS:
    BACKENDS[_name] = {}
    for _key in DEVICE_KEYS:
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{_name}", _key):
            BACKENDS[_name][_key] = "native"
        else:
            _lib_impl.impl(_name, _REFERENCE_KERNELS[_name], _key)
            BACKENDS[_name][_key] = "reference"


def cuda_version() -> int:
    """CUDA version the native library was built with (e.g. 12080), -1 without CUDA kernels."""
    if not NATIVE_LOADED:
        return -1
    return int(torch.ops.fastlla.cuda_version())


def _warn_on_cuda_mismatch() -> None:
    built = cuda_version()
    if built < 0 or not torch.cuda.is_available() or torch.version.cuda is None:
        return
    major, minor = (int(v) for v in torch.version.cuda.split(".")[:2])
    if built // 1000 != major:
        warnings.warn(
            f"fastlla was built with CUDA {built // 1000}.{built % 1000 // 10} but torch uses "
            f"CUDA {major}.{minor}; rebuild fastlla (pip install --no-build-isolation .) if "
            "its CUDA kernels fail",
            RuntimeWarning,
            stacklevel=3,
        )


_warn_on_cuda_mismatch()


def backend_report() -> str:
    """One line per op: which implementation runs on each device."""
    lines = [f"fastlla native library: {'loaded' if NATIVE_LOADED else 'not loaded'}"]
    for name, per_device in BACKENDS.items():
        cells = ", ".join(f"{k}={v}" for k, v in per_device.items())
        lines.append(f"  {name:32s} {cells}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- fake kernels
# Each runs the op's check first: a fake kernel also serves the Meta key, which the dispatcher
# picks whenever any argument is a meta tensor.
def _fake_kernel_matching_loss(phi, z, n_train):
    return phi.new_empty(())


def _fake_kernel_matching_loss_backward(grad, phi, z, n_train):
    return torch.empty_like(phi), torch.empty_like(z)


def _fake_ggn_accumulate(h, phi, logits):
    return None


def _fake_cholesky_update(L, W, downdate=False):
    return torch.empty_like(L, memory_format=torch.contiguous_format)


def _fake_predictive_covariance(L, phi):
    B, _, C = phi.shape
    return phi.new_empty((B, C, C))


def _fake_predictive_variance(L, phi):
    B, _, C = phi.shape
    return phi.new_empty((B, C))


def _fake_mc_softmax(mean, scale_tril, n_samples, seed):
    return torch.empty_like(mean, memory_format=torch.contiguous_format)


def _fake_random_tangents(out, seed, step, distribution):
    return None


_FAKE_KERNELS: dict[str, Callable] = {
    name: _checked(CHECKS[name], globals()[f"_fake_{name}"]) for name in SCHEMAS
}
for _name, _fake in _FAKE_KERNELS.items():
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _fake)


# --------------------------------------------------------------------------- autograd
def _loss_setup_context(ctx, inputs, output):
    phi, z, n_train = inputs
    ctx.save_for_backward(phi, z)
    ctx.n_train = n_train


def _loss_backward(ctx, grad):
    phi, z = ctx.saved_tensors
    if torch.is_grad_enabled() and any(t.requires_grad for t in (grad, phi, z)):
        # create_graph=True (double backward): the reference formula, built from
        # differentiable torch ops, instead of the fused kernel, which has no derivative.
        grad_phi, grad_z = reference.kernel_matching_loss_backward(grad, phi, z, ctx.n_train)
    else:
        grad_phi, grad_z = torch.ops.fastlla.kernel_matching_loss_backward(
            grad, phi, z, ctx.n_train
        )
    return grad_phi, grad_z, None


torch.library.register_autograd(
    "fastlla::kernel_matching_loss", _loss_backward, setup_context=_loss_setup_context
)


def _not_differentiable(op: str, names: tuple[str, ...]) -> None:
    raise RuntimeError(
        f"fastlla::{op}: not differentiable with respect to {', '.join(names)} (the op has no "
        "derivative formula); detach the input or run the op under torch.no_grad()"
    )


def _register_no_derivative(name: str) -> None:
    """Autograd of a functional op without a formula: backward names the inputs and raises.

    The error is raised only when a backward pass reaches the op, so inputs that merely require
    grad (features straight from a network) are accepted; the forward runs below autograd.
    """
    arg_names = [a.name for a in getattr(torch.ops.fastlla, name).default._schema.arguments]

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        _not_differentiable(
            name, tuple(n for n, need in zip(arg_names, ctx.needs_input_grad) if need)
        )

    torch.library.register_autograd(
        f"{NAMESPACE}::{name}", backward, setup_context=setup_context
    )


for _name in (
    "kernel_matching_loss_backward",
    "cholesky_update",
    "predictive_covariance",
    "predictive_variance",
    "mc_softmax",
):
    _register_no_derivative(_name)


# The two ops that mutate an argument: an ADInplaceOrView kernel bumps its version counter after
# a successful call (as ATen's in-place ops do; the dispatcher does not for custom ops), and an
# Autograd kernel runs the op below autograd.
def _register_mutating(name: str, autograd_impl: Callable) -> None:
    op = getattr(torch.ops.fastlla, name).default

    def inplace_or_view(keyset, *args):
        result = op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)
        torch.autograd.graph.increment_version(args[0])
        return result

    def autograd(keyset, *args):
        return autograd_impl(op, keyset & torch._C._after_autograd_keyset, *args)

    _lib_impl.impl(name, inplace_or_view, "ADInplaceOrView", with_keyset=True)
    _lib_impl.impl(name, autograd, "Autograd", with_keyset=True)


def _below_autograd(op, keyset, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op.redispatch(keyset, *args)


class _GGNAccumulate(torch.autograd.Function):
    """``h += GGN(phi, logits)`` for autograd: ``d h_new / d h = I``, no formula for phi/logits."""

    @staticmethod
    def forward(ctx, h, phi, logits, op, keyset):
        _below_autograd(op, keyset, h, phi, logits)
        ctx.mark_dirty(h)
        return h

    @staticmethod
    def backward(ctx, grad):
        names = tuple(n for n, need in zip(("phi", "logits"), ctx.needs_input_grad[1:3]) if need)
        if names:
            _not_differentiable("ggn_accumulate", names)
        return grad, None, None, None, None


def _ggn_accumulate_autograd(op, keyset, h, phi, logits=None):
    tensors = (h, phi) if logits is None else (h, phi, logits)
    if torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in tensors
    ):
        # h joins the graph (mark_dirty); backward through it to phi or logits raises
        # "not differentiable". A leaf h that requires grad is refused before anything is
        # written (mark_dirty would raise only after the kernel ran).
        _check(
            not (h.requires_grad and h.is_leaf),
            "ggn_accumulate",
            "h is a leaf that requires grad: a leaf Variable that requires grad cannot be "
            "updated in place outside torch.no_grad()",
        )
        _GGNAccumulate.apply(h, phi, logits, op, keyset)
        return None
    return _below_autograd(op, keyset, h, phi, logits)


_register_mutating("ggn_accumulate", _ggn_accumulate_autograd)
# random_tangents: every backend rejects an `out` that requires grad.
_register_mutating("random_tangents", _below_autograd)


# --------------------------------------------------------------------------- typed wrappers
def kernel_matching_loss(phi: Tensor, z: Tensor, n_train: int | None = None) -> Tensor:
    """Kernel-matching loss ``‖ΦΦᵀ − K̂‖²_F / R²`` (differentiable in ``phi`` and ``z``).

    Parameters
    ----------
    phi : (R, M) stacked surrogate features, ``R = B·C`` rows.
    z : (R, S) projected JVPs scaled by ``1/√S`` (``K̂ = Z Zᵀ``).
    n_train : rows ``[0, n_train)`` are training rows and the rest context rows; the target's
        cross blocks between them are zero. ``None`` (default) means no context rows.
    """
    return torch.ops.fastlla.kernel_matching_loss(
        phi, z, phi.shape[0] if n_train is None else int(n_train)
    )


def ggn_accumulate(h: Tensor, phi: Tensor, logits: Tensor | None = None) -> Tensor:
    """In place ``h += Σ_n Φ_n Λ_n Φ_nᵀ`` (softmax Hessian from ``logits``, else identity)."""
    torch.ops.fastlla.ggn_accumulate(h, phi, logits)
    return h


def cholesky_update(L: Tensor, W: Tensor, downdate: bool = False) -> Tensor:
    """Lower ``L'`` with ``L'L'ᵀ = LLᵀ + WWᵀ`` (or ``− WWᵀ`` when ``downdate``).

    Only the lower triangle of ``L`` is read. Raises RuntimeError when the result is not
    positive definite.
    """
    return torch.ops.fastlla.cholesky_update(L, W, downdate)


def predictive_covariance(L: Tensor, phi: Tensor) -> Tensor:
    """``Σ_b = Φ_bᵀ (LLᵀ)⁻¹ Φ_b`` for ``phi`` of shape (B, M, C); returns (B, C, C)."""
    return torch.ops.fastlla.predictive_covariance(L, phi)


def predictive_variance(L: Tensor, phi: Tensor) -> Tensor:
    """Diagonal of :func:`predictive_covariance`; returns (B, C)."""
    return torch.ops.fastlla.predictive_variance(L, phi)


def mc_softmax(mean: Tensor, scale_tril: Tensor, n_samples: int, seed: int = 0) -> Tensor:
    """Monte-Carlo average of ``softmax(mean + scale_tril ε)`` over ``n_samples`` draws.

    ``1 ≤ n_samples ≤`` :data:`MAX_MC_SAMPLES` (2^20); outside that range a RuntimeError.
    """
    return torch.ops.fastlla.mc_softmax(mean, scale_tril, int(n_samples), int(seed))


def random_tangents(out: Tensor, seed: int, step: int, distribution: str = "rademacher") -> Tensor:
    """Fill ``out`` (S, P) with tangents regenerable from ``(seed, step)``; returns ``out``.

    ``out`` must be a contiguous float32/float64 tensor that does not require grad.
    """
    torch.ops.fastlla.random_tangents(out, int(seed), int(step), distribution)
    return out
