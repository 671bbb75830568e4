// A separate extension that calls fastlla ops through the PyTorch dispatcher.
//
// It does not link against fastlla: the ops are looked up by name at run time, after Python has
// run `import fastlla` (which registers them, natively or from Python). It defines its own ops in
// the namespace `fastlla_caller` (loaded with torch.ops.load_library), each forwarding to a
// fastlla op in one of the two documented ways:
//   * loss:        c10::Dispatcher::singleton().findSchemaOrThrow(...).typed<...>() directly;
//   * covariance:  the inline helpers of fastlla's public header csrc/fastlla.h.
// The ops are CompositeImplicitAutograd, so gradients flow through fastlla's own autograd formula.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <fastlla.h>

namespace {

at::Tensor loss(const at::Tensor& phi, const at::Tensor& z, int64_t n_train) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastlla::kernel_matching_loss", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(phi, z, n_train);
}

at::Tensor covariance(const at::Tensor& L, const at::Tensor& phi) {
  return fastlla::predictive_covariance(L, phi);
}

bool has_op(c10::string_view name) {
  return c10::Dispatcher::singleton()
      .findSchema({std::string("fastlla::") + std::string(name), ""})
      .has_value();
}

}  // namespace

TORCH_LIBRARY(fastlla_caller, m) {
  m.def("loss(Tensor phi, Tensor z, int n_train) -> Tensor", &loss);
  m.def("covariance(Tensor L, Tensor phi) -> Tensor", &covariance);
  m.def("has_op(str name) -> bool", &has_op);
}
