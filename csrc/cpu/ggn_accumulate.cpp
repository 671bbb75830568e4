// GGN accumulation on CPU: h += Σ_n Φ_n Λ_n Φ_nᵀ in place.
//
// Λ_n = diag(p_n) − p_n p_nᵀ (p_n = softmax(logits_n)) has the factor R_n = diag(√p_n) − p_n √p_nᵀ
// (R_n R_nᵀ = Λ_n because Σ p = 1), and W_n = Φ_n R_n is formed on the fly in O(MC):
//
//     W_n[m, c] = √p_{n,c} (Φ_n[m, c] − u_n[m]),   u_n = Φ_n p_n.
//
// Stacking Tᵀ = [W_1 … W_N] (T has N·C rows, M columns) gives Σ_n Φ_n Λ_n Φ_nᵀ = TᵀT: a single
// symmetric product, formed from its lower tiles with BLAS (no N×M×C temporary beyond one
// cache-sized chunk of T per thread, no cancellation between two large terms). Regression
// (logits None, Λ_n = I) uses W_n = Φ_n. Threads take chunks of inputs as they become free, each
// accumulating its own M×M partial sum; the partial sums are added into h at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <mutex>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace fastlla {
namespace {

constexpr int64_t kChunkRows = 2048;  // rows of T (= inputs × C) per chunk
constexpr int64_t kTile = 64;  // column tile of the symmetric product

// Rows [0, n·C) of t (row-major, ld = M) from inputs [n0, n0 + n).
template <typename scalar_t>
void fill_factor(scalar_t* t, const scalar_t* phi, const scalar_t* logits, int64_t n0, int64_t n,
                 int64_t M, int64_t C, std::vector<double>& sqrt_p, std::vector<scalar_t>& u) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* f = phi + (n0 + i) * M * C;  // Φ_n, (M, C) row-major
    scalar_t* out = t + i * C * M;               // W_nᵀ, (C, M) row-major
    if (logits == nullptr) {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t m = 0; m < M; ++m) out[c * M + m] = f[m * C + c];
      continue;
    }
    const scalar_t* lg = logits + (n0 + i) * C;
    double mx = -INFINITY;
    for (int64_t c = 0; c < C; ++c) mx = std::max(mx, static_cast<double>(lg[c]));
    double total = 0;
    for (int64_t c = 0; c < C; ++c) total += (sqrt_p[c] = std::exp(lg[c] - mx));
    for (int64_t c = 0; c < C; ++c) sqrt_p[c] /= total;  // p
    for (int64_t m = 0; m < M; ++m) {
      double acc = 0;
      for (int64_t c = 0; c < C; ++c) acc += f[m * C + c] * sqrt_p[c];
      u[m] = static_cast<scalar_t>(acc);
    }
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t s = static_cast<scalar_t>(std::sqrt(sqrt_p[c]));
      for (int64_t m = 0; m < M; ++m) out[c * M + m] = s * (f[m * C + c] - u[m]);
    }
  }
}

void ggn_accumulate_cpu(at::Tensor& h, const at::Tensor& phi,
                        const std::optional<at::Tensor>& logits) {
  check_ggn_accumulate(h, phi, logits);
  const int64_t N = phi.size(0), M = phi.size(1), C = phi.size(2);
  if (N == 0 || M == 0 || C == 0) return;
  const at::Tensor f = phi.contiguous();
  const at::Tensor lg = logits.has_value() ? logits->contiguous() : at::Tensor();
  const int64_t per_chunk = std::max<int64_t>(1, kChunkRows / C);
  const int64_t n_chunks = (N + per_chunk - 1) / per_chunk;

  at::Tensor total = at::zeros({M, M}, h.options());
  std::mutex lock;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "ggn_accumulate_cpu", [&] {
    const scalar_t* phi_p = f.data_ptr<scalar_t>();
    const scalar_t* logits_p = lg.defined() ? lg.data_ptr<scalar_t>() : nullptr;
    cpu::parallel_chunks(n_chunks, [&](const auto& next) {
      at::Tensor t = at::empty({per_chunk * C, M}, h.options());
      at::Tensor part = at::empty({M, M}, h.options());
      std::vector<double> sqrt_p(C);
      std::vector<scalar_t> u(M);
      bool first = true;
      for (int64_t chunk = next(); chunk >= 0; chunk = next()) {
        const int64_t n0 = chunk * per_chunk, n = std::min(per_chunk, N - n0);
        fill_factor<scalar_t>(t.data_ptr<scalar_t>(), phi_p, logits_p, n0, n, M, C, sqrt_p, u);
        cpu::syrk_lower_tiles(part, t.narrow(0, 0, n * C), kTile, first ? 0.0 : 1.0);
        first = false;
      }
      if (first) return;  // this worker got no chunk
      std::lock_guard<std::mutex> guard(lock);
      total.add_(part);
    });
  });
  cpu::mirror_lower_tiles(total, kTile);
  h.add_(total);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlla, CPU, m) { m.impl("ggn_accumulate", &ggn_accumulate_cpu); }

}  // namespace fastlla
