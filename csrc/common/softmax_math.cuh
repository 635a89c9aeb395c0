// What the CUDA kernels of the two per-pixel ops (pixelwise_kd.cu, probability.cu; also run by the emulator)
// share: one thread per pixel of the flattened B x H x W map, and the online softmax over the channels that
// each thread computes for its own pixel in double.
//
// Pixel `index` of a (B, C, H, W) tensor of any strides (a Map) is b = index / (H W), p = index % (H W), and
// its channel c at b stride_b + c stride_c + (p / W) stride_h + (p % W) stride_w: 64-bit offsets, so every
// layout is read in place. Consecutive threads take consecutive pixels, so for NCHW the loads of one channel
// coalesce across a warp. The grid is 1-D in x (gridDim.x up to 2^31 - 1) with a grid-stride loop, so any
// number of pixels fits.
//
// Online softmax of logits l_c at temperature T: with the running max m and z_c = (l_c - m) inv_t,
// S = sum_c exp(z_c). Folding in a logit v either keeps m (e = exp((v - m) inv_t) joins the sum) or raises it to
// v (the old sum and everything built on the old z is rescaled by a = exp((m - v) inv_t), and v joins with
// e = 1): one exp per logit either way, and no branch (selects).
#pragma once

#include <cmath>
#include <cstdint>

#include "fastkd_cuda.cuh"
#include "nodes_math.cuh"
#include "precision.cuh"

// MACRO(S, T) for every pair of storage types the per-pixel kernels are instantiated for (student s, teacher t:
// each read in its own dtype).
#define FASTKD_FOR_EACH_STORAGE_TYPE_WITH(MACRO, S) MACRO(S, float) MACRO(S, double) MACRO(S, __half) MACRO(S, __nv_bfloat16)
#define FASTKD_FOR_EACH_STORAGE_PAIR(MACRO)          \
  FASTKD_FOR_EACH_STORAGE_TYPE_WITH(MACRO, float)    \
  FASTKD_FOR_EACH_STORAGE_TYPE_WITH(MACRO, double)   \
  FASTKD_FOR_EACH_STORAGE_TYPE_WITH(MACRO, __half)   \
  FASTKD_FOR_EACH_STORAGE_TYPE_WITH(MACRO, __nv_bfloat16)

namespace fastkd {
namespace softmax {

using Map = nodes::Map;  // a (B, C, H, W) tensor of any strides

constexpr int kThreads = 256;                    // pixels per block (one thread each)
constexpr std::int64_t kMaxBlocks = 2147483647;  // gridDim.x limit; more pixels loop (grid stride)

// Blocks of kThreads for `pixels` pixels (at least 1, at most kMaxBlocks).
inline unsigned blocks_for(std::int64_t pixels) {
  const std::int64_t blocks = (pixels + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

// A pixel of the B x H x W map: image b, row y, column x.
struct Pixel {
  std::int64_t b, y, x;
};

FASTKD_HOST_DEVICE inline Pixel pixel_of(std::int64_t index, std::int64_t height, std::int64_t width) {
  const std::int64_t pixels = height * width, p = index % pixels;
  return {index / pixels, p / width, p % width};
}

// The element offset of the pixel's channel 0 in a tensor of layout `map`.
FASTKD_HOST_DEVICE inline std::int64_t offset_of(const Map& map, const Pixel& pixel) {
  return pixel.b * map.stride_b + pixel.y * map.stride_h + pixel.x * map.stride_w;
}

// 0 for a finite logit, NaN for NaN and +-Inf (v - v): summed over a pixel's logits, it poisons its results.
FASTKD_HOST_DEVICE inline double poison_of(double v) { return v - v; }

// The running max and sum of exponentials of one pixel's logits, started at its first logit v: m = v, S = 1.
struct Running {
  double max, sum;
};

FASTKD_HOST_DEVICE inline Running start(double v) { return {v, 1.0}; }

// One logit v folded into a Running r: the new max, the factor `scale` = exp(shift) of everything computed
// relative to the old max (shift = (m_old - m_new) inv_t <= 0; 1 and 0 when the max stays), and v's
// z = (v - m_new) inv_t and e = exp(z). A NaN v leaves the max and gives NaN e and z.
struct Step {
  double max, scale, shift, e, z;
};

FASTKD_HOST_DEVICE inline Step step(const Running& r, double v, double inv_t) {
  const bool rises = v > r.max;
  const double x = (rises ? r.max - v : v - r.max) * inv_t;  // <= 0
  const double ex = exp(x);
  return {rises ? v : r.max, rises ? ex : 1.0, rises ? x : 0.0, rises ? 1.0 : ex, rises ? 0.0 : x};
}

FASTKD_HOST_DEVICE inline void take(Running& r, const Step& s) {
  r.max = s.max;
  r.sum = r.sum * s.scale + s.e;
}

// exp(z) of a logit v against the final max of its pixel (the backward's second pass).
FASTKD_HOST_DEVICE inline double exp_of(double v, const Running& r, double inv_t) { return exp((v - r.max) * inv_t); }

// Channel c of a pixel (`pixel`: its channel 0; `stride`: the channel stride), c clamped to the last channel.
// The channel loops load one channel ahead with it, so that a thread's next load is in flight while it computes
// the current channel (the compiler does not hoist loads across the branches of exp, nor above the gradient's
// stores); the last step reloads its own channel, from L1.
template <typename T>
FASTKD_HOST_DEVICE inline T channel_ahead(global_ptr<const T> pixel, std::int64_t stride, std::int64_t c,
                                         std::int64_t channels) {
  return pixel[(c < channels ? c : channels - 1) * stride];
}

}  // namespace softmax
}  // namespace fastkd

#if defined(__CUDACC__) || defined(FASTKD_EMULATE_CUDA)
namespace fastkd {
namespace softmax {

// The grid-stride loop of a per-pixel kernel: this thread's first pixel and the step to its next.
FASTKD_DEVICE inline std::int64_t first_pixel() {
  return static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
FASTKD_DEVICE inline std::int64_t pixel_stride() { return static_cast<std::int64_t>(gridDim.x) * blockDim.x; }

}  // namespace softmax
}  // namespace fastkd
#endif
