"""ExactLLA's predictive: the GLM predictive over explicit Jacobians, in weight or function space.

With the GGN ``G`` and the prior ``D`` (a scalar ``δ`` or a diagonal), the predictive covariance
of the linearised network is ``J(x) (sG + D)⁻¹ J(x)ᵀ`` — computed in weight space from the
eigendecomposition of ``G`` (scalar prior) or a Cholesky factor of ``sG + D``, or in function
space through Woodbury, ``(J(x)J(x)ᵀ − s·J(x)Ĵᵀ(δI + sK)⁻¹ĴJ(x)ᵀ)/δ`` — plus weight-space
samples for ``pred_type="nn"``.

:class:`JacobianPredictive` is a mixin of :class:`fastlla.ExactLLA`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _ops
from .functional import batch_size
from .posterior import psd_safe_cholesky
from .predictive import standard_normal

__all__ = ["JacobianPredictive"]


class JacobianPredictive:
    """The hooks of :class:`~fastlla.laplace.LaplaceBase`'s predictive API and evidence for a
    posterior over the network's parameters; mixed into :class:`fastlla.ExactLLA`."""

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
        if self._prior_precision.numel() != 1:
            return J, None, None  # a diagonal prior needs J itself
        return None, J @ J.mT, J @ self._jhat.mT  # J*J*ᵀ (B, C, C) and J*Ĵᵀ (B, C, NC)

    def _covariance_from_features(
        self, features: Any, prior_precision: float | Tensor, data_scale: float
    ) -> Tensor:
        if isinstance(prior_precision, Tensor):  # a diagonal prior (per layer or per parameter)
            return self._covariance_diagonal_prior(features, prior_precision, data_scale)
        if self.posterior is not None:
            return self.posterior.covariance(features, prior_precision, data_scale)
        J, kxx, kxX = features
        if kxx is None:
            kxx, kxX = J @ J.mT, J @ self._jhat.mT
        key = (float(prior_precision), float(data_scale))
        cached = self._kernel_chol  # a local: another thread may replace the cache meanwhile
        if cached is None or cached[0] != key:
            eye = torch.eye(self._kernel.shape[0], dtype=self.dtype, device=self.device)
            cached = (key, psd_safe_cholesky(prior_precision * eye + data_scale * self._kernel))
            self._kernel_chol = cached
        L = cached[1]
        B, C, NC = kxX.shape
        V = torch.linalg.solve_triangular(L, kxX.reshape(B * C, NC).mT, upper=False)
        V = V.reshape(NC, B, C).permute(1, 0, 2)
        return (kxx - data_scale * (V.mT @ V)) / prior_precision

    def _prior_covariance_from_features(
        self, features: Any, prior_precision: float | Tensor
    ) -> Tensor:
        """``J(x) D⁻¹ J(x)ᵀ`` (B, C, C): the predictive covariance under the prior alone, from
        :meth:`_features` (``D = δI`` or the diagonal ``prior_precision``)."""
        if self.posterior is not None:  # weight space: Φ = Jᵀ (B, P, C)
            J = features.mT
        elif features[0] is not None:
            J = features[0]
        elif isinstance(prior_precision, Tensor):
            raise RuntimeError("fastlla: these features were computed for a scalar prior")
        else:
            return features[1] / prior_precision  # J*J*ᵀ / δ
        if isinstance(prior_precision, Tensor):
            return (J / prior_precision.to(J.dtype)) @ J.mT
        return (J @ J.mT) / prior_precision

    def _diagonal_factor(self, delta: Tensor, scale: float) -> Tensor:
        """Cholesky factor of ``sG + D`` (weight space) or ``I + s ĴD⁻¹Ĵᵀ`` (function space)."""
        cached = self._diag_chol
        if cached is not None and cached[1] == scale and torch.equal(cached[0], delta):
            return cached[2]
        d = delta.to(self.dtype)
        if self.posterior is not None:
            A = scale * self.posterior.H + torch.diag(d)
        else:
            A = scale * ((self._jhat / d) @ self._jhat.mT)
            A = 0.5 * (A + A.mT) + torch.eye(A.shape[0], dtype=self.dtype, device=self.device)
        L = psd_safe_cholesky(A)
        self._diag_chol = (delta.clone(), scale, L)
        return L

    def _covariance_diagonal_prior(self, features: Any, delta: Tensor, scale: float) -> Tensor:
        L = self._diagonal_factor(delta, float(scale))
        if self.posterior is not None:
            return _ops.predictive_covariance(L, features)
        J = features[0]
        if J is None:
            raise RuntimeError("fastlla: these features were computed for a scalar prior")
        JD = J / delta.to(self.dtype)  # J D⁻¹ (B, C, P)
        kxx, kxX = JD @ J.mT, JD @ self._jhat.mT
        B, C, NC = kxX.shape
        V = torch.linalg.solve_triangular(L, kxX.reshape(B * C, NC).mT, upper=False)
        V = V.reshape(NC, B, C).permute(1, 0, 2)
        return kxx - scale * (V.mT @ V)

    def _log_det_ratio_diag(self, delta: Tensor, scale: Tensor) -> Tensor:
        # float64 and differentiable in δ and s: 2 Σ log diag chol
        if self.posterior is not None:
            A = scale * self.posterior.H.to(torch.float64) + torch.diag(delta)
            offset = delta.log().sum()
        else:
            jhat = self._jhat.to(torch.float64)
            A = scale * ((jhat / delta) @ jhat.mT)
            A = 0.5 * (A + A.mT) + torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            offset = 0.0
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            raise ValueError("fastlla: the posterior precision is not positive definite")
        return 2.0 * torch.diagonal(L).log().sum() - offset

    # ------------------------------------------------------------------ variances, samples
    def _jacobian_covariance(self, J: Tensor, diagonal: bool = False) -> Tensor:
        """``J P⁻¹ Jᵀ`` (B, C, C) for Jacobians ``J`` (B, C, P) at the current ``(δ, σ)`` —
        ``diagonal``: only its diagonal (B, C), as row sums of squares, no ``C×C`` block."""
        delta, s = self._delta(), self.data_scale
        if self.posterior is not None:
            phi = J.mT.contiguous()
            if not isinstance(delta, Tensor):
                op = self.posterior.variance if diagonal else self.posterior.covariance
                return op(phi, delta, s)
            L = self._diagonal_factor(delta, s)
            return (_ops.predictive_variance if diagonal else _ops.predictive_covariance)(L, phi)
        # function space: J D⁻¹ Jᵀ − s (J D⁻¹ Ĵᵀ)(I + s Ĵ D⁻¹ Ĵᵀ)⁻¹(Ĵ D⁻¹ Jᵀ)
        d = self._prior_diagonal().to(self.dtype)
        L = self._diagonal_factor(d, s)
        JD = J / d
        B, C, NC = J.shape[0], J.shape[1], self._jhat.shape[0]
        kxX = (JD @ self._jhat.mT).reshape(B * C, NC)
        V = torch.linalg.solve_triangular(L, kxX.mT, upper=False)
        V = V.reshape(NC, B, C).permute(1, 0, 2)  # (B, NC, C)
        if diagonal:
            return (JD * J).sum(-1) - s * V.square().sum(1)
        return JD @ J.mT - s * (V.mT @ V)

    def _outputs_and_variance(self, x: Any, delta: Any, scale: float) -> tuple[Tensor, Tensor]:
        return self.network.output(x), self._jacobian_covariance(self._jacobians(x), True)

    def _outputs_and_joint_covariance(
        self, x: Any, delta: Any, scale: float
    ) -> tuple[Tensor, Tensor]:
        J = self._jacobians(x)
        B, C, P = J.shape
        return self.network.output(x), self._jacobian_covariance(J.reshape(1, B * C, P))[0]

    def _jacobians_and_outputs(self, x: Any) -> tuple[Tensor, Tensor]:
        return self._jacobians(x), self.network.output(x)

    def _posterior_mean(self) -> Tensor:
        return self._theta()

    def _posterior_ggn(self) -> Tensor:
        if self.posterior is not None:
            return self.posterior.H
        G = self._jhat.mT @ self._jhat  # Ĵ Ĵᵀ's counterpart in weight space, P × P
        return 0.5 * (G + G.mT)

    def _weight_samples(self, n_samples: int, generator: torch.Generator) -> Tensor:
        """``θ* + S ε`` (laplace-torch's draw: ``S`` the :attr:`posterior_scale`, ``ε`` drawn
        as (S, P) from ``generator``) in weight space; in function space, where no ``P×P``
        matrix is formed, Matheron's rule on (S, P + N·C) draws (:meth:`_function_space_draws`)."""
        P = self.n_params
        if self.posterior is not None:
            eps = standard_normal((n_samples, P), generator, self.dtype, self.device)
            return self._theta() + eps @ self.posterior_scale.mT
        NC = self._jhat.shape[0]
        eps = standard_normal((n_samples, P + NC), generator, self.dtype, self.device)
        return self._theta() + self._function_space_draws(eps)

    def _function_space_draws(self, eps: Tensor) -> Tensor:
        """Draws of ``N(0, P⁻¹)`` (S, P) from standard normals ``eps`` (S, P + N·C) without a
        ``P×P`` matrix: a prior draw ``u = D^{-1/2} ε₁`` and noise ``e = s^{-1/2} ε₂`` give
        ``u − D⁻¹Ĵᵀ(ĴD⁻¹Ĵᵀ + I/s)⁻¹(Ĵu + e)``, whose covariance is ``(sĴᵀĴ + D)⁻¹``."""
        P, s = self.n_params, self.data_scale
        d = self._prior_diagonal().to(self.dtype)
        u = eps[:, :P] / d.sqrt()
        r = self._jhat @ u.mT + eps[:, P:].mT / s**0.5  # (NC, S)
        z = torch.cholesky_solve(r, self._diagonal_factor(d, s))  # (I + sĴD⁻¹Ĵᵀ)⁻¹ r
        return u - s * (self._jhat.mT @ z).mT / d

    def _nn_functional_samples(
        self, x: Any, n_samples: int, generator: torch.Generator, fitting: bool
    ) -> Tensor:
        """The network at :meth:`sample`'s weights (S, B, C), run on a private binding of the
        parameters (the model's own are never changed)."""
        x = self._prediction_inputs(x, fitting)
        if batch_size(x) == 0:  # the network is not run on a batch of no inputs
            C = self._expected_outputs(fitting) or 1
            return torch.empty(n_samples, 0, C, dtype=self.dtype, device=self.device)
        thetas = self._weight_samples(n_samples, generator)
        with torch.no_grad():
            f = torch.stack([self.network(self._params_at(theta), x) for theta in thetas])
        self._check_outputs(f.reshape(-1, f.shape[-1]), n_outputs=self._expected_outputs(fitting))
        return f

    def _params_at(self, theta: Tensor) -> dict[str, Tensor]:
        """The network's parameters with the posterior's entries set to ``theta``."""
        if self._columns is None:
            return self.network.unflatten(theta)
        flat = self.network.flat_params().clone()
        flat[self._columns] = theta
        return self.network.unflatten(flat)
