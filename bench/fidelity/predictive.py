"""Predictive fidelity of ScaLLA against exact LLA, with and without the residual-variance term.

Setting: the digits OOD split (classes 0–4 in distribution, 5–9 held out as OOD test images,
transformed training images as context points), the DigitsCNN MAP network, ExactLLA in float64
as the reference. For each ScaLLA configuration, at the *same* δ as ExactLLA (δ chosen by
ExactLLA's validation NLL, and a fixed grid): mean predictive-variance ratio, median per-point
relative error of diag Σ, test NLL difference; then with ScaLLA's own validation-chosen δ: NLL,
ECE against MAP; OOD AUROC (predictive entropy and ½ log det Σ).

    python bench/fidelity/predictive.py --iterations 1500 --out bench/fidelity/results
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from fastlla import ExactLLA, ScaLLA, metrics
from fastlla.apps.data import load_digits_ood
from fastlla.apps.models import DigitsCNN, train_map
from fastlla.predictive import gaussian_logit_entropy, predictive_entropy, probit


def scores(mean, cov, y, mean_ood, cov_ood):
    p, p_ood = probit(mean, cov), probit(mean_ood, cov_ood)
    return {
        "nll": float(metrics.nll(p, y)),
        "acc": float(metrics.accuracy(p, y)),
        "ece": float(metrics.ece(p, y)),
        "auroc_entropy": float(metrics.auroc(predictive_entropy(p), predictive_entropy(p_ood))),
        "auroc_logdet": float(
            metrics.auroc(gaussian_logit_entropy(cov), gaussian_logit_entropy(cov_ood))
        ),
    }


def variance_fidelity(cov, cov_exact):
    v, ve = torch.diagonal(cov, dim1=1, dim2=2).double(), torch.diagonal(cov_exact, dim1=1, dim2=2)
    return {
        "var_ratio": float(v.mean() / ve.mean()),
        "var_median_rel_err": float(((v - ve).abs() / ve).median()),
        "cov_rel_err": float((cov.double() - cov_exact).norm() / cov_exact.norm()),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--n-projections", type=int, default=8)
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--deltas", default="1,10,100")
    parser.add_argument("--configs", default="old_default,default,default_context")
    parser.add_argument("--out", default="bench/fidelity/results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="predictive.json", help="result file under --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed
    torch.manual_seed(seed)
    ds = load_digits_ood(seed=seed)
    train = ds.loader("train", 64, shuffle=True, seed=seed)
    model = train_map(DigitsCNN(n_classes=ds.n_classes), train, seed=seed)
    y = ds.y_test
    with torch.no_grad():
        f_in, f_out = model(ds.x_test), model(ds.x_ood)
    zero = lambda f: torch.zeros(f.shape[0], f.shape[1], f.shape[1])  # noqa: E731
    report = {"MAP": scores(f_in, zero(f_in), y, f_out, zero(f_out))}
    print("MAP", report["MAP"])

    t0 = time.perf_counter()
    exact = ExactLLA(copy.deepcopy(model).double(), "classification")
    exact.fit(ds.loader("train", 128))
    delta_val = exact.optimize_prior_precision("gridsearch", val_loader=ds.loader("val", 256))
    print(f"ExactLLA fitted in {time.perf_counter() - t0:.0f} s; val-NLL δ = {delta_val:.4g}")
    deltas = [delta_val] + [float(d) for d in args.deltas.split(",")]
    x64, xo64 = ds.x_test.double(), ds.x_ood.double()
    exact_cov = {}
    for d in deltas:
        exact.prior_precision = d
        m, c = exact.predictive_distribution(x64)
        mo, co = exact.predictive_distribution(xo64)
        exact_cov[d] = (c, co)
        report[f"ExactLLA δ={d:.4g}"] = scores(m.float(), c.float(), y, mo.float(), co.float())
        print(f"ExactLLA δ={d:.4g}", report[f"ExactLLA δ={d:.4g}"])

    context_loader = ds.loader("context", 64, shuffle=True, seed=seed + 1)
    configs = {
        # issue-2 default: no exact last-layer block, no residual correction
        "old_default": (dict(n_features=128, last_layer=False, residual_variance=False), None,
                        [False, "jvp"]),  # fmt: skip
        # today's defaults (last_layer="auto" → exact block, residual_variance="auto" → head)
        "default": (dict(n_features=args.n_features), None, ["auto", False, "jvp"]),
        # today's defaults with context points (the block stays on; the bias acts on the rest)
        "default_context": (dict(n_features=args.n_features), context_loader,
                            ["auto", False, "jvp"]),  # fmt: skip
        # context points on a fully learned kernel (results/predictive_default_context.json)
        "nolastlayer_context": (dict(n_features=args.n_features, last_layer=False), context_loader,
                                ["auto", False, "jvp"]),  # fmt: skip
        "lastlayer_head": (
            dict(n_features=args.n_features, last_layer=True, residual_variance="head"),
            None,
            [False, "head", "jvp"],
        ),
        "lastlayer_head_context": (
            dict(n_features=args.n_features, last_layer=True, residual_variance="head"),
            context_loader,
            [False, "head", "jvp"],
        ),
    }
    for name in args.configs.split(","):
        init, context, modes = configs[name]
        la = ScaLLA(model, "classification", seed=seed, **init)
        t0 = time.perf_counter()
        la.fit(train, context_loader=context, iterations=args.iterations,
               n_projections=args.n_projections, progress_bar=False)  # fmt: skip
        fit_s = time.perf_counter() - t0
        fidelity = la.kernel_fidelity(ds.x_test[:100], method="exact")
        print(f"{name}: fitted in {fit_s:.0f} s, kernel error {fidelity:.4f}")
        for mode in modes:
            la.residual_variance = mode
            key = f"{name} residual={mode}"
            row = {"fit_s": fit_s, "kernel_error": fidelity}
            for d in deltas:
                la.prior_precision = d
                m, c = la.predictive_distribution(ds.x_test)
                mo, co = la.predictive_distribution(ds.x_ood)
                s = scores(m, c, y, mo, co)
                ref = report[f"ExactLLA δ={d:.4g}"]
                vf = variance_fidelity(c, exact_cov[d][0])
                row[f"δ={d:.4g}"] = {
                    **s, **vf,
                    "nll_rel_diff_vs_exact": (s["nll"] - ref["nll"]) / ref["nll"],
                }  # fmt: skip
            la.optimize_prior_precision("gridsearch", val_loader=ds.loader("val", 256))
            m, c = la.predictive_distribution(ds.x_test)
            mo, co = la.predictive_distribution(ds.x_ood)
            row["val_delta"] = {"delta": float(la.prior_precision), **scores(m, c, y, mo, co)}
            report[key] = row
            print(key, json.dumps(row, indent=None)[:2000])
            (out / args.name).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
