"""The main job: MAP vs exact LLA vs ScaLLA on bundled real data, in one table and one plot.

``python -m fastlla demo`` trains a small CNN on the digits classes 0–4 (scikit-learn's bundled
8×8 digits), holds the classes 5–9 out as out-of-distribution (OOD) inputs, and compares

* MAP (the network's softmax),
* ExactLLA (full Jacobians; ``δ`` chosen by its marginal likelihood),
* ScaLLA (surrogate kernel learned from JVPs) at the same ``δ``,
* ScaLLA with context points (transformed training images, never the OOD test images),

on NLL, accuracy, ECE, Brier, OOD AUROC (predictive entropy and Gaussian logit entropy), kernel
fidelity, fit time, predict time and peak fit memory — first all at exact LLA's ``δ``, then each
method at its own ``δ`` chosen by marginal likelihood and by validation NLL, then one OOD table:
the AUROC of :func:`fastlla.ood_score`'s ``"entropy"`` (the default kind) and
``"variance_ratio"`` (the kind for estimators fitted with context points, ``docs/ood.md``) on
the held-out digits and on corrupted test images (:func:`fastlla.apps.ood_bench.far_ood`). The
per-method ``δ`` comparison follows on the diabetes regression and, with ``all_classes``
(``--all-classes``), on all ten digit classes.
It then fits a 1-D regression with a gap in its inputs and draws the predictive bands of MAP,
ExactLLA and ScaLLA side by side.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from fastlla import metrics
from fastlla.exact import ExactLLA
from fastlla.ood import ood_scores
from fastlla.predictive import gaussian_logit_entropy, predictive_entropy, probit
from fastlla.scalla import ScaLLA

from .data import load_diabetes_split, load_digits_ood, load_digits_split, make_gap_regression
from .measure import measure
from .ood_bench import far_ood
from .models import MLP, DigitsCNN, keeps_global_rng, train_map

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    """Knobs of the demo; the defaults run in about 4 minutes on 2 quiet CPU cores.

    ``iterations="auto"`` trains each surrogate for ``time_budget`` seconds (the step count it
    reached is printed); an int fixes the number of steps instead.
    """

    seed: int = 0
    n_features: int = 128
    iterations: int | str = "auto"
    time_budget: float = 60.0
    n_projections: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    regression_iterations: int | str = "auto"
    regression_time_budget: float = 20.0
    all_classes: bool = False  # add the ten-class digits table (about 5 more minutes)
    out_dir: str = "."
    progress_bar: bool = True


@dataclass
class Row:
    method: str
    values: dict[str, Any] = field(default_factory=dict)


COLUMNS = [
    ("nll", "NLL", "{:.4f}"),
    ("acc", "acc", "{:.4f}"),
    ("ece", "ECE", "{:.4f}"),
    ("brier", "Brier", "{:.4f}"),
    ("auroc_entropy", "AUROC(H)", "{:.4f}"),
    ("auroc_logit", "AUROC(logdetΣ)", "{:.4f}"),
    ("cov_rel_err", "cov err vs exact", "{:.3f}"),
    ("fidelity", "kernel err", "{:.4f}"),
    ("fit_s", "fit s", "{:.1f}"),
    ("predict_s", "predict s", "{:.3f}"),
    ("peak_mib", "fit ΔRSS MiB", "{:.0f}"),
]


def format_table(rows: list[Row], columns=COLUMNS) -> str:
    """A plain-text table; missing values print as ``-``."""
    header = ["method"] + [title for _, title, _ in columns]
    lines = [header]
    for row in rows:
        cells = [row.method]
        for key, _, fmt in columns:
            value = row.values.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for k, line in enumerate(lines):
        out.append("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


DELTA_COLUMNS = [("delta", "δ", "{:.3g}")] + [c for c in COLUMNS if c[0] in (
    "nll", "acc", "ece", "brier", "auroc_entropy", "auroc_logit")]


def _classification_scores(probs_in, probs_out, y, cov_in=None, cov_out=None) -> dict[str, float]:
    """NLL, accuracy, ECE, Brier; OOD AUROCs when there are OOD inputs (``probs_out``)."""
    values = {
        "nll": metrics.nll(probs_in, y),
        "acc": metrics.accuracy(probs_in, y),
        "ece": metrics.ece(probs_in, y),
        "brier": metrics.brier(probs_in, y),
    }
    if probs_out is None:
        return values
    entropy_in, entropy_out = predictive_entropy(probs_in), predictive_entropy(probs_out)
    values["auroc_entropy"] = metrics.auroc(entropy_in, entropy_out)
    if cov_in is not None:
        values["auroc_logit"] = metrics.auroc(
            gaussian_logit_entropy(cov_in), gaussian_logit_entropy(cov_out)
        )
    return values


def _evaluate(la, x_test, x_ood) -> tuple[dict[str, Any], torch.Tensor]:
    with measure() as t:
        mean_in, cov_in = la.predictive_distribution(x_test)
        mean_out, cov_out = la.predictive_distribution(x_ood)
    return {
        "probs_in": probit(mean_in, cov_in),
        "probs_out": probit(mean_out, cov_out),
        "cov_in": cov_in,
        "cov_out": cov_out,
        "predict_s": t.seconds,
    }, cov_in


#: the OOD table's score kinds (:mod:`fastlla.ood`) and OOD sets
OOD_KINDS = ("entropy", "variance_ratio")
OOD_SETS = ("near", "far")
OOD_COLUMNS = [("delta", "δ", "{:.3g}")] + [
    (f"ood_{kind}_{ood}", f"{ood}: {title}", "{:.3f}")
    for ood in OOD_SETS for kind, title in zip(OOD_KINDS, ("H", "var ratio"))
]  # fmt: skip


def ood_aurocs(la, x_in, oods: dict[str, Any]) -> dict[str, float]:
    """``{"ood_<kind>_<set>": AUROC}`` of :func:`fastlla.ood.ood_scores` (kinds
    :data:`OOD_KINDS`) of ``la`` at its current ``δ``, in-distribution inputs ``x_in`` against
    each OOD set of ``oods`` (name → inputs)."""
    s_in = ood_scores(la, x_in, OOD_KINDS)
    out = {}
    for name, x in oods.items():
        s_out = ood_scores(la, x, OOD_KINDS)
        out.update({f"ood_{k}_{name}": metrics.auroc(s_in[k], s_out[k]) for k in OOD_KINDS})
    return out


def _laplace_scores(la, x_test, y_test, x_ood=None, oods=None) -> dict[str, float]:
    """The classification scores of a Laplace method at its current ``δ`` (probit link), and
    :func:`ood_aurocs` against ``oods`` when given."""
    mean, cov = la.predictive_distribution(x_test)
    probs_out = cov_out = None
    if x_ood is not None:
        mean_out, cov_out = la.predictive_distribution(x_ood)
        probs_out = probit(mean_out, cov_out)
    values = _classification_scores(probit(mean, cov), probs_out, y_test, cov, cov_out)
    return values if oods is None else {**values, **ood_aurocs(la, x_test, oods)}


def _own_deltas(la, val_loader, regression: bool = False, grid=None) -> dict[str, float]:
    """The method's own ``δ`` by the default workflow (the initialisation prior), by marginal
    likelihood (with ``σ`` for regression; the ``σ`` kept after) and by validation NLL over
    ``grid``, label → ``δ``."""
    init = la.optimize_prior_precision("init")
    marglik = la.optimize_prior_precision("marglik", optimize_sigma_noise=regression)
    val = la.optimize_prior_precision("gridsearch", val_loader=val_loader, grid=grid)
    return {"init (default)": init, "marglik": marglik, "val NLL": val}


def _rows_per_delta(name: str, la, deltas: dict[str, float], score) -> list[Row]:
    """One row per ``δ`` choice: ``score(la)`` with ``la.prior_precision`` set to it."""
    rows = []
    for label, delta in deltas.items():
        la.prior_precision = delta
        rows.append(Row(f"{name}, δ by {label}", {"delta": delta, **score(la)}))
    return rows


def _fit_scalla(name: str, model, cfg: DemoConfig, train, context, delta: float, log):
    """A classification ScaLLA fitted with the demo's settings, and its ``measure`` record."""
    la = ScaLLA(model, "classification", n_features=cfg.n_features, prior_precision=delta,
                seed=cfg.seed)  # fmt: skip
    with measure() as fit:
        la.fit(train, context_loader=context, iterations=cfg.iterations,
               time_budget=cfg.time_budget, n_projections=cfg.n_projections, lr=cfg.lr,
               progress_bar=cfg.progress_bar)  # fmt: skip
    log(f"{name}: {len(la.history)} kernel-matching steps, M = {la.n_features} features "
        f"(last_layer={la.last_layer!r}, residual variance: {la.residual_mode or 'off'})")  # fmt: skip
    return la, fit


@keeps_global_rng
def classification_demo(
    cfg: DemoConfig, log=print
) -> tuple[list[Row], list[Row], list[Row], dict[str, Any]]:
    """The digits OOD comparison: rows at exact LLA's validation ``δ``, rows at each method's own
    ``δ`` choices, the OOD table's rows (MAP, then the same methods and ``δ``; columns
    :data:`OOD_COLUMNS`), and extra facts for the report."""
    torch.manual_seed(cfg.seed)
    ds = load_digits_ood(seed=cfg.seed)
    train = ds.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
    log(f"digits OOD split: {len(ds.x_train)} train, {len(ds.x_test)} test, "
        f"{len(ds.x_ood)} OOD, {len(ds.x_context)} context inputs")  # fmt: skip
    with measure() as t_map:
        model = train_map(DigitsCNN(n_classes=ds.n_classes), train, seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"MAP CNN: {n_params} parameters, trained in {t_map.seconds:.1f} s")
    rows = []
    with measure() as t:
        with torch.no_grad():
            p_in, p_out = torch.softmax(model(ds.x_test), -1), torch.softmax(model(ds.x_ood), -1)
    rows.append(Row("MAP", {**_classification_scores(p_in, p_out, ds.y_test), "predict_s": t.seconds}))
    oods = {"near": ds.x_ood, "far": far_ood(ds.x_test, cfg.seed)}
    oods64 = {k: v.double() for k, v in oods.items()}
    with torch.no_grad():
        p_far = torch.softmax(model(oods["far"]), -1)
    map_ood = {"ood_entropy_near": rows[0].values["auroc_entropy"],
               "ood_entropy_far": metrics.auroc(predictive_entropy(p_in), predictive_entropy(p_far))}  # fmt: skip

    # Exact LLA in float64 on a copy: it is the reference the others are compared with.
    exact_model = copy.deepcopy(model).double()
    x_test64, x_ood64 = ds.x_test.double(), ds.x_ood.double()
    exact = ExactLLA(exact_model, "classification")
    with measure() as fit:
        exact.fit(ds.loader("train", 128))
        delta_init = exact.optimize_prior_precision()  # the default workflow
        delta_marglik = exact.optimize_prior_precision("marglik")
        # Exact LLA's marglik δ is known to be far too small for such networks (underconfident
        # predictions); the comparison uses the δ minimising exact LLA's validation NLL.
        val = ds.loader("val", 256)
        delta = exact.optimize_prior_precision("gridsearch", val_loader=val)
    ev, cov_exact = _evaluate(exact, x_test64, x_ood64)
    exact_scores = _classification_scores(
        ev["probs_in"], ev["probs_out"], ds.y_test, ev["cov_in"], ev["cov_out"])
    rows.append(Row("ExactLLA", {
        **exact_scores, "fit_s": fit.seconds, "predict_s": ev["predict_s"], "peak_mib": fit.peak_mib,
    }))  # fmt: skip
    log(f"ExactLLA ({exact.fitted_form} space): prior precision δ = {delta_marglik:.4g} by "
        f"marglik, {delta:.4g} by validation NLL (used below)")  # fmt: skip

    facts: dict[str, Any] = {"delta": delta, "delta_marglik": delta_marglik, "n_params": n_params, "map_seconds": t_map.seconds}
    # exact LLA at its validation δ is the row above; the other choices need a new pass
    delta_rows = _rows_per_delta(
        "ExactLLA", exact, {"init (default)": delta_init, "marglik": delta_marglik},
        lambda la: _laplace_scores(la, x_test64, ds.y_test, x_ood64, oods64))
    exact.prior_precision = delta
    delta_rows.append(Row("ExactLLA, δ by val NLL", {
        "delta": delta, **exact_scores, **ood_aurocs(exact, x_test64, oods64)}))  # fmt: skip
    for name, context in (("ScaLLA", None), ("ScaLLA+context", ds.loader("context", cfg.batch_size, shuffle=True, seed=cfg.seed + 1))):  # noqa: E501
        la, fit = _fit_scalla(name, model, cfg, train, context, delta, log)
        ev, cov = _evaluate(la, ds.x_test, ds.x_ood)
        fidelity = la.kernel_fidelity(ds.x_test[:100], method="exact")
        cov_err = float((cov.double() - cov_exact).norm() / cov_exact.norm())
        var_ratio = float(torch.diagonal(cov, dim1=1, dim2=2).mean() / torch.diagonal(cov_exact, dim1=1, dim2=2).mean())
        rows.append(Row(name, {
            **_classification_scores(ev["probs_in"], ev["probs_out"], ds.y_test, ev["cov_in"], ev["cov_out"]),
            "cov_rel_err": cov_err, "fidelity": fidelity,
            "fit_s": fit.seconds, "predict_s": ev["predict_s"], "peak_mib": fit.peak_mib,
        }))  # fmt: skip
        facts[f"{name} mean variance / exact"] = var_ratio
        delta_rows += _rows_per_delta(
            name, la, _own_deltas(la, val),
            lambda la: _laplace_scores(la, ds.x_test, ds.y_test, ds.x_ood, oods))  # fmt: skip
    ood_rows = [Row("MAP (softmax)", map_ood)] + delta_rows
    return rows, delta_rows, ood_rows, facts


#: δ grid of the ten-class table: exact LLA's predictive over 10,770 function-space dimensions
#: takes ~12 s per δ on the validation set, so decades instead of the default 21 values.
DECADES = [10.0**k for k in range(-4, 5)]


@keeps_global_rng
def digits_quality(cfg: DemoConfig, log=print) -> list[Row]:
    """All ten digit classes: MAP, then ExactLLA, ScaLLA and ScaLLA+context, each at its own
    ``δ`` by marginal likelihood and by validation NLL (over :data:`DECADES`)."""
    torch.manual_seed(cfg.seed)
    ds = load_digits_split(seed=cfg.seed, context=True)
    train = ds.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
    val = ds.loader("val", 256)
    model = train_map(DigitsCNN(n_classes=ds.n_classes), train, seed=cfg.seed)
    with torch.no_grad():
        probs = torch.softmax(model(ds.x_test), -1)
    rows = [Row("MAP", _classification_scores(probs, None, ds.y_test))]
    exact = ExactLLA(copy.deepcopy(model).double(), "classification")
    exact.fit(ds.loader("train", 128))
    deltas = _own_deltas(exact, val, grid=DECADES)
    rows += _rows_per_delta("ExactLLA", exact, deltas,
                            lambda la: _laplace_scores(la, ds.x_test.double(), ds.y_test))
    log(f"digits, 10 classes: ExactLLA δ = {deltas['marglik']:.4g} (marglik), "
        f"{deltas['val NLL']:.4g} (validation NLL)")  # fmt: skip
    context = ds.loader("context", cfg.batch_size, shuffle=True, seed=cfg.seed + 1)
    for name, ctx in (("ScaLLA", None), ("ScaLLA+context", context)):
        la, _ = _fit_scalla(f"digits, 10 classes: {name}", model, cfg, train, ctx,
                            deltas["val NLL"], log)  # fmt: skip
        rows += _rows_per_delta(name, la, _own_deltas(la, val, grid=DECADES),
                                lambda la: _laplace_scores(la, ds.x_test, ds.y_test))
    return rows


REGRESSION_DELTA_COLUMNS = [
    ("delta", "δ", "{:.3g}"), ("sigma", "σ", "{:.3g}"),
    ("nll", "test NLL", "{:.4f}"), ("crps", "CRPS", "{:.4f}"), ("rmse", "RMSE", "{:.4f}"),
]


def _regression_scores(mean, var, sigma: float, y) -> dict[str, float]:
    y_var = var + sigma**2
    return {"sigma": sigma, "nll": metrics.gaussian_nll(mean, y_var, y),
            "crps": metrics.crps_gaussian(mean, y_var, y), "rmse": metrics.rmse(mean, y)}  # fmt: skip


@keeps_global_rng
def diabetes_quality(cfg: DemoConfig, log=print) -> list[Row]:
    """Diabetes (standardised targets): MAP with exact LLA's marglik ``σ``, then ExactLLA at its
    own ``(δ, σ)`` by marginal likelihood and ``δ`` by validation NLL, and ScaLLA at its own ``δ``
    by both with exact LLA's ``σ``."""
    torch.manual_seed(cfg.seed)
    ds = load_diabetes_split(seed=cfg.seed)
    train = ds.loader("train", 32, shuffle=True, seed=cfg.seed)
    val = ds.loader("val", 256)
    # 264 near-linear points: the MLP overfits in its 300 default epochs; keep its best epoch.
    model = train_map(MLP(ds.input_shape[0], 1, hidden=(50, 50)), train, likelihood="regression",
                      val_loader=val, seed=cfg.seed)  # fmt: skip

    def score(la) -> dict[str, float]:
        mean, cov = la.predictive_distribution(ds.x_test)
        var = torch.diagonal(cov, dim1=1, dim2=2)
        return _regression_scores(mean, var, float(la.sigma_noise), ds.y_test)

    exact = ExactLLA(model, "regression")
    exact.fit(ds.loader("train", 64))
    exact_deltas = _own_deltas(exact, val, regression=True)
    sigma = float(exact.sigma_noise)
    with torch.no_grad():
        mean = model(ds.x_test)
    rows = [Row("MAP", _regression_scores(mean, torch.zeros_like(mean), sigma, ds.y_test))]
    rows += _rows_per_delta("ExactLLA", exact, exact_deltas, score)
    la = ScaLLA(model, "regression", n_features=64, prior_precision=exact_deltas["val NLL"],
                sigma_noise=sigma, seed=cfg.seed)  # fmt: skip
    la.fit(train, iterations=cfg.regression_iterations, time_budget=cfg.regression_time_budget,
           n_projections=cfg.n_projections, lr=cfg.lr, progress_bar=cfg.progress_bar)  # fmt: skip
    log(f"diabetes: ExactLLA δ = {exact_deltas['marglik']:.4g}, σ = {sigma:.4g} (marglik); "
        f"ScaLLA {len(la.history)} kernel-matching steps")  # fmt: skip
    # ScaLLA keeps exact LLA's σ: its M-feature marglik over (δ, σ) drives σ far below the
    # residual noise (the features fit the training targets better than the network does).
    rows += _rows_per_delta("ScaLLA", la, _own_deltas(la, val), score)
    return rows


REGRESSION_COLUMNS = [
    ("nll", "test NLL", "{:.4f}"),
    ("crps", "CRPS", "{:.4f}"),
    ("rmse", "RMSE", "{:.4f}"),
    ("gap_std", "mean std in gap", "{:.4f}"),
    ("fit_s", "fit s", "{:.1f}"),
]


@keeps_global_rng
def regression_demo(cfg: DemoConfig, log=print) -> tuple[list[Row], str]:
    """1-D gap regression: MAP, ExactLLA and ScaLLA bands side by side in a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(cfg.seed)
    ds = make_gap_regression(seed=cfg.seed)
    train = ds.loader("train", 32, shuffle=True, seed=cfg.seed)
    model = train_map(MLP(1, 1, hidden=(50, 50)), train, likelihood="regression", seed=cfg.seed)
    exact = ExactLLA(model, "regression")
    with measure() as fit_exact:
        exact.fit(ds.loader("train", 64))
        exact.optimize_prior_precision("marglik", optimize_sigma_noise=True)
    delta, sigma = float(exact.prior_precision), float(exact.sigma_noise)
    log(f"gap regression: marglik δ = {delta:.4g}, σ = {sigma:.4g}")
    scalla = ScaLLA(model, "regression", n_features=64, prior_precision=delta, sigma_noise=sigma, seed=cfg.seed)
    with measure() as fit_scalla:
        scalla.fit(train, iterations=cfg.regression_iterations,
                   time_budget=cfg.regression_time_budget, n_projections=cfg.n_projections,
                   lr=cfg.lr, progress_bar=cfg.progress_bar)  # fmt: skip

    grid = ds.x_grid
    with torch.no_grad():
        map_mean = model(grid)
    bands = {"MAP": (map_mean, torch.zeros_like(map_mean))}
    for name, la in (("ExactLLA", exact), ("ScaLLA", scalla)):
        mean, cov = la.predictive_distribution(grid)
        bands[name] = (mean, torch.diagonal(cov, dim1=1, dim2=2))

    in_gap = (grid.abs() < 1).squeeze(-1)
    rows = []
    for name, la, fit in (("MAP", None, None), ("ExactLLA", exact, fit_exact), ("ScaLLA", scalla, fit_scalla)):
        if la is None:
            with torch.no_grad():
                mean = model(ds.x_test)
            var = torch.zeros_like(mean)
        else:
            mean, cov = la.predictive_distribution(ds.x_test)
            var = torch.diagonal(cov, dim1=1, dim2=2)
        y_var = var + sigma**2
        rows.append(Row(name, {
            "nll": metrics.gaussian_nll(mean, y_var, ds.y_test),
            "crps": metrics.crps_gaussian(mean, y_var, ds.y_test),
            "rmse": metrics.rmse(mean, ds.y_test),
            "gap_std": float(bands[name][1][in_gap].add(sigma**2).sqrt().mean()),
            "fit_s": None if fit is None else fit.seconds,
        }))  # fmt: skip

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    x = grid.squeeze(-1).numpy()
    for ax, (name, (mean, var)) in zip(axes, bands.items()):
        m = mean.squeeze(-1).detach().numpy()
        s = (var.squeeze(-1) + sigma**2).sqrt().detach().numpy()
        ax.fill_between(x, m - 2 * s, m + 2 * s, alpha=0.3, color="C0", label="±2 std (with noise)")
        ax.plot(x, m, color="C0", label="mean")
        ax.plot(x, ds.y_grid.squeeze(-1).numpy(), "k--", lw=0.8, label="sin(2x)")
        ax.scatter(ds.x_train.squeeze(-1), ds.y_train.squeeze(-1), s=4, color="k", alpha=0.5)
        ax.set_title(name)
        ax.set_ylim(-4, 4)
        ax.set_xlabel("x")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"1-D regression with a gap: predictive bands (δ = {delta:.3g}, σ = {sigma:.3g})")
    fig.tight_layout()
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, "fastlla-demo-regression.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return rows, path


def run_demo(cfg: DemoConfig | None = None, log=print) -> dict[str, Any]:
    """Run both parts, print the tables, return everything measured."""
    cfg = cfg or DemoConfig()
    with measure() as total:
        rows, delta_rows, ood_rows, facts = classification_demo(cfg, log)
        digits_rows = digits_quality(cfg, log) if cfg.all_classes else None
        diabetes_rows = diabetes_quality(cfg, log)
        reg_rows, png = regression_demo(cfg, log)
    log("")
    log("Digits (train classes 0-4; OOD = test images of classes 5-9), "
        f"δ = {facts['delta']:.4g} (exact LLA's validation-NLL choice) for every Laplace method:")  # fmt: skip
    log(format_table(rows))
    for key, value in facts.items():
        if "variance" in key:
            log(f"  {key}: {value:.3f}")
    log("")
    log("The same split, each Laplace method at its own δ (the default workflow's "
        "initialisation prior; marglik; validation-NLL grid):")
    log(format_table(delta_rows, DELTA_COLUMNS))
    log("")
    log("OOD detection on the same split, AUROC of fastlla.ood_score by kind ('entropy': the "
        "default; 'variance_ratio': with context points); near = test digits 5-9, far = "
        "noisy and quadrant-rotated test digits 0-4:")  # fmt: skip
    log(format_table(ood_rows, OOD_COLUMNS))
    log("")
    if digits_rows is not None:
        log("Digits, all 10 classes (no OOD set), each Laplace method at its own δ:")
        log(format_table(digits_rows, DELTA_COLUMNS[:5]))
        log("")
    log("Diabetes (standardised targets), each Laplace method at its own δ "
        "(σ: exact LLA's marglik):")
    log(format_table(diabetes_rows, REGRESSION_DELTA_COLUMNS))
    log("")
    log("1-D gap regression (test points; 'mean std in gap' over x in (-1, 1) of the grid):")
    log(format_table(reg_rows, REGRESSION_COLUMNS))
    log(f"\nplot: {png}")
    log(f"total wall time: {total.seconds:.0f} s")
    return {"rows": rows, "delta_rows": delta_rows, "ood_rows": ood_rows, "digits_rows": digits_rows,
            "diabetes_rows": diabetes_rows, "facts": facts, "regression_rows": reg_rows,
            "plot": png, "seconds": total.seconds}  # fmt: skip
