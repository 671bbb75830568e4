// CUDA implementations of the fastlla ops: the torch-facing side of csrc/cuda/*.cu.
//
// Each op: the same input checks as the CPU kernels and the Python reference (checks.h), a
// device guard, contiguous inputs, outputs and scratch from the caching allocator, the kernels
// of kernels.h launched on the current stream, a launch check after each. GEMM-shaped work that
// cuBLAS already does well (the triangular solve of the predictive ops, C > 32 products, large
// Grams — see use_cublas) goes through at:: ops; the rest is fused in the custom kernels.
//
// Compiled only in the CUDAExtension build (setup.py, FASTLLA_WITH_CUDA); the kernels themselves
// are plain CUDA (scripts/check_cuda_compile.sh compiles them without torch).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "checks.h"
#include "kernels.h"

namespace fastlla {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The kernels write row-major buffers; an output that must keep the layout of a strided input
// (empty_like, as the fake kernels do) gets a contiguous buffer copied into it.
at::Tensor layout_like(const at::Tensor& buffer, const at::Tensor& like) {
  at::Tensor out = at::empty_like(like);
  if (out.is_contiguous()) return buffer;
  out.copy_(buffer);
  return out;
}

// ---------------------------------------------------------------------------- Gram path
// The Grams of the loss and the GGN are rows·D² multiply-adds. Small ones are launch-bound:
// the fused kernels (gram.cu: concatenation / softmax factor formed on the fly, two or three
// launches in all) win there. Large ones are FLOP-bound, where cuBLAS beats the simple
// shared-memory tiling of gram.cu; above kCublasMinWork the ops materialise the rows once and
// call at::mm. FASTLLA_CUDA_GEMM=kernel|cublas forces one path (benchmarks, tests).
constexpr double kCublasMinWork = 1e8;

bool use_cublas(double work) {
  const char* v = std::getenv("FASTLLA_CUDA_GEMM");
  if (v != nullptr && std::strcmp(v, "kernel") == 0) return false;
  if (v != nullptr && std::strcmp(v, "cublas") == 0) return true;
  return work >= kCublasMinWork;
}

// gram (2, D, D) = the Grams X_gᵀX_g of X = [Φ Z] over rows [0, n_train) and [n_train, R).
void loss_grams(const at::Tensor& phi_c, const at::Tensor& z_c, int64_t n_train,
                at::Tensor& gram, at::Tensor* x_out) {
  const int64_t R = phi_c.size(0), M = phi_c.size(1), S = z_c.size(1), D = M + S;
  if (use_cublas(static_cast<double>(R) * static_cast<double>(D) * static_cast<double>(D))) {
    at::Tensor x = at::cat({phi_c, z_c}, 1);
    if (n_train > 0) {
      const at::Tensor xg = x.narrow(0, 0, n_train);
      gram.select(0, 0).copy_(at::mm(xg.t(), xg));
    }
    if (R > n_train) {
      const at::Tensor xg = x.narrow(0, n_train, R - n_train);
      gram.select(0, 1).copy_(at::mm(xg.t(), xg));
    }
    if (x_out != nullptr) *x_out = x;
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(phi_c.scalar_type(), "loss_gram_cuda", [&] {
    gpu::loss_gram<scalar_t>(phi_c.data_ptr<scalar_t>(), z_c.data_ptr<scalar_t>(), R, M, S,
                             n_train, gram.data_ptr<scalar_t>(), current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------- loss
at::Tensor kernel_matching_loss_cuda(const at::Tensor& phi, const at::Tensor& z,
                                     int64_t n_train) {
  check_kernel_matching_loss(phi, z, n_train);
  const c10::cuda::CUDAGuard guard(phi.device());
  const int64_t R = phi.size(0), M = phi.size(1), S = z.size(1), D = M + S;
  at::Tensor out = at::zeros({}, phi.options());
  if (R == 0 || D == 0) return out;
  const at::Tensor phi_c = phi.contiguous(), z_c = z.contiguous();
  at::Tensor gram = at::zeros({2, D, D}, phi.options());
  at::Tensor acc = at::zeros({1}, phi.options().dtype(at::kDouble));
  loss_grams(phi_c, z_c, n_train, gram, nullptr);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "kernel_matching_loss_cuda", [&] {
    gpu::loss_from_gram<scalar_t>(gram.data_ptr<scalar_t>(), R, M, S, acc.data_ptr<double>(),
                                  out.data_ptr<scalar_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> kernel_matching_loss_backward_cuda(const at::Tensor& grad,
                                                                      const at::Tensor& phi,
                                                                      const at::Tensor& z,
                                                                      int64_t n_train) {
  check_kernel_matching_loss_backward(grad, phi, z, n_train);
  const c10::cuda::CUDAGuard guard(phi.device());
  const int64_t R = phi.size(0), M = phi.size(1), S = z.size(1), D = M + S;
  if (R == 0 || D == 0) return {at::zeros_like(phi), at::zeros_like(z)};
  const at::Tensor phi_c = phi.contiguous(), z_c = z.contiguous();
  // The upstream gradient as one scalar of phi's dtype on phi's device (read by the kernel).
  const at::Tensor grad_c = grad.reshape({}).to(phi.options()).contiguous();
  at::Tensor gram = at::zeros({2, D, D}, phi.options());
  at::Tensor x;
  loss_grams(phi_c, z_c, n_train, gram, &x);
  if (x.defined()) {
    // cuBLAS path: [grad_phi grad_z]_g = scale · X_g K_g with
    // K_g = [[ΣG^ΦΦ, −G_g^ΦZ], [−G_g^ZΦ, G_g^ZZ]] (as gpu::loss_backward forms on the fly).
    at::Tensor K = gram.neg();
    const at::Tensor A = gram.select(0, 0).narrow(0, 0, M).narrow(1, 0, M) +
                         gram.select(0, 1).narrow(0, 0, M).narrow(1, 0, M);
    K.narrow(1, 0, M).narrow(2, 0, M).copy_(A.unsqueeze(0).expand({2, M, M}));
    K.narrow(1, M, S).narrow(2, M, S).copy_(gram.narrow(1, M, S).narrow(2, M, S));
    at::Tensor out = at::empty({R, D}, phi.options());
    if (n_train > 0) {
      at::Tensor rows = out.narrow(0, 0, n_train);
      at::mm_out(rows, x.narrow(0, 0, n_train), K.select(0, 0));
    }
    if (R > n_train) {
      at::Tensor rows = out.narrow(0, n_train, R - n_train);
      at::mm_out(rows, x.narrow(0, n_train, R - n_train), K.select(0, 1));
    }
    out.mul_(grad_c * (4.0 / (static_cast<double>(R) * static_cast<double>(R))));
    return {layout_like(out.narrow(1, 0, M).contiguous(), phi),
            layout_like(out.narrow(1, M, S).contiguous(), z)};
  }
  at::Tensor grad_phi = at::empty({R, M}, phi.options());
  at::Tensor grad_z = at::empty({R, S}, phi.options());
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "kernel_matching_loss_backward_cuda", [&] {
    gpu::loss_backward<scalar_t>(grad_c.data_ptr<scalar_t>(), phi_c.data_ptr<scalar_t>(),
                                 z_c.data_ptr<scalar_t>(), R, M, S, n_train,
                                 gram.data_ptr<scalar_t>(), grad_phi.data_ptr<scalar_t>(),
                                 grad_z.data_ptr<scalar_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {layout_like(grad_phi, phi), layout_like(grad_z, z)};
}

// ---------------------------------------------------------------------------- GGN
void ggn_accumulate_cuda(at::Tensor& h, const at::Tensor& phi,
                         const std::optional<at::Tensor>& logits) {
  check_ggn_accumulate(h, phi, logits);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t N = phi.size(0), M = phi.size(1), C = phi.size(2);
  if (N == 0 || M == 0 || C == 0) return;
  const at::Tensor phi_c = phi.contiguous();
  const cudaStream_t stream = current_stream();
  const bool cublas = use_cublas(static_cast<double>(N) * static_cast<double>(C) *
                                 static_cast<double>(M) * static_cast<double>(M));
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "ggn_accumulate_cuda", [&] {
    if (logits.has_value()) {
      const at::Tensor lg = logits->contiguous();
      at::Tensor sqrt_p = at::empty({N, C}, phi.options());
      at::Tensor m = at::empty({N, M}, phi.options());
      gpu::ggn_softmax_stats<scalar_t>(phi_c.data_ptr<scalar_t>(), lg.data_ptr<scalar_t>(), N,
                                       M, C, sqrt_p.data_ptr<scalar_t>(),
                                       m.data_ptr<scalar_t>(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (cublas) {
        // Rows y_nc = √p_nc (Φ_n[:, c] − m_n) materialised once, h += YᵀY by cuBLAS.
        const at::Tensor y = ((phi_c - m.unsqueeze(2)) * sqrt_p.unsqueeze(1))
                                 .transpose(1, 2)
                                 .reshape({N * C, M});
        h.addmm_(y.t(), y);
        return;
      }
      gpu::ggn_gram<scalar_t>(phi_c.data_ptr<scalar_t>(), sqrt_p.data_ptr<scalar_t>(),
                              m.data_ptr<scalar_t>(), N, M, C, h.data_ptr<scalar_t>(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      if (cublas) {
        const at::Tensor y = phi_c.transpose(1, 2).reshape({N * C, M});
        h.addmm_(y.t(), y);
        return;
      }
      gpu::ggn_gram<scalar_t>(phi_c.data_ptr<scalar_t>(), nullptr, nullptr, N, M, C,
                              h.data_ptr<scalar_t>(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// ---------------------------------------------------------------------------- Cholesky
at::Tensor cholesky_update_cuda(const at::Tensor& L, const at::Tensor& W, bool downdate) {
  check_cholesky_update(L, W, downdate);
  const c10::cuda::CUDAGuard guard(L.device());
  const int64_t M = L.size(0), k = W.size(1);
  // U = Lᵀ, row-major: row j of U is column j of L (the lower triangle of L only).
  at::Tensor U = L.tril().t().contiguous();
  if (M > 0 && k > 0) {
    at::Tensor wt = at::empty({k, M}, L.options());  // fresh: the kernel overwrites it
    wt.copy_(W.t());
    at::Tensor flag = at::zeros({1}, L.options().dtype(at::kInt));
    const cudaStream_t stream = current_stream();
    AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "cholesky_update_cuda", [&] {
      gpu::cholesky_update<scalar_t>(U.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(), M, k,
                                     downdate, flag.data_ptr<int>(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // Synchronises (as the reference's cholesky_ex info check does).
    FASTLLA_CHECK(flag.item<int>() == 0, "cholesky_update",
                  downdate ? "the downdated matrix is not positive definite"
                           : "the updated matrix is not positive definite");
  }
  return U.t().contiguous();
}

// ---------------------------------------------------------------------------- predictive
// V = L⁻¹[Φ_1 … Φ_B] as an (M, B·C) matrix, in whatever layout the solve returns.
at::Tensor whiten(const at::Tensor& L, const at::Tensor& phi) {
  const int64_t B = phi.size(0), M = phi.size(1), C = phi.size(2);
  const at::Tensor rhs = phi.permute({1, 0, 2}).reshape({M, B * C});
  return at::linalg_solve_triangular(L, rhs, /*upper=*/false, /*left=*/true,
                                     /*unitriangular=*/false);
}

at::Tensor predictive_covariance_cuda(const at::Tensor& L, const at::Tensor& phi) {
  check_predictive(L, phi, "predictive_covariance");
  const c10::cuda::CUDAGuard guard(L.device());
  const int64_t B = phi.size(0), M = phi.size(1), C = phi.size(2);
  if (B == 0 || C == 0 || M == 0) return at::zeros({B, C, C}, phi.options());
  const at::Tensor V = whiten(L, phi);
  if (C > gpu::kWhitenedGramMaxC) {
    const at::Tensor V3 = V.reshape({M, B, C}).permute({1, 0, 2});  // (B, M, C)
    return at::bmm(V3.transpose(1, 2), V3).contiguous();
  }
  at::Tensor out = at::empty({B, C, C}, phi.options());
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "predictive_covariance_cuda", [&] {
    gpu::whitened_gram<scalar_t>(V.data_ptr<scalar_t>(), V.stride(0), V.stride(1), M, B, C,
                                 out.data_ptr<scalar_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor predictive_variance_cuda(const at::Tensor& L, const at::Tensor& phi) {
  check_predictive(L, phi, "predictive_variance");
  const c10::cuda::CUDAGuard guard(L.device());
  const int64_t B = phi.size(0), M = phi.size(1), C = phi.size(2);
  if (B == 0 || C == 0 || M == 0) return at::zeros({B, C}, phi.options());
  const at::Tensor V = whiten(L, phi);
  at::Tensor out = at::empty({B, C}, phi.options());
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "predictive_variance_cuda", [&] {
    gpu::column_sumsq<scalar_t>(V.data_ptr<scalar_t>(), V.stride(0), V.stride(1), M, B * C,
                                out.data_ptr<scalar_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------- random numbers
at::Tensor mc_softmax_cuda(const at::Tensor& mean, const at::Tensor& scale_tril,
                           int64_t n_samples, int64_t seed) {
  check_mc_softmax(mean, scale_tril, n_samples, seed);
  const c10::cuda::CUDAGuard guard(mean.device());
  const int64_t B = mean.size(0), C = mean.size(1);
  at::Tensor out = at::zeros({B, C}, mean.options());
  if (B == 0 || C == 0) return out;
  const at::Tensor mean_c = mean.contiguous(), L_c = scale_tril.contiguous();
  at::Tensor work = at::empty({B * 3 * C}, mean.options().dtype(at::kDouble));
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "mc_softmax_cuda", [&] {
    gpu::mc_softmax<scalar_t>(mean_c.data_ptr<scalar_t>(), L_c.data_ptr<scalar_t>(), B, C,
                              n_samples, seed, work.data_ptr<double>(),
                              out.data_ptr<scalar_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void random_tangents_cuda(at::Tensor& out, int64_t seed, int64_t step,
                          c10::string_view distribution) {
  check_random_tangents(out, seed, step, distribution);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t S = out.size(0), P = out.size(1);
  if (S == 0 || P == 0) return;
  const bool gaussian = distribution == "gaussian";
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "random_tangents_cuda", [&] {
    gpu::random_tangents<scalar_t>(out.data_ptr<scalar_t>(), S, P, seed, step, gaussian,
                                   stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace fastlla

TORCH_LIBRARY_IMPL(fastlla, CUDA, m) {
  m.impl("kernel_matching_loss", &fastlla::kernel_matching_loss_cuda);
  m.impl("kernel_matching_loss_backward", &fastlla::kernel_matching_loss_backward_cuda);
  m.impl("ggn_accumulate", &fastlla::ggn_accumulate_cuda);
  m.impl("cholesky_update", &fastlla::cholesky_update_cuda);
  m.impl("predictive_covariance", &fastlla::predictive_covariance_cuda);
  m.impl("predictive_variance", &fastlla::predictive_variance_cuda);
  m.impl("mc_softmax", &fastlla::mc_softmax_cuda);
  m.impl("random_tangents", &fastlla::random_tangents_cuda);
}
