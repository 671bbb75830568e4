// CUDA kernels of fastlla: plain launch functions on raw pointers.
//
// This header and the .cu files that implement it include only the CUDA runtime (no torch
// headers), so every kernel compiles in seconds with a bare nvcc (scripts/check_cuda_compile.sh).
// The torch-facing side — input checks, device guard, current stream, allocation of outputs and
// scratch, dispatch over float/double, launch checks — lives in ops_cuda.cpp.
//
// Conventions (see fastlla/reference.py, the oracle of every op):
//   * every pointer is to a contiguous row-major buffer on the current device unless a stride is
//     passed; scalar_t is float or double (explicit instantiations in the .cu files);
//   * each launch function enqueues its kernels on `stream` and returns without synchronising;
//     the caller checks cudaGetLastError() (C10_CUDA_KERNEL_LAUNCH_CHECK) afterwards;
//   * scratch buffers are allocated by the caller (the torch caching allocator) and, where said,
//     zeroed by the caller.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastlla {
namespace gpu {

// ---------------------------------------------------------------------------- Gram of rows
// The loss and the GGN both reduce to a symmetric Gram G += Σ_rows x_rᵀ x_r of "virtual" rows
// x_r ∈ R^D that a loader forms on the fly; the Gram kernel tiles it (shared memory, upper
// triangle of 32×32 tiles only, mirrored) over chunks of rows and adds its partial tiles into G
// with atomics.

/// Kernel-matching loss, stage 1: per group g ∈ {0 (rows [0, n_train)), 1 (rows [n_train, R))}
/// the Gram G_g = X_gᵀX_g of X = [Φ Z] (D = M + S). `gram` is (2, D, D), zeroed by the caller.
template <typename scalar_t>
void loss_gram(const scalar_t* phi, const scalar_t* z, int64_t R, int64_t M, int64_t S,
               int64_t n_train, scalar_t* gram, cudaStream_t stream);

/// Kernel-matching loss, stage 2: out[0] = (‖ΣG_g^ΦΦ‖² − 2Σ‖G_g^ΦZ‖² + Σ‖G_g^ZZ‖²) / R² from
/// `gram` (2, D, D). `acc` is one double of scratch, zeroed by the caller.
template <typename scalar_t>
void loss_from_gram(const scalar_t* gram, int64_t R, int64_t M, int64_t S, double* acc,
                    scalar_t* out, cudaStream_t stream);

/// Kernel-matching loss backward, given `gram` from loss_gram: for every row r of group g,
/// [grad_phi_r grad_z_r] = (4 grad/R²) x_r K_g with K_g = [[ΣG^ΦΦ, −G_g^ΦZ], [−G_g^ZΦ, G_g^ZZ]].
/// `grad` points to one scalar on the device.
template <typename scalar_t>
void loss_backward(const scalar_t* grad, const scalar_t* phi, const scalar_t* z, int64_t R,
                   int64_t M, int64_t S, int64_t n_train, const scalar_t* gram,
                   scalar_t* grad_phi, scalar_t* grad_z, cudaStream_t stream);

// ---------------------------------------------------------------------------- GGN
/// Softmax statistics for ggn_accumulate: sqrt_p (N, C) = √softmax(logits_n) and
/// m (N, M) = Φ_n p_n.
template <typename scalar_t>
void ggn_softmax_stats(const scalar_t* phi, const scalar_t* logits, int64_t N, int64_t M,
                       int64_t C, scalar_t* sqrt_p, scalar_t* m, cudaStream_t stream);

/// In place h (M, M) += Σ_{n,c} y_nc y_ncᵀ with y_nc = √p_nc (Φ_n[:, c] − m_n) when sqrt_p/m
/// are given (= Σ_n Φ_n (diag p_n − p_n p_nᵀ) Φ_nᵀ), y_nc = Φ_n[:, c] when sqrt_p and m
/// are null (identity Hessian). phi (N, M, C).
template <typename scalar_t>
void ggn_gram(const scalar_t* phi, const scalar_t* sqrt_p, const scalar_t* m, int64_t N, int64_t M,
              int64_t C, scalar_t* h, cudaStream_t stream);

// ---------------------------------------------------------------------------- Cholesky
/// Rank-k update (or downdate) in place of U = Lᵀ (M, M), row j of U = column j of L, upper
/// triangle meaningful: U ← chol(LLᵀ ± WWᵀ)ᵀ through k sequential rank-1 rotations, all k
/// applied per column before moving on (one block; one barrier per column). `wt` (k, M) holds
/// Wᵀ and is overwritten. `*flag` (zeroed by the caller) becomes 1 when a pivot is not positive.
template <typename scalar_t>
void cholesky_update(scalar_t* U, scalar_t* wt, int64_t M, int64_t k, bool downdate, int* flag,
                     cudaStream_t stream);

// ---------------------------------------------------------------------------- predictive
/// Σ_b[c1, c2] = Σ_m V[m, b, c1] V[m, b, c2] where V[m, b, c] = v[m * stride_m + (b C + c) *
/// stride_col] (V = L⁻¹Φ from a triangular solve). out (B, C, C). Requires C ≤ 32.
template <typename scalar_t>
void whitened_gram(const scalar_t* v, int64_t stride_m, int64_t stride_col, int64_t M,
                   int64_t B, int64_t C, scalar_t* out, cudaStream_t stream);

/// out[col] = Σ_m v[m * stride_m + col * stride_col]², col < n_cols (the diagonal variant).
template <typename scalar_t>
void column_sumsq(const scalar_t* v, int64_t stride_m, int64_t stride_col, int64_t M,
                  int64_t n_cols, scalar_t* out, cudaStream_t stream);

constexpr int64_t kWhitenedGramMaxC = 32;

// ---------------------------------------------------------------------------- random numbers
/// out (B, C) = (1/S) Σ_s softmax(mean_b + scale_tril_b ε_sb), ε_{s,b,c} the Box–Muller normal
/// of hash4(seed, s, 2b, c), hash4(seed, s, 2b + 1, c). One warp per input. `work` is scratch
/// of 3·B·C doubles (no initialisation needed).
template <typename scalar_t>
void mc_softmax(const scalar_t* mean, const scalar_t* scale_tril, int64_t B, int64_t C,
                int64_t n_samples, int64_t seed, double* work, scalar_t* out,
                cudaStream_t stream);

/// Fill out (S, P): gaussian ? normal(seed, step, s, p) : ±1 from hash4(seed, step, 2s, p).
template <typename scalar_t>
void random_tangents(scalar_t* out, int64_t S, int64_t P, int64_t seed, int64_t step,
                     bool gaussian, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastlla
