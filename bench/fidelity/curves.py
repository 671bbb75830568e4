"""Held-out kernel error versus training cost for ScaLLA training configurations.

Setting: digits (all 10 classes), the DigitsCNN MAP network (``train_map``, seed 0), probe =
the first 200 test inputs. The exact NTK Gram of the probes (2000×2000) gives the Eckart–Young
floor at every rank; each configuration's error ``‖ΦΦᵀ − κ‖_F/‖κ‖_F`` is recorded every
``--every`` steps with :class:`fastlla.fidelity.FidelityCurve` (evaluation time excluded).

Usage (one command regenerates everything; ``--configs`` picks a subset)::

    python -m fastlla fidelity --out bench/fidelity/results            # all configurations
    python bench/fidelity/curves.py --configs default,lastlayer --iterations 2000

Writes ``<out>/<name>.json`` per configuration (curve, per-step seconds, floors) and, with
``--plot``, ``<out>/curves.png`` (error versus seconds and versus JVP passes).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fastlla import ScaLLA
try:
    from fastlla.data import load_digits_split
except ImportError:  # no scikit-learn (e.g. a bare GPU machine): setup() reads the cached split
    load_digits_split = None
from fastlla.fidelity import FidelityCurve, ProbeGram
from fastlla.models import DigitsCNN, train_map

#: name → (ScaLLA constructor options, fit options). Iterations come from the command line
#: (``--iterations``), optionally scaled per config by ``"iter_scale"`` for equal JVP cost.
CONFIGS: dict[str, tuple[dict, dict]] = {
    # the issue-2 default: S=8, B=64, Adam 1e-3 cosine, warm-started trunk
    "default": ({}, {"n_projections": 8}),
    "s32": ({}, {"n_projections": 32}),
    "lastlayer": ({"last_layer": True}, {"n_projections": 8}),
    "lastlayer_s32": ({"last_layer": True}, {"n_projections": 32}),
    "lastlayer_k5": ({"last_layer": 5, "n_features": 50}, {"n_projections": 8}),
    "lastlayer_k5_s32": ({"last_layer": 5, "n_features": 50}, {"n_projections": 32}),
    "orthogonal": ({}, {"n_projections": 8, "distribution": "orthogonal"}),
    "gaussian": ({}, {"n_projections": 8, "distribution": "gaussian"}),
    "fresh_trunk": ({"fresh_trunk": True}, {"n_projections": 8}),
    "lr3e-3": ({}, {"n_projections": 8, "lr": 3e-3}),
    "lr3e-4": ({}, {"n_projections": 8, "lr": 3e-4}),
    "ema": ({}, {"n_projections": 8, "ema": 0.995}),
    "constant_lr": ({}, {"n_projections": 8, "schedule": "constant"}),
    "lastlayer_ema": ({"last_layer": True}, {"n_projections": 8, "ema": 0.995}),
    "lastlayer_lr3e-3": ({"last_layer": True}, {"n_projections": 8, "lr": 3e-3}),
    "lastlayer_b128": ({"last_layer": True, "batch_size": 128}, {"n_projections": 8}),
    "lastlayer_mixup": ({"last_layer": True, "augment": "mixup"}, {"n_projections": 8}),
    "lastlayer_s32_mixup": ({"last_layer": True, "augment": "mixup"}, {"n_projections": 32}),
    "mixup": ({"augment": "mixup"}, {"n_projections": 8}),
    # equal JVP cost to the S=8 runs: a quarter of the steps
    "s32_eqcost": ({}, {"n_projections": 32, "iter_scale": 0.25}),
    "lastlayer_s32_eqcost": ({"last_layer": True}, {"n_projections": 32, "iter_scale": 0.25}),
}


def mixup(x: torch.Tensor, step: int) -> torch.Tensor:
    """Half the batch replaced by convex mixtures of pairs of its inputs (λ ~ U(0, 1))."""
    g = torch.Generator().manual_seed(10_000 + step)
    n = x.shape[0] // 2
    perm = torch.randperm(x.shape[0], generator=g)[:n]
    lam = torch.rand(n, *([1] * (x.dim() - 1)), generator=g).to(x)
    mixed = lam * x[:n] + (1 - lam) * x[perm]
    return torch.cat([x[n:], mixed])


AUGMENTS = {"mixup": mixup}


SPLIT_TENSORS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
MODEL_PATH = Path(__file__).resolve().parent / "map_cnn_seed{seed}.pt"


class _CachedSplit:
    """The digits split read back from its cache, with the loader of :class:`fastlla.data.Dataset`."""

    def __init__(self, **tensors):
        self.__dict__.update(tensors)

    def loader(self, split, batch_size=128, shuffle=False, seed=0):
        from torch.utils.data import DataLoader, TensorDataset

        gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
        data = TensorDataset(getattr(self, f"x_{split}"), getattr(self, f"y_{split}"))
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen)


def setup(n_probe: int = 200, seed: int = 0, device: str = "cpu"):
    """Digits, the MAP CNN (trained once on CPU and cached next to this script) and the probes."""
    torch.manual_seed(seed)
    cache = Path(str(MODEL_PATH).format(seed=seed)).with_name(f"digits_seed{seed}.pt")
    if load_digits_split is not None:
        ds = load_digits_split(seed)
        if not cache.exists():
            torch.save({k: getattr(ds, k) for k in SPLIT_TENSORS}, cache)
    else:
        ds = _CachedSplit(**torch.load(cache))
    path = Path(str(MODEL_PATH).format(seed=seed))
    model = DigitsCNN(10)
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        train_map(model, ds.loader("train", 64, shuffle=True, seed=seed), seed=seed)
        torch.save(model.state_dict(), path)
    model = model.to(device).eval()
    probe = ProbeGram(model, ds.x_test[:n_probe].to(device))
    return ds, model, probe


def run_config(name, ds, model, probe, iterations, every, seed=0, log=print, threads=None):
    init, fit = (dict(d) for d in CONFIGS[name])
    batch = init.pop("batch_size", 64)
    n_features = init.pop("n_features", 100)
    fresh = init.pop("fresh_trunk", False)
    augment = AUGMENTS[init.pop("augment")] if "augment" in init else None
    scale = fit.pop("iter_scale", 1.0)
    la = ScaLLA(model, "classification", n_features=n_features, seed=seed, **init)
    if fresh:
        la.fit(ds.loader("train", batch), iterations=0, progress_bar=False)
        target = la.surrogate.learned if hasattr(la.surrogate, "learned") else la.surrogate
        with torch.no_grad():
            for m in target.trunk.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    curve = FidelityCurve(probe, log=log)
    n_iter = max(int(iterations * scale), 1)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="all", help="comma-separated names or 'all'")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/fidelity/results")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv) if not isinstance(argv, argparse.Namespace) else argv
    torch.set_num_threads(args.threads)
    names = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds, model, probe = setup(seed=args.seed, device=args.device)
    floors = probe.floors([10, 25, 50, 100, 150, 200, 300, 490, 540, 590])
    print(f"probe Gram: tr κ/‖κ‖_F = {probe.trace_ratio:.2f}; floors {floors}")
    (out / "floors.json").write_text(json.dumps({"floors": floors, "trace_ratio": probe.trace_ratio}))
    results = []
    for name in names:
        result, _ = run_config(name, ds, model, probe, args.iterations, args.every, args.seed,
                               threads=args.threads)  # fmt: skip
        result["device"] = args.device
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        results.append(result)
    if args.plot:
        every = sorted(out.glob("*.json"))
        loaded = [json.loads(p.read_text()) for p in every if p.name != "floors.json"]
        loaded = [r for r in loaded if r["name"] in names] or loaded
        plot(loaded, probe.floor(100), out / "curves.png")
    return {"results": results, "floors": floors}


if __name__ == "__main__":
    main()
