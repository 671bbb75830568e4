"""Surrogate networks ``g(x) ∈ R^{M×C}`` whose inner products learn the neural tangent kernel.

Any ``nn.Module`` mapping a batch to ``(B, M, C)`` can serve. :func:`default_surrogate` builds
one from the user's network: a copy of its trunk (everything before its last ``nn.Linear``,
warm-started from the network's own weights, since the NTK is largely a function of the
network's own features) plus a new linear head to ``M·C`` outputs, times a scale set so the
surrogate's kernel starts at the NTK's magnitude (``√(P/M)`` before calibration on data).

Choosing ``M`` (``n_features``): the posterior lives in ``M`` dimensions, so it costs ``O(M²)``
memory and ``O(M³)`` once per fit; predictive cost is ``O(M²C)`` per input. The kernel error
of the learned surrogate is limited mostly by the noise of the projected targets, not by ``M``
(on the digits CNN ``M = 50…200`` reached the same held-out error), while the predictive
variance keeps more of exact LLA's as ``M`` grows. 128 is the default; use 256–512 when the
predictive variance matters more than speed, and keep ``M`` well below ``N·C``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from .functional import batch_size, call_module

__all__ = ["Surrogate", "default_surrogate", "check_surrogate_output", "last_linear"]


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Qualified name and module of the last ``nn.Linear`` registered in ``model``."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(
            "fastlla: cannot build a default surrogate for a model without an nn.Linear head; "
            "pass surrogate=<nn.Module returning (B, M, C)>"
        )
    return found[-1]


class Surrogate(nn.Module):
    """``g(x) = output_scale · head(trunk(x))`` reshaped to ``(B, M, C)``."""

    def __init__(self, trunk: nn.Module, n_hidden: int, n_features: int, n_outputs: int):
        super().__init__()
        self.trunk = trunk
        self.n_features, self.n_outputs = n_features, n_outputs
        self.head = nn.Linear(n_hidden, n_features * n_outputs)
        self.register_buffer("output_scale", torch.tensor(1.0))

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        h = self.trunk(*args, **kwargs)
        h = h.reshape(h.shape[0], -1)
        out = self.head(h) * self.output_scale
        return out.view(h.shape[0], self.n_features, self.n_outputs)


def default_surrogate(model: nn.Module, n_features: int, n_outputs: int, n_params: int) -> Surrogate:
    """The trunk of ``model`` (copied, trainable) plus a head to ``n_features × n_outputs``."""
    if n_features < 1:
        raise ValueError(f"fastlla: n_features must be at least 1, got {n_features}")
    trunk = copy.deepcopy(model)
    name, linear = last_linear(trunk)
    if name == "":
        raise ValueError(
            "fastlla: the model is a single nn.Linear; pass surrogate=<nn.Module> explicitly"
        )
    parent_name, _, attr = name.rpartition(".")
    parent = trunk.get_submodule(parent_name) if parent_name else trunk
    setattr(parent, attr, nn.Identity())
    for p in trunk.parameters():
        p.requires_grad_(True)
    surrogate = Surrogate(trunk, linear.in_features, n_features, n_outputs)
    p0 = linear.weight
    surrogate = surrogate.to(device=p0.device, dtype=p0.dtype).eval()
    surrogate.output_scale.fill_(math.sqrt(n_params / n_features))
    return surrogate


def check_surrogate_output(out: Any, x: Any, n_outputs: int, n_features: int | None = None) -> Tensor:
    """Validate that a surrogate returned ``(B, M, C)`` finite values for the batch ``x``."""
    B = batch_size(x)
    if not isinstance(out, Tensor) or out.dim() != 3 or out.shape[0] != B or out.shape[2] != n_outputs:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"fastlla: the surrogate must return (B, M, C) = ({B}, M, {n_outputs}), got {shape}"
        )
    if n_features is not None and out.shape[1] != n_features:
        raise ValueError(
            f"fastlla: the surrogate returned M = {out.shape[1]} features, expected {n_features}"
        )
    if not torch.isfinite(out).all():
        raise ValueError("fastlla: the surrogate's output contains NaN or Inf")
    return out


def surrogate_features(surrogate: nn.Module, x: Any) -> Tensor:
    """``g(x)`` through the input convention of :func:`fastlla.functional.call_module`."""
    return call_module(surrogate, x)
