"""What ScaLLA's default predictive costs beside the network, and the kernel fidelity of the
distilled map to ``H`` against the trained one (one fit, so at equal fit time).

Digits CNN (``fastlla.apps.fidelity.setup``), one thread. The default ScaLLA is fitted with
``iterations="auto"`` and ``--budget`` seconds; its kernel error (``kernel_fidelity``,
``method="exact"``) is read on 200 test digits and on three shifted sets (flipped, Gaussian
noise, ×3) with the distilled map and with the trained one. Then, interleaved in one process
(median of ``--repeat`` rounds, batch 256): the MAP forward, ``la(x)`` (probit), ``la(x)`` with
the trained map, and a ScaLLA with ``gate=False, last_layer=False, residual_variance=False``.

    python bench/fidelity/predictive_cost.py --budget 120
"""

from __future__ import annotations

import argparse
import time

import torch

import fastlla
from fastlla.apps.fidelity import setup
from fastlla.apps.measure import interleaved_latency


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds, model, _ = setup()
    train = ds.loader("train", 32, shuffle=True, seed=0)
    t0 = time.perf_counter()
    la = fastlla.ScaLLA(model, "classification")
    la.fit(train, iterations="auto", time_budget=args.budget, progress_bar=False)
    fit_s = time.perf_counter() - t0
    learned = getattr(la.surrogate, "learned", None)
    rank = int(learned.distilled_rank) if hasattr(learned, "distilled_rank") else None
    print(f"fit {fit_s:.1f} s, {len(la.history)} steps, settings {la.settings}, distilled rank {rank}")
    xt = ds.x_test[:200]
    g = torch.Generator().manual_seed(0)
    sets = {
        "test": xt, "flipped": xt.flip(-1).flip(-2),
        "noise": xt.mean() + xt.std() * torch.randn(xt.shape, generator=g), "x3": 3 * xt,
    }  # fmt: skip

    def errors() -> dict[str, float]:
        return {k: round(la.kernel_fidelity(v, method="exact"), 4) for k, v in sets.items()}

    print("kernel error, distilled:", errors())
    if rank:
        learned.undistil()
        print("kernel error, trained map:", errors())
        learned.use_rank(rank)
    plain = fastlla.ScaLLA(model, "classification", gate=False, last_layer=False,
                           residual_variance=False)  # fmt: skip
    plain.fit(train, iterations=20, progress_bar=False)
    x = ds.x_test[: args.batch]
    x = torch.cat([x] * (args.batch // x.shape[0] + 1))[: args.batch]

    def undistilled(x):
        learned.undistil()
        try:
            return la(x)
        finally:
            learned.use_rank(rank)

    calls = {"MAP forward": model, "default la(x)": la, "plain la(x)": plain}
    if rank:
        calls["trained-map la(x)"] = undistilled
    medians = interleaved_latency(calls, x, args.repeat)
    base = medians["MAP forward"]
    for name, med in medians.items():
        print(f"{name:22s} {1e3 * med:8.2f} ms  {med / base:6.2f}x the MAP forward")


if __name__ == "__main__":
    main()
