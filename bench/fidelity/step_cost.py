"""Relative per-step cost of ScaLLA training configurations, measured back-to-back.

On a shared machine absolute timings drift; the configurations are interleaved over
``--rounds`` rounds in one process and the median seconds per step (step 0 excluded) reported,
so their ratios are comparable.

    python bench/fidelity/step_cost.py --steps 30 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from fastlla import ScaLLA
from fastlla.apps.fidelity import setup

CONFIGS = {
    "old default (S=8, no block, no head)": dict(last_layer=False, residual_variance=False),
    "exact last-layer block (S=8)": dict(last_layer=True, residual_variance=False),
    "new default (block + residual head, S=8)": dict(),
    "S=32, no block": dict(last_layer=False, residual_variance=False, n_projections=32),
    "S=32 + block": dict(last_layer=True, residual_variance=False, n_projections=32),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/fidelity/results/step_cost.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds, model, _ = setup(n_probe=8)
    loader = ds.loader("train", 64, shuffle=True, seed=0)
    times: dict[str, list[float]] = {k: [] for k in CONFIGS}
    for _ in range(args.rounds):
        for name, cfg in CONFIGS.items():
            cfg = dict(cfg)
            S = cfg.pop("n_projections", 8)
            la = ScaLLA(model, "classification", n_features=100, **cfg)
            la.fit(loader, iterations=args.steps, n_projections=S, progress_bar=False)
            h = [r["seconds"] for r in la.history]
            times[name].append((h[-1] - h[0]) / (len(h) - 1))
    base = statistics.median(times[next(iter(CONFIGS))])
    result = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"seconds_per_step": med, "relative": med / base, "all": ts}
        print(f"{name:45s} {med * 1e3:8.1f} ms/step  ×{med / base:.2f}")
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
