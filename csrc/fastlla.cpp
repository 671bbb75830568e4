// Op schemas of the fastlla library (the one place they are declared in C++).
//
// fastlla/_ops.py keeps an identical copy in SCHEMAS (a test checks they agree) and declares
// them from Python when this library is absent. Kernels are registered per backend in
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(fastlla, CPU, m)) and csrc/cuda/ (CUDA); fake (meta) and
// autograd registrations live in fastlla/_ops.py, named below with set_python_module.
//
// Importing fastlla._C loads this shared object, which runs the static registrations; the module
// itself is an empty stub (no pybind11).
#include <Python.h>

#include <torch/library.h>

#ifdef FASTLLA_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

extern "C" {
// An empty `_C` module: importing it loads this library so the registrations below run.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "fastlla native kernels (registered as torch.ops.fastlla.*)",
      -1,       // size of per-interpreter state
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

namespace fastlla {

int64_t cuda_version() {
#ifdef FASTLLA_WITH_CUDA
  return CUDART_VERSION;
#else
  return -1;
#endif
}

}  // namespace fastlla

TORCH_LIBRARY(fastlla, m) {
  // Fake (meta) kernels and the autograd formula are registered from Python.
  m.set_python_module("fastlla._ops");
  m.def("kernel_matching_loss(Tensor phi, Tensor z, int n_train) -> Tensor");
  m.def(
      "kernel_matching_loss_backward(Tensor grad, Tensor phi, Tensor z, int n_train) -> "
      "(Tensor, Tensor)");
  m.def("ggn_accumulate(Tensor(a!) h, Tensor phi, Tensor? logits) -> ()");
  m.def("cholesky_update(Tensor L, Tensor W, bool downdate=False) -> Tensor");
  m.def("predictive_covariance(Tensor L, Tensor phi) -> Tensor");
  m.def("predictive_variance(Tensor L, Tensor phi) -> Tensor");
  m.def("mc_softmax(Tensor mean, Tensor scale_tril, int n_samples, int seed) -> Tensor");
  m.def("random_tangents(Tensor(a!) out, int seed, int step, str distribution) -> ()");
  m.def("cuda_version() -> int", &fastlla::cuda_version);
}
