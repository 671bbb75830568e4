"""Deployment: a fitted ScaLLA as a plain, self-contained ``nn.Module``.

:class:`Predictor` holds the network, the surrogate and the lower Cholesky factor ``L`` of the
posterior precision ``A = s·H + δI`` (a buffer), and its ``forward`` computes, with torch ops
only,

* ``mean = f(x)`` (the network's own output) and ``cov = g(x)ᵀ A⁻¹ g(x)`` (``(B, C, C)``,
  ``+ σ²I`` for regression with ``include_noise``) — ``output="gaussian"``;
* or class probabilities — ``output="probit"`` or ``"bridge"`` (classification).

It does not import or call the estimator: the forward is the network (and its trunk, for the
penultimate features), one surrogate pass and a triangular solve
(``torch.linalg.solve_triangular``; ``ops="fastlla"`` uses the fused
``fastlla::predictive_covariance`` op instead, which needs ``import fastlla`` where it runs);
the exact last-layer block stays in factored form, as in ``ScaLLA``'s own predictive.
It works under ``torch.compile(fullgraph=True)`` and ``torch.export.export``, and saves and loads
with ``torch.save(predictor.state_dict())`` into a predictor built from fresh modules of the same
architecture::

    predictor = la.export()                       # or Predictor.from_estimator(la)
    torch.save(predictor.state_dict(), "predictor.pt")
    ...
    fresh = Predictor.like(MyNet(), "classification", n_outputs=10, n_features=128)
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

from .functional import LOW_PRECISION, NetworkFunction
from .posterior import kron_covariance
from .predictive import Likelihood, laplace_bridge, probit
from .scalla_settings import build_residual_head, build_surrogate, check_options, resolve
from .network_head import InputOf, NetworkHead
from .surrogate import GatedSurrogate, LastLayerSurrogate

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
    residual_head : optional :class:`~fastlla.surrogate.ResidualHead` (the residual prior
        variance).

    The predictor holds copies of ``model``, ``surrogate`` and ``residual_head`` (in eval mode,
    parameters frozen); the modules passed in are left as they were.

    Buffers: ``scale_tril`` (``L``, ``M×M``; with the exact last-layer block the factor
    ``L_ll`` of the learned block, beside ``kron_T_e`` and ``kron_T_l``, see
    :func:`fastlla.posterior.kron_covariance`), ``prior_precision``, ``sigma_noise``.
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
        residual_head: nn.Module | None = None,
        *,
        _copy: bool = True,
    ):
        super().__init__()
        if _copy:  # one memo: a surrogate that refers to the network refers to the copy
            memo: dict[int, Any] = {}
            model = copy.deepcopy(model, memo)
            surrogate = copy.deepcopy(surrogate, memo)
            residual_head = copy.deepcopy(residual_head, memo)
        self.likelihood = Likelihood.parse(likelihood)
        if self.likelihood is Likelihood.REWARD_MODELING:
            raise NotImplementedError("fastlla: the Predictor does not implement reward modelling")
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
        first = next(iter(model.parameters()))
        if first.dtype in LOW_PRECISION:
            raise TypeError(
                f"fastlla: exporting a {first.dtype} network is not supported; export the "
                "estimator of a float32 copy of it (copy.deepcopy(model).float())"
            )
        self.model = model.eval()
        kw = {"dtype": first.dtype, "device": first.device}
        # The exact last-layer block (LastLayerSurrogate) reads the network's penultimate features
        # through a hook; here they come from ``trunk``, the network with its last nn.Linear
        # replaced by the identity (sharing the network's parameters), so forward stays one graph.
        # The residual head (FITC-style residual prior variance R Rᵀ/δ) reads them too.
        self.exact_rank, self.exact_bias, self.trunk = 0, False, None
        head_name = None
        if isinstance(surrogate, LastLayerSurrogate):
            self.exact_rank, self.exact_bias = surrogate.rank, surrogate.has_bias
            head_name = surrogate.head_name
            self.register_buffer("basis", surrogate.basis.detach().clone().to(**kw))
            surrogate = surrogate.learned
        self.residual_head = residual_head.eval() if residual_head is not None else None
        if residual_head is not None:
            head_name = residual_head.head_name
        if head_name is not None and getattr(residual_head, "output_layer", True):
            self.trunk = _trunk_sharing_parameters(self.model, head_name)
        elif head_name is not None:  # not the output layer: read its input as the network runs
            self.trunk = InputOf(self.model, head_name)
        self.surrogate = surrogate.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        if self.exact_rank:
            # the posterior factored as in FeaturePosterior._kron_factors: the exact block is
            # never formed (kron_covariance); T_e, T_l and L_ll replace the M×M factor L
            m, C, n_e = int(surrogate.n_features), self.n_outputs, self.exact_rank * self.n_outputs
            self.register_buffer("kron_T_e", torch.zeros(self.exact_rank, n_e * C, **kw))
            self.register_buffer("kron_T_l", torch.zeros(self.exact_rank, m * C, **kw))
            self.register_buffer("scale_tril", torch.eye(m, **kw))
        else:
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
        mode = getattr(estimator, "residual_mode", getattr(estimator, "residual_variance", False))
        if mode not in (False, None, "head"):
            raise NotImplementedError(
                f"fastlla: residual_variance={mode!r} estimates κ(x, x) from JVPs at prediction "
                "and cannot be exported; use 'head' (a fit trains it) or False"
            )
        predictor = cls(  # copies the modules (one memo: the surrogate refers to the copy)
            estimator.model,
            estimator.surrogate,
            estimator.n_features,
            estimator.n_outputs,
            estimator.likelihood,
            output=output,
            include_noise=include_noise,
            ops=ops,
            residual_head=estimator.residual_head if mode == "head" else None,
        )
        delta, scale = float(estimator.prior_precision), estimator.data_scale
        with torch.no_grad():
            if predictor.exact_rank:
                m = predictor.scale_tril.shape[0]
                T_e, T_l, L = estimator.posterior._kron_factors(delta, scale, m, predictor.n_outputs)
                predictor.kron_T_e.copy_(T_e)
                predictor.kron_T_l.copy_(T_l)
            else:
                L = estimator.posterior.cholesky(delta, scale)
            predictor.scale_tril.copy_(L)
            predictor.prior_precision.fill_(delta)
            predictor.sigma_noise.fill_(float(estimator.sigma_noise))
        return predictor

    @classmethod
    def like(
        cls,
        model: nn.Module,
        likelihood: str | Likelihood,
        n_outputs: int,
        surrogate: nn.Module | None = None,
        n_features: int | None = None,
        residual_head: bool | None = None,
        predictor_options: dict[str, Any] | None = None,
        **scalla_options: Any,
    ) -> Predictor:
        """An empty predictor to ``load_state_dict`` into.

        ``model`` is a fresh network of the fitted one's architecture; the predictor holds a copy
        of it (and of ``surrogate``), so the modules passed in keep their training mode and
        ``requires_grad`` flags. The default surrogate's and residual head's initial weights come
        from a generator seeded by ``seed`` (default 0); the global RNG is untouched. Without
        ``surrogate``, the surrogate is built as :class:`fastlla.ScaLLA` builds its default,
        from the record :func:`fastlla.scalla_settings.resolve` makes of the same keyword
        options (``n_features``, ``last_layer``, ``head_width``, ``gate``,
        ``residual_variance``, ``seed``) the estimator was given (the shared estimator options,
        ``sigma_noise`` to ``asdl_fisher_kwargs``, are accepted and unused; another keyword
        raises ``TypeError``); with one, ``n_features`` is its ``M``. ``residual_head``: whether the fitted estimator
        had one (``None``: as a ``fit`` with kernel-matching steps under ``scalla_options``
        leaves it). ``predictor_options`` go to the constructor.
        """
        if n_features is not None and surrogate is None:
            scalla_options["n_features"] = n_features
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastlla: model must be an nn.Module, got {type(model).__name__}")
        for name in _ESTIMATOR_OPTIONS:  # hyper-parameters: the loaded state sets them
            scalla_options.pop(name, None)
        options = check_options(**scalla_options)  # ScaLLA's keyword options, checked as it does
        parsed = Likelihood.parse(likelihood)
        memo: dict[int, Any] = {}  # work on copies: the caller's modules stay as they were
        model = copy.deepcopy(model, memo).eval()
        surrogate = copy.deepcopy(surrogate, memo)
        try:  # the output layer as ScaLLA takes it before a fit reads the network
            network_head = NetworkHead.registered(model)
        except ValueError as err:  # no nn.Linear: no default surrogate, no residual head
            network_head = NetworkHead(None, None, reason=str(err))
        # the record a fit with kernel-matching steps leaves (scalla_settings.resolve)
        settings = resolve(model, network_head, n_outputs, parsed, options, surrogate=surrogate)
        if surrogate is None:  # built as ScaLLA builds its default
            n_params = NetworkFunction(model).n_params
            surrogate = build_surrogate(
                model, settings, network_head, n_outputs, n_params, options["seed"]
            )
            n_features = None
        if n_features is None:
            n_features = _n_features(surrogate)
        head = None
        if residual_head is None:
            residual_head = settings.residual_variance == "head"
        if residual_head:
            try:
                head = build_residual_head(model, network_head, n_outputs, options["seed"])
            except ValueError:
                head = None
        options = dict(predictor_options or {}, residual_head=head)
        return cls(model, surrogate, n_features, n_outputs, likelihood, **options, _copy=False)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, all or nothing: a refused state (a missing key, a
        shape or setting that does not match) leaves the predictor as it was."""
        saved = {
            k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
            for k, v in self.state_dict().items()
        }
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except BaseException:
            super().load_state_dict(saved)
            raise

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
    def covariance(self, phi: Tensor, kron: Tensor | None = None) -> Tensor:
        """``Φ_bᵀ A⁻¹ Φ_b`` for features ``phi`` (B, M, C); returns (B, C, C).

        With the exact last-layer block, ``phi`` holds the learned features only and ``kron``
        the coefficients ``a`` of the block ``a ⊗ I_C`` (:func:`fastlla.posterior.kron_covariance`).
        """
        if self.exact_rank:
            return kron_covariance(
                self.kron_T_e, self.kron_T_l, self.scale_tril, phi, kron, self._whitened
            )
        return self._whitened(self.scale_tril, phi)

    def _whitened(self, L: Tensor, phi: Tensor) -> Tensor:
        """``Φ_bᵀ (LLᵀ)⁻¹ Φ_b``: the fused op, or a triangular solve with torch ops only."""
        if self.ops == "fastlla":
            return torch.ops.fastlla.predictive_covariance(L, phi.contiguous())
        B, M, C = phi.shape
        rhs = phi.permute(1, 0, 2).reshape(M, B * C)
        V = torch.linalg.solve_triangular(L, rhs, upper=False)
        V = V.reshape(M, B, C).permute(1, 0, 2)
        return V.mT @ V

    def _psi(self, *args: Any, **kwargs: Any) -> Tensor | None:
        """``[φ(x); 1]``: the input of the network's last ``nn.Linear``, plus a one."""
        if self.trunk is None:
            return None
        psi = self.trunk(*args, **kwargs)
        psi = psi.reshape(psi.shape[0], -1)
        return torch.cat([psi, psi.new_ones(psi.shape[0], 1)], dim=1)

    def _kron_coefficients(self, psi: Tensor) -> Tensor:
        """``a = Uᵀψ`` (B, k): the exact last-layer features are ``a ⊗ I_C``."""
        return (psi if self.exact_bias else psi[:, :-1]) @ self.basis

    def _learned(self, psi: Tensor | None, *args: Any, **kwargs: Any) -> Tensor:
        """The learned features; a :class:`GatedSurrogate` reads ``φ`` from ``ψ = [φ; 1]``."""
        if isinstance(self.surrogate, GatedSurrogate):
            return self.surrogate.features(psi[:, :-1], *args, **kwargs)
        return self.surrogate(*args, **kwargs)

    def features(self, *args: Any, psi: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The surrogate's features ``g(x)`` (B, M, C), exact last-layer block included."""
        if self.exact_rank and psi is None:
            psi = self._psi(*args, **kwargs)
        phi = self._learned(psi, *args, **kwargs)
        if not self.exact_rank:
            return phi
        a = self._kron_coefficients(psi)
        C = self.n_outputs
        eye = torch.eye(C, dtype=a.dtype, device=a.device)
        exact = (a[:, :, None, None] * eye).reshape(a.shape[0], self.exact_rank * C, C)
        return torch.cat([phi, exact.to(phi.dtype)], dim=1)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:
        mean = self.model(*args, **kwargs)
        if mean.dim() == 1:
            mean = mean.unsqueeze(-1)
        psi = self._psi(*args, **kwargs)
        phi = self._learned(psi, *args, **kwargs)
        kron = self._kron_coefficients(psi) if self.exact_rank else None
        cov = self.covariance(phi, kron)
        if self.residual_head is not None:
            if not self.residual_head.has_bias:
                psi = psi[:, :-1]
            R = self.residual_head(None, psi.to(cov.dtype))
            cov = cov + (R @ R.mT) / self.prior_precision
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


#: :class:`fastlla.laplace.LaplaceBase`'s options, which do not shape the modules.
_ESTIMATOR_OPTIONS = (
    "sigma_noise", "prior_precision", "prior_mean", "temperature", "enable_backprop",
    "dict_key_x", "dict_key_y", "backend", "backend_kwargs", "asdl_fisher_kwargs",
)  # fmt: skip


def _n_features(surrogate: nn.Module) -> int:
    if isinstance(surrogate, LastLayerSurrogate):
        return surrogate.n_learned + surrogate.n_exact
    n = getattr(surrogate, "n_features", None)
    if not isinstance(n, int):
        raise ValueError("fastlla: pass n_features for a surrogate without an n_features attribute")
    return n


def _trunk_sharing_parameters(model: nn.Module, head_name: str) -> nn.Module:
    """``model`` with its module ``head_name`` replaced by the identity; parameters and buffers
    are the model's own tensors (tied), not copies."""
    trunk = copy.deepcopy(model)
    parent_name, _, attr = head_name.rpartition(".")
    setattr(trunk.get_submodule(parent_name) if parent_name else trunk, attr, nn.Identity())
    for kind in ("parameters", "buffers"):
        own = dict(getattr(model, f"named_{kind}")(remove_duplicate=False))
        for name, _ in list(getattr(trunk, f"named_{kind}")(remove_duplicate=False)):
            owner_name, _, leaf = name.rpartition(".")
            owner = trunk.get_submodule(owner_name) if owner_name else trunk
            if kind == "parameters":
                owner._parameters[leaf] = own[name]
            else:
                owner._buffers[leaf] = own[name]
    return trunk
