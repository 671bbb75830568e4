"""Why ``½ log det Σ(x)`` ranks OOD digits below the data for exact LLA (issue 17, part 1).

    OMP_NUM_THREADS=1 python bench/ood/logdet_study.py [--out bench/ood/logdet_study.json]

The demo's split (sklearn digits; train classes 0–4, OOD = test images of 5–9; the demo's
``DigitsCNN`` MAP, seed 0), exact LLA in float64 (``fastlla.ExactLLA``, function space,
``N·C = 2700``). Far-OOD reference: uniform-noise images (seeded). Prints and writes:

1. the AUROC (in = test digits 0–4) of every ``fastlla.ood`` score kind, the MAP entropy, the
   feature norm ``‖φ(x)‖`` and the Jacobian norm ``‖J(x)‖_F`` at the marglik and validation ``δ``;
2. the split of ``½ log det Σ`` into the centred (softmax-visible) part and the part along
   ``1``, the top eigenvector's alignment with ``1/√C``, and the posterior/prior variance along
   ``1``;
3. the AUROCs over a ``δ`` grid and over subsets of the training data (``N``);
4. an explicit-Jacobian oracle on a small CNN (P = 949): ``Σ(x) = J (G + δI)⁻¹ Jᵀ`` with ``G``
   formed from per-input Jacobians in float64, against ``ExactLLA`` in both forms, and the
   oracle's own AUROC(logdet);
5. the same table on a second split (train 5–9, OOD 0–4).

Every ``δ`` and ``N`` is evaluated from one eigendecomposition of the kernel ``K = ĴĴᵀ``:
``Σ(x) = (J Jᵀ − J Ĵᵀ U (δ/s + Λ)⁻¹ Uᵀ Ĵ Jᵀ)/δ`` — checked against ``la.functional_variance``.
Seed 0 throughout; ``seconds`` (wall) and ``cpu seconds`` are recorded in the output.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from fastlla import ExactLLA, metrics
from fastlla.apps.data import load_digits_ood
from fastlla.apps.models import DigitsCNN, train_map
from fastlla.ood import KINDS, _centred_basis, gaussian_ood_scores

SEED = 0
MI_SAMPLES = 200
C = 5


def auroc(s_in, s_out) -> float:
    return round(metrics.auroc(s_in, s_out), 4)


class KernelPredictive:
    """Exact LLA's predictive for any ``δ`` (and a subset of the training rows) from one
    eigendecomposition of the kernel of the chosen rows (classification, ``s = 1``)."""

    def __init__(self, jhat: torch.Tensor, rows: torch.Tensor | None = None):
        self.jhat = jhat if rows is None else jhat[rows]
        K = self.jhat @ self.jhat.mT
        self.lam, self.U = torch.linalg.eigh(0.5 * (K + K.mT))
        self.lam = self.lam.clamp_min(0.0)

    def parts(self, J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``J Jᵀ`` (B, C, C) and ``W = J Ĵᵀ U`` (B, C, NC) for Jacobians ``J`` (B, C, P)."""
        return J @ J.mT, (J @ self.jhat.mT) @ self.U

    def covariance(self, parts, delta: float) -> torch.Tensor:
        kxx, W = parts
        return (kxx - (W / (delta + self.lam)) @ W.mT) / delta


def scores(f, cov, prior, feats, J, seed=SEED) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = gaussian_ood_scores(f, cov, KINDS, prior_cov=prior, n_samples=MI_SAMPLES, generator=g)
    p = torch.softmax(f, -1)
    out["MAP entropy"] = -torch.special.xlogy(p, p).sum(-1)
    out["-feature norm"] = -feats.norm(dim=-1)
    out["-Jacobian norm"] = -J.flatten(1).norm(dim=-1)
    out["trace"] = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)
    out["prior logdet"] = 0.5 * torch.linalg.slogdet(prior)[1]  # ½ log det J Jᵀ/δ
    return out


def eigen_summary(cov, prior, J) -> dict[str, float]:
    """Medians over inputs: log det parts, top eigenvector vs 1, variance along 1."""
    u = torch.full((C,), 1 / math.sqrt(C), dtype=cov.dtype)
    evals, evecs = torch.linalg.eigh(cov)
    Q = _centred_basis(C, cov)
    half_logdet = 0.5 * evals.log().sum(-1)
    half_logdet_c = 0.5 * torch.linalg.eigvalsh(Q.mT @ cov @ Q).log().sum(-1)
    var1 = u @ cov @ u  # variance along 1/√C
    var1_prior = u @ prior @ u
    med = lambda t: round(float(t.median()), 4)  # noqa: E731
    return {
        "‖J(x)‖_F": med(J.flatten(1).norm(dim=-1)),
        "½logdetΣ₀ (prior)": med(0.5 * torch.linalg.slogdet(prior)[1]),
        "½logdetΣ": med(half_logdet),
        "½logdet centred part": med(half_logdet_c),
        "½log along-1 part (conditional)": med(half_logdet - half_logdet_c),
        "|cos(top eigvec, 1)|": med((evecs[..., -1] @ u).abs()),
        "largest eigval": med(evals[..., -1]),
        "smallest eigval": med(evals[..., 0]),
        "var along 1, posterior": med(var1),
        "var along 1, posterior/prior": med(var1 / var1_prior),
        "centred trace, posterior/prior": med(
            torch.diagonal(Q.mT @ cov @ Q, dim1=-2, dim2=-1).sum(-1)
            / torch.diagonal(Q.mT @ prior @ Q, dim1=-2, dim2=-1).sum(-1)
        ),
    }


def penultimate(model, x):
    with torch.no_grad():
        return model.features(x)


def study_split(in_classes, log, full=True) -> dict:
    torch.manual_seed(SEED)
    ds = load_digits_ood(seed=SEED, in_classes=in_classes)
    model = train_map(DigitsCNN(n_classes=C), ds.loader("train", 64, shuffle=True, seed=SEED),
                      seed=SEED)  # fmt: skip
    exact = ExactLLA(copy.deepcopy(model).double(), "classification").fit(ds.loader("train", 128))
    d_ml = float(exact.optimize_prior_precision("marglik"))
    d_val = float(exact.optimize_prior_precision("gridsearch", val_loader=ds.loader("val", 256)))
    log(f"split in={in_classes}: N={len(ds.x_train)}, form={exact.fitted_form}, "
        f"δ marglik={d_ml:.4g}, δ val={d_val:.4g}")  # fmt: skip
    gen = torch.Generator().manual_seed(SEED)
    sets = {"in": ds.x_test, "ood": ds.x_ood,
            "noise": torch.rand(len(ds.x_ood), 1, 8, 8, generator=gen)}  # fmt: skip
    jhat = exact._jhat.double()
    kp = KernelPredictive(jhat)
    data = {}
    for name, x in sets.items():
        J, f = exact.jacobians(x.double())
        data[name] = dict(J=J, f=f, parts=kp.parts(J), feats=penultimate(exact.model, x.double()))
    # check the eigen route against the library at the validation δ
    cov_lib = exact.functional_variance(data["in"]["J"])
    cov_eig = kp.covariance(data["in"]["parts"], d_val)
    rel = float((cov_lib - cov_eig).norm() / cov_lib.norm())
    log(f"  eigen route vs la.functional_variance at δ val: relative difference {rel:.2e}")
    out = {"in_classes": list(in_classes), "N": len(ds.x_train), "delta_marglik": d_ml,
           "delta_val": d_val, "eigen_route_rel_diff": rel, "auroc": {}, "eigen": {}}  # fmt: skip

    def evaluate(delta, predictive=kp, parts_key="parts"):
        res = {}
        for name, d in data.items():
            cov = predictive.covariance(d[parts_key], delta)
            prior = d["parts"][0] / delta
            res[name] = (cov, prior, scores(d["f"], cov, prior, d["feats"], d["J"]))
        return res

    for label, delta in (("marglik", d_ml), ("val", d_val)):
        res = evaluate(delta)
        s_in = res["in"][2]
        out["auroc"][label] = {
            k: {"ood": auroc(s_in[k], res["ood"][2][k]), "noise": auroc(s_in[k], res["noise"][2][k])}
            for k in s_in
        }  # fmt: skip
        out["eigen"][label] = {n: eigen_summary(res[n][0], res[n][1], data[n]["J"]) for n in res}
    if not full:
        return out
    # δ grid
    kinds = ("logdet", "prior logdet", "logdet_softmax", "trace", "variance_ratio", "logdet_ratio", "entropy",
             "mutual_information")  # fmt: skip
    grid = sorted({d_ml, d_val, 1e-2, 1e-1, 1.0, 10.0, 1e3, 1e4})
    out["delta_grid"] = {}
    for delta in grid:
        res = evaluate(delta)
        out["delta_grid"][f"{delta:.4g}"] = {
            k: auroc(res["in"][2][k], res["ood"][2][k]) for k in kinds
        }
    # N: posteriors from the first n training inputs of a seeded permutation (same MAP)
    perm = torch.randperm(len(ds.x_train), generator=torch.Generator().manual_seed(SEED))
    out["N_grid"] = {}
    for n in (25, 100, 300, len(ds.x_train)):
        rows = (perm[:n, None] * C + torch.arange(C)).reshape(-1)
        kn = kp if n == len(ds.x_train) else KernelPredictive(jhat, rows)
        for d in data.values():
            d["parts_n"] = kn.parts(d["J"])
        for label, delta in (("marglik", d_ml), ("val", d_val)):
            res = evaluate(delta, kn, "parts_n")
            out["N_grid"][f"N={n}, δ {label}"] = {
                k: auroc(res["in"][2][k], res["ood"][2][k]) for k in kinds
            }
    return out


def oracle_check(log) -> dict:
    """A small CNN (P = 949): the code's Σ(x) against ``J (G + δI)⁻¹ Jᵀ`` from per-input
    Jacobians (torch.func.jacrev, float64), both ExactLLA forms, and the oracle's AUROCs."""
    torch.manual_seed(SEED)
    ds = load_digits_ood(seed=SEED)
    model = train_map(DigitsCNN(n_classes=C, channels=(4, 8), hidden=16),
                      ds.loader("train", 64, shuffle=True, seed=SEED), seed=SEED).double()  # fmt: skip
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)

    def jac(x):
        def f(*flat):
            return torch.func.functional_call(model, dict(zip(names, flat)), (x[None],))[0]

        parts = torch.func.jacrev(f, argnums=tuple(range(len(names))))(*params.values())
        return torch.cat([p.reshape(C, -1) for p in parts], dim=1)  # (C, P)

    def jacobians(x):
        return torch.stack([jac(xi) for xi in x.double()])

    Jt = jacobians(ds.x_train)
    with torch.no_grad():
        p = torch.softmax(model(ds.x_train.double()), -1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = torch.einsum("ncp,ncd,ndq->pq", Jt, Lam, Jt)
    out = {"P": G.shape[0]}
    loader = ds.loader("train", 128)
    sets = {"in": ds.x_test, "ood": ds.x_ood}
    Js = {k: jacobians(v) for k, v in sets.items()}
    for form in ("weight", "function"):
        la = ExactLLA(model, "classification", form=form).fit(loader)
        delta = float(la.optimize_prior_precision("marglik"))
        A = G + delta * torch.eye(G.shape[0], dtype=G.dtype)
        errs, logdet = [], {}
        for k, J in Js.items():
            oracle = J @ torch.linalg.solve(A, J.mT)
            _, cov = la.predictive_distribution(sets[k].double())
            errs.append(float((cov - oracle).norm() / oracle.norm()))
            logdet[k] = 0.5 * torch.linalg.slogdet(oracle)[1]
        out[form] = {"delta_marglik": delta, "max_rel_err": max(errs),
                     "oracle AUROC(logdet)": auroc(logdet["in"], logdet["ood"])}  # fmt: skip
        log(f"  oracle, {form} form: δ={delta:.4g}, max relative error of Σ {max(errs):.2e}, "
            f"oracle AUROC(½logdetΣ) = {out[form]['oracle AUROC(logdet)']}")  # fmt: skip
    # the null space: head directions 1⊗(φ, 1) are in G's kernel
    head = [i for i, n in enumerate(names) if n.startswith("head")]
    sizes = [params[n].numel() for n in names]
    start = sum(sizes[: head[0]])
    v = torch.zeros(G.shape[0], dtype=G.dtype)
    v[start + sizes[head[0]]:start + sizes[head[0]] + C] = 1.0  # bias += 1 for every class
    out["|G·(bias shift)|/|G|"] = float((G @ v).norm() / G.norm())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    t0, cpu0 = time.time(), time.process_time()
    results = {"demo split": study_split((0, 1, 2, 3, 4), print)}
    results["oracle"] = oracle_check(print)
    results["split 5-9"] = study_split((5, 6, 7, 8, 9), print, full=False)
    results["seconds"] = round(time.time() - t0)
    results["cpu seconds"] = round(time.process_time() - cpu0)
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
