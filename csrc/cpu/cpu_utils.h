// Small helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>

// Small hot loops are compiled twice, for the baseline x86-64 target and for AVX2+FMA, and the
// right clone is picked at load time (GCC function multi-versioning): the extension stays
// portable without giving up the vector units. Elsewhere (or before GCC 12, which cannot
// dispatch on an ISA level) the attribute is empty.
#if defined(__GNUC__) && __GNUC__ >= 12 && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__)
#define FASTLLA_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTLLA_CPU_CLONES
#endif

namespace fastlla {
namespace cpu {

// at::parallel_for whose workers see the caller's thread-local state (dispatch keys, grad
// mode): ATen calls made from the workers (BLAS products on slices) must not re-enter autograd
// when an input requires grad.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    f(b, e);
  });
}

// Work split into n_chunks pieces handed out dynamically: each worker thread calls
// worker(next) once, where next() returns the next free chunk index or -1 when none is left.
// Per-thread state (buffers, partial sums) lives in `worker`. Dynamic hand-out keeps the threads
// busy when some of them lose their core to other processes (a static split waits for the
// slowest thread).
template <typename W>
void parallel_chunks(int64_t n_chunks, const W& worker) {
  std::atomic<int64_t> counter{0};
  auto next = [&]() -> int64_t {
    const int64_t c = counter.fetch_add(1, std::memory_order_relaxed);
    return c < n_chunks ? c : -1;
  };
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks));
  parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) worker(next);
  });
}

// Number of column tiles used for a symmetric product of width k: tiles of about `tile`
// columns. ATen has no syrk, so XᵀX is formed from the t(t+1)/2 lower tiles with GEMMs
// (BLAS on every tile): 0.625 of the full product for t = 4, 0.75 for t = 2.
inline int64_t n_tiles(int64_t k, int64_t tile) {
  return std::max<int64_t>(1, (k + tile - 1) / tile);
}

inline int64_t tile_begin(int64_t k, int64_t t, int64_t i) { return (k * i) / t; }

// s (k, k) lower tiles (diagonal tiles in full) += xᵀx for x (n, k); beta = 0 overwrites.
// Tiles strictly above the diagonal are left untouched (see mirror_lower_tiles).
inline void syrk_lower_tiles(at::Tensor& s, const at::Tensor& x, int64_t tile, double beta) {
  const int64_t k = x.size(1);
  const int64_t t = n_tiles(k, tile);
  for (int64_t i = 0; i < t; ++i) {
    const int64_t i0 = tile_begin(k, t, i), i1 = tile_begin(k, t, i + 1);
    at::Tensor xi = x.narrow(1, i0, i1 - i0);
    for (int64_t j = 0; j <= i; ++j) {
      const int64_t j0 = tile_begin(k, t, j), j1 = tile_begin(k, t, j + 1);
      at::Tensor sij = s.narrow(0, i0, i1 - i0).narrow(1, j0, j1 - j0);
      at::Tensor xj = x.narrow(1, j0, j1 - j0);
      if (beta == 0.0) {
        at::mm_out(sij, xi.t(), xj);
      } else {
        sij.addmm_(xi.t(), xj, beta, 1.0);
      }
    }
  }
}

// Copy the lower tiles of s into the upper ones (s becomes symmetric).
inline void mirror_lower_tiles(at::Tensor& s, int64_t tile) {
  const int64_t k = s.size(0);
  const int64_t t = n_tiles(k, tile);
  for (int64_t i = 0; i < t; ++i) {
    const int64_t i0 = tile_begin(k, t, i), i1 = tile_begin(k, t, i + 1);
    for (int64_t j = 0; j < i; ++j) {
      const int64_t j0 = tile_begin(k, t, j), j1 = tile_begin(k, t, j + 1);
      s.narrow(0, j0, j1 - j0)
          .narrow(1, i0, i1 - i0)
          .copy_(s.narrow(0, i0, i1 - i0).narrow(1, j0, j1 - j0).t());
    }
  }
}

}  // namespace cpu
}  // namespace fastlla
