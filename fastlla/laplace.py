"""What every fastlla estimator shares: the laplace-torch style API around a GLM predictive.

An estimator (``ScaLLA`` or ``ExactLLA``) computes, from the training data, the quantities the
marginal likelihood needs — the log-likelihood at ``θ*``, ``‖θ*‖²`` and the eigenvalues of the
GGN data term — and a way to turn test inputs into a ``C×C`` predictive covariance for any
``(δ, σ)``. Everything else (hyper-parameter optimisation, link approximations, regression
predictive, saving) lives in this base once.

Subclasses implement :meth:`_fit_posterior`, :meth:`_eigvals`, :meth:`_features` and
:meth:`_covariance_from_features` (and may override :meth:`_outputs_and_features`).

The shared base is assembled from one mixin per concern: :class:`~fastlla.fit_state.FitState`
(fitted flag, model-change detection, saved state), :class:`~fastlla.evidence.Evidence`
(marginal likelihood, ``optimize_prior_precision``) and :class:`~fastlla.prediction.Prediction`
(laplace-torch's predictive API); this module holds construction, the hyper-parameters and the
checks of the data.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .evidence import Evidence
from .fit_state import (
    FitState,
    ModelChangedError,
    NotFittedError,
    _positive_float,
    _positive_tensor,
)
from .functional import (
    NetworkFunction,
    batch_size,
    check_finite,
    compute_dtype,
    takes_mapping,
    to_device,
)
from .prediction import Prediction
from .predictive import Likelihood

__all__ = ["LaplaceBase", "NotFittedError", "ModelChangedError"]

_UNSET = object()


class LaplaceBase(FitState, Evidence, Prediction):
    """Shared API of the linearized Laplace estimators.

    The leading parameters follow laplace-torch's ``BaseLaplace`` in name, order and default,
    so ``FullLaplace(model, lik, sigma, delta)`` reads the same with fastlla.

    Parameters
    ----------
    model : pre-trained network returning ``(B, C)`` outputs (logits for classification).
        Only parameters with ``requires_grad=True`` enter the posterior. It is put in eval mode.
        A fit belongs to the model as it was at ``fit`` (or ``load_state_dict``): if its
        parameters or buffers are changed in place or replaced, or a module's train/eval mode
        is switched, every later use of the fit (prediction, ``update``, hyper-parameter
        optimisation, ``state_dict``) raises :class:`ModelChangedError` naming what changed.
        The check reads version counters, so it costs no pass over the weights; a write through
        ``tensor.data`` bypasses the counters and is not seen.
    likelihood : ``"classification"``, ``"regression"`` or (ExactLLA) ``"reward_modeling"``
        (laplace-torch's: fitted as classification over preference pairs — the model maps
        ``(B, 2, ...)`` to ``(B, 2)`` logits, the label the preferred item — and predicted as a
        noise-free regression of the reward, ``(B, ...)`` to ``(B, 1)``; ``fitting=True`` at
        prediction gives the pair classification). ``la.likelihood`` then reads
        ``"classification"`` (the fit's) and ``la.reward_modeling`` is ``True``.
    sigma_noise : observation noise ``σ > 0`` (regression; must be 1 for classification).
    prior_precision : ``δ > 0`` of the prior ``θ ~ N(0, diag(δ)⁻¹)``: a number, or (ExactLLA
        only) a tensor with one value per parameter tensor (``model.parameters()`` order, those
        with ``requires_grad``) or one per parameter (length ``P``).
    prior_mean : only 0 is implemented (another value raises ``NotImplementedError``).
    temperature : ``T > 0``; the GGN and the log-likelihood are scaled by ``1/T`` (as in
        laplace-torch: a lower temperature concentrates the posterior).
    enable_backprop : only ``False``: fastlla's predictive is not differentiable in the inputs.
    dict_key_x, dict_key_y : for loaders yielding dict batches: ``batch[dict_key_y]`` is the
        target and the other entries are passed to the model as keyword arguments
        (``dict_key_x`` names the input entry, as in laplace-torch).
    backend, backend_kwargs, asdl_fisher_kwargs : accepted for laplace-torch compatibility and
        ignored with a warning (fastlla computes its GGN itself; see the estimator).

    ``prior_precision`` and ``sigma_noise`` read back as float64 tensors (shape ``(1,)`` or
    ``(n,)``, and ``()``), as laplace-torch returns tensors; assigning them checks the value.

    A call that fails (``fit``, ``update``, ``load_state_dict``, ...) leaves the estimator as it
    was, an earlier fit included. No call draws from or re-seeds the global torch RNG.
    """

    #: why laplace-torch's curvature ``backend`` does not apply (the warning names it)
    _curvature_source = "fastlla computes its own GGN"
    #: whether ``likelihood="reward_modeling"`` is implemented
    _supports_reward_modeling = False

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: Any = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastlla: model must be an nn.Module, got {type(model).__name__}")
        likelihood = Likelihood.parse(likelihood)
        self.reward_modeling = likelihood is Likelihood.REWARD_MODELING
        if self.reward_modeling and not self._supports_reward_modeling:
            raise NotImplementedError(
                f"fastlla: likelihood='reward_modeling' is not implemented for "
                f"{type(self).__name__}; use ExactLLA (hessian_structure='full')"
            )
        # the likelihood of the fit (reward modelling fits a classification over pairs)
        self.likelihood = Likelihood.CLASSIFICATION if self.reward_modeling else likelihood
        if enable_backprop:
            raise NotImplementedError(
                "fastlla: enable_backprop=True is not implemented (the predictive is not "
                "differentiable in the inputs)"
            )
        self.enable_backprop = False
        for key, name in ((dict_key_x, "dict_key_x"), (dict_key_y, "dict_key_y")):
            if not isinstance(key, str):
                raise TypeError(f"fastlla: {name} must be a str, got {key!r}")
        self.dict_key_x, self.dict_key_y = dict_key_x, dict_key_y
        for value, name in (
            (backend, "backend"),
            (backend_kwargs, "backend_kwargs"),
            (asdl_fisher_kwargs, "asdl_fisher_kwargs"),
        ):
            if value is not None:
                warnings.warn(
                    f"fastlla: {name} is ignored ({self._curvature_source})",
                    UserWarning,
                    stacklevel=3,
                )
        self.network = self._make_network(model)
        first = next(p for p in model.parameters() if p.requires_grad)
        # a float16/bfloat16 network runs in its dtype (inputs too); outputs, features and all
        # linear algebra are float32 (compute_dtype)
        self.device, self.dtype = first.device, compute_dtype(first.dtype)
        self.input_dtype = first.dtype
        self.prior_mean = prior_mean
        self.temperature = temperature
        self.sigma_noise = sigma_noise
        self.prior_precision = prior_precision
        self.model = model.eval()  # after every check: a refused estimator leaves the model alone
        self.n_outputs: int | None = None
        self.n_data = 0
        # Sufficient statistics of the log-likelihood at θ*: Σ log p(y|f) for classification,
        # the sum of squared residuals for regression (σ and T enter only at evaluation).
        self._loglik_stat = 0.0
        self._param_norm2 = float(self._theta().double().square().sum())
        self._fitted = False
        self._fingerprint: tuple | None = None

    def _make_network(self, model: nn.Module) -> NetworkFunction:
        """The network as a function of the parameters the posterior is over."""
        return NetworkFunction(model)

    def _theta(self) -> Tensor:
        """``θ*``, the flat vector of the parameters the posterior is over."""
        return self.network.flat_params()

    def _posterior_entries(self, flat: Tensor) -> Tensor:
        """The entries of a vector over the network's parameters (``flat_params`` order) that
        the posterior is over (all of them, except for ExactLLA's subnetwork)."""
        return flat

    # ------------------------------------------------------------------ hyper-parameters
    @property
    def prior_precision(self) -> Tensor:
        """``δ`` as a float64 tensor: shape ``(1,)`` for a scalar prior, else one value per
        parameter tensor or per parameter (ExactLLA). Assigning checks the value."""
        return self._prior_precision.clone()

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self._prior_precision = self._parse_prior(value).detach().clone()

    @property
    def sigma_noise(self) -> Tensor:
        """``σ`` as a 0-dim float64 tensor. Assigning checks the value."""
        return self._sigma_noise.clone()

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        self._sigma_noise = self._parse_sigma(value).detach().clone()

    @property
    def temperature(self) -> float:
        """``T``: the GGN and the log-likelihood are scaled by ``1/T``."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = _positive_float("temperature", value)

    @property
    def prior_mean(self) -> Tensor:
        """The prior mean: always 0 in fastlla."""
        return torch.zeros((), dtype=torch.float64, device=self.device)

    @prior_mean.setter
    def prior_mean(self, value: float | Tensor) -> None:
        try:
            zero = bool((torch.as_tensor(value) == 0).all())
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"fastlla: prior_mean must be a number or tensor, got {value!r}") from None
        if not zero:
            raise NotImplementedError(
                "fastlla: only prior_mean=0 is implemented (the prior is N(0, diag(δ)⁻¹))"
            )

    def _parse_sigma(self, value: Any) -> Tensor:
        """``σ`` checked (positive, finite, a single value; 1 for classification), 0-dim."""
        t = _positive_tensor("sigma_noise", value)
        if t.numel() != 1:
            raise ValueError(
                f"fastlla: sigma_noise must be a single value (homoscedastic noise), got "
                f"{t.numel()} values"
            )
        t = t.reshape(()).to(self.device)
        if self.likelihood is Likelihood.CLASSIFICATION and float(t.detach()) != 1.0:
            raise ValueError("fastlla: sigma_noise applies to regression only (it must be 1)")
        return t

    def _parse_prior(self, value: Any) -> Tensor:
        """``δ`` checked (positive, finite, a structure this estimator supports), 1-D."""
        t = _positive_tensor("prior_precision", value).reshape(-1).to(self.device)
        if t.numel() != 1:
            self._check_prior_structure(t)
        return t

    def _check_prior_structure(self, delta: Tensor) -> None:
        raise ValueError(
            f"fastlla: {type(self).__name__} takes a scalar prior_precision (its posterior is "
            f"over features, not parameters), got {delta.numel()} values; per-layer or "
            "per-parameter prior precisions need ExactLLA"
        )

    def _expand_prior(self, delta: Tensor) -> Tensor:
        """A non-scalar ``δ`` as its diagonal (one value per parameter)."""
        self._check_prior_structure(delta)
        return delta

    def _delta(self) -> float | Tensor:
        """The current ``δ`` for the covariance hooks: a float, or the (P,) diagonal."""
        d = self._prior_precision
        return float(d) if d.numel() == 1 else self._expand_prior(d)

    # ------------------------------------------------------------------ subclass hooks
    def _fit_posterior(self, loader: Iterable) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _eigvals(self) -> Tensor:  # pragma: no cover - abstract
        """Eigenvalues of the GGN data term at ``σ = 1`` (for the marginal likelihood)."""
        raise NotImplementedError

    def _features(self, x: Any) -> Any:  # pragma: no cover - abstract
        """Whatever :meth:`_covariance_from_features` needs about the test inputs ``x``."""
        raise NotImplementedError

    def _covariance_from_features(
        self, features: Any, prior_precision: float, data_scale: float
    ) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _outputs_and_features(self, x: Any) -> tuple[Tensor, Any]:
        """``f(x)`` and :meth:`_features` (a subclass may share one network pass between them)."""
        with torch.no_grad():
            f = self.network.output(x)
        return f, self._features(x)

    # ------------------------------------------------------------------ data
    def _batches(
        self, loader: Iterable, name: str = "train_loader", allow_empty: bool = False
    ) -> Iterator[tuple]:
        """Yield ``(x, y)`` batches on the model's device, checked; batches of no inputs are
        skipped, and a loader without inputs is an error (unless ``allow_empty``)."""
        n = 0
        for batch in loader:
            if isinstance(batch, Mapping):  # laplace-torch's dict batches (HuggingFace style)
                if self.dict_key_y not in batch:
                    raise ValueError(
                        f"fastlla: {name} yields dict batches without the target key "
                        f"dict_key_y={self.dict_key_y!r} (keys: {list(batch)})"
                    )
                batch = ({k: v for k, v in batch.items() if k != self.dict_key_y},
                         batch[self.dict_key_y])  # fmt: skip
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(f"fastlla: {name} must yield (inputs, targets) pairs")
            x, y = self._model_input(batch[0]), batch[1]
            x = to_device(x, self.device, self.input_dtype)
            y = y.to(self.device)
            check_finite(f"the inputs of {name}", x)
            if batch_size(x) != y.shape[0]:
                raise ValueError(
                    f"fastlla: {name} yields {batch_size(x)} inputs but {y.shape[0]} targets"
                )
            if batch_size(x) == 0:
                continue
            n += 1
            yield x, y
        if n == 0 and not allow_empty:
            raise ValueError(f"fastlla: {name} is empty")

    def _model_input(self, x: Any) -> Any:
        """A dict batch as ``(x,)`` where the model's forward takes the dict as its one argument
        (laplace-torch's ``forward(self, data)``; see :func:`fastlla.functional.takes_mapping`),
        else ``x``."""
        if isinstance(x, Mapping) and takes_mapping(self.model, x):
            return (x,)
        return x

    def _check_outputs(self, f: Tensor, y: Tensor | None = None, n_outputs: Any = _UNSET) -> None:
        """Check outputs (and targets) of a batch; ``n_outputs`` (default ``self.n_outputs``):
        the expected number of outputs, ``None`` for any."""
        if n_outputs is _UNSET:
            n_outputs = self.n_outputs
        if f.dim() != 2:
            raise ValueError(
                f"fastlla: the model returns outputs of shape {tuple(f.shape)}; the Laplace "
                "approximation needs one row of C outputs per input, (B, C). For a per-token "
                "head (LLM-style (B, T, C)) wrap the model to return the last token's outputs, "
                "model(x)[:, -1], or outputs pooled over tokens"
            )
        if not torch.isfinite(f).all():
            raise ValueError("fastlla: the model's outputs contain NaN or Inf")
        if n_outputs is not None and f.shape[-1] != n_outputs:
            raise ValueError(f"fastlla: the model returns {f.shape[-1]} outputs, expected {n_outputs}")
        if y is None:
            return
        if self.likelihood is Likelihood.CLASSIFICATION:
            integer = not (y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool)
            if not integer or y.dim() != 1:
                raise ValueError("fastlla: classification targets must be 1-D integer labels")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= f.shape[-1]):
                raise ValueError(
                    f"fastlla: labels must lie in [0, {f.shape[-1] - 1}], got "
                    f"[{int(y.min())}, {int(y.max())}]"
                )
        else:
            if y.reshape(f.shape[0], -1).shape != f.shape:
                raise ValueError(
                    f"fastlla: regression targets of shape {tuple(y.shape)} do not match "
                    f"outputs of shape {tuple(f.shape)}"
                )
            if not torch.isfinite(y).all():
                raise ValueError("fastlla: the regression targets contain NaN or Inf")

    def _check_network(self, x: Any, f: Tensor) -> None:
        """Checks of the network on the first training batch ``x`` (outputs ``f``) at fit.

        Refuses a network that is random in eval mode (a second pass gives other outputs, e.g.
        ``F.dropout(training=True)``); warns when classification outputs look like probabilities;
        records the input ranks so that predicting for an input without batch dimension is
        refused clearly.
        """
        self._check_outputs(f)  # finite first
        with torch.no_grad():
            again = self.network.output(x)
        tol = math.sqrt(torch.finfo(f.dtype).eps)  # far above kernel non-determinism
        atol = tol * max(float(f.abs().max()) if f.numel() else 0.0, 1e-30)
        if again.shape != f.shape or not torch.allclose(again, f, rtol=tol, atol=atol):
            raise ValueError(
                "fastlla: the network is random in eval mode — two forward passes on the same "
                "batch gave different outputs (e.g. F.dropout(..., training=True), MC dropout or "
                "noise layers). The linearized Laplace approximation needs a deterministic "
                "network: make its forward deterministic in eval mode"
            )
        classification = self.likelihood is Likelihood.CLASSIFICATION
        if classification and f.shape[-1] > 1 and f.numel() and bool((f >= 0).all()):
            if torch.allclose(f.double().sum(-1), torch.ones_like(f[:, 0], dtype=torch.float64),
                              rtol=0.0, atol=tol * f.shape[-1]):  # fmt: skip
                warnings.warn(
                    "fastlla: the model's outputs are non-negative and sum to 1 over the classes: "
                    "they look like probabilities, but classification expects logits (remove a "
                    "final nn.Softmax, or use log-probabilities)",
                    stacklevel=3,
                )
        self._input_dims = _tensor_dims(x)

    def _check_batched(self, x: Any) -> None:
        """Refuse inputs that lack the batch dimension the training inputs had."""
        fitted = getattr(self, "_input_dims", None)
        if fitted is None:
            return
        for key, dim in _tensor_dims(x).items():
            if key in fitted and dim == fitted[key] - 1:
                where = "" if key is None else f" {key!r}"
                raise ValueError(
                    f"fastlla: the inputs need a batch dimension: input{where} has {dim} "
                    f"dimension(s), the training inputs had {fitted[key]} (batch first); for a "
                    "single input pass x.unsqueeze(0)"
                )

    def _accumulate_loglik(self, f: Tensor, y: Tensor) -> None:
        """Add the batch's log-likelihood statistic and count (``f`` the outputs at θ*)."""
        self._check_outputs(f, y)
        self.n_outputs = f.shape[-1]
        self._loglik_stat += self._loglik_term(f, y)
        self.n_data += f.shape[0]

    def _loglik_term(self, f: Tensor, y: Tensor) -> float:
        """The batch's log-likelihood statistic (checked targets; changes nothing)."""
        if self.likelihood is Likelihood.CLASSIFICATION:
            logp = torch.log_softmax(f.double(), dim=-1)
            return float(logp.gather(1, y.view(-1, 1).long()).sum())
        return float((y.reshape(f.shape).double() - f.double()).square().sum())

    # ------------------------------------------------------------------ fitting
    def _reset(self) -> None:
        self.n_outputs = None
        self.n_data = 0
        self._loglik_stat = 0.0
        self._param_norm2 = float(self._theta().double().square().sum())
        self._fitted = False
        self._fingerprint = None

    @property
    def data_scale(self) -> float:
        """``1/(σ²T)`` for regression, ``1/T`` for classification: the GGN's factor."""
        return float(self._scale(self._sigma_noise))

    def _scale(self, sigma: Tensor) -> Tensor:
        if self.likelihood is Likelihood.REGRESSION:
            return 1.0 / (sigma.square() * self.temperature)
        return torch.ones_like(sigma) / self.temperature


def _tensor_dims(x: Any) -> dict[Any, int]:
    """``key → ndim`` of every tensor of a batch (key ``None`` for a bare tensor)."""
    if isinstance(x, Tensor):
        return {None: x.dim()}
    items = x.items() if isinstance(x, Mapping) else enumerate(x)
    return {k: v.dim() for k, v in items if isinstance(v, Tensor)}
