"""What ScaLLA's default predictive costs beside the network, and the kernel fidelity of the
distilled map to ``H`` against the trained one (one fit, so at equal fit time).

``--network cnn`` (default): the digits CNN of every fidelity run; ``wide``: the wider CNN of
``fit_to_fidelity.py`` (channels (32, 64), 128 hidden units). One thread. The default ScaLLA is
fitted with ``iterations="auto"`` and ``--budget`` seconds (or loaded from ``--state``, a
``state_dict`` saved by ``--save``; ``--redistil`` distils its map again with this version's
``distil``); its kernel error (``kernel_fidelity``, ``method="exact"``)
is read on 200 test digits and on three shifted sets (flipped, Gaussian noise, ×3) with the
distilled map and with the trained one. ``--shared`` also fits (or loads, ``--shared-state``)
the same surrogate with ``shared_trunk=True`` (its trunk is the network's own, untrained, read
in the network's pass) for the same budget, and reads its kernel error. Then, interleaved in one
process (median of ``--repeat`` rounds, batch 256, ``--clock wall`` or ``cpu``: the thread's CPU
time, steadier on a shared machine): the MAP forward, ``la(x)`` (probit), ``la(x)`` with the
trained map, a ScaLLA with ``gate=False, last_layer=False, residual_variance=False``, and the
shared-trunk ``la(x)``.

    python bench/fidelity/predictive_cost.py --budget 120
    python bench/fidelity/predictive_cost.py --network wide --shared --clock cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import fastlla
from fastlla.apps.measure import CLOCKS, interleaved_latency
from fastlla.surrogate import last_layer_surrogate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_to_fidelity import NETWORKS, network  # noqa: E402


def fitted(model, train, budget: float, state: str | None, save: str | None, surrogate=None,
           redistil: bool = False):  # fmt: skip
    """A ScaLLA (the default, or with ``surrogate``) loaded from ``state`` (``redistil``: its
    map to ``H`` distilled again by this version's ``distil`` on the training inputs, the
    posterior refitted) or fitted for ``budget`` seconds (then saved to ``save``)."""
    la = fastlla.ScaLLA(model, "classification", surrogate=surrogate)
    if state:
        la.load_state_dict(torch.load(state))
        print(f"loaded {state}: settings {la.settings}")
        learned = getattr(la.surrogate, "learned", None)
        if redistil and hasattr(learned, "distil"):
            learned.distil(x for x, _ in train)
            la.fit(train, iterations=0, progress_bar=False)
            print(f"distilled again: rank {int(learned.distilled_rank)}")
        return la
    t0 = time.perf_counter()
    la.fit(train, iterations="auto", time_budget=budget, progress_bar=False)
    print(f"fit {time.perf_counter() - t0:.1f} s, {len(la.history)} steps, settings {la.settings}")
    if save:
        torch.save(la.state_dict(), save)
    return la


def shared_surrogate(la, model):
    """The surrogate ``la``'s settings describe, with ``shared_trunk=True`` (same seed)."""
    st = la.settings
    rank = None if st.last_layer is True else int(st.last_layer)
    return last_layer_surrogate(
        model, st.n_learned, la.n_outputs, la.network.n_params, rank, st.head_width,
        gated=bool(st.gate), generator=torch.Generator().manual_seed(la.seed), head=la.head,
        shared_trunk=True,
    )  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=[n for n in NETWORKS if n != "ood"], default="cnn")
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    parser.add_argument("--state", help="load the default fit from this state_dict file")
    parser.add_argument("--save", help="save the default fit's state_dict to this file")
    parser.add_argument("--redistil", action="store_true",
                        help="distil the loaded fits' maps again (this version) and refit")
    parser.add_argument("--shared", action="store_true", help="also the shared-trunk surrogate")
    parser.add_argument("--shared-state", help="load the shared-trunk fit from this file")
    parser.add_argument("--shared-save", help="save the shared-trunk fit to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds, model, _ = network(args.network, n_probe=10)
    train = ds.loader("train", 32, shuffle=True, seed=0)
    la = fitted(model, train, args.budget, args.state, args.save, redistil=args.redistil)
    learned = getattr(la.surrogate, "learned", None)
    rank = int(learned.distilled_rank) if hasattr(learned, "distilled_rank") else None
    print(f"distilled rank {rank}, M {la.n_features}")
    xt = ds.x_test[:200]
    g = torch.Generator().manual_seed(0)
    sets = {
        "test": xt, "flipped": xt.flip(-1).flip(-2),
        "noise": xt.mean() + xt.std() * torch.randn(xt.shape, generator=g), "x3": 3 * xt,
    }  # fmt: skip

    def errors(est) -> dict[str, float]:
        return {k: round(est.kernel_fidelity(v, method="exact"), 4) for k, v in sets.items()}

    print("kernel error, distilled:", errors(la))
    if rank:
        learned.undistil()
        print("kernel error, trained map:", errors(la))
        learned.use_rank(rank)
    shared = None
    if args.shared:
        shared = fitted(model, train, args.budget, args.shared_state, args.shared_save,
                        shared_surrogate(la, model), args.redistil)  # fmt: skip
        print("kernel error, shared trunk:", errors(shared))
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
    if shared is not None:
        calls["shared-trunk la(x)"] = shared
    medians = interleaved_latency(calls, x, args.repeat, clock=args.clock)
    base = medians["MAP forward"]
    print(f"{args.network}, batch {args.batch}, {args.threads} thread(s), {args.clock} clock:")
    for name, med in medians.items():
        print(f"{name:22s} {1e3 * med:8.2f} ms  {med / base:6.2f}x the MAP forward")


if __name__ == "__main__":
    main()
