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
// All of them come from one pass over the rows (a blocked parallel reduction, see grams()); the
// dominant ΦᵀΦ from its lower tiles (ATen exposes no syrk). Cost O(R(M+S)²), memory O((M+S)²)
// per thread beyond the inputs and outputs. The backward pass recomputes them and adds one
// R×M×M GEMM, row block by row block.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"

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

// Tile width of the symmetric product ΦᵀΦ (see cpu_utils.h): for M = 128 two tiles (3 of 4
// blocks) beat one GEMM by ~15% single-threaded.
constexpr int64_t kTile = 64;
// Rows per thread below which one thread does everything (BLAS calls are then too small).
constexpr int64_t kGrainRows = 512;

// The small matrices of the Gram identity:
//   a = ΦᵀΦ over all rows (M×M, symmetric),
//   b = [B_0 B_1 …] (M×G·S), B_g = Φ_gᵀZ_g,
//   d = [D_0 D_1 …] (S×G·S), D_g = Z_gᵀZ_g.
// One pass over the rows: each thread takes a contiguous row range, forms its partial sums with
// single-threaded BLAS calls (a from its lower tiles; the cross products of the groups its range
// meets), and the partial sums are added up at the end (a blocked parallel reduction).
struct Grams {
  at::Tensor a, b, d;
};

Grams grams(const at::Tensor& phi, const at::Tensor& z, const Groups& groups) {
  const int64_t R = phi.size(0), M = phi.size(1), S = z.size(1);
  const int64_t G = static_cast<int64_t>(groups.size());
  Grams total{at::zeros({M, M}, phi.options()), at::zeros({M, G * S}, phi.options()),
              at::zeros({S, G * S}, phi.options())};
  std::mutex lock;
  cpu::parallel_for(0, R, kGrainRows, [&](int64_t r0, int64_t r1) {
    Grams part{at::empty({M, M}, phi.options()), at::zeros({M, G * S}, phi.options()),
               at::zeros({S, G * S}, phi.options())};
    cpu::syrk_lower_tiles(part.a, phi.narrow(0, r0, r1 - r0), kTile, 0.0);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t lo = std::max(r0, groups[g].first), hi = std::min(r1, groups[g].second);
      if (hi <= lo) continue;
      const at::Tensor pg = phi.narrow(0, lo, hi - lo), zg = z.narrow(0, lo, hi - lo);
      part.b.narrow(1, g * S, S).addmm_(pg.t(), zg);
      part.d.narrow(1, g * S, S).addmm_(zg.t(), zg);
    }
    std::lock_guard<std::mutex> guard(lock);
    total.a.add_(part.a);
    total.b.add_(part.b);
    total.d.add_(part.d);
  });
  cpu::mirror_lower_tiles(total.a, kTile);
  return total;
}

template <typename scalar_t>
double squared_norm(const at::Tensor& t) {
  const scalar_t* p = t.data_ptr<scalar_t>();
  double s = 0;
  for (int64_t i = 0, n = t.numel(); i < n; ++i) s += static_cast<double>(p[i]) * p[i];
  return s;
}

at::Tensor kernel_matching_loss_cpu(const at::Tensor& phi_in, const at::Tensor& z_in,
                                    int64_t n_train) {
  check_kernel_matching_loss(phi_in, z_in, n_train);
  const int64_t R = phi_in.size(0);
  if (R == 0) return at::zeros({}, phi_in.options());
  const at::Tensor phi = phi_in.contiguous(), z = z_in.contiguous();
  const Grams g = grams(phi, z, row_groups(R, n_train));
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "kernel_matching_loss_cpu", [&] {
    total = squared_norm<scalar_t>(g.a) - 2 * squared_norm<scalar_t>(g.b) +
            squared_norm<scalar_t>(g.d);
  });
  const double r = static_cast<double>(R);
  return at::full({}, total / (r * r), phi.options());
}

std::tuple<at::Tensor, at::Tensor> kernel_matching_loss_backward_cpu(const at::Tensor& grad,
                                                                      const at::Tensor& phi_in,
                                                                      const at::Tensor& z_in,
                                                                      int64_t n_train) {
  check_kernel_matching_loss_backward(grad, phi_in, z_in, n_train);
  const int64_t R = phi_in.size(0), S = z_in.size(1);
  if (R == 0) return {at::zeros_like(phi_in), at::zeros_like(z_in)};
  const at::Tensor phi = phi_in.contiguous(), z = z_in.contiguous();
  at::Tensor grad_phi = at::empty_like(phi);
  at::Tensor grad_z = at::empty_like(z);
  const Groups groups = row_groups(R, n_train);
  Grams g = grams(phi, z, groups);
  const double r = static_cast<double>(R);
  const double scale = 4.0 * grad.item<double>() / (r * r);
  g.a.mul_(scale);
  g.b.mul_(scale);
  g.d.mul_(scale);
  // Row r of group g:  ∂/∂Φ_r = s(Φ_r A − Z_r B_gᵀ),  ∂/∂Z_r = s(Z_r D_g − Φ_r B_g).
  cpu::parallel_for(0, R, kGrainRows, [&](int64_t r0, int64_t r1) {
    for (size_t i = 0; i < groups.size(); ++i) {
      const int64_t lo = std::max(r0, groups[i].first), hi = std::min(r1, groups[i].second);
      if (hi <= lo) continue;
      const int64_t off = static_cast<int64_t>(i) * S;
      const at::Tensor pg = phi.narrow(0, lo, hi - lo), zg = z.narrow(0, lo, hi - lo);
      at::Tensor gp = grad_phi.narrow(0, lo, hi - lo), gz = grad_z.narrow(0, lo, hi - lo);
      const at::Tensor bg = g.b.narrow(1, off, S), dg = g.d.narrow(1, off, S);
      at::mm_out(gp, pg, g.a);
      gp.addmm_(zg, bg.t(), 1.0, -1.0);
      at::mm_out(gz, zg, dg);
      gz.addmm_(pg, bg, 1.0, -1.0);
    }
  });
  // Outputs laid out like the inputs (as the fake's empty_like).
  if (!phi_in.is_contiguous()) grad_phi = at::empty_like(phi_in).copy_(grad_phi);
  if (!z_in.is_contiguous()) grad_z = at::empty_like(z_in).copy_(grad_z);
  return {grad_phi, grad_z};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlla, CPU, m) {
  m.impl("kernel_matching_loss", &kernel_matching_loss_cpu);
  m.impl("kernel_matching_loss_backward", &kernel_matching_loss_backward_cpu);
}

}  // namespace fastlla
