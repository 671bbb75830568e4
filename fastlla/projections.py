"""Random tangents and batched Jacobian–vector products: the surrogate's training targets.

For a batch ``x_1..x_B`` and tangents ``v_1..v_S ∈ R^P`` with ``E[v vᵀ] = I``, forward-mode
JVPs give ``z_i^s = J(x_i) v_s``, and ``K̂ = (1/S) Σ_s z^s z^sᵀ`` is an unbiased estimate of the
NTK Gram of the batch. No Jacobian is ever formed: the ``S`` JVPs cost about ``S`` forward
passes, batched into one with ``vmap``. Tangents are regenerated from ``(seed, step)`` by the
``fastlla::random_tangents`` op, so they are never stored beyond the current step.

``distribution="orthogonal"`` draws the ``S`` tangents as a random orthonormal frame scaled by
``√P`` (still ``E[v vᵀ] = I``). For a quadratic estimator such as ``z zᵀ`` antithetic pairs
``(v, −v)`` give identical terms and remove nothing; orthogonality across the ``S`` tangents only
removes the cross-tangent part of the variance, a fraction of about ``S/P`` — measured in
``bench/fidelity`` and kept as an option, not the default.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _ops
from .functional import NetworkFunction

__all__ = ["ProjectionSampler", "stack_rows", "DISTRIBUTIONS"]

#: Tangent distributions: the two of ``fastlla::random_tangents`` and a random orthogonal frame.
DISTRIBUTIONS = (*_ops.DISTRIBUTIONS, "orthogonal")


def stack_rows(z: Tensor) -> Tensor:
    """``(S, B, C)`` JVPs → ``Z`` of shape ``(B·C, S)`` scaled by ``1/√S`` (so ``K̂ = Z Zᵀ``)."""
    S, B, C = z.shape
    return z.permute(1, 2, 0).reshape(B * C, S) / math.sqrt(max(S, 1))


class ProjectionSampler:
    """Draws ``S`` random tangents per step and returns the projected JVPs of a batch.

    Parameters
    ----------
    network : the pre-trained network as a function of its trainable parameters.
    n_projections : ``S``, tangents per step.
    distribution : ``"rademacher"`` (±1, the lower-variance choice) or ``"gaussian"``.
    seed : tangents of step ``t`` are a pure function of ``(seed, t)``.
    """

    def __init__(
        self,
        network: NetworkFunction,
        n_projections: int = 8,
        distribution: str = "rademacher",
        seed: int = 0,
    ):
        if n_projections < 1:
            raise ValueError(f"fastlla: n_projections must be at least 1, got {n_projections}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"fastlla: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}"
            )
        self.network = network
        self.n_projections = int(n_projections)
        self.distribution = distribution
        self.seed = int(seed)

    def tangents(self, step: int, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        """The ``S`` tangents of ``step``, per parameter: name → ``(S, *shape)``, drawn in
        ``dtype`` (float32 for a half-precision network: :meth:`NetworkFunction.jvp` casts)."""
        S, P = self.n_projections, self.network.n_params
        if self.distribution == "orthogonal":
            flat = _orthogonal_tangents(S, P, self.seed, step, device, dtype)
        else:
            flat = torch.empty(S, P, device=device, dtype=dtype)
            _ops.random_tangents(flat, self.seed, step, self.distribution)
        return self.network.unflatten(flat)

    def project(
        self, x: Any, step: int, tangents: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Network output ``f(x)`` (B, C) and the JVPs ``J(x) v_s`` stacked as (S, B, C).

        ``tangents`` (from :meth:`tangents`) may be passed when the caller needs them too.
        """
        p = next(iter(self.network.params().values()))
        if tangents is None:
            tangents = self.tangents(step, p.device, self.network.out_dtype)
        with torch.no_grad():
            return self.network.jvp(x, tangents)


def _orthogonal_tangents(
    S: int, P: int, seed: int, step: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``S`` orthogonal tangents of norm ``√P`` (blocks of ``P`` when ``S > P``), seeded."""
    g = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))
    blocks = []
    for a in range(0, S, P):
        n = min(P, S - a)
        q, r = torch.linalg.qr(torch.randn(P, n, generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar: fix the signs of QR
        blocks.append(q.mT * math.sqrt(P))
    return torch.cat(blocks).to(device=device, dtype=dtype)
