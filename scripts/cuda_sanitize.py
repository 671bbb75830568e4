"""Exercise every fastlla CUDA kernel once on small inputs and compare with the reference.

Meant to run under ``compute-sanitizer`` (memcheck, racecheck) — see scripts/gpu_check.sh —
and also useful on its own as a quick CUDA smoke test::

    python scripts/cuda_sanitize.py            # exit 1 on any mismatch, 2 without CUDA kernels
    python scripts/cuda_sanitize.py --device cpu   # dry run of this script on the CPU backend

Shapes are chosen to hit the kernels' edge paths (partial 32-wide tiles, both row groups of the
loss, several row chunks, C = 1 and C > 32, a failing Cholesky downdate) while staying small,
since the sanitizer slows kernels by one to two orders of magnitude.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastlla._ops as ops  # noqa: E402
from fastlla import reference as ref  # noqa: E402

FAILURES: list[str] = []


def close(name: str, got, want, dtype) -> None:
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-9, 1e-11)
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    ok = got.shape == want.shape and err <= atol + rtol * max(scale, 1.0)
    print(f"{'ok ' if ok else 'BAD'} {name:48s} max|err|={err:.3e} (scale {scale:.3e})")
    if not ok:
        FAILURES.append(name)


def main(dev: str = "cuda") -> int:
    print(ops.backend_report())
    if dev == "cuda":
        if not torch.cuda.is_available():
            print("cuda_sanitize: torch sees no CUDA device")
            return 2
        if any(ops.BACKENDS[name].get("CUDA") != "native" for name in ops.SCHEMAS):
            print("cuda_sanitize: some ops have no native CUDA kernel (see above)")
            return 2
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dev, dtype)

    for dtype in (torch.float32, torch.float64):
        t = str(dtype).split(".")[-1]
        # ---- kernel-matching loss (+ backward): D = 37 + 5 (two column tiles, partial),
        # R = 300 split in two groups; R = 600 with M = 40 (several row chunks per group).
        for R, M, S, n_train in ((300, 37, 5, 170), (600, 40, 3, 600), (64, 1, 1, 0)):
            phi, z = randn(R, M, dtype=dtype), randn(R, S, dtype=dtype)
            close(
                f"loss {t} R={R} M={M} S={S} n={n_train}",
                ops.kernel_matching_loss(phi, z, n_train),
                ref.kernel_matching_loss(phi, z, n_train),
                dtype,
            )
            grad = torch.tensor(0.7, device=dev, dtype=dtype)
            gp, gz = torch.ops.fastlla.kernel_matching_loss_backward(grad, phi, z, n_train)
            rp, rz = ref.kernel_matching_loss_backward(grad, phi, z, n_train)
            close(f"loss_backward phi {t} R={R}", gp, rp, dtype)
            close(f"loss_backward z {t} R={R}", gz, rz, dtype)
        # non-contiguous phi (a transposed view)
        phi_t = randn(20, 50, dtype=dtype).mT
        z = randn(50, 4, dtype=dtype)
        gp, _ = torch.ops.fastlla.kernel_matching_loss_backward(
            torch.tensor(1.0, device=dev, dtype=dtype), phi_t, z, 25
        )
        rp, _ = ref.kernel_matching_loss_backward(
            torch.tensor(1.0, device=dev, dtype=dtype), phi_t, z, 25
        )
        close(f"loss_backward non-contiguous {t}", gp, rp, dtype)

        # ---- GGN accumulation: M = 45 (partial tiles), C = 3 and C = 1, with and without logits
        for N, M, C in ((70, 45, 3), (33, 8, 1)):
            phi = randn(N, M, C, dtype=dtype)
            logits = randn(N, C, dtype=dtype)
            for lg in (logits, None):
                h0 = randn(M, M, dtype=dtype)
                h_nat, h_ref = h0.clone(), h0.clone()
                ops.ggn_accumulate(h_nat, phi, lg)
                ref.ggn_accumulate(h_ref, phi, lg)
                close(f"ggn {t} N={N} M={M} C={C} logits={lg is not None}", h_nat, h_ref, dtype)

        # ---- Cholesky update / downdate (M = 70 > one warp; k = 5)
        M, k = 70, 5
        A = randn(M, M, dtype=torch.float64)
        A = (A @ A.mT + M * torch.eye(M, device=dev, dtype=torch.float64)).to(dtype)
        L = torch.linalg.cholesky(A)
        W = randn(M, k, dtype=dtype)
        close(f"cholesky_update {t}", ops.cholesky_update(L, W), ref.cholesky_update(L, W, False), dtype)
        Lw = ops.cholesky_update(L, W)
        close(
            f"cholesky_downdate {t}",
            ops.cholesky_update(Lw, W, downdate=True),
            ref.cholesky_update(Lw, W, True),
            dtype,
        )
        try:
            ops.cholesky_update(L, 10 * W, downdate=True)
            print("BAD cholesky_downdate did not raise on a non-PD result")
            FAILURES.append("cholesky_downdate raise")
        except RuntimeError as err:
            ok = "not positive definite" in str(err)
            print(f"{'ok ' if ok else 'BAD'} cholesky_downdate raises: {err}")
            if not ok:
                FAILURES.append("cholesky_downdate message")

        # ---- predictive covariance / variance: C = 3, C = 1, C = 40 (> 32: bmm path)
        for B, C in ((37, 3), (300, 1), (5, 40)):
            phi = randn(B, M, C, dtype=dtype)
            close(
                f"predictive_covariance {t} B={B} C={C}",
                ops.predictive_covariance(L, phi),
                ref.predictive_covariance(L, phi),
                dtype,
            )
            close(
                f"predictive_variance {t} B={B} C={C}",
                ops.predictive_variance(L, phi),
                ref.predictive_variance(L, phi),
                dtype,
            )

        # ---- Monte-Carlo softmax: C = 5 and C = 40 (> one warp of classes)
        for B, C, S in ((9, 5, 7), (3, 40, 4)):
            mean = randn(B, C, dtype=dtype)
            tril = torch.tril(randn(B, C, C, dtype=dtype))
            close(
                f"mc_softmax {t} B={B} C={C} S={S}",
                ops.mc_softmax(mean, tril, S, seed=-3),
                ref.mc_softmax(mean, tril, S, -3),
                dtype,
            )

        # ---- random tangents: both distributions; exact equality for Rademacher
        for dist in ("rademacher", "gaussian"):
            out_nat = torch.empty(3, 1000, device=dev, dtype=dtype)
            out_ref = torch.empty_like(out_nat)
            ops.random_tangents(out_nat, 11, 5, dist)
            ref.random_tangents(out_ref, 11, 5, dist)
            close(f"random_tangents {dist} {t}", out_nat, out_ref, dtype)
            if dist == "rademacher" and not torch.equal(out_nat, out_ref):
                print("BAD random_tangents rademacher not bit-identical")
                FAILURES.append("rademacher bits")

    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"cuda_sanitize: {len(FAILURES)} mismatches" + (f": {FAILURES}" if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    # `--device cpu` dry-runs the script itself against the CPU backend (no GPU needed).
    sys.exit(main(sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--device" else "cuda"))
