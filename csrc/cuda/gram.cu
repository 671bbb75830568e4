// Gram kernels: kernel-matching loss (forward and backward) and GGN accumulation.
//
// Both ops reduce to G += Σ_rows x_rᵀ x_r for rows x_r ∈ R^D that a loader forms on the fly:
//   loss: x_r = [φ_r z_r] (D = M + S), one Gram per row group (training / context rows);
//   GGN:  x_(n,c) = √p_nc (Φ_n[:, c] − Φ_n p_n) (softmax Hessian) or Φ_n[:, c] (identity).
// gram_kernel: one block per (32×32 output tile on or above the diagonal, chunk of rows);
// 256 threads stage 32 rows × 32 columns of each side in shared memory and accumulate 2×2
// outputs each; the partial tile is added (and mirrored) into G with atomics. No R×R (BC×BC)
// buffer exists anywhere: memory is O(D²) beyond the inputs.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace fastlla {
namespace gpu {
namespace {

constexpr int kTile = 32;      // output tile edge
constexpr int kStage = 32;     // rows staged in shared memory per step
constexpr int kThreads = 256;  // 16 × 16 threads, 2 × 2 outputs each
constexpr int kMinChunk = 256; // rows per block at least (amortises the tile's atomics)

__device__ __forceinline__ int64_t ceil_div_dev(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------- loaders
// A loader maps (row, column) to x[row, column]; row() precomputes per-row state once.
// kRowFastest: lay consecutive threads along rows (the column stride is large) rather than
// along columns.
template <typename T>
struct LossRows {
  static constexpr bool kRowFastest = false;
  const T* phi;
  const T* z;
  int64_t M, S;
  struct Row {
    const T* phi;
    const T* z;
  };
  __device__ Row row(int64_t r) const { return {phi + r * M, z + r * S}; }
  __device__ T at(const Row& w, int64_t col) const {
    return col < M ? w.phi[col] : w.z[col - M];
  }
};

template <typename T>
struct GgnRows {
  static constexpr bool kRowFastest = true;
  const T* phi;     // (N, M, C)
  const T* sqrt_p;  // (N, C) or null
  const T* m;       // (N, M) or null
  int64_t M, C;
  struct Row {
    const T* phi;  // &phi[n, 0, c]
    const T* m;    // &m[n, 0]
    T sp;
  };
  __device__ Row row(int64_t r) const {
    const int64_t n = r / C, c = r - n * C;
    Row w{phi + n * M * C + c, nullptr, T(1)};
    if (sqrt_p != nullptr) {
      w.m = m + n * M;
      w.sp = sqrt_p[r];
    }
    return w;
  }
  __device__ T at(const Row& w, int64_t i) const {
    const T v = w.phi[i * C];
    return w.m != nullptr ? w.sp * (v - w.m[i]) : v;
  }
};

struct GroupSpec {
  int64_t begin, count, n_chunks;
};

// grid.x: tile pairs (ti ≤ tj) of the T×T tile grid; grid.y: chunks of group 0 then group 1.
template <typename T, typename Loader>
__global__ void __launch_bounds__(kThreads)
    gram_kernel(Loader load, int64_t D, int64_t n_tiles, int64_t chunk, GroupSpec g0,
                GroupSpec g1, T* out0, T* out1) {
  __shared__ T As[kStage][kTile + 1];
  __shared__ T Bs[kStage][kTile + 1];

  // Which tile pair.
  int64_t p = blockIdx.x, ti = 0;
  while (p >= n_tiles - ti) {
    p -= n_tiles - ti;
    ++ti;
  }
  const int64_t tj = ti + p;
  const int64_t i0 = ti * kTile, j0 = tj * kTile;

  // Which rows.
  const bool second = blockIdx.y >= g0.n_chunks;
  const GroupSpec g = second ? g1 : g0;
  T* out = second ? out1 : out0;
  const int64_t c_idx = second ? blockIdx.y - g0.n_chunks : blockIdx.y;
  const int64_t r_begin = g.begin + c_idx * chunk;
  const int64_t r_end = min(g.begin + g.count, r_begin + chunk);

  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  T acc[2][2] = {{T(0), T(0)}, {T(0), T(0)}};

  for (int64_t r0 = r_begin; r0 < r_end; r0 += kStage) {
    if (Loader::kRowFastest) {
      // One row per thread (t % 32), columns t / 32 + 8u.
      const int k = t & 31;
      const int64_t r = r0 + k;
      const bool ok = r < r_end;
      typename Loader::Row w{};
      if (ok) w = load.row(r);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int col = (t >> 5) + 8 * u;
        As[k][col] = (ok && i0 + col < D) ? load.at(w, i0 + col) : T(0);
        Bs[k][col] = (ok && j0 + col < D) ? load.at(w, j0 + col) : T(0);
      }
    } else {
      // One column per thread (t % 32), rows t / 32 + 8u.
      const int col = t & 31;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int k = (t >> 5) + 8 * u;
        const int64_t r = r0 + k;
        T a = T(0), b = T(0);
        if (r < r_end) {
          const typename Loader::Row w = load.row(r);
          if (i0 + col < D) a = load.at(w, i0 + col);
          if (j0 + col < D) b = load.at(w, j0 + col);
        }
        As[k][col] = a;
        Bs[k][col] = b;
      }
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kStage; ++k) {
      const T a0 = As[k][ty], a1 = As[k][ty + 16];
      const T b0 = Bs[k][tx], b1 = Bs[k][tx + 16];
      acc[0][0] += a0 * b0;
      acc[0][1] += a0 * b1;
      acc[1][0] += a1 * b0;
      acc[1][1] += a1 * b1;
    }
    __syncthreads();
  }

#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int64_t i = i0 + ty + 16 * a, j = j0 + tx + 16 * b;
      if (i < D && j < D) {
        atomicAdd(out + i * D + j, acc[a][b]);
        if (ti != tj) atomicAdd(out + j * D + i, acc[a][b]);
      }
    }
  }
}

// Enqueue gram_kernel over up to two row groups (count 0 = absent).
template <typename T, typename Loader>
void launch_gram(const Loader& load, int64_t D, int64_t begin0, int64_t count0, T* out0,
                 int64_t begin1, int64_t count1, T* out1, cudaStream_t stream) {
  const int64_t rows = count0 + count1;
  if (D <= 0 || rows <= 0) return;
  const int64_t n_tiles = ceil_div(D, kTile);
  const int64_t pairs = n_tiles * (n_tiles + 1) / 2;
  // About 4 blocks per multiprocessor in all; at least kMinChunk rows per block; grid.y ≤ 65535.
  const int64_t target_chunks = ceil_div(4 * static_cast<int64_t>(num_sms()), pairs);
  int64_t chunk = ceil_div(rows, target_chunks);
  chunk = ceil_div(chunk, kStage) * kStage;
  if (chunk < kMinChunk) chunk = kMinChunk;
  while (ceil_div(count0, chunk) + ceil_div(count1, chunk) > 65535) chunk *= 2;
  const GroupSpec g0{begin0, count0, ceil_div(count0, chunk)};
  const GroupSpec g1{begin1, count1, ceil_div(count1, chunk)};
  const dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(g0.n_chunks + g1.n_chunks));
  gram_kernel<T, Loader><<<grid, kThreads, 0, stream>>>(load, D, n_tiles, chunk, g0, g1, out0,
                                                        out1);
}

// ---------------------------------------------------------------------------- loss
constexpr int kReduceThreads = 256;

// acc += Σ over the (D, D) Grams of: (G0 + G1)² on the ΦΦ block, G0² + G1² on the ZZ block,
// −(G0² + G1²) on the ΦZ and ZΦ blocks (= −2Σ‖Φ_gᵀZ_g‖²).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    loss_reduce_kernel(const T* g0, const T* g1, int64_t M, int64_t D, double* acc) {
  __shared__ double scratch[33];
  double v = 0;
  const int64_t n = D * D;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / D, j = e - i * D;
    const double a = g0[e], b = g1[e];
    if (i < M && j < M) {
      v += (a + b) * (a + b);
    } else if (i >= M && j >= M) {
      v += a * a + b * b;
    } else {
      v -= a * a + b * b;
    }
  }
  v = block_reduce<double, false>(v, scratch);
  if (threadIdx.x == 0) atomicAdd(acc, v);
}

template <typename T>
__global__ void loss_finish_kernel(const double* acc, double inv_r2, T* out) {
  out[0] = static_cast<T>(acc[0] * inv_r2);
}

// [grad_phi_r grad_z_r] = scale · x_r K_g; grid.x: 32-column tiles of D, grid.y: 32-row tiles
// of group 0 then group 1. K_g formed on the fly from the Grams.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    loss_backward_kernel(const T* grad, const T* phi, const T* z, int64_t R, int64_t M,
                         int64_t S, int64_t n_train, int64_t row_tiles0, const T* gram,
                         T* grad_phi, T* grad_z) {
  __shared__ T Xs[kTile][kTile + 1];  // [row][k]
  __shared__ T Ks[kTile][kTile + 1];  // [k][column]
  const int64_t D = M + S;
  const int64_t row_tiles = row_tiles0 + ceil_div_dev(R - n_train, kTile);
  for (int64_t y = blockIdx.y; y < row_tiles; y += gridDim.y) {
  const bool second = y >= row_tiles0;
  const int64_t r_begin = second ? n_train + (y - row_tiles0) * kTile : y * kTile;
  const int64_t r_end = second ? R : n_train;
  const T* G = gram + (second ? D * D : 0);      // this group's Gram
  const T* Go = gram + (second ? 0 : D * D);     // the other group's Gram
  const int64_t j0 = int64_t(blockIdx.x) * kTile;
  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  const LossRows<T> load{phi, z, M, S};

  T acc[2][2] = {{T(0), T(0)}, {T(0), T(0)}};
  for (int64_t k0 = 0; k0 < D; k0 += kTile) {
    const int lc = t & 31;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int lr = (t >> 5) + 8 * u;
      // X tile: row r_begin + lr, column k0 + lc.
      const int64_t r = r_begin + lr, k = k0 + lc;
      T x = T(0);
      if (r < r_end && k < D) x = load.at(load.row(r), k);
      Xs[lr][lc] = x;
      // K tile: row k0 + lr, column j0 + lc.
      const int64_t kk = k0 + lr, j = j0 + lc;
      T kv = T(0);
      if (kk < D && j < D) {
        const int64_t e = kk * D + j;
        const bool kphi = kk < M, jphi = j < M;
        if (kphi && jphi) {
          kv = G[e] + Go[e];
        } else if (!kphi && !jphi) {
          kv = G[e];
        } else {
          kv = -G[e];
        }
      }
      Ks[lr][lc] = kv;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kTile; ++k) {
      const T a0 = Xs[ty][k], a1 = Xs[ty + 16][k];
      const T b0 = Ks[k][tx], b1 = Ks[k][tx + 16];
      acc[0][0] += a0 * b0;
      acc[0][1] += a0 * b1;
      acc[1][0] += a1 * b0;
      acc[1][1] += a1 * b1;
    }
    __syncthreads();
  }

  const T scale = T(4) * grad[0] / (static_cast<T>(R) * static_cast<T>(R));
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const int64_t r = r_begin + ty + 16 * a;
    if (r >= r_end) continue;
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int64_t j = j0 + tx + 16 * b;
      if (j >= D) continue;
      const T v = scale * acc[a][b];
      if (j < M) {
        grad_phi[r * M + j] = v;
      } else {
        grad_z[r * S + (j - M)] = v;
      }
    }
  }
  }  // row tiles
}

// ---------------------------------------------------------------------------- GGN
constexpr int kStatsThreads = 128;

// One block per input n: p = softmax(logits_n) (written to sqrt_p first), m_n = Φ_n p, then
// sqrt_p = √p.
template <typename T>
__global__ void __launch_bounds__(kStatsThreads)
    ggn_stats_kernel(const T* phi, const T* logits, int64_t M, int64_t C, T* sqrt_p, T* m) {
  __shared__ double scratch[33];
  const int64_t n = blockIdx.x;
  const T* lg = logits + n * C;
  T* p = sqrt_p + n * C;
  double mx = -INFINITY;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) mx = fmax(mx, double(lg[c]));
  mx = block_reduce<double, true>(mx, scratch);
  const T mxt = static_cast<T>(mx);
  double sum = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) sum += double(exp(lg[c] - mxt));
  sum = block_reduce<double, false>(sum, scratch);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    p[c] = static_cast<T>(double(exp(lg[c] - mxt)) / sum);
  }
  __syncthreads();
  const T* ph = phi + n * M * C;
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    T s = T(0);
    for (int64_t c = 0; c < C; ++c) s += ph[i * C + c] * p[c];
    m[n * M + i] = s;
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) p[c] = sqrt(p[c]);
}

}  // namespace

// ---------------------------------------------------------------------------- launchers
template <typename scalar_t>
void loss_gram(const scalar_t* phi, const scalar_t* z, int64_t R, int64_t M, int64_t S,
               int64_t n_train, scalar_t* gram, cudaStream_t stream) {
  const int64_t D = M + S;
  const LossRows<scalar_t> load{phi, z, M, S};
  launch_gram<scalar_t>(load, D, 0, n_train, gram, n_train, R - n_train, gram + D * D, stream);
}

template <typename scalar_t>
void loss_from_gram(const scalar_t* gram, int64_t R, int64_t M, int64_t S, double* acc,
                    scalar_t* out, cudaStream_t stream) {
  const int64_t D = M + S;
  if (D > 0) {
    int64_t blocks = ceil_div(D * D, 4 * kReduceThreads);
    if (blocks > 4 * num_sms()) blocks = 4 * num_sms();
    loss_reduce_kernel<scalar_t><<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(
        gram, gram + D * D, M, D, acc);
  }
  const double inv_r2 = R > 0 ? 1.0 / (static_cast<double>(R) * static_cast<double>(R)) : 0.0;
  loss_finish_kernel<scalar_t><<<1, 1, 0, stream>>>(acc, inv_r2, out);
}

template <typename scalar_t>
void loss_backward(const scalar_t* grad, const scalar_t* phi, const scalar_t* z, int64_t R,
                   int64_t M, int64_t S, int64_t n_train, const scalar_t* gram,
                   scalar_t* grad_phi, scalar_t* grad_z, cudaStream_t stream) {
  const int64_t D = M + S;
  if (D <= 0 || R <= 0) return;
  const int64_t tiles0 = ceil_div(n_train, kTile), tiles1 = ceil_div(R - n_train, kTile);
  const int64_t col_tiles = ceil_div(D, kTile);
  const int64_t row_tiles = tiles0 + tiles1 < 65535 ? tiles0 + tiles1 : 65535;  // loops beyond
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
  loss_backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      grad, phi, z, R, M, S, n_train, tiles0, gram, grad_phi, grad_z);
}

template <typename scalar_t>
void ggn_softmax_stats(const scalar_t* phi, const scalar_t* logits, int64_t N, int64_t M,
                       int64_t C, scalar_t* sqrt_p, scalar_t* m, cudaStream_t stream) {
  if (N <= 0) return;
  ggn_stats_kernel<scalar_t>
      <<<static_cast<unsigned>(N), kStatsThreads, 0, stream>>>(phi, logits, M, C, sqrt_p, m);
}

template <typename scalar_t>
void ggn_gram(const scalar_t* phi, const scalar_t* sqrt_p, const scalar_t* m, int64_t N,
              int64_t M, int64_t C, scalar_t* h, cudaStream_t stream) {
  const GgnRows<scalar_t> load{phi, sqrt_p, m, M, C};
  launch_gram<scalar_t>(load, M, 0, N * C, h, 0, 0, h, stream);
}

#define FASTLLA_INSTANTIATE(T)                                                                 \
  template void loss_gram<T>(const T*, const T*, int64_t, int64_t, int64_t, int64_t, T*,       \
                             cudaStream_t);                                                    \
  template void loss_from_gram<T>(const T*, int64_t, int64_t, int64_t, double*, T*,            \
                                  cudaStream_t);                                               \
  template void loss_backward<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t,      \
                                 int64_t, const T*, T*, T*, cudaStream_t);                     \
  template void ggn_softmax_stats<T>(const T*, const T*, int64_t, int64_t, int64_t, T*, T*,    \
                                     cudaStream_t);                                            \
  template void ggn_gram<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t, T*,       \
                            cudaStream_t);
FASTLLA_INSTANTIATE(float)
FASTLLA_INSTANTIATE(double)
#undef FASTLLA_INSTANTIATE

}  // namespace gpu
}  // namespace fastlla
