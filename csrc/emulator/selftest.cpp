// Small kernels that show what the emulator catches, run by tests/test_cuda_emulator.py through the CPU op
// fastkd_emulated::emulator_selftest(kernel, values): a correct block reduction and warp reduction, and the same
// reduction with a missing __syncthreads(), a __syncthreads() in divergent code, a shuffle in divergent code,
// and a shared-memory index out of bounds.
#define FASTKD_EMULATE_CUDA 1
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "../common/fastkd_cuda.cuh"

namespace fastkd {
namespace emulated {
namespace {

constexpr int kThreads = 64;

// Sums 64 values by halving strides in shared memory. Without the barrier inside the loop, a thread reads a
// partial sum that another thread is still to write: the classic missing-__syncthreads race.
FASTKD_GLOBAL void tree_sum_kernel(const double* values, double* out, bool barrier_in_loop) {
  FASTKD_SHARED(double, partial, kThreads);
  const int tid = static_cast<int>(threadIdx.x);
  partial[tid] = values[tid];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride) partial[tid] += partial[tid + stride];
    if (barrier_in_loop) __syncthreads();
  }
  if (tid == 0) out[0] = partial[0];
}

// One sum per warp of 32 lanes by shuffles.
FASTKD_GLOBAL void warp_sum_kernel(const double* values, double* out) {
  double value = values[threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = value;
}

// Half of the block waits at one __syncthreads(), the other half at another: undefined on a GPU.
FASTKD_GLOBAL void divergent_syncthreads_kernel(double* out) {
  if (threadIdx.x < kThreads / 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0;
}

// Lanes 0-15 shuffle while the others wait at a barrier: a deadlock on a GPU.
FASTKD_GLOBAL void divergent_shuffle_kernel(double* out) {
  double value = 1.0;
  if (threadIdx.x % 32 < 16) value = __shfl_down_sync(0xffffffffu, value, 1);
  __syncthreads();
  out[threadIdx.x] = value;
}

// Thread 63 writes one element past the end of a 64-element shared array.
FASTKD_GLOBAL void shared_out_of_bounds_kernel(double* out) {
  FASTKD_SHARED(double, cell, kThreads);
  cell[threadIdx.x + 1] = 1.0;
  out[threadIdx.x] = 1.0;
}

at::Tensor emulator_selftest(const std::string& kernel, const at::Tensor& values) {
  TORCH_CHECK(values.scalar_type() == at::kDouble && values.is_contiguous() && values.numel() == kThreads,
              "`values` must be 64 contiguous float64 values");
  at::Tensor out = at::zeros({kThreads}, values.options());
  const double* in = values.const_data_ptr<double>();
  double* result = out.mutable_data_ptr<double>();
  void* stream = nullptr;
  if (kernel == "tree_sum" || kernel == "tree_sum_missing_syncthreads") {
    FASTKD_LAUNCH(tree_sum_kernel, dim3(1), dim3(kThreads), stream, in, result, kernel == "tree_sum");
  } else if (kernel == "warp_sum") {
    FASTKD_LAUNCH(warp_sum_kernel, dim3(1), dim3(kThreads), stream, in, result);
  } else if (kernel == "divergent_syncthreads") {
    FASTKD_LAUNCH(divergent_syncthreads_kernel, dim3(1), dim3(kThreads), stream, result);
  } else if (kernel == "divergent_shuffle") {
    FASTKD_LAUNCH(divergent_shuffle_kernel, dim3(1), dim3(kThreads), stream, result);
  } else if (kernel == "shared_out_of_bounds") {
    FASTKD_LAUNCH(shared_out_of_bounds_kernel, dim3(1), dim3(kThreads), stream, result);
  } else {
    TORCH_CHECK(false, "unknown emulator self-test kernel '", kernel, "'");
  }
  return out;
}

}  // namespace
}  // namespace emulated
}  // namespace fastkd

// The one TORCH_LIBRARY block of the emulator's namespace; every op adds its schema to it in
// csrc/<op>/<op>_schema.cpp and its emulated kernels in <op>_emulated.cpp.
TORCH_LIBRARY(fastkd_emulated, m) { m.def("emulator_selftest(str kernel, Tensor values) -> Tensor"); }

TORCH_LIBRARY_IMPL(fastkd_emulated, CPU, m) { m.impl("emulator_selftest", &fastkd::emulated::emulator_selftest); }
