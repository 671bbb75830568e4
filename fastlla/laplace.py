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
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .functional import NetworkFunction, batch_size, check_finite, to_device
from .predictive import Likelihood, class_probabilities, log_class_probabilities

__all__ = ["LaplaceBase", "NotFittedError", "ModelChangedError"]


class NotFittedError(RuntimeError):
    """A predictive or posterior quantity was requested before ``fit``."""


class ModelChangedError(RuntimeError):
    """The model's weights, buffers or train/eval modes changed since ``fit``: the posterior
    belongs to the old network. Restore the model (e.g. ``model.eval()``) or fit again."""


_UNSET = object()


def _positive_float(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"fastlla: {name} must be a positive number, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"fastlla: {name} must be positive and finite, got {value}")
    return value


class LaplaceBase:
    """Shared API of the linearized Laplace estimators.

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
    likelihood : ``"classification"`` or ``"regression"``.
    prior_precision : ``δ`` of the prior ``θ ~ N(0, δ⁻¹ I)``.
    sigma_noise : observation noise ``σ`` (regression only).

    A call that fails (``fit``, ``update``, ``load_state_dict``, ...) leaves the estimator as it
    was, an earlier fit included. No call draws from or re-seeds the global torch RNG.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        prior_precision: float = 1.0,
        sigma_noise: float = 1.0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastlla: model must be an nn.Module, got {type(model).__name__}")
        self.likelihood = Likelihood.parse(likelihood)
        self.model = model.eval()
        self.network = NetworkFunction(model)
        self.prior_precision = _positive_float("prior_precision", prior_precision)
        self.sigma_noise = _positive_float("sigma_noise", sigma_noise)
        if self.likelihood is Likelihood.CLASSIFICATION and self.sigma_noise != 1.0:
            raise ValueError("fastlla: sigma_noise applies to regression only")
        first = next(p for p in model.parameters() if p.requires_grad)
        self.device, self.dtype = first.device, first.dtype
        self.n_outputs: int | None = None
        self.n_data = 0
        # Sufficient statistics of the log-likelihood at θ*: Σ log p(y|f) for classification,
        # the sum of squared residuals for regression (σ enters only at evaluation).
        self._loglik_stat = 0.0
        self._param_norm2 = float(self.network.flat_params().double().square().sum())
        self._fitted = False
        self._fingerprint: tuple | None = None

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
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(f"fastlla: {name} must yield (inputs, targets) pairs")
            x, y = batch
            x = to_device(x, self.device, self.dtype)
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

    def _check_outputs(self, f: Tensor, y: Tensor | None = None, n_outputs: Any = _UNSET) -> None:
        """Check outputs (and targets) of a batch; ``n_outputs`` (default ``self.n_outputs``):
        the expected number of outputs, ``None`` for any."""
        if n_outputs is _UNSET:
            n_outputs = self.n_outputs
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
        self._param_norm2 = float(self.network.flat_params().double().square().sum())
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
        """``1/σ²`` for regression, 1 for classification."""
        return 1.0 / self.sigma_noise**2 if self.likelihood is Likelihood.REGRESSION else 1.0

    # ------------------------------------------------------------------ marginal likelihood
    def log_likelihood(self, sigma_noise: float | None = None) -> Tensor:
        """``log p(D | θ*)`` (Gaussian with noise ``σ`` for regression)."""
        self._check_fitted()
        if self.likelihood is Likelihood.CLASSIFICATION:
            return torch.tensor(self._loglik_stat, dtype=torch.float64)
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        n_obs = self.n_data * self.n_outputs
        value = -0.5 * self._loglik_stat / sigma**2 - n_obs * math.log(sigma * math.sqrt(2 * math.pi))
        return torch.tensor(value, dtype=torch.float64)

    def log_det_ratio(
        self, prior_precision: float | None = None, sigma_noise: float | None = None
    ) -> Tensor:
        """``log det(I + G/δ)``, ``G`` the GGN (``G₁/σ²`` for regression)."""
        self._check_fitted()
        delta = self.prior_precision if prior_precision is None else prior_precision
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        scale = 1.0 / sigma**2 if self.likelihood is Likelihood.REGRESSION else 1.0
        return torch.log1p(self._eigvals().double() * (scale / delta)).sum()

    def log_marginal_likelihood(
        self, prior_precision: float | None = None, sigma_noise: float | None = None
    ) -> Tensor:
        """Laplace evidence ``log p(D|θ*) − ½ δ‖θ*‖² − ½ log det(I + G/δ)``.

        Defaults to the current hyper-parameters; costs ``O(M)`` per evaluation once fitted.
        """
        delta = self.prior_precision if prior_precision is None else prior_precision
        return (
            self.log_likelihood(sigma_noise)
            - 0.5 * delta * self._param_norm2
            - 0.5 * self.log_det_ratio(delta, sigma_noise)
        )

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        val_loader: Iterable | None = None,
        grid: Iterable[float] | None = None,
        optimize_sigma_noise: bool = False,
        link_approx: str = "probit",
    ) -> float:
        """Choose ``δ`` (and, for regression with ``optimize_sigma_noise``, ``σ``).

        ``"marglik"`` maximises :meth:`log_marginal_likelihood` — exact and cheap, since one
        eigendecomposition serves every ``(δ, σ)``: a log-spaced grid, then golden-section
        refinement in ``log δ`` (coordinate-wise with ``log σ``). ``"gridsearch"`` minimises the
        predictive NLL on ``val_loader`` over ``grid`` (default 21 values in ``[1e-4, 1e4]``).
        Returns the chosen ``δ``, also stored in ``prior_precision``.
        """
        self._check_fitted()
        if method == "marglik":
            self._optimize_marglik(optimize_sigma_noise)
        elif method == "gridsearch":
            if val_loader is None:
                raise ValueError("fastlla: method='gridsearch' needs a val_loader")
            self._gridsearch(val_loader, grid, link_approx)
        else:
            raise ValueError(f"fastlla: unknown method {method!r}; use 'marglik' or 'gridsearch'")
        return self.prior_precision

    def _optimize_marglik(self, optimize_sigma: bool) -> None:
        fit_sigma = optimize_sigma and self.likelihood is Likelihood.REGRESSION
        log_delta, log_sigma = math.log(self.prior_precision), math.log(self.sigma_noise)
        for _ in range(4 if fit_sigma else 1):
            log_delta = _maximise_1d(
                lambda t: float(self.log_marginal_likelihood(math.exp(t), math.exp(log_sigma))),
                -12.0,
                12.0,
            )
            if fit_sigma:
                log_sigma = _maximise_1d(
                    lambda t: float(self.log_marginal_likelihood(math.exp(log_delta), math.exp(t))),
                    -8.0,
                    6.0,
                )
        self.prior_precision = math.exp(log_delta)
        self.sigma_noise = math.exp(log_sigma)

    def _gridsearch(self, val_loader: Iterable, grid: Iterable[float] | None, link: str) -> None:
        grid = [float(d) for d in (grid if grid is not None else torch.logspace(-4, 4, 21))]
        if not grid:
            raise ValueError("fastlla: the prior-precision grid is empty")
        cached = []
        for x, y in self._batches(val_loader, "val_loader"):
            f, feats = self._outputs_and_features(x)
            self._check_outputs(f, y)
            cached.append((f, feats, y))
        best, best_nll = None, math.inf
        for delta in grid:
            delta = _positive_float("grid value", delta)
            total, count = 0.0, 0
            for f, feats, y in cached:
                cov = self._covariance_from_features(feats, delta, self.data_scale)
                total += float(self._nll_sum(f, cov, y, link))
                count += f.shape[0]
            nll = total / count
            if nll < best_nll:
                best, best_nll = delta, nll
        if best is None:
            raise ValueError("fastlla: every prior precision of the grid gave a non-finite NLL")
        self.prior_precision = best

    def _nll_sum(self, f: Tensor, cov: Tensor, y: Tensor, link: str) -> Tensor:
        if self.likelihood is Likelihood.CLASSIFICATION:
            # log space: a confidently wrong point costs its (large, finite) −log p, never inf
            logp = log_class_probabilities(f, cov, link)
            return -logp.gather(1, y.view(-1, 1).long()).double().sum()
        var = torch.diagonal(cov, dim1=-2, dim2=-1).double() + self.sigma_noise**2
        resid = y.reshape(f.shape).double() - f.double()
        return 0.5 * (torch.log(2 * math.pi * var) + resid.square() / var).sum()

    # ------------------------------------------------------------------ prediction
    def predictive_distribution(self, x: Any) -> tuple[Tensor, Tensor]:
        """Gaussian over the outputs: mean ``f(x)`` (B, C) and covariance ``Σ(x)`` (B, C, C).

        A batch of no inputs gives empty results (the network is not run). Raises
        :class:`NotFittedError` before ``fit`` and :class:`ModelChangedError` if the model
        changed since.
        """
        self._check_fitted()
        x = to_device(x, self.device, self.dtype)
        check_finite("the inputs", x)
        if batch_size(x) == 0:  # the network is not run on a batch of no inputs
            C = self.n_outputs
            kw = {"dtype": self.dtype, "device": self.device}
            return torch.empty(0, C, **kw), torch.empty(0, C, C, **kw)
        f, feats = self._outputs_and_features(x)
        self._check_outputs(f)
        cov = self._covariance_from_features(feats, self.prior_precision, self.data_scale)
        return f, cov

    def __call__(
        self,
        x: Any,
        pred_type: str = "glm",
        link_approx: str = "probit",
        n_samples: int = 100,
        include_noise: bool = False,
        seed: int = 0,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Predictive of the linearized network.

        Classification: class probabilities (B, C) with ``link_approx`` ``"probit"``,
        ``"bridge"`` or ``"mc"`` (``n_samples`` draws, seeded by ``seed``).
        Regression: ``(f_mean, f_var)`` with ``f_mean`` (B, C) and ``f_var`` (B, C, C), which
        includes ``σ² I`` when ``include_noise``.
        """
        if pred_type != "glm":
            raise ValueError(f"fastlla: only pred_type='glm' is supported, got {pred_type!r}")
        mean, cov = self.predictive_distribution(x)
        if self.likelihood is Likelihood.CLASSIFICATION:
            return class_probabilities(mean, cov, link_approx, n_samples=n_samples, seed=seed)
        if include_noise:
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            cov = cov + self.sigma_noise**2 * eye
        return mean, cov

    # ------------------------------------------------------------------ saving
    def _model_signature(self) -> dict[str, Any]:
        return {
            "names": list(self.network.names),
            "shapes": [list(s) for s in self.network.shapes],
            "param_norm2": self._param_norm2,
        }

    def _base_state(self) -> dict[str, Any]:
        return {
            "estimator": type(self).__name__,
            "likelihood": self.likelihood.value,
            "prior_precision": self.prior_precision,
            "sigma_noise": self.sigma_noise,
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
        unknown = sorted(set(state) - required - set(optional))
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
        if state["likelihood"] != self.likelihood.value:
            raise ValueError(
                f"fastlla: state_dict is for likelihood {state['likelihood']!r}, "
                f"this estimator is {self.likelihood.value!r}"
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
            "prior_precision": _positive_float(
                "state_dict['prior_precision']", state["prior_precision"]
            ),
            "sigma_noise": _positive_float("state_dict['sigma_noise']", state["sigma_noise"]),
            "n_outputs": _state_int(state, "n_outputs", minimum=1),
            "n_data": _state_int(state, "n_data", minimum=1),
            "_loglik_stat": _state_float(state, "loglik_stat"),
        }
        if self.likelihood is Likelihood.CLASSIFICATION:
            if values["sigma_noise"] != 1.0:
                raise ValueError(
                    "fastlla: state_dict['sigma_noise'] must be 1 for classification, got "
                    f"{values['sigma_noise']}"
                )
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
