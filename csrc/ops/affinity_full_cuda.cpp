// The CUDA implementation of the full-graph affinity ops (CUDA builds only): kernels on the current stream
// of the input's device.
#ifdef FASTKD_WITH_CUDA
#define FASTKD_CUDA_HOST 1
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#define FASTKD_GLUE_STREAM() c10::cuda::getCurrentCUDAStream().stream()
#define FASTKD_GLUE_GUARD(tensor) const c10::cuda::CUDAGuard device_guard((tensor).device())

#include "affinity_full_glue.h"

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("cuda_affinity_forward", &fastkd::affinity_full_forward_op);
  m.impl("cuda_affinity_backward", &fastkd::affinity_full_backward_op);
}
#endif
