// Counter-based random numbers: random tangents and the Monte-Carlo softmax predictive.
//
// Every number is a pure function of its counters (seed, step, row, col) through hash4 (see
// common.cuh), bit-identical to fastlla.reference.hash4, so the CUDA, CPU and reference
// backends draw the same tangents and the same Monte-Carlo normals.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace fastlla {
namespace gpu {
namespace {

constexpr int kTangentThreads = 256;
constexpr int kSoftmaxThreads = 128;  // 4 warps, one input each

// grid.x strides over columns p, grid.y over rows s. Per row, the third hash round is shared.
template <typename T>
__global__ void __launch_bounds__(kTangentThreads)
    random_tangents_kernel(T* out, int64_t S, int64_t P, uint32_t hab, bool gaussian) {
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    const uint32_t h0 = mix32(hab ^ static_cast<uint32_t>(2 * s));
    const uint32_t h1 = mix32(hab ^ static_cast<uint32_t>(2 * s + 1));
    T* row = out + s * P;
    for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < P;
         p += int64_t(gridDim.x) * blockDim.x) {
      const uint32_t d = static_cast<uint32_t>(p);
      T v;
      if (gaussian) {
        v = static_cast<T>(box_muller(hash_d(h0, d), hash_d(h1, d)));
      } else {
        v = (hash_d(h0, d) >> 31) ? T(-1) : T(1);
      }
      row[p] = v;
    }
  }
}

// One warp per input b; loops over the samples. Per sample: ε (C normals, rounded to T as the
// reference rounds them), f = mean_b + scale_tril_b ε (the full C×C product, as the reference's
// matmul), p = softmax(f), acc += p. Scratch per input: ε, f/exp(f − max), acc (3C doubles,
// written and read by the same warp; L1-resident for the usual small C).
template <typename T>
__global__ void __launch_bounds__(kSoftmaxThreads)
    mc_softmax_kernel(const T* mean, const T* scale_tril, int64_t B, int64_t C, int64_t n_samples,
                      int64_t seed, double* work, T* out) {
  const int64_t b = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (b >= B) return;  // whole warp
  double* eps = work + b * 3 * C;
  double* f = eps + C;
  double* acc = f + C;
  const T* mb = mean + b * C;
  const T* Lb = scale_tril + b * C * C;
  for (int64_t c = lane; c < C; c += 32) acc[c] = 0.0;
  const uint32_t c_lo = static_cast<uint32_t>(2 * b), c_hi = static_cast<uint32_t>(2 * b + 1);

  for (int64_t s = 0; s < n_samples; ++s) {
    const uint32_t hab = hash_ab(seed, s);
    const uint32_t h0 = mix32(hab ^ c_lo), h1 = mix32(hab ^ c_hi);
    for (int64_t c = lane; c < C; c += 32) {
      const uint32_t d = static_cast<uint32_t>(c);
      eps[c] = static_cast<double>(static_cast<T>(box_muller(hash_d(h0, d), hash_d(h1, d))));
    }
    __syncwarp();
    T mx = -INFINITY;
    for (int64_t c = lane; c < C; c += 32) {
      const T* Lrow = Lb + c * C;
      T dot = T(0);
      for (int64_t e = 0; e < C; ++e) dot += Lrow[e] * static_cast<T>(eps[e]);
      const T fv = mb[c] + dot;
      f[c] = static_cast<double>(fv);
      mx = fmax(mx, fv);
    }
    mx = warp_max(mx);
    T sum = T(0);
    for (int64_t c = lane; c < C; c += 32) {
      const T e = exp(static_cast<T>(f[c]) - mx);
      f[c] = static_cast<double>(e);
      sum += e;
    }
    sum = warp_sum(sum);
    for (int64_t c = lane; c < C; c += 32) acc[c] += static_cast<double>(static_cast<T>(f[c]) / sum);
    __syncwarp();  // every lane is done reading eps before the next sample overwrites it
  }
  const double inv = 1.0 / static_cast<double>(n_samples);
  for (int64_t c = lane; c < C; c += 32) out[b * C + c] = static_cast<T>(acc[c] * inv);
}

}  // namespace

template <typename scalar_t>
void random_tangents(scalar_t* out, int64_t S, int64_t P, int64_t seed, int64_t step,
                     bool gaussian, cudaStream_t stream) {
  if (S <= 0 || P <= 0) return;
  const uint32_t hab = hash_ab(seed, step);
  // Enough blocks to fill the device a few times over; each thread loops over its columns.
  const int64_t target = 16 * static_cast<int64_t>(num_sms());
  const int64_t gy = S < 65535 ? S : 65535;
  int64_t gx = ceil_div(P, kTangentThreads);
  const int64_t gx_cap = ceil_div(target, gy);
  if (gx > gx_cap) gx = gx_cap;
  if (gx < 1) gx = 1;
  random_tangents_kernel<scalar_t>
      <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kTangentThreads, 0, stream>>>(
          out, S, P, hab, gaussian);
}

template <typename scalar_t>
void mc_softmax(const scalar_t* mean, const scalar_t* scale_tril, int64_t B, int64_t C,
                int64_t n_samples, int64_t seed, double* work, scalar_t* out,
                cudaStream_t stream) {
  if (B <= 0 || C <= 0 || n_samples <= 0) return;
  const int64_t warps_per_block = kSoftmaxThreads / 32;
  const int64_t blocks = ceil_div(B, warps_per_block);
  mc_softmax_kernel<scalar_t><<<static_cast<unsigned>(blocks), kSoftmaxThreads, 0, stream>>>(
      mean, scale_tril, B, C, n_samples, seed, work, out);
}

#define FASTLLA_INSTANTIATE(T)                                                                 \
  template void random_tangents<T>(T*, int64_t, int64_t, int64_t, int64_t, bool, cudaStream_t); \
  template void mc_softmax<T>(const T*, const T*, int64_t, int64_t, int64_t, int64_t, double*,  \
                              T*, cudaStream_t);
FASTLLA_INSTANTIATE(float)
FASTLLA_INSTANTIATE(double)
#undef FASTLLA_INSTANTIATE

}  // namespace gpu
}  // namespace fastlla
