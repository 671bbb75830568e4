"""What the gated surrogate costs at prediction: ScaLLA's predictive (mean + covariance) for a
batch of 256 digits with ``gate=True`` and ``gate=False``, beside the MAP forward, timed
interleaved in one process (median of ``--repeat`` rounds, ``--threads`` threads).

    python bench/fidelity/gate_latency.py            # results: bench/fidelity/RESULTS.md
"""

from __future__ import annotations

import argparse

import torch

import fastlla
from fastlla.apps.fidelity import setup
from fastlla.apps.measure import interleaved_latency


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds, model, _ = setup()
    x = ds.x_test[: args.batch]
    fitted = {}
    for gate in (True, False):
        la = fastlla.ScaLLA(model, "classification", gate=gate)
        la.fit(ds.loader("train", 64, shuffle=True), iterations=20, progress_bar=False)
        fitted[f"ScaLLA gate={gate}"] = la.predictive_distribution
    calls = {"MAP forward": model, **fitted}
    medians = interleaved_latency(calls, x, args.repeat)
    base = medians["MAP forward"]
    for name, med in medians.items():
        print(f"{name:22s} {1e3 * med:7.2f} ms  ({med / base:5.2f}× the MAP forward)")


if __name__ == "__main__":
    main()
