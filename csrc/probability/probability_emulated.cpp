// The CPU implementation of fastkd_emulated::probability_forward / _backward (schema:
// probability_schema.cpp): the CUDA kernels of probability.cu compiled as C++ and run by fastkd's emulator
// (backend="cuda" with FASTKD_EMULATE_CUDA=1 on CPU tensors).
#define FASTKD_EMULATE_CUDA 1
#define FASTKD_GLUE_STREAM() nullptr
#define FASTKD_GLUE_GUARD(tensor) (void)(tensor)
#include <torch/library.h>

#include "probability.cu"  // the kernels, compiled as C++ into fastkd::emulated
#include "probability_glue.h"

TORCH_LIBRARY_IMPL(fastkd_emulated, CPU, m) {
  m.impl("probability_forward", &fastkd::probability_forward_op);
  m.impl("probability_backward", &fastkd::probability_backward_op);
}
