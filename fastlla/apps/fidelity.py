"""Kernel-fidelity harness: how close a learned surrogate kernel is to the network's NTK.

Three pieces, usable on their own:

* :class:`ProbeGram` — the exact NTK Gram ``κ`` (``BC×BC``, float64) of held-out probe inputs
  from explicit Jacobians (small models), its Eckart–Young floor (the best error any rank-``M``
  kernel can reach on these probes, ``√(Σ_{i>M} λ_i²) / ‖κ‖_F`` from the eigenvalues of ``κ``)
  and the relative error ``‖ΦΦᵀ − κ‖_F/‖κ‖_F`` of any surrogate's features.
* :class:`FidelityCurve` — a ``callback(step, la)`` for :meth:`fastlla.ScaLLA.fit` that records
  the held-out error against training cost. ``fit`` excludes the callback's own time from the
  recorded seconds, so the curve is error versus the wall-clock of training alone.
* :func:`jvp_kernel_error` — the JVP-only estimate (no Jacobian) for models too large for the
  exact Gram: the same estimator as ``ScaLLA.kernel_fidelity(method="jvp")``.

``python -m fastlla fidelity`` runs the digits-CNN harness (:func:`main`): digits (10
classes), the DigitsCNN MAP network, 200 held-out probes, every configuration of
:data:`CONFIGS` (or ``--configs a,b``) for ``--iterations`` steps; writes
``<out>/<name>.json`` (curve, seconds per step, floors) and, with ``--plot``,
``<out>/curves.png``. Results and the commands that regenerate them: ``bench/fidelity/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastlla.augment import mixup
from fastlla.functional import NetworkFunction, batch_size, slice_batch

from .models import keeps_global_rng

__all__ = [
    "ProbeGram",
    "FidelityCurve",
    "eckart_young_floor",
    "feature_rows",
    "jvp_kernel_error",
    "CONFIGS",
    "setup",
    "run_config",
    "main",
]


def feature_rows(phi: Tensor) -> Tensor:
    """Features ``(B, M, C)`` → rows ``(B·C, M)`` ordered like the Gram (input-major)."""
    return phi.permute(0, 2, 1).reshape(-1, phi.shape[1])


def eckart_young_floor(eigvals: Tensor, ranks: Any) -> dict[int, float]:
    """Best relative Frobenius error of a rank-``M`` approximation, for each ``M`` in ``ranks``.

    ``eigvals`` are the eigenvalues of a symmetric PSD Gram (any order); the floor at ``M`` is
    ``√(Σ_{i>M} λ_i²) / √(Σ_i λ_i²)``.
    """
    lam2 = eigvals.double().clamp_min(0.0).sort(descending=True).values.square()
    total = lam2.sum()
    tail = torch.flip(torch.cumsum(torch.flip(lam2, [0]), 0), [0])  # tail[i] = Σ_{j≥i} λ_j²
    tail = torch.cat([tail, tail.new_zeros(1)])
    out = {}
    for m in ranks:
        m = int(m)
        out[m] = float(torch.sqrt(tail[min(m, len(lam2))] / total))
    return out


class ProbeGram:
    """The exact NTK Gram of probe inputs, its spectrum and the error of surrogate features.

    Parameters
    ----------
    model : the pre-trained network (only ``requires_grad`` parameters count).
    x : probe inputs (held out from the surrogate's training data).
    chunk_size : inputs per Jacobian computation.
    """

    def __init__(self, model: torch.nn.Module, x: Any, chunk_size: int = 32):
        network = NetworkFunction(model)
        B = batch_size(x)
        J = torch.cat(
            [
                network.jacobian(slice_batch(x, a, min(a + chunk_size, B))).double()
                for a in range(0, B, chunk_size)
            ]
        )
        self.x = x
        self.n_outputs = J.shape[1]
        self.n_params = J.shape[2]
        J = J.reshape(-1, J.shape[-1])
        self.kappa = J @ J.mT
        self.norm = float(torch.linalg.norm(self.kappa))
        self.eigvals = torch.linalg.eigvalsh(self.kappa).flip(0).clamp_min(0.0)
        self.trace_ratio = float(self.eigvals.sum()) / self.norm  # tr κ / ‖κ‖_F

    def floor(self, rank: int) -> float:
        """Eckart–Young floor at rank ``M``."""
        return eckart_young_floor(self.eigvals, [rank])[rank]

    def floors(self, ranks: Any) -> dict[int, float]:
        return eckart_young_floor(self.eigvals, ranks)

    def error(self, phi: Tensor) -> float:
        """``‖ΦΦᵀ − κ‖_F / ‖κ‖_F`` for features ``phi`` (B, M, C) of the probe inputs."""
        rows = feature_rows(phi.detach().double())
        return float(torch.linalg.norm(rows @ rows.mT - self.kappa)) / self.norm

    def share(self, phi: Tensor) -> float:
        """``‖ΦΦᵀ‖_F / ‖κ‖_F`` — how much of the kernel's mass a block of features carries."""
        rows = feature_rows(phi.detach().double())
        return float(torch.linalg.norm(rows.mT @ rows)) / self.norm


@dataclass
class FidelityCurve:
    """``callback(step, la)`` for :meth:`fastlla.ScaLLA.fit`: held-out error versus cost.

    Each call records the training step, the training seconds so far (callback time excluded;
    read from ``la.history``), the cost in JVP passes (``step · S``) and the probe error.
    """

    probe: ProbeGram
    points: list[dict[str, float]] = field(default_factory=list)
    log: Any = None

    def __call__(self, step: int, la: Any) -> None:
        with torch.no_grad():
            phi = la._surrogate_features(self.probe.x)
        seconds = la.history[-1]["seconds"] if la.history and step > 0 else 0.0
        point = {
            "step": step,
            "seconds": seconds,
            "jvp_passes": step * la._train_config.get("n_projections", 0),
            "error": self.probe.error(phi),
        }
        self.points.append(point)
        if self.log is not None:
            self.log(f"  step {step:6d}  {seconds:7.1f} s  error {point['error']:.4f}")

    @property
    def final(self) -> float:
        return self.points[-1]["error"] if self.points else math.nan

    def error_at(self, seconds: float) -> float:
        """The last recorded error at or before ``seconds`` of training."""
        best = math.nan
        for p in self.points:
            if p["seconds"] <= seconds:
                best = p["error"]
        return best


def jvp_kernel_error(la: Any, x: Any, n_projections: int = 64, seed: int = 12345) -> float:
    """JVP-only estimate of the relative kernel error on ``x`` (no Jacobian is formed)."""
    return la.kernel_fidelity(x, method="jvp", n_projections=n_projections, seed=seed)


#: name → (ScaLLA constructor options, fit options). Iterations come from the command line
#: (``--iterations``), optionally scaled per config by ``"iter_scale"`` for equal JVP cost.
CONFIGS: dict[str, tuple[dict, dict]] = {
    # "default" is the issue-2 default: S=8, B=64, Adam 1e-3 cosine, warm-started trunk, no
    # exact last-layer block; "lastlayer" is the new default (ScaLLA's last_layer="auto")
    "default": ({"last_layer": False}, {"n_projections": 8}),
    "s32": ({"last_layer": False}, {"n_projections": 32}),
    "lastlayer": ({"last_layer": True}, {"n_projections": 8}),
    "lastlayer_s32": ({"last_layer": True}, {"n_projections": 32}),
    "lastlayer_k5": ({"last_layer": 5, "n_features": 50}, {"n_projections": 8}),
    "lastlayer_k5_s32": ({"last_layer": 5, "n_features": 50}, {"n_projections": 32}),
    "orthogonal": ({"last_layer": False}, {"n_projections": 8, "distribution": "orthogonal"}),
    "gaussian": ({"last_layer": False}, {"n_projections": 8, "distribution": "gaussian"}),
    "fresh_trunk": ({"last_layer": False, "fresh_trunk": True}, {"n_projections": 8}),
    "lr3e-3": ({"last_layer": False}, {"n_projections": 8, "lr": 3e-3}),
    "lr3e-4": ({"last_layer": False}, {"n_projections": 8, "lr": 3e-4}),
    "ema": ({"last_layer": False}, {"n_projections": 8, "ema": 0.995}),
    "constant_lr": ({"last_layer": False}, {"n_projections": 8, "schedule": "constant"}),
    "lastlayer_ema": ({"last_layer": True}, {"n_projections": 8, "ema": 0.995}),
    "lastlayer_lr3e-3": ({"last_layer": True}, {"n_projections": 8, "lr": 3e-3}),
    "lastlayer_b128": ({"last_layer": True, "batch_size": 128}, {"n_projections": 8}),
    "lastlayer_mixup": ({"last_layer": True, "augment": "mixup"}, {"n_projections": 8}),
    "lastlayer_s32_mixup": ({"last_layer": True, "augment": "mixup"}, {"n_projections": 32}),
    "mixup": ({"last_layer": False, "augment": "mixup"}, {"n_projections": 8}),
    # a hidden layer in the surrogate's head; 1-pixel shifted training images
    "lastlayer_head512": ({"last_layer": True, "head_width": 512}, {"n_projections": 8}),
    "lastlayer_head512_shift": (
        {"last_layer": True, "head_width": 512, "augment": "shift"}, {"n_projections": 8}
    ),
    "lastlayer_shift": ({"last_layer": True, "augment": "shift"}, {"n_projections": 8}),
    # the gated surrogate (ScaLLA's default since session 4): exact gate σ'(z) and head weights
    "gated": ({"last_layer": True, "gate": True, "head_width": 512}, {"n_projections": 8}),
    "gated_s16": ({"last_layer": True, "gate": True, "head_width": 512}, {"n_projections": 16}),
    # equal JVP cost to the S=8 runs: a quarter of the steps
    "s32_eqcost": ({"last_layer": False}, {"n_projections": 32, "iter_scale": 0.25}),
    "lastlayer_s32_eqcost": ({"last_layer": True}, {"n_projections": 32, "iter_scale": 0.25}),
}


def shift(x: torch.Tensor, step: int) -> torch.Tensor:
    """Every image of the batch cyclically shifted by its own random (dx, dy) ∈ {−1, 0, 1}²."""
    g = torch.Generator().manual_seed(20_000 + step)
    img = x.reshape(x.shape[0], -1, 8, 8)
    d = torch.randint(-1, 2, (x.shape[0], 2), generator=g)
    out = torch.stack([torch.roll(im, (int(a), int(b)), (1, 2)) for im, (a, b) in zip(img, d)])
    return out.reshape(x.shape)


AUGMENTS = {"mixup": mixup, "shift": shift}


SPLIT_TENSORS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
#: The bench's cached MAP network and data split (same network for every run and machine).
MODEL_PATH = Path(__file__).resolve().parents[2] / "bench" / "fidelity" / "map_cnn_seed{seed}.pt"


class _CachedSplit:
    """The digits split read back from its cache, with :class:`fastlla.apps.data.Dataset`'s loader."""

    def __init__(self, **tensors):
        self.__dict__.update(tensors)

    def loader(self, split, batch_size=128, shuffle=False, seed=0):
        from torch.utils.data import DataLoader, TensorDataset

        gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
        data = TensorDataset(getattr(self, f"x_{split}"), getattr(self, f"y_{split}"))
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen)


@keeps_global_rng
def setup(n_probe: int = 200, seed: int = 0, device: str = "cpu", model_path: str | None = None):
    """Digits, the MAP CNN and the probe Gram.

    The MAP network is read from ``model_path`` (default: the bench's cached one) when it
    exists, else trained with ``train_map`` and saved there, so every configuration and every
    rerun measures the same network.
    """
    from .models import DigitsCNN, train_map

    try:
        from .data import load_digits_split
    except ImportError:  # no scikit-learn (e.g. a bare GPU machine): the cached split
        load_digits_split = None
    torch.manual_seed(seed)
    path = Path(model_path or str(MODEL_PATH).format(seed=seed))
    cache = path.with_name(f"digits_seed{seed}.pt")
    if load_digits_split is not None:
        ds = load_digits_split(seed)
        if not cache.exists():
            torch.save({k: getattr(ds, k) for k in SPLIT_TENSORS}, cache)
    else:
        ds = _CachedSplit(**torch.load(cache))
    model = DigitsCNN(10)
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        train_map(model, ds.loader("train", 64, shuffle=True, seed=seed), seed=seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    model = model.to(device).eval()
    probe = ProbeGram(model, ds.x_test[:n_probe].to(device))
    return ds, model, probe


def run_config(name, ds, model, probe, iterations, every, seed=0, log=print, threads=None,
               time_budget=None):  # fmt: skip
    """Fit one configuration of :data:`CONFIGS` with a :class:`FidelityCurve`; its summary.

    ``time_budget`` (seconds) fits with ``iterations="auto"`` instead of ``iterations``.
    """
    init, fit = (dict(d) for d in CONFIGS[name])
    batch = init.pop("batch_size", 64)
    n_features = init.pop("n_features", 100)
    init.setdefault("head_width", 0)  # the configurations predate head_width and gate; they
    init.setdefault("gate", False)  # name them
    fresh = init.pop("fresh_trunk", False)
    augment = AUGMENTS[init.pop("augment")] if "augment" in init else None
    scale = fit.pop("iter_scale", 1.0)
    from fastlla.scalla import ScaLLA

    la = ScaLLA(model, "classification", n_features=n_features, seed=seed, **init)
    if fresh:
        la.fit(ds.loader("train", batch), iterations=0, progress_bar=False)
        target = la.surrogate.learned if hasattr(la.surrogate, "learned") else la.surrogate
        with torch.no_grad():
            for m in target.trunk.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    curve = FidelityCurve(probe, log=log)
    n_iter = "auto" if time_budget else max(int(iterations * scale), 1)
    if time_budget:
        fit["time_budget"] = float(time_budget) * scale
    t0 = time.perf_counter()
    la.fit(
        ds.loader("train", batch, shuffle=True, seed=seed),
        iterations=n_iter,
        progress_bar=False,
        callback=curve,
        callback_every=every,
        augment=augment,
        **fit,
    )
    wall = time.perf_counter() - t0
    steps = [h["seconds"] for h in la.history]
    n_iter = len(steps)
    step_s = (steps[-1] - steps[min(10, len(steps) - 1)]) / max(len(steps) - 11, 1)
    total_rank = la.n_features
    result = {
        "name": name,
        "init": CONFIGS[name][0],
        "fit": {k: v for k, v in CONFIGS[name][1].items()},
        "iterations": n_iter,
        "n_features_total": total_rank,
        "n_learned": la.n_learned,
        "train_seconds": steps[-1],
        "wall_seconds_incl_eval": wall,
        "seconds_per_step": step_s,
        "final_error": curve.final,
        "floor_100": probe.floor(100),
        "floor_total_rank": probe.floor(total_rank),
        "curve": curve.points,
        "threads": threads,
    }
    log(
        f"{name}: error {curve.final:.4f} after {n_iter} steps, {steps[-1]:.0f} s "
        f"({step_s * 1e3:.1f} ms/step), total rank {total_rank}, "
        f"×floor(100) {curve.final / probe.floor(100):.2f}, ×floor(M_total) "
        f"{curve.final / max(probe.floor(total_rank), 1e-12):.1f}"
    )
    return result, la


def plot(results: list[dict], probe_floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        xs = [p["seconds"] for p in r["curve"]]
        cs = [p["jvp_passes"] for p in r["curve"]]
        ys = [p["error"] for p in r["curve"]]
        axes[0].plot(xs, ys, label=r["name"])
        axes[1].plot(cs, ys, label=r["name"])
    for ax, xl in zip(axes, ("training seconds (eval excluded)", "JVP passes (steps × S)")):
        ax.axhline(probe_floor, color="k", ls="--", lw=1, label="Eckart–Young floor, M=100")
        ax.axhline(3 * probe_floor, color="gray", ls=":", lw=1, label="3× floor")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("held-out ‖Q−κ‖/‖κ‖")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m fastlla fidelity`` (and ``bench/fidelity/curves.py``)."""
    parser.add_argument("--configs", default="all", help="comma-separated names or 'all'")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/fidelity/results")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-path", default=None, help="cached MAP network (.pt)")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument(
        "--time-budget", type=float, default=None,
        help="seconds of training per configuration (iterations='auto'; overrides --iterations)",
    )  # fmt: skip


def main(argv=None):
    """Run the harness (``argv``: a list of strings or a parsed ``argparse.Namespace``)."""
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        parser = argparse.ArgumentParser(description="ScaLLA kernel-fidelity curves")
        add_arguments(parser)
        args = parser.parse_args(argv)
    if args.list:
        for name, (init, fit) in CONFIGS.items():
            print(f"{name:24s} ScaLLA{init} fit{fit}")
        return {}
    torch.set_num_threads(args.threads)
    names = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds, model, probe = setup(seed=args.seed, device=args.device, model_path=args.model_path)
    floors = probe.floors([10, 25, 50, 100, 150, 200, 300, 490, 540, 590])
    print(f"probe Gram: tr κ/‖κ‖_F = {probe.trace_ratio:.2f}; floors {floors}")
    summary = {"floors": floors, "trace_ratio": probe.trace_ratio}
    (out / "floors.json").write_text(json.dumps(summary))
    results = []
    for name in names:
        result, _ = run_config(name, ds, model, probe, args.iterations, args.every, args.seed,
                               threads=args.threads, time_budget=args.time_budget)  # fmt: skip
        result["device"] = args.device
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        results.append(result)
    if args.plot:
        every = sorted(out.glob("*.json"))
        loaded = [json.loads(p.read_text()) for p in every if p.name != "floors.json"]
        loaded = [r for r in loaded if r["name"] in names] or loaded
        plot(loaded, probe.floor(100), out / "curves.png")
    return {"results": results, "floors": floors}
