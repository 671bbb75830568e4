// Low-rank Cholesky update/downdate on CPU: L' with L'L'ᵀ = LLᵀ ± WWᵀ in O(M²k).
//
// The k columns of W are absorbed one at a time by rank-1 updates. For column w, step j
// rotates (column j of L, w) so that w_j becomes 0 and L'_jj = r > 0:
//   update:   r = √(L_jj² + w_j²), c = L_jj/r, s = w_j/r (an orthogonal Givens rotation)
//             L_ij ← c L_ij + s w_i,            w_i ← c w_i − s L_ij(old)
//   downdate: r = √(L_jj² − w_j²), c = r/L_jj, s = w_j/L_jj (a hyperbolic rotation)
//             L_ij ← (L_ij − s w_i)/c,          w_i ← c w_i − s L_ij(new)
// A downdate whose r² ≤ 0 leaves a matrix that is not positive definite: an error, as the
// refactorising reference raises. Only the lower triangle of L is read. The factor is kept
// transposed (row j of Lᵀ = column j of L) so the inner loops are contiguous and vectorise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"

namespace fastlla {
namespace {

template <typename scalar_t>
void rank_one(scalar_t* ut, scalar_t* w, int64_t M, bool downdate) {
  for (int64_t j = 0; j < M; ++j) {
    const scalar_t wj = w[j];
    if (wj == scalar_t(0)) continue;  // the rotation is the identity
    scalar_t* row = ut + j * M;       // column j of L: row[i] = L_ij
    const scalar_t ljj = row[j];
    if (!downdate) {
      const scalar_t r = std::hypot(ljj, wj);
      const scalar_t c = ljj / r, s = wj / r;
      row[j] = r;
      for (int64_t i = j + 1; i < M; ++i) {
        const scalar_t l = row[i];
        row[i] = c * l + s * w[i];
        w[i] = c * w[i] - s * l;
      }
    } else {
      const scalar_t r2 = (ljj - wj) * (ljj + wj);
      FASTLLA_CHECK(r2 > scalar_t(0), "cholesky_update",
                    "the downdated matrix is not positive definite");
      const scalar_t r = std::sqrt(r2);
      const scalar_t c = r / ljj, s = wj / ljj;
      row[j] = r;
      for (int64_t i = j + 1; i < M; ++i) {
        const scalar_t l = (row[i] - s * w[i]) / c;
        row[i] = l;
        w[i] = c * w[i] - s * l;
      }
    }
  }
}

at::Tensor cholesky_update_cpu(const at::Tensor& L, const at::Tensor& W, bool downdate) {
  check_cholesky_update(L, W, downdate);
  const int64_t M = L.size(0), k = W.size(1);
  // ut = Lᵀ restricted to the lower triangle of L (upper triangle of ut), row-major.
  at::Tensor ut = at::triu(L.t()).contiguous();
  const at::Tensor wt = W.t().contiguous();  // (k, M): column j of W contiguous
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "cholesky_update_cpu", [&] {
    scalar_t* u = ut.data_ptr<scalar_t>();
    const scalar_t* wp = wt.data_ptr<scalar_t>();
    // A factor with negative diagonal entries (L D, D = diag(±1)) has the same LLᵀ: flip those
    // columns so that every L_jj ≥ 0, as the refactorised result has.
    for (int64_t j = 0; j < M; ++j)
      if (u[j * M + j] < scalar_t(0))
        for (int64_t i = j; i < M; ++i) u[j * M + i] = -u[j * M + i];
    std::vector<scalar_t> w(M);
    for (int64_t col = 0; col < k; ++col) {
      std::copy(wp + col * M, wp + (col + 1) * M, w.begin());
      rank_one<scalar_t>(u, w.data(), M, downdate);
    }
    for (int64_t j = 0; j < M; ++j) {
      const scalar_t d = u[j * M + j];
      FASTLLA_CHECK(d > scalar_t(0) && std::isfinite(static_cast<double>(d)), "cholesky_update",
                    downdate ? "the downdated matrix is not positive definite"
                             : "the updated matrix is not positive definite");
    }
  });
  return ut.t().contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlla, CPU, m) { m.impl("cholesky_update", &cholesky_update_cpu); }

}  // namespace fastlla
