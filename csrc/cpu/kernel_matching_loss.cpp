// Kernel-matching loss and its gradient on CPU (Gram identity, never a BC×BC buffer).
//
// With X_g = [Φ_g Z_g] (the rows of group g: training rows [0, n_train), context rows
// [n_train, R)) and its Gram G_g = X_gᵀX_g = [[Φ_gᵀΦ_g, Φ_gᵀZ_g], [Z_gᵀΦ_g, Z_gᵀZ_g]]:
//
//     R² ℓ = ‖Σ_g Φ_gᵀΦ_g‖² − 2 Σ_g ‖Φ_gᵀZ_g‖² + Σ_g ‖Z_gᵀZ_g‖²
//
// (the cross blocks of K̂ between the groups are zero), and the gradient of every row of
// group g is one product with a small symmetric (M+S)×(M+S) matrix:
//
//     [∂ℓ/∂Φ_g  ∂ℓ/∂Z_g] = (4/R²) X_g [[A, −B_g], [−B_gᵀ, D_g]],
//     A = Σ_g Φ_gᵀΦ_g,  B_g = Φ_gᵀZ_g,  D_g = Z_gᵀZ_g.
//
// So the three small Grams of each group come from a single pass over its rows (one GEMM on
// the concatenation [Φ Z], cost R(M+S)², memory R(M+S)), and the backward pass is one more GEMM.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"

namespace fastlla {
namespace {

using Groups = std::vector<std::pair<int64_t, int64_t>>;

// Row ranges whose target blocks are kept (empty ranges dropped), as reference._groups.
Groups row_groups(int64_t n_rows, int64_t n_train) {
  Groups out;
  if (n_train > 0) out.emplace_back(0, n_train);
  if (n_rows > n_train) out.emplace_back(n_train, n_rows);
  return out;
}

// X = [Φ Z] (R, M+S), contiguous, and the Gram G_g = X_gᵀX_g of every group.
std::pair<at::Tensor, std::vector<at::Tensor>> grams(const at::Tensor& phi, const at::Tensor& z,
                                                     const Groups& groups) {
  at::Tensor x = at::cat({phi, z}, 1);
  std::vector<at::Tensor> g;
  g.reserve(groups.size());
  for (const auto& [a, b] : groups) {
    at::Tensor xg = x.narrow(0, a, b - a);
    g.push_back(at::mm(xg.t(), xg));
  }
  return {x, g};
}

template <typename scalar_t>
double loss_from_grams(const std::vector<at::Tensor>& g, int64_t M, int64_t S) {
  const int64_t K = M + S;
  std::vector<const scalar_t*> p;
  for (const auto& t : g) p.push_back(t.data_ptr<scalar_t>());
  double total = 0;
  // ‖Σ_g Φ_gᵀΦ_g‖²
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < M; ++j) {
      double a = 0;
      for (const scalar_t* gp : p) a += static_cast<double>(gp[i * K + j]);
      total += a * a;
    }
  }
  for (const scalar_t* gp : p) {
    double cross = 0, target = 0;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = M; j < K; ++j) {
        const double v = gp[i * K + j];
        cross += v * v;
      }
    for (int64_t i = M; i < K; ++i)
      for (int64_t j = M; j < K; ++j) {
        const double v = gp[i * K + j];
        target += v * v;
      }
    total += target - 2 * cross;
  }
  return total;
}

at::Tensor kernel_matching_loss_cpu(const at::Tensor& phi, const at::Tensor& z, int64_t n_train) {
  check_kernel_matching_loss(phi, z, n_train);
  const int64_t R = phi.size(0), M = phi.size(1), S = z.size(1);
  if (R == 0) return at::zeros({}, phi.options());
  const Groups groups = row_groups(R, n_train);
  auto [x, g] = grams(phi, z, groups);
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "kernel_matching_loss_cpu",
                             [&] { total = loss_from_grams<scalar_t>(g, M, S); });
  const double r = static_cast<double>(R);
  return at::full({}, total / (r * r), phi.options());
}

std::tuple<at::Tensor, at::Tensor> kernel_matching_loss_backward_cpu(const at::Tensor& grad,
                                                                      const at::Tensor& phi,
                                                                      const at::Tensor& z,
                                                                      int64_t n_train) {
  check_kernel_matching_loss_backward(grad, phi, z, n_train);
  at::Tensor grad_phi = at::empty_like(phi);
  at::Tensor grad_z = at::empty_like(z);
  const int64_t R = phi.size(0), M = phi.size(1), S = z.size(1);
  if (R == 0) return {grad_phi.zero_(), grad_z.zero_()};
  const Groups groups = row_groups(R, n_train);
  auto [x, g] = grams(phi, z, groups);
  const double r = static_cast<double>(R);
  const double scale = 4.0 * grad.item<double>() / (r * r);

  // A = Σ_g Φ_gᵀΦ_g, shared by all groups.
  at::Tensor a = g[0].narrow(0, 0, M).narrow(1, 0, M).clone();
  for (size_t i = 1; i < g.size(); ++i) a.add_(g[i].narrow(0, 0, M).narrow(1, 0, M));
  for (size_t i = 0; i < groups.size(); ++i) {
    // K_g = scale [[A, −B_g], [−B_gᵀ, D_g]], built in place of G_g.
    at::Tensor k = g[i];
    k.narrow(0, 0, M).narrow(1, 0, M).copy_(a);
    k.narrow(0, 0, M).narrow(1, M, S).neg_();
    k.narrow(0, M, S).narrow(1, 0, M).neg_();
    k.mul_(scale);
    const auto [lo, hi] = groups[i];
    at::Tensor xg = x.narrow(0, lo, hi - lo);
    at::Tensor out_phi = grad_phi.narrow(0, lo, hi - lo);
    at::Tensor out_z = grad_z.narrow(0, lo, hi - lo);
    at::mm_out(out_phi, xg, k.narrow(1, 0, M));
    at::mm_out(out_z, xg, k.narrow(1, M, S));
  }
  return {grad_phi, grad_z};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlla, CPU, m) {
  m.impl("kernel_matching_loss", &kernel_matching_loss_cpu);
  m.impl("kernel_matching_loss_backward", &kernel_matching_loss_backward_cpu);
}

}  // namespace fastlla
