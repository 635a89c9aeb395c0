// A block-wide sum of one double per thread, in a fixed order (no atomics): within each warp by shuffles,
// then the warp sums by warp 0. Every thread of the block must call it (it has a __syncthreads); the
// result is valid in thread 0.
#pragma once

#include "fastkd_cuda.cuh"

namespace fastkd {

template <int kThreads>
FASTKD_DEVICE double block_sum(double value) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, at most 32 of them");
  constexpr int kWarps = kThreads / 32;
  FASTKD_SHARED(double, warp_sums, kWarps);
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = 0.0;
  if (warp == 0) {
    value = lane < kWarps ? static_cast<double>(warp_sums[lane]) : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

}  // namespace fastkd
