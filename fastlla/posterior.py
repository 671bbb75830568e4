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
from typing import Any

import torch
from torch import Tensor

from . import _ops

__all__ = [
    "NotPositiveDefiniteError",
    "psd_safe_cholesky",
    "FeaturePosterior",
    "compress_factor",
    "kron_covariance",
    "kron_gram",
    "kron_variance",
    "kron_variance_factors",
    "precision_to_scale_tril",
]

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


def precision_to_scale_tril(P: Tensor) -> Tensor:
    """Lower-triangular ``S`` with ``SSᵀ = P⁻¹`` for a symmetric positive definite ``P``, as
    ``torch.distributions``' ``_precision_to_scale_tril`` (laplace-torch's ``posterior_scale``):
    ``L`` the Cholesky factor of ``P`` with rows and columns reversed, ``S = (flip(L)ᵀ)⁻¹``."""
    Lf = psd_safe_cholesky(torch.flip(P, (-2, -1)))
    L_inv = torch.transpose(torch.flip(Lf, (-2, -1)), -2, -1)
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    return torch.linalg.solve_triangular(L_inv, eye, upper=False)


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
        # the factor of the reordered precision behind `covariance(..., kron=a)`, and its products
        self._kron_key: tuple | None = None
        self._kron_chol: Tensor | None = None
        self._kron: tuple[Tensor, Tensor, Tensor] | None = None
        # (T_e, *kron_variance_factors(T_e, ...)) last used
        self._kron_gram: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

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
        # the key is read before the factor and written after it, and the factor returned is a
        # local: threads predicting at once may each fill the cache
        chol = self._chol if self._chol_key == key else None
        if chol is None:
            chol = psd_safe_cholesky(self.precision(prior_precision, data_scale))
            self._chol, self._chol_key = chol, key
        return chol

    def covariance(
        self, phi: Tensor, prior_precision: float, data_scale: float = 1.0,
        kron: Tensor | None = None,
    ) -> Tensor:
        """``Φᵀ A⁻¹ Φ`` per input for ``phi`` of shape (B, M, C); returns (B, C, C).

        With ``kron`` ``a`` (B, k), ``phi`` holds only the first ``m = M − k·C`` features and
        the last ``k·C`` are ``a ⊗ I_C`` (index ``d·C + c``, the exact last-layer block of
        :class:`~fastlla.surrogate.LastLayerSurrogate`), which is never formed: see
        :meth:`_kron_covariance`.
        """
        if kron is not None:
            return self._kron_covariance(phi, kron, prior_precision, data_scale, diagonal=False)
        L = self.cholesky(prior_precision, data_scale)
        return _ops.predictive_covariance(L, phi.contiguous())

    def variance(
        self, phi: Tensor, prior_precision: float, data_scale: float = 1.0,
        kron: Tensor | None = None, whitened: bool = False,
    ) -> Tensor:
        """Diagonal of :meth:`covariance`; returns (B, C). ``whitened`` (with ``kron``):
        ``phi`` holds ``L_ll⁻¹ G`` instead of ``G``, ``L_ll⁻ᵀ`` the third factor of
        :meth:`kron_variance_factors` (as :meth:`GatedSurrogate.whitened_features
        <fastlla.surrogate.GatedSurrogate.whitened_features>` returns them)."""
        if kron is not None:
            if whitened:
                B, m, C = phi.shape
                self._check_kron(phi, kron)
                return kron_variance(phi, kron, *self.kron_variance_factors(
                    prior_precision, data_scale, m, C, whitened=True
                ))  # fmt: skip
            return self._kron_covariance(phi, kron, prior_precision, data_scale, diagonal=True)
        if whitened:
            raise ValueError("fastlla: whitened features need the Kronecker coefficients")
        L = self.cholesky(prior_precision, data_scale)
        return _ops.predictive_variance(L, phi.contiguous())

    def _kron_factors(
        self, prior_precision: float, data_scale: float, m: int, C: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Products of the Cholesky factor of ``A`` reordered as (Kronecker block ``e``, learned ``l``).

        ``L' = [[L_ee, 0], [L_le, L_ll]]``, ``L'L'ᵀ = PAPᵀ``; with ``g = [a ⊗ I; G]`` the whitened
        features are ``V_e = L_ee⁻¹(a ⊗ I)`` and ``V_l = L_ll⁻¹(G − L_le V_e)``. Both products
        with ``a ⊗ I`` are ``a`` times a fixed matrix: returned as ``T_e`` (k, k·C·C) for
        ``V_e`` and ``T_l`` (k, m·C) for ``L_le V_e``, with ``L_ll``. ``L'`` is cached for the
        last ``(δ, s, m, C)`` and follows :meth:`update` (no refactorisation); the products are
        re-derived from it by triangular solves.
        """
        key = (float(prior_precision), float(data_scale), m, C)
        if self._kron_key == key:  # locals, the key read first: as in `cholesky`
            Lp, kron = self._kron_chol, self._kron
        else:
            order = self._kron_order(m)
            A = self.precision(prior_precision, data_scale)
            Lp, kron = psd_safe_cholesky(A[order][:, order]), None
            self._kron_chol, self._kron_key, self._kron = Lp, key, None
        if kron is None:
            n_e = Lp.shape[0] - m
            k = n_e // C
            eye = torch.eye(n_e, dtype=Lp.dtype, device=Lp.device)
            inv_ee = torch.linalg.solve_triangular(Lp[:n_e, :n_e], eye, upper=False)
            # (L_ee⁻¹(a ⊗ I))[i, c] = Σ_d a_d L_ee⁻¹[i, d·C + c]: T_e[d, i·C + c]
            T_e = inv_ee.reshape(n_e, k, C).permute(1, 0, 2).reshape(k, n_e * C)
            T_l = (Lp[n_e:, :n_e] @ inv_ee).reshape(m, k, C).permute(1, 0, 2).reshape(k, m * C)
            kron = (T_e.contiguous(), T_l.contiguous(), Lp[n_e:, n_e:].contiguous())
            self._kron = kron
        return kron

    def _kron_order(self, m: int) -> Tensor:
        """Feature order with the last ``M − m`` (Kronecker) features first."""
        M = self.n_features
        return torch.cat([torch.arange(m, M), torch.arange(m)]).to(self.H.device)

    def _kron_covariance(
        self, phi: Tensor, a: Tensor, prior_precision: float, data_scale: float, diagonal: bool
    ) -> Tensor:
        """Covariance (or its diagonal) for features ``[G; a ⊗ I_C]`` without forming ``a ⊗ I``.

        ``O(B·(k²C² + k·m·C + m²C))`` instead of ``O(B·C·(m + kC)²)``: on the digits CNN
        (m = 128, k·C = 510) about 5× fewer operations than the dense solve.
        """
        B, m, C = phi.shape
        self._check_kron(phi, a)
        if diagonal:
            gram, inv_t, T_w = self.kron_variance_factors(prior_precision, data_scale, m, C)
            if phi.mT.is_contiguous():  # class-major features (gated): one product, no copy
                return kron_variance(phi, a, gram, inv_t, T_w)
            T_e, T_l, L_ll = self._kron_factors(prior_precision, data_scale, m, C)
            op = _ops.predictive_variance  # the fused op reads them as they are
            return kron_covariance(T_e, T_l, L_ll, phi, a, op, diagonal=True, gram=gram)
        T_e, T_l, L_ll = self._kron_factors(prior_precision, data_scale, m, C)
        return kron_covariance(T_e, T_l, L_ll, phi, a, _ops.predictive_covariance)

    def _check_kron(self, phi: Tensor, a: Tensor) -> None:
        B, m, C = phi.shape
        if a.dim() != 2 or a.shape[0] != B or (self.n_features - m) != a.shape[1] * C:
            raise ValueError(
                f"fastlla: Kronecker coefficients must be (B, k) = ({B}, "
                f"{(self.n_features - m) // max(C, 1)}), got {tuple(a.shape)}"
            )

    def kron_variance_factors(
        self, prior_precision: float, data_scale: float, m: int, C: int, whitened: bool = False
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(Q, L_ll⁻ᵀ, T_w)`` of :func:`kron_variance_factors` for the factors of
        :meth:`_kron_factors` (``m`` learned features, ``C`` outputs), cached beside them;
        ``whitened``: ``None`` in place of ``L_ll⁻ᵀ`` (what :func:`kron_variance` reads for
        features already whitened)."""
        T_e, T_l, L_ll = self._kron_factors(prior_precision, data_scale, m, C)
        cached = self._kron_gram  # a local read first, as in `cholesky`
        if cached is None or cached[0] is not T_e:
            cached = self._kron_gram = (T_e, *kron_variance_factors(T_e, T_l, L_ll, C))
        return (cached[1], None, cached[3]) if whitened else cached[1:]


    def update(self, W: Tensor) -> None:
        """Absorb new data with factor ``W`` (M, k), ``WWᵀ = Σ_n Φ_n Λ_n Φ_nᵀ`` over it.

        ``H`` becomes ``H + WWᵀ``; the cached Cholesky factors (for their ``(δ, s)``; the plain one
        and the reordered one of ``covariance(..., kron=a)``) are updated in ``O(M²k)`` with
        ``√s·W`` (``fastlla::cholesky_update``, no refactorisation), and the eigenvalues are
        recomputed on demand. Nothing changes if ``W`` is refused or the update
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
        chol, kron_chol = self._chol, self._kron_chol
        if chol is not None:
            scale = self._chol_key[1] ** 0.5
            chol = _ops.cholesky_update(chol, (W * scale).contiguous())
        if kron_chol is not None:
            _, data_scale, m, _ = self._kron_key
            W_e = W[self._kron_order(m)]  # rows in the factor's (Kronecker, learned) order
            kron_chol = _ops.cholesky_update(kron_chol, (W_e * data_scale**0.5).contiguous())
        H = self.H + W @ W.mT
        self.H = 0.5 * (H + H.mT)
        self._chol, self._kron_chol, self._kron = chol, kron_chol, None
        self._eigvals = None


def compress_factor(W: Tensor) -> Tensor:
    """A factor with at most ``M`` columns and the same ``WWᵀ``: ``Rᵀ`` from ``Wᵀ = QR``."""
    M, k = W.shape
    if k <= M:
        return W
    return torch.linalg.qr(W.mT, mode="r").R.mT.contiguous()


def kron_gram(T_e: Tensor, C: int) -> Tensor:
    """``Q`` (k, C·k) with ``Q[d, c·k + e] = Σ_i T_e[d, i·C + c] T_e[e, i·C + c]``: the diagonal
    of ``V_eᵀV_e`` is then ``a_bᵀ Q_c a_b`` (:func:`kron_covariance`), ``k²C`` operations per
    input instead of forming ``V_e`` (``k²C²``)."""
    k = T_e.shape[0]
    t = T_e.view(k, -1, C)
    return torch.einsum("dic,eic->dce", t, t).reshape(k, C * k)


def kron_variance_factors(
    T_e: Tensor, T_l: Tensor, L_ll: Tensor, C: int
) -> tuple[Tensor, Tensor, Tensor]:
    """What :func:`kron_variance` reads, from the factors of
    :meth:`FeaturePosterior._kron_factors`: :func:`kron_gram` of ``T_e``; ``L_ll⁻ᵀ`` (m, m); and
    ``T_l`` whitened, ``T_w[d, c·m + i] = Σ_j L_ll⁻¹[i, j] T_l[d, j·C + c]`` (k, C·m), so that
    ``(a @ T_w)`` is ``L_ll⁻¹ L_le V_e`` with the classes first."""
    k, m = T_l.shape[0], L_ll.shape[0]
    eye = torch.eye(m, dtype=L_ll.dtype, device=L_ll.device)
    inv = torch.linalg.solve_triangular(L_ll, eye, upper=False)  # L_ll⁻¹
    T_w = torch.einsum("ij,djc->dci", inv, T_l.view(k, m, C)).reshape(k, C * m)
    return kron_gram(T_e, C), inv.mT.contiguous(), T_w.contiguous()


def kron_variance(
    phi: Tensor, a: Tensor, gram: Tensor, inv_t: Tensor | None, T_w: Tensor
) -> Tensor:
    """The diagonal of :func:`kron_covariance` (B, C) from :func:`kron_variance_factors`: the
    exact block's ``a_bᵀ Q_c a_b`` plus ``‖L_ll⁻¹(G_b − L_le V_e)‖²`` per class, the whitened
    learned part as one product ``G_bᵀ L_ll⁻ᵀ − (a T_w)`` over all inputs and classes (no
    triangular solve per call; ``phi`` read class-major, as the gated features are laid out).
    ``inv_t=None``: ``phi`` holds ``L_ll⁻¹ G`` already."""
    B, m, C = phi.shape
    k = a.shape[1]
    a = a.to(gram.dtype)
    rows = phi.to(gram.dtype).mT.reshape(B * C, m)  # a view when phi is (B, C, m)-contiguous
    if inv_t is None:
        whitened = rows - (a @ T_w).view(B * C, m)
    else:
        whitened = torch.addmm((a @ T_w).view(B * C, m), rows, inv_t, beta=-1)
    exact = ((a @ gram).view(B, C, k) * a[:, None, :]).sum(-1)
    return exact + whitened.square().sum(-1).view(B, C)


def kron_covariance(
    T_e: Tensor, T_l: Tensor, L_ll: Tensor, phi: Tensor, a: Tensor, whitened: Any,
    diagonal: bool = False, gram: Tensor | None = None,
) -> Tensor:
    """``Σ_b`` (or its diagonal) for features ``[G_b; a_b ⊗ I_C]`` from the factors of
    :meth:`FeaturePosterior._kron_factors`: ``V_eᵀV_e + whitened(L_ll, G − L_le V_e)``, where
    ``whitened(L, X)`` is ``Xᵀ(LLᵀ)⁻¹X`` per input (or its diagonal) — the fused op or a
    triangular solve. ``gram``: :func:`kron_gram` of ``T_e``, with which the diagonal of
    ``V_eᵀV_e`` is read without forming ``V_e``."""
    B, m, C = phi.shape
    a = a.to(T_e.dtype)
    G = (phi.to(T_e.dtype) - (a @ T_l).view(B, m, C)).contiguous()
    if diagonal and gram is not None:
        k = a.shape[1]
        exact = ((a @ gram).view(B, C, k) * a[:, None, :]).sum(-1)
        return exact + whitened(L_ll, G)
    V_e = (a @ T_e).view(B, -1, C)  # (B, k·C, C)
    if diagonal:
        return V_e.square().sum(1) + whitened(L_ll, G)
    return V_e.mT @ V_e + whitened(L_ll, G)
