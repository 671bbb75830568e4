"""What every fastlla estimator shares: the laplace-torch style API around a GLM predictive.

An estimator (``ScaLLA`` or ``ExactLLA``) computes, from the training data, the quantities the
marginal likelihood needs — the log-likelihood at ``θ*``, ``‖θ*‖²`` and the eigenvalues of the
GGN data term — and a way to turn test inputs into a ``C×C`` predictive covariance for any
``(δ, σ)``. Everything else (hyper-parameter optimisation, link approximations, regression
predictive, saving) lives here once.

Subclasses implement :meth:`_fit_posterior`, :meth:`_eigvals`, :meth:`_features` and
:meth:`_covariance_from_features` (and may override :meth:`_outputs_and_features`).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .functional import (
    NetworkFunction,
    batch_size,
    check_finite,
    compute_dtype,
    takes_mapping,
    to_device,
)
from .posterior import precision_to_scale_tril
from .predictive import (
    Likelihood,
    LinkApprox,
    PredType,
    class_probabilities,
    gaussian_samples,
    log_class_probabilities,
)

__all__ = ["LaplaceBase", "NotFittedError", "ModelChangedError"]

#: ``optimize_prior_precision(prior_structure=...)`` values (laplace-torch's ``PriorStructure``).
PRIOR_STRUCTURES = ("scalar", "layerwise", "diag")


class NotFittedError(RuntimeError):
    """A predictive or posterior quantity was requested before ``fit``."""


class ModelChangedError(RuntimeError):
    """The model's weights, buffers or train/eval modes changed since ``fit``: the posterior
    belongs to the old network. Restore the model (e.g. ``model.eval()``) or fit again."""


_UNSET = object()


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError(f"fastlla: {name} must be a single number, got shape {tuple(value.shape)}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"fastlla: {name} must be a positive number, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"fastlla: {name} must be positive and finite, got {value}")
    return value


def _positive_tensor(name: str, value: Any) -> Tensor:
    """``value`` (a number, or a tensor of at most one dimension) as a float64 tensor, checked
    positive and finite. An autograd graph through ``value`` is kept."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        raise TypeError(f"fastlla: {name} must be a positive number or a tensor, got {value!r}")
    if isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"fastlla: {name} must be real, got a {value.dtype} tensor")
        t = value.to(torch.float64)
    else:
        try:
            t = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"fastlla: {name} must be a positive number or a tensor, got {value!r}"
            ) from None
    if t.dim() > 1 or t.numel() == 0:
        raise ValueError(
            f"fastlla: {name} must be a number or a non-empty 1-D tensor, got shape "
            f"{tuple(t.shape)}"
        )
    with torch.no_grad():
        ok = bool(torch.isfinite(t).all()) and bool((t > 0).all())
    if not ok:
        shown = float(t.detach().reshape(-1)[0]) if t.numel() == 1 else t.detach().tolist()
        raise ValueError(f"fastlla: {name} must be positive and finite, got {shown}")
    return t


class LaplaceBase:
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

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError(f"fastlla: call {type(self).__name__}.fit(train_loader) first")
        self._check_model_unchanged()

    def _mark_fitted(self) -> None:
        """The fit is complete: record what identifies the model it belongs to."""
        self._fitted = True
        modules = tuple(self.model.modules())
        self._fingerprint = (modules, [_module_state(m) for m in modules], _snapshot(modules))

    def __getstate__(self) -> dict[str, Any]:
        # version counters and identities do not survive a copy or pickle: the copy re-records
        # them for its own model (unless the fit was already stale)
        state = dict(self.__dict__)
        if state.get("_fingerprint") is not None:
            stale = not _unchanged(self._fingerprint[0], self._fingerprint[2])
            state["_fingerprint"] = "stale" if stale else "copied"
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.__dict__.get("_fingerprint") == "copied":
            self._mark_fitted()

    def _check_model_unchanged(self) -> None:
        """Refuse a fit whose model changed since (see the class docstring): one pass over the
        recorded modules' modes, children and tensors' version counters, none over weights."""
        if self._fingerprint is None:
            return
        if self._fingerprint == "stale":
            raise ModelChangedError(
                f"fastlla: this {type(self).__name__} was copied from one whose model had changed "
                "since fit; fit again"
            )
        modules, states, snapshot = self._fingerprint
        if _unchanged(modules, snapshot):
            return
        names = {id(m): n or "<model>" for n, m in self.model.named_modules()}
        changed = [
            (names.get(id(m), "a module no longer in the model"), old, _module_state(m))
            for m, old in zip(modules, states)
            if _module_state(m) != old
        ]
        if all(old[1:] == new[1:] for _, old, new in changed):
            raise ModelChangedError(
                f"fastlla: module(s) {[n for n, _, _ in changed][:5]} of the model switched "
                f"train/eval mode since {type(self).__name__}.fit; put the model back as it was "
                "(model.eval()) or fit again"
            )
        what = []
        for name, old, new in changed:
            if name == "a module no longer in the model":
                continue  # its parent reports the replacement
            prefix = "" if name == "<model>" else name + "."
            if old[1] != new[1] or len(old[2]) != len(new[2]):
                what.append(f"the submodules or tensors of {name}")
            what += [prefix + a[0] for a, b in zip(old[2], new[2]) if a != b]
        raise ModelChangedError(
            f"fastlla: the model changed since {type(self).__name__}.fit ({', '.join(what[:5])}); "
            "the posterior belongs to the old weights: fit again (or load_state_dict the fit "
            "of these weights)"
        )

    @contextlib.contextmanager
    def _all_or_nothing(self, *modules: nn.Module | None) -> Iterator[None]:
        """If the body raises (a KeyboardInterrupt too), restore every attribute of the
        estimator and the parameters and buffers of ``modules`` (changed in place: a surrogate
        being trained or loaded) as they were."""
        saved = dict(self.__dict__)
        states = [
            (m, {k: v.detach().clone() for k, v in m.state_dict().items()})
            for m in modules
            if m is not None
        ]
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            with torch.no_grad():
                for m, state in states:
                    m.load_state_dict(state)
            raise

    @property
    def data_scale(self) -> float:
        """``1/(σ²T)`` for regression, ``1/T`` for classification: the GGN's factor."""
        return float(self._scale(self._sigma_noise))

    def _scale(self, sigma: Tensor) -> Tensor:
        if self.likelihood is Likelihood.REGRESSION:
            return 1.0 / (sigma.square() * self.temperature)
        return torch.ones_like(sigma) / self.temperature

    # ------------------------------------------------------------------ marginal likelihood
    def _log_likelihood(self, sigma: Tensor) -> Tensor:
        if self.likelihood is Likelihood.CLASSIFICATION:
            stat = torch.tensor(self._loglik_stat, dtype=torch.float64, device=sigma.device)
            return stat / self.temperature
        n_obs = self.n_data * self.n_outputs
        return -0.5 * self._loglik_stat * self._scale(sigma) - n_obs * torch.log(
            sigma * math.sqrt(2 * math.pi)
        )

    def _log_det_ratio(self, delta: Tensor, scale: Tensor) -> Tensor:
        if delta.numel() == 1:
            eig = self._eigvals().to(torch.float64)
            return torch.log1p(eig * (scale / delta.reshape(()))).sum()
        return self._log_det_ratio_diag(self._expand_prior(delta), scale)

    def _log_det_ratio_diag(self, delta: Tensor, scale: Tensor) -> Tensor:
        """``log det(sG + D) − log det D`` for a diagonal prior ``D`` (ExactLLA)."""
        raise NotImplementedError

    def _scatter(self, delta: Tensor) -> Tensor:
        """``θ*ᵀ D θ*``."""
        if delta.numel() == 1:
            return delta.reshape(()) * self._param_norm2
        theta2 = self._theta().to(torch.float64).square()
        return (self._expand_prior(delta) * theta2).sum()

    def _evidence(self, delta: Tensor, sigma: Tensor) -> Tensor:
        """``log p(D|θ*) − ½ θ*ᵀDθ* − ½ log det(I + D⁻¹ sG)`` for checked ``δ``, ``σ``."""
        return (
            self._log_likelihood(sigma)
            - 0.5 * self._scatter(delta)
            - 0.5 * self._log_det_ratio(delta, self._scale(sigma))
        )

    def _hyper(self, prior_precision: Any, sigma_noise: Any) -> tuple[Tensor, Tensor]:
        """The given ``(δ, σ)`` checked, or the current ones where ``None``."""
        delta = self._prior_precision if prior_precision is None else self._parse_prior(
            prior_precision
        )
        sigma = self._sigma_noise if sigma_noise is None else self._parse_sigma(sigma_noise)
        return delta, sigma

    @property
    def log_likelihood(self) -> Tensor:
        """``log p(D | θ*)`` (Gaussian with noise ``σ`` for regression), scaled by ``1/T``: a
        0-dim float64 tensor, read as laplace-torch's property (``la.log_likelihood``) or
        called with a new ``σ`` (``la.log_likelihood(sigma_noise)``, differentiable in a
        ``sigma_noise`` tensor that requires grad; nothing is stored)."""
        self._check_fitted()
        return _CallableValue.of(self._log_likelihood(self._sigma_noise), self._log_likelihood_at)

    def _log_likelihood_at(self, sigma_noise: float | Tensor | None = None) -> Tensor:
        self._check_fitted()
        return self._log_likelihood(self._hyper(None, sigma_noise)[1])

    @property
    def log_det_ratio(self) -> Tensor:
        """``log det(sG + D) − log det D``: ``log det(I + sG/δ)`` for a scalar ``δ``; ``G`` the
        GGN, ``s = 1/(σ²T)`` (``1/T`` for classification). A 0-dim float64 tensor, read as
        laplace-torch's property (``la.log_det_ratio``) or called with new hyper-parameters
        (``la.log_det_ratio(prior_precision, sigma_noise)``, differentiable in both; nothing
        is stored)."""
        self._check_fitted()
        value = self._log_det_ratio(self._prior_precision, self._scale(self._sigma_noise))
        return _CallableValue.of(value, self._log_det_ratio_at)

    def _log_det_ratio_at(
        self, prior_precision: float | Tensor | None = None, sigma_noise: float | Tensor | None = None
    ) -> Tensor:
        self._check_fitted()
        delta, sigma = self._hyper(prior_precision, sigma_noise)
        return self._log_det_ratio(delta, self._scale(sigma))

    def log_marginal_likelihood(
        self, prior_precision: float | Tensor | None = None, sigma_noise: float | Tensor | None = None
    ) -> Tensor:
        """Laplace evidence ``log p(D|θ*) − ½ θ*ᵀDθ* − ½ log det(I + D⁻¹ sG)``.

        Parameters
        ----------
        prior_precision, sigma_noise : optional new ``δ`` and ``σ`` (numbers or tensors, checked
            as in the constructor); ``None`` uses the current ones. As in laplace-torch, values
            given are stored (detached) as the estimator's hyper-parameters, so tuning them with
            a gradient loop leaves the tuned values in place; a refused value changes nothing.

        Returns
        -------
        A 0-dim float64 tensor, differentiable in ``prior_precision`` and ``sigma_noise``
        tensors that require grad. With a scalar ``δ`` each evaluation costs ``O(M)`` once fitted
        (one eigendecomposition serves every ``(δ, σ)``); a per-layer or per-parameter ``δ``
        (ExactLLA) costs one Cholesky factorisation.
        """
        self._check_fitted()
        delta, sigma = self._hyper(prior_precision, sigma_noise)
        value = self._evidence(delta, sigma)
        if prior_precision is not None:
            self._prior_precision = delta.detach().clone()
        if sigma_noise is not None:
            self._sigma_noise = sigma.detach().clone()
        return value

    def _n_layers(self) -> int | None:
        """Parameter tensors the posterior is over (``None``: no per-layer prior)."""
        return None

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        val_loader: Iterable | None = None,
        grid: Iterable[float] | None = None,
        optimize_sigma_noise: bool = False,
        link_approx: str = "probit",
        *,
        pred_type: str = "glm",
        n_samples: int = 100,
        loss: Any = None,
        grid_size: int | None = None,
        log_prior_prec_min: float = -4.0,
        log_prior_prec_max: float = 4.0,
        log_prior_prec_base: float = 10.0,
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | Tensor = 1.0,
        prior_structure: str = "scalar",
        progress_bar: bool = False,
        verbose: bool = False,
    ) -> float | Tensor:
        """Choose ``δ`` (and, for regression with ``optimize_sigma_noise``, ``σ``).

        Takes laplace-torch's keywords; the defaults are fastlla's where they differ.

        Parameters
        ----------
        method : ``"marglik"`` maximises :meth:`log_marginal_likelihood`. With
            ``prior_structure="scalar"`` (default; laplace-torch's default is ``"diag"``) it is
            exact and cheap, since one eigendecomposition serves every ``(δ, σ)``: a log-spaced
            grid over ``δ ∈ [e⁻¹², e¹²]``, then golden-section refinement in ``log δ``
            (coordinate-wise with ``log σ``); ``init_prior_prec``, ``n_steps`` and ``lr`` do not
            apply. ``"layerwise"`` (one ``δ`` per parameter tensor) or ``"diag"`` (one per
            parameter), or an ``init_prior_prec`` tensor of such a length, run laplace-torch's
            Adam on ``log δ`` (``n_steps`` steps of rate ``lr`` from ``init_prior_prec``; with
            ``optimize_sigma_noise`` also on ``log σ``); ExactLLA only.
            ``"gridsearch"`` minimises the predictive NLL on ``val_loader`` (or ``loss``) over
            ``grid``, default ``grid_size`` (21) values log-spaced between
            ``log_prior_prec_base**log_prior_prec_min`` and ``**log_prior_prec_max``
            (``1e-4`` to ``1e4``).
        val_loader : ``(x, y)`` or dict batches for ``"gridsearch"``.
        grid : explicit prior precisions for ``"gridsearch"`` (not with ``grid_size``).
        optimize_sigma_noise : also tune ``σ`` by the evidence (regression, ``"marglik"``).
        link_approx, n_samples, pred_type : the predictive scored by ``"gridsearch"``
            (``pred_type`` must be ``"glm"``).
        loss : ``"gridsearch"`` score instead of the NLL: a torchmetrics-style metric (with
            ``update``/``compute``) or a callable ``loss(probs, y)`` (classification) or
            ``loss(f_mean, f_var, y)`` (regression) on the whole validation set, lower better.
        progress_bar, verbose : a tqdm bar over the grid or the Adam steps; print the result.

        Returns
        -------
        The chosen ``δ``, also stored in ``prior_precision``: a float for a scalar prior, else a
        tensor. Errors leave the hyper-parameters unchanged.
        """
        self._check_fitted()
        if prior_structure not in PRIOR_STRUCTURES:
            raise ValueError(
                f"fastlla: prior_structure must be one of {PRIOR_STRUCTURES}, got "
                f"{prior_structure!r}"
            )
        if pred_type != "glm":
            raise ValueError(f"fastlla: only pred_type='glm' is supported, got {pred_type!r}")
        if method == "marglik":
            if val_loader is not None:
                warnings.warn(
                    "fastlla: val_loader is ignored by method='marglik' (did you mean "
                    "method='gridsearch'?)",
                    UserWarning,
                    stacklevel=2,
                )
            init = self._parse_prior(init_prior_prec)
            if init.numel() == 1 and prior_structure == "scalar":
                self._optimize_marglik(optimize_sigma_noise)
            else:
                self._optimize_marglik_adam(
                    init, prior_structure, optimize_sigma_noise, n_steps, lr, progress_bar
                )
        elif method == "gridsearch":
            if val_loader is None:
                raise ValueError("fastlla: method='gridsearch' needs a val_loader")
            if grid is not None and grid_size is not None:
                raise ValueError("fastlla: give either grid or grid_size, not both")
            if grid is None:
                n = 21 if grid_size is None else int(grid_size)
                if n < 1:
                    raise ValueError(f"fastlla: grid_size must be at least 1, got {grid_size}")
                grid = torch.logspace(
                    log_prior_prec_min, log_prior_prec_max, n, base=log_prior_prec_base,
                    dtype=torch.float64,
                ).tolist()  # fmt: skip
            grid = [_positive_float("grid value", d) for d in grid]
            if not grid:
                raise ValueError("fastlla: the prior-precision grid is empty")
            self._gridsearch(val_loader, grid, loss, link_approx, n_samples, progress_bar)
        else:
            raise ValueError(f"fastlla: unknown method {method!r}; use 'marglik' or 'gridsearch'")
        if verbose:
            print(f"fastlla: optimized prior precision is {self.prior_precision.tolist()}")
        d = self._prior_precision
        return float(d) if d.numel() == 1 else d.clone()

    def _optimize_marglik(self, optimize_sigma: bool) -> None:
        fit_sigma = optimize_sigma and self.likelihood is Likelihood.REGRESSION
        log_delta, log_sigma = math.log(float(self._prior_precision[0])), math.log(
            float(self._sigma_noise)
        )
        kw = dict(dtype=torch.float64, device=self.device)

        def evidence(log_d: float, log_s: float) -> float:
            delta = torch.tensor([math.exp(log_d)], **kw)
            return float(self._evidence(delta, torch.tensor(math.exp(log_s), **kw)))

        for _ in range(4 if fit_sigma else 1):
            log_delta = _maximise_1d(lambda t: evidence(t, log_sigma), -12.0, 12.0)
            if fit_sigma:
                log_sigma = _maximise_1d(lambda t: evidence(log_delta, t), -8.0, 6.0)
        delta, sigma = math.exp(log_delta), math.exp(log_sigma)
        self.prior_precision = delta
        self.sigma_noise = sigma

    def _optimize_marglik_adam(
        self, init: Tensor, structure: str, optimize_sigma: bool, n_steps: int, lr: float,
        progress_bar: bool,
    ) -> None:
        """laplace-torch's marglik tuning: Adam on ``log δ`` (and ``log σ``)."""
        if init.numel() == 1:  # a scalar init with prior_structure 'scalar' never comes here
            n_layers = self._n_layers()
            if structure == "layerwise" and n_layers is None:
                raise ValueError(
                    f"fastlla: prior_structure='layerwise' does not apply to {type(self).__name__}"
                    " here; use 'scalar' or 'diag'"
                )
            n = n_layers if structure == "layerwise" else int(self._theta().numel())
            init = self._parse_prior(init.expand(n).clone())
        fit_sigma = optimize_sigma and self.likelihood is Likelihood.REGRESSION
        log_delta = init.detach().log().clone().requires_grad_(True)
        log_sigma = self._sigma_noise.detach().log().clone().requires_grad_(fit_sigma)
        optimizer = torch.optim.Adam([log_delta, log_sigma] if fit_sigma else [log_delta], lr=lr)
        for _ in tqdm(range(int(n_steps)), disable=not progress_bar, desc="marglik"):
            optimizer.zero_grad()
            loss = -self._evidence(log_delta.exp(), log_sigma.exp())
            loss.backward()
            optimizer.step()
        delta, sigma = log_delta.detach().exp(), log_sigma.detach().exp()
        self._parse_prior(delta), self._parse_sigma(sigma)  # both checked before either is set
        self.prior_precision = delta
        self.sigma_noise = sigma

    def _gridsearch(
        self, val_loader: Iterable, grid: list[float], loss: Any, link: str, n_samples: int,
        progress_bar: bool,
    ) -> None:
        """Set ``δ`` to the first grid value of least validation score (laplace-torch's
        ``gridsearch``): the summed predictive NLL in log space, or a user ``loss``."""
        online = all(hasattr(loss, a) for a in ("update", "compute"))
        if loss is not None and not online and not callable(loss):
            raise TypeError("fastlla: loss must be a metric (update/compute) or a callable")
        cached = []  # the network runs once; only the covariance depends on δ
        for x, y in self._batches(val_loader, "val_loader"):
            f, feats = self._outputs_and_features(x)
            self._check_outputs(f, y)
            cached.append((f, feats, y))
        best, best_value = None, math.inf
        for delta in tqdm(grid, disable=not progress_bar, desc="gridsearch"):
            covs = [self._covariance_from_features(feats, delta, self.data_scale) for _, feats, _ in cached]
            if loss is None:
                value = sum(
                    float(self._nll_sum(f, cov, y, link, n_samples))
                    for (f, _, y), cov in zip(cached, covs)
                )
            else:
                value = self._loss_value(loss, online, cached, covs, link, n_samples)
            if value < best_value:
                best, best_value = delta, value
        if best is None:
            raise ValueError("fastlla: every prior precision of the grid gave a non-finite score")
        self.prior_precision = best

    def _loss_value(
        self, loss: Any, online: bool, cached: list, covs: list[Tensor], link: str, n_samples: int
    ) -> float:
        """A user ``loss`` over the validation set: a metric updated per batch, or a callable
        of the whole set's predictions (probabilities, or mean and covariance)."""
        if online and hasattr(loss, "reset"):
            loss.reset()
        outputs, targets = [], []
        for (f, _, y), cov in zip(cached, covs):
            if self.likelihood is Likelihood.CLASSIFICATION:
                out = (class_probabilities(f, cov, link, n_samples=n_samples),)
            else:
                out = (f, cov)
            if online:
                try:
                    loss.update(*out, y)
                except TypeError:  # a metric of (prediction, target) only
                    loss.update(out[0], y)
            else:
                outputs.append(out)
                targets.append(y)
        if online:
            return float(torch.as_tensor(loss.compute()).sum())
        columns = [torch.cat(c) for c in zip(*outputs)]
        return float(torch.as_tensor(loss(*columns, torch.cat(targets))).sum())

    def _nll_sum(
        self, f: Tensor, cov: Tensor, y: Tensor, link: str, n_samples: int = 100
    ) -> Tensor:
        if self.likelihood is Likelihood.CLASSIFICATION:
            # log space: a confidently wrong point costs its (large, finite) −log p, never inf
            logp = log_class_probabilities(f, cov, link, n_samples=n_samples)
            return -logp.gather(1, y.view(-1, 1).long()).double().sum()
        var = torch.diagonal(cov, dim1=-2, dim2=-1).double() + self.sigma_noise**2
        resid = y.reshape(f.shape).double() - f.double()
        return 0.5 * (torch.log(2 * math.pi * var) + resid.square() / var).sum()

    # ------------------------------------------------------------------ prediction
    def _prediction_inputs(self, x: Any, fitting: bool = False) -> Any:
        """``x`` on the model's device, checked (finite; batched, except reward inputs)."""
        self._check_fitted()
        x = to_device(self._model_input(x), self.device, self.input_dtype)
        check_finite("the inputs", x)
        if fitting or not self.reward_modeling:  # reward inputs have one dimension less than pairs
            self._check_batched(x)
        return x

    def _predicts_regression(self, fitting: bool) -> bool:
        """Whether predictions are a regression's (reward modelling: unless ``fitting``)."""
        if self.reward_modeling:
            return not fitting
        return self.likelihood is Likelihood.REGRESSION

    def _expected_outputs(self, fitting: bool) -> int | None:
        """The outputs a prediction must have (``None``: any — a reward model's single inputs)."""
        return None if self.reward_modeling and not fitting else self.n_outputs

    def predictive_distribution(
        self, x: Any, joint: bool = False, diagonal_output: bool = False, fitting: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Gaussian over the outputs of the linearized network (laplace-torch's
        ``_glm_predictive_distribution``).

        Returns ``(f_mean, f_cov)``: the network's outputs ``f(x)`` (B, C) and the covariance
        ``Σ(x)`` (B, C, C). ``diagonal_output=True``: the variances (B, C) instead, computed
        without forming any ``C×C`` block (the residual-variance block of a ScaLLA with
        ``residual_variance`` on excepted). ``joint=True``: ``f`` flattened (B·C,) and the joint
        covariance of every output of every input (B·C, B·C), index ``b·C + c``.
        ``fitting`` (reward modelling): the pair classification's outputs instead of the reward's.

        A batch of no inputs gives empty results (the network is not run). Raises
        :class:`NotFittedError` before ``fit`` and :class:`ModelChangedError` if the model
        changed since; ``ValueError`` for ``joint`` with ``diagonal_output``.
        """
        if joint and diagonal_output:
            raise ValueError("fastlla: joint=True and diagonal_output=True exclude each other")
        x = self._prediction_inputs(x, fitting)
        n_outputs = self._expected_outputs(fitting)
        if batch_size(x) == 0:  # the network is not run on a batch of no inputs
            C, kw = n_outputs or 1, {"dtype": self.dtype, "device": self.device}
            if joint:
                return torch.empty(0, **kw), torch.empty(0, 0, **kw)
            shape = (0, C) if diagonal_output else (0, C, C)
            return torch.empty(0, C, **kw), torch.empty(shape, **kw)
        delta, scale = self._delta(), self.data_scale
        if diagonal_output:
            f, cov = self._outputs_and_variance(x, delta, scale)
        elif joint:
            f, cov = self._outputs_and_joint_covariance(x, delta, scale)
        else:
            f, features = self._outputs_and_features(x)
            self._check_outputs(f, n_outputs=n_outputs)
            cov = self._covariance_from_features(features, delta, scale)
        self._check_outputs(f, n_outputs=n_outputs)
        return (f.reshape(-1) if joint else f), cov

    def __call__(
        self,
        x: Any,
        pred_type: str = "glm",
        joint: bool = False,
        link_approx: str = "probit",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        *,
        include_noise: bool = False,
        seed: int = 0,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The predictive, with laplace-torch's arguments in its order.

        Parameters
        ----------
        pred_type : ``"glm"`` (the linearized network) or ``"nn"`` (the network at weights
            sampled from the posterior, ``n_samples`` of them; needs ``link_approx="mc"``, as in
            laplace-torch). ExactLLA samples weights; ScaLLA, which has no weight-space
            posterior, samples functions of the linearized network instead (its ``"nn"`` is the
            GLM predictive by Monte Carlo).
        joint : regression: the joint ``(f_mean (B·C,), f_cov (B·C, B·C))`` over the batch.
        link_approx : classification: ``"probit"``, ``"bridge"`` / ``"bridge_norm"``
            (laplace-torch's Laplace bridge after the zero-mean correction;
            ``"bridge_uncorrected"`` without it) or ``"mc"`` (``n_samples`` draws); see
            :class:`fastlla.predictive.LinkApprox`.
        diagonal_output : use the output variances only (no ``C×C`` blocks): regression returns
            ``f_var`` (B, C); classification's ``"probit"`` and ``"mc"`` use the diagonal (the
            bridge's zero-mean correction needs the full covariance and ignores it, as in
            laplace-torch).
        generator : a ``torch.Generator`` for the samples; without one, sampling is seeded by
            ``seed`` (a call is reproducible; the global RNG is never used).
        fitting : reward modelling: the pair classification instead of the reward regression.
        include_noise : regression: add ``σ²`` to the variances (fastlla's option).

        Returns
        -------
        Classification: probabilities (B, C). Regression (and reward prediction): ``(f_mean,
        f_var)`` with ``f_mean`` (B, C) and ``f_var`` (B, C, C), (B, C) with
        ``diagonal_output`` or for ``pred_type="nn"`` (the samples' unbiased variance), or the
        joint form above.
        """
        pred_type = PredType.parse(pred_type)
        link = LinkApprox.parse(link_approx)
        regression = self._predicts_regression(fitting)
        if joint and not regression:
            raise ValueError(
                "fastlla: joint=True is a regression predictive (laplace-torch ignores it for "
                "classification); use functional_samples for joint class samples"
            )
        given = self._own_generator(generator)  # else the seeded draws (the fused op for "mc")
        if not given and (pred_type is PredType.NN or link is LinkApprox.MC):
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        if pred_type is PredType.NN:
            if link is not LinkApprox.MC:
                raise ValueError("fastlla: pred_type='nn' needs link_approx='mc'")
            if regression and int(n_samples) < 2:
                raise ValueError("fastlla: a sampled regression variance needs n_samples >= 2")
            f = self.functional_samples(x, "nn", n_samples, generator=generator, fitting=fitting)
            if regression:
                mean, var = f.mean(0), f.var(0) if f.shape[1] else f.sum(0)
                return mean, var + self.sigma_noise.to(var.dtype) ** 2 if include_noise else var
            return torch.softmax(f, dim=-1).mean(0)
        if regression:
            mean, cov = self.predictive_distribution(x, joint, diagonal_output, fitting)
            return mean, self._with_noise(cov, diagonal_output) if include_noise else cov
        bridge = link not in (LinkApprox.PROBIT, LinkApprox.MC)
        mean, cov = self.predictive_distribution(
            x, diagonal_output=diagonal_output and not bridge, fitting=fitting
        )
        if link is LinkApprox.MC and (diagonal_output or given):
            return torch.softmax(gaussian_samples(mean, cov, n_samples, generator), -1).mean(0)
        return class_probabilities(mean, cov, link, n_samples=n_samples, seed=seed)

    def predictive(
        self, x: Any, pred_type: str = "glm", link_approx: str = "probit", n_samples: int = 100
    ) -> Tensor | tuple[Tensor, Tensor]:
        """laplace-torch's alias of :meth:`__call__` with these four arguments."""
        return self(x, pred_type=pred_type, link_approx=link_approx, n_samples=n_samples)

    @staticmethod
    def _own_generator(generator: Any) -> bool:
        """Whether the user passed ``generator`` (checked); the default MC uses the seeded op."""
        if generator is None:
            return False
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"fastlla: generator must be a torch.Generator, got {generator!r}")
        return True

    def _with_noise(self, cov: Tensor, diagonal: bool) -> Tensor:
        """``cov`` plus ``σ²`` on its diagonal (``diagonal``: ``cov`` holds variances)."""
        noise = self.sigma_noise.to(cov.dtype) ** 2
        if diagonal:
            return cov + noise
        return cov + noise * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)

    def _rng(self, generator: torch.Generator | None) -> torch.Generator:
        """``generator`` (checked), or the estimator's own: a private generator seeded with 0
        at first use that advances with each draw (the global RNG is never used)."""
        if self._own_generator(generator):
            return generator
        if getattr(self, "_own_rng", None) is None:
            self._own_rng = torch.Generator(device=self.device).manual_seed(0)
        return self._own_rng

    def functional_samples(
        self,
        x: Any,
        pred_type: str = "glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        *,
        fitting: bool = False,
    ) -> Tensor:
        """Samples of the outputs (S, B, C) (laplace-torch's ``functional_samples``).

        ``"glm"``: draws of ``N(f(x), Σ(x))`` per input, independent across inputs
        (``diagonal_output``: of the variances only; laplace-torch reuses one standard-normal
        draw for every input of a batch — for one input the draws coincide with a generator
        seeded alike). ``"nn"``: the network at weights drawn by :meth:`sample` (ExactLLA);
        ScaLLA, which has no weight-space posterior, returns the ``"glm"`` draws.
        ``generator``: a ``torch.Generator``; default the estimator's own (seeded with 0 at
        first use, advancing: successive calls give new draws). ``fitting``: as in
        :meth:`__call__`.
        """
        pred_type = PredType.parse(pred_type)
        generator = self._rng(generator)
        if int(n_samples) < 1:
            raise ValueError(f"fastlla: n_samples must be at least 1, got {n_samples}")
        if pred_type is PredType.NN:
            return self._nn_functional_samples(x, int(n_samples), generator, fitting)
        mean, cov = self.predictive_distribution(x, False, diagonal_output, fitting)
        return gaussian_samples(mean, cov, n_samples, generator)

    def predictive_samples(
        self,
        x: Any,
        pred_type: str = "glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        *,
        fitting: bool = False,
    ) -> Tensor:
        """:meth:`functional_samples` through the inverse link (S, B, C): softmax for
        classification, the samples themselves for regression and reward prediction."""
        f = self.functional_samples(
            x, pred_type, n_samples, diagonal_output, generator, fitting=fitting
        )
        return f if self._predicts_regression(fitting) else torch.softmax(f, dim=-1)

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """Weights drawn from the posterior ``N(θ*, P⁻¹)``, (S, n_params) (laplace-torch's
        ``sample``); ``generator`` as in :meth:`functional_samples`. Only ExactLLA has a
        weight-space posterior."""
        self._check_fitted()
        if int(n_samples) < 1:
            raise ValueError(f"fastlla: n_samples must be at least 1, got {n_samples}")
        return self._weight_samples(int(n_samples), self._rng(generator))

    def _weight_samples(self, n_samples: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError(
            f"fastlla: {type(self).__name__}'s posterior is over the features of its surrogate "
            "kernel, not the network's weights: there are no weight samples. Use "
            "functional_samples(x) for draws of the linearized network's outputs"
        )

    def _nn_functional_samples(
        self, x: Any, n_samples: int, generator: torch.Generator, fitting: bool
    ) -> Tensor:
        """The ``"nn"`` draws (S, B, C); without weight samples, the ``"glm"`` ones."""
        mean, cov = self.predictive_distribution(x, fitting=fitting)
        return gaussian_samples(mean, cov, n_samples, generator)

    def functional_variance(self, Js: Tensor) -> Tensor:
        """``Js P⁻¹ Jsᵀ`` per input, (B, C, C), for Jacobians ``Js`` (B, C, n_params) of the
        outputs with respect to the posterior's parameters (laplace-torch's; see
        :meth:`jacobians`: ExactLLA's weights, ScaLLA's ``M`` feature weights)."""
        return self._jacobian_covariance(self._checked_jacobians(Js))

    def functional_covariance(self, Js: Tensor) -> Tensor:
        """The joint ``Js P⁻¹ Jsᵀ`` over the batch, (B·C, B·C), index ``b·C + c``."""
        B, C, P = self._checked_jacobians(Js).shape
        return self._jacobian_covariance(Js.reshape(1, B * C, P))[0]

    def jacobians(self, x: Any) -> tuple[Tensor, Tensor]:
        """``(Js, f)``: the Jacobians (B, C, n_params) of the outputs with respect to the
        posterior's parameters, and the outputs (B, C) (laplace-torch's
        ``la.backend.jacobians(x)``). ScaLLA's posterior is over the weights ``w`` of
        ``f(x) + g(x)ᵀw``: its ``Js`` is ``g(x)ᵀ``, the surrogate's features."""
        x = self._prediction_inputs(x)
        if batch_size(x) == 0:
            C, kw = self.n_outputs, {"dtype": self.dtype, "device": self.device}
            return torch.empty(0, C, self.n_params, **kw), torch.empty(0, C, **kw)
        return self._jacobians_and_outputs(x)

    def _checked_jacobians(self, Js: Any) -> Tensor:
        self._check_fitted()
        if not isinstance(Js, Tensor) or Js.dim() != 3 or Js.shape[-1] != self.n_params:
            shape = tuple(Js.shape) if isinstance(Js, Tensor) else type(Js).__name__
            raise ValueError(
                f"fastlla: Js must be a (batch, outputs, {self.n_params}) tensor, got {shape}"
            )
        return Js.to(self.device, self.dtype)

    def _jacobian_covariance(self, J: Tensor, diagonal: bool = False) -> Tensor:
        """``J P⁻¹ Jᵀ`` (B, C, C) (``diagonal``: its diagonal, (B, C)) at the current ``δ``,
        ``σ``, for a scalar ``δ`` and a feature posterior; ExactLLA overrides."""
        op = self.posterior.variance if diagonal else self.posterior.covariance
        return op(J.mT.contiguous(), self._delta(), self.data_scale)

    def _outputs_and_variance(self, x: Any, delta: Any, scale: float) -> tuple[Tensor, Tensor]:
        """``f(x)`` (B, C) and the predictive variances (B, C) without ``C×C`` blocks."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _outputs_and_joint_covariance(
        self, x: Any, delta: Any, scale: float
    ) -> tuple[Tensor, Tensor]:
        """``f(x)`` (B, C) and the joint covariance (B·C, B·C)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _jacobians_and_outputs(self, x: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract

    # ------------------------------------------------------------------ the posterior
    # laplace-torch's properties. The posterior is over ``n_params`` dimensions: ExactLLA's
    # chosen weights; ScaLLA's ``M`` feature weights ``w`` of ``f(x) + g(x)ᵀw`` (centred at 0).
    @property
    def mean(self) -> Tensor:
        """The posterior mean (n_params,): ``θ*`` (ExactLLA), zeros (ScaLLA)."""
        self._check_fitted()
        return self._posterior_mean()

    def _posterior_mean(self) -> Tensor:
        return torch.zeros(self.n_params, dtype=self.dtype, device=self.device)

    def _posterior_ggn(self) -> Tensor:
        """The data term ``G`` (n_params, n_params) of the posterior precision ``sG + D``."""
        return self.posterior.H

    def _prior_diagonal(self) -> Tensor:
        """``D``'s diagonal (n_params,), float64."""
        d = self._prior_precision
        return d.expand(self.n_params) if d.numel() == 1 else self._expand_prior(d)

    @property
    def posterior_precision(self) -> Tensor:
        """``P = s·G + D`` (n_params, n_params): ``s = 1/(σ²T)`` (``1/T`` for classification),
        ``G`` the GGN, ``D`` the diagonal prior precision; the model's dtype."""
        self._check_fitted()
        G = self._posterior_ggn()
        return self.data_scale * G + torch.diag(self._prior_diagonal().to(G.dtype))

    @property
    def posterior_scale(self) -> Tensor:
        """Lower-triangular ``S`` with ``SSᵀ = P⁻¹`` (n_params, n_params), laplace-torch's
        (torch's ``_precision_to_scale_tril``): the factor :meth:`sample` uses."""
        return precision_to_scale_tril(self.posterior_precision)

    @property
    def posterior_covariance(self) -> Tensor:
        """``P⁻¹ = SSᵀ`` (n_params, n_params)."""
        S = self.posterior_scale
        return S @ S.mT

    @property
    def log_det_prior_precision(self) -> Tensor:
        """``log det D`` over the ``n_params`` dimensions (float64)."""
        self._check_fitted()
        return self._prior_diagonal().log().sum()

    @property
    def log_det_posterior_precision(self) -> Tensor:
        """``log det P = log det D + log det(I + sD⁻¹G)`` (float64, from the eigenvalues of
        ``G`` for a scalar ``δ``)."""
        return self.log_det_ratio + self.log_det_prior_precision

    @property
    def prior_precision_diag(self) -> Tensor:
        """``D``'s diagonal (n_params,), float64: ``δ`` expanded per parameter."""
        return self._prior_diagonal().clone()

    def square_norm(self, value: Tensor) -> Tensor:
        """``(v − mean)ᵀ P (v − mean)`` for ``value`` (n_params,) (laplace-torch's)."""
        P = self.posterior_precision
        delta = value.to(P.dtype) - self.mean
        return delta @ P @ delta

    def log_prob(self, value: Tensor, normalized: bool = True) -> Tensor:
        """``log N(value; mean, P⁻¹)`` (laplace-torch's); ``normalized=False``: only the terms
        that depend on ``value``, ``−½ square_norm(value)``."""
        if not normalized:
            return -self.square_norm(value) / 2
        return (
            -self.n_params / 2 * math.log(2 * math.pi)
            + self.log_det_posterior_precision / 2
            - self.square_norm(value) / 2
        )

    @property
    def scatter(self) -> Tensor:
        """``θ*ᵀDθ*`` (float64), the evidence's prior term. ScaLLA's evidence is the network's:
        ``δ‖θ*‖²`` over the network's weights."""
        self._check_fitted()
        return self._scatter(self._prior_precision)

    # ------------------------------------------------------------------ saving
    @property
    def _likelihood_name(self) -> str:
        """The likelihood as given: ``"reward_modeling"`` or the fit's."""
        return Likelihood.REWARD_MODELING.value if self.reward_modeling else self.likelihood.value

    def _model_signature(self) -> dict[str, Any]:
        return {
            "names": list(self.network.names),
            "shapes": [list(s) for s in self.network.shapes],
            "param_norm2": self._param_norm2,
        }

    def _base_state(self) -> dict[str, Any]:
        return {
            "estimator": type(self).__name__,
            "likelihood": self._likelihood_name,
            "prior_precision": self.prior_precision,
            "sigma_noise": self.sigma_noise,
            "temperature": self.temperature,
            "n_outputs": self.n_outputs,
            "n_data": self.n_data,
            "loglik_stat": self._loglik_stat,
            "model_signature": self._model_signature(),
        }

    _BASE_KEYS = (
        "estimator", "likelihood", "prior_precision", "sigma_noise", "n_outputs", "n_data",
        "loglik_stat", "model_signature",
    )  # fmt: skip

    def _validated_base_state(
        self, state: Any, required: Iterable[str], optional: Iterable[str] = ()
    ) -> dict[str, Any]:
        """The base quantities of ``state``, checked against this estimator and its model;
        changes nothing. ``required``/``optional``: the subclass's own keys (any other key is
        an error, as is a missing one)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"fastlla: state_dict must be a dict, got {type(state).__name__}")
        required = set(self._BASE_KEYS) | set(required)
        missing = sorted(required - set(state))
        unknown = sorted(set(state) - required - set(optional) - {"temperature"})
        if missing or unknown:
            raise ValueError(
                f"fastlla: state_dict for {type(self).__name__} "
                + (f"lacks the key(s) {missing}" if missing else "")
                + (" and " if missing and unknown else "")
                + (f"has unknown key(s) {unknown}" if unknown else "")
            )
        if state["estimator"] != type(self).__name__:
            raise ValueError(
                f"fastlla: state_dict is from {state['estimator']!r}, not {type(self).__name__}"
            )
        if state["likelihood"] != self._likelihood_name:
            raise ValueError(
                f"fastlla: state_dict is for likelihood {state['likelihood']!r}, "
                f"this estimator is {self._likelihood_name!r}"
            )
        theirs, ours = state["model_signature"], self._model_signature()
        if not isinstance(theirs, Mapping) or set(theirs) != set(ours):
            raise ValueError(
                f"fastlla: state_dict['model_signature'] must be a dict with keys {sorted(ours)}"
            )
        if theirs["names"] != ours["names"] or theirs["shapes"] != ours["shapes"]:
            raise ValueError("fastlla: state_dict was fitted on a model with other parameters")
        norm2 = _state_float(theirs, "param_norm2", "state_dict['model_signature']")
        if not math.isclose(norm2, ours["param_norm2"], rel_tol=1e-6):
            raise ValueError("fastlla: state_dict was fitted on a model with other weights")
        values = {
            "_prior_precision": self._parse_prior(state["prior_precision"]).detach().clone(),
            "_sigma_noise": self._parse_sigma(state["sigma_noise"]).detach().clone(),
            "_temperature": _positive_float(
                "state_dict['temperature']", state.get("temperature", 1.0)
            ),
            "n_outputs": _state_int(state, "n_outputs", minimum=1),
            "n_data": _state_int(state, "n_data", minimum=1),
            "_loglik_stat": _state_float(state, "loglik_stat"),
        }
        if self.likelihood is Likelihood.CLASSIFICATION:
            if values["_loglik_stat"] > 0:  # a sum of log-probabilities
                raise ValueError(
                    f"fastlla: state_dict['loglik_stat'] = {values['_loglik_stat']} is positive; "
                    "it is a sum of log-probabilities"
                )
        elif values["_loglik_stat"] < 0:  # a sum of squared residuals
            raise ValueError(
                f"fastlla: state_dict['loglik_stat'] = {values['_loglik_stat']} is negative; it "
                "is a sum of squared residuals"
            )
        values["_param_norm2"] = ours["param_norm2"]
        return values


class _CallableValue(Tensor):
    """A tensor that can also be called: laplace-torch reads ``log_likelihood`` and
    ``log_det_ratio`` as properties, fastlla calls them with new hyper-parameters; the value
    serves both. A call recomputes; any operation on the value gives a plain tensor."""

    _fn: Any

    @staticmethod
    def of(value: Tensor, fn: Any) -> Tensor:
        out = value.as_subclass(_CallableValue)  # the same data and autograd graph
        out._fn = fn
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._fn(*args, **kwargs)

    def __repr__(self, **kwargs: Any) -> str:
        return repr(self.as_subclass(Tensor))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _snapshot(modules: tuple[nn.Module, ...]) -> tuple:
    """What :func:`_unchanged` compares: modes, children, and each parameter's and buffer's
    table, name, identity, version counter and storage, flat."""
    tensors = [
        (table, name, t, t._version, t.data_ptr())
        for m in modules
        for table in (m._parameters, m._buffers)
        for name, t in table.items()
        if t is not None
    ]
    return (
        [m.training for m in modules],
        [dict(m._modules) for m in modules],
        [len(m._parameters) + len(m._buffers) for m in modules],
        tensors,
    )


def _unchanged(modules: tuple[nn.Module, ...], snapshot: tuple) -> bool:
    """Whether ``modules`` are as :func:`_snapshot` recorded them (the per-call fast path)."""
    modes, children, sizes, tensors = snapshot
    return (
        [m.training for m in modules] == modes
        and all(
            table.get(name) is t and t._version == version and t.data_ptr() == ptr
            for table, name, t, version, ptr in tensors
        )
        and [m._modules for m in modules] == children
        and [len(m._parameters) + len(m._buffers) for m in modules] == sizes
    )


def _module_state(m: nn.Module) -> tuple:
    """A module's mode, children, and own parameters and buffers (name, identity, storage,
    version counter): any in-place change, replacement or train/eval switch alters it."""
    tensors = [
        (name, id(t), t.data_ptr(), t._version)
        for table in (m._parameters, m._buffers)
        for name, t in table.items()
        if t is not None
    ]
    return m.training, [id(c) for c in m._modules.values()], tensors


def _state_int(state: Mapping, key: str, minimum: int | None = None, where: str = "state_dict") -> int:
    """``state[key]`` as an int (not a bool), at least ``minimum``; a clear error otherwise."""
    value = state[key]
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"fastlla: {where}[{key!r}] must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"fastlla: {where}[{key!r}] must be at least {minimum}, got {value}")
    return int(value)


def _state_float(state: Mapping, key: str, where: str = "state_dict") -> float:
    """``state[key]`` as a finite float; a clear error otherwise."""
    value = state[key]
    try:
        if isinstance(value, bool):
            raise TypeError
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"fastlla: {where}[{key!r}] must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"fastlla: {where}[{key!r}] must be finite, got {value}")
    return value


def _state_tensor(
    state: Mapping, key: str, shape: tuple[int, ...], where: str = "state_dict"
) -> Tensor:
    """``state[key]``: a finite floating tensor of ``shape``; a clear error otherwise."""
    value = state[key]
    if not isinstance(value, Tensor) or not value.is_floating_point():
        kind = f"{value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"fastlla: {where}[{key!r}] must be a floating tensor, got a {kind}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"fastlla: {where}[{key!r}] has shape {tuple(value.shape)}, expected {tuple(shape)} "
            "for this model"
        )
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"fastlla: {where}[{key!r}] contains NaN or Inf")
    return value


def check_module_state(module: nn.Module, state: Any, where: str) -> None:
    """``state`` loads into ``module`` (same keys and shapes, finite floating values), checked
    without changing ``module``; errors name the key."""
    if not isinstance(state, Mapping):
        raise TypeError(f"fastlla: {where} must be a dict of tensors, got {type(state).__name__}")
    ours = module.state_dict()
    missing, unknown = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unknown:
        raise ValueError(
            f"fastlla: {where} does not fit the module: missing keys {missing}, unknown keys "
            f"{unknown}"
        )
    for key, ref in ours.items():
        value = state[key]
        if isinstance(ref, Tensor) and ref.is_floating_point():
            _state_tensor(state, key, tuple(ref.shape), where)
        elif isinstance(ref, Tensor) and (
            not isinstance(value, Tensor) or value.shape != ref.shape
        ):
            raise ValueError(f"fastlla: {where}[{key!r}] must be a tensor of shape {tuple(ref.shape)}")


def _tensor_dims(x: Any) -> dict[Any, int]:
    """``key → ndim`` of every tensor of a batch (key ``None`` for a bare tensor)."""
    if isinstance(x, Tensor):
        return {None: x.dim()}
    items = x.items() if isinstance(x, Mapping) else enumerate(x)
    return {k: v.dim() for k, v in items if isinstance(v, Tensor)}


def _maximise_1d(fn, lo: float, hi: float, n_grid: int = 49, n_golden: int = 40) -> float:
    """Maximise a (unimodal near its peak) function of one variable: grid, then golden section."""
    xs = [lo + (hi - lo) * i / (n_grid - 1) for i in range(n_grid)]
    values = [fn(x) for x in xs]
    i = max(range(n_grid), key=lambda k: values[k])
    a, b = xs[max(i - 1, 0)], xs[min(i + 1, n_grid - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(n_golden):
        if fc > fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = fn(d)
    return 0.5 * (a + b)
