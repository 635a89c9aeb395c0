// The per-pixel math of the 8-neighbour consistency loss (Xie et al. 2018, sec. 3.1; FORMULAS.md section 3),
// shared by the CUDA kernels (consistency.cu, also run by the emulator) and the CPU implementation
// (consistency_cpu.cpp). Everything is accumulated in double; indices are 64-bit.
#pragma once

#include <cstdint>

#include "../common/fastkd_cuda.cuh"
#include "../common/nodes_math.cuh"
#include "../common/precision.cuh"

namespace fastkd {
namespace consistency {

using Map = nodes::Map;  // a (B, C, H, W) tensor of any strides, as every kernel reads it

FASTKD_HOST_DEVICE inline bool inside(const Map& map, std::int64_t y, std::int64_t x) {
  return y >= 0 && y < map.height && x >= 0 && x < map.width;
}

// Where c is defined: every pixel ("same"), or those with all 8 neighbours inside ("valid").
FASTKD_HOST_DEVICE inline bool defined(const Map& map, std::int64_t y, std::int64_t x, std::int64_t d, bool valid) {
  return !valid || (y >= d && y < map.height - d && x >= d && x < map.width - d);
}

// c(x) = sum over the neighbours y = x + (dy, dx) d inside the image of ||l(y) - l(x)||^2.
template <typename T>
FASTKD_HOST_DEVICE double neighbour_sum(global_ptr<const T> logits, const Map& map, std::int64_t b, std::int64_t y,
                                        std::int64_t x, std::int64_t d) {
  const global_ptr<const T> image = logits + b * map.stride_b;
  double sum = 0.0;
  for (std::int64_t c = 0; c < map.channels; ++c) {
    const global_ptr<const T> channel = image + c * map.stride_c;
    const double centre = to_double(channel[y * map.stride_h + x * map.stride_w]);
    for (int dy = -1; dy <= 1; ++dy) {
      for (int dx = -1; dx <= 1; ++dx) {
        const std::int64_t ny = y + dy * d, nx = x + dx * d;
        if ((dy == 0 && dx == 0) || !inside(map, ny, nx)) continue;
        const double edge = to_double(channel[ny * map.stride_h + nx * map.stride_w]) - centre;
        sum += edge * edge;
      }
    }
  }
  return sum;
}

// dL/dl(x) for channel c: with g = dL/dc (the map difference, 0 where c is undefined), every edge (x, y)
// enters c(x) and c(y), so dL/dl(x) = sum over neighbours y of 2 (g(x) + g(y)) (l(x) - l(y)), times the
// factor 2 of d(c_s - c_t)^2: `scale` carries 4 * sign * dL/dloss.
template <typename T>
FASTKD_HOST_DEVICE double gradient_at(global_ptr<const T> logits, const Map& map, global_ptr<const double> difference,
                                      std::int64_t b, std::int64_t c, std::int64_t y, std::int64_t x, std::int64_t d) {
  const global_ptr<const T> channel = logits + b * map.stride_b + c * map.stride_c;
  const global_ptr<const double> g = difference + b * map.height * map.width;
  const double centre = to_double(channel[y * map.stride_h + x * map.stride_w]);
  const double g_centre = g[y * map.width + x];
  double sum = 0.0;
  for (int dy = -1; dy <= 1; ++dy) {
    for (int dx = -1; dx <= 1; ++dx) {
      const std::int64_t ny = y + dy * d, nx = x + dx * d;
      if ((dy == 0 && dx == 0) || !inside(map, ny, nx)) continue;
      sum += (g_centre + g[ny * map.width + nx]) * (centre - to_double(channel[ny * map.stride_h + nx * map.stride_w]));
    }
  }
  return sum;
}

}  // namespace consistency
}  // namespace fastkd
