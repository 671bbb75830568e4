// Device helpers shared by the fastlla .cu files (CUDA runtime only, no torch headers).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastlla {
namespace gpu {

constexpr unsigned kFullMask = 0xffffffffu;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Multiprocessors of the current device (for sizing grids); 132 on an H100 SXM.
inline int num_sms() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    cudaGetLastError();  // do not leave a sticky-looking error for the launch check
    return 132;
  }
  return n;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block-wide sum/max for blockDim.x a multiple of 32 (≤ 1024); every thread gets the result.
// `scratch` holds 33 values of shared memory.
template <typename T, bool kMax>
__device__ T block_reduce(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < n_warps ? scratch[lane] : (kMax ? scratch[0] : T(0));
    w = kMax ? warp_max(w) : warp_sum(w);
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  return scratch[32];
}

// ---------------------------------------------------------------------------- RNG
// Bit-exact with fastlla.reference: hash4(a, b, c, d) from the "lowbias32" mix (Wellons),
// uniforms (h + 0.5) / 2³², Box–Muller normals in double.
__host__ __device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The first two rounds of hash4, shared by every counter (c, d) of one (a, b).
__host__ __device__ __forceinline__ uint32_t hash_ab(int64_t a, int64_t b) {
  return mix32(mix32(static_cast<uint32_t>(a) ^ 0x9E3779B9u) ^ static_cast<uint32_t>(b));
}

// hash4(a, b, c, d) = mix32(mix32(hash_ab(a, b) ^ c) ^ d); `hc` = mix32(hash_ab ^ c).
__host__ __device__ __forceinline__ uint32_t hash_d(uint32_t hc, uint32_t d) { return mix32(hc ^ d); }

__host__ __device__ __forceinline__ double uniform_from_hash(uint32_t h) {
  return (static_cast<double>(h) + 0.5) / 4294967296.0;
}

// Box–Muller from the two hashes (2·row, col) and (2·row + 1, col).
__host__ __device__ __forceinline__ double box_muller(uint32_t h1, uint32_t h2) {
  const double u1 = uniform_from_hash(h1), u2 = uniform_from_hash(h2);
  // 2.0 * math.pi as Python folds it, then times u2 (as reference._normal).
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

}  // namespace gpu
}  // namespace fastlla
