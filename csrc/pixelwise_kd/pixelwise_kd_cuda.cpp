// The CUDA implementation of fastkd::pixelwise_kd_forward / _backward (schema: pixelwise_kd_schema.cpp;
// CUDA builds only): the kernels on the current stream of the input's device.
#ifdef FASTKD_WITH_CUDA
#define FASTKD_CUDA_HOST 1
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#define FASTKD_GLUE_STREAM() c10::cuda::getCurrentCUDAStream().stream()
#define FASTKD_GLUE_GUARD(tensor) const c10::cuda::CUDAGuard device_guard((tensor).device())

#include "pixelwise_kd_glue.h"

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("pixelwise_kd_forward", &fastkd::pixelwise_kd_forward_op);
  m.impl("pixelwise_kd_backward", &fastkd::pixelwise_kd_backward_op);
}
#endif
