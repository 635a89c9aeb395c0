// The CPU implementation of fastkd_emulated::pixelwise_kd_forward / _backward (schema:
// pixelwise_kd_schema.cpp): the CUDA kernels of pixelwise_kd.cu compiled as C++ and run by fastkd's emulator
// (backend="cuda" with FASTKD_EMULATE_CUDA=1 on CPU tensors).
#define FASTKD_EMULATE_CUDA 1
#define FASTKD_GLUE_STREAM() nullptr
#define FASTKD_GLUE_GUARD(tensor) (void)(tensor)
#include <torch/library.h>

#include "pixelwise_kd.cu"  // the kernels, compiled as C++ into fastkd::emulated
#include "pixelwise_kd_glue.h"

TORCH_LIBRARY_IMPL(fastkd_emulated, CPU, m) {
  m.impl("pixelwise_kd_forward", &fastkd::pixelwise_kd_forward_op);
  m.impl("pixelwise_kd_backward", &fastkd::pixelwise_kd_backward_op);
}
