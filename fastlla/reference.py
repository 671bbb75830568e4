"""Pure-PyTorch reference of every fastlla op.

Each function here is both the fallback used when the compiled library is absent and the
oracle the native kernels are tested against. They are written for clarity, not speed, and are
only ever called through :mod:`fastlla._ops` (which registers them as ``torch.ops.fastlla.*``).

Conventions shared with the C++/CUDA kernels (see ``csrc/fastlla.h``):

* ``phi`` for the loss is the stacked feature matrix ``Φ`` of shape ``(R, M)`` with ``R = B·C``
  rows (row ``b·C + c`` is output ``c`` of input ``b``); ``z`` is ``(R, S)`` with the ``1/√S``
  already applied, so that the target Gram is ``K̂ = Z Zᵀ``.
* Rows ``[0, n_train)`` are training rows, rows ``[n_train, R)`` context rows; the target's
  cross blocks between the two groups are zero.
* ``phi`` for the posterior ops is per input, ``(N, M, C)``: ``Φ_n = g(x_n)``.
* Random numbers come from a stateless counter-based hash (:func:`hash4`), so the same
  ``(seed, counters)`` give the same numbers on every backend.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "kernel_matching_loss",
    "kernel_matching_loss_backward",
    "ggn_accumulate",
    "cholesky_update",
    "predictive_covariance",
    "predictive_variance",
    "mc_softmax",
    "random_tangents",
    "hash4",
    "uniform_from_hash",
]


# --------------------------------------------------------------------------- kernel matching
def _groups(n_rows: int, n_train: int) -> list[tuple[int, int]]:
    """Row ranges whose target blocks are kept (cross blocks between them are zero)."""
    groups = [(0, n_train), (n_train, n_rows)]
    return [(a, b) for a, b in groups if b > a]


def kernel_matching_loss(phi: Tensor, z: Tensor, n_train: int) -> Tensor:
    """``‖ΦΦᵀ − K̂‖²_F / R²`` through the Gram identity, ``K̂`` block-diagonal over the groups."""
    n_rows = phi.shape[0]
    if n_rows == 0:
        return phi.new_zeros(())
    total = (phi.mT @ phi).square().sum()
    for a, b in _groups(n_rows, n_train):
        total = total - 2 * (phi[a:b].mT @ z[a:b]).square().sum()
        total = total + (z[a:b].mT @ z[a:b]).square().sum()
    return total / n_rows**2


def kernel_matching_loss_backward(
    grad: Tensor, phi: Tensor, z: Tensor, n_train: int
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`kernel_matching_loss` with respect to ``phi`` and ``z``."""
    n_rows = phi.shape[0]
    if n_rows == 0:
        return torch.zeros_like(phi), torch.zeros_like(z)
    scale = 4 * grad / n_rows**2
    grad_phi = phi @ (phi.mT @ phi)
    grad_z = torch.zeros_like(z)
    pieces_phi = []
    for a, b in _groups(n_rows, n_train):
        pieces_phi.append(z[a:b] @ (z[a:b].mT @ phi[a:b]))
        grad_z[a:b] = z[a:b] @ (z[a:b].mT @ z[a:b]) - phi[a:b] @ (phi[a:b].mT @ z[a:b])
    grad_phi = grad_phi - torch.cat(pieces_phi)
    return scale * grad_phi, scale * grad_z


# --------------------------------------------------------------------------- posterior
def ggn_accumulate(h: Tensor, phi: Tensor, logits: Tensor | None) -> None:
    """In place ``h += Σ_n Φ_n Λ_n Φ_nᵀ``.

    ``Λ_n = diag(p_n) − p_n p_nᵀ`` with ``p_n = softmax(logits_n)`` when ``logits`` is given
    (classification), the identity otherwise (regression; scale by ``1/σ²`` outside).
    """
    if logits is None:
        h.add_(torch.einsum("nmc,nkc->mk", phi, phi))
        return
    p = torch.softmax(logits, dim=-1)
    phi_p = torch.einsum("nmc,nc->nm", phi, p)
    h.add_(torch.einsum("nmc,nc,nkc->mk", phi, p, phi) - phi_p.mT @ phi_p)


def cholesky_update(L: Tensor, W: Tensor, downdate: bool) -> Tensor:
    """Lower ``L'`` with ``L'L'ᵀ = LLᵀ ± WWᵀ`` (here by refactorising: the oracle).

    Only the lower triangle of ``L`` is read, as in the native kernels.
    """
    L = L.tril()
    A = L @ L.mT
    A = A - W @ W.mT if downdate else A + W @ W.mT
    L_new, info = torch.linalg.cholesky_ex(A)
    if info.item() != 0:
        which = "downdated" if downdate else "updated"
        raise RuntimeError(
            f"fastlla::cholesky_update: the {which} matrix is not positive definite"
        )
    return L_new


def _whitened(L: Tensor, phi: Tensor) -> Tensor:
    """``V_b = L⁻¹ Φ_b`` for every input, shape ``(B, M, C)``."""
    B, M, C = phi.shape
    rhs = phi.permute(1, 0, 2).reshape(M, B * C)
    V = torch.linalg.solve_triangular(L, rhs, upper=False)
    return V.reshape(M, B, C).permute(1, 0, 2)


def predictive_covariance(L: Tensor, phi: Tensor) -> Tensor:
    """``Σ_b = Φ_bᵀ (LLᵀ)⁻¹ Φ_b``, shape ``(B, C, C)``."""
    V = _whitened(L, phi)
    return V.mT @ V


def predictive_variance(L: Tensor, phi: Tensor) -> Tensor:
    """Diagonal of :func:`predictive_covariance`, shape ``(B, C)``."""
    return _whitened(L, phi).square().sum(dim=1)


# --------------------------------------------------------------------------- random numbers
_MASK = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2³²`` in int64 without overflow (split ``c`` into 16-bit halves)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK


def _mix32(x: Tensor) -> Tensor:
    """The 'lowbias32' integer hash (Wellons), on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash4(a: int, b: int | Tensor, c: Tensor, d: Tensor) -> Tensor:
    """Counter-based 32-bit hash of four counters (int64 tensors holding uint32 values)."""
    h = _mix32(torch.full_like(d, (a & _MASK) ^ 0x9E3779B9))
    h = _mix32(h ^ (b & _MASK))
    h = _mix32(h ^ (c & _MASK))
    return _mix32(h ^ (d & _MASK))


def uniform_from_hash(h: Tensor) -> Tensor:
    """Map uint32 hashes to float64 uniforms in the open interval (0, 1)."""
    return (h.double() + 0.5) / 4294967296.0


def _normal(seed: int, step: int | Tensor, row: Tensor, col: Tensor) -> Tensor:
    """Box–Muller standard normals keyed by ``(seed, step, row, col)``, float64.

    ``step`` may be a tensor broadcastable to ``col`` (several steps at once).
    """
    u1 = uniform_from_hash(hash4(seed, step, 2 * row, col))
    u2 = uniform_from_hash(hash4(seed, step, 2 * row + 1, col))
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def random_tangents(out: Tensor, seed: int, step: int, distribution: str) -> None:
    """Fill ``out`` (``(S, P)``) with ``S`` tangents keyed by ``(seed, step, s, p)``.

    ``"rademacher"``: ±1 from the top bit of ``hash4(seed, step, 2s, p)``; ``"gaussian"``:
    Box–Muller from ``hash4(seed, step, 2s, p)`` and ``hash4(seed, step, 2s+1, p)``.
    """
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"fastlla::random_tangents: unknown distribution {distribution!r}")
    n_rows, numel = out.shape
    col = torch.arange(numel, device=out.device, dtype=torch.int64)
    for s in range(n_rows):
        row = torch.full_like(col, s)
        if distribution == "rademacher":
            bit = hash4(seed, step, 2 * row, col) >> 31
            out[s] = (1 - 2 * bit).to(out.dtype)
        else:
            out[s] = _normal(seed, step, row, col).to(out.dtype)


def mc_softmax(mean: Tensor, scale_tril: Tensor, n_samples: int, seed: int) -> Tensor:
    """``(1/S) Σ_s softmax(mean + scale_tril ε_s)`` with ``ε_{s,b,c}`` keyed by ``(seed, s, b, c)``.

    ``mean`` is ``(B, C)``, ``scale_tril`` the lower Cholesky factor of each ``Σ_b``,
    ``(B, C, C)``. Normals come from ``hash4(seed, s, 2b, c)`` and ``hash4(seed, s, 2b+1, c)``.
    """
    B, C = mean.shape
    if B == 0 or C == 0 or n_samples == 0:
        return torch.zeros_like(mean)
    acc = torch.zeros(B, C, dtype=torch.float64, device=mean.device)  # as the native kernels
    b = torch.arange(B, device=mean.device).view(1, B, 1)
    c = torch.arange(C, device=mean.device).view(1, 1, C)
    chunk = max(1, 2**16 // (B * C))  # samples per vectorised step: bounded memory
    for s0 in range(0, n_samples, chunk):
        s = torch.arange(s0, min(s0 + chunk, n_samples), device=mean.device).view(-1, 1, 1)
        eps = _normal(seed, s, b.expand(s.shape[0], B, C), c.expand(s.shape[0], B, C))
        f = mean + (scale_tril @ eps.to(mean.dtype).unsqueeze(-1)).squeeze(-1)
        acc += torch.softmax(f, dim=-1).sum(dim=0, dtype=torch.float64)
    return (acc / n_samples).to(mean.dtype)
