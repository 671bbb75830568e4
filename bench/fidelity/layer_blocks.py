"""Diagnosis: how the digits CNN's NTK splits over its layers, and what exact blocks would buy.

Forms the per-layer Jacobians of the 200 probe images and of the training images (a diagnostic
for this small CNN, P = 11,482, not a method) and prints

* each layer's share ``‖κ_layer‖_F / ‖κ‖_F`` of the probe Gram,
* the held-out kernel error of exact features for the last layer alone, for the last two
  (``head`` + the penultimate ``Linear``), and of those plus the convolutions' Jacobian projected
  on the top-k right singular vectors of its training block (the best any k learned features
  could do beside the two exact blocks).

    python bench/fidelity/layer_blocks.py      # about 2.5 minutes on 2 cores

Results: ``bench/fidelity/RESULTS.md``.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from subspace_distill import jacobian  # noqa: E402

from fastlla.apps.fidelity import setup  # noqa: E402
from fastlla.functional import NetworkFunction  # noqa: E402

LAYERS = {"conv1": "trunk.0.", "conv2": "trunk.3.", "fc": "trunk.7.", "head": "head."}


def main() -> None:
    torch.manual_seed(0)
    ds, model, probe = setup()
    net = NetworkFunction(model)
    starts = [sum(net.numels[:i]) for i in range(len(net.numels) + 1)]

    def cols(*prefixes: str) -> torch.Tensor:
        return torch.cat([torch.arange(starts[i], starts[i + 1])
                          for i, n in enumerate(net.names) if n.startswith(prefixes)])

    def rows(x: torch.Tensor, *prefixes: str) -> torch.Tensor:
        J = jacobian(net, x, cols(*prefixes)).double()  # (B, C, P_block)
        return J.reshape(-1, J.shape[-1])

    def error(r: torch.Tensor) -> float:
        return float(torch.linalg.norm(r @ r.mT - probe.kappa)) / probe.norm

    for name, prefix in LAYERS.items():
        r = rows(probe.x, prefix)
        print(f"{name}: share {float(torch.linalg.norm(r @ r.mT)) / probe.norm:.3f}")
    head, fc = rows(probe.x, LAYERS["head"]), rows(probe.x, LAYERS["fc"])
    conv = rows(probe.x, LAYERS["conv1"], LAYERS["conv2"])
    print(f"floor(100) {probe.floor(100):.4f}; exact head only: error {error(head):.4f}; "
          f"exact head + fc: {error(torch.cat([head, fc], 1)):.4f}")
    conv_train = rows(ds.x_train, LAYERS["conv1"], LAYERS["conv2"])
    _, _, V = torch.svd_lowrank(conv_train, q=220, niter=4)
    for k in (50, 100, 200):
        feats = torch.cat([head, fc, conv @ V[:, :k]], 1)
        print(f"exact head + fc + convolutions on their top-{k} training directions: "
              f"{error(feats):.4f}")


if __name__ == "__main__":
    main()
