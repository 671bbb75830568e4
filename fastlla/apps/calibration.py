"""Issue 15's calibration table: is the default workflow ever worse than the network it explains?

``python -m fastlla calibration`` trains one MAP network per data set and weight decay (Adam,
:func:`fastlla.apps.models.train_map`, fixed seeds) and scores on the test split

* **MAP** — the network itself (softmax; for regression ``N(f(x), σ²)`` with ``σ`` the training
  residuals' root mean square, the noise a network trained by mean squared error implies);
* **laplace-torch, default** — ``Laplace(model, likelihood)`` (last-layer KFAC), then
  ``optimize_prior_precision(method="marglik")``; for regression its README's loop instead (Adam,
  rate 0.1, on ``log δ`` and ``log σ`` of ``log_marginal_likelihood``, from ``log δ = log σ = 1``),
  since its ``optimize_prior_precision`` leaves ``σ`` at 1. Imported lazily: without
  laplace-torch these rows are left out with a note;
* **ExactLLA** (float64) and **ScaLLA** (fastlla's defaults, ``iterations`` kernel-matching
  steps), each with

  - the **default** workflow, ``optimize_prior_precision()`` with no validation data (the
    initialisation prior's ``δ``; for regression with ``optimize_sigma_noise=True``, ``σ``
    maximising the evidence at that ``δ``),
  - **marglik**, laplace-torch's default method: the evidence's ``δ`` (regression: ``(δ, σ)``),
  - **validation δ**, ``optimize_prior_precision("gridsearch", val_loader=...)`` on the held-out
    validation split over :data:`GRID` (regression: ``σ`` kept from the default workflow).

Metrics: test NLL, accuracy, ECE (15 bins), Brier and, on the digits OOD split, the AUROC of the
predictive entropy between the test images and the held-out classes' test images; for regression
the Gaussian NLL (noise included) and RMSE, and on the gap regression the NLL of fresh noisy
targets on the plotting grid inside the gap ``|x| < 1`` and outside the data ``|x| > 3``.
Laplace probabilities use the probit link. Each default-workflow row of ExactLLA and ScaLLA is
checked against the issue's bar (:func:`bar_failures`).

Data sets (:data:`DATASETS`, in the order they run: the CNNs last): wine and breast cancer
(``MLP`` 50 tanh units), diabetes and the 1-D gap regression (``MLP`` 50-50 tanh; diabetes keeps
its best epoch on the validation split, as in the demo, since it overfits), the digits OOD split
(classes 0–4, OOD = 5–9) and all ten digits (``DigitsCNN``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from fastlla import metrics
from fastlla.exact import ExactLLA
from fastlla.predictive import probit
from fastlla.scalla import ScaLLA

from .data import (
    Dataset,
    load_diabetes_split,
    load_digits_ood,
    load_digits_split,
    load_tabular_split,
    make_gap_regression,
)
from .demo import _classification_scores, _regression_scores
from .models import MLP, DigitsCNN, keeps_global_rng, train_map

__all__ = [
    "DATASETS",
    "QUICK",
    "GRID",
    "CalibrationConfig",
    "Result",
    "load_dataset",
    "network",
    "train_network",
    "evaluate",
    "bar_failures",
    "run_calibration",
    "format_markdown",
    "add_arguments",
    "main",
]

#: Every data set, in the order they run (the MLPs first, the CNNs last).
DATASETS = ("wine", "breast_cancer", "diabetes", "gap", "digits_ood", "digits")
#: ``--quick``: one classification and one regression set, small networks, CI-sized.
QUICK = ("wine", "gap")
#: δ grid of the validation rows: decades ``10⁻⁴ … 10⁴`` (exact LLA's ten-class predictive takes
#: seconds per ``δ``, so decades rather than ``gridsearch``'s default 21 values).
GRID = tuple(10.0**k for k in range(-4, 5))
#: the tolerance on ECE of the issue's bar
ECE_SLACK = 0.01


@dataclass
class CalibrationConfig:
    """What :func:`run_calibration` runs.

    ``epochs=None`` trains for :func:`train_map`'s default (40 classification, 300 regression
    epochs); ``iterations`` are ScaLLA's kernel-matching steps; ``laplace_torch=False`` leaves
    laplace-torch's rows out even where it is installed.
    """

    datasets: Sequence[str] = DATASETS
    weight_decays: Sequence[float] = (1e-4, 0.0)
    iterations: int = 500
    seed: int = 0
    epochs: int | None = None
    grid: Sequence[float] = GRID
    laplace_torch: bool = True
    hyper_steps: int = 1000  # laplace-torch's regression hyper-parameter loop


@dataclass
class Result:
    """One row: a method and workflow on one network.

    ``metrics`` holds ``nll, acc, ece, brier`` (and ``auroc``) for classification, ``nll, rmse,
    crps`` (and ``nll_gap, nll_outside``) for regression; ``bar`` the issue's criteria this row
    fails (``[]``: meets the bar; ``None``: not a row the bar applies to); ``predictions`` the test
    (and OOD) predictive — ``probs``/``probs_ood`` (N, C) or ``mean``/``var`` (N, D) — which the
    JSON output leaves out.
    """

    data: str
    weight_decay: float
    method: str
    workflow: str
    delta: float | None = None
    sigma: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    bar: list[str] | None = None
    predictions: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("predictions")
        return out


def load_dataset(name: str, seed: int = 0) -> Dataset:
    """One of :data:`DATASETS` with its fixed split."""
    loaders: dict[str, Callable[[], Dataset]] = {
        "wine": lambda: load_tabular_split("wine", seed),
        "breast_cancer": lambda: load_tabular_split("breast_cancer", seed),
        "diabetes": lambda: load_diabetes_split(seed),
        "gap": lambda: make_gap_regression(seed=seed),
        "digits_ood": lambda: load_digits_ood(seed=seed),
        "digits": lambda: load_digits_split(seed=seed),
    }
    if name not in loaders:
        raise ValueError(f"fastlla: unknown data set {name!r}; use one of {', '.join(DATASETS)}")
    return loaders[name]()


def network(name: str, ds: Dataset) -> torch.nn.Module:
    """The untrained network for data set ``name``: ``DigitsCNN`` for digits, an ``MLP`` (50 tanh
    units; 50-50 for regression) otherwise. Draws its initialisation from the global RNG."""
    if name.startswith("digits"):
        return DigitsCNN(n_classes=ds.n_classes)
    hidden = (50,) if ds.likelihood == "classification" else (50, 50)
    return MLP(ds.input_shape[0], ds.out_features, hidden)


def _batch_size(ds: Dataset) -> int:
    return 64 if ds.likelihood == "classification" else 32


@keeps_global_rng
def train_network(
    name: str, ds: Dataset, weight_decay: float, seed: int = 0, epochs: int | None = None
) -> torch.nn.Module:
    """The MAP network of data set ``name``, initialised and trained from ``seed`` (the caller's
    global RNG is left as it was). Diabetes keeps its best epoch on the validation split."""
    torch.manual_seed(seed)
    model = network(name, ds)
    val = ds.loader("val", 256) if name == "diabetes" else None
    return train_map(model, ds.loader("train", _batch_size(ds), shuffle=True, seed=seed),
                     likelihood=ds.likelihood, epochs=epochs, weight_decay=weight_decay,
                     val_loader=val, seed=seed)  # fmt: skip


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


def _classification_row(probs: torch.Tensor, probs_ood: torch.Tensor | None, ds: Dataset):
    values = _classification_scores(probs, probs_ood, ds.y_test)
    if "auroc_entropy" in values:
        values["auroc"] = values.pop("auroc_entropy")
    predictions = {"probs": probs}
    if probs_ood is not None:
        predictions["probs_ood"] = probs_ood
    return values, predictions


def _gap_targets(ds: Dataset, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh noisy targets ``sin(2x) + σε`` on the gap regression's plotting grid."""
    g = torch.Generator().manual_seed(seed + 1)
    noise = ds.info["noise_std"] * torch.randn(ds.y_grid.shape, generator=g)
    return ds.x_grid, ds.y_grid + noise


def _regression_row(predict, sigma: float, ds: Dataset, seed: int):
    """Scores of the Gaussian predictive ``predict(x) -> (mean, var)`` (function-space variance,
    ``(N, D)``) with noise ``σ²`` added."""
    mean, var = (t.double() for t in predict(ds.x_test))  # σ² added in float64
    values = _regression_scores(mean, var, sigma, ds.y_test)
    values.pop("sigma")
    if ds.x_grid is not None:
        x, y = _gap_targets(ds, seed)
        m, v = (t.double() for t in predict(x))
        for key, mask in (("nll_gap", x.abs() < 1), ("nll_outside", x.abs() > 3)):
            rows = mask.squeeze(-1)
            values[key] = metrics.gaussian_nll(m[rows], v[rows] + sigma**2, y[rows])
    return values, {"mean": mean, "var": var}


def _fastlla_predict(la, dtype: torch.dtype):
    def predict(x: torch.Tensor):
        mean, cov = la.predictive_distribution(x.to(dtype))
        return mean, torch.diagonal(cov, dim1=1, dim2=2)

    return predict


def _score_laplace(la, ds: Dataset, dtype: torch.dtype, seed: int):
    """``(metrics, predictions)`` of a fastlla estimator at its current ``(δ, σ)``."""
    if ds.likelihood == "regression":
        return _regression_row(_fastlla_predict(la, dtype), float(la.sigma_noise), ds, seed)

    def probs(x):
        mean, cov = la.predictive_distribution(x.to(dtype))
        return probit(mean, cov)

    return _classification_row(probs(ds.x_test), None if ds.x_ood is None else probs(ds.x_ood), ds)


def _map_row(model, ds: Dataset, seed: int):
    with torch.no_grad():
        if ds.likelihood == "classification":
            p = torch.softmax(model(ds.x_test), -1)
            p_ood = None if ds.x_ood is None else torch.softmax(model(ds.x_ood), -1)
            return (None, *_classification_row(p, p_ood, ds))
        sigma = float((model(ds.x_train) - ds.y_train).square().mean().sqrt())

        def predict(x):
            mean = model(x)
            return mean, torch.zeros_like(mean)

        return (sigma, *_regression_row(predict, sigma, ds, seed))


def _laplace_torch_rows(model, ds: Dataset, cfg: CalibrationConfig, seed: int):
    """laplace-torch's default workflow: ``(δ, σ, metrics, predictions)``."""
    from laplace import Laplace  # noqa: PLC0415 — optional dependency

    la = Laplace(copy.deepcopy(model), ds.likelihood)
    la.fit(ds.loader("train", 128))
    if ds.likelihood == "classification":
        la.optimize_prior_precision(method="marglik")

        def probs(x):
            return la(x, pred_type="glm", link_approx="probit").detach()

        values, predictions = _classification_row(
            probs(ds.x_test), None if ds.x_ood is None else probs(ds.x_ood), ds)  # fmt: skip
        return float(la.prior_precision), None, values, predictions
    log_prior, log_sigma = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
    optimizer = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
    for _ in range(cfg.hyper_steps):
        optimizer.zero_grad()
        (-la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
        optimizer.step()
    la.prior_precision, la.sigma_noise = log_prior.detach().exp(), log_sigma.detach().exp()
    sigma = float(la.sigma_noise)

    def predict(x):
        mean, var = la(x, pred_type="glm")
        return mean.detach(), torch.diagonal(var, dim1=1, dim2=2).detach()

    return float(la.prior_precision), sigma, *_regression_row(predict, sigma, ds, seed)


def bar_failures(row: Result, map_row: Result, laplace_torch: Result | None) -> list[str]:
    """The issue's criteria a default-workflow row fails: ``NLL > MAP``, ``ECE > MAP + 0.01``,
    ``AUROC < MAP`` (where there is an OOD split) and ``NLL ≥ laplace-torch`` (where its row
    exists). ``[]`` when it meets them all."""
    m, ref = row.metrics, map_row.metrics
    failed = []
    if m["nll"] > ref["nll"]:
        failed.append("NLL>MAP")
    if "ece" in m and m["ece"] > ref["ece"] + ECE_SLACK:
        failed.append("ECE>MAP+0.01")
    if "auroc" in m and m["auroc"] < ref["auroc"]:
        failed.append("AUROC<MAP")
    if laplace_torch is not None and m["nll"] >= laplace_torch.metrics["nll"]:
        failed.append("NLL≥laplace-torch")
    return failed


def evaluate(
    name: str, ds: Dataset, weight_decay: float, cfg: CalibrationConfig, log=print
) -> list[Result]:
    """Every row of one network: MAP, laplace-torch's default, ExactLLA and ScaLLA each with the
    default workflow, marglik and validation ``δ``."""
    seed = cfg.seed
    regression = ds.likelihood == "regression"
    t0 = time.perf_counter()
    model = train_network(name, ds, weight_decay, seed, cfg.epochs)
    row = lambda method, workflow, delta, sigma, scored: Result(  # noqa: E731
        name, weight_decay, method, workflow, delta, sigma, scored[0], None, scored[1])
    sigma_map, *scored = _map_row(model, ds, seed)
    rows = [row("MAP", "network", None, sigma_map, scored)]
    log(f"{name}, weight decay {weight_decay:g}: MAP trained ({time.perf_counter() - t0:.0f} s)")
    lt_row = None
    if cfg.laplace_torch and _laplace_torch_available():
        with torch.random.fork_rng():
            delta, sigma, *scored = _laplace_torch_rows(model, ds, cfg, seed)
        lt_row = row("laplace-torch", "default", delta, sigma, scored)
        rows.append(lt_row)
    val = ds.loader("val", 256)
    train = ds.loader("train", _batch_size(ds), shuffle=True, seed=seed)
    estimators = (
        ("ExactLLA", torch.float64, lambda: ExactLLA(copy.deepcopy(model).double(), ds.likelihood)
         .fit(ds.loader("train", 128))),
        ("ScaLLA", torch.float32, lambda: ScaLLA(model, ds.likelihood, seed=seed)
         .fit(train, iterations=cfg.iterations, progress_bar=False)),
    )  # fmt: skip
    for method, dtype, fitted in estimators:
        t = time.perf_counter()
        with torch.random.fork_rng():
            la = fitted()
        delta = float(la.optimize_prior_precision(optimize_sigma_noise=regression))
        sigma = float(la.sigma_noise) if regression else None
        default = row(method, "default", delta, sigma, _score_laplace(la, ds, dtype, seed))
        default.bar = bar_failures(default, rows[0], lt_row)
        delta = float(la.optimize_prior_precision("marglik", optimize_sigma_noise=regression))
        marglik = row(method, "marglik", delta, float(la.sigma_noise) if regression else None,
                      _score_laplace(la, ds, dtype, seed))  # fmt: skip
        if regression:
            la.sigma_noise = sigma  # the validation search keeps the default workflow's σ
        delta = float(la.optimize_prior_precision("gridsearch", val_loader=val,
                                                  grid=list(cfg.grid)))  # fmt: skip
        validation = row(method, "validation δ", delta, sigma, _score_laplace(la, ds, dtype, seed))
        rows += [default, marglik, validation]
        log(f"  {method} ({time.perf_counter() - t:.0f} s)")
    return rows


def _laplace_torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("laplace") is not None


def run_calibration(
    cfg: CalibrationConfig | None = None,
    log=print,
    on_network: Callable[[list[Result]], None] | None = None,
) -> list[Result]:
    """Every row of every (data set, weight decay) of ``cfg``, data sets in the order given;
    ``on_network(rows so far)`` is called after each network (e.g. to save partial results)."""
    cfg = cfg or CalibrationConfig()
    unknown = [d for d in cfg.datasets if d not in DATASETS]
    if unknown:
        raise ValueError(f"fastlla: unknown data sets {unknown}; use some of {', '.join(DATASETS)}")
    if any(not (wd >= 0 and math.isfinite(wd)) for wd in cfg.weight_decays):
        raise ValueError(f"fastlla: weight decays must be finite and >= 0, got {cfg.weight_decays}")
    if cfg.laplace_torch and not _laplace_torch_available():
        log("note: laplace-torch is not installed; its rows are left out")
    results: list[Result] = []
    for name in cfg.datasets:
        ds = load_dataset(name, cfg.seed)
        for wd in cfg.weight_decays:
            results += evaluate(name, ds, wd, cfg, log)
            if on_network is not None:
                on_network(results)
    return results


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _cell(value: float | None, fmt: str = "{:.4f}") -> str:
    return "–" if value is None else fmt.format(value)


def _bar_cell(r: Result) -> str:
    if r.bar is None:
        return ""
    return "✓" if not r.bar else "✗ " + ", ".join(r.bar)


def format_markdown(results: Sequence[Result]) -> str:
    """The classification and regression tables (markdown)."""
    out = []
    cls = [r for r in results if "ece" in r.metrics]
    reg = [r for r in results if "rmse" in r.metrics]
    if cls:
        out += ["| data | wd | method | workflow | δ | NLL | ECE | Brier | acc | OOD AUROC | bar |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in cls:
            m = r.metrics
            out.append(
                f"| {r.data} | {r.weight_decay:g} | {r.method} | {r.workflow} | "
                f"{_cell(r.delta, '{:.3g}')} | {m['nll']:.4f} | {m['ece']:.4f} | "
                f"{m['brier']:.4f} | {m['acc']:.4f} | {_cell(m.get('auroc'))} | {_bar_cell(r)} |"
            )
    if reg:
        out += ["", "| data | wd | method | workflow | δ | σ | NLL | RMSE | NLL in gap | "
                "NLL outside | bar |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in reg:
            m = r.metrics
            out.append(
                f"| {r.data} | {r.weight_decay:g} | {r.method} | {r.workflow} | "
                f"{_cell(r.delta, '{:.3g}')} | {_cell(r.sigma, '{:.3g}')} | {m['nll']:.4f} | "
                f"{m['rmse']:.4f} | {_cell(m.get('nll_gap'))} | {_cell(m.get('nll_outside'))} | "
                f"{_bar_cell(r)} |"
            )
    return "\n".join(out).strip("\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated subset of {','.join(DATASETS)}")  # fmt: skip
    parser.add_argument("--weight-decay", default="1e-4,0",
                        help="comma-separated weight decays of the MAP training")  # fmt: skip
    parser.add_argument("--iterations", type=int, default=None,
                        help="ScaLLA kernel-matching steps (default 500; 50 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true",
        help=f"CI-sized: {','.join(QUICK)}, weight decay 1e-4, 10 training epochs",
    )
    parser.add_argument("--no-laplace-torch", action="store_true",
                        help="leave laplace-torch's rows out")  # fmt: skip
    parser.add_argument("--out", default=None, help="write the table to FILE.md or FILE.json")


def config_from_args(args: argparse.Namespace) -> CalibrationConfig:
    quick = args.quick
    datasets = tuple(QUICK if quick and args.datasets == ",".join(DATASETS)
                     else (d.strip() for d in args.datasets.split(",") if d.strip()))  # fmt: skip
    wds = (1e-4,) if quick and args.weight_decay == "1e-4,0" else tuple(
        float(w) for w in args.weight_decay.split(","))  # fmt: skip
    iterations = args.iterations if args.iterations is not None else (50 if quick else 500)
    return CalibrationConfig(datasets=datasets, weight_decays=wds, iterations=iterations,
                             seed=args.seed, epochs=10 if quick else None,
                             laplace_torch=not args.no_laplace_torch)  # fmt: skip


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces ``args``."""
    parts = ["python -m fastlla calibration", f"--datasets {args.datasets}",
             f"--weight-decay {args.weight_decay}", f"--seed {args.seed}"]  # fmt: skip
    if args.iterations is not None:
        parts.append(f"--iterations {args.iterations}")
    flags = (("--quick", args.quick), ("--no-laplace-torch", args.no_laplace_torch))
    parts += [flag for flag, on in flags if on]
    return " ".join(parts)


def _write(path: str, results: list[Result], command: str, cfg: CalibrationConfig,
           seconds: float, complete: bool) -> None:
    """``--out``: JSON (rows without predictions) or the markdown tables; a run still going
    (``complete=False``) is marked partial."""
    if path.endswith(".json"):
        text = json.dumps({"command": command, "config": asdict(cfg), "seconds": seconds,
                           "complete": complete, "rows": [r.to_json() for r in results]},
                          indent=1)  # fmt: skip
    else:
        state = "" if complete else "**partial** (the run was still going), "
        text = (f"`{command}` ({state}{seconds:.0f} s; torch {torch.__version__}, "
                f"{torch.get_num_threads()} thread(s))\n\n{format_markdown(results)}\n")  # fmt: skip
    with open(path, "w") as f:
        f.write(text)


def main(args: argparse.Namespace) -> list[Result]:
    """Run, print the markdown tables, write ``--out`` (after every network, then complete)."""
    cfg = config_from_args(args)
    command = _command(args)
    t0 = time.perf_counter()

    def save(results: list[Result], complete: bool = False) -> None:
        if args.out:
            _write(args.out, results, command, cfg, time.perf_counter() - t0, complete)

    with torch.random.fork_rng():
        results = run_calibration(cfg, log=lambda *a: print(*a, file=sys.stderr, flush=True),
                                  on_network=save)  # fmt: skip
    save(results, complete=True)
    print(format_markdown(results))
    return results
