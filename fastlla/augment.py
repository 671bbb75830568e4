"""Augmentations of the kernel-matching inputs.

Kernel matching needs no labels: the surrogate can be trained on inputs the network never saw
with a target, to match the NTK where predictions will be asked. An augmentation is a function
``augment(x, step) -> x'`` (same batch size), seeded by ``step`` so that a fit is reproducible;
``ScaLLA.fit(augment=...)`` applies it to the training inputs of each step (the posterior still
uses the training data as they are).
"""

from __future__ import annotations

import torch

__all__ = ["mixup"]


def mixup(x: torch.Tensor, step: int) -> torch.Tensor:
    """Half the batch replaced by convex mixtures of pairs of its inputs (λ ~ U(0, 1)).

    For low-dimensional regression this fills the convex hull of the inputs — gaps between
    clusters of data included, where exact LLA's variance is high and a surrogate trained only
    on the data has never been told the kernel.
    """
    g = torch.Generator().manual_seed(10_000 + step)
    n = x.shape[0] // 2
    perm = torch.randperm(x.shape[0], generator=g)[:n]
    lam = torch.rand(n, *([1] * (x.dim() - 1)), generator=g).to(x)
    mixed = lam * x[:n] + (1 - lam) * x[perm]
    return torch.cat([x[n:], mixed])
