// The CPU implementation of fastkd_emulated::affinity_window_forward / _backward (schema:
// affinity_window_schema.cpp): the CUDA kernels of affinity_window.cu compiled as C++ and run by fastkd's emulator
// (backend="cuda" with FASTKD_EMULATE_CUDA=1 on CPU tensors).
#define FASTKD_EMULATE_CUDA 1
#define FASTKD_GLUE_STREAM() nullptr
#define FASTKD_GLUE_GUARD(tensor) (void)(tensor)
#include <torch/library.h>

#include "affinity_window.cu"  // the kernels, compiled as C++ into fastkd::emulated
#include "affinity_window_glue.h"

TORCH_LIBRARY_IMPL(fastkd_emulated, CPU, m) {
  m.impl("affinity_window_forward", &fastkd::affinity_window_forward_op);
  m.impl("affinity_window_backward", &fastkd::affinity_window_backward_op);
}
