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
// The dominant product ΦᵀΦ is formed once over all rows from its lower tiles (about 3/4 of a
// GEMM for M = 128; ATen exposes no syrk), the small ones per group; cost O(R(M+S)²), memory
// O((M+S)²) beyond the inputs. The backward pass recomputes them and adds one R×M×M GEMM.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

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

// Tile width of the symmetric product ΦᵀΦ (see cpu_utils.h): narrower tiles lose more BLAS
// efficiency than the symmetry saves (measured at M = 128).
constexpr int64_t kTile = 128;

// The small matrices of the Gram identity. With Z_ext (R, G·S) holding Z_g in the rows of group
// g and the columns [g·S, (g+1)·S), zeros elsewhere, every group's products come from one GEMM:
//   a  = ΦᵀΦ over all rows (from its lower tiles),
//   b  = Φᵀ Z_ext = [B_0 B_1 ...],  B_g = Φ_gᵀZ_g,
//   d  = Z_extᵀ Z_ext = blockdiag(D_0, D_1, ...),  D_g = Z_gᵀZ_g.
struct Grams {
  at::Tensor z_ext, a, b, d;
};

Grams grams(const at::Tensor& phi, const at::Tensor& z, const Groups& groups) {
  const int64_t M = phi.size(1), S = z.size(1);
  const int64_t G = static_cast<int64_t>(groups.size());
  Grams g;
  if (G == 1) {
    g.z_ext = z;
  } else {
    g.z_ext = at::zeros({phi.size(0), G * S}, z.options());
    for (int64_t i = 0; i < G; ++i) {
      const auto [lo, hi] = groups[i];
      g.z_ext.narrow(0, lo, hi - lo).narrow(1, i * S, S).copy_(z.narrow(0, lo, hi - lo));
    }
  }
  g.a = at::empty({M, M}, phi.options());
  cpu::syrk_lower_tiles(g.a, phi, kTile, 0.0);
  cpu::mirror_lower_tiles(g.a, kTile);
  g.b = at::mm(phi.t(), g.z_ext);
  g.d = at::mm(g.z_ext.t(), g.z_ext);
  return g;
}

template <typename scalar_t>
double squared_norm(const at::Tensor& t) {
  const scalar_t* p = t.data_ptr<scalar_t>();
  double s = 0;
  for (int64_t i = 0, n = t.numel(); i < n; ++i) s += static_cast<double>(p[i]) * p[i];
  return s;
}

at::Tensor kernel_matching_loss_cpu(const at::Tensor& phi, const at::Tensor& z, int64_t n_train) {
  check_kernel_matching_loss(phi, z, n_train);
  const int64_t R = phi.size(0);
  if (R == 0) return at::zeros({}, phi.options());
  const Grams g = grams(phi, z, row_groups(R, n_train));
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "kernel_matching_loss_cpu", [&] {
    // d's off-diagonal blocks are zero, so ‖d‖² = Σ_g ‖D_g‖².
    total = squared_norm<scalar_t>(g.a) - 2 * squared_norm<scalar_t>(g.b) +
            squared_norm<scalar_t>(g.d);
  });
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
  const int64_t R = phi.size(0), S = z.size(1);
  if (R == 0) return {grad_phi.zero_(), grad_z.zero_()};
  const Groups groups = row_groups(R, n_train);
  Grams g = grams(phi, z, groups);
  const double r = static_cast<double>(R);
  const double scale = 4.0 * grad.item<double>() / (r * r);
  // ∂/∂Φ = s(Φ A − Z_ext bᵀ)   (row r of group g: Φ_r A − Z_r B_gᵀ),
  // ∂/∂Z_g = s(Z_g D_g − Φ_g B_g) = block g of s(Z_ext d − Φ b) on the rows of group g.
  g.a.mul_(scale);
  g.b.mul_(scale);
  g.d.mul_(scale);
  at::mm_out(grad_phi, phi, g.a);
  grad_phi.addmm_(g.z_ext, g.b.t(), 1.0, -1.0);
  if (groups.size() == 1) {
    at::mm_out(grad_z, z, g.d);
    grad_z.addmm_(phi, g.b, 1.0, -1.0);
  } else {
    at::Tensor full = at::mm(g.z_ext, g.d);
    full.addmm_(phi, g.b, 1.0, -1.0);
    for (size_t i = 0; i < groups.size(); ++i) {
      const auto [lo, hi] = groups[i];
      grad_z.narrow(0, lo, hi - lo)
          .copy_(full.narrow(0, lo, hi - lo).narrow(1, static_cast<int64_t>(i) * S, S));
    }
  }
  return {grad_phi, grad_z};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlla, CPU, m) {
  m.impl("kernel_matching_loss", &kernel_matching_loss_cpu);
  m.impl("kernel_matching_loss_backward", &kernel_matching_loss_backward_cpu);
}

}  // namespace fastlla
