"""Fit-to-fidelity: held-out kernel error versus training wall-clock, fastlla against the
authors' ScaLLA, on the digits CNN and on a wider CNN (issue 16).

Methods (each with ``M = --n-features`` learned features and the same seed):

* ``fastlla`` — ``ScaLLA(model, "classification", n_features=M)`` with every other option at its
  default, ``fit(iterations="auto", time_budget=seconds)``;
* ``fastlla-nogate`` — the same with ``gate=False``;
* ``authors`` — their ScaLLA (``bench/suite/authors.py``, a faithful re-implementation: a fresh
  copy of the network with its output layer replaced by ``Linear(h, M·C)``, ``× √(P/M)``,
  shuffled batches of 5, one Rademacher JVP per step, the materialised ``B×B×C×C`` loss,
  constant Adam 5e-5), for ``seconds`` of training.

Networks: ``cnn`` — the digits CNN of every other fidelity run (``DigitsCNN``, P = 11,482, the
cached MAP of ``bench/fidelity/map_cnn_seed0.pt``), 200 probes; ``wide`` — ``DigitsCNN`` with
channels (32, 64) and 128 hidden units (P = 53,002), MAP trained by ``train_map`` and cached as
``bench/fidelity/map_cnn_wide_seed0.pt``, 100 probes (its exact probe Gram needs the probes'
full Jacobians, 0.4 GiB in float64); ``ood`` — ``DigitsCNN`` on digits 0–4
(:func:`fastlla.apps.data.load_digits_ood`, P = 11,237, cached as
``bench/fidelity/map_cnn_ood_seed0.pt``), 200 probes, digits 5–9 of the test split as OOD inputs.

Quality at equal fit time (``ood`` only, the network with OOD inputs): test NLL, accuracy, ECE
and OOD AUROC (predictive entropy; Gaussian logit entropy ``½ log det Σ``) of each fitted method,
both at prior precision ``δ = 1`` (fastlla's default and their FMNIST run's, which does not tune
it). fastlla: its default probit predictive; the authors: their evaluation (2048 Monte-Carlo
samples ``f + Lᵀz``, the entropy of the averaged probabilities).

Error: ``‖ΦΦᵀ − κ‖_F / ‖κ‖_F`` on the probes (first test images; ``κ`` from explicit Jacobians,
:class:`fastlla.apps.fidelity.ProbeGram`), evaluated at checkpoints of training time, evaluation
time excluded. Each result gives the Eckart–Young floor at ``M`` and at the *total* number of
features the method uses (fastlla's exact last-layer block counts), and the time fastlla needs to
reach the authors' final error.

Timings are only meaningful on a quiet machine (``--threads 1`` by default, as the issue's
side-by-side run): run it alone. ``--quick`` (2-s authors runs, 5 fastlla steps, 10 probes, a
one-epoch wide MAP, nothing cached) checks that the harness works; its numbers mean nothing::

    python bench/fidelity/fit_to_fidelity.py                       # 120 s per method and network
    python bench/fidelity/fit_to_fidelity.py --seconds 600 --plot  # the issue's 10-minute budget
    python bench/fidelity/fit_to_fidelity.py --quick --out /tmp/f2f

Writes ``<out>/<network>-<method>.json`` (curve and summary), ``<out>/floors-<network>.json``,
``<out>/summary.md`` and, with ``--plot``, ``<out>/<network>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from fastlla.apps.fidelity import FidelityCurve, ProbeGram
from fastlla.apps.fidelity import setup as cnn_setup
from fastlla.apps.models import DigitsCNN, keeps_global_rng, train_map

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "suite"))
from authors import authors_fit

#: name → DigitsCNN options and probe count.
NETWORKS: dict[str, dict[str, Any]] = {
    "cnn": {"channels": (16, 32), "hidden": 48, "n_probe": 200},
    "wide": {"channels": (32, 64), "hidden": 128, "n_probe": 100},
    "ood": {"channels": (16, 32), "hidden": 48, "n_probe": 200, "classes": 5},
}
METHODS = ("fastlla", "fastlla-nogate", "authors")
FLOOR_RANKS = (10, 25, 50, 100, 200, 300, 500, 1000)


@keeps_global_rng
def network(name: str, seed: int = 0, quick: bool = False, n_probe: int | None = None):
    """``(data split, MAP network, probe Gram)`` for a network of :data:`NETWORKS`."""
    spec = NETWORKS[name]
    n_probe = n_probe or spec["n_probe"]
    if name == "cnn":
        return cnn_setup(n_probe=n_probe, seed=seed)
    from fastlla.apps.data import load_digits_ood, load_digits_split

    n_classes = spec.get("classes", 10)
    ds = load_digits_ood(seed) if name == "ood" else load_digits_split(seed)
    torch.manual_seed(seed)
    model = DigitsCNN(n_classes, channels=spec["channels"], hidden=spec["hidden"])
    path = HERE / f"map_cnn_{name}_seed{seed}.pt"
    if path.exists() and not quick:
        model.load_state_dict(torch.load(path))
    else:
        train_map(model, ds.loader("train", 64, shuffle=True, seed=seed), seed=seed,
                  epochs=1 if quick else None)  # fmt: skip
        if not quick:
            torch.save(model.state_dict(), path)
    model.eval()
    return ds, model, ProbeGram(model, ds.x_test[:n_probe])


def checkpoints(seconds: float, points: int) -> list[float]:
    """Evaluation times, denser early: ``seconds · (i/points)²``."""
    return [seconds * (i / points) ** 2 for i in range(1, points + 1)]


def reach(curve: list[dict[str, float]], target: float) -> float | None:
    """Training seconds of the first point of ``curve`` at or below ``target``; ``None`` if none."""
    return next((p["seconds"] for p in curve if p["error"] <= target), None)


def run_fastlla(model, ds, probe: ProbeGram, seconds: float, n_features: int, seed: int,
                points: int, batch_size: int = 64, iterations: int | str = "auto",
                **options) -> dict[str, Any]:  # fmt: skip
    """fastlla's ScaLLA with its defaults (``options`` override), ``fit(iterations="auto",
    time_budget=seconds)`` (``auto`` trains at least 200 steps, whatever the budget); an integer
    ``iterations`` instead (the quick check)."""
    from fastlla import ScaLLA

    la = ScaLLA(model, "classification", n_features=n_features, seed=seed, **options)
    curve = FidelityCurve(probe)
    pending = checkpoints(seconds, points)

    def callback(step, la):
        trained = la.history[-1]["seconds"]
        if (pending and trained >= pending[0]) or step == la._train_config.get("final"):
            while pending and trained >= pending[0]:
                pending.pop(0)
            curve(step, la)

    budget = {"time_budget": seconds} if iterations == "auto" else {}
    la.fit(ds.loader("train", batch_size, shuffle=True, seed=seed), iterations=iterations,
           progress_bar=False, callback=callback, callback_every=1, **budget)  # fmt: skip
    if not curve.points or curve.points[-1]["step"] != len(la.history):
        curve(len(la.history), la)
    h = [r["seconds"] for r in la.history]
    per_step = statistics.median(b - a for a, b in zip(h[1:], h[2:])) if len(h) > 2 else h[-1]
    return {"iterations": len(h), "train_seconds": h[-1], "seconds_per_step": per_step,
            "n_features_total": la.n_features, "curve": curve.points,
            "final_error": curve.final, "settings": la.settings.as_dict(),
            "estimator": la}  # fmt: skip


def run_authors(model, ds, probe: ProbeGram, seconds: float, n_features: int, seed: int,
                points: int) -> dict[str, Any]:  # fmt: skip
    out = authors_fit(model, ds.x_train, probe, seconds, y_train=ds.y_train,
                      n_features=n_features, seed=seed,
                      checkpoints=checkpoints(seconds, points), return_estimator=True)  # fmt: skip
    out["train_seconds"] = out["curve"][-1]["seconds"]
    return out


def quality(method: str, la, ds) -> dict[str, float]:
    """Test NLL, accuracy, ECE and OOD AUROCs of a fitted estimator (``ds.x_ood`` the OOD
    inputs): fastlla with its probit predictive, the authors' with their evaluation."""
    from fastlla import metrics
    from fastlla.predictive import gaussian_logit_entropy, predictive_entropy, probit

    def predict(x):
        if method == "authors":
            return la.predict_proba(x), la.predictive_covariance(x, full_cross=False)[1]
        mean, cov = la.predictive_distribution(x)
        return probit(mean, cov), cov

    with torch.no_grad():
        p_in, cov_in = predict(ds.x_test)
        p_out, cov_out = predict(ds.x_ood)
    entropy = metrics.auroc(predictive_entropy(p_in), predictive_entropy(p_out))
    logit = metrics.auroc(gaussian_logit_entropy(cov_in), gaussian_logit_entropy(cov_out))
    return {"nll": metrics.nll(p_in, ds.y_test), "acc": metrics.accuracy(p_in, ds.y_test),
            "ece": metrics.ece(p_in, ds.y_test), "auroc_entropy": entropy,
            "auroc_logit": logit}  # fmt: skip


def run(net: str, method: str, ds, model, probe, seconds, n_features, seed, points,
        iterations: int | str = "auto") -> dict:  # fmt: skip
    if method == "authors":
        r = run_authors(model, ds, probe, seconds, n_features, seed, points)
    else:
        opts = {"gate": False} if method == "fastlla-nogate" else {}
        r = run_fastlla(model, ds, probe, seconds, n_features, seed, points,
                        iterations=iterations, **opts)  # fmt: skip
    r.update({
        "network": net, "method": method, "budget_seconds": seconds, "n_features": n_features,
        "n_params": sum(p.numel() for p in model.parameters()),
        "floor_M": probe.floor(n_features), "floor_total": probe.floor(r["n_features_total"]),
    })  # fmt: skip
    la = r.pop("estimator")
    if getattr(ds, "x_ood", None) is not None:
        r["quality"] = quality(method, la, ds)
    return r


def summarize(results: list[dict], floors: dict[str, dict], machine: str) -> str:
    """The markdown summary: one table per network, ratios against the authors' run first."""
    lines = ["# Fit-to-fidelity: fastlla against the authors' ScaLLA", "", machine, ""]
    for net in dict.fromkeys(r["network"] for r in results):
        rows = [r for r in results if r["network"] == net]
        theirs = next((r for r in rows if r["method"] == "authors"), None)
        fl = floors[net]
        lines += [
            (f"## {net} (P = {rows[0]['n_params']:,}, {fl['n_probe']} probes, "
             f"tr κ/‖κ‖_F = {fl['trace_ratio']:.2f})"),
            "",
            ("| method | reaches the authors' final error in | steps | ms/step | features (total) "
             "| final error | × floor(M) | × floor(total) |"),
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for r in rows:
            if theirs is None or r is theirs:
                when = "—"
            else:
                t = reach(r["curve"], theirs["final_error"])
                when = (f"{t:.1f} s = 1/{theirs['train_seconds'] / t:.1f} of their "
                        f"{theirs['train_seconds']:.0f} s" if t else "not reached")  # fmt: skip
            ratios = [f"{r['final_error'] / f:.1f}" if f > 0 else "— (floor 0)"
                      for f in (r["floor_M"], r["floor_total"])]  # fmt: skip
            name = r["method"] + (
                f" (gate resolved: {r['settings']['gate']})" if "settings" in r else ""
            )
            lines.append(
                f"| {name} | {when} | {r['iterations']:,} | "
                f"{r['seconds_per_step'] * 1e3:.1f} | {r['n_features']} ({r['n_features_total']}) | "
                f"{r['final_error']:.4f} | {ratios[0]} | {ratios[1]} |"
            )
        if any("quality" in r for r in rows):
            lines += [
                "",
                f"Quality at equal fit time (δ = 1, {net} test split; OOD: held-out digits):",
                "",
                "| method | NLL | accuracy | ECE | OOD AUROC (entropy) | OOD AUROC (½ log det Σ) |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for r in rows:
                q = r["quality"]
                lines.append(
                    f"| {r['method']} | {q['nll']:.4f} | {q['acc']:.4f} | {q['ece']:.4f} | "
                    f"{q['auroc_entropy']:.4f} | {q['auroc_logit']:.4f} |"
                )
        lines += ["", "Eckart–Young floors: " + ", ".join(
            f"M={k}: {v:.4f}" for k, v in fl["floors"].items()), ""]  # fmt: skip
    return "\n".join(lines)


def plot(results: list[dict], floors: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for net in dict.fromkeys(r["network"] for r in results):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in (r for r in results if r["network"] == net):
            ax.plot([max(p["seconds"], 1e-2) for p in r["curve"]], [p["error"] for p in r["curve"]],
                    marker=".", label=f"{r['method']} ({r['n_features_total']} features)")  # fmt: skip
        floor_m = next(r["floor_M"] for r in results if r["network"] == net)
        ax.axhline(floor_m, color="k", ls="--", lw=1, label="Eckart–Young floor at M")
        ax.set(xscale="log", yscale="log", xlabel="training seconds (evaluation excluded)",
               ylabel="held-out ‖ΦΦᵀ − κ‖/‖κ‖", title=net)  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{net}.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=120.0, help="training seconds per method")
    p.add_argument("--networks", default="cnn,wide,ood")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--n-features", type=int, default=100)
    p.add_argument("--points", type=int, default=16, help="evaluations per run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "fit_to_fidelity"))
    p.add_argument("--plot", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 s per authors run, 5 fastlla steps, 10 probes, one-epoch wide MAP: "
        "a check of the harness, not a measurement",
    )
    args = p.parse_args(argv)
    n_probe, iterations = None, "auto"
    if args.quick:
        args.seconds, args.points, n_probe, iterations = 2.0, 3, 10, 5
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{args.threads} thread(s), torch {torch.__version__}"
               + (" — QUICK MODE: a check of the harness, not a measurement" if args.quick else ""))  # fmt: skip
    results, floors = [], {}
    try:
        for net in args.networks.split(","):
            ds, model, probe = network(net, args.seed, args.quick, n_probe)
            floors[net] = {"floors": probe.floors(FLOOR_RANKS), "trace_ratio": probe.trace_ratio,
                           "n_probe": probe.kappa.shape[0] // probe.n_outputs}  # fmt: skip
            (out / f"floors-{net}.json").write_text(json.dumps(floors[net], indent=1))
            for method in args.methods.split(","):
                if method not in METHODS:
                    raise ValueError(f"unknown method {method!r}; one of {METHODS}")
                r = run(net, method, ds, model, probe, args.seconds, args.n_features, args.seed,
                        args.points, iterations)  # fmt: skip
                r["machine"], r["quick"] = machine, args.quick
                (out / f"{net}-{method}.json").write_text(json.dumps(r, indent=1))
                print(f"{net} {method}: error {r['final_error']:.4f} after {r['iterations']} "
                      f"steps, {r['train_seconds']:.1f} s", flush=True)  # fmt: skip
                results.append(r)
    finally:
        torch.set_num_threads(before)
    text = summarize(results, floors, machine)
    (out / "summary.md").write_text(text + "\n")
    if args.plot:
        plot(results, floors, out)
    print(text)
    return {"results": results, "floors": floors, "summary": text}


if __name__ == "__main__":
    main()
