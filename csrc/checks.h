// Input checks shared by every native kernel (CPU and CUDA).
//
// Each check mirrors the one with the same name in fastlla/_ops.py (check_*), in the same order
// and with the same wording, so a caller sees the same RuntimeError whichever backend runs:
//
//     fastlla::<op>: <message naming the argument>
//
// Python formats dtypes as "torch.float32", shapes as "(3, 4)" / "(3,)" / "()" and devices as
// "cpu" / "cuda:0"; the helpers below print the same text.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace fastlla {

#define FASTLLA_CHECK(cond, op, ...) TORCH_CHECK((cond), "fastlla::", (op), ": ", __VA_ARGS__)

inline std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "torch.float32";
    case c10::ScalarType::Double: return "torch.float64";
    case c10::ScalarType::Half: return "torch.float16";
    case c10::ScalarType::BFloat16: return "torch.bfloat16";
    case c10::ScalarType::Byte: return "torch.uint8";
    case c10::ScalarType::Char: return "torch.int8";
    case c10::ScalarType::Short: return "torch.int16";
    case c10::ScalarType::Int: return "torch.int32";
    case c10::ScalarType::Long: return "torch.int64";
    case c10::ScalarType::Bool: return "torch.bool";
    case c10::ScalarType::ComplexFloat: return "torch.complex64";
    case c10::ScalarType::ComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// A tuple of ints as Python prints it: "()", "(3,)", "(3, 4)".
inline std::string tuple_str(c10::IntArrayRef sizes) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s << ", ";
    s << sizes[i];
  }
  if (sizes.size() == 1) s << ",";
  s << ")";
  return s.str();
}

inline std::string shape_str(const at::Tensor& t) { return tuple_str(t.sizes()); }

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  FASTLLA_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, name,
                " must be float32 or float64, got ", dtype_name(t.scalar_type()));
}

// Python passes None for a Tensor argument as an undefined tensor.
inline void check_defined(const char* op, const char* name, const at::Tensor& t) {
  FASTLLA_CHECK(t.defined(), op, name, " must be a tensor, got None");
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  check_defined(op, name, t);
  FASTLLA_CHECK(t.dim() == dim, op, name, " must be ", dim, "-D, got shape ", shape_str(t));
}

inline void check_same(const char* op, const char* name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref) {
  FASTLLA_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " must have the dtype of ",
                ref_name, " (", dtype_name(ref.scalar_type()), "), got ",
                dtype_name(t.scalar_type()));
  FASTLLA_CHECK(t.device() == ref.device(), op, name, " must be on the device of ", ref_name,
                " (", ref.device().str(), "), got ", t.device().str());
}

inline void check_square(const char* op, const char* name, const at::Tensor& t) {
  check_dim(op, name, t, 2);
  FASTLLA_CHECK(t.size(0) == t.size(1), op, name, " must be square, got shape ", shape_str(t));
}

// ---------------------------------------------------------------------------- per-op checks
inline void check_kernel_matching_loss(const at::Tensor& phi, const at::Tensor& z,
                                       int64_t n_train,
                                       const char* op = "kernel_matching_loss") {
  check_dim(op, "phi", phi, 2);
  check_dim(op, "z", z, 2);
  check_float(op, "phi", phi);
  check_same(op, "z", z, "phi", phi);
  FASTLLA_CHECK(phi.size(0) == z.size(0), op,
                "phi and z must have the same number of rows, got ", phi.size(0), " and ",
                z.size(0));
  FASTLLA_CHECK(0 <= n_train && n_train <= phi.size(0), op, "n_train must lie in [0, ",
                phi.size(0), "] (the number of rows), got ", n_train);
}

inline void check_kernel_matching_loss_backward(const at::Tensor& grad, const at::Tensor& phi,
                                                const at::Tensor& z, int64_t n_train) {
  const char* op = "kernel_matching_loss_backward";
  check_kernel_matching_loss(phi, z, n_train, op);
  check_defined(op, "grad", grad);
  FASTLLA_CHECK(grad.numel() == 1, op, "grad must hold one element, got shape ", shape_str(grad));
  FASTLLA_CHECK(grad.device() == phi.device(), op, "grad must be on the device of phi (",
                phi.device().str(), "), got ", grad.device().str());
}

inline void check_ggn_accumulate(const at::Tensor& h, const at::Tensor& phi,
                                 const c10::optional<at::Tensor>& logits) {
  const char* op = "ggn_accumulate";
  check_square(op, "h", h);
  check_dim(op, "phi", phi, 3);
  check_float(op, "h", h);
  check_same(op, "phi", phi, "h", h);
  FASTLLA_CHECK(h.is_contiguous(), op, "h must be contiguous (it is updated in place)");
  FASTLLA_CHECK(phi.size(1) == h.size(0), op, "phi must be (N, M, C) with M = ", h.size(0),
                " (the size of h), got ", shape_str(phi));
  if (logits.has_value()) {
    const at::Tensor& lg = *logits;
    check_dim(op, "logits", lg, 2);
    check_same(op, "logits", lg, "h", h);
    FASTLLA_CHECK(lg.size(0) == phi.size(0) && lg.size(1) == phi.size(2), op,
                  "logits must be (N, C) = ", tuple_str({phi.size(0), phi.size(2)}), ", got ",
                  shape_str(lg));
  }
}

inline void check_cholesky_update(const at::Tensor& L, const at::Tensor& W, bool downdate) {
  const char* op = "cholesky_update";
  check_square(op, "L", L);
  check_dim(op, "W", W, 2);
  check_float(op, "L", L);
  check_same(op, "W", W, "L", L);
  FASTLLA_CHECK(W.size(0) == L.size(0), op, "W must be (M, k) with M = ", L.size(0),
                " (the size of L), got ", shape_str(W));
}

inline void check_predictive(const at::Tensor& L, const at::Tensor& phi, const char* op) {
  check_square(op, "L", L);
  check_dim(op, "phi", phi, 3);
  check_float(op, "L", L);
  check_same(op, "phi", phi, "L", L);
  FASTLLA_CHECK(phi.size(1) == L.size(0), op, "phi must be (B, M, C) with M = ", L.size(0),
                " (the size of L), got ", shape_str(phi));
}

// The most Monte-Carlo samples mc_softmax draws (2^20): far beyond any useful accuracy (the
// error falls as 1/√S), and it bounds the run time of every backend.
constexpr int64_t kMaxMcSamples = int64_t(1) << 20;

inline void check_mc_softmax(const at::Tensor& mean, const at::Tensor& scale_tril,
                             int64_t n_samples, int64_t /*seed*/) {
  const char* op = "mc_softmax";
  check_dim(op, "mean", mean, 2);
  check_dim(op, "scale_tril", scale_tril, 3);
  check_float(op, "mean", mean);
  check_same(op, "scale_tril", scale_tril, "mean", mean);
  const int64_t B = mean.size(0), C = mean.size(1);
  FASTLLA_CHECK(scale_tril.size(0) == B && scale_tril.size(1) == C && scale_tril.size(2) == C,
                op, "scale_tril must be (B, C, C) = ", tuple_str({B, C, C}), ", got ",
                shape_str(scale_tril));
  FASTLLA_CHECK(n_samples >= 1, op, "n_samples must be at least 1, got ", n_samples);
  FASTLLA_CHECK(n_samples <= kMaxMcSamples, op, "n_samples must be at most ", kMaxMcSamples,
                " (2^20), got ", n_samples);
}

// Python prints the tuple as ('rademacher', 'gaussian') and the value with repr().
inline void check_random_tangents(const at::Tensor& out, int64_t /*seed*/, int64_t /*step*/,
                                  c10::string_view distribution) {
  const char* op = "random_tangents";
  check_dim(op, "out", out, 2);
  check_float(op, "out", out);
  FASTLLA_CHECK(!out.requires_grad(), op,
                "out must not require grad (it is overwritten and has no derivative)");
  FASTLLA_CHECK(out.is_contiguous(), op, "out must be contiguous (it is filled in place)");
  FASTLLA_CHECK(out.size(1) < (int64_t(1) << 32), op,
                "out must have fewer than 2^32 columns, got ", out.size(1));
  FASTLLA_CHECK(distribution == "rademacher" || distribution == "gaussian", op,
                "distribution must be one of ('rademacher', 'gaussian'), got '",
                std::string(distribution), "'");
}

}  // namespace fastlla
