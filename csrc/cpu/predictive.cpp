// Predictive covariance / variance on CPU: Σ_b = Φ_bᵀ (LLᵀ)⁻¹ Φ_b = V_bᵀV_b, V_b = L⁻¹Φ_b.
//
// L⁻¹ is formed once (M³/6, negligible beside the B·C right-hand sides); then every thread takes
// cache-sized chunks of inputs as it becomes free and, one chunk at a time,
//   1. gathers Xᵀ (rows (b, c), M columns) from phi (B, M, C) — no permuted copy of phi,
//   2. forms Vᵀ = Xᵀ L⁻ᵀ column tile by column tile, using that L⁻ᵀ is upper triangular
//      (tile J only needs the first j1 columns of Xᵀ, and the right half of its tile only the
//      last half of its diagonal block: about 9/16 of a full GEMM with 4 tiles),
//   3. reduces each b's C×M block to Σ_b = V_bᵀV_b (one batched GEMM) or its diagonal.
// Nothing of size B·C·M is allocated beyond the input.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace fastlla {
namespace {

constexpr int64_t kChunkRows = 640;  // rows (b, c) per chunk
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

// out[r] = ‖v_r‖² for the rows v_r (length M) of v, r < rows (the diagonal of every V_b V_bᵀ).
#define FASTLLA_ROW_SQ_NORMS(T)                                                                \
  FASTLLA_CPU_CLONES void row_sq_norms(const T* v, T* out, int64_t rows, int64_t M) {           \
    for (int64_t r = 0; r < rows; ++r) {                                                       \
      const T* x = v + r * M;                                                                  \
      T acc = 0;                                                                               \
      _Pragma("omp simd reduction(+ : acc)") for (int64_t m = 0; m < M; ++m) acc += x[m] * x[m]; \
      out[r] = acc;                                                                            \
    }                                                                                          \
  }
FASTLLA_ROW_SQ_NORMS(float)
FASTLLA_ROW_SQ_NORMS(double)
#undef FASTLLA_ROW_SQ_NORMS

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
          // The lower-left quarter of the diagonal block of L⁻ᵀ is zero: skip it by giving the
          // right half of the tile its last K rows in a second, accumulating product.
          const int64_t jm = j0 + (j1 - j0) / 2;
          at::Tensor vj = vr.narrow(1, j0, j1 - j0);
          at::mm_out(vj, xr.narrow(1, 0, jm), inv_t.narrow(0, 0, jm).narrow(1, j0, j1 - j0));
          vr.narrow(1, jm, j1 - jm)
              .addmm_(xr.narrow(1, jm, j1 - jm), inv_t.narrow(0, jm, j1 - jm).narrow(1, jm, j1 - jm));
        }
        if (diagonal) {
          row_sq_norms(vt.data_ptr<scalar_t>(), out_p + b0 * C, rows, M);
        } else {  // Σ_b = V_bᵀV_b for the chunk's inputs, one batched GEMM into `out`
          const at::Tensor v = vr.view({nb, C, M});
          at::Tensor o = out.narrow(0, b0, nb);
          at::bmm_out(o, v, v.transpose(1, 2));
        }
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
