// The CUDA implementation of fastkd::affinity_full_forward / _backward (schema: affinity_full_schema.cpp;
// CUDA builds only): the kernels on the current stream of the input's device.
#ifdef FASTKD_WITH_CUDA
#define FASTKD_CUDA_HOST 1
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#define FASTKD_GLUE_STREAM() c10::cuda::getCurrentCUDAStream().stream()
#define FASTKD_GLUE_GUARD(tensor) const c10::cuda::CUDAGuard device_guard((tensor).device())

#include "affinity_full_glue.h"

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("affinity_full_forward", &fastkd::affinity_full_forward_op);
  m.impl("affinity_full_backward", &fastkd::affinity_full_backward_op);
}
#endif
