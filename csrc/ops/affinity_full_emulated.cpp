// The full-graph affinity op schemas, and their CPU implementation: the CUDA kernels run by fastkd's
// emulator (backend="cuda" with FASTKD_EMULATE_CUDA=1 on CPU tensors).
#define FASTKD_EMULATE_CUDA 1
#define FASTKD_GLUE_STREAM() nullptr
#define FASTKD_GLUE_GUARD(tensor) (void)(tensor)
#include <torch/library.h>

#include "affinity_full_glue.h"

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def(
      "cuda_affinity_forward(Tensor s, Tensor t, int kernel_h, int kernel_w, int grid_h, int grid_w, bool max_pool, "
      "float eps, bool use_gram, bool per_row, bool detach_norm) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_affinity_backward(Tensor grad_terms, Tensor s, Tensor t, Tensor s_norm, Tensor t_norm, Tensor gram_ss, "
      "Tensor gram_st, Tensor gram_tt, int kernel_h, int kernel_w, int grid_h, int grid_w, bool max_pool, float eps, "
      "bool use_gram, bool detach_norm, bool need_s, bool need_t) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("cuda_affinity_forward", &fastkd::affinity_full_forward_op);
  m.impl("cuda_affinity_backward", &fastkd::affinity_full_backward_op);
}
