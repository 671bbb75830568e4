// Predictive covariance / variance on CPU: Σ_b = Φ_bᵀ (LLᵀ)⁻¹ Φ_b = V_bᵀV_b, V_b = L⁻¹Φ_b.
//
// L⁻¹ is formed once (M³/6, negligible beside the B·C right-hand sides); then every thread takes
// cache-sized chunks of inputs as it becomes free and, one chunk at a time,
//   1. gathers Xᵀ (rows (b, c), M columns) from phi (B, M, C) — no permuted copy of phi,
//   2. forms Vᵀ = Xᵀ L⁻ᵀ column tile by column tile, using that L⁻ᵀ is upper triangular
//      (tile J only needs the first j1 columns of Xᵀ: about 5/8 of a full GEMM with 4 tiles),
//   3. reduces each b's C×M block to Σ_b = V_bᵀV_b or its diagonal (block_grams).
// Nothing of size B·C·M is allocated beyond the input.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace fastlla {
namespace {

constexpr int64_t kChunkRows = 320;  // rows (b, c) per chunk
constexpr int64_t kTile = 64;  // column tile of the triangular product

// Xᵀ rows (b, c) of a chunk: dst[(i·C + c)·M + m] = phi[b0 + i, m, c] (a C×M transpose per input).
#define FASTLLA_GATHER(T)                                                                      \
  FASTLLA_CPU_CLONES void gather_transposed(const T* src, T* dst, int64_t nb, int64_t M,        \
                                            int64_t C) {                                       \
    for (int64_t i = 0; i < nb; ++i) {                                                         \
      const T* s = src + i * M * C;                                                            \
      T* d = dst + i * C * M;                                                                  \
      for (int64_t m0 = 0; m0 < M; m0 += 64) {                                                 \
        const int64_t m1 = std::min<int64_t>(M, m0 + 64);                                      \
        for (int64_t c = 0; c < C; ++c) {                                                      \
          _Pragma("omp simd") for (int64_t m = m0; m < m1; ++m) d[c * M + m] = s[m * C + c];   \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
  }
FASTLLA_GATHER(float)
FASTLLA_GATHER(double)
#undef FASTLLA_GATHER

// out_b = V_b V_bᵀ (C×C) for the row-major blocks V_b (C×M) of v, b < nb; or only its diagonal.
// Four dot products at a time (independent accumulator chains that share the loads of row i);
// `omp simd` lets the float sums vectorise. Faster than a batched GEMM for these tiny products.
#define FASTLLA_BLOCK_GRAMS(T)                                                                 \
  FASTLLA_CPU_CLONES void block_grams(const T* v, T* out, int64_t nb, int64_t C, int64_t M,    \
                                      bool diagonal) {                                         \
    for (int64_t b = 0; b < nb; ++b) {                                                         \
      const T* vb = v + b * C * M;                                                             \
      T* ob = out + b * (diagonal ? C : C * C);                                                \
      for (int64_t i = 0; i < C; ++i) {                                                        \
        const T* x = vb + i * M;                                                               \
        int64_t j = diagonal ? i : 0;                                                          \
        for (; j + 4 <= i + 1; j += 4) {                                                       \
          const T *y0 = vb + j * M, *y1 = y0 + M, *y2 = y1 + M, *y3 = y2 + M;                  \
          T a0 = 0, a1 = 0, a2 = 0, a3 = 0;                                                    \
          _Pragma("omp simd reduction(+ : a0, a1, a2, a3)") for (int64_t m = 0; m < M; ++m) {  \
            const T xm = x[m];                                                                 \
            a0 += xm * y0[m];                                                                  \
            a1 += xm * y1[m];                                                                  \
            a2 += xm * y2[m];                                                                  \
            a3 += xm * y3[m];                                                                  \
          }                                                                                    \
          const T a[4] = {a0, a1, a2, a3};                                                     \
          for (int64_t k = 0; k < 4; ++k) {                                                    \
            ob[i * C + j + k] = a[k];                                                          \
            ob[(j + k) * C + i] = a[k];                                                        \
          }                                                                                    \
        }                                                                                      \
        for (; j <= i; ++j) {                                                                  \
          const T* y = vb + j * M;                                                             \
          T acc = 0;                                                                           \
          _Pragma("omp simd reduction(+ : acc)") for (int64_t m = 0; m < M; ++m) acc +=        \
              x[m] * y[m];                                                                     \
          if (diagonal) {                                                                      \
            ob[i] = acc;                                                                       \
          } else {                                                                             \
            ob[i * C + j] = acc;                                                               \
            ob[j * C + i] = acc;                                                               \
          }                                                                                    \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
  }
FASTLLA_BLOCK_GRAMS(float)
FASTLLA_BLOCK_GRAMS(double)
#undef FASTLLA_BLOCK_GRAMS

at::Tensor predictive_cpu(const at::Tensor& L, const at::Tensor& phi, bool diagonal,
                          const char* op) {
  check_predictive(L, phi, op);
  const int64_t B = phi.size(0), M = phi.size(1), C = phi.size(2);
  at::Tensor out = diagonal ? at::empty({B, C}, phi.options()) : at::empty({B, C, C}, phi.options());
  if (out.numel() == 0) return out;
  if (M == 0) return out.zero_();
  // Upper triangular L⁻ᵀ (only the lower triangle of L is read, as in the reference).
  const at::Tensor inv_t =
      at::linalg_solve_triangular(L, at::eye(M, L.options()), /*upper=*/false).t().contiguous();
  const at::Tensor f = phi.contiguous();
  const int64_t per_chunk = std::max<int64_t>(1, kChunkRows / C);
  const int64_t n_chunks = (B + per_chunk - 1) / per_chunk;
  const int64_t t = cpu::n_tiles(M, kTile);

  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "predictive_cpu", [&] {
    const scalar_t* phi_p = f.data_ptr<scalar_t>();
    scalar_t* out_p = out.data_ptr<scalar_t>();
    cpu::parallel_chunks(n_chunks, [&](const auto& next) {
      at::Tensor xt = at::empty({per_chunk * C, M}, phi.options());
      at::Tensor vt = at::empty({per_chunk * C, M}, phi.options());
      scalar_t* x = xt.data_ptr<scalar_t>();
      for (int64_t chunk = next(); chunk >= 0; chunk = next()) {
        const int64_t b0 = chunk * per_chunk, nb = std::min(per_chunk, B - b0);
        const int64_t rows = nb * C;
        gather_transposed(phi_p + b0 * M * C, x, nb, M, C);
        at::Tensor xr = xt.narrow(0, 0, rows), vr = vt.narrow(0, 0, rows);
        for (int64_t j = 0; j < t; ++j) {
          const int64_t j0 = cpu::tile_begin(M, t, j), j1 = cpu::tile_begin(M, t, j + 1);
          at::Tensor vj = vr.narrow(1, j0, j1 - j0);
          at::mm_out(vj, xr.narrow(1, 0, j1), inv_t.narrow(0, 0, j1).narrow(1, j0, j1 - j0));
        }
        block_grams(vt.data_ptr<scalar_t>(), out_p + b0 * (diagonal ? C : C * C), nb, C, M,
                    diagonal);
      }
    });
  });
  return out;
}

at::Tensor predictive_covariance_cpu(const at::Tensor& L, const at::Tensor& phi) {
  return predictive_cpu(L, phi, /*diagonal=*/false, "predictive_covariance");
}

at::Tensor predictive_variance_cpu(const at::Tensor& L, const at::Tensor& phi) {
  return predictive_cpu(L, phi, /*diagonal=*/true, "predictive_variance");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlla, CPU, m) {
  m.impl("predictive_covariance", &predictive_covariance_cpu);
  m.impl("predictive_variance", &predictive_variance_cpu);
}

}  // namespace fastlla
