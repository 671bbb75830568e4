// fastlla — public C++ interface.
//
// Every fastlla op is a PyTorch dispatcher op in the namespace `fastlla`, declared once in
// csrc/fastlla.cpp (TORCH_LIBRARY) and mirrored in fastlla/_ops.py (SCHEMAS). Another C++ or
// CUDA extension calls them through the dispatcher, exactly like an ATen op: the dispatcher picks
// the CPU or CUDA kernel by the inputs' device, runs the autograd formula registered from
// Python (kernel_matching_loss), and works whether the kernels are native (fastlla._C) or the
// pure-PyTorch references registered from Python.
//
// Usage from another extension (header-only, no link dependency on fastlla):
//
//     #include <fastlla.h>   // add fastlla's csrc/ to include_dirs
//     // ... at run time, after Python has run `import fastlla` (which registers the ops):
//     at::Tensor loss = fastlla::kernel_matching_loss(phi, z, n_train);
//
// or, without this header:
//
//     static auto op = c10::Dispatcher::singleton()
//         .findSchemaOrThrow("fastlla::kernel_matching_loss", "")
//         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
//     at::Tensor loss = op.call(phi, z, n_train);
//
// The template argument of typed<> must be exactly the C++ signature listed below for each op
// (the dispatcher checks it against the registered kernels; every backend registers kernels with
// these signatures). From Python the same ops are torch.ops.fastlla.<name>.
//
// Conventions (see fastlla/reference.py, the oracle of every op):
//   * loss: phi is Φ (R, M) with R = B·C stacked rows (row b·C + c = output c of input b),
//     z is Z (R, S) already scaled by 1/√S so that K̂ = Z Zᵀ; rows [0, n_train) are training
//     rows, rows [n_train, R) context rows, the target's cross blocks between them are zero.
//   * posterior ops: phi is (N, M, C) with Φ_n = g(x_n) (M features × C outputs);
//     L is the lower Cholesky factor (M, M) of the posterior precision A = H + δI.
//   * random numbers: stateless counter-based hash "lowbias32" of (seed, step, row, col), see
//     reference.hash4; Box–Muller normals from the counters (seed, step, 2·row, col) and
//     (seed, step, 2·row + 1, col). The same counters give the same numbers on every backend.
//   * every op checks its inputs and raises c10::Error ("fastlla::<op>: <message>") naming the
//     offending argument; the CPU, CUDA, reference and fake (meta) kernels make the same checks
//     (csrc/checks.h, fastlla/_ops.py), so tensors on different devices (meta included) are an
//     error, never a silently empty result.
//   * autograd: kernel_matching_loss is differentiable (twice); ggn_accumulate passes the
//     gradient of h through; every other derivative raises "not differentiable with respect
//     to <argument>" when a backward pass reaches it. Mutated arguments (h, out) have their
//     version counter bumped, so autograd sees the change.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace fastlla {

// ---------------------------------------------------------------------------- C++ signatures
// Kernels registered for any dispatch key must have exactly these signatures.
namespace sig {
// kernel_matching_loss(Tensor phi, Tensor z, int n_train) -> Tensor
using kernel_matching_loss = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t);
// kernel_matching_loss_backward(Tensor grad, Tensor phi, Tensor z, int n_train)
//     -> (Tensor, Tensor)
using kernel_matching_loss_backward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
// ggn_accumulate(Tensor(a!) h, Tensor phi, Tensor? logits) -> ()
using ggn_accumulate = void(at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);
// cholesky_update(Tensor L, Tensor W, bool downdate=False) -> Tensor
using cholesky_update = at::Tensor(const at::Tensor&, const at::Tensor&, bool);
// predictive_covariance(Tensor L, Tensor phi) -> Tensor
using predictive_covariance = at::Tensor(const at::Tensor&, const at::Tensor&);
// predictive_variance(Tensor L, Tensor phi) -> Tensor
using predictive_variance = at::Tensor(const at::Tensor&, const at::Tensor&);
// mc_softmax(Tensor mean, Tensor scale_tril, int n_samples, int seed) -> Tensor
using mc_softmax = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t);
// random_tangents(Tensor(a!) out, int seed, int step, str distribution) -> ()
using random_tangents = void(at::Tensor&, int64_t, int64_t, c10::string_view);
// cuda_version() -> int      (-1 when fastlla._C was built without CUDA)
using cuda_version = int64_t();
}  // namespace sig

namespace detail {
template <typename Sig>
inline c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
}  // namespace detail

// ---------------------------------------------------------------------------- inline helpers
/// ‖ΦΦᵀ − K̂‖²_F / R² through the Gram identity (0-D tensor); K̂ = ZZᵀ with zeroed cross
/// blocks between rows [0, n_train) and [n_train, R). Differentiable in phi and z.
inline at::Tensor kernel_matching_loss(const at::Tensor& phi, const at::Tensor& z,
                                       int64_t n_train) {
  static auto h = detail::op<sig::kernel_matching_loss>("fastlla::kernel_matching_loss");
  return h.call(phi, z, n_train);
}

/// Gradients (grad_phi, grad_z) of kernel_matching_loss scaled by the 0-D `grad`.
inline std::tuple<at::Tensor, at::Tensor> kernel_matching_loss_backward(
    const at::Tensor& grad, const at::Tensor& phi, const at::Tensor& z, int64_t n_train) {
  static auto h =
      detail::op<sig::kernel_matching_loss_backward>("fastlla::kernel_matching_loss_backward");
  return h.call(grad, phi, z, n_train);
}

/// In place h += Σ_n Φ_n Λ_n Φ_nᵀ; Λ_n = diag(p_n) − p_n p_nᵀ, p_n = softmax(logits_n) when
/// logits (N, C) is given, the identity otherwise. h (M, M) contiguous, phi (N, M, C).
inline void ggn_accumulate(at::Tensor& h, const at::Tensor& phi,
                           const std::optional<at::Tensor>& logits = std::nullopt) {
  static auto op = detail::op<sig::ggn_accumulate>("fastlla::ggn_accumulate");
  op.call(h, phi, logits);
}

/// New lower L' (M, M) with L'L'ᵀ = LLᵀ + WWᵀ (downdate: − WWᵀ); W (M, k). O(M²k).
/// Only the lower triangle of L is read (the strict upper triangle is ignored).
/// Raises when the result is not positive definite.
inline at::Tensor cholesky_update(const at::Tensor& L, const at::Tensor& W,
                                  bool downdate = false) {
  static auto h = detail::op<sig::cholesky_update>("fastlla::cholesky_update");
  return h.call(L, W, downdate);
}

/// Σ_b = Φ_bᵀ (LLᵀ)⁻¹ Φ_b for phi (B, M, C); returns (B, C, C).
inline at::Tensor predictive_covariance(const at::Tensor& L, const at::Tensor& phi) {
  static auto h = detail::op<sig::predictive_covariance>("fastlla::predictive_covariance");
  return h.call(L, phi);
}

/// Diagonal of predictive_covariance; returns (B, C).
inline at::Tensor predictive_variance(const at::Tensor& L, const at::Tensor& phi) {
  static auto h = detail::op<sig::predictive_variance>("fastlla::predictive_variance");
  return h.call(L, phi);
}

/// (1/S) Σ_s softmax(mean + scale_tril ε_s), ε_{s,b,c} keyed by (seed, s, b, c); mean (B, C),
/// scale_tril (B, C, C). No S×B×C tensor is formed. 1 ≤ n_samples ≤ 2^20 (else an error).
inline at::Tensor mc_softmax(const at::Tensor& mean, const at::Tensor& scale_tril,
                             int64_t n_samples, int64_t seed = 0) {
  static auto h = detail::op<sig::mc_softmax>("fastlla::mc_softmax");
  return h.call(mean, scale_tril, n_samples, seed);
}

/// Fill out (S, P), contiguous, in place with tangents keyed by (seed, step, s, p);
/// distribution "rademacher" (±1) or "gaussian". out must not require grad.
inline void random_tangents(at::Tensor& out, int64_t seed, int64_t step,
                            c10::string_view distribution = "rademacher") {
  static auto h = detail::op<sig::random_tangents>("fastlla::random_tangents");
  h.call(out, seed, step, distribution);
}

/// CUDA version fastlla._C was built with (e.g. 12080), -1 without CUDA kernels.
/// Only exists when the compiled library is loaded.
inline int64_t cuda_version() {
  static auto h = detail::op<sig::cuda_version>("fastlla::cuda_version");
  return h.call();
}

}  // namespace fastlla
