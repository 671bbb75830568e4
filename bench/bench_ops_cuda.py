"""GPU benchmark of the fastlla CUDA kernels against the pure-PyTorch reference on the same GPU.

    python bench/bench_ops_cuda.py [--json results.json] [--quick]

Times each op with CUDA events (warm-up, then enough repetitions for ~50 ms), native kernel
(``torch.ops.fastlla.*`` dispatching to csrc/cuda) versus ``fastlla.reference`` (cuBLAS and
ATen kernels), checks the two agree, and reports the native kernel's achieved rate next to the
device's peak: GFLOP/s against FP32 ~67 TFLOP/s / FP64 ~34 TFLOP/s (H100 SXM, non-tensor-core)
for the compute-shaped ops, GB/s against HBM3 ~3.35 TB/s for the memory-shaped ones.

The loss and the GGN are timed on both of their native paths (FASTLLA_CUDA_GEMM=kernel: the
fused shared-memory Gram kernel; =cublas: rows materialised once, at::mm) to place the size
threshold of ops_cuda.cpp (kCublasMinWork) from measurements.

FLOP counts are the algorithm's useful work, GEMM-equivalent (a symmetric Gram counts 2·R·D²
even though the kernel computes one triangle); bytes are the compulsory traffic (inputs read
once, outputs written once). Not part of the unit tests (scripts/gpu_check.sh runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastlla._ops as ops  # noqa: E402
from fastlla import reference as ref  # noqa: E402

PEAK = {"fp32_gflops": 67_000.0, "fp64_gflops": 34_000.0, "hbm_gbs": 3_350.0}

# The loss and the GGN choose between the fused Gram kernel and cuBLAS by size
# (ops_cuda.cpp: use_cublas); the benchmark times both paths, and "auto" is one of them.
PATHS = ("kernel", "cublas")


@contextlib.contextmanager
def gemm_path(path: str):
    old = os.environ.get("FASTLLA_CUDA_GEMM")
    os.environ["FASTLLA_CUDA_GEMM"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTLLA_CUDA_GEMM", None)
        else:
            os.environ["FASTLLA_CUDA_GEMM"] = old


def path_tag(path: str) -> str:
    return f"[{path}]"


def time_ms(fn, min_ms: float = 50.0, max_iters: int = 500) -> float:
    """Mean milliseconds per call, CUDA events around a loop of calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    iters = int(min(max(min_ms / once, 3), max_iters))
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def max_err(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(max_err(x, y) for x, y in zip(a, b))
    scale = max(b.abs().max().item(), 1e-30) if b.numel() else 1.0
    return ((a - b).abs().max().item() / scale) if b.numel() else 0.0


ROWS: list[dict] = []


def record(op, shape, dtype, native, reference, *, flops=None, bytes_=None, check=None):
    t_nat, t_ref = time_ms(native), time_ms(reference)
    row = {
        "op": op,
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "native_ms": t_nat,
        "reference_ms": t_ref,
        "speedup": t_ref / t_nat,
        "rel_err": check,
    }
    if flops is not None:
        rate = flops / (t_nat * 1e-3) / 1e9
        peak = PEAK["fp64_gflops" if dtype == torch.float64 else "fp32_gflops"]
        row.update(rate=f"{rate:,.1f} GFLOP/s", pct_peak=100 * rate / peak)
    if bytes_ is not None:
        gbs = bytes_ / (t_nat * 1e-3) / 1e9
        row.update(gbs=gbs, pct_hbm=100 * gbs / PEAK["hbm_gbs"])
        if flops is None:
            row.update(rate=f"{gbs:,.0f} GB/s", pct_peak=100 * gbs / PEAK["hbm_gbs"])
    ROWS.append(row)
    print(
        f"{op:28s} {shape:30s} {row['dtype']:8s} native {t_nat:9.4f} ms  ref {t_ref:9.4f} ms  "
        f"x{row['speedup']:6.2f}  {row.get('rate', '')}  err {check:.1e}",
        flush=True,
    )


def randn(*shape, dtype):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def bench_loss(R, M, S, dtype):
    phi, z = randn(R, M, dtype=dtype), randn(R, S, dtype=dtype) / S**0.5
    n_train = R // 2
    D = M + S
    f_nat = lambda: torch.ops.fastlla.kernel_matching_loss(phi, z, n_train)  # noqa: E731
    f_ref = lambda: ref.kernel_matching_loss(phi, z, n_train)  # noqa: E731
    shape = f"R={R} M={M} S={S}"
    g = torch.tensor(1.0, device="cuda", dtype=dtype)
    b_nat = lambda: torch.ops.fastlla.kernel_matching_loss_backward(g, phi, z, n_train)  # noqa: E731
    b_ref = lambda: ref.kernel_matching_loss_backward(g, phi, z, n_train)  # noqa: E731
    for path in PATHS:
        with gemm_path(path):
            record(f"kernel_matching_loss{path_tag(path)}", shape, dtype, f_nat, f_ref,
                   flops=2 * R * D * D, bytes_=R * D * phi.element_size(),
                   check=max_err(f_nat(), f_ref()))
            record(f"kernel_matching_loss_bwd{path_tag(path)}", shape, dtype, b_nat, b_ref,
                   flops=4 * R * D * D, bytes_=2 * R * D * phi.element_size(),
                   check=max_err(b_nat(), b_ref()))


def bench_ggn(N, M, C, dtype, with_logits=True):
    phi = randn(N, M, C, dtype=dtype) / M**0.5
    logits = randn(N, C, dtype=dtype) if with_logits else None
    h = torch.zeros(M, M, device="cuda", dtype=dtype)
    h2 = h.clone()
    f_nat = lambda: torch.ops.fastlla.ggn_accumulate(h, phi, logits)  # noqa: E731
    f_ref = lambda: ref.ggn_accumulate(h2, phi, logits)  # noqa: E731
    for path in PATHS:
        with gemm_path(path):
            a, b = h.clone().zero_(), h.clone().zero_()
            torch.ops.fastlla.ggn_accumulate(a, phi, logits)
            ref.ggn_accumulate(b, phi, logits)
            record(f"ggn_accumulate{path_tag(path)}", f"N={N} M={M} C={C} logits={with_logits}",
                   dtype, f_nat, f_ref, flops=2 * N * C * M * M,
                   bytes_=N * M * C * phi.element_size(), check=max_err(a, b))


def spd_factor(M, dtype):
    A = randn(M, M, dtype=torch.float64)
    A = A @ A.mT / M + torch.eye(M, device="cuda", dtype=torch.float64)
    return torch.linalg.cholesky(A).to(dtype)


def bench_cholesky(M, k, dtype):
    L = spd_factor(M, dtype)
    W = randn(M, k, dtype=dtype) / M**0.5
    f_nat = lambda: torch.ops.fastlla.cholesky_update(L, W, False)  # noqa: E731
    f_ref = lambda: ref.cholesky_update(L, W, False)  # noqa: E731
    record("cholesky_update", f"M={M} k={k}", dtype, f_nat, f_ref, flops=3 * M * M * k,
           check=max_err(f_nat(), f_ref()))


def bench_predictive(B, M, C, dtype):
    L = spd_factor(M, dtype)
    phi = randn(B, M, C, dtype=dtype)
    flops_solve = M * M * B * C
    for name, nat, rf, extra in (
        ("predictive_covariance", torch.ops.fastlla.predictive_covariance,
         ref.predictive_covariance, 2 * B * C * C * M),
        ("predictive_variance", torch.ops.fastlla.predictive_variance,
         ref.predictive_variance, 2 * B * C * M),
    ):
        f_nat = lambda nat=nat: nat(L, phi)  # noqa: E731
        f_ref = lambda rf=rf: rf(L, phi)  # noqa: E731
        record(name, f"B={B} M={M} C={C}", dtype, f_nat, f_ref, flops=flops_solve + extra,
               check=max_err(f_nat(), f_ref()))


def bench_mc_softmax(B, C, S, dtype):
    mean = randn(B, C, dtype=dtype)
    tril = torch.tril(randn(B, C, C, dtype=dtype)) / C
    f_nat = lambda: torch.ops.fastlla.mc_softmax(mean, tril, S, 7)  # noqa: E731
    f_ref = lambda: ref.mc_softmax(mean, tril, S, 7)  # noqa: E731
    # per (sample, input): C² multiply-adds + ~C·(2 hashes + Box–Muller + exp) ≈ 2C² + 40C
    record("mc_softmax", f"B={B} C={C} S={S}", dtype, f_nat, f_ref,
           flops=S * B * (2 * C * C + 40 * C), check=max_err(f_nat(), f_ref()))


def bench_tangents(S, P, dtype, dist):
    out = torch.empty(S, P, device="cuda", dtype=dtype)
    out2 = torch.empty_like(out)
    f_nat = lambda: torch.ops.fastlla.random_tangents(out, 3, 1, dist)  # noqa: E731
    f_ref = lambda: ref.random_tangents(out2, 3, 1, dist)  # noqa: E731
    f_nat()
    f_ref()
    record(f"random_tangents[{dist}]", f"S={S} P={P}", dtype, f_nat, f_ref,
           bytes_=S * P * out.element_size(), check=max_err(out, out2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_ops_cuda: no CUDA device")
        return 2
    print(ops.backend_report())
    native = all(ops.BACKENDS[n].get("CUDA") == "native" for n in ops.SCHEMAS)
    print(f"native CUDA kernels: {native}")
    props = torch.cuda.get_device_properties(0)
    q = 4 if args.quick else 1
    torch.manual_seed(0)

    f32, f64 = torch.float32, torch.float64
    bench_loss(2560, 128, 8, f32)  # the shape: B=256, C=10, M=128, S=8
    bench_loss(2560, 128, 8, f64)
    bench_loss(65536 // q, 256, 16, f32)
    bench_ggn(10_000 // q, 256, 10, f32)  # the shape
    bench_ggn(10_000 // q, 256, 10, f32, with_logits=False)
    bench_ggn(10_000 // q, 256, 10, f64)
    bench_cholesky(256, 10, f32)
    bench_cholesky(256, 10, f64)
    bench_cholesky(1024, 32, f32)
    bench_predictive(1024, 256, 10, f32)  # the shape
    bench_predictive(1024, 256, 10, f64)
    bench_mc_softmax(1024, 10, 256 // q, f32)
    bench_tangents(8, (1 << 23) // q, f32, "rademacher")
    bench_tangents(8, (1 << 23) // q, f32, "gaussian")

    print()
    print(f"device: {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"peaks used: FP32 {PEAK['fp32_gflops'] / 1e3:.0f} TFLOP/s, FP64 "
          f"{PEAK['fp64_gflops'] / 1e3:.0f} TFLOP/s, HBM {PEAK['hbm_gbs'] / 1e3:.2f} TB/s")
    print("| op | shape | dtype | native ms | reference ms | speedup | native rate | % peak | rel err |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in ROWS:
        print(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['native_ms']:.4f} | "
              f"{r['reference_ms']:.4f} | {r['speedup']:.2f}x | {r.get('rate', '')} | "
              f"{r.get('pct_peak', float('nan')):.1f} | {r['rel_err']:.1e} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({
                "device": props.name,
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "native_cuda_kernels": native,
                "peaks": PEAK,
                "rows": ROWS,
            }, fh, indent=1)
    return 0 if native else 2


if __name__ == "__main__":
    sys.exit(main())
