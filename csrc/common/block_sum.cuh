// Sums of one double per thread in a fixed order (no atomics): a warp's by shuffles, a block's by its warps'
// sums, summed by warp 0.
#pragma once

#include "fastkd_cuda.cuh"

namespace fastkd {

// The sum over the 32 lanes of a warp, valid in lane 0. Every lane of the warp must call it.
FASTKD_DEVICE inline double warp_sum(double value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

// The sum over the block, valid in thread 0. Every thread of the block must call it (it has a __syncthreads).
template <int kThreads>
FASTKD_DEVICE double block_sum(double value) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, at most 32 of them");
  constexpr int kWarps = kThreads / 32;
  FASTKD_SHARED(double, warp_sums, kWarps);
  value = warp_sum(value);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = 0.0;
  if (warp == 0) value = warp_sum(lane < kWarps ? static_cast<double>(warp_sums[lane]) : 0.0);
  return value;
}

}  // namespace fastkd
