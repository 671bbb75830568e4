"""The initialisation prior: the prior precision a network was drawn from.

A network trained with a small or no weight decay leaves most directions of parameter space
where its initialisation put them: the data never constrained them (the GGN's null space and its
weakly curved directions). The marginal likelihood cannot measure the prior scale there — it sees
only the directions the data constrain — and chooses a ``δ`` 10–100× too small (docs/
calibration.md). In those directions ``θ*`` is still a draw from the initialisation, so the
initialisation's second moment is the prior the data left unchanged: ``δ_l = 1/E[θ_l²]`` per
parameter tensor ``l``, measured by re-running each module's own initialiser
(``reset_parameters``) on a copy of it. For PyTorch's default ``nn.Linear``/``nn.Conv2d``
initialisation (Kaiming-uniform) this is ``3·fan_in`` for weights and biases.

:func:`init_second_moments` measures ``E[θ_l²]``; ``optimize_prior_precision(method="init")``
(:mod:`fastlla.evidence`) turns them into a prior: by default the isotropic one with the same
expected ``‖θ‖²``, ``δ = P / Σ_l E‖θ_l‖²``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

__all__ = ["init_second_moments"]

#: each tensor's second moment is averaged over at least this many freshly drawn entries
MIN_ENTRIES = 4096
#: ... from at most this many re-initialisations of its module
MAX_DRAWS = 256


def _initialiser(module: nn.Module):
    """The module's own parameter initialiser (``reset_parameters``; ``nn.MultiheadAttention``
    keeps it as ``_reset_parameters``), or ``None``."""
    for attr in ("reset_parameters", "_reset_parameters"):
        fn = getattr(module, attr, None)
        if callable(fn):
            return attr
    return None


def init_second_moments(model: nn.Module, names: list[str], seed: int = 0) -> Tensor:
    """``E[θ_l²]`` under the initialisation of each parameter tensor named in ``names``.

    Each module owning one of the parameters is copied and re-initialised by its own
    ``reset_parameters`` until every tensor of it has contributed at least ``MIN_ENTRIES``
    entries (at most ``MAX_DRAWS`` draws); the mean square over those entries is the second
    moment. The model itself and the global RNG are left as they were (the draws run on a
    forked RNG seeded with ``seed``).

    Parameters
    ----------
    model : the network.
    names : names of parameters of ``model`` (``named_parameters()`` names).
    seed : seed of the draws (the result is deterministic given it).

    Returns
    -------
    A float64 tensor ``(len(names),)`` on the CPU, ``≥ 0`` (``0`` for a tensor its initialiser
    sets to zero, such as the bias of ``nn.LayerNorm``).

    Raises
    ------
    ValueError
        A parameter's module has no initialiser to re-run (a bare ``nn.Parameter`` of a custom
        module): its prior cannot be read from the network; give ``prior_precision`` instead.
    """
    owners: dict[str, list[tuple[int, str]]] = {}  # module name -> (index in names, attribute)
    initialisers: dict[str, str] = {}  # module name -> its initialiser's method name
    for k, name in enumerate(names):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        initialisers[module_name] = _initialiser(module)
        if initialisers[module_name] is None:
            raise ValueError(
                f"fastlla: cannot read the initialisation of parameter {name!r}: its module "
                f"({type(module).__name__}) has no reset_parameters to re-run; give "
                "prior_precision, or choose it with method='gridsearch' on a validation set"
            )
        owners.setdefault(module_name, []).append((k, attr))
    moments = torch.zeros(len(names), dtype=torch.float64)
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for module_name, members in owners.items():
            module = copy.deepcopy(model.get_submodule(module_name))
            reset = getattr(module, initialisers[module_name])
            smallest = min(getattr(module, attr).numel() for _, attr in members)
            draws = min(MAX_DRAWS, math.ceil(MIN_ENTRIES / smallest))
            total = torch.zeros(len(members), dtype=torch.float64)
            with torch.no_grad():
                for _ in range(draws):
                    reset()
                    for j, (_, attr) in enumerate(members):
                        total[j] += getattr(module, attr).detach().double().square().mean().cpu()
            for j, (k, _) in enumerate(members):
                moments[k] = total[j] / draws
    return moments
