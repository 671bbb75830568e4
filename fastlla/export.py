"""Deployment: a fitted ScaLLA as a plain, self-contained ``nn.Module``.

:class:`Predictor` holds the network, the surrogate and the lower Cholesky factor ``L`` of the
posterior precision ``A = s·H + δI`` (a buffer), and its ``forward`` computes, with torch ops
only,

* ``mean = f(x)`` (the network's own output) and ``cov = g(x)ᵀ A⁻¹ g(x)`` (``(B, C, C)``,
  ``+ σ²I`` for regression with ``include_noise``) — ``output="gaussian"``;
* or class probabilities — ``output="probit"`` or ``"bridge"`` (classification).

It does not import or call the estimator: the forward is one network pass, one surrogate pass and
a triangular solve (``torch.linalg.solve_triangular``; ``ops="fastlla"`` uses the fused
``fastlla::predictive_covariance`` op instead, which needs ``import fastlla`` where it runs).
It works under ``torch.compile(fullgraph=True)`` and ``torch.export.export``, and saves and loads
with ``torch.save(predictor.state_dict())`` into a predictor built from fresh modules of the same
architecture::

    predictor = la.export()                       # or Predictor.from_estimator(la)
    torch.save(predictor.state_dict(), "predictor.pt")
    ...
    fresh = Predictor.like(MyNet(), "classification", n_features=128, n_outputs=10)
    fresh.load_state_dict(torch.load("predictor.pt"))
    probs = fresh(x)

The hyper-parameters are frozen into ``L`` at export: re-export after
``optimize_prior_precision`` or ``update``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .predictive import Likelihood, laplace_bridge, probit

__all__ = ["Predictor"]

OUTPUTS = ("gaussian", "probit", "bridge")
OPS = ("torch", "fastlla")


class Predictor(nn.Module):
    """Linearized-Laplace predictive of a fitted ScaLLA as a plain ``nn.Module``.

    Parameters
    ----------
    model : the pre-trained network, ``(B, C)`` outputs.
    surrogate : the fitted surrogate, ``(B, M, C)`` features.
    n_features, n_outputs : ``M`` and ``C``.
    likelihood : ``"classification"`` or ``"regression"``.
    output : ``"gaussian"`` (``(mean, cov)``), ``"probit"`` or ``"bridge"`` (probabilities,
        classification only), or ``"auto"``: probit for classification, gaussian for regression.
    include_noise : add ``σ² I`` to the covariance (regression).
    ops : ``"torch"`` (pure torch ops) or ``"fastlla"`` (the fused custom op).

    Buffers: ``scale_tril`` (``L``, ``M×M``), ``prior_precision``, ``sigma_noise``.
    """

    def __init__(
        self,
        model: nn.Module,
        surrogate: nn.Module,
        n_features: int,
        n_outputs: int,
        likelihood: str | Likelihood,
        output: str = "auto",
        include_noise: bool = False,
        ops: str = "torch",
    ):
        super().__init__()
        self.likelihood = Likelihood.parse(likelihood)
        classification = self.likelihood is Likelihood.CLASSIFICATION
        if output == "auto":
            output = "probit" if classification else "gaussian"
        if output not in OUTPUTS:
            raise ValueError(f"fastlla: output must be 'auto' or one of {OUTPUTS}, got {output!r}")
        if output != "gaussian" and not classification:
            raise ValueError(f"fastlla: output={output!r} needs a classification likelihood")
        if ops not in OPS:
            raise ValueError(f"fastlla: ops must be one of {OPS}, got {ops!r}")
        self.output, self.include_noise, self.ops = output, bool(include_noise), ops
        self.n_features, self.n_outputs = int(n_features), int(n_outputs)
        self.model = model.eval()
        self.surrogate = surrogate.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        first = next(iter(model.parameters()))
        kw = {"dtype": first.dtype, "device": first.device}
        self.register_buffer("scale_tril", torch.eye(self.n_features, **kw))
        self.register_buffer("prior_precision", torch.tensor(1.0, **kw))
        self.register_buffer("sigma_noise", torch.tensor(1.0, **kw))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_estimator(
        cls, estimator: Any, output: str = "auto", include_noise: bool = False, ops: str = "torch"
    ) -> Predictor:
        """Copy a fitted :class:`fastlla.ScaLLA` (at its current hyper-parameters)."""
        estimator._check_fitted()
        if getattr(estimator, "residual_variance", False):
            raise NotImplementedError(
                "fastlla: export supports the feature posterior without residual_variance"
            )
        predictor = cls(
            copy.deepcopy(estimator.model),
            copy.deepcopy(estimator.surrogate),
            estimator.n_features,
            estimator.n_outputs,
            estimator.likelihood,
            output=output,
            include_noise=include_noise,
            ops=ops,
        )
        L = estimator.posterior.cholesky(estimator.prior_precision, estimator.data_scale)
        with torch.no_grad():
            predictor.scale_tril.copy_(L)
            predictor.prior_precision.fill_(estimator.prior_precision)
            predictor.sigma_noise.fill_(estimator.sigma_noise)
        return predictor

    @classmethod
    def like(
        cls,
        model: nn.Module,
        likelihood: str | Likelihood,
        n_features: int,
        n_outputs: int,
        surrogate: nn.Module | None = None,
        **kwargs: Any,
    ) -> Predictor:
        """An empty predictor to ``load_state_dict`` into: ``model`` (fresh, same architecture)
        and the default surrogate's architecture unless ``surrogate`` is given."""
        if surrogate is None:
            from .surrogate import default_surrogate

            n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            surrogate = default_surrogate(model, n_features, n_outputs, max(n_params, 1))
        return cls(model, surrogate, n_features, n_outputs, likelihood, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "likelihood": self.likelihood.value,
            "output": self.output,
            "include_noise": self.include_noise,
            "n_features": self.n_features,
            "n_outputs": self.n_outputs,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        ours = self.get_extra_state()
        for key in ("likelihood", "n_features", "n_outputs"):
            if state[key] != ours[key]:
                raise ValueError(
                    f"fastlla: the saved predictor has {key}={state[key]!r}, this one {ours[key]!r}"
                )
        self.output, self.include_noise = state["output"], state["include_noise"]

    # ------------------------------------------------------------------ prediction
    def covariance(self, phi: Tensor) -> Tensor:
        """``Φ_bᵀ A⁻¹ Φ_b`` for features ``phi`` (B, M, C); returns (B, C, C)."""
        if self.ops == "fastlla":
            return torch.ops.fastlla.predictive_covariance(self.scale_tril, phi.contiguous())
        B, M, C = phi.shape
        rhs = phi.permute(1, 0, 2).reshape(M, B * C)
        V = torch.linalg.solve_triangular(self.scale_tril, rhs, upper=False)
        V = V.reshape(M, B, C).permute(1, 0, 2)
        return V.mT @ V

    def forward(self, *args: Any, **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:
        mean = self.model(*args, **kwargs)
        if mean.dim() == 1:
            mean = mean.unsqueeze(-1)
        phi = self.surrogate(*args, **kwargs)
        cov = self.covariance(phi)
        if self.output == "probit":
            return probit(mean, cov)
        if self.output == "bridge":
            return laplace_bridge(mean, cov)
        if self.include_noise:
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            cov = cov + self.sigma_noise.square() * eye
        return mean, cov

    def extra_repr(self) -> str:
        return (
            f"likelihood={self.likelihood.value}, output={self.output}, M={self.n_features}, "
            f"C={self.n_outputs}, ops={self.ops}"
        )
