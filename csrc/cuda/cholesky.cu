// Low-rank Cholesky update / downdate: LLᵀ ± WWᵀ = L'L'ᵀ in O(M²k), no refactorisation.
//
// The classic rank-1 algorithm (cholupdate) walks the columns j = 0..M-1 of L; column j needs
// the pivot rotation (c, s) computed from L_jj and w_j, and then every row i > j is updated
// independently. k rank-1 updates in sequence touch each (column j, vector q) pair in the same
// order if, at column j, all k rotations are applied one after the other — so one pass over
// the columns does the whole rank-k update with one barrier per column:
//
//   owner of row j:  for q: r = √(L_jj² ± w_qj²), c_q = r / L_jj, s_q = w_qj / L_jj, L_jj = r
//   every row i > j: for q: L_ij = (L_ij ± s_q w_qi) / c_q,  w_qi = c_q w_qi − s_q L_ij
//   (the division as a product with 1/c_q = L_jj / r, computed once by the owner)
//
// The kernel works on U = Lᵀ (row j of U = column j of L, so the row updates are coalesced) and
// on Wᵀ (k, M); thread t owns rows i ≡ t (mod blockDim), so w_qi and L_jj are only ever touched
// by their owner and the (c, s) of a column are the only values shared (double-buffered in
// shared memory: one __syncthreads per column suffices). One block: the op is latency-bound
// (M dependent steps), and a posterior update is O(M²k) work.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace fastlla {
namespace gpu {
namespace {

constexpr int64_t kMaxChunk = 512;  // rotations per launch: 6·k values of shared memory

template <typename T>
__global__ void __launch_bounds__(1024)
    cholesky_update_kernel(T* U, T* wt, int64_t M, int64_t k, bool downdate, int* flag) {
  extern __shared__ unsigned char smem_raw[];
  T* cs = reinterpret_cast<T*>(smem_raw);  // [2][3k]: c_q, s_q, 1/c_q (k each) per buffer
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  for (int64_t j = 0; j < M; ++j) {
    T* buf = cs + (j & 1) * 3 * k;
    T* Uj = U + j * M;
    if (j % nt == tid) {
      T d = Uj[j];
      bool bad = false;
      for (int64_t q = 0; q < k; ++q) {
        const T w = wt[q * M + j];
        const T r2 = downdate ? d * d - w * w : d * d + w * w;
        if (!(r2 > T(0))) bad = true;  // also catches NaN
        const T r = sqrt(r2);
        buf[q] = r / d;
        buf[k + q] = w / d;
        buf[2 * k + q] = d / r;
        d = r;
      }
      Uj[j] = d;
      if (bad) *flag = 1;
    }
    __syncthreads();
    // Rows i > j owned by this thread: the first is the smallest i ≡ tid (mod nt) above j.
    int64_t i = tid;
    if (i <= j) i += ((j - i) / nt + 1) * nt;
    for (; i < M; i += nt) {
      T l = Uj[i];
      for (int64_t q = 0; q < k; ++q) {
        const T c = buf[q], s = buf[k + q], c_inv = buf[2 * k + q];
        const T w = wt[q * M + i];
        l = (downdate ? l - s * w : l + s * w) * c_inv;
        wt[q * M + i] = c * w - s * l;
      }
      Uj[i] = l;
    }
    // No second barrier: the next column writes the other half of cs, and the one after waits
    // for this column's barrier to have been passed by every thread.
  }
}

}  // namespace

template <typename scalar_t>
void cholesky_update(scalar_t* U, scalar_t* wt, int64_t M, int64_t k, bool downdate, int* flag,
                     cudaStream_t stream) {
  if (M <= 0 || k <= 0) return;
  int64_t threads = ceil_div(M, 32) * 32;
  if (threads > 1024) threads = 1024;
  for (int64_t q0 = 0; q0 < k; q0 += kMaxChunk) {
    const int64_t kc = k - q0 < kMaxChunk ? k - q0 : kMaxChunk;
    const size_t smem = static_cast<size_t>(6 * kc) * sizeof(scalar_t);  // ≤ 24 KB
    cholesky_update_kernel<scalar_t><<<1, static_cast<unsigned>(threads), smem, stream>>>(
        U, wt + q0 * M, M, kc, downdate, flag);
  }
}

template void cholesky_update<float>(float*, float*, int64_t, int64_t, bool, int*,
                                     cudaStream_t);
template void cholesky_update<double>(double*, double*, int64_t, int64_t, bool, int*,
                                      cudaStream_t);

}  // namespace gpu
}  // namespace fastlla
