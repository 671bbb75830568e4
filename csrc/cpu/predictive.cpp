// Predictive covariance / variance on CPU: Σ_b = Φ_bᵀ (LLᵀ)⁻¹ Φ_b = V_bᵀV_b, V_b = L⁻¹Φ_b.
//
// With fewer than 2M right-hand sides (B·C) a triangular solve does it directly. Otherwise L⁻¹
// is formed once (M³/3, small beside the B·C right-hand sides). Then, on CPUs with
// AVX-512, a register-blocked micro-kernel forms Vᵀ_b = Φ_bᵀL⁻ᵀ straight from phi[b] and reduces
// it to Σ_b while it is still in L1 (`whiten_avx512`). Elsewhere (or with
// FASTLLA_DISABLE_AVX512=1) BLAS does the product: every thread takes cache-sized chunks of
// inputs and, one chunk at a time,
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

#include <cstdlib>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTLLA_HAVE_AVX512 1
#define FASTLLA_AVX512 __attribute__((target("avx512f")))
#else
#define FASTLLA_HAVE_AVX512 0
#endif

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

// ---------------------------------------------------------------------------------------------
// AVX-512 path. Register-blocked like a GEMM micro-kernel: a block of up to kRows rows c of
// Vᵀ_b times a panel of two vectors of columns j of L⁻ᵀ lives in 2·kRows registers; step m
// broadcasts phi[b, m, c] (C contiguous values, so phi is read in place) and loads row m of the
// panel. L⁻ᵀ is upper triangular: the panel [j0, j0 + 2W) needs rows m < j0 + W for both
// vectors and m < j0 + 2W for the second only — 1/2 + 1/(4·panels) of a full product (0.53 at
// M = 256). Σ_b = V_bᵀV_b is then reduced from the C×M block while it is still in L1.
// ---------------------------------------------------------------------------------------------
#if FASTLLA_HAVE_AVX512
template <typename T>
struct Avx512;

template <>
struct Avx512<float> {
  using V = __m512;
  static constexpr int64_t W = 16;
  FASTLLA_AVX512 static V zero() { return _mm512_setzero_ps(); }
  FASTLLA_AVX512 static V load(const float* p) { return _mm512_loadu_ps(p); }
  FASTLLA_AVX512 static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  FASTLLA_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  FASTLLA_AVX512 static V add(V a, V b) { return _mm512_add_ps(a, b); }
  FASTLLA_AVX512 static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  FASTLLA_AVX512 static float sum(V v) { return _mm512_reduce_add_ps(v); }
};

template <>
struct Avx512<double> {
  using V = __m512d;
  static constexpr int64_t W = 8;
  FASTLLA_AVX512 static V zero() { return _mm512_setzero_pd(); }
  FASTLLA_AVX512 static V load(const double* p) { return _mm512_loadu_pd(p); }
  FASTLLA_AVX512 static V bcast(const double* p) { return _mm512_set1_pd(*p); }
  FASTLLA_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  FASTLLA_AVX512 static V add(V a, V b) { return _mm512_add_pd(a, b); }
  FASTLLA_AVX512 static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  FASTLLA_AVX512 static double sum(V v) { return _mm512_reduce_add_pd(v); }
};

constexpr int kRows = 12;  // 24 accumulators + 2 panel rows + 1 broadcast: within 32 registers

// Rows c0 … c0 + R - 1 of Vᵀ_b: vt[r, j] = Σ_{m ≤ j} phi_b[m, c0 + r] L⁻ᵀ[m, j], phi_b = phi[b]
// offset by c0. `panels` holds L⁻ᵀ (upper triangular) zero-padded to Mp columns, a multiple of
// 2W, panel by panel: panel k is M × 2W, contiguous, so each step m reads one stream.
template <typename T, int R>
FASTLLA_AVX512 void whiten_rows(const T* phi_b, int64_t C, int64_t row_stride, const T* panels,
                                int64_t M, int64_t Mp, T* vt) {
  using A = Avx512<T>;
  using V = typename A::V;
  constexpr int64_t W = A::W;
  for (int64_t j0 = 0; j0 < Mp; j0 += 2 * W) {
    V lo[R], hi[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) lo[r] = hi[r] = A::zero();
    const int64_t m_both = std::min(M, j0 + W), m_hi = std::min(M, j0 + 2 * W);
    const T* x = phi_b;
    const T* p = panels + j0 * M;  // panel j0 / 2W
    for (int64_t m = 0; m < m_both; ++m, x += C, p += 2 * W) {
      const V b0 = A::load(p), b1 = A::load(p + W);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const V a = A::bcast(x + r * row_stride);
        lo[r] = A::fma(a, b0, lo[r]);
        hi[r] = A::fma(a, b1, hi[r]);
      }
    }
    for (int64_t m = m_both; m < m_hi; ++m, x += C, p += 2 * W) {
      const V b1 = A::load(p + W);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) hi[r] = A::fma(A::bcast(x + r * row_stride), b1, hi[r]);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      A::store(vt + r * Mp + j0, lo[r]);
      A::store(vt + r * Mp + j0 + W, hi[r]);
    }
  }
}

// whiten_rows for a block of `rows` ≤ R rows (the block size is a template argument).
template <typename T, int R>
FASTLLA_AVX512 void whiten_block(const T* phi_b, int64_t C, int64_t row_stride, int64_t rows,
                                 const T* panels, int64_t M, int64_t Mp, T* vt) {
  if constexpr (R > 1) {
    if (rows < R) return whiten_block<T, R - 1>(phi_b, C, row_stride, rows, panels, M, Mp, vt);
  }
  whiten_rows<T, R>(phi_b, C, row_stride, panels, M, Mp, vt);
}

// Σ_b from Vᵀ_b (C × Mp): out[c·C + d] = Σ_j vt[c, j] vt[d, j] (both triangles), or
// out[c] = Σ_j vt[c, j]² when diagonal.
template <typename T>
FASTLLA_AVX512 void gram_rows(const T* vt, int64_t C, int64_t Mp, bool diagonal, T* out) {
  using A = Avx512<T>;
  for (int64_t c = 0; c < C; ++c) {
    const T* u = vt + c * Mp;
    for (int64_t d = diagonal ? c : 0; d <= c; ++d) {
      const T* w = vt + d * Mp;
      typename A::V s0 = A::zero(), s1 = A::zero();
      for (int64_t j = 0; j < Mp; j += 2 * A::W) {
        s0 = A::fma(A::load(u + j), A::load(w + j), s0);
        s1 = A::fma(A::load(u + j + A::W), A::load(w + j + A::W), s1);
      }
      const T s = A::sum(A::add(s0, s1));
      if (diagonal) {
        out[c] = s;
      } else {
        out[c * C + d] = out[d * C + c] = s;
      }
    }
  }
}

// Above this many outputs the C×C Gram of Vᵀ_b goes to BLAS (gram_rows is O(C²) dot products).
constexpr int64_t kBlasGramC = 16;

template <typename T>
void whiten_avx512(const at::Tensor& panels, const T* phi, int64_t B, int64_t M, int64_t C,
                   bool diagonal, T* out) {
  const int64_t Mp = panels.size(0) * panels.size(2);
  const T* inv_p = panels.data_ptr<T>();
  // With few outputs, one register block serves several inputs: their columns of phi are
  // packed side by side (M × group·C, a few KiB) so that the block still has ~kRows rows.
  const int64_t group = C <= kRows / 2 ? kRows / C : 1;
  const int64_t per_chunk = 8 * group, n_chunks = (B + per_chunk - 1) / per_chunk;
  const int64_t out_size = diagonal ? C : C * C;
  const bool blas_gram = !diagonal && C > kBlasGramC;
  cpu::parallel_chunks(n_chunks, [&](const auto& next) {
    std::vector<T> vt(group * C * Mp), packed(group > 1 ? M * group * C : 0);
    for (int64_t chunk = next(); chunk >= 0; chunk = next()) {
      const int64_t b_end = std::min(B, (chunk + 1) * per_chunk);
      for (int64_t b = chunk * per_chunk; b < b_end; b += group) {
        const int64_t nb = std::min(group, b_end - b);
        if (C == 1) {  // row i of the block is input b + i: phi[b + i, m] = phi[b][i·M + m]
          whiten_block<T, kRows>(phi + b * M, 1, M, nb, inv_p, M, Mp, vt.data());
        } else if (group > 1) {  // packed[m, i·C + c] = phi[b + i, m, c]
          const int64_t rows = nb * C;
          const T* src = phi + b * M * C;
          T* dst = packed.data();
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t i = 0; i < nb; ++i) {
              for (int64_t c = 0; c < C; ++c) *dst++ = src[(i * M + m) * C + c];
            }
          }
          whiten_block<T, kRows>(packed.data(), rows, 1, rows, inv_p, M, Mp, vt.data());
        } else {  // one input per block of rows, phi read in place
          for (int64_t c0 = 0; c0 < C; c0 += kRows) {
            whiten_block<T, kRows>(phi + b * M * C + c0, C, 1, std::min<int64_t>(kRows, C - c0),
                                   inv_p, M, Mp, vt.data() + c0 * Mp);
          }
        }
        for (int64_t i = 0; i < nb; ++i) {
          T* o = out + (b + i) * out_size;
          if (blas_gram) {
            const auto opts = panels.options();
            at::Tensor v = at::from_blob(vt.data() + i * C * Mp, {C, Mp}, opts);
            at::Tensor s = at::from_blob(o, {C, C}, opts);
            at::mm_out(s, v, v.t());
          } else {
            gram_rows<T>(vt.data() + i * C * Mp, C, Mp, diagonal, o);
          }
        }
      }
    }
  });
}

bool use_avx512() {
  static const bool supported = __builtin_cpu_supports("avx512f");
  const char* off = std::getenv("FASTLLA_DISABLE_AVX512");  // per call: tests switch it
  return supported && !(off && off[0] && off[0] != '0');
}
#endif

at::Tensor predictive_cpu(const at::Tensor& L, const at::Tensor& phi, bool diagonal,
                          const char* op) {
  check_predictive(L, phi, op);
  const int64_t B = phi.size(0), M = phi.size(1), C = phi.size(2);
  at::Tensor out = diagonal ? at::empty({B, C}, phi.options()) : at::empty({B, C, C}, phi.options());
  if (out.numel() == 0) return out;
  if (M == 0) return out.zero_();
  if (B * C < 2 * M) {
    // Few right-hand sides: solving for them costs less than forming L⁻¹ (M³/3 flops).
    const at::Tensor rhs = phi.permute({1, 0, 2}).reshape({M, B * C});
    const at::Tensor v = at::linalg_solve_triangular(L, rhs, /*upper=*/false)
                             .view({M, B, C})
                             .permute({1, 0, 2});
    return diagonal ? out.copy_(v.square().sum(1)) : at::bmm_out(out, v.transpose(1, 2), v);
  }
  // Upper triangular L⁻ᵀ (only the lower triangle of L is read, as in the reference).
  const at::Tensor inv_t =
      at::linalg_solve_triangular(L, at::eye(M, L.options()), /*upper=*/false).t().contiguous();
  const at::Tensor f = phi.contiguous();
#if FASTLLA_HAVE_AVX512
  if (use_avx512()) {
    const int64_t panel = phi.scalar_type() == at::kFloat ? 32 : 16;  // two 512-bit vectors
    const int64_t Mp = (M + panel - 1) / panel * panel;
    at::Tensor padded = at::zeros({M, Mp}, L.options());
    padded.narrow(1, 0, M).copy_(inv_t);
    const at::Tensor inv_p = padded.view({M, Mp / panel, panel}).permute({1, 0, 2}).contiguous();
    AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "predictive_cpu", [&] {
      whiten_avx512<scalar_t>(inv_p, f.data_ptr<scalar_t>(), B, M, C, diagonal,
                              out.data_ptr<scalar_t>());
    });
    return out;
  }
#endif
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
