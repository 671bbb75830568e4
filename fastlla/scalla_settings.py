"""ScaLLA's options, and what their ``"auto"`` values become for one network and data set.

:func:`check_options` refuses bad option values (the messages :class:`fastlla.ScaLLA` raises at
construction); :func:`resolve` — the one place an ``"auto"`` is decided — turns the options, the
network's output layer (:class:`~fastlla.network_head.NetworkHead`), its number of outputs, the
likelihood and the first training batch into :class:`Settings`, the frozen record of what every
``"auto"`` became; :func:`build_surrogate` and :func:`build_residual_head` build the default
modules from it. :class:`fastlla.ScaLLA` resolves at ``fit`` (the output layer and the inputs
are read there), saves the record in its ``state_dict`` (:func:`check_saved` validates it on
load) and shows it in its ``repr``; :meth:`fastlla.export.Predictor.like` builds through the
same function, so an empty predictor has the fitted estimator's modules. The reasons behind the
defaults are in ``docs/design-history.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .predictive import Likelihood
from .network_head import ACTIVATION_GRADIENTS, NetworkHead, gated_structure_runs
from .surrogate import ResidualHead, default_surrogate, default_surrogate_size, last_layer_surrogate

__all__ = [
    "Settings",
    "check_options",
    "resolve",
    "check_saved",
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
#: What ``residual_variance`` and ``fit(augment=...)`` can become (:class:`Settings`);
#: ``"unrecorded"``: a state saved before the augmentation was recorded.
RESOLVED_RESIDUAL = (False, "jvp", "head")
RESOLVED_AUGMENT = (None, "mixup", "callable", "unrecorded")
#: The fields of :class:`Settings` that describe the default surrogate (``None`` for a user's).
SURROGATE_FIELDS = ("last_layer", "gate", "head_width", "n_learned")


@dataclass(frozen=True)
class Settings:
    """What ScaLLA's ``"auto"`` options became at ``fit``: one frozen record of plain values.

    The default surrogate: ``last_layer``, the exact last-layer block — ``True`` (all
    ``(h+1)·C`` features), a rank ``k`` (``k·C`` features) or ``False``; ``gate``: whether the
    learned features are gated (:class:`~fastlla.surrogate.GatedSurrogate`); ``head_width``:
    hidden units of the learned head (``0``: linear); ``n_learned``: the learned feature
    dimension. All four are ``None`` for a user's ``surrogate=`` (they do not apply).
    ``residual_variance``: the residual-variance correction the fit left, ``False``, ``"jvp"``
    or ``"head"`` (``"head"`` where a residual head was, or was asked to be, trained).
    ``augment``: the augmentation of the kernel-matching inputs, ``None``, ``"mixup"`` or
    ``"callable"`` (a function the user passed), or ``"unrecorded"`` (a state saved before
    fastlla recorded it). Saved in :meth:`fastlla.ScaLLA.state_dict` under the field names.
    """

    last_layer: bool | int | None
    gate: bool | None
    head_width: int | None
    n_learned: int | None
    residual_variance: bool | str
    augment: str | None

    @property
    def user_surrogate(self) -> bool:
        """Whether the surrogate is the user's (the surrogate fields are ``None``)."""
        return self.last_layer is None

    def as_dict(self) -> dict[str, Any]:
        """The fields by name: the entries :meth:`fastlla.ScaLLA.state_dict` saves."""
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
    n_learned: int, x0: Any,
) -> bool:  # fmt: skip
    """What ``gate`` means for this model; ``x0`` (a batch, or ``None``) confirms the gated
    structure on data."""
    structure = head.gate if last_layer is True else None
    possible = structure is not None
    if possible and option == "auto":  # its H maps u to h·M outputs: keep that small
        n_in, h = model.get_submodule(structure[0]).weight.shape[::-1]
        possible = (n_in + width) * h * n_learned <= GATE_MAX_PARAMS
    if possible and x0 is not None and not gated_structure_runs(model, structure, x0):
        if option is True:
            raise ValueError(
                "fastlla: gate=True, but the network's forward pass does not feed "
                f"{structure} into each other in order"
            )
        possible = False
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

def _residual_variance(
    option: Any, likelihood: Likelihood, head: NetworkHead, trains_head: bool
) -> bool | str:
    """What ``residual_variance`` means: ``"auto"`` is ``"head"`` for classification where a
    residual head is trained (a verified output layer to read ``φ`` from, and ``trains_head``),
    else off; an explicit value is kept (``None`` is ``False``)."""
    if option != "auto":
        return option or False
    trained = trains_head and bool(head.output_layer)
    return "head" if likelihood is Likelihood.CLASSIFICATION and trained else False


def _augment(option: Any, likelihood: Likelihood, x0: Any) -> str | None:
    """What ``fit(augment=...)`` means: ``"auto"`` is mixup for regression on floating-point
    tensor inputs (``x0``), else none; a function is ``"callable"``."""
    if option == "auto":
        tensor = isinstance(x0, Tensor) and x0.is_floating_point()
        return "mixup" if tensor and likelihood is Likelihood.REGRESSION else None
    if option is None or option == "mixup":
        return option
    return "callable"


def resolve(
    model: nn.Module,
    head: NetworkHead,
    n_outputs: int,
    likelihood: Likelihood,
    options: Mapping[str, Any],
    *,
    surrogate: nn.Module | None = None,
    built: Settings | None = None,
    x0: Any = None,
    augment: Any = None,
    trains_head: bool = True,
) -> Settings:
    """Every ``"auto"`` of ScaLLA resolved, in one record, for ``model`` with ``n_outputs``
    outputs.

    ``head``: how the network computes its output (:func:`fastlla.network_head.find_head`);
    ``options``: the keyword options as :func:`check_options` returns them; ``surrogate``: the
    surrogate already there — ``None`` (the default one is to be built: its options are resolved
    here), the one an earlier fit built (``built``, its record: those fields are kept) or the
    user's (those fields are ``None``); ``x0``: the first training batch (confirms the gated
    structure on data; ``augment="auto"`` reads its type), ``None`` where there is none;
    ``augment``: ``fit``'s option; ``trains_head``: whether a residual head is (or was) trained
    (the fit runs kernel-matching steps, or an earlier one left a head).

    Size rule of the default surrogate: at most ``max(100·P, 8·10⁶)`` parameters (``P`` the
    network's); where the choices would exceed it, ``gate="auto"`` drops the gate, then
    ``head_width="auto"`` the hidden head layer, then a default ``n_features``
    (``options["auto_features"]``) is lowered to fit; explicit values are kept. ``ValueError``
    where an explicit ``last_layer`` or ``gate=True`` does not fit the network.
    """
    rest = dict(
        residual_variance=_residual_variance(
            options["residual_variance"], likelihood, head, trains_head
        ),
        augment=_augment(augment, likelihood, x0),
    )
    if surrogate is not None:
        fields = {f: getattr(built, f) if built is not None else None for f in SURROGATE_FIELDS}
        return Settings(**fields, **rest)
    exact = _last_layer(model, head, n_outputs, options["last_layer"])
    head_width, gate = options["head_width"], options["gate"]
    n_features = options["n_features"]
    width = _head_width(model, head, head_width)
    gated = _gate(model, head, exact, gate, width, n_features, x0)
    budget = max(
        SURROGATE_MAX_RATIO * sum(p.numel() for p in model.parameters()), SURROGATE_MIN_PARAMS
    )
    widths = [width, 0] if head_width == "auto" and width else [width]
    kinds = [True, False] if gated and gate == "auto" else [gated]
    choices = [(g, w) for g in kinds for w in widths]

    def size(g: bool, w: int, m: int) -> int:
        return default_surrogate_size(model, head, m, n_outputs, w, gated=g)

    for g, w in choices:
        if size(g, w, n_features) <= budget:
            return Settings(exact, g, w, n_features, **rest)
    g, w = choices[-1]
    if options["auto_features"]:
        fixed = size(g, w, 0)
        per_feature = size(g, w, 1) - fixed
        n_features = max(1, min(n_features, (budget - fixed) // max(per_feature, 1)))
    return Settings(exact, g, w, n_features, **rest)


def check_saved(state: Mapping[str, Any], n_features: int, residual_head: bool) -> Settings:
    """The :class:`Settings` a ``state_dict`` saved, checked (``TypeError``/``ValueError``
    naming the key): its six fields, the surrogate's all ``None`` (a user's surrogate) or all
    set, ``n_learned ≤ n_features``, and ``residual_variance="head"`` where a residual head was
    saved (``residual_head``)."""
    values = {f.name: state[f.name] for f in dataclasses.fields(Settings)}
    if values["last_layer"] is None:
        extra = [f for f in SURROGATE_FIELDS if values[f] is not None]
        if extra:
            raise ValueError(
                f"fastlla: state_dict[{extra[0]!r}] = {values[extra[0]]!r}, but "
                "state_dict['last_layer'] is None (a user's surrogate): the surrogate's "
                f"settings {list(SURROGATE_FIELDS)} must all be None or all be set"
            )
    else:
        last_layer, gate = values["last_layer"], values["gate"]
        if not isinstance(last_layer, int) or last_layer < 0:  # (a bool is an int)
            raise TypeError(
                "fastlla: state_dict['last_layer'] must be a bool, an int rank or None, got "
                f"{last_layer!r}"
            )
        if not isinstance(gate, bool) or (gate and last_layer is not True):
            raise TypeError(
                "fastlla: state_dict['gate'] must be a bool (True only with last_layer=True), "
                f"got {gate!r}"
            )
        for key, minimum, maximum in (("head_width", 0, None), ("n_learned", 1, n_features)):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise TypeError(
                    f"fastlla: state_dict[{key!r}] must be an int >= {minimum} or None, "
                    f"got {value!r}"
                )
            if maximum is not None and value > maximum:
                raise ValueError(
                    f"fastlla: state_dict[{key!r}] = {value} exceeds n_features = {maximum}"
                )
    residual = values["residual_variance"]
    if not (residual is False or (isinstance(residual, str) and residual in RESOLVED_RESIDUAL)):
        raise ValueError(
            "fastlla: state_dict['residual_variance'] must be False, 'jvp' or 'head', got "
            f"{residual!r}"
        )
    if residual_head and residual != "head":
        raise ValueError(
            "fastlla: state_dict holds a residual head, but state_dict['residual_variance'] = "
            f"{residual!r} (a fit leaves a head only with 'head')"
        )
    augment = values["augment"]
    if not (augment is None or (isinstance(augment, str) and augment in RESOLVED_AUGMENT)):
        raise ValueError(
            f"fastlla: state_dict['augment'] must be one of {list(RESOLVED_AUGMENT)}, got "
            f"{values['augment']!r}"
        )
    return Settings(**values)


def build_surrogate(
    model: nn.Module,
    settings: Settings,
    head: NetworkHead,
    n_outputs: int,
    n_params: int,
    seed: int,
) -> nn.Module:
    """The default surrogate ``settings`` describe (resolved by :func:`resolve`), new weights
    drawn from a CPU generator seeded with ``seed`` (the global RNG is neither read nor
    advanced)."""
    if settings.gate:
        return last_layer_surrogate(
            model, settings.n_learned, n_outputs, n_params, None, settings.head_width,
            gated=True, generator=_generator(seed), head=head,
        )  # fmt: skip
    if settings.last_layer is False:
        return default_surrogate(
            model, settings.n_learned, n_outputs, n_params, settings.head_width,
            generator=_generator(seed), head=head,
        )  # fmt: skip
    rank = None if settings.last_layer is True else int(settings.last_layer)
    return last_layer_surrogate(
        model, settings.n_learned, n_outputs, n_params, rank, settings.head_width,
        generator=_generator(seed), head=head,
    )  # fmt: skip


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
