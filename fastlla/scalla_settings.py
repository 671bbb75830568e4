"""ScaLLA's options, and what their ``"auto"`` values become for one network.

:func:`check_options` refuses bad option values (the messages :class:`fastlla.ScaLLA` raises at
construction); :func:`resolve` turns the options, the network's output layer
(:class:`~fastlla.network_head.NetworkHead`) and its number of outputs into :class:`Settings`, the
frozen record of what ``"auto"`` became; :func:`build_surrogate` and
:func:`build_residual_head` build the default modules from it. :class:`fastlla.ScaLLA` and
:meth:`fastlla.export.Predictor.like` both build through here, so an empty predictor has the
fitted estimator's modules. The reasons behind the defaults are in ``docs/design-history.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .predictive import Likelihood
from .network_head import ACTIVATION_GRADIENTS, NetworkHead
from .surrogate import ResidualHead, default_surrogate, default_surrogate_size, last_layer_surrogate

__all__ = [
    "Settings",
    "check_options",
    "resolve",
    "resolve_residual_variance",
    "build_surrogate",
    "build_residual_head",
]

#: ``head_width="auto"``: a hidden head layer this wide when the penultimate layer is narrower.
HEAD_WIDTH = 512
#: ``gate="auto"``: at most this many parameters in the gated surrogate's map to ``H``.
GATE_MAX_PARAMS = 8_000_000
#: Size rule of the default surrogate (``head_width="auto"``, ``gate="auto"``, ``n_features``
#: left at its default): at most ``max(SURROGATE_MAX_RATIO · P, SURROGATE_MIN_PARAMS)``
#: parameters, ``P`` the network's.
SURROGATE_MAX_RATIO, SURROGATE_MIN_PARAMS = 100, 8_000_000
#: ``n_features`` left at its default.
DEFAULT_N_FEATURES = 128
#: ``last_layer="auto"`` keeps at most this many exact last-layer features.
LAST_LAYER_MAX_FEATURES = 1024
#: Accepted values of ``residual_variance``.
RESIDUAL_MODES = ("auto", False, None, "jvp", "head")


@dataclass(frozen=True)
class Settings:
    """What the default surrogate was built with: the options with ``"auto"`` resolved.

    ``last_layer``: the exact last-layer block — ``True`` (all ``(h+1)·C`` features), a rank
    ``k`` (``k·C`` features) or ``False``; ``gate``: whether the learned features are gated
    (:class:`~fastlla.surrogate.GatedSurrogate`); ``head_width``: hidden units of the learned
    head (``0``: linear); ``n_learned``: the learned feature dimension. Plain values, saved in
    :meth:`fastlla.ScaLLA.state_dict`.
    """

    last_layer: bool | int
    gate: bool
    head_width: int
    n_learned: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_options(
    n_features: int | None = None,
    surrogate: nn.Module | None = None,
    seed: int = 0,
    last_layer: bool | int | str = "auto",
    residual_variance: bool | str = "auto",
    head_width: int | str = "auto",
    gate: bool | str = "auto",
) -> dict[str, Any]:
    """ScaLLA's keyword options, checked (``TypeError``/``ValueError`` on a bad value), with
    ``n_features`` (``None``: :data:`DEFAULT_N_FEATURES`) and ``seed`` as ints and
    ``auto_features`` telling whether ``n_features`` was left at its default."""
    if last_layer != "auto" and not isinstance(last_layer, (bool, int)):
        raise TypeError(
            f"fastlla: last_layer must be 'auto', a bool or an int rank, got {last_layer!r}"
        )
    if residual_variance not in RESIDUAL_MODES:
        raise ValueError(
            "fastlla: residual_variance must be 'auto', False, 'jvp' or 'head', got "
            f"{residual_variance!r}"
        )
    if surrogate is not None and not isinstance(surrogate, nn.Module):
        raise TypeError("fastlla: surrogate must be an nn.Module returning (B, M, C)")
    auto_features = n_features is None
    n_features = DEFAULT_N_FEATURES if n_features is None else n_features
    if int(n_features) < 1:
        raise ValueError(f"fastlla: n_features must be at least 1, got {n_features}")
    if head_width != "auto" and (
        isinstance(head_width, bool) or not isinstance(head_width, int) or head_width < 0
    ):
        raise ValueError(f"fastlla: head_width must be 'auto' or an int >= 0, got {head_width!r}")
    if not (gate == "auto" or isinstance(gate, bool)):
        raise ValueError(f"fastlla: gate must be 'auto' or a bool, got {gate!r}")
    return dict(
        n_features=int(n_features), auto_features=auto_features, surrogate=surrogate,
        seed=int(seed), last_layer=last_layer, residual_variance=residual_variance,
        head_width=head_width, gate=gate,
    )  # fmt: skip


def resolve_residual_variance(option: bool | str | None, likelihood: Likelihood) -> bool | str:
    """``residual_variance`` for this likelihood: ``"auto"`` corrects classification only."""
    if option == "auto" and likelihood is not Likelihood.CLASSIFICATION:
        return False
    return option or False


def _last_layer(model: nn.Module, head: NetworkHead, n_outputs: int, option: Any) -> bool | int:
    """What ``last_layer`` means for this model; an explicit ``True`` or rank is refused where
    the output layer is not verified."""
    if head.output_layer is None:
        if option not in ("auto", False, 0):
            raise ValueError(
                f"fastlla: last_layer={option!r} needs the network to return the "
                f"output of its last nn.Linear (f = W φ + b), which it does not: "
                f"{head.reason} (checked on the first training batch); pass last_layer=False"
            )
        return False
    if option != "auto":
        return option
    linear = model.get_submodule(head.output_layer)
    trainable = linear.weight.requires_grad and (linear.bias is None or linear.bias.requires_grad)
    if head.output_layer == "" or not trainable:
        return False
    width = linear.in_features + int(linear.bias is not None)
    if width * n_outputs <= LAST_LAYER_MAX_FEATURES:
        return True
    k = LAST_LAYER_MAX_FEATURES // n_outputs
    return k if k >= 2 else False


def _head_width(model: nn.Module, head: NetworkHead, option: Any) -> int:
    """What ``head_width`` means for this model before the size rule."""
    if option != "auto":
        return int(option)
    if head.output_layer is not None:
        hidden = model.get_submodule(head.output_layer).in_features
    else:
        hidden = head.feature_width
    return HEAD_WIDTH if hidden < HEAD_WIDTH else 0


def _gate(
    model: nn.Module, head: NetworkHead, last_layer: bool | int, option: Any, width: int,
    n_learned: int,
) -> bool:  # fmt: skip
    """What ``gate`` means for this model."""
    structure = head.gate if last_layer is True else None
    possible = structure is not None
    if possible and option == "auto":  # its H maps u to h·M outputs: keep that small
        n_in, h = model.get_submodule(structure[0]).weight.shape[::-1]
        possible = (n_in + width) * h * n_learned <= GATE_MAX_PARAMS
    if option is True and last_layer is not True:
        raise ValueError(
            "fastlla: gate=True needs the full exact last-layer block (last_layer=True or "
            "'auto' resolving to it)"
        )
    if option is True and not possible:
        raise ValueError(
            "fastlla: gate=True, but the network's forward pass does not feed an nn.Linear "
            "into an elementwise activation into its output layer (read by running it on the "
            f"first training batch; activations: {[t.__name__ for t in ACTIVATION_GRADIENTS]})"
        )
    return possible and option is not False


def resolve(
    model: nn.Module,
    head: NetworkHead,
    n_outputs: int,
    *,
    last_layer: Any,
    gate: Any,
    head_width: Any,
    n_features: int,
    auto_features: bool,
) -> Settings:
    """The settings of the default surrogate for ``model`` with ``n_outputs`` outputs.

    ``head``: how the network computes its output (:func:`fastlla.network_head.find_head`).
    Size rule: at most ``max(100·P, 8·10⁶)`` parameters (``P`` the network's); where the
    choices would exceed it, ``gate="auto"`` drops the gate, then ``head_width="auto"`` the
    hidden head layer, then a default ``n_features`` (``auto_features``) is lowered to fit;
    explicit values are kept. ``ValueError`` where an explicit ``last_layer`` or ``gate=True``
    does not fit the network.
    """
    exact = _last_layer(model, head, n_outputs, last_layer)
    width = _head_width(model, head, head_width)
    gated = _gate(model, head, exact, gate, width, n_features)
    budget = max(
        SURROGATE_MAX_RATIO * sum(p.numel() for p in model.parameters()), SURROGATE_MIN_PARAMS
    )
    widths = [width, 0] if head_width == "auto" and width else [width]
    kinds = [True, False] if gated and gate == "auto" else [gated]
    options = [(g, w) for g in kinds for w in widths]

    def size(g: bool, w: int, m: int) -> int:
        return default_surrogate_size(model, head, m, n_outputs, w, gated=g)

    for g, w in options:
        if size(g, w, n_features) <= budget:
            return Settings(exact, g, w, n_features)
    g, w = options[-1]
    if auto_features:
        fixed = size(g, w, 0)
        per_feature = size(g, w, 1) - fixed
        n_features = max(1, min(n_features, (budget - fixed) // max(per_feature, 1)))
    return Settings(exact, g, w, n_features)


def build_surrogate(
    model: nn.Module,
    settings: Settings,
    head: NetworkHead,
    n_outputs: int,
    n_params: int,
    seed: int,
    x0: Any = None,
    gate_option: Any = "auto",
) -> tuple[nn.Module, Settings]:
    """The default surrogate ``settings`` describe, and the settings it was built with.

    ``x0`` (a batch) confirms the gated structure on data: where it fails, ``gate="auto"``
    falls back to the plain surrogate (the returned settings say so) and ``gate=True`` raises
    ``ValueError``. New weights come from a CPU generator seeded with ``seed`` (the global RNG
    is neither read nor advanced).
    """
    if settings.gate:
        surrogate = last_layer_surrogate(
            model, settings.n_learned, n_outputs, n_params, None, settings.head_width,
            gated=True, generator=_generator(seed), head=head,
        )  # fmt: skip
        if x0 is None or surrogate.learned.check(x0):
            return surrogate, settings
        if gate_option is True:
            raise ValueError(
                "fastlla: gate=True, but the network's forward pass does not feed "
                f"{surrogate.learned.structure} into each other in order"
            )
        settings = dataclasses.replace(settings, gate=False)
    if settings.last_layer is False:
        surrogate = default_surrogate(
            model, settings.n_learned, n_outputs, n_params, settings.head_width,
            generator=_generator(seed), head=head,
        )  # fmt: skip
    else:
        rank = None if settings.last_layer is True else int(settings.last_layer)
        surrogate = last_layer_surrogate(
            model, settings.n_learned, n_outputs, n_params, rank, settings.head_width,
            generator=_generator(seed), head=head,
        )  # fmt: skip
    return surrogate, settings


def build_residual_head(
    model: nn.Module, head: NetworkHead, n_outputs: int, seed: int
) -> ResidualHead:
    """A new :class:`~fastlla.surrogate.ResidualHead` on the input of the verified output layer
    (or, where there is none, of the last ``nn.Linear`` the network runs), initialised from
    ``seed + 1``; ``ValueError`` where the network runs no ``nn.Linear``."""
    name = head.output_layer if head.output_layer is not None else head.feature_layer
    if not name:
        raise ValueError(
            "fastlla: the residual head reads the input of the network's last nn.Linear, and "
            f"there is none: {head.reason}; use residual_variance='jvp' or False"
        )
    return ResidualHead(
        model, n_outputs, generator=_generator(seed + 1), head_name=name,
        output_layer=head.output_layer is not None, pooled=head.pooled,
        n_inputs=None if head.output_layer is not None else head.feature_width,
    )  # fmt: skip


def _generator(seed: int) -> torch.Generator:
    """A private CPU generator seeded with ``seed`` (new weights are drawn on the CPU, then
    moved): the user's global RNG is neither read nor advanced."""
    return torch.Generator().manual_seed(seed)
