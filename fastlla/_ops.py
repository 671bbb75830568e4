"""The one place that talks to ``torch.ops.fastlla``.

On import, the compiled library ``fastlla._C`` is loaded (unless ``FASTLLA_DISABLE_NATIVE=1``);
it declares every schema below with ``TORCH_LIBRARY`` and registers its CPU (and, when built
with CUDA, CUDA) kernels. When it is absent the same schemas are declared from Python. Every
(op, device) pair without a native kernel then gets the pure-PyTorch reference of
:mod:`fastlla.reference`, wrapped in the same input checks the C++ kernels make, so callers see
one set of ops and one set of errors whichever backend runs. Fake (meta) and autograd
registrations are shared by both paths.

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


# --------------------------------------------------------------------------- input checks
# The same checks, with the same wording, as csrc/checks.h; used by the reference kernels.
def _check(cond: bool, op: str, message: str) -> None:
    if not cond:
        raise RuntimeError(f"fastlla::{op}: {message}")


def _check_float(op: str, name: str, t: Tensor) -> None:
    _check(
        t.dtype in (torch.float32, torch.float64),
        op,
        f"{name} must be float32 or float64, got {t.dtype}",
    )


def _check_dim(op: str, name: str, t: Tensor, dim: int) -> None:
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


def check_random_tangents(out: Tensor, seed: int, step: int, distribution: str) -> None:
    op = "random_tangents"
    _check_dim(op, "out", out, 2)
    _check_float(op, "out", out)
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
    def run(*args):
        check(*args)
        return kernel(*args)

    run.__name__ = kernel.__name__
    return run


_REFERENCE_KERNELS: dict[str, Callable] = {
    "kernel_matching_loss": _checked(check_kernel_matching_loss, reference.kernel_matching_loss),
    "kernel_matching_loss_backward": _checked(
        lambda g, phi, z, n: check_kernel_matching_loss(
            phi, z, n, op="kernel_matching_loss_backward"
        ),
        reference.kernel_matching_loss_backward,
    ),
    "ggn_accumulate": _checked(check_ggn_accumulate, reference.ggn_accumulate),
    # The dispatcher omits arguments equal to their schema default when it calls a Python
    # kernel, so `downdate` must default here too.
    "cholesky_update": _checked(check_cholesky_update, _cholesky_update_reference),
    "predictive_covariance": _checked(
        lambda L, phi: check_predictive(L, phi, "predictive_covariance"),
        reference.predictive_covariance,
    ),
    "predictive_variance": _checked(
        lambda L, phi: check_predictive(L, phi, "predictive_variance"),
        reference.predictive_variance,
    ),
    "mc_softmax": _checked(check_mc_softmax, reference.mc_softmax),
    "random_tangents": _checked(check_random_tangents, reference.random_tangents),
}


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


# --------------------------------------------------------------------------- fake + autograd
@torch.library.register_fake("fastlla::kernel_matching_loss")
def _(phi, z, n_train):
    return phi.new_empty(())


@torch.library.register_fake("fastlla::kernel_matching_loss_backward")
def _(grad, phi, z, n_train):
    return torch.empty_like(phi), torch.empty_like(z)


@torch.library.register_fake("fastlla::ggn_accumulate")
def _(h, phi, logits):
    return None


@torch.library.register_fake("fastlla::cholesky_update")
def _(L, W, downdate=False):
    return torch.empty_like(L, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastlla::predictive_covariance")
def _(L, phi):
    B, _, C = phi.shape
    return phi.new_empty((B, C, C))


@torch.library.register_fake("fastlla::predictive_variance")
def _(L, phi):
    B, _, C = phi.shape
    return phi.new_empty((B, C))


@torch.library.register_fake("fastlla::mc_softmax")
def _(mean, scale_tril, n_samples, seed):
    return torch.empty_like(mean, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastlla::random_tangents")
def _(out, seed, step, distribution):
    return None


def _loss_setup_context(ctx, inputs, output):
    phi, z, n_train = inputs
    ctx.save_for_backward(phi, z)
    ctx.n_train = n_train


def _loss_backward(ctx, grad):
    phi, z = ctx.saved_tensors
    grad_phi, grad_z = torch.ops.fastlla.kernel_matching_loss_backward(grad, phi, z, ctx.n_train)
    return grad_phi, grad_z, None


torch.library.register_autograd(
    "fastlla::kernel_matching_loss", _loss_backward, setup_context=_loss_setup_context
)


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
    """Lower ``L'`` with ``L'L'ᵀ = LLᵀ + WWᵀ`` (or ``− WWᵀ`` when ``downdate``)."""
    return torch.ops.fastlla.cholesky_update(L, W, downdate)


def predictive_covariance(L: Tensor, phi: Tensor) -> Tensor:
    """``Σ_b = Φ_bᵀ (LLᵀ)⁻¹ Φ_b`` for ``phi`` of shape (B, M, C); returns (B, C, C)."""
    return torch.ops.fastlla.predictive_covariance(L, phi)


def predictive_variance(L: Tensor, phi: Tensor) -> Tensor:
    """Diagonal of :func:`predictive_covariance`; returns (B, C)."""
    return torch.ops.fastlla.predictive_variance(L, phi)


def mc_softmax(mean: Tensor, scale_tril: Tensor, n_samples: int, seed: int = 0) -> Tensor:
    """Monte-Carlo average of ``softmax(mean + scale_tril ε)`` over ``n_samples`` draws."""
    return torch.ops.fastlla.mc_softmax(mean, scale_tril, int(n_samples), int(seed))


def random_tangents(out: Tensor, seed: int, step: int, distribution: str = "rademacher") -> Tensor:
    """Fill ``out`` (S, P) with tangents regenerable from ``(seed, step)``; returns ``out``."""
    torch.ops.fastlla.random_tangents(out, int(seed), int(step), distribution)
    return out
