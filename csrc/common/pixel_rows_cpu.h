// What the C++ CPU implementations of the neighbourhood ops (affinity_window_cpu.cpp, consistency_cpu.cpp)
// share: runs of one row of one channel, widened to double, prefetched, and the part of a run whose shifted
// partner lies inside the row. Their kernels work on tiles of consecutive pixels (or nodes) of one row, with
// the channel loop outside and the loop over the tile's pixels inside: for NCHW tensors those pixels are
// contiguous, so the inner loops vectorise. A tile reads a short run of each channel's rows, channels a plane
// apart, which the hardware prefetchers do not follow: each channel of a tile prefetches the same rows of the
// next tile, which it reads a whole tile later.
#pragma once

#include <algorithm>
#include <cstdint>

#include "precision.cuh"

namespace fastkd {
namespace cpu {

// out[n] = p[n * stride] in double, n < count.
template <typename T>
inline void load_row(const T* p, std::int64_t stride, std::int64_t count, double* out) {
  if (stride == 1) {
#pragma omp simd
    for (std::int64_t n = 0; n < count; ++n) out[n] = to_double(p[n]);
  } else {
    for (std::int64_t n = 0; n < count; ++n) out[n] = to_double(p[n * stride]);
  }
}

// Prefetches the cache lines of p[0], p[stride], ..., p[(count - 1) stride] where stride is 1 (runs of other
// strides are left to the hardware).
template <typename T>
inline void prefetch_row(const T* p, std::int64_t stride, std::int64_t count) {
  if (stride != 1 || count <= 0) return;
  constexpr std::int64_t kLine = 64;
  const char* first = reinterpret_cast<const char*>(p);
  const char* last = reinterpret_cast<const char*>(p + count - 1);
  for (const char* at = first; at < last; at += kLine) __builtin_prefetch(at);
  __builtin_prefetch(last);
}

// [begin, end): the n in [0, count) with 0 <= first + n < extent.
struct Run {
  std::int64_t begin, end;
};

inline Run inside(std::int64_t first, std::int64_t count, std::int64_t extent) {
  const std::int64_t begin = std::min(count, std::max<std::int64_t>(0, -first));
  return {begin, std::max(begin, std::min(count, extent - first))};
}

}  // namespace cpu
}  // namespace fastkd
