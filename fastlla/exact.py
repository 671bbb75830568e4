"""Exact linearized Laplace with explicit Jacobians — the oracle for small models.

Two equivalent forms, chosen by the cheaper size (``form="auto"``):

* **weight space** (``P ≤ N·C``): ``G = Σ_n J_nᵀ Λ_n J_n`` (``P×P``), posterior precision
  ``sG + δI``, ``Σ(x) = J(x) (sG + δI)⁻¹ J(x)ᵀ`` — the feature posterior with ``Φ = Jᵀ``.
* **function space** (``P > N·C``): with ``Ĵ_n = R_nᵀ J_n`` (``R_n R_nᵀ = Λ_n``) stacked into
  ``Ĵ`` (``NC×P``) and ``K = ĴĴᵀ``, Woodbury gives
  ``Σ(x) = (J(x)J(x)ᵀ − s·J(x)Ĵᵀ (δI + sK)⁻¹ ĴJ(x)ᵀ) / δ``, and ``G`` and ``K`` share
  their non-zero eigenvalues.

Jacobians are computed with ``torch.func`` over chunks of ``chunk_size`` inputs, so memory is
``O(chunk_size·C·P)`` beyond the ``P×P`` or ``NC×P`` matrices the chosen form stores.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _ops
from .functional import batch_size, slice_batch
from .laplace import LaplaceBase, _state_int, _state_tensor
from .posterior import FeaturePosterior, psd_safe_cholesky
from .predictive import Likelihood

__all__ = ["ExactLLA", "softmax_hessian_factor"]


def softmax_hessian_factor(logits: Tensor) -> Tensor:
    """``R`` with ``R Rᵀ = diag(p) − p pᵀ``, ``p = softmax(logits)``: ``diag(√p) − p √pᵀ``.

    ``logits`` (N, C) → (N, C, C).
    """
    p = torch.softmax(logits, dim=-1)
    sqrt_p = p.sqrt()
    return torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)


class ExactLLA(LaplaceBase):
    """Full-Jacobian linearized Laplace approximation (small models).

    Parameters
    ----------
    model, likelihood, prior_precision, sigma_noise : as in :class:`fastlla.ScaLLA`.
    form : ``"auto"`` (the smaller of ``P`` and ``N·C``), ``"weight"`` or ``"function"``.
    chunk_size : inputs per Jacobian computation.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        prior_precision: float = 1.0,
        sigma_noise: float = 1.0,
        form: str = "auto",
        chunk_size: int = 32,
    ):
        super().__init__(model, likelihood, prior_precision, sigma_noise)
        if form not in ("auto", "weight", "function"):
            raise ValueError(f"fastlla: form must be 'auto', 'weight' or 'function', got {form!r}")
        if chunk_size < 1:
            raise ValueError(f"fastlla: chunk_size must be at least 1, got {chunk_size}")
        self.form = form
        self.chunk_size = int(chunk_size)
        self.posterior: FeaturePosterior | None = None  # weight space
        self._jhat: Tensor | None = None  # function space: Ĵ (NC, P)
        self._kernel_eigvals: Tensor | None = None
        self._kernel_chol: tuple[tuple[float, float], Tensor] | None = None

    @property
    def n_params(self) -> int:
        return self.network.n_params

    # ------------------------------------------------------------------ Jacobians
    def _jacobians(self, x: Any) -> Tensor:
        """``J(x)`` as (B, C, P), computed ``chunk_size`` inputs at a time."""
        n = batch_size(x)
        chunks = [
            self.network.jacobian(slice_batch(x, a, min(a + self.chunk_size, n)))
            for a in range(0, n, self.chunk_size)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0)

    def _resolve_form(self, loader: Iterable) -> str:
        if self.form != "auto":
            return self.form
        if isinstance(loader, Iterator):  # choosing the form reads the data before fitting does
            raise TypeError(
                "fastlla: form='auto' needs a re-iterable train_loader (a DataLoader or a list "
                "of batches), not a one-shot iterator; pass form='weight' or 'function'"
            )
        try:
            n = len(loader.dataset)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            n = sum(batch_size(x) for x, _ in self._batches(loader))
        f = self.network.output(next(iter(self._batches(loader)))[0])
        return "weight" if self.n_params <= n * f.shape[-1] else "function"

    # ------------------------------------------------------------------ fitting
    def fit(self, train_loader: Iterable, progress_bar: bool = False) -> ExactLLA:
        """Accumulate the exact GGN (or NTK Gram) over ``train_loader``.

        Everything is computed before anything is stored: a fit that fails (an empty loader,
        NaN outputs in a later batch, ...) leaves the estimator, an earlier fit included, as it
        was.
        """
        form = self._resolve_form(train_loader)
        P = self.n_params
        G = torch.zeros(P, P, dtype=self.dtype, device=self.device) if form == "weight" else None
        classification = self.likelihood is Likelihood.CLASSIFICATION
        rows, n_outputs, n_data, stat = [], None, 0, 0.0
        for x, y in tqdm(self._batches(train_loader), disable=not progress_bar, desc="ExactLLA"):
            f = self.network.output(x)
            self._check_outputs(f, y, n_outputs)
            n_outputs = f.shape[-1]
            stat += self._loglik_term(f, y)
            n_data += f.shape[0]
            J = self._jacobians(x)
            if form == "weight":
                _ops.ggn_accumulate(G, J.mT.contiguous(), f if classification else None)
            else:
                Jhat = softmax_hessian_factor(f).mT @ J if classification else J
                rows.append(Jhat.reshape(-1, P))
        posterior = FeaturePosterior(G) if form == "weight" else None
        jhat = None if form == "weight" else torch.cat(rows)
        self._commit(
            form, posterior, jhat, n_outputs=n_outputs, n_data=n_data, _loglik_stat=stat,
            _param_norm2=float(self.network.flat_params().double().square().sum()),
        )  # fmt: skip
        return self

    def _commit(
        self, form: str, posterior: FeaturePosterior | None, jhat: Tensor | None, **base: Any
    ) -> None:
        """Store a complete fit (or loaded state); nothing here can fail part-way."""
        kernel = None
        if jhat is not None:
            K = jhat @ jhat.mT
            kernel = 0.5 * (K + K.mT)
        self.__dict__.update(base)
        self.fitted_form, self.posterior, self._jhat = form, posterior, jhat
        if kernel is not None:
            self._kernel = kernel
        self._kernel_eigvals = None
        self._kernel_chol = None
        self._mark_fitted()

    # ------------------------------------------------------------------ hooks
    def _eigvals(self) -> Tensor:
        if self.posterior is not None:
            return self.posterior.eigvals
        if self._kernel_eigvals is None:
            self._kernel_eigvals = torch.linalg.eigvalsh(self._kernel).clamp_min(0.0)
        return self._kernel_eigvals

    def _features(self, x: Any) -> Any:
        J = self._jacobians(x)
        if self.posterior is not None:
            return J.mT.contiguous()  # (B, P, C): the weight-space features Φ = Jᵀ
        return J @ J.mT, J @ self._jhat.mT  # J*J*ᵀ (B, C, C) and J*Ĵᵀ (B, C, NC)

    def _covariance_from_features(
        self, features: Any, prior_precision: float, data_scale: float
    ) -> Tensor:
        if self.posterior is not None:
            return self.posterior.covariance(features, prior_precision, data_scale)
        kxx, kxX = features
        key = (float(prior_precision), float(data_scale))
        if self._kernel_chol is None or self._kernel_chol[0] != key:
            eye = torch.eye(self._kernel.shape[0], dtype=self.dtype, device=self.device)
            L = psd_safe_cholesky(prior_precision * eye + data_scale * self._kernel)
            self._kernel_chol = (key, L)
        L = self._kernel_chol[1]
        B, C, NC = kxX.shape
        V = torch.linalg.solve_triangular(L, kxX.reshape(B * C, NC).mT, upper=False)
        V = V.reshape(NC, B, C).permute(1, 0, 2)
        return (kxx - data_scale * (V.mT @ V)) / prior_precision

    # ------------------------------------------------------------------ saving
    def state_dict(self) -> dict[str, Any]:
        self._check_fitted()
        state = self._base_state()
        state.update(form=self.fitted_form, chunk_size=self.chunk_size)
        if self.posterior is not None:
            state["H"] = self.posterior.H
        else:
            state["jhat"] = self._jhat
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a fitted estimator; the model must be the one it was fitted on.

        Every entry is checked (keys, types, counts, finiteness, and ``H`` (P, P) or ``jhat``
        (N·C, P) against the model and the counts) before anything changes: a refused state
        leaves the estimator as it was.
        """
        base = self._validated_base_state(state, ("form", "chunk_size"), ("H", "jhat"))
        form = state["form"]
        if form not in ("weight", "function"):
            raise ValueError(f"fastlla: state_dict['form'] must be 'weight' or 'function', got {form!r}")
        chunk_size = _state_int(state, "chunk_size", minimum=1)
        key = "H" if form == "weight" else "jhat"
        other = "jhat" if form == "weight" else "H"
        if key not in state or other in state:
            raise ValueError(
                f"fastlla: a {form}-space state_dict holds {key!r} (and not {other!r})"
            )
        P = self.n_params
        shape = (P, P) if form == "weight" else (base["n_data"] * base["n_outputs"], P)
        value = _state_tensor(state, key, shape).to(self.device, self.dtype)
        posterior = jhat = None
        if form == "weight":
            if not torch.allclose(value, value.mT, rtol=1e-4, atol=1e-6 * float(value.abs().max())):
                raise ValueError("fastlla: state_dict['H'] is not symmetric")
            posterior = FeaturePosterior(value)
        else:
            jhat = value
        self.chunk_size = chunk_size
        self._commit(form, posterior, jhat, **base)
