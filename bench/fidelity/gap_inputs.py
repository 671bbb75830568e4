"""Diagnosis: does ScaLLA's gap-regression variance improve when the surrogate also sees inputs
inside the gap?

Kernel matching needs no labels, so the surrogate can be trained on inputs where the network
has no data. On the demo's 1-D gap regression (tanh MLP 1→50→50→1, δ and σ by exact LLA's
marglik), three choices of kernel-matching inputs, 20 s each, two seeds:

* ``none``: the training inputs (the default);
* ``mixup``: half of each batch replaced by convex mixtures of pairs of inputs (across the gap);
* ``uniform``: half of each batch replaced by uniform draws over the plotting grid's range.

Prints the mean predictive std (noise included) inside the gap ``|x| < 1`` and outside, the
median relative error of the predictive variance against exact LLA's on the grid, and the exact
kernel error on every fourth grid point.

    python bench/fidelity/gap_inputs.py      # about 2.5 minutes

Results: ``bench/fidelity/RESULTS.md``.
"""

from __future__ import annotations

import torch

from fastlla.apps.data import make_gap_regression
from fastlla.exact import ExactLLA
from fastlla.augment import mixup
from fastlla.apps.models import MLP, train_map
from fastlla.scalla import ScaLLA


def main() -> None:
    torch.manual_seed(0)
    ds = make_gap_regression(seed=0)
    train = ds.loader("train", 32, shuffle=True, seed=0)
    model = train_map(MLP(1, 1, hidden=(50, 50)), train, likelihood="regression", seed=0)
    exact = ExactLLA(model, "regression").fit(ds.loader("train", 64))
    exact.optimize_prior_precision("marglik", optimize_sigma_noise=True)
    delta, sigma = float(exact.prior_precision), float(exact.sigma_noise)
    grid = ds.x_grid
    in_gap = (grid.abs() < 1).squeeze(-1)
    lo, hi = float(grid.min()), float(grid.max())

    def variance(la) -> torch.Tensor:
        return torch.diagonal(la.predictive_distribution(grid)[1], dim1=1, dim2=2).squeeze(-1)

    v_exact = variance(exact)

    def report(name: str, la) -> None:
        v = variance(la)
        std = (v + sigma**2).sqrt()
        rel = (v - v_exact).abs() / v_exact
        print(f"{name}: std in gap {float(std[in_gap].mean()):.3f}, outside "
              f"{float(std[~in_gap].mean()):.3f}; median rel. error of the variance: gap "
              f"{float(rel[in_gap].median()):.3f}, outside {float(rel[~in_gap].median()):.3f}")  # fmt: skip

    def uniform(x: torch.Tensor, step: int) -> torch.Tensor:
        n = x.shape[0] // 2
        u = lo + (hi - lo) * torch.rand(n, *x.shape[1:], generator=torch.Generator().manual_seed(step))
        return torch.cat([x[: x.shape[0] - n], u])

    report("exact LLA", exact)
    for seed in (0, 1):
        for name, augment in (("none", None), ("mixup", mixup), ("uniform", uniform)):
            la = ScaLLA(model, "regression", n_features=64, prior_precision=delta,
                        sigma_noise=sigma, seed=seed)  # fmt: skip
            la.fit(train, iterations="auto", time_budget=20, progress_bar=False, augment=augment)
            report(f"seed {seed}, {name} ({len(la.history)} steps, kernel error on the grid "
                   f"{la.kernel_fidelity(grid[::4], method='exact'):.4f})", la)  # fmt: skip


if __name__ == "__main__":
    main()
