// The CUDA implementation of fastkd::probability_forward / _backward (schema: probability_schema.cpp;
// CUDA builds only): the kernels on the current stream of the input's device.
#ifdef FASTKD_WITH_CUDA
#define FASTKD_CUDA_HOST 1
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#define FASTKD_GLUE_STREAM() c10::cuda::getCurrentCUDAStream().stream()
#define FASTKD_GLUE_GUARD(tensor) const c10::cuda::CUDAGuard device_guard((tensor).device())

#include "probability_glue.h"

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("probability_forward", &fastkd::probability_forward_op);
  m.impl("probability_backward", &fastkd::probability_backward_op);
}
#endif
