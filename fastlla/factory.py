"""``fastlla.Laplace``: laplace-torch's factory, mapped onto fastlla's estimators.

``Laplace(model, likelihood, subset_of_weights, hessian_structure, ...)`` takes laplace-torch's
signature and defaults. fastlla implements two Hessian structures:

* ``"full"`` → :class:`fastlla.ExactLLA`: the exact GGN (laplace-torch's ``FullLaplace``,
  ``FullLLLaplace`` or ``FullSubnetLaplace``); for small models or a last layer.
* ``"scalla"`` (fastlla's own name) → :class:`fastlla.ScaLLA`: the GGN of a learned surrogate
  kernel, for networks too large for the exact one (``subset_of_weights="all"`` only).

laplace-torch's ``"kron"`` (its default), ``"diag"``, ``"lowrank"`` and ``"gp"`` are not
implemented and raise ``NotImplementedError`` naming the fastlla choice to use instead.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .exact import ExactLLA
from .laplace import LaplaceBase
from .scalla import ScaLLA

__all__ = ["Laplace", "HESSIAN_STRUCTURES", "SUBSETS_OF_WEIGHTS"]

HESSIAN_STRUCTURES = ("full", "scalla")
SUBSETS_OF_WEIGHTS = ("all", "last_layer", "subnetwork")

_NOT_IMPLEMENTED = {
    "kron": "Kronecker-factored (K-FAC)",
    "diag": "diagonal",
    "lowrank": "low-rank",
    "gp": "function-space (GP)",
}


def Laplace(  # noqa: N802 - laplace-torch's name
    model: nn.Module,
    likelihood: str,
    subset_of_weights: str = "last_layer",
    hessian_structure: str = "kron",
    *args: Any,
    **kwargs: Any,
) -> LaplaceBase:
    """A fastlla estimator chosen by laplace-torch's strings.

    Parameters
    ----------
    model, likelihood : as in the estimators.
    subset_of_weights : ``"last_layer"`` (default, as laplace-torch), ``"all"`` or
        ``"subnetwork"`` (needs ``subnetwork_indices=``).
    hessian_structure : ``"full"`` (:class:`~fastlla.ExactLLA`) or ``"scalla"``
        (:class:`~fastlla.ScaLLA`, ``subset_of_weights="all"`` only). The default ``"kron"``
        and laplace-torch's ``"diag"``, ``"lowrank"``, ``"gp"`` raise ``NotImplementedError``.
    *args, **kwargs : passed to the estimator (``sigma_noise``, ``prior_precision``, ... in
        laplace-torch's order; ``last_layer_name``, ``subnetwork_indices``, and the
        estimator's own keyword options).

    Returns
    -------
    An unfitted :class:`~fastlla.ExactLLA` or :class:`~fastlla.ScaLLA`.
    """
    subset = getattr(subset_of_weights, "value", subset_of_weights)
    structure = getattr(hessian_structure, "value", hessian_structure)
    if subset not in SUBSETS_OF_WEIGHTS:
        raise ValueError(
            f"fastlla: subset_of_weights must be one of {SUBSETS_OF_WEIGHTS}, got {subset!r}"
        )
    if structure in _NOT_IMPLEMENTED:
        raise NotImplementedError(
            f"fastlla: hessian_structure={structure!r} is not implemented in fastlla; use "
            "hessian_structure='full' (exact: small models, or subset_of_weights='last_layer') "
            "or 'scalla' (a learned surrogate kernel: large models, subset_of_weights='all') "
            f"in place of laplace-torch's {_NOT_IMPLEMENTED[structure]} approximation"
        )
    if structure not in HESSIAN_STRUCTURES:
        raise ValueError(
            f"fastlla: hessian_structure must be one of {HESSIAN_STRUCTURES}, got {structure!r}"
        )
    if structure == "scalla":
        if subset != "all":
            raise ValueError(
                "fastlla: hessian_structure='scalla' approximates the whole network; use "
                f"subset_of_weights='all' (or hessian_structure='full' for {subset!r})"
            )
        return ScaLLA(model, likelihood, *args, **kwargs)
    if subset == "subnetwork" and args and "subnetwork_indices" not in kwargs:
        # laplace-torch's SubnetLaplace takes the indices third, before sigma_noise
        kwargs["subnetwork_indices"], args = args[0], args[1:]
    if subset == "last_layer":
        # laplace-torch's last-layer classes order their positional parameters differently
        kwargs = _by_name(args, kwargs, _LAST_LAYER_ORDER)
        args = ()
        if kwargs.pop("feature_reduction", None) is not None:
            raise NotImplementedError(
                "fastlla: feature_reduction is not implemented; the last layer's input must "
                "be (B, features)"
            )
    if subset != "subnetwork" and "subnetwork_indices" in kwargs:
        raise ValueError("fastlla: subnetwork_indices go with subset_of_weights='subnetwork'")
    if subset == "subnetwork" and kwargs.get("subnetwork_indices") is None:
        raise ValueError("fastlla: subset_of_weights='subnetwork' needs subnetwork_indices=")
    return ExactLLA(model, likelihood, *args, subset_of_weights=subset, **kwargs)


#: laplace-torch's ``FullLLLaplace`` parameters after ``(model, likelihood)``, in order
_LAST_LAYER_ORDER = (
    "sigma_noise", "prior_precision", "prior_mean", "temperature", "enable_backprop",
    "feature_reduction", "dict_key_x", "dict_key_y", "backend", "last_layer_name",
    "backend_kwargs", "asdl_fisher_kwargs",
)  # fmt: skip


def _by_name(args: tuple, kwargs: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    """Positional ``args`` named by ``order``, merged into ``kwargs``."""
    if len(args) > len(order):
        raise TypeError(f"fastlla: Laplace takes at most {len(order)} positional options")
    named = dict(zip(order, args))
    both = set(named) & set(kwargs)
    if both:
        raise TypeError(f"fastlla: Laplace got multiple values for {sorted(both)}")
    return {**named, **kwargs}
