"""CPU benchmarks of the fastlla ops: native kernel vs the pure-PyTorch reference, same run.

    python -m pytest bench/bench_ops.py --benchmark-only -p no:cacheprovider   # pytest-benchmark
    python bench/bench_ops.py [--markdown bench/results/ops/DATE-cpu-Ncore.md] [--repeat 15]

The script form times every pair interleaved (native, reference, native, ...; best of
``--repeat``), which keeps the ratios honest on a shared, noisy machine, and measures the peak
memory of each loss variant with the profiler's memory timeline (every tensor the call creates,
alive at once), then prints (and optionally writes) a markdown table.

Sizes are those of issue 3:
  * loss: B=256, C=10 (R = 2560 rows), M=128, S=8, half the rows context points — native op,
    reference Gram identity, and the materialised B×B×C×C formulation (value, and value+gradient);
  * GGN accumulation: N=10⁴, C=10, M=256, softmax Hessian from logits;
  * predictive covariance (and variance): B=1024, C=10, M=256.
Not part of the unit tests.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from typing import Callable

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastlla._ops as ops  # noqa: E402
from fastlla import reference  # noqa: E402

F = torch.ops.fastlla
DTYPE = torch.float32


# --------------------------------------------------------------------------- inputs
def loss_inputs(B=256, C=10, M=128, S=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(B * C, M, generator=g, dtype=DTYPE) / M**0.5
    z = torch.randn(B * C, S, generator=g, dtype=DTYPE) / S**0.5
    return phi, z, (B // 2) * C, (B, C)


def ggn_inputs(N=10_000, C=10, M=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(N, M, C, generator=g, dtype=DTYPE)
    logits = torch.randn(N, C, generator=g, dtype=DTYPE)
    return torch.zeros(M, M, dtype=DTYPE), phi, logits


def predictive_inputs(B=1024, C=10, M=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, M, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(x @ x.T / M + torch.eye(M, dtype=torch.float64)).to(DTYPE)
    phi = torch.randn(B, M, C, generator=g, dtype=DTYPE)
    return L, phi


# --------------------------------------------------------------------------- loss variants
def materialised_loss(phi, z, n_train, B, C):
    """The authors' formulation: the B×B×C×C tensors of Q and K̂, cross blocks zeroed."""
    g = phi.reshape(B, C, -1)
    zz = z.reshape(B, C, -1)
    q = torch.einsum("icm,jdm->ijcd", g, g)
    k = torch.einsum("ics,jds->ijcd", zz, zz)
    b_train = n_train // C
    group = torch.arange(B) < b_train
    same = (group[:, None] == group[None, :]).to(phi.dtype)[:, :, None, None]
    return ((q - k * same) ** 2).mean()


def loss_variants(phi, z, n_train, B, C) -> dict[str, Callable[[], torch.Tensor]]:
    return {
        "native": lambda: F.kernel_matching_loss(phi, z, n_train),
        "reference": lambda: reference.kernel_matching_loss(phi, z, n_train),
        "materialised": lambda: materialised_loss(phi, z, n_train, B, C),
    }


def loss_step_variants(phi, z, n_train, B, C) -> dict[str, Callable[[], None]]:
    """Value and gradient with respect to phi (one training step's loss work)."""
    p = phi.detach().clone().requires_grad_()

    def native():
        p.grad = None
        ops.kernel_matching_loss(p, z, n_train).backward()

    def ref():
        p.grad = None
        q = p.detach().requires_grad_()
        reference.kernel_matching_loss(q, z, n_train).backward()

    def mat():
        p.grad = None
        materialised_loss(p, z, n_train, B, C).backward()

    return {"native": native, "reference": ref, "materialised": mat}


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of the tensors created by ``fn`` alive at once (profiler memory timeline)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


# --------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module")
def loss_data():
    return loss_inputs()


@pytest.mark.benchmark(group="loss forward B=256 C=10 M=128 S=8")
@pytest.mark.parametrize("impl", ["native", "reference", "materialised"])
def test_loss_forward(benchmark, loss_data, impl):
    benchmark(loss_variants(*loss_data[:3], *loss_data[3])[impl])


@pytest.mark.benchmark(group="loss value+grad B=256 C=10 M=128 S=8")
@pytest.mark.parametrize("impl", ["native", "reference", "materialised"])
def test_loss_value_and_grad(benchmark, loss_data, impl):
    fn = loss_step_variants(*loss_data[:3], *loss_data[3])[impl]
    benchmark(fn)
    benchmark.extra_info["peak_bytes"] = peak_memory_bytes(fn)


@pytest.fixture(scope="module")
def ggn_data():
    return ggn_inputs()


@pytest.mark.benchmark(group="ggn_accumulate N=1e4 C=10 M=256")
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_ggn_accumulate(benchmark, ggn_data, impl):
    h, phi, logits = ggn_data
    fn = F.ggn_accumulate if impl == "native" else reference.ggn_accumulate
    benchmark(fn, h, phi, logits)


@pytest.fixture(scope="module")
def predictive_data():
    return predictive_inputs()


@pytest.mark.benchmark(group="predictive_covariance B=1024 C=10 M=256")
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_predictive_covariance(benchmark, predictive_data, impl):
    fn = F.predictive_covariance if impl == "native" else reference.predictive_covariance
    benchmark(fn, *predictive_data)


@pytest.mark.benchmark(group="predictive_variance B=1024 C=10 M=256")
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_predictive_variance(benchmark, predictive_data, impl):
    fn = F.predictive_variance if impl == "native" else reference.predictive_variance
    benchmark(fn, *predictive_data)


# --------------------------------------------------------------------------- script form
CLOCK = time.perf_counter


def interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best time (ms, of CLOCK) of each function, calls interleaved round-robin."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = CLOCK()
            fn()
            best[k] = min(best[k], (CLOCK() - t0) * 1e3)
    return best


def run(repeat: int) -> list[dict]:
    rows = []

    def add(op, shape, times, base="native", peak=None):
        for impl, ms in times.items():
            row = dict(op=op, shape=shape, impl=impl, ms=ms, ratio=ms / times[base])
            if peak is not None:
                row["peak_bytes"] = peak[impl]
            rows.append(row)

    phi, z, n_train, (B, C) = loss_inputs()
    shape = "B=256 C=10 M=128 S=8, half context"
    # The materialised variant (100 MiB of temporaries) is timed on its own: interleaved with
    # the others it would evict their inputs from the caches on every round.
    def loss_times(variants, n_mat):
        times = interleaved({k: variants[k] for k in ("native", "reference")}, repeat)
        times.update(interleaved({"materialised": variants["materialised"]}, n_mat))
        return times

    variants = loss_variants(phi, z, n_train, B, C)
    add("kernel_matching_loss (value)", shape, loss_times(variants, max(3, repeat // 3)),
        peak={k: peak_memory_bytes(fn) for k, fn in variants.items()})
    steps = loss_step_variants(phi, z, n_train, B, C)
    add("kernel_matching_loss (value+grad)", shape, loss_times(steps, max(3, repeat // 3)),
        peak={k: peak_memory_bytes(fn) for k, fn in steps.items()})

    h, gphi, logits = ggn_inputs()
    add("ggn_accumulate", "N=1e4 C=10 M=256, softmax", interleaved({
        "native": lambda: F.ggn_accumulate(h, gphi, logits),
        "reference": lambda: reference.ggn_accumulate(h, gphi, logits),
    }, max(3, repeat // 3)))
    add("ggn_accumulate", "N=1e4 C=10 M=256, identity", interleaved({
        "native": lambda: F.ggn_accumulate(h, gphi, None),
        "reference": lambda: reference.ggn_accumulate(h, gphi, None),
    }, max(3, repeat // 3)))
    del gphi

    L, pphi = predictive_inputs()
    add("predictive_covariance", "B=1024 C=10 M=256", interleaved({
        "native": lambda: F.predictive_covariance(L, pphi),
        "reference": lambda: reference.predictive_covariance(L, pphi),
    }, repeat))
    add("predictive_variance", "B=1024 C=10 M=256", interleaved({
        "native": lambda: F.predictive_variance(L, pphi),
        "reference": lambda: reference.predictive_variance(L, pphi),
    }, repeat))
    return rows


def markdown(rows: list[dict], repeat: int, threads: int | None = None, clock: str = "wall") -> str:
    flag = f" --threads {threads}" if threads else ""
    flag += f" --clock {clock}" if clock != "wall" else ""
    lines = [
        f"# fastlla CPU ops — native vs reference ({_dt.date.today().isoformat()})",
        "",
        f"- machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, float32, "
        f"{'process CPU time' if clock == 'cpu' else 'wall time'}",
        f"- native library loaded: {ops.NATIVE_LOADED}",
        f"- command: `python bench/bench_ops.py --repeat {repeat}{flag} --markdown <this file>` "
        "(best of the repeats, calls interleaved)",
        "- `× native` = time of that implementation / time of the native kernel "
        "(> 1: native is faster)",
        "",
        "| op | shape | impl | ms | × native | peak memory |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:.2f} MiB" if "peak_bytes" in r else ""
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['impl']} | {r['ms']:.3f} | {r['ratio']:.2f} "
            f"| {peak} |"
        )
    for kind in ("value", "value+grad"):
        peaks = {r["impl"]: r["peak_bytes"] for r in rows
                 if "peak_bytes" in r and r["op"].endswith(f"({kind})")}
        if peaks.get("native"):
            lines.append(
                f"\nPeak memory, loss {kind}: materialised / native = "
                f"{peaks['materialised'] / peaks['native']:.0f}×, "
                f"reference / native = {peaks['reference'] / peaks['native']:.2f}×."
            )
    grad = {r["impl"]: r["peak_bytes"] for r in rows
            if "peak_bytes" in r and r["op"].endswith("(value+grad)")}
    if grad.get("native"):
        # The gradient (R·M floats) is an output every formulation must return, so the total
        # ratio can never exceed materialised / gradient; the workspace ratio compares the rest.
        phi = loss_inputs()[0]
        grad_bytes = phi.numel() * phi.element_size()
        lines.append(
            f"\nThe value+grad peaks include the returned gradient itself, "
            f"{grad_bytes / 2**20:.2f} MiB = R·M float32, which every formulation must produce: "
            f"even a zero-workspace kernel would reach only "
            f"{grad['materialised'] / grad_bytes:.0f}× in total. Workspace beyond the gradient: "
            f"materialised / native = "
            f"{(grad['materialised'] - grad_bytes) / max(grad['native'] - grad_bytes, 1):.0f}×."
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall: perf_counter; cpu: process CPU time (with --threads 1, immune to other "
        "processes taking the cores, which a shared machine's wall time is not)",
    )
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ops.NATIVE_LOADED:
        print("warning: the compiled library is not loaded; 'native' is the reference")
    text = markdown(run(args.repeat), args.repeat, args.threads, args.clock)
    print(text)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
