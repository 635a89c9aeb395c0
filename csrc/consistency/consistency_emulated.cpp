// The CPU implementation of fastkd_emulated::consistency_forward / _backward (schema:
// consistency_schema.cpp): the CUDA kernels of consistency.cu compiled as C++ and run by fastkd's emulator
// (backend="cuda" with FASTKD_EMULATE_CUDA=1 on CPU tensors).
#define FASTKD_EMULATE_CUDA 1
#define FASTKD_GLUE_STREAM() nullptr
#define FASTKD_GLUE_GUARD(tensor) (void)(tensor)
#include <torch/library.h>

#include "consistency.cu"  // the kernels, compiled as C++ into fastkd::emulated
#include "consistency_glue.h"

TORCH_LIBRARY_IMPL(fastkd_emulated, CPU, m) {
  m.impl("consistency_forward", &fastkd::consistency_forward_op);
  m.impl("consistency_backward", &fastkd::consistency_backward_op);
}
