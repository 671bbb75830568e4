"""ScaLLA's ``state_dict`` and ``load_state_dict``: what a fit saves, checked before it loads.

The saved state holds plain values (ints, bools, floats, tensors and dicts of them, so
``torch.load(..., weights_only=True)`` reads it): the shared hyper-parameters and log-likelihood
statistic (:class:`~fastlla.fit_state.FitState`), :class:`~fastlla.scalla_settings.Settings`
(what ``"auto"`` became), the network's output layer as read at ``fit``, the surrogate's and
residual head's weights and the feature-space GGN ``H``.

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
from .surrogate import GatedSurrogate, LastLayerSurrogate

__all__ = ["SavedState"]


class SavedState:
    """``state_dict``/``load_state_dict`` of :class:`fastlla.ScaLLA`."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to predict: hyper-parameters, surrogate weights and ``H``."""
        self._check_fitted()
        state = self._base_state()
        state.update(
            n_features=self.n_features,
            n_learned=self.n_learned,
            last_layer=self.last_layer_used,
            head_width=getattr(
                getattr(self.surrogate, "learned", self.surrogate), "head_width", 0
            ),
            gate=isinstance(getattr(self.surrogate, "learned", None), GatedSurrogate),
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
        surrogate's and residual head's weights (keys and shapes) and ``H`` against the
        surrogate's number of features — so a refused state (a clear error naming the key)
        leaves the estimator as it was. Without a surrogate, the default one is built as
        ``fit`` builds it (from a generator seeded by the saved ``seed``) and loaded.
        """
        base = self._validated_base_state(
            state, ("n_features", "seed", "surrogate", "H"),
            ("n_learned", "last_layer", "head_width", "gate", "residual_head", "head"),
        )  # fmt: skip
        n_features = _state_int(state, "n_features", minimum=1)
        n_learned = _state_int(state, "n_learned", minimum=0) if "n_learned" in state else n_features
        if n_learned > n_features:
            raise ValueError(
                f"fastlla: state_dict['n_learned'] = {n_learned} exceeds n_features = {n_features}"
            )
        last_layer = state.get("last_layer", self.last_layer)
        if last_layer != "auto" and not isinstance(last_layer, (bool, int)):
            raise TypeError(f"fastlla: state_dict['last_layer'] must be a bool or int, got {last_layer!r}")
        head_width = _state_int(state, "head_width", minimum=0) if "head_width" in state else 0
        gate = state.get("gate", False)
        if not isinstance(gate, bool):
            raise TypeError(f"fastlla: state_dict['gate'] must be a bool, got {gate!r}")
        # the surrogate (built as fit builds it, if there is none) is prepared on a shallow copy
        # of the estimator and committed only once everything checked out
        new = copy.copy(self)
        new.__dict__.update(
            base, n_features=n_features, n_learned=n_learned, last_layer=last_layer,
            head_width=head_width, gate=gate, seed=_state_int(state, "seed"),
            _head=_state_head(state), _auto_features=False,
        )  # fmt: skip
        try:
            surrogate = new._ensure_surrogate(base["n_outputs"])
        except ValueError as err:
            raise ValueError(
                "fastlla: cannot build the surrogate state_dict describes (n_outputs="
                f"{base['n_outputs']}, last_layer={last_layer!r}, gate={gate}, head_width="
                f"{head_width}) for this model: {err}"
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
