"""ScaLLA's ``state_dict`` and ``load_state_dict``: what a fit saves, checked before it loads.

The saved state holds plain values (ints, bools, floats, tensors and dicts of them, so
``torch.load(..., weights_only=True)`` reads it): the shared hyper-parameters and log-likelihood
statistic (:class:`~fastlla.fit_state.FitState`), :class:`~fastlla.scalla_settings.Settings`
(what every ``"auto"`` became, its fields under their names), the network's output layer as read
at ``fit``, the surrogate's and residual head's weights and the feature-space GGN ``H``.

:class:`SavedState` is a mixin of :class:`fastlla.ScaLLA`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .fit_state import _state_int, _state_tensor, check_module_state
from .posterior import FeaturePosterior
from .network_head import NetworkHead
from .scalla_settings import SURROGATE_FIELDS, Settings, check_saved, resolve
from .surrogate import LastLayerSurrogate

__all__ = ["SavedState"]

#: The keys of :class:`~fastlla.scalla_settings.Settings` in a saved state.
SETTINGS_KEYS = tuple(f.name for f in dataclasses.fields(Settings))


class SavedState:
    """``state_dict``/``load_state_dict`` of :class:`fastlla.ScaLLA`."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to predict: hyper-parameters, :attr:`settings` (its six fields,
        under their names), the surrogate's and residual head's weights and ``H``."""
        self._check_fitted()
        state = self._base_state()
        state.update(
            n_features=self.n_features,
            **self.settings.as_dict(),
            seed=self.seed,
            head=None if self._head is None else dataclasses.asdict(self._head),
            surrogate=self.surrogate.state_dict(),
            residual_head=None if self.residual_head is None else self.residual_head.state_dict(),
            H=self.posterior.H,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a fitted estimator; the model must be the one it was fitted on.

        Every entry is checked before anything changes — keys, types, counts, finiteness, the
        settings record (:func:`fastlla.scalla_settings.check_saved`, and the network must
        admit it), the surrogate's and residual head's weights (keys and shapes) and ``H``
        against the surrogate's number of features — so a refused state (a clear error naming
        the key) leaves the estimator as it was. Without a surrogate, the default one is built
        as ``fit`` builds it (from a generator seeded by the saved ``seed``) and loaded — for a
        state of a user's surrogate, the one this estimator's options build, which loads where
        it has the same architecture (else the error names ``surrogate``). A state saved
        before the record held ``residual_variance`` and ``augment`` loads too: its
        ``residual_variance`` is ``"head"`` where it holds a residual head, else ``False``, its
        ``augment`` ``"unrecorded"``. The surrogate's options (``last_layer``, ``gate``,
        ``head_width``, ``n_features``) become the values the record holds, as before; the
        ``residual_variance`` option is left as it is (``"auto"``: the record's value).
        """
        base = self._validated_base_state(
            state, ("n_features", "seed", "surrogate", "H"),
            (*SETTINGS_KEYS, "residual_head", "head"),
        )  # fmt: skip
        n_features = _state_int(state, "n_features", minimum=1)
        # the surrogate (built as fit builds it, if there is none) is prepared on a shallow copy
        # of the estimator and committed only once everything checked out
        new = copy.copy(self)
        new.__dict__.update(
            base, n_features=n_features, seed=_state_int(state, "seed"), _head=_state_head(state)
        )
        new.settings = settings = new._saved_settings(state, n_features)
        if not settings.user_surrogate:  # the options become the values they resolved to
            new.__dict__.update(
                last_layer=settings.last_layer, gate=settings.gate,
                head_width=settings.head_width, _n_features_option=settings.n_learned,
                _auto_features=False,
            )  # fmt: skip
        try:
            surrogate = new._ensure_surrogate(base["n_outputs"])
        except ValueError as err:
            raise ValueError(
                "fastlla: cannot build the surrogate state_dict describes (n_outputs="
                f"{base['n_outputs']}, {new.settings}) for this model: {err}"
            ) from err
        check_module_state(surrogate, state["surrogate"], "state_dict['surrogate']")
        built_outputs = getattr(surrogate, "n_outputs", base["n_outputs"])
        if built_outputs != base["n_outputs"]:
            raise ValueError(
                f"fastlla: state_dict['n_outputs'] = {base['n_outputs']}, but the surrogate has "
                f"{built_outputs} outputs"
            )
        built_features = _surrogate_n_features(surrogate)
        if built_features is not None and built_features != n_features:
            raise ValueError(
                f"fastlla: state_dict['n_features'] = {n_features}, but the surrogate returns "
                f"{built_features} features"
            )
        H = _state_tensor(state, "H", (n_features, n_features)).to(self.device, self.dtype)
        if not torch.allclose(H, H.mT, rtol=1e-4, atol=1e-6 * float(H.abs().max())):
            raise ValueError("fastlla: state_dict['H'] is not symmetric")
        rhead = None
        if state.get("residual_head") is not None:
            rhead = new._residual_head(base["n_outputs"])
            check_module_state(rhead, state["residual_head"], "state_dict['residual_head']")
            rhead.load_state_dict(state["residual_head"])
        posterior = FeaturePosterior(H)
        with self._all_or_nothing(surrogate):  # loaded in place: checked above, cannot fail
            surrogate.load_state_dict(state["surrogate"])
            self.__dict__.update(new.__dict__)
            self.residual_head, self.posterior = rhead, posterior
            self._mark_fitted()

    def _saved_settings(self, state: dict[str, Any], n_features: int) -> Settings:
        """The :class:`~fastlla.scalla_settings.Settings` of ``state``, checked. Loaded into a
        surrogate already there, the record is taken as saved (an older state's surrogate fields
        from the surrogate it loads into); otherwise it must describe a default surrogate the
        network admits: it is passed through :func:`~fastlla.scalla_settings.resolve` as
        explicit options, which keeps them (an older state's ``"auto"`` is resolved, as then; a
        user's surrogate's record takes the fields of the default surrogate this estimator's
        options resolve to)."""
        has_head = state.get("residual_head") is not None
        recorded = "residual_variance" in state or "augment" in state
        if recorded:
            missing = [k for k in SETTINGS_KEYS if k not in state]
            if missing:
                raise ValueError(f"fastlla: state_dict lacks the key(s) {missing}")
            saved = check_saved(state, n_features, has_head)
        else:  # saved before the record held residual_variance and augment
            saved = _older_settings(state, n_features, has_head, self.last_layer)
        if self.surrogate is not None:
            if recorded:
                return saved
            built = self.settings
            kept = {f: getattr(built, f) if built is not None else None for f in SURROGATE_FIELDS}
            return dataclasses.replace(saved, **kept)
        if saved.user_surrogate:  # the default surrogate of this estimator's options
            options = self._options()
        else:
            options = dict(
                last_layer=saved.last_layer, gate=saved.gate, head_width=saved.head_width,
                n_features=saved.n_learned, auto_features=False,
                residual_variance=saved.residual_variance,
            )  # fmt: skip
        try:
            resolved = resolve(self.model, self.head, state["n_outputs"], self.likelihood, options)
        except ValueError as err:
            raise ValueError(
                f"fastlla: cannot build the surrogate state_dict describes ({saved}) for this "
                f"model: {err}"
            ) from err
        fields = {f: getattr(resolved, f) for f in SURROGATE_FIELDS}
        changed = [f for f in SURROGATE_FIELDS if fields[f] != getattr(saved, f)]
        if recorded and changed and not saved.user_surrogate:  # (explicit values are kept)
            raise ValueError(
                f"fastlla: state_dict[{changed[0]!r}] = {getattr(saved, changed[0])!r} does not "
                f"fit this model (it resolves to {fields[changed[0]]!r})"
            )
        return dataclasses.replace(saved, **fields)


def _older_settings(
    state: dict[str, Any], n_features: int, has_head: bool, last_layer: Any
) -> Settings:
    """The settings of a state saved before the record held ``residual_variance`` and
    ``augment`` (its surrogate fields optional: ``last_layer`` defaults to the estimator's
    option, and may be ``"auto"``)."""
    last_layer = state.get("last_layer", last_layer)
    if last_layer != "auto" and not isinstance(last_layer, (bool, int)):
        raise TypeError(
            f"fastlla: state_dict['last_layer'] must be a bool or int, got {last_layer!r}"
        )
    head_width = _state_int(state, "head_width", minimum=0) if "head_width" in state else 0
    gate = state.get("gate", False)
    if not isinstance(gate, bool):
        raise TypeError(f"fastlla: state_dict['gate'] must be a bool, got {gate!r}")
    n_learned = _state_int(state, "n_learned", minimum=0) if "n_learned" in state else n_features
    if n_learned > n_features:
        raise ValueError(
            f"fastlla: state_dict['n_learned'] = {n_learned} exceeds n_features = {n_features}"
        )
    residual = "head" if has_head else False
    return Settings(last_layer, gate, head_width, n_learned, residual, "unrecorded")


def _state_head(state: dict[str, Any]) -> NetworkHead | None:
    """The :class:`~fastlla.network_head.NetworkHead` a state saved (``None``: saved without one)."""
    saved = state.get("head")
    if saved is None:
        return None
    fields = {f.name for f in dataclasses.fields(NetworkHead)}
    if not isinstance(saved, Mapping) or set(saved) != fields:
        raise ValueError(
            f"fastlla: state_dict['head'] must be a dict with the keys {sorted(fields)}"
        )
    gate = saved["gate"]
    return NetworkHead(**{**saved, "gate": None if gate is None else tuple(gate)})


def _surrogate_n_features(surrogate: nn.Module) -> int | None:
    """The number ``M`` of features a surrogate returns, where it says (``None`` otherwise)."""
    if isinstance(surrogate, LastLayerSurrogate):
        return surrogate.n_learned + surrogate.n_exact
    n = getattr(surrogate, "n_features", None)
    return n if isinstance(n, int) else None
