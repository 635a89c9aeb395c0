// The consistency op schemas, and their CPU implementation: the CUDA kernels run by fastkd's emulator
// (backend="cuda" with FASTKD_EMULATE_CUDA=1 on CPU tensors).
#define FASTKD_EMULATE_CUDA 1
#define FASTKD_GLUE_STREAM() nullptr
#define FASTKD_GLUE_GUARD(tensor) (void)(tensor)
#include <torch/library.h>

#include "consistency_glue.h"

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("cuda_consistency_forward(Tensor s, Tensor t, bool valid, int dilation) -> (Tensor, Tensor)");
  m.def("cuda_consistency_backward(Tensor grad_loss, Tensor x, Tensor difference, int dilation, float sign) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("cuda_consistency_forward", &fastkd::consistency_forward_op);
  m.impl("cuda_consistency_backward", &fastkd::consistency_backward_op);
}
