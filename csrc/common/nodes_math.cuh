// Graph nodes of the affinity kernels, full graph (affinity_full.cu) and windowed (affinity_window.cu), per
// node: the patch geometry, pooling on the fly, the L2 norm, the normalised features, and the backward
// through both (Liu et al. 2020, sec. 2.1; FORMULAS.md section 1, steps 1-2). Ports
// fastkd/ops/_triton_nodes.py. Also the tensor layout `Map` every kernel reads (consistency_math.cuh
// names it consistency::Map).
//
// A node is a kernel_h x kernel_w patch of one image, numbered row-major on the grid_h x grid_w node grid
// (ceil mode: the last patches may be partial). Average pooling averages the pixels that exist; a max over
// a patch holding NaN or +-Inf is NaN. The windowed graph's kernels pool what they need on the fly; the full
// graph's glue pools its nodes once (pool_nodes), and node norms (one double per node) are computed ahead.
// Everything is in double; indices are 64-bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastkd_cuda.cuh"
#include "precision.cuh"

// MACRO(T) for every storage type the kernels are instantiated for (the explicit instantiations of a .cu).
#define FASTKD_FOR_EACH_STORAGE_TYPE(MACRO) MACRO(float) MACRO(double) MACRO(__half) MACRO(__nv_bfloat16)

namespace fastkd {
namespace nodes {

// A (B, C, H, W) tensor of any strides.
struct Map {
  std::int64_t channels, height, width;
  std::int64_t stride_b, stride_c, stride_h, stride_w;
};

// How a map is cut into nodes: the patch (= stride) and the resulting grid.
struct Grid {
  std::int64_t kernel_h, kernel_w, grid_h, grid_w;
  bool max_pool;
};

// The grid of a height x width map (ceil mode).
FASTKD_HOST_DEVICE inline Grid make_grid(std::int64_t height, std::int64_t width, std::int64_t kernel_h,
                                         std::int64_t kernel_w, bool max_pool) {
  return {kernel_h, kernel_w, (height + kernel_h - 1) / kernel_h, (width + kernel_w - 1) / kernel_w, max_pool};
}

FASTKD_HOST_DEVICE inline std::int64_t node_count(const Grid& grid) { return grid.grid_h * grid.grid_w; }

// One operand of the full-graph kernels: the input, its layout and the scale 1 / (||f|| + eps) of every node
// ((B, m) double, computed once per node, so that normalising a staged element is a product). `Input` is the
// input's pointer type, so that the emulator's Nodes (checked pointers) is a type of its own, apart from the
// one of the CUDA build linked beside it.
template <typename T, typename Input = global_ptr<const T>>
struct Nodes {
  Input x;
  Map map;
  global_ptr<const double> scale;
};

#if defined(FASTKD_EMULATE_CUDA)
// The global memory a Nodes holds, for the emulator's race reports (cuda_emulator.h, add_regions).
template <typename T, typename Input, typename Visit>
void emulator_pointers(const Nodes<T, Input>& operand, Visit&& visit) {
  visit("x", operand.x);
  visit("scale", operand.scale);
}
static_assert(emu::HasPointers<Nodes<float>>::value, "the emulator must find emulator_pointers for Nodes");
#endif

// The pixels of a node's patch that exist: rows [row0, row0 + rows), columns [col0, col0 + cols).
struct Patch {
  std::int64_t row0, col0, rows, cols;
};

FASTKD_HOST_DEVICE inline Patch patch_of(const Map& map, const Grid& grid, std::int64_t node) {
  Patch patch;
  patch.row0 = node / grid.grid_w * grid.kernel_h;
  patch.col0 = node % grid.grid_w * grid.kernel_w;
  patch.rows = map.height - patch.row0 < grid.kernel_h ? map.height - patch.row0 : grid.kernel_h;
  patch.cols = map.width - patch.col0 < grid.kernel_w ? map.width - patch.col0 : grid.kernel_w;
  return patch;
}

// The element offset of channel c of image b at the patch's first pixel.
FASTKD_HOST_DEVICE inline std::int64_t patch_origin(const Map& map, const Patch& patch, std::int64_t b,
                                                    std::int64_t c) {
  return b * map.stride_b + c * map.stride_c + patch.row0 * map.stride_h + patch.col0 * map.stride_w;
}

// The pooled feature f_c of one channel of a node (`origin` from patch_origin). A max over a patch holding
// NaN or +-Inf is NaN (FORMULAS.md: a max alone would ignore -Inf). With `winner`, max pooling also gives
// the pixel (py * patch.cols + px) its gradient goes to: the first maximal pixel in row-major patch order,
// NaN being its own max (the first NaN pixel when f is NaN; -1, no pixel, for +-Inf without NaN).
template <typename T>
FASTKD_HOST_DEVICE double patch_sum(global_ptr<const T> origin, const Map& map, const Patch& patch) {
  double sum = 0.0;
  for (std::int64_t py = 0; py < patch.rows; ++py) {
    for (std::int64_t px = 0; px < patch.cols; ++px) sum += to_double(origin[py * map.stride_h + px * map.stride_w]);
  }
  return sum;
}

template <typename T>
FASTKD_HOST_DEVICE double pool(global_ptr<const T> origin, const Map& map, const Patch& patch, bool max_pool,
                               std::int64_t* winner = nullptr) {
  if (!max_pool) return patch_sum(origin, map, patch) / static_cast<double>(patch.rows * patch.cols);
  double best = to_double(origin[0]);
  double non_finite = 0.0;  // sum of (pixel - pixel): 0, or NaN once a pixel is NaN or +-Inf
  std::int64_t best_at = 0, first_nan = -1;
  for (std::int64_t py = 0; py < patch.rows; ++py) {
    for (std::int64_t px = 0; px < patch.cols; ++px) {
      const double pixel = to_double(origin[py * map.stride_h + px * map.stride_w]);
      if (pixel > best) {
        best = pixel;
        best_at = py * patch.cols + px;
      }
      if (pixel != pixel && first_nan < 0) first_nan = py * patch.cols + px;
      non_finite += pixel - pixel;
    }
  }
  const double f = best + non_finite;
  if (winner != nullptr) *winner = f == f ? best_at : first_nan;
  return f;
}

// The pooled feature f_c of `node` in image b (channel and node in range).
template <typename T>
FASTKD_HOST_DEVICE double pooled(global_ptr<const T> x, const Map& map, const Grid& grid, std::int64_t b,
                                 std::int64_t c, std::int64_t node) {
  const Patch patch = patch_of(map, grid, node);
  return pool(x + patch_origin(map, patch, b, c), map, patch, grid.max_pool);
}

// The sum of f_c^2 over the channels c = first, first + step, .. of `node` in image b (all of them for 0, 1:
// the square of ||f||_2).
template <typename T>
FASTKD_HOST_DEVICE double node_squares(global_ptr<const T> x, const Map& map, const Grid& grid, std::int64_t b,
                                       std::int64_t node, std::int64_t first = 0, std::int64_t step = 1) {
  double squares = 0.0;
  for (std::int64_t c = first; c < map.channels; c += step) {
    const double f = pooled(x, map, grid, b, c, node);
    squares += f * f;
  }
  return squares;
}

// Whether every node of `map` is one pixel and node n is the pixel at n * stride_w (rows back to back, as in
// contiguous and channels-last tensors): then kernels can take the flat path of `normalized`, with no pooling
// loop and no division of node indices.
FASTKD_HOST_DEVICE inline bool flat_pixels(const Map& map, const Grid& grid) {
  return grid.kernel_h == 1 && grid.kernel_w == 1 && (map.height == 1 || map.stride_h == map.width * map.stride_w);
}

// What normalising any channel of one node of image b needs, found once for a kernel that stages several
// channels of it: where its pixels are (for kFlat, the pixel at node * stride_w), and the factor that turns
// its pooled value into f_hat: the scale 1 / (||f|| + eps), over the pixel count for an average (so that
// the patch's sum times it is f_hat: no division per channel).
struct NodeAt {
  Patch patch;
  double factor;
  bool inside;  // node < m
};

template <bool kFlat, typename T>
FASTKD_HOST_DEVICE NodeAt locate(const Nodes<T>& operand, const Grid& grid, std::int64_t b, std::int64_t node) {
  NodeAt at{};
  const std::int64_t m = node_count(grid);
  at.inside = node < m;
  if (!at.inside) return at;
  at.factor = operand.scale[b * m + node];
  if (kFlat) {
    at.patch.col0 = node;
  } else {
    at.patch = patch_of(operand.map, grid, node);
    if (!grid.max_pool) at.factor /= static_cast<double>(at.patch.rows * at.patch.cols);
  }
  return at;
}

// f_hat_c = f_c / (||f|| + eps) of the located node in image b; 0 for a channel or node out of range (tile
// padding). kFlat: flat_pixels(operand.map, grid) holds, and f_c is the node's pixel.
template <bool kFlat, typename T>
FASTKD_HOST_DEVICE double normalized_at(const Nodes<T>& operand, const Grid& grid, const NodeAt& at, std::int64_t b,
                                        std::int64_t c) {
  if (!at.inside || c >= operand.map.channels) return 0.0;
  const Map& map = operand.map;
  if (kFlat) {
    return to_double(operand.x[b * map.stride_b + c * map.stride_c + at.patch.col0 * map.stride_w]) * at.factor;
  }
  const global_ptr<const T> origin = operand.x + patch_origin(map, at.patch, b, c);
  return (grid.max_pool ? pool(origin, map, at.patch, true) : patch_sum(origin, map, at.patch)) * at.factor;
}

// normalized_at for one channel of `node`. (A flat node's pixel is read directly: through locate, the flat
// staging of the apply and direct kernels took 5-14% more instructions.)
template <bool kFlat, typename T>
FASTKD_HOST_DEVICE double normalized(const Nodes<T>& operand, const Grid& grid, std::int64_t b, std::int64_t c,
                                     std::int64_t node) {
  if (!kFlat) return normalized_at<false>(operand, grid, locate<false>(operand, grid, b, node), b, c);
  const std::int64_t m = node_count(grid);
  if (c >= operand.map.channels || node >= m) return 0.0;
  const Map& map = operand.map;
  return to_double(operand.x[b * map.stride_b + c * map.stride_c + node * map.stride_w]) * operand.scale[b * m + node];
}

// The backward of the normalisation and the pooling, from g = dL/df_hat (grad_hat: (B, C, m) contiguous
// double; norms: (B, m)). Normalisation: with k = 1 / (n + eps) and n = ||f||, dL/df = k g - k^2 (f . g) f / n
// (only k g when the norm is detached; f = 0 has n = 0 and a zero second term). Pooling: an average spreads
// dL/df over the patch's existing pixels, a max sends it to the first maximal pixel in row-major patch order
// (NaN is its own max; see pool). Two steps, so that a few large nodes still spread over many threads:
// radial_term once a node, then channel_backward once a channel of a node.

// f . g of `node` in image b over the channels c = first, first + step, .. (all of them for 0, 1). f is read
// from `nodes_in` ((B, C, m) double, the nodes pooled ahead) where it is not nullptr, else pooled from x.
template <typename T>
FASTKD_HOST_DEVICE double radial_dot(global_ptr<const double> grad_hat, global_ptr<const T> x, const Map& map,
                                     global_ptr<const double> nodes_in, const Grid& grid, std::int64_t b,
                                     std::int64_t node, std::int64_t first = 0, std::int64_t step = 1) {
  const std::int64_t m = node_count(grid);
  const std::int64_t channel0 = b * map.channels * m + node;  // channel 0 of the node in grad_hat and nodes_in
  double dot = 0.0;
  for (std::int64_t c = first; c < map.channels; c += step) {
    const double f = nodes_in != nullptr ? static_cast<double>(nodes_in[channel0 + c * m]) : pooled(x, map, grid, b, c,
                                                                                                      node);
    dot += grad_hat[channel0 + c * m] * f;
  }
  return dot;
}

// k^2 (f . g) / n, the norm's share of a node's gradient, from its radial_dot and norm n (0 when n = 0).
FASTKD_HOST_DEVICE inline double radial_term(double dot, double norm, double eps) {
  if (!(norm > 0)) return 0.0;
  const double scale = 1.0 / (norm + eps);
  return dot * scale * scale / norm;
}

// The pooling backward of one channel of a node: dL/dx of its pixels (`out`: the first of them, in grad_map's
// layout) from dL/df = grad_pooled. An average spreads grad_pooled times `inverse_count` (1 / the patch's pixel
// count, found once by the caller) over the patch; a max sends grad_pooled to the first maximal pixel (`origin`:
// the patch's first pixel in x; see pool) and 0 to the others.
template <typename T>
FASTKD_HOST_DEVICE void unpool(global_ptr<const T> origin, const Map& map, const Patch& patch, bool max_pool,
                               double grad_pooled, double inverse_count, global_ptr<T> out, const Map& grad_map) {
  std::int64_t winner = -1;
  if (max_pool) pool(origin, map, patch, true, &winner);
  const double per_pixel = max_pool ? grad_pooled : grad_pooled * inverse_count;
  for (std::int64_t py = 0; py < patch.rows; ++py) {
    for (std::int64_t px = 0; px < patch.cols; ++px) {
      const double value = !max_pool || py * patch.cols + px == winner ? per_pixel : 0.0;
      out[py * grad_map.stride_h + px * grad_map.stride_w] = from_double<T>(value);
    }
  }
}

// dL/dx for the pixels of channel c of `node` in image b, given the node's radial_term (0 when the norm is
// detached). Patches do not overlap: the caller's thread writes these pixels, and no other.
template <typename T>
FASTKD_HOST_DEVICE void channel_backward(global_ptr<const double> grad_hat, global_ptr<const T> x, const Map& map,
                                         global_ptr<const double> norms, double radial, const Grid& grid, double eps,
                                         std::int64_t b, std::int64_t c, std::int64_t node, global_ptr<T> grad,
                                         const Map& grad_map) {
  const std::int64_t m = node_count(grid);
  const double scale = 1.0 / (norms[b * m + node] + eps);
  const Patch patch = patch_of(map, grid, node);
  const global_ptr<const T> origin = x + patch_origin(map, patch, b, c);
  const double f = pool(origin, map, patch, grid.max_pool);
  const double grad_pooled = grad_hat[(b * map.channels + c) * m + node] * scale - radial * f;
  unpool(origin, map, patch, grid.max_pool, grad_pooled, 1.0 / static_cast<double>(patch.rows * patch.cols),
         grad + patch_origin(grad_map, patch, b, c), grad_map);
}

}  // namespace nodes
}  // namespace fastkd
