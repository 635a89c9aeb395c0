// The windowed pair-wise affinity op schemas, and their CPU implementation: the CUDA kernels run by fastkd's
// emulator (backend="cuda" with FASTKD_EMULATE_CUDA=1 on CPU tensors).
#define FASTKD_EMULATE_CUDA 1
#define FASTKD_GLUE_STREAM() nullptr
#define FASTKD_GLUE_GUARD(tensor) (void)(tensor)
#include <torch/library.h>

#include "affinity_window_glue.h"

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def(
      "cuda_affinity_window_forward(Tensor s, Tensor t, int kernel_h, int kernel_w, bool max_pool, int window, "
      "float eps, bool detach_norm) -> (Tensor total, Tensor difference, Tensor s_norms, Tensor t_norms)");
  m.def(
      "cuda_affinity_window_backward(Tensor grad_total, Tensor x, Tensor norms, Tensor difference, int kernel_h, "
      "int kernel_w, bool max_pool, int window, float eps, bool detach_norm, float sign) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("cuda_affinity_window_forward", &fastkd::affinity_window_forward_op);
  m.impl("cuda_affinity_window_backward", &fastkd::affinity_window_backward_op);
}
