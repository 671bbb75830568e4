"""ScaLLA's predictive: the GLM predictive over the surrogate's features.

With the feature posterior ``A = s·H + δI`` (:class:`~fastlla.posterior.FeaturePosterior`) the
predictive covariance of the linearised network is ``g(x)ᵀ A⁻¹ g(x)`` (``C×C`` per input), the
exact last-layer block kept in Kronecker-factored form, plus, when on, the residual prior
variance ``(κ(x,x) − g(x)ᵀg(x))/δ`` (FITC-style). :meth:`FeaturePredictive.kernel_fidelity`
measures how well ``g(x)ᵀg(x')`` matches the NTK.

:class:`FeaturePredictive` is a mixin of :class:`fastlla.ScaLLA`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .functional import batch_size, check_finite, slice_batch, to_device
from .projections import ProjectionSampler
from .network_head import forward_with_inputs, forward_with_penultimate
from .surrogate import (
    LastLayerSurrogate,
    check_surrogate_output,
    surrogate_features,
)

__all__ = ["FeaturePredictive", "PredictiveFeatures"]


@dataclass
class PredictiveFeatures:
    """What the predictive covariance needs about a batch of test inputs.

    ``phi``: the features ``g(x)`` (B, M, C) — only the ``m`` learned ones when ``kron`` is set;
    ``kron``: ``a = Uᵀψ(x)`` (B, k), the exact last-layer features ``a ⊗ I_C`` in factored form;
    ``residual``: the residual prior block ``κ(x,x) − g(x)ᵀg(x)`` (B, C, C), only its diagonal
    (B, C) when asked for, or ``None``; ``whitened``: ``phi`` holds the learned features
    whitened by the posterior, ``L_ll⁻¹ g`` (:meth:`FeaturePosterior.variance
    <fastlla.posterior.FeaturePosterior.variance>`).
    """

    phi: Tensor
    kron: Tensor | None = None
    residual: Tensor | None = None
    whitened: bool = False


def _checked_covariance(cov: Tensor, features: PredictiveFeatures) -> Tensor:
    """``cov`` (covariances or variances), or ``ValueError`` where it holds NaN or Inf (finiteness
    is checked here, on B·C² values, rather than on the B·M·C features: NaN/Inf propagate)."""
    if not torch.isfinite(cov).all():
        if not torch.isfinite(features.phi).all():
            raise ValueError("fastlla: the surrogate's output contains NaN or Inf")
        raise ValueError(
            "fastlla: the predictive covariance contains NaN or Inf (check the network's "
            "penultimate features and the prior precision)"
        )
    return cov


class FeaturePredictive:
    """The hooks of :class:`~fastlla.laplace.LaplaceBase`'s predictive API for a feature
    posterior, and the kernel diagnostics; mixed into :class:`fastlla.ScaLLA`."""

    def _eigvals(self) -> Tensor:
        return self.posterior.eigvals

    @property
    def residual_mode(self) -> str | bool:
        """The residual-variance correction in force: ``"head"``, ``"jvp"`` or ``False`` — the
        ``residual_variance`` attribute where it is set explicitly (it can be switched after
        ``fit``), else what ``"auto"`` became at ``fit`` (:attr:`settings`; ``False`` before)."""
        mode = self.residual_variance
        if mode == "auto":
            return self.settings.residual_variance if self.settings is not None else False
        return mode or False

    def _outputs_and_features(
        self, x: Any, diagonal_residual: bool = False, whiten: tuple | None = None
    ) -> tuple[Tensor, PredictiveFeatures]:
        """``f(x)`` and :class:`PredictiveFeatures` (the residual block's diagonal only with
        ``diagonal_residual``); the network runs once, also yielding ``ψ(x)`` for the exact
        last-layer block and the residual head (and a shared trunk's output). ``whiten``
        ``(δ, s)``: where the exact block's learned features can be whitened inside their last
        map (:attr:`LastLayerSurrogate.whitens <fastlla.surrogate.LastLayerSurrogate.whitens>`)
        and the residual needs no features, they come whitened by the posterior at ``(δ, s)``,
        for the variances."""
        mode = self.residual_mode
        exact = self.surrogate if isinstance(self.surrogate, LastLayerSurrogate) else None
        head_name = exact.head_name if exact is not None else None
        pooled = exact is not None and exact.pooled
        if mode == "head" and self.residual_head is not None:
            head_name = self.residual_head.head_name
            pooled = self.residual_head.pooled
        # a gated surrogate sharing the network's trunk: its u is read in the network's pass
        shared = exact.shared_trunk_input if exact is not None and not pooled else None
        u = None
        with torch.no_grad():
            if head_name is None:
                f, psi = self.network.output(x), None
            else:
                bias = exact.has_bias if exact is not None else self.residual_head.has_bias
                if shared is not None and head_name == exact.head_name:
                    others = () if shared == head_name else (shared,)
                    f, psi, inputs = forward_with_inputs(
                        self.model, head_name, x, bias, head_is_output=True, others=others
                    )
                    u = inputs[0] if inputs else psi[:, : psi.shape[1] - int(bias)]
                else:
                    f, psi = forward_with_penultimate(
                        self.model, head_name, x, bias, head_is_output=exact is not None,
                        pooled=pooled,
                    )  # fmt: skip
                f = f.to(self.dtype).unsqueeze(-1) if f.dim() == 1 else f.to(self.dtype)
            # finiteness is checked on the covariance (B·C² values, not B·M·C): NaN/Inf propagate
            if exact is None:
                phi = check_surrogate_output(
                    surrogate_features(self.surrogate, x), x, self.n_outputs, finite=False
                )
                feats = PredictiveFeatures(phi)
            else:
                whitened = whiten is not None and mode != "jvp" and exact.whitens
                if whitened:
                    inv_t = self.posterior.kron_variance_factors(
                        *whiten, exact.n_learned, self.n_outputs
                    )[1]
                    learned = exact.whitened_learned_features(x, psi, u, inv_t)
                else:
                    learned = exact.learned_features(x, psi, u)
                learned = check_surrogate_output(
                    learned, x, self.n_outputs, exact.n_learned, finite=False
                )
                feats = PredictiveFeatures(
                    learned, kron=exact.coefficients(psi), whitened=whitened
                )
            if mode:
                feats.residual = self._residual_block(
                    x, feats.phi, mode, psi=psi, diagonal=diagonal_residual
                )
        return f, feats

    def _features(self, x: Any) -> PredictiveFeatures:
        return self._outputs_and_features(x)[1]

    def _covariance_from_features(
        self, features: PredictiveFeatures, prior_precision: float, data_scale: float
    ) -> Tensor:
        """``g(x)ᵀ A⁻¹ g(x)``, plus the residual prior variance ``r(x)/δ`` when it is on."""
        cov = self.posterior.covariance(features.phi, prior_precision, data_scale, features.kron)
        if features.residual is not None:
            cov = cov + features.residual.to(cov.dtype) / prior_precision
        return _checked_covariance(cov, features)

    def _prior_covariance_from_features(
        self, features: PredictiveFeatures, prior_precision: float
    ) -> Tensor:
        """``g(x)ᵀg(x)/δ`` (B, C, C), plus ``r(x)/δ`` when the residual variance is on: the
        predictive covariance under the prior ``w ~ N(0, I/δ)`` alone."""
        phi = self._dense_features(features)
        cov = phi.mT @ phi
        if features.residual is not None:
            cov = cov + features.residual.to(cov.dtype)
        return cov / prior_precision

    @property
    def n_params(self) -> int:
        """``M``: the posterior is over the weights ``w`` of ``f(x) + g(x)ᵀw`` (the surrogate's
        features), not the network's parameters."""
        return self.n_features

    def _dense_features(self, features: PredictiveFeatures) -> Tensor:
        """All ``M`` features (B, M, C), the exact last-layer block ``a ⊗ I_C`` written out."""
        if features.kron is None:
            return features.phi
        B, _, C = features.phi.shape
        eye = torch.eye(C, dtype=features.phi.dtype, device=features.phi.device)
        exact = (features.kron.to(eye.dtype)[:, :, None, None] * eye).reshape(B, -1, C)
        return torch.cat([features.phi, exact], dim=1)

    def _outputs_and_variance(self, x: Any, delta: Any, scale: float) -> tuple[Tensor, Tensor]:
        f, feats = self._outputs_and_features(x, diagonal_residual=True, whiten=(delta, scale))
        var = self.posterior.variance(feats.phi, delta, scale, feats.kron, feats.whitened)
        if feats.residual is not None:
            var = var + feats.residual.to(var.dtype) / delta
        return f, _checked_covariance(var, feats)

    def _outputs_and_joint_covariance(
        self, x: Any, delta: Any, scale: float
    ) -> tuple[Tensor, Tensor]:
        """The joint covariance of the feature posterior; the residual-variance correction,
        per input, enters its diagonal blocks only (FITC: no residual covariance across inputs)."""
        f, feats = self._outputs_and_features(x)
        phi = self._dense_features(feats)
        B, M, C = phi.shape
        cov = self.posterior.covariance(phi.permute(1, 0, 2).reshape(1, M, B * C), delta, scale)[0]
        if feats.residual is not None:
            cov = cov + torch.block_diag(*feats.residual.to(cov.dtype)) / delta
        return f, cov

    def _jacobians_and_outputs(self, x: Any) -> tuple[Tensor, Tensor]:
        f, feats = self._outputs_and_features(x)
        return self._dense_features(feats).mT, f

    # ------------------------------------------------------------------ diagnostics
    def kernel_fidelity(
        self, x: Any, method: str = "auto", n_projections: int = 64, seed: int = 12345,
        chunk_size: int = 32,
    ) -> float:
        """Relative kernel error ``‖ΦΦᵀ − κ‖_F / ‖κ‖_F`` on the inputs ``x``.

        ``"exact"`` forms the NTK Gram from explicit Jacobians (small models); ``"jvp"``
        estimates it without Jacobians: ``⟨Q, κ⟩ = E‖Φᵀ z‖²`` and ``‖κ‖²_F = E[(z_sᵀ z_t)²]`` for
        independent projections ``s ≠ t``. ``"auto"`` is exact when ``B·C·P ≤ 5·10⁷``.
        """
        if self.surrogate is None or self.n_outputs is None:
            raise RuntimeError("fastlla: call ScaLLA.fit(train_loader) first")
        x = to_device(self._model_input(x), self.device, self.input_dtype)
        check_finite("the inputs", x)
        with torch.no_grad():
            phi = self._surrogate_features(x).double()
        rows = phi.permute(0, 2, 1).reshape(-1, phi.shape[1])
        B = batch_size(x)
        if method == "auto":
            method = "exact" if B * self.n_outputs * self.network.n_params <= 5e7 else "jvp"
        if method == "exact":
            J = torch.cat(
                [
                    self.network.jacobian(slice_batch(x, a, min(a + chunk_size, B)))
                    for a in range(0, B, chunk_size)
                ]
            ).double()
            J = J.reshape(-1, J.shape[-1])
            kappa = J @ J.mT
            return float(torch.linalg.norm(rows @ rows.mT - kappa) / torch.linalg.norm(kappa))
        if method != "jvp":
            raise ValueError(f"fastlla: method must be 'auto', 'exact' or 'jvp', got {method!r}")
        if n_projections < 2:
            raise ValueError("fastlla: the JVP estimate needs n_projections >= 2")
        sampler = ProjectionSampler(self.network, n_projections, "rademacher", seed)
        _, z = sampler.project(x, 0)
        Z = z.double().reshape(n_projections, -1)  # (S, R)
        q_norm2 = (rows.mT @ rows).square().sum()
        q_kappa = (Z @ rows).square().sum(dim=1).mean()
        pair = (Z @ Z.mT).square()
        off = ~torch.eye(n_projections, dtype=torch.bool, device=pair.device)
        k_norm2 = pair[off].mean()
        err2 = (q_norm2 - 2 * q_kappa + k_norm2).clamp_min(0.0)
        return float(torch.sqrt(err2 / k_norm2))

    def _residual_block(
        self, x: Any, phi: Tensor, mode: str, n_projections: int = 64, psi: Tensor | None = None,
        diagonal: bool = False,
    ) -> Tensor:
        """``κ(x, x) − g(x)ᵀg(x)`` (B, C, C), made positive semi-definite, or its diagonal (B, C).

        ``"head"`` reads the learned :class:`~fastlla.surrogate.ResidualHead` (its factor
        ``R(x)`` is C×C; the diagonal of ``RRᵀ`` is ``R``'s row sums of squares, no product is
        formed); ``"jvp"`` estimates ``κ(x, x)`` from ``n_projections`` Rademacher JVPs
        (unbiased; in chunks of 16) and needs the whole block for its positive part. With the
        exact last-layer block only the learned part's residual remains.
        """
        exact_block = self.surrogate if isinstance(self.surrogate, LastLayerSurrogate) else None
        if mode == "head":
            if self.residual_head is None:
                raise RuntimeError(
                    "fastlla: residual_variance='head' needs a fit with that option "
                    "(the head is trained beside the surrogate)"
                )
            R = self.residual_head(x, psi)
            return R.square().sum(-1) if diagonal else R @ R.mT
        if mode != "jvp":
            raise ValueError(
                f"fastlla: residual_variance must be False, 'jvp' or 'head', got {mode!r}"
            )
        g = phi[:, : exact_block.n_learned] if exact_block is not None else phi
        p0 = next(iter(self.network.params().values()))
        if exact_block is not None and psi is None:
            psi = exact_block.psi(x)
        kappa, done = 0.0, 0
        while done < n_projections:
            n = min(16, n_projections - done)
            sampler = ProjectionSampler(self.network, n, "rademacher", self.seed + 7919 + done)
            tangents = sampler.tangents(0, p0.device, self.dtype)
            _, z = sampler.project(x, 0, tangents)
            if exact_block is not None:
                z = z - exact_block.head_jvp(tangents, psi, self.network.names)
            kappa = kappa + torch.einsum("sbc,sbd->bcd", z, z)
            done += n
        r = kappa / n_projections - g.mT @ g
        evals, evecs = torch.linalg.eigh(0.5 * (r + r.mT))
        if diagonal:
            return (evecs.square() * evals.clamp_min(0.0).unsqueeze(-2)).sum(-1)
        return (evecs * evals.clamp_min(0.0).unsqueeze(-2)) @ evecs.mT
