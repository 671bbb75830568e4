// Predictive covariance Σ_b = V_bᵀV_b and variance diag(Σ_b) from the whitened features
// V = L⁻¹[Φ_1 … Φ_B] (M, B·C), computed by the caller with one triangular solve (cuBLAS trsm,
// the bulk of the flops). These kernels fuse the per-input C×C products (or the squared column
// sums) over V in one pass, reading V once in whatever layout the solve returned.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace fastlla {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kWidth = 256;    // columns of V (= inputs·C) staged per block
constexpr int kRows = 16;      // rows of V staged per step
constexpr int kPerThread = 4;  // outputs per thread: a block computes up to 1024 of them

// Block: inputs [b0, b0 + nb), nb = min(bb, B − b0), bb·C ≤ kWidth, bb·C² ≤ 1024.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    whitened_gram_kernel(const T* v, int64_t sm, int64_t sc, int64_t M, int64_t B, int C,
                         int bb, T* out) {
  __shared__ T tile[kRows][kWidth + 1];
  const int64_t b0 = int64_t(blockIdx.x) * bb;
  const int nb = static_cast<int>(B - b0 < bb ? B - b0 : bb);
  const int width = nb * C, n_out = nb * C * C;
  const int t = threadIdx.x;
  const bool m_fastest = sm < sc;  // the solve returned V column-major: walk along m

  int ia[kPerThread], ib[kPerThread];
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int o = t + u * kThreads;
    if (o < n_out) {
      const int bl = o / (C * C), rem = o - bl * C * C, c1 = rem / C, c2 = rem - c1 * C;
      ia[u] = bl * C + c1;
      ib[u] = bl * C + c2;
    } else {
      ia[u] = ib[u] = 0;
    }
  }
  T acc[kPerThread];
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) acc[u] = T(0);

  const T* vb = v + b0 * C * sc;
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    for (int idx = t; idx < kRows * kWidth; idx += kThreads) {
      int mm, x;
      if (m_fastest) {
        mm = idx % kRows;
        x = idx / kRows;
      } else {
        mm = idx / kWidth;
        x = idx % kWidth;
      }
      const int64_t m = m0 + mm;
      T val = T(0);
      if (x < width && m < M) val = vb[m * sm + x * sc];
      tile[mm][x] = val;
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
#pragma unroll
      for (int mm = 0; mm < kRows; ++mm) acc[u] += tile[mm][ia[u]] * tile[mm][ib[u]];
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int o = t + u * kThreads;
    if (o < n_out) out[b0 * C * C + o] = acc[u];
  }
}

// Columns along threadIdx.x (V row-major: consecutive columns are contiguous); blockDim
// (32, 8), rows split over threadIdx.y and reduced in shared memory.
template <typename T>
__global__ void sumsq_col_fastest_kernel(const T* v, int64_t sm, int64_t sc, int64_t M,
                                         int64_t n_cols, T* out) {
  __shared__ T part[8][33];
  const int64_t col = int64_t(blockIdx.x) * 32 + threadIdx.x;
  T s = T(0);
  if (col < n_cols) {
    for (int64_t m = threadIdx.y; m < M; m += 8) {
      const T x = v[m * sm + col * sc];
      s += x * x;
    }
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < n_cols) {
    T total = T(0);
#pragma unroll
    for (int y = 0; y < 8; ++y) total += part[y][threadIdx.x];
    out[col] = total;
  }
}

// One warp per column (V column-major: each column is contiguous along m).
template <typename T>
__global__ void sumsq_m_fastest_kernel(const T* v, int64_t sm, int64_t sc, int64_t M,
                                       int64_t n_cols, T* out) {
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (col >= n_cols) return;  // whole warp
  T s = T(0);
  for (int64_t m = lane; m < M; m += 32) {
    const T x = v[m * sm + col * sc];
    s += x * x;
  }
  s = warp_sum(s);
  if (lane == 0) out[col] = s;
}

}  // namespace

template <typename scalar_t>
void whitened_gram(const scalar_t* v, int64_t stride_m, int64_t stride_col, int64_t M,
                   int64_t B, int64_t C, scalar_t* out, cudaStream_t stream) {
  if (B <= 0 || C <= 0) return;
  // Inputs per block: bb·C ≤ 256 staged columns, bb·C² ≤ 1024 outputs (C ≤ 32).
  int64_t bb = (kThreads * kPerThread) / (C * C);
  if (bb * C > kWidth) bb = kWidth / C;
  if (bb < 1) bb = 1;
  const int64_t blocks = ceil_div(B, bb);
  whitened_gram_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      v, stride_m, stride_col, M, B, static_cast<int>(C), static_cast<int>(bb), out);
}

template <typename scalar_t>
void column_sumsq(const scalar_t* v, int64_t stride_m, int64_t stride_col, int64_t M,
                  int64_t n_cols, scalar_t* out, cudaStream_t stream) {
  if (n_cols <= 0) return;
  if (stride_m < stride_col) {
    const int64_t blocks = ceil_div(n_cols * 32, 256);
    sumsq_m_fastest_kernel<scalar_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        v, stride_m, stride_col, M, n_cols, out);
  } else {
    const int64_t blocks = ceil_div(n_cols, 32);
    sumsq_col_fastest_kernel<scalar_t><<<static_cast<unsigned>(blocks), dim3(32, 8), 0, stream>>>(
        v, stride_m, stride_col, M, n_cols, out);
  }
}

#define FASTLLA_INSTANTIATE(T)                                                                 \
  template void whitened_gram<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*,    \
                                 cudaStream_t);                                                \
  template void column_sumsq<T>(const T*, int64_t, int64_t, int64_t, int64_t, T*, cudaStream_t);
FASTLLA_INSTANTIATE(float)
FASTLLA_INSTANTIATE(double)
#undef FASTLLA_INSTANTIATE

}  // namespace gpu
}  // namespace fastlla
