"""Which ``δ`` does each no-validation criterion choose, and how good is the predictive there?

Issue 15's study (results and discussion: ``docs/calibration.md``). For each network (the one
``python -m fastlla calibration`` trains, :func:`fastlla.apps.calibration.train_network`, with
weight decay 1e-4 and with none) it fits
:class:`fastlla.ExactLLA` in float64, forms the training set's Jacobians ``J`` (N, C, P), the
softmax Hessians ``Λ`` and the function-space Gram ``ĴĴᵀ`` (``Ĵ = Λ^{1/2}J``), and scores a
log-spaced ``δ`` grid by

* ``marglik`` — the Laplace evidence at ``θ*`` (MacKay 1992; what
  ``optimize_prior_precision("marglik")`` maximises);
* ``antoran`` — the same with the linearised model's own mode ``θ_δ = (G+δ)⁻¹Gθ*`` in the fit
  and prior terms, ``−½Σ δλₖ/(λₖ+δ)(uₖᵀθ*)²`` (Antorán et al., ICML 2022, eq. 9);
* ``elbo`` — the evidence lower bound of the Laplace posterior ``N(θ*, Σ_δ)`` with the expected
  log-likelihood of the linearised network computed by Monte Carlo (256 draws) instead of its
  quadratic expansion;
* ``elbo-lin`` — ``elbo`` with ``N(θ_δ, Σ_δ)``;
* ``loo(δ_μ)`` — approximate leave-one-out NLL of the training points (one Newton step, Rad &
  Maleki 2020): predictive covariance ``Kᵢ(δ)(I − ΛᵢKᵢ(δ))⁻¹`` and mean ``fᵢ + K₋ᵢ(δ_μ)(pᵢ − yᵢ)``,
  with the mean's step taken at ``δ_μ`` = the training weight decay × N (the curvature the
  network was trained with) or at the ``marglik`` choice;

and reports the test NLL / ECE (15 bins) / OOD AUROC (predictive entropy) at each choice, at the
validation-NLL ``δ`` of ``optimize_prior_precision("gridsearch")`` and of the MAP network.

    python bench/calibration/evidence_study.py [wine breast_cancer digits_ood digits]

One thread; ~1 min for the MLPs, ~4 min per digits CNN on 2 quiet cores.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from fastlla import ExactLLA
from fastlla import metrics as M
from fastlla.apps.calibration import load_dataset, train_network
from fastlla.apps.data import Dataset
from fastlla.predictive import class_probabilities

GRID = [10.0**k for k in np.arange(-2, 4.01, 0.5)]
N_MC = 256


def scores(la: ExactLLA, ds: Dataset) -> dict[str, float]:
    probs = la(ds.x_test.double())
    out = {"nll": M.nll(probs, ds.y_test), "ece": M.ece(probs, ds.y_test)}
    if ds.x_ood is not None:
        entropy = lambda p: -(p * p.clamp_min(1e-300).log()).sum(-1)  # noqa: E731
        out["auroc"] = M.auroc(entropy(probs), entropy(la(ds.x_ood.double())))
    return out


def psd_sqrt(L: torch.Tensor) -> torch.Tensor:
    e, V = torch.linalg.eigh(L)
    return (V * e.clamp_min(0).sqrt()[..., None, :]) @ V.mT


def trained_exact(name: str, ds: Dataset, weight_decay: float, seed: int = 0):
    """The MAP network of ``python -m fastlla calibration`` (trained on a fork of the global
    RNG), in float64, and exact LLA fitted on the training split."""
    model = copy.deepcopy(train_network(name, ds, weight_decay, seed)).double()
    la = ExactLLA(model, "classification")
    la.fit(ds.loader("train", 128))
    return model, la


def jacobians(la: ExactLLA, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J (N, C, P), f (N, C))`` over ``x`` in batches of 128, float64."""
    J, f = zip(*(la.jacobians(x[i : i + 128].double()) for i in range(0, len(x), 128)))
    return torch.cat(J), torch.cat(f)


def softmax_hessian(p: torch.Tensor) -> torch.Tensor:
    """``diag(p) − ppᵀ`` (…, C, C)."""
    return torch.diag_embed(p) - p[..., :, None] * p[..., None, :]


def study(name: str, ds: Dataset, weight_decay: float, seed: int = 0) -> list[tuple]:
    model, la = trained_exact(name, ds, weight_decay, seed)
    with torch.no_grad():
        p_map = torch.softmax(model(ds.x_test.double()), -1)
    rows = [("MAP", float("inf"), {"nll": M.nll(p_map, ds.y_test), "ece": M.ece(p_map, ds.y_test)})]
    if ds.x_ood is not None:
        with torch.no_grad():
            p_ood = torch.softmax(model(ds.x_ood.double()), -1)
        ent = lambda p: -(p * p.clamp_min(1e-300).log()).sum(-1)  # noqa: E731
        rows[0][2]["auroc"] = M.auroc(ent(p_map), ent(p_ood))
    d_val = la.optimize_prior_precision("gridsearch", val_loader=ds.loader("val", 256))
    rows.append(("validation NLL", d_val, scores(la, ds)))

    # training-set quantities, function space
    J, f = jacobians(la, ds.x_train)
    y = ds.y_train
    N, C, P = J.shape
    p = torch.softmax(f, -1)
    Lam = softmax_hessian(p)
    A = (psd_sqrt(Lam) @ J).reshape(N * C, P)
    Jf = J.reshape(N * C, P)
    S, U = torch.linalg.eigh(A @ A.T)
    S = S.clamp_min(0)
    W = (Jf @ A.T @ U).reshape(N, C, N * C)
    Kd = (J @ J.mT)  # (N, C, C) diagonal blocks of JJᵀ
    del Jf
    theta = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    keep = S > S.max() * 1e-12
    Sk = S[keep]
    c = (U[:, keep].T @ (A @ theta)) / Sk.sqrt()  # uₖᵀθ*, uₖ the GGN's eigenvectors
    Ju = W[..., keep] / Sk.sqrt()  # J uₖ (N, C, r)
    theta2 = float(theta @ theta)
    loglik = float(torch.log_softmax(f, -1).gather(1, y[:, None]).sum())
    eye = torch.eye(C, dtype=torch.float64)
    g = p - torch.nn.functional.one_hot(y, C).double()
    Z = torch.randn(N_MC, N, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def train_cov(d: float) -> torch.Tensor:
        G = (Kd - torch.einsum("nck,k,ndk->ncd", W, 1 / (S + d), W)) / d
        return 0.5 * (G + G.mT)

    def loo_cov(d: float) -> torch.Tensor:
        G = train_cov(d)
        K = G @ torch.linalg.inv(eye - Lam @ G)
        return 0.5 * (K + K.mT)

    def expected_loglik(mean: torch.Tensor, G: torch.Tensor) -> float:
        L = torch.linalg.cholesky(G + 1e-10 * eye)
        fs = mean + (L @ Z[..., None])[..., 0]
        return float(torch.log_softmax(fs, -1).gather(2, y[None, :, None].expand(N_MC, N, 1)).mean(0).sum())

    d_marglik = la.optimize_prior_precision("marglik")
    # where the test variance at the marglik δ comes from: along the training GGN's eigenvectors
    # uₖ, Σₖ (J(x)uₖ)²/(λₖ+δ), or from the GGN's null space, ‖J(x)(I − UUᵀ)‖²/δ
    Jt = jacobians(la, ds.x_test)[0]
    proj = torch.einsum("ncp,pk->nck", Jt, A.T @ U[:, keep]) / Sk.sqrt()  # J(x)uₖ
    data_part = float((proj.square() / (Sk + d_marglik)).sum())
    null_part = float(Jt.square().sum() - proj.square().sum()) / d_marglik
    print(f"(marglik δ = {d_marglik:.3g}: {null_part / (data_part + null_part):.1%} of the test "
          f"inputs' variance comes from the GGN's null space)")
    shifts = {
        "loo(δ_μ = wd·N)": f + (loo_cov(max(weight_decay * N, 1e-6)) @ g[..., None])[..., 0],
        "loo(δ_μ = marglik)": f + (loo_cov(d_marglik) @ g[..., None])[..., 0],
    }
    crit: dict[str, dict[float, float]] = {k: {} for k in ("marglik", "antoran", "elbo", "elbo-lin", *shifts)}
    for d in GRID:
        G, K = train_cov(d), loo_cov(d)
        logdet = float(torch.log1p(Sk / d).sum())
        gamma = float((Sk / (Sk + d)).sum())
        lin = d / (Sk + d) * c  # θ* − θ_δ along uₖ
        crit["marglik"][d] = loglik - 0.5 * d * theta2 - 0.5 * logdet
        crit["antoran"][d] = loglik - 0.5 * float((d * Sk / (Sk + d) * c**2).sum()) - 0.5 * logdet
        crit["elbo"][d] = expected_loglik(f, G) - 0.5 * d * theta2 - 0.5 * logdet + 0.5 * gamma
        theta_lin2 = float(((Sk / (Sk + d) * c) ** 2).sum())
        f_lin = f - torch.einsum("nck,k->nc", Ju, lin)
        crit["elbo-lin"][d] = expected_loglik(f_lin, G) - 0.5 * d * theta_lin2 - 0.5 * logdet + 0.5 * gamma
        for key, mean in shifts.items():
            crit[key][d] = -M.nll(class_probabilities(mean, K, "probit"), y)
    for key, curve in crit.items():
        d = max(curve, key=curve.get)
        la.prior_precision = d
        rows.append((key, d, scores(la, ds)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="*", default=["wine", "breast_cancer", "digits_ood"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.data:
        ds = load_dataset(name)
        for wd in (1e-4, 0.0):
            print(f"\n### {name}, weight decay {wd:g} (N = {len(ds.x_train)})\n")
            print("| criterion | δ | test NLL | ECE | OOD AUROC |\n|---|---|---|---|---|")
            for key, d, s in study(name, ds, wd):
                auroc = f"{s['auroc']:.3f}" if "auroc" in s else "–"
                print(f"| {key} | {d:.3g} | {s['nll']:.4f} | {s['ece']:.4f} | {auroc} |", flush=True)


if __name__ == "__main__":
    main()
