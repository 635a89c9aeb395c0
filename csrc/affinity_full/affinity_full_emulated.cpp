// The CPU implementation of fastkd_emulated::affinity_full_forward / _backward (schema:
// affinity_full_schema.cpp): the CUDA kernels of affinity_full.cu compiled as C++ and run by fastkd's emulator
// (backend="cuda" with FASTKD_EMULATE_CUDA=1 on CPU tensors).
#define FASTKD_EMULATE_CUDA 1
#define FASTKD_GLUE_STREAM() nullptr
#define FASTKD_GLUE_GUARD(tensor) (void)(tensor)
#include <torch/library.h>

#include "affinity_full.cu"  // the kernels, compiled as C++ into fastkd::emulated
#include "affinity_full_glue.h"

TORCH_LIBRARY_IMPL(fastkd_emulated, CPU, m) {
  m.impl("affinity_full_forward", &fastkd::affinity_full_forward_op);
  m.impl("affinity_full_backward", &fastkd::affinity_full_backward_op);
}
