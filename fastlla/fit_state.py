"""What a fit is tied to, and the checks of values and saved states every estimator shares.

:class:`FitState` (a mixin of :class:`fastlla.laplace.LaplaceBase`) records that an estimator is
fitted and the model it belongs to — modes, children, and each parameter's and buffer's identity
and version counter, so a later change raises :class:`ModelChangedError` without a pass over the
weights — makes a failing call leave the estimator as it was (:meth:`FitState._all_or_nothing`),
and writes and checks the part of ``state_dict`` every estimator shares. The ``_state_*``
functions check one entry of a saved state, with an error that names the key.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .predictive import Likelihood

__all__ = ["FitState", "NotFittedError", "ModelChangedError", "check_module_state"]


class NotFittedError(RuntimeError):
    """A predictive or posterior quantity was requested before ``fit``."""


class ModelChangedError(RuntimeError):
    """The model's weights, buffers or train/eval modes changed since ``fit``: the posterior
    belongs to the old network. Restore the model (e.g. ``model.eval()``) or fit again."""


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


class FitState:
    """The fitted flag, model-change detection, all-or-nothing calls and the shared part of
    ``state_dict`` (see the module docstring); mixed into :class:`fastlla.laplace.LaplaceBase`."""

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
    optional = {  # entries an older state may lack (a module's ``optional_state``)
        f"{name}.{key}" if name else key
        for name, m in module.named_modules()
        for key in getattr(m, "optional_state", ())
    }
    missing = sorted(set(ours) - set(state) - optional)
    unknown = sorted(set(state) - set(ours))
    if missing or unknown:
        raise ValueError(
            f"fastlla: {where} does not fit the module: missing keys {missing}, unknown keys "
            f"{unknown}"
        )
    for key, ref in ours.items():
        if key not in state:  # (optional)
            continue
        value = state[key]
        if isinstance(ref, Tensor) and ref.is_floating_point():
            _state_tensor(state, key, tuple(ref.shape), where)
        elif isinstance(ref, Tensor) and (
            not isinstance(value, Tensor) or value.shape != ref.shape
        ):
            raise ValueError(f"fastlla: {where}[{key!r}] must be a tensor of shape {tuple(ref.shape)}")
