"""Kernel-fidelity harness: how close a learned surrogate kernel is to the network's NTK.

Three pieces, usable on their own:

* :class:`ProbeGram` — the exact NTK Gram ``κ`` (``BC×BC``, float64) of held-out probe inputs
  from explicit Jacobians (small models), its Eckart–Young floor (the best error any rank-``M``
  kernel can reach on these probes, ``√(Σ_{i>M} λ_i²) / ‖κ‖_F`` from the eigenvalues of ``κ``)
  and the relative error ``‖ΦΦᵀ − κ‖_F/‖κ‖_F`` of any surrogate's features.
* :class:`FidelityCurve` — a ``callback(step, la)`` for :meth:`fastlla.ScaLLA.fit` that records
  the held-out error against training cost. ``fit`` excludes the callback's own time from the
  recorded seconds, so the curve is error versus the wall-clock of training alone.
* :func:`jvp_kernel_error` — the JVP-only estimate (no Jacobian) for models too large for the
  exact Gram: the same estimator as ``ScaLLA.kernel_fidelity(method="jvp")``.

``python -m fastlla fidelity`` runs the digits-CNN harness (see :func:`run_fidelity`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .functional import NetworkFunction, batch_size, slice_batch

__all__ = [
    "ProbeGram",
    "FidelityCurve",
    "eckart_young_floor",
    "feature_rows",
    "jvp_kernel_error",
    "run_fidelity",
]


def feature_rows(phi: Tensor) -> Tensor:
    """Features ``(B, M, C)`` → rows ``(B·C, M)`` ordered like the Gram (input-major)."""
    return phi.permute(0, 2, 1).reshape(-1, phi.shape[1])


def eckart_young_floor(eigvals: Tensor, ranks: Any) -> dict[int, float]:
    """Best relative Frobenius error of a rank-``M`` approximation, for each ``M`` in ``ranks``.

    ``eigvals`` are the eigenvalues of a symmetric PSD Gram (any order); the floor at ``M`` is
    ``√(Σ_{i>M} λ_i²) / √(Σ_i λ_i²)``.
    """
    lam2 = eigvals.double().clamp_min(0.0).sort(descending=True).values.square()
    total = lam2.sum()
    tail = torch.flip(torch.cumsum(torch.flip(lam2, [0]), 0), [0])  # tail[i] = Σ_{j≥i} λ_j²
    tail = torch.cat([tail, tail.new_zeros(1)])
    out = {}
    for m in ranks:
        m = int(m)
        out[m] = float(torch.sqrt(tail[min(m, len(lam2))] / total))
    return out


class ProbeGram:
    """The exact NTK Gram of probe inputs, its spectrum and the error of surrogate features.

    Parameters
    ----------
    model : the pre-trained network (only ``requires_grad`` parameters count).
    x : probe inputs (held out from the surrogate's training data).
    chunk_size : inputs per Jacobian computation.
    """

    def __init__(self, model: torch.nn.Module, x: Any, chunk_size: int = 32):
        network = NetworkFunction(model)
        B = batch_size(x)
        J = torch.cat(
            [
                network.jacobian(slice_batch(x, a, min(a + chunk_size, B))).double()
                for a in range(0, B, chunk_size)
            ]
        )
        self.x = x
        self.n_outputs = J.shape[1]
        self.n_params = J.shape[2]
        J = J.reshape(-1, J.shape[-1])
        self.kappa = J @ J.mT
        self.norm = float(torch.linalg.norm(self.kappa))
        self.eigvals = torch.linalg.eigvalsh(self.kappa).flip(0).clamp_min(0.0)
        self.trace_ratio = float(self.eigvals.sum()) / self.norm  # tr κ / ‖κ‖_F

    def floor(self, rank: int) -> float:
        """Eckart–Young floor at rank ``M``."""
        return eckart_young_floor(self.eigvals, [rank])[rank]

    def floors(self, ranks: Any) -> dict[int, float]:
        return eckart_young_floor(self.eigvals, ranks)

    def error(self, phi: Tensor) -> float:
        """``‖ΦΦᵀ − κ‖_F / ‖κ‖_F`` for features ``phi`` (B, M, C) of the probe inputs."""
        rows = feature_rows(phi.detach().double())
        return float(torch.linalg.norm(rows @ rows.mT - self.kappa)) / self.norm

    def share(self, phi: Tensor) -> float:
        """``‖ΦΦᵀ‖_F / ‖κ‖_F`` — how much of the kernel's mass a block of features carries."""
        rows = feature_rows(phi.detach().double())
        return float(torch.linalg.norm(rows.mT @ rows)) / self.norm


@dataclass
class FidelityCurve:
    """``callback(step, la)`` for :meth:`fastlla.ScaLLA.fit`: held-out error versus cost.

    Each call records the training step, the training seconds so far (callback time excluded;
    read from ``la.history``), the cost in JVP passes (``step · S``) and the probe error.
    """

    probe: ProbeGram
    points: list[dict[str, float]] = field(default_factory=list)
    log: Any = None

    def __call__(self, step: int, la: Any) -> None:
        with torch.no_grad():
            phi = la._surrogate_features(self.probe.x)
        seconds = la.history[-1]["seconds"] if la.history and step > 0 else 0.0
        point = {
            "step": step,
            "seconds": seconds,
            "jvp_passes": step * la._train_config.get("n_projections", 0),
            "error": self.probe.error(phi),
        }
        self.points.append(point)
        if self.log is not None:
            self.log(f"  step {step:6d}  {seconds:7.1f} s  error {point['error']:.4f}")

    @property
    def final(self) -> float:
        return self.points[-1]["error"] if self.points else math.nan

    def error_at(self, seconds: float) -> float:
        """The last recorded error at or before ``seconds`` of training."""
        best = math.nan
        for p in self.points:
            if p["seconds"] <= seconds:
                best = p["error"]
        return best


def jvp_kernel_error(la: Any, x: Any, n_projections: int = 64, seed: int = 12345) -> float:
    """JVP-only estimate of the relative kernel error on ``x`` (no Jacobian is formed)."""
    return la.kernel_fidelity(x, method="jvp", n_projections=n_projections, seed=seed)


def run_fidelity(args: Any = None, log=print) -> dict[str, Any]:  # pragma: no cover - CLI
    """Entry point of ``python -m fastlla fidelity``: see ``bench/fidelity/curves.py``."""
    from importlib import util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "fidelity" / "curves.py"
    if not path.exists():
        raise FileNotFoundError(f"fastlla: the fidelity bench script is missing: {path}")
    spec = util.spec_from_file_location("fastlla_bench_fidelity", path)
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    t0 = time.perf_counter()
    result = module.main(args)
    log(f"fidelity harness finished in {time.perf_counter() - t0:.0f} s")
    return result
