"""Offline OOD benchmark: digits in distribution; near, glyph and far OOD; context recipes.

    OMP_NUM_THREADS=1 python -m fastlla.apps.ood_bench [--iterations 300] [--out FILE.json]

In distribution: the demo's split (sklearn digits, train classes 0–4, test images of 0–4) and
its ``DigitsCNN`` MAP (seed 0). Three OOD test sets, none of them a context set or the
training data:

* ``near``: the test images of the held-out digits 5–9;
* ``letters``: Latin letters rendered at 8×8 from matplotlib's fonts
  (:func:`fastlla.apps.glyphs.render_glyphs`, letters that look like digits left out);
* ``far``: corruptions of the in-distribution *test* images unlike every context recipe —
  Gaussian noise of standard deviation 0.5 (clipped to ``[0, 1]``) and the image's four 4×4
  quadrants rotated one place.

Context recipes (inputs a ScaLLA surrogate is taught to treat as unlike the data, issue 17
part 3), each of ``N = 540`` images:

* ``corrupted``: transformed *training* images (``load_digits_ood``'s default: pixel
  permutation, inversion, uniform noise, two-class mixtures);
* ``symbols``: an auxiliary set, printable symbols (``# $ % & @ + = ...``) from the same fonts,
  repeated with one-pixel shifts to ``N``;
* ``feature outliers``: the ``N`` inputs of a pool (``corrupted`` recipes drawn 4N times)
  whose penultimate features ``φ(x)`` lie farthest from the training features (Mahalanobis
  distance under the training features' mean and covariance).

Methods: MAP (softmax), ExactLLA (float64; ``δ`` by the default workflow — the initialisation
prior, :mod:`fastlla.init_prior` —, by marginal likelihood and by validation NLL), ScaLLA without
context and with each recipe (``--iterations`` kernel-matching steps, seed 0) at ExactLLA's
validation ``δ``, at their own default-workflow ``δ`` and at their own marglik ``δ``;
then the peers:

* laplace-torch (imported lazily; its rows are skipped with a note when it is not installed):
  its default ``Laplace(model, "classification")`` (last layer, Kronecker-factored GGN) and
  ``subset_of_weights="all"`` with the same Kronecker structure, each at the ``δ`` of its
  default workflow ``optimize_prior_precision(pred_type="glm", method="marglik")`` and at its
  own validation ``δ`` (``method="gridsearch"`` on the validation split over the decades
  ``10⁻⁴ … 10⁴``). The logit Gaussian is its GLM predictive (:func:`laplace_torch_gaussian`).
* the authors' ScaLLA with context (the faithful re-implementation ``bench/suite/authors.py``,
  importable only from a source checkout): their surrogate (M = 100), batch 5 + 5 context,
  Adam lr 5e-5, the ``corrupted`` context with the training×context blocks of the kernel
  zeroed (``zero_crossed_variances``), ``--authors-iterations`` kernel-matching steps (default
  10,000: about fastlla's ScaLLA fit time at ``--iterations 1000``, the seconds of both are
  recorded; ``--authors-seconds`` stops on wall-clock instead); scored at ExactLLA's
  validation ``δ``, at the maximiser of their marginal likelihood and at their FMNIST run's
  ``δ = 1`` (:func:`authors_context_fit`, :func:`authors_gaussian`).

Every Laplace row is scored by :func:`fastlla.ood.gaussian_ood_scores` on the method's logit
mean and covariance (and prior covariance), so every kind means the same for every method.
Each row reports, per OOD set and :mod:`fastlla.ood` score kind, the AUROC and the FPR at
95% TPR (OOD the positive class: the share of in-distribution test images flagged when 95% of
the OOD images are), from ``sklearn.metrics``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch.utils.data import DataLoader, TensorDataset

from fastlla.exact import ExactLLA
from fastlla.ood import KINDS, gaussian_ood_scores, ood_scores
from fastlla.scalla import ScaLLA

from .data import load_digits_ood
from .glyphs import LETTERS, SYMBOLS, render_glyphs
from .models import DigitsCNN, keeps_global_rng, train_map

__all__ = [
    "fpr_at_tpr", "far_ood", "symbol_context", "feature_outlier_context", "laplace_torch_gaussian",
    "authors_context_fit", "authors_gaussian", "run",
]  # fmt: skip

#: the δ grid of the peers' validation search (laplace-torch's own gridsearch, 9 decades)
PEER_GRID = (-4, 4, 9)


def fpr_at_tpr(scores_in, scores_out, tpr: float = 0.95) -> float:
    """The share of in-distribution inputs scored at or above the lowest threshold that flags
    ``tpr`` of the OOD inputs (OOD the positive class, higher score = more OOD)."""
    y = np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))]
    s = np.r_[np.asarray(scores_in, dtype=np.float64), np.asarray(scores_out, dtype=np.float64)]
    fpr, tprs, _ = roc_curve(y, s)
    return float(fpr[np.searchsorted(tprs, tpr, side="left")])


def _metrics(s_in, s_out) -> dict[str, float]:
    s_in, s_out = s_in.double().cpu().numpy(), s_out.double().cpu().numpy()
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    return {"auroc": round(float(roc_auc_score(y, np.r_[s_in, s_out])), 4),
            "fpr95": round(fpr_at_tpr(s_in, s_out), 4)}  # fmt: skip


def far_ood(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Corrupted copies of images ``x`` (B, 1, 8, 8): ``x + 0.5·ε`` clipped to ``[0, 1]``,
    then ``x`` with its four 4×4 quadrants rotated one place; (2B, 1, 8, 8)."""
    g = torch.Generator().manual_seed(seed)
    noisy = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)
    q = [x[..., :4, :4], x[..., :4, 4:], x[..., 4:, 4:], x[..., 4:, :4]]  # clockwise
    rotated = torch.cat([torch.cat([q[3], q[0]], -1), torch.cat([q[2], q[1]], -1)], -2)
    return torch.cat([noisy, rotated])


def symbol_context(n: int) -> torch.Tensor:
    """``n`` symbol glyphs: :data:`~fastlla.apps.glyphs.SYMBOLS` in every bundled font, then
    the same shifted by one pixel (right, down, left, up), cycled to ``n``."""
    base = render_glyphs(SYMBOLS)
    shifted = [base] + [torch.roll(base, s, dims=d) for s, d in ((1, 3), (1, 2), (-1, 3), (-1, 2))]
    pool = torch.cat(shifted)
    return pool[torch.arange(n) % len(pool)]


def feature_outlier_context(
    model, x_train: torch.Tensor, pool: torch.Tensor, n: int
) -> torch.Tensor:
    """The ``n`` inputs of ``pool`` whose penultimate features ``model.features(x)`` have the
    largest Mahalanobis distance from the training features (ridge 1e-3 on the covariance)."""
    with torch.no_grad():
        ft, fp = model.features(x_train).double(), model.features(pool).double()
    mu = ft.mean(0)
    cov = torch.cov((ft - mu).mT) + 1e-3 * torch.eye(ft.shape[1], dtype=ft.dtype)
    d = ((fp - mu) @ torch.linalg.inv(cov) * (fp - mu)).sum(-1)
    return pool[d.argsort(descending=True)[:n]]


def _context_loader(x: torch.Tensor, seed: int) -> DataLoader:
    return DataLoader(TensorDataset(x), batch_size=64, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


def _rows(la, name, sets, kinds, n_samples=200) -> dict:
    res = {}
    scores = {k: ood_scores(la, x, kinds, n_samples=n_samples) for k, x in sets.items()}
    for ood in (k for k in sets if k != "in"):
        res[ood] = {kind: _metrics(scores["in"][kind], scores[ood][kind]) for kind in kinds}
    return res


def _gaussian_rows(gaussians: dict, kinds, n_samples: int = 200, seed: int = 0) -> dict:
    """AUROC / FPR95 rows from ``{set: (mean, cov, prior_cov)}`` by
    :func:`~fastlla.ood.gaussian_ood_scores` (the path :func:`~fastlla.ood.ood_scores` ends in)."""
    scores = {}
    for k, (mean, cov, prior) in gaussians.items():
        gen = torch.Generator(device=mean.device).manual_seed(seed)
        scores[k] = gaussian_ood_scores(mean, cov, kinds, prior_cov=prior, n_samples=n_samples,
                                        generator=gen, seed=seed)  # fmt: skip
    return {ood: {kind: _metrics(scores["in"][kind], scores[ood][kind]) for kind in kinds}
            for ood in gaussians if ood != "in"}  # fmt: skip


# --------------------------------------------------------------------------- laplace-torch


def laplace_torch_jacobians(la, x: torch.Tensor, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The network output ``f`` (B, C) and the Jacobians ``J`` (B, C, P) a fitted laplace-torch
    ``la`` uses for its GLM predictive: of the last layer for a last-layer Laplace, of all its
    parameters otherwise (by the backend call its ``_glm_predictive_distribution`` makes)."""
    from laplace.lllaplace import LLLaplace

    if isinstance(la, LLLaplace):
        jacobians = la.backend.last_layer_jacobians
    elif "asdl" in la._backend_cls.__name__.lower():
        jacobians = la.backend.functorch_jacobians
    else:
        jacobians = la.backend.jacobians
    parts = [jacobians(xb) for xb in x.split(chunk)]  # chunks bound the backend's memory
    return torch.cat([f.detach() for _, f in parts]), torch.cat([J.detach() for J, _ in parts])


def laplace_torch_gaussian(
    la, f: torch.Tensor, Js: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """laplace-torch's logit Gaussian at its current ``δ``: ``(f, Σ, Σ₀)`` with ``Σ = J Σ_post Jᵀ``
    by ``la.functional_variance`` (what ``la._glm_predictive_distribution(x)`` returns, without
    recomputing ``J`` for every ``δ``) and the prior predictive ``Σ₀ = J diag(1/δ) Jᵀ`` (``δ``
    per parameter: ``la.prior_precision_diag``). ``f, Js``: :func:`laplace_torch_jacobians`."""
    cov = la.functional_variance(Js).detach()
    inv_prior = 1.0 / la.prior_precision_diag.detach().to(Js.dtype)
    prior = torch.einsum("bcp,p,bkp->bck", Js, inv_prior, Js)
    return f, cov, prior


def _laplace_torch_rows(model, ds, sets, log) -> tuple[dict, dict]:
    """laplace-torch's last-layer and all-weights Kronecker rows (see the module docstring)."""
    try:
        from laplace import Laplace
    except ImportError:
        log("note: laplace-torch is not installed; its rows are skipped")
        return {}, {}
    rows, facts = {}, {}
    lo, hi, n = PEER_GRID
    for name, kw in (("laplace-torch last-layer kron", {}),
                     ("laplace-torch all kron", {"subset_of_weights": "all",
                                                  "hessian_structure": "kron"})):  # fmt: skip
        t0 = time.time()
        la = Laplace(copy.deepcopy(model), "classification", **kw)
        la.fit(ds.loader("train", 128))
        with warnings.catch_warnings():  # its reminder that link_approx defaults to probit
            warnings.simplefilter("ignore", UserWarning)
            la.optimize_prior_precision(pred_type="glm", method="marglik")
            d_ml = la.prior_precision.detach().clone()
            la.optimize_prior_precision(pred_type="glm", method="gridsearch",
                                        val_loader=ds.loader("val", 32), link_approx="probit",
                                        log_prior_prec_min=lo, log_prior_prec_max=hi,
                                        grid_size=n)  # fmt: skip
            d_val = la.prior_precision.detach().clone()
        jac = {k: laplace_torch_jacobians(la, x) for k, x in sets.items()}
        for label, delta in (("own marglik", d_ml), ("own val", d_val)):
            la.prior_precision = delta
            gauss = {k: laplace_torch_gaussian(la, *fj) for k, fj in jac.items()}
            rows[f"{name}, δ {label}"] = _gaussian_rows(gauss, KINDS)
        facts[f"{name} δ marglik"] = float(d_ml.mean())
        facts[f"{name} δ val"] = float(d_val.mean())
        log(f"{name}: δ marglik {float(d_ml.mean()):.4g}, δ val {float(d_val.mean()):.4g} "
            f"({time.time() - t0:.0f} s)")  # fmt: skip
    return rows, facts


# --------------------------------------------------------------------------- the authors' ScaLLA


def _authors_module():
    """``bench/suite/authors.py`` of this source checkout, or ``None`` (an installed package)."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "suite", "authors.py")
    if not os.path.isfile(path):
        return None
    name = "fastlla_bench_authors"  # loaded from its file: sys.path is left as it is
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: its dataclasses and pickling look it up
        spec.loader.exec_module(module)
    return sys.modules[name]


def authors_context_fit(model, x_train, y_train, x_context, seconds: float | None = None,
                        iterations: int = 10**9, seed: int = 0, n_features: int = 100,
                        zero_crossed_variances: bool = True):  # fmt: skip
    """The authors' ScaLLA with context points, their FMNIST settings: their surrogate
    (``n_features``), their loaders (batch 5, shuffled; context loader seeded ``seed + 1``),
    Adam lr 5e-5, weight decay 0.0, the training×context kernel blocks zeroed, ``δ = 1`` (no
    hyper-parameter step); kernel matching stops after ``iterations`` steps or ``seconds`` of
    training wall-clock. Returns the fitted ``AuthorsScaLLA`` (``steps``, ``train_seconds``).
    Raises ``ImportError`` outside a source checkout (no ``bench/suite/authors.py``)."""
    A = _authors_module()
    if A is None:
        raise ImportError("the authors' baseline bench/suite/authors.py is not in this checkout")
    surrogate = A.authors_surrogate(model, n_features, x_train[:5], seed=seed)
    la = A.AuthorsScaLLA(model, surrogate, "classification", seed=seed)
    train = A.authors_loader(x_train, y_train, 5, seed)
    context = A.authors_loader(x_context, None, 5, seed + 1)
    la.fit(iterations, train, context, zero_crossed_variances=zero_crossed_variances,
           weight_decay=0.0, lr=5e-5, optimize_hyper_parameters=False,
           time_budget=seconds)  # fmt: skip
    return la


@torch.no_grad()
def authors_gaussian(la, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' logit Gaussian at their current ``δ``: ``(f, Σ, Σ₀)``, ``f, Σ`` the diagonal
    ``C×C`` blocks of their predictive (``predictive_covariance(x, full_cross=False)``) and
    ``Σ₀ = Φ(x)ᵀ diag(1/δ) Φ(x)`` the same features under the prior alone."""
    f, cov = la.predictive_covariance(x, full_cross=False)
    phi = la.feature_model(x.to(la.device).to(la.dtype))  # (B, M, C), surrogate in eval mode
    inv_prior = 1.0 / la.prior_precision_diag.to(phi.dtype)
    return f, cov, torch.einsum("bma,m,bmc->bac", phi, inv_prior, phi)


def _authors_rows(model, ds, sets, iterations: int, seconds: float | None, d_val: float, seed: int,
                  log) -> tuple[dict, dict]:  # fmt: skip
    if _authors_module() is None:
        log("note: bench/suite/authors.py is not in this checkout; the authors' rows are skipped")
        return {}, {}
    name = "authors' ScaLLA+corrupted (zeroed cross)"
    la = authors_context_fit(model, ds.x_train, ds.y_train, ds.x_context, seconds=seconds,
                             iterations=iterations, seed=seed)  # fmt: skip
    # Their marginal likelihood, maximised: their optimize_hyper_parameters (Adam on log δ from
    # δ = 1) with lr 0.1 × 500 steps; their defaults (lr 1e-3 × 100) move log δ by at most 0.1.
    la.optimize_hyper_parameters(lr=0.1, iterations=500)
    d_ml = float(la.prior_precision)
    rows = {}
    for label, delta in (("their marglik", d_ml), ("exact val", d_val), ("1 (theirs)", 1.0)):
        la.prior_precision = delta
        rows[f"{name}, δ {label}"] = _gaussian_rows({k: authors_gaussian(la, x) for k, x in sets.items()}, KINDS)
    facts = {f"{name} steps": la.steps, f"{name} seconds": round(la.train_seconds, 1),
             f"{name} δ their marglik": d_ml}  # fmt: skip
    log(f"{name}: {la.steps} steps in {la.train_seconds:.0f} s; their marglik δ {d_ml:.4g}")
    return rows, facts


@keeps_global_rng
def run(iterations: int = 300, seed: int = 0, log=print, authors_iterations: int = 10_000,
        authors_seconds: float | None = None, peers: bool = True, only_peers: bool = False,
        exact_val_delta: float = 100.0) -> dict:
    """The benchmark; returns ``{method: {ood set: {kind: {"auroc", "fpr95"}}}}`` and facts."""
    t0 = time.time()
    torch.manual_seed(seed)
    ds = load_digits_ood(seed=seed)
    train = ds.loader("train", 64, shuffle=True, seed=seed)
    model = train_map(DigitsCNN(n_classes=ds.n_classes), train, seed=seed)
    sets = {"in": ds.x_test, "near": ds.x_ood, "letters": render_glyphs(LETTERS),
            "far": far_ood(ds.x_test, seed)}  # fmt: skip
    N = len(ds.x_train)
    from .data import _transformed_context

    pool = torch.from_numpy(_transformed_context(ds.x_train.numpy(), ds.y_train.numpy(), 4 * N,
                                                 seed + 1))  # fmt: skip
    contexts = {"corrupted": ds.x_context, "symbols": symbol_context(N),
                "feature outliers": feature_outlier_context(model, ds.x_train, pool, N)}  # fmt: skip
    log(f"sets: {', '.join(f'{k} {len(v)}' for k, v in sets.items())}; contexts of {N}")
    out: dict = {"methods": {}, "facts": {}}
    with torch.no_grad():
        p = {k: torch.softmax(model(x), -1) for k, x in sets.items()}
    map_scores = {k: {"entropy": -torch.special.xlogy(v, v).sum(-1),
                      "max_probability": 1 - v.max(-1).values} for k, v in p.items()}  # fmt: skip
    out["methods"]["MAP"] = {
        ood: {kind: _metrics(map_scores["in"][kind], map_scores[ood][kind]) for kind in map_scores["in"]}
        for ood in sets if ood != "in"
    }  # fmt: skip
    if only_peers:  # the peers' rows alone (the authors' "exact val" row at exact_val_delta)
        rows, facts = _laplace_torch_rows(model, ds, sets, log)
        out["methods"].update(rows)
        out["facts"].update(facts)
        rows, facts = _authors_rows(model, ds, sets, authors_iterations, authors_seconds,
                                    exact_val_delta, seed, log)  # fmt: skip
        out["methods"].update(rows)
        out["facts"].update(facts)
        out["facts"]["seconds"] = round(time.time() - t0)
        return out
    exact = ExactLLA(copy.deepcopy(model).double(), "classification").fit(ds.loader("train", 128))
    sets64 = {k: v.double() for k, v in sets.items()}
    d_init = float(exact.optimize_prior_precision())  # the default workflow
    d_ml = float(exact.optimize_prior_precision("marglik"))
    d_val = float(exact.optimize_prior_precision("gridsearch", val_loader=ds.loader("val", 256)))
    out["facts"].update(delta_init=d_init, delta_marglik=d_ml, delta_val=d_val)
    log(f"ExactLLA: δ init (default) {d_init:.4g}, δ marglik {d_ml:.4g}, δ val {d_val:.4g}")
    for label, delta in (("init (default)", d_init), ("marglik", d_ml), ("val", d_val)):
        exact.prior_precision = delta
        out["methods"][f"ExactLLA, δ {label}"] = _rows(exact, "exact", sets64, KINDS)
    for name, ctx in (("ScaLLA", None), *((f"ScaLLA+{k}", v) for k, v in contexts.items())):
        la = ScaLLA(model, "classification", n_features=128, prior_precision=d_val, seed=seed)
        loader = None if ctx is None else _context_loader(ctx, seed + 1)
        t_fit = time.perf_counter()
        la.fit(train, context_loader=loader, iterations=iterations, progress_bar=False)
        out["facts"][f"{name} fit seconds"] = round(time.perf_counter() - t_fit, 1)
        out["methods"][f"{name}, δ exact val"] = _rows(la, name, sets, KINDS)
        la.optimize_prior_precision()
        out["methods"][f"{name}, δ init (default)"] = _rows(la, name, sets, KINDS)
        own = float(la.optimize_prior_precision("marglik"))
        out["methods"][f"{name}, δ own marglik"] = _rows(la, name, sets, KINDS)
        out["facts"][f"{name} own marglik δ"] = own
        log(f"{name}: own marglik δ {own:.4g} ({time.time() - t0:.0f} s so far)")
    if peers:
        rows, facts = _laplace_torch_rows(model, ds, sets, log)
        out["methods"].update(rows)
        out["facts"].update(facts)
        rows, facts = _authors_rows(model, ds, sets, authors_iterations, authors_seconds, d_val,
                                    seed, log)  # fmt: skip
        out["methods"].update(rows)
        out["facts"].update(facts)
    out["facts"]["seconds"] = round(time.time() - t0)
    return out


def format_tables(out: dict, metric: str = "auroc") -> str:
    """One table per OOD set: rows the methods, columns the score kinds."""
    lines = []
    kinds = list(KINDS)
    short = {"entropy": "H", "max_probability": "1-maxp", "mutual_information": "MI",
             "logdet": "logdet", "logdet_softmax": "logdet⊥1", "variance_ratio": "var ratio",
             "logdet_ratio": "logdet ratio"}  # fmt: skip
    for ood in ("near", "letters", "far"):
        lines.append(f"\n{metric.upper()}, OOD = {ood}")
        lines.append(f"{'method':58s}" + "".join(f"{short[k]:>13s}" for k in kinds))
        for method, res in out["methods"].items():
            cells = [res[ood][k][metric] if k in res[ood] else None for k in kinds]
            lines.append(f"{method:58s}" + "".join(
                f"{'-':>13s}" if c is None else f"{c:13.3f}" for c in cells))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--authors-iterations", type=int, default=10_000,
                        help="the authors' kernel-matching steps")
    parser.add_argument("--authors-seconds", type=float, default=None,
                        help="stop the authors' kernel matching after this many seconds")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip the laplace-torch and authors' rows")
    parser.add_argument("--only-peers", action="store_true",
                        help="MAP and the laplace-torch and authors' rows only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = run(args.iterations, args.seed, authors_iterations=args.authors_iterations,
              authors_seconds=args.authors_seconds, peers=not args.no_peers,
              only_peers=args.only_peers)
    print(format_tables(out, "auroc"))
    print(format_tables(out, "fpr95"))
    print(json.dumps(out["facts"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
