"""ScaLLA's mean predictive variance against exact LLA's over a grid of prior precisions.

For each of the demo's data sets (built as :mod:`fastlla.apps.demo` builds them, seed 0) this
trains the MAP network, fits ExactLLA (float64 copy, the oracle) and chooses its marglik ``δ``
(with ``σ`` for regression), fits one ScaLLA (fixed step count, so the run is reproducible) and,
over 10 values of ``δ`` log-spaced from (marglik ``δ``)/10 to 10⁴, prints

    ScaLLA mean variance / ExactLLA mean variance

(mean over test inputs of the trace of the ``C×C`` covariance) with the residual-variance
correction off, the learned residual head (``"head"``) and the JVP estimate (``"jvp"``), and a
candidate not in the library: the head's residual shrunk as a low-amplitude copy of the
feature kernel would be ("head, scaled": :func:`scaled_residual`). The same fitted ScaLLA
serves all: only ``residual_variance`` is switched. ``docs/residual-variance.md`` holds the
table and what it means.

    OMP_NUM_THREADS=2 python bench/residual_variance.py            # all four data sets
    OMP_NUM_THREADS=2 python bench/residual_variance.py --datasets digits-ood gap

The ten-class digits set is the slow one (ExactLLA over 10,770 function-space dimensions: its
eigendecomposition alone takes minutes); the other three take a few minutes each.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from fastlla import ExactLLA, ScaLLA
from fastlla.apps.data import (
    load_diabetes_split,
    load_digits_ood,
    load_digits_split,
    make_gap_regression,
)
from fastlla.apps.models import MLP, DigitsCNN, train_map

MODES = (False, "head", "jvp")
DATASETS = ("digits-ood", "digits-10", "diabetes", "gap")


def build(name: str) -> dict:
    """The data set, MAP network, test inputs and ScaLLA options of ``name`` (as in the demo)."""
    torch.manual_seed(0)
    if name in ("digits-ood", "digits-10"):
        ds = load_digits_ood(seed=0) if name == "digits-ood" else load_digits_split(0, context=True)
        train = ds.loader("train", 64, shuffle=True, seed=0)
        model = train_map(DigitsCNN(n_classes=ds.n_classes), train, seed=0)
        x = ds.x_test if name == "digits-ood" else ds.x_test[:200]
        return dict(ds=ds, train=train, model=model, x=x, likelihood="classification",
                    n_features=128, iterations=500, exact_batch=128)  # fmt: skip
    if name == "diabetes":
        ds = load_diabetes_split(seed=0)
        train = ds.loader("train", 32, shuffle=True, seed=0)
        val = ds.loader("val", 256)  # 264 near-linear points: keep the best epoch (as the demo)
        mlp = MLP(ds.input_shape[0], 1, hidden=(50, 50))
        model = train_map(mlp, train, likelihood="regression", val_loader=val, seed=0)
        x = ds.x_test
    elif name == "gap":
        ds = make_gap_regression(seed=0)
        train = ds.loader("train", 32, shuffle=True, seed=0)
        model = train_map(MLP(1, 1, hidden=(50, 50)), train, likelihood="regression", seed=0)
        x = torch.cat([ds.x_test, ds.x_grid])  # test points and the grid across the gap
    else:
        raise ValueError(f"unknown data set {name!r}; choose from {DATASETS}")
    return dict(ds=ds, train=train, model=model, x=x, likelihood="regression", n_features=64,
                iterations=400, exact_batch=64)  # fmt: skip


def mean_variance(estimator, x: torch.Tensor, delta: float) -> float:
    """Mean over ``x`` of the trace of the predictive covariance at prior precision ``delta``."""
    estimator.prior_precision = float(delta)
    _, cov = estimator.predictive_distribution(x)
    return float(torch.diagonal(cov, dim1=1, dim2=2).sum(-1).mean())


def scaled_residual(la, x_train: torch.Tensor, x: torch.Tensor, deltas) -> list[float]:
    """Mean over ``x`` of ``tr Σ_φ(x) + ε(x)·tr φ(x)ᵀ(δ + ε̄ sH)⁻¹φ(x)`` per ``δ``: the residual
    modelled as the kernel ``ε(x)^{1/2} ε(x')^{1/2} φ(x)ᵀφ(x')`` (``ε(x) = tr r(x) / tr φ(x)ᵀφ(x)``,
    the head's ``r``), the data's constraint on it through ``ε̄``, the Λ-weighted training mean of
    ``ε``. Exact as ``δ → ∞`` (``r(x)/δ``); see docs/residual-variance.md."""
    la.residual_variance = "head"
    s = la.data_scale

    def parts(inputs):
        with torch.no_grad():
            f, feats = la._outputs_and_features(inputs, diagonal_residual=True)
        return f, feats, la._dense_features(feats).square().sum(1)  # diag of φᵀφ (B, C)

    f, feats, q = parts(x_train)
    lam = torch.ones_like(q)
    if la.likelihood.name == "CLASSIFICATION":
        p = torch.softmax(f, -1)
        lam = p - p * p  # diagonal of the softmax Hessian
    eps = float((feats.residual * lam).sum() / (q * lam).sum())
    _, feats, q = parts(x)
    ratio = feats.residual.sum(-1) / q.sum(-1)  # ε(x)
    out = []
    for delta in deltas:
        var = la.posterior.variance(feats.phi, float(delta), s, feats.kron).sum(-1)
        shrunk = la.posterior.variance(feats.phi, float(delta) / eps, s, feats.kron).sum(-1)
        out.append(float((var + ratio * shrunk / eps).mean()))
    return out


def run(name: str, log=print) -> list[dict]:
    case = build(name)
    ds, model, x, likelihood = case["ds"], case["model"], case["x"], case["likelihood"]
    exact = ExactLLA(copy.deepcopy(model).double(), likelihood)
    exact.fit(ds.loader("train", case["exact_batch"]))
    regression = likelihood == "regression"
    delta_marglik = exact.optimize_prior_precision("marglik", optimize_sigma_noise=regression)
    options = {}
    if regression:  # ScaLLA keeps exact LLA's σ (as in the demo)
        options = dict(sigma_noise=float(exact.sigma_noise), residual_variance="head")
    la = ScaLLA(model, likelihood, n_features=case["n_features"], seed=0, **options)
    la.fit(case["train"], iterations=case["iterations"], n_projections=8, lr=1e-3,
           progress_bar=False)  # fmt: skip
    log(f"{name}: {len(ds.x_train)} training inputs, {len(x)} test inputs, marglik δ = "
        f"{delta_marglik:.4g}, ScaLLA M = {la.n_features}, {la.settings}")  # fmt: skip
    rows = []
    deltas = np.logspace(np.log10(delta_marglik / 10), 4, 10)
    scaled = scaled_residual(la, ds.x_train, x, deltas)
    for delta, scaled_var in zip(deltas, scaled):
        exact_var = mean_variance(exact, x.double(), delta)
        row = {"delta": float(delta), "exact": exact_var}
        for mode in MODES:
            la.residual_variance = mode
            row[str(mode)] = mean_variance(la, x, delta) / exact_var
        row["scaled"] = scaled_var / exact_var
        rows.append(row)
        log(f"| {delta:9.3g} | {exact_var:10.4g} | {row['False']:.3f} | {row['head']:.3f} | "
            f"{row['jvp']:.3f} | {row['scaled']:.3f} |")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    args = parser.parse_args()
    for name in args.datasets:
        print(f"\n## {name}\n\n| δ | exact mean var | off | head | jvp | head, scaled |")
        print("|---|---|---|---|---|---|")
        run(name)


if __name__ == "__main__":
    main()
