"""Second study of issue 15: a prior for the directions the data never constrained.

The first study (``docs/calibration.md``) found that most of the test inputs' predictive variance
comes from the GGN's null space, whose prior scale the evidence cannot see. This script scores
covariances that treat that space separately, each chosen from the training data alone (exact
LLA in float64, exact Jacobians, same networks as ``evidence_study.py``):

* ``antoran`` — scalar ``δ`` maximising Antorán et al.'s linear-mode evidence (reference);
* ``range only`` — ``Σ = Σₖ uₖuₖᵀ/(λₖ+δ_a)``: the GGN's range (eigenvectors ``uₖ`` of the
  training GGN with ``λₖ > 10⁻¹²·λ_max``) at antoran's ``δ_a``, no variance from its null space
  (null-space precision ``δ₀ = ∞``);
* ``init prior`` — ``Σ = (G + D)⁻¹`` with ``D = diag(δ_l)`` per parameter tensor, ``δ_l = 1/E[θ²]``
  under the network's own initialisation (measured by drawing fresh networks from the same
  constructor; PyTorch's default Linear/Conv2d init gives ``3·fan_in`` for weights and biases);
* ``range + init null`` — the range part of ``range only`` plus ``P₀ D⁻¹ P₀`` (``P₀ = I − UUᵀ``,
  the null-space projector): the initialisation prior where the data said nothing;
* ``antoran·init`` — ``Σ = (G + αD)⁻¹``: antoran's evidence in the coordinates whitened by the
  initialisation prior (``θ' = D^{1/2}θ``) chooses one scale ``α``; the per-tensor ratios are
  the initialisation's;
* ``range antoran·init + init null`` — the same ``α·D`` on the range of the whitened GGN, the
  initialisation prior ``D`` (``α = 1``) on its null space;
* ``5-fold CV`` — ``δ`` maximising the 5-fold cross-validated probit log-likelihood of the
  linearised model ``g(x) = f(x) + J(x)(θ − θ*)`` with prior ``θ ~ N(0, δ⁻¹I)`` (a GP with mean
  ``f − Jθ*`` and kernel ``JJᵀ/δ``): on each fold its Laplace posterior is refitted from the other
  folds (Newton to the mode, Rasmussen & Williams Alg. 3.3 with the multi-class softmax Hessian),
  no retraining of the network; the test predictive is then ExactLLA's at that ``δ``.

Test NLL / ECE (15 bins) / OOD AUROC (predictive entropy) for each, with MAP and the
validation-NLL ``δ`` for reference. The function-space predictive used here is checked against
``ExactLLA`` at ``D = δ_a·I``.

    python bench/calibration/null_space_prior.py [wine breast_cancer digits_ood] [--no-cv]
    python bench/calibration/null_space_prior.py digits --init-only   # ten-class digits CNN
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from evidence_study import (  # noqa: E402
    GRID, jacobians, load, network, psd_sqrt, scores, softmax_hessian, trained_exact,
)  # fmt: skip

from fastlla import metrics as M  # noqa: E402
from fastlla.predictive import class_probabilities  # noqa: E402

N_INIT_DRAWS = 256
N_FOLDS = 5


def init_precision(build, n_draws: int = N_INIT_DRAWS) -> tuple[torch.Tensor, list[str]]:
    """Prior precision ``1/E[θ²]`` of each parameter tensor under the network's initialisation,
    from ``n_draws`` fresh networks (forked RNG), float64, one per tensor in
    ``parameters()`` order; and one line per tensor comparing it with ``3·fan_in`` (PyTorch's
    default Linear/Conv2d init)."""
    with torch.random.fork_rng():
        torch.manual_seed(12345)
        draws = [[q.detach().double().reshape(-1) for q in build().parameters()]
                 for _ in range(n_draws)]  # fmt: skip
    prec, lines = [], []
    fan_in = None
    for k, q in enumerate(build().parameters()):
        second = torch.stack([d[k] for d in draws]).square().mean()
        prec.append(float(1 / second))
        if q.dim() > 1:
            fan_in = int(np.prod(q.shape[1:]))
        lines.append(f"{tuple(q.shape)}: 1/E[θ²] = {float(1 / second):.4g}, "
                     f"3·fan_in = {3 * fan_in}")
    return torch.tensor(prec, dtype=torch.float64), lines


def cov_prior(Jx: torch.Tensor, A: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``J(x)(AᵀA + diag d)⁻¹J(x)ᵀ`` (n, C, C) by the Woodbury identity in function space."""
    JD = Jx / d
    KxA = JD @ A.T  # (n, C, NC)
    L = torch.linalg.cholesky(torch.eye(len(A), dtype=A.dtype) + (A / d) @ A.T)
    V = torch.cholesky_solve(KxA.reshape(-1, len(A)).T, L).T.reshape(KxA.shape)
    G = torch.einsum("ncp,ndp->ncd", JD, Jx) - torch.einsum("ncm,ndm->ncd", KxA, V)
    return 0.5 * (G + G.mT)


def metrics(pt, yt, po) -> dict[str, float]:
    ent = lambda p: -(p * p.clamp_min(1e-300).log()).sum(-1)  # noqa: E731
    out = {"nll": M.nll(pt, yt), "ece": M.ece(pt, yt)}
    if po is not None:
        out["auroc"] = M.auroc(ent(pt), ent(po))
    return out


def _blocks(Rb: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Block-diagonal ``(n, C, C)`` times ``(n·C,)`` vector, as ``(n·C,)``."""
    return (Rb @ v.reshape(Rb.shape[0], -1, 1)).reshape(-1)


def cv_delta(J, f, y, theta, seed: int = 0) -> tuple[float, dict[float, float]]:
    """``δ`` maximising the K-fold CV probit log-likelihood of the linearised model with prior
    ``N(0, δ⁻¹I)`` (GP mean ``f − Jθ*``, kernel ``JJᵀ/δ``), Laplace posterior per fold (Newton
    to the mode from the prior mean, the largest ``δ`` first, each fold warm-started from the
    previous ``δ``'s mode)."""
    N, C, P = J.shape
    Jf = J.reshape(N * C, P)
    K0 = (Jf @ Jf.T).reshape(N, C, N, C)
    m = f - (J @ theta)
    Y = torch.nn.functional.one_hot(y, C).double()
    folds = np.array_split(np.random.default_rng(seed).permutation(N), N_FOLDS)
    curve: dict[float, float] = {}
    modes: dict[int, torch.Tensor] = {}
    for d in sorted(GRID, reverse=True):
        total = 0.0
        for k in range(N_FOLDS):
            out = torch.as_tensor(folds[k])
            inn = torch.as_tensor(np.concatenate([folds[j] for j in range(N_FOLDS) if j != k]))
            n, n_out = len(inn), len(out)
            K4 = K0[inn][:, :, inn] / d
            K = K4.reshape(n * C, n * C)
            eye = torch.eye(n * C, dtype=torch.float64)
            g = modes.get(k, m[inn].clone())
            for it in range(200):
                p = torch.softmax(g, -1)
                Lb = softmax_hessian(p)
                Rb = psd_sqrt(Lb)
                RKR = torch.einsum("icd,idje,jef->icjf", Rb, K4, Rb).reshape(n * C, n * C)
                L = torch.linalg.cholesky(eye + RKR)
                b = _blocks(Lb, (g - m[inn]).reshape(-1)) + (Y[inn] - p).reshape(-1)
                a = b - _blocks(Rb, torch.cholesky_solve(_blocks(Rb, K @ b)[:, None], L)[:, 0])
                g_new = m[inn] + (K @ a).reshape(n, C)
                step = float((g_new - g).abs().max())
                g = g_new
                if step < 1e-8:
                    break
            else:
                print(f"warning: Newton did not converge (δ = {d:.3g}, fold {k}, "
                      f"last step {step:.2g})")
            modes[k] = g
            p = torch.softmax(g, -1)
            Rb = psd_sqrt(softmax_hessian(p))
            RKR = torch.einsum("icd,idje,jef->icjf", Rb, K4, Rb).reshape(n * C, n * C)
            L = torch.linalg.cholesky(eye + RKR)
            Ks = K0[out][:, :, inn].reshape(n_out * C, n * C) / d
            mean = m[out] + (Ks @ (Y[inn] - p).reshape(-1)).reshape(n_out, C)
            RKs = (Rb @ Ks.T.reshape(n, C, -1)).reshape(n * C, -1)
            V = (Rb @ torch.cholesky_solve(RKs, L).reshape(n, C, -1)).reshape(n * C, -1)
            Kss = K0[out][:, :, out].diagonal(dim1=0, dim2=2).permute(2, 0, 1) / d
            cov = Kss - torch.einsum(
                "ncm,mnd->ncd", Ks.reshape(n_out, C, -1), V.reshape(-1, n_out, C)
            )
            probs = class_probabilities(mean, 0.5 * (cov + cov.mT), "probit")
            total += float(probs.gather(1, y[out][:, None]).clamp_min(1e-300).log().sum())
        curve[d] = total
    curve = dict(sorted(curve.items()))
    return max(curve, key=curve.get), curve


def study(name: str, ds, weight_decay: float, cv: bool, seed: int = 0) -> list[tuple]:
    model, la = trained_exact(name, ds, weight_decay, seed)
    with torch.no_grad():
        p_map = torch.softmax(model(ds.x_test.double()), -1)
        p_map_ood = torch.softmax(model(ds.x_ood.double()), -1) if ds.x_ood is not None else None
    rows = [("MAP", "∞", metrics(p_map, ds.y_test, p_map_ood))]
    d_val = la.optimize_prior_precision("gridsearch", val_loader=ds.loader("val", 256))
    rows.append(("validation NLL", f"{d_val:.3g}", scores(la, ds)))

    J, f = jacobians(la, ds.x_train)
    y = ds.y_train
    N, C, P = J.shape
    Lam = softmax_hessian(torch.softmax(f, -1))
    A = (psd_sqrt(Lam) @ J).reshape(N * C, P)
    S, Uf = torch.linalg.eigh(A @ A.T)
    keep = S > S.max().clamp_min(0) * 1e-12
    Sk = S[keep]
    U = A.T @ (Uf[:, keep] / Sk.sqrt())  # (P, r) orthonormal basis of the GGN's range
    theta = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    c = U.T @ theta
    loglik = float(torch.log_softmax(f, -1).gather(1, y[:, None]).sum())
    antoran = {d: loglik - 0.5 * float((d * Sk / (Sk + d) * c**2).sum())
               - 0.5 * float(torch.log1p(Sk / d).sum()) for d in GRID}  # fmt: skip
    d_a = max(antoran, key=antoran.get)
    print(f"(P = {P}, N·C = {N * C}, GGN rank {int(keep.sum())}; antoran δ = {d_a:.3g})")
    d_layers, lines = init_precision(lambda: network(name, ds))
    numels = torch.tensor([q.numel() for q in model.parameters()])
    d_init = torch.repeat_interleave(d_layers, numels)
    print("init prior per tensor: " + "; ".join(lines))
    # the same evidence in coordinates whitened by the init prior (θ' = D₀^{1/2}θ): one scale α
    # for the prior α·D₀, per-layer ratios from the initialisation
    w = d_init.sqrt()
    Aw = A / w
    Sw, Ufw = torch.linalg.eigh(Aw @ Aw.T)
    keep_w = Sw > Sw.max().clamp_min(0) * 1e-12
    Skw = Sw[keep_w]
    Uw = Aw.T @ (Ufw[:, keep_w] / Skw.sqrt())
    cw = Uw.T @ (theta * w)
    antoran_w = {d: loglik - 0.5 * float((d * Skw / (Skw + d) * cw**2).sum())
                 - 0.5 * float(torch.log1p(Skw / d).sum()) for d in GRID}  # fmt: skip
    alpha = max(antoran_w, key=antoran_w.get)
    print(f"(antoran in init-whitened coordinates: α = {alpha:.3g})")
    del Aw, Ufw

    sets = {"test": ds.x_test}
    if ds.x_ood is not None:
        sets["ood"] = ds.x_ood
    parts = {}
    for key, x in sets.items():
        Jx, fx = jacobians(la, x)
        JU = Jx @ U  # (n, C, r)
        rng = torch.einsum("nck,k,ndk->ncd", JU, 1 / (Sk + d_a), JU)
        B = Jx - JU @ U.T  # J(x)P₀
        null_init = torch.einsum("ncp,p,ndp->ncd", B, 1 / d_init, B)
        Jw = Jx / w
        JUw = Jw @ Uw
        rng_w = torch.einsum("nck,k,ndk->ncd", JUw, 1 / (Skw + alpha), JUw)
        null_w = Jw @ Jw.mT - JUw @ JUw.mT
        parts[key] = {
            "fx": fx,
            "check": cov_prior(Jx, A, torch.full((P,), d_a, dtype=torch.float64)),
            "range only": rng,
            "init prior": cov_prior(Jx, A, d_init),
            "range + init null": rng + null_init,
            "antoran·init": cov_prior(Jx, A, alpha * d_init),
            "range antoran·init + init null": rng_w + 0.5 * (null_w + null_w.mT),
        }
        del Jw, JUw
        del Jx, B
    la.prior_precision = d_a
    ref = la(ds.x_test.double())
    mine = class_probabilities(parts["test"]["fx"], parts["test"]["check"], "probit")
    err = float((ref - mine).abs().max())
    print(f"(function-space predictive vs ExactLLA at δ = {d_a:.3g}: max |Δp| = {err:.2e})")
    if err > 1e-8:
        raise RuntimeError("the function-space predictive does not reproduce ExactLLA")
    rows.append(("antoran", f"{d_a:.3g}", scores(la, ds)))
    la.prior_precision = d_layers  # ExactLLA's own per-layer prior: must give the same predictive
    mine = class_probabilities(parts["test"]["fx"], parts["test"]["init prior"], "probit")
    err = float((la(ds.x_test.double()) - mine).abs().max())
    print(f"(ExactLLA with the per-layer init prior vs the function-space predictive: "
          f"max |Δp| = {err:.2e})")
    if err > 1e-8:
        raise RuntimeError("the per-layer prior's predictive does not reproduce ExactLLA's")
    labels = {
        "range only": f"{d_a:.3g} / ∞",
        "init prior": "δ_l",
        "range + init null": f"{d_a:.3g} / δ_l",
        "antoran·init": f"{alpha:.3g}·δ_l",
        "range antoran·init + init null": f"{alpha:.3g}·δ_l / δ_l",
    }
    for key, label in labels.items():
        pt = class_probabilities(parts["test"]["fx"], parts["test"][key], "probit")
        po = (class_probabilities(parts["ood"]["fx"], parts["ood"][key], "probit")
              if "ood" in parts else None)  # fmt: skip
        rows.append((key, label, metrics(pt, ds.y_test, po)))
    if cv:
        d_cv, curve = cv_delta(J, f, y, theta, seed)
        print("CV log-lik: " + " ".join(f"{d:.3g}:{v:.1f}" for d, v in curve.items()))
        la.prior_precision = d_cv
        rows.append((f"{N_FOLDS}-fold CV", f"{d_cv:.3g}", scores(la, ds)))
    return rows


def init_only(name: str, ds, weight_decay: float, seed: int = 0) -> list[tuple]:
    """MAP and ExactLLA with the per-layer initialisation prior only (for sets too large for the
    function-space study, e.g. ten-class digits: N·C = 10780)."""
    model, la = trained_exact(name, ds, weight_decay, seed)
    with torch.no_grad():
        p_map = torch.softmax(model(ds.x_test.double()), -1)
        p_map_ood = torch.softmax(model(ds.x_ood.double()), -1) if ds.x_ood is not None else None
    d_layers, lines = init_precision(lambda: network(name, ds))
    print("init prior per tensor: " + "; ".join(lines))
    la.prior_precision = d_layers
    return [
        ("MAP", "∞", metrics(p_map, ds.y_test, p_map_ood)),
        ("init prior", "δ_l", scores(la, ds)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="*", default=["wine", "breast_cancer", "digits_ood"])
    parser.add_argument("--no-cv", action="store_true", help="skip the K-fold CV criterion")
    parser.add_argument("--init-only", action="store_true", help="MAP and the init prior only")
    parser.add_argument("--wd", type=float, nargs="*", default=[1e-4, 0.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.data:
        ds = load(name)
        for wd in args.wd:
            print(f"\n### {name}, weight decay {wd:g} (N = {len(ds.x_train)})\n", flush=True)
            if args.init_only:
                rows = init_only(name, ds, wd)
            else:
                rows = study(name, ds, wd, cv=not args.no_cv)
            print("| criterion | δ (range / null) | test NLL | ECE | OOD AUROC |")
            print("|---|---|---|---|---|")
            for key, d, s in rows:
                auroc = f"{s['auroc']:.3f}" if "auroc" in s else "–"
                print(f"| {key} | {d} | {s['nll']:.4f} | {s['ece']:.4f} | {auroc} |", flush=True)


if __name__ == "__main__":
    main()
