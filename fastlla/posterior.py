"""The feature-space Laplace posterior and its linear algebra.

With features ``Φ_n = g(x_n) ∈ R^{M×C}`` the posterior over the ``M`` feature weights has
precision ``A = s·H + δ I`` where ``H = Σ_n Φ_n Λ_n Φ_nᵀ`` is accumulated once (``Λ_n`` the
softmax Hessian, or the identity for regression) and ``s`` is the data scale (``1/σ²`` for
regression, 1 for classification). One eigendecomposition of ``H`` gives
``log det(I + sH/δ)`` for every ``(δ, s)`` in ``O(M)``; a Cholesky factor of ``A`` per
hyper-parameter setting serves the predictive covariances. With ``Φ_n = J_nᵀ`` (``M = P``) this is
exactly the weight-space linearized Laplace approximation.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import _ops

__all__ = ["NotPositiveDefiniteError", "psd_safe_cholesky", "FeaturePosterior", "compress_factor"]

# Relative jitter first tried when a Cholesky factorisation fails (×10 per retry).
JITTER = {torch.float32: 1e-6, torch.float64: 1e-10}
MAX_JITTER_TRIES = 5


class NotPositiveDefiniteError(RuntimeError):
    """A matrix that must be positive definite is not, even after adding jitter."""


def psd_safe_cholesky(A: Tensor, warn: bool = True) -> Tensor:
    """Lower Cholesky factor of (a batch of) symmetric positive (semi)definite ``A``.

    On failure adds ``jitter · mean(diag A) · I`` only to the failing matrices, growing ×10 per
    try (with a warning when ``warn``), and raises :class:`NotPositiveDefiniteError` after
    ``MAX_JITTER_TRIES``. NaN or Inf entries raise ``ValueError`` at once.
    """
    # Checked before factorising: Cholesky reads only the lower triangle, so a NaN above the
    # diagonal would otherwise pass silently, and an Inf on the diagonal "succeeds".
    if not bool(torch.isfinite(A).all()):
        raise ValueError("fastlla: cannot factorise a matrix that contains NaN or Inf")
    L, info = torch.linalg.cholesky_ex(A)
    if not bool((info > 0).any()):
        return L
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    scale = torch.diagonal(A, dim1=-2, dim2=-1).abs().mean(dim=-1).clamp_min(1e-30)
    failed = info > 0
    jitter = JITTER.get(A.dtype, 1e-6)
    for _ in range(MAX_JITTER_TRIES):
        added = torch.where(failed, jitter * scale, torch.zeros_like(scale))
        L_try, info = torch.linalg.cholesky_ex(A + added[..., None, None] * eye)
        if not bool((info > 0).any()):
            if warn:
                warnings.warn(
                    f"fastlla: matrix not positive definite; added jitter {jitter:.1e}·mean(diag)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return L_try
        jitter *= 10
    raise NotPositiveDefiniteError(
        f"fastlla: matrix of size {n} is not positive definite, even with jitter "
        f"{jitter / 10:.1e}·mean(diag); check the inputs and the prior precision"
    )


class FeaturePosterior:
    """Gaussian posterior over ``M`` feature weights with precision ``s·H + δ I``.

    Parameters
    ----------
    H : (M, M) symmetric positive semi-definite data term ``Σ_n Φ_n Λ_n Φ_nᵀ``.
    """

    def __init__(self, H: Tensor):
        if H.dim() != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"fastlla: H must be square, got shape {tuple(H.shape)}")
        if not torch.isfinite(H).all():
            raise ValueError("fastlla: the GGN contains NaN or Inf (check the features)")
        self.H = 0.5 * (H + H.mT)
        self._eigvals: Tensor | None = None
        self._chol_key: tuple[float, float] | None = None
        self._chol: Tensor | None = None

    @property
    def n_features(self) -> int:
        return self.H.shape[0]

    @property
    def eigvals(self) -> Tensor:
        """Eigenvalues of ``H`` (clamped at zero), computed once."""
        if self._eigvals is None:
            self._eigvals = torch.linalg.eigvalsh(self.H).clamp_min(0.0)
        return self._eigvals

    def log_det_ratio(self, prior_precision: float, data_scale: float = 1.0) -> Tensor:
        """``log det(I + s·H/δ)``: the log-determinant ratio of posterior and prior precisions."""
        return torch.log1p(self.eigvals * (data_scale / prior_precision)).sum()

    def precision(self, prior_precision: float, data_scale: float = 1.0) -> Tensor:
        eye = torch.eye(self.n_features, dtype=self.H.dtype, device=self.H.device)
        return data_scale * self.H + prior_precision * eye

    def cholesky(self, prior_precision: float, data_scale: float = 1.0) -> Tensor:
        """Lower Cholesky factor of the precision, cached for the last ``(δ, s)``."""
        key = (float(prior_precision), float(data_scale))
        if self._chol_key != key:
            self._chol = psd_safe_cholesky(self.precision(prior_precision, data_scale))
            self._chol_key = key
        return self._chol

    def covariance(self, phi: Tensor, prior_precision: float, data_scale: float = 1.0) -> Tensor:
        """``Φᵀ A⁻¹ Φ`` per input for ``phi`` of shape (B, M, C); returns (B, C, C)."""
        L = self.cholesky(prior_precision, data_scale)
        return _ops.predictive_covariance(L, phi.contiguous())

    def variance(self, phi: Tensor, prior_precision: float, data_scale: float = 1.0) -> Tensor:
        """Diagonal of :meth:`covariance`; returns (B, C)."""
        L = self.cholesky(prior_precision, data_scale)
        return _ops.predictive_variance(L, phi.contiguous())

    def update(self, W: Tensor) -> None:
        """Absorb new data with factor ``W`` (M, k), ``WWᵀ = Σ_n Φ_n Λ_n Φ_nᵀ`` over it.

        ``H`` becomes ``H + WWᵀ``; a cached Cholesky factor (for its ``(δ, s)``) is updated in
        ``O(M²k)`` with ``√s·W`` (``fastlla::cholesky_update``, no refactorisation), and the
        eigenvalues are recomputed on demand. Nothing changes if ``W`` is refused or the update
        fails.
        """
        if W.dim() != 2 or W.shape[0] != self.n_features:
            raise ValueError(
                f"fastlla: the update factor must be (M, k) with M = {self.n_features}, "
                f"got {tuple(W.shape)}"
            )
        if not torch.isfinite(W).all():
            raise ValueError("fastlla: the update factor contains NaN or Inf (check the features)")
        W = W.to(dtype=self.H.dtype, device=self.H.device)
        chol = self._chol
        if chol is not None:
            scale = self._chol_key[1] ** 0.5
            chol = _ops.cholesky_update(chol, (W * scale).contiguous())
        H = self.H + W @ W.mT
        self.H = 0.5 * (H + H.mT)
        self._chol = chol
        self._eigvals = None


def compress_factor(W: Tensor) -> Tensor:
    """A factor with at most ``M`` columns and the same ``WWᵀ``: ``Rᵀ`` from ``Wᵀ = QR``."""
    M, k = W.shape
    if k <= M:
        return W
    return torch.linalg.qr(W.mT, mode="r").R.mT.contiguous()
