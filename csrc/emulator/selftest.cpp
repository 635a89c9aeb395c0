// Small kernels that show what the emulator catches, run by tests/test_cuda_emulator.py through the CPU op
// fastkd_emulated::emulator_selftest(kernel, values): a correct block reduction and warp reduction, and planted
// bugs of every class it checks: a missing __syncthreads(), a __syncthreads() in divergent code, a shuffle in
// divergent code, a shuffle reading an exited lane, a shared-memory index out of bounds, a grid and a static
// shared array over CUDA's limits, races between blocks through global memory, an mma.sync in divergent code
// and in a warp of 16 lanes; the FP64 mma.sync's fragments; and access patterns its
// profile must tell apart: shared-memory reads with and without bank conflicts, global loads with and without
// coalescing.
#define FASTKD_EMULATE_CUDA 1
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "../common/fastkd_cuda.cuh"
#include "../common/mma.cuh"

namespace fastkd {
namespace emulated {
namespace {

constexpr int kThreads = 64;

// Sums 64 values by halving strides in shared memory. Without the barrier inside the loop, a thread reads a
// partial sum that another thread is still to write: the classic missing-__syncthreads race.
FASTKD_GLOBAL void tree_sum_kernel(global_ptr<const double> values, global_ptr<double> out, bool barrier_in_loop) {
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
FASTKD_GLOBAL void warp_sum_kernel(global_ptr<const double> values, global_ptr<double> out) {
  double value = values[threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = value;
}

// Half of the block waits at one __syncthreads(), the other half at another: undefined on a GPU.
FASTKD_GLOBAL void divergent_syncthreads_kernel(global_ptr<double> out) {
  if (threadIdx.x < kThreads / 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0;
}

// Lanes 0-15 shuffle while the others wait at a barrier: a deadlock on a GPU.
FASTKD_GLOBAL void divergent_shuffle_kernel(global_ptr<double> out) {
  double value = 1.0;
  if (threadIdx.x % 32 < 16) value = __shfl_down_sync(0xffffffffu, value, 1);
  __syncthreads();
  out[threadIdx.x] = value;
}

// Thread 63 writes one element past the end of a 64-element shared array.
FASTKD_GLOBAL void shared_out_of_bounds_kernel(global_ptr<double> out) {
  FASTKD_SHARED(double, cell, kThreads);
  cell[threadIdx.x + 1] = 1.0;
  out[threadIdx.x] = 1.0;
}

// Lanes 16-31 return before lanes 0-15 shuffle with a full mask: they read values that were never sent.
FASTKD_GLOBAL void exited_lane_shuffle_kernel(global_ptr<const double> values, global_ptr<double> out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, values[threadIdx.x], 16);
}

FASTKD_GLOBAL void copy_kernel(global_ptr<const double> values, global_ptr<double> out) {
  out[threadIdx.x] = values[threadIdx.x];
}

// 7000 doubles (56000 bytes) of static shared memory: over the 48 KiB a block may declare.
FASTKD_GLOBAL void shared_too_large_kernel(global_ptr<double> out) {
  FASTKD_SHARED(double, big, 7000);
  big[threadIdx.x] = 1.0;
  out[threadIdx.x] = big[threadIdx.x];
}

// Every block writes out[0]: which value stays depends on the order the blocks run in.
FASTKD_GLOBAL void blocks_write_one_address_kernel(global_ptr<double> out) {
  if (threadIdx.x == 0) out[0] = blockIdx.x;
}

// Block b reads what block b - 1 wrote: nothing orders two blocks of one launch.
FASTKD_GLOBAL void block_reads_another_block_kernel(global_ptr<const double> values, global_ptr<double> out) {
  const unsigned index = blockIdx.x * blockDim.x + threadIdx.x;
  out[index] = values[index];
  if (blockIdx.x > 0 && threadIdx.x == 0) out[index] += out[index - 1];
}

// 32 threads read doubles `stride` apart from a shared tile: stride 1 is conflict-free (2 wavefronts, the
// ideal for 32 x 8 bytes); stride 16 puts every lane on banks 0-1 (32 wavefronts, a 16-way conflict).
FASTKD_GLOBAL void shared_stride_kernel(global_ptr<const double> values, global_ptr<double> out, int stride) {
  FASTKD_SHARED(double, tile, 32 * 16);
  for (int k = 0; k < 16; ++k) tile[k * 32 + threadIdx.x] = values[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x * stride];
}

// 32 threads load doubles `stride` apart from global memory: stride 1 takes 8 sectors of 32 bytes (the
// ideal), stride 32 one sector per lane (32).
FASTKD_GLOBAL void global_stride_kernel(global_ptr<const double> values, global_ptr<double> out, int stride) {
  out[threadIdx.x] = values[threadIdx.x * stride];
}

// One FP64 mma.sync by the first warp: D = C + A B with A = values[0:32] (8 x 4), B' = values[32:64] (8 x 4,
// one row per column of B), C = values[64:128] (8 x 8); out = D (8 x 8). Lanes at or past `lanes` skip it
// and exit: with fewer than 32, the others wait for lanes that never come (a hang on a GPU).
FASTKD_GLOBAL void mma_kernel(global_ptr<const double> values, global_ptr<double> out, int lanes) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  double d[2] = {values[64 + 2 * lane], values[64 + 2 * lane + 1]};
  if (lane < lanes) mma_m8n8k4(d, values[lane], values[32 + lane]);
  if (threadIdx.x < 32) {
    out[2 * lane] = d[0];
    out[2 * lane + 1] = d[1];
  }
}

at::Tensor emulator_selftest(const std::string& kernel, const at::Tensor& values) {
  TORCH_CHECK(values.scalar_type() == at::kDouble && values.is_contiguous() && values.numel() >= 32 * 32,
              "`values` must be at least 1024 contiguous float64 values");
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
  } else if (kernel == "exited_lane_shuffle") {
    FASTKD_LAUNCH(exited_lane_shuffle_kernel, dim3(1), dim3(kThreads), stream, in, result);
  } else if (kernel == "shared_out_of_bounds") {
    FASTKD_LAUNCH(shared_out_of_bounds_kernel, dim3(1), dim3(kThreads), stream, result);
  } else if (kernel == "grid_too_large") {
    FASTKD_LAUNCH(copy_kernel, LaunchExtent(1, 70000), dim3(kThreads), stream, in, result);
  } else if (kernel == "block_too_deep") {
    FASTKD_LAUNCH(copy_kernel, dim3(1), dim3(1, 1, 65), stream, in, result);
  } else if (kernel == "shared_too_large") {
    FASTKD_LAUNCH(shared_too_large_kernel, dim3(1), dim3(kThreads), stream, result);
  } else if (kernel == "blocks_write_one_address") {
    FASTKD_LAUNCH(blocks_write_one_address_kernel, dim3(2), dim3(32), stream, result);
  } else if (kernel == "block_reads_another_block") {
    FASTKD_LAUNCH(block_reads_another_block_kernel, dim3(2), dim3(32), stream, in, result);
  } else if (kernel == "shared_stride_1" || kernel == "shared_stride_16") {
    FASTKD_LAUNCH(shared_stride_kernel, dim3(1), dim3(32), stream, in, result, kernel == "shared_stride_1" ? 1 : 16);
  } else if (kernel == "global_stride_1" || kernel == "global_stride_32") {
    FASTKD_LAUNCH(global_stride_kernel, dim3(1), dim3(32), stream, in, result, kernel == "global_stride_1" ? 1 : 32);
  } else if (kernel == "mma") {
    FASTKD_LAUNCH(mma_kernel, dim3(1), dim3(32), stream, in, result, 32);
  } else if (kernel == "divergent_mma") {
    FASTKD_LAUNCH(mma_kernel, dim3(1), dim3(32), stream, in, result, 16);
  } else if (kernel == "mma_in_a_partial_warp") {
    FASTKD_LAUNCH(mma_kernel, dim3(1), dim3(16), stream, in, result, 32);
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
// emulator_take_profile() returns the profile lines of the launches since its last call (fastkd::emu::take_profile).
TORCH_LIBRARY(fastkd_emulated, m) {
  m.def("emulator_selftest(str kernel, Tensor values) -> Tensor");
  m.def("emulator_take_profile() -> str[]", &fastkd::emu::take_profile);
}

TORCH_LIBRARY_IMPL(fastkd_emulated, CPU, m) { m.impl("emulator_selftest", &fastkd::emulated::emulator_selftest); }
