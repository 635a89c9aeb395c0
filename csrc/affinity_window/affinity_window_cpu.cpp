// The CPU implementation of fastkd::affinity_window_forward / _backward (schema: affinity_window_schema.cpp;
// backend="cpp"; Liu et al. 2020, eq. 2; FORMULAS.md section 1): the math of the CUDA kernels
// (affinity_window_math.cuh and common/nodes_math.cuh: the grid, the stored half window, pooling) computed on
// tiles of nodes, so that the inner loops vectorise.
//
// A tile is a run of up to kTileNodes consecutive nodes of one node row of one image (tiles numbered by image,
// row, run); each tile is one task of at::parallel_for. Nodes are pooled on the fly, never stored: for each
// channel, the pooled rows a tile needs (its own row and the rows below or around it within the window,
// reach_w nodes to either side) are read into small double buffers (common/pixel_rows_cpu.h), and every loop
// over the tile's nodes runs with a fixed channel (or block of channels) and window offset, contiguous in
// NCHW. Accumulators are per-node double arrays of the tile, summed over the channels in channel order. The
// next channels are read into a second set of buffers while one is used, and each channel prefetches the rows
// of the thread's next tile.
// Norms: ||f_i|| of every node of s and t, tiles in parallel, (B, m) double each.
// Forward: a tile accumulates the dot products f_i . f_j of its nodes i with their partners j at every stored
// offset (the diagonal, then one offset of each mirrored pair) for s and for t, kChannelBlock channels a pass;
// then writes D = a_s - a_t and a_t (0 where the partner is missing) into the (B, half, m) difference and
// teacher affinities and sums D^2
// (the diagonal once, the others twice), node by node in offset order and then over the tile's nodes in
// order, into partials[tile]. The partials are summed by one thread in tile order, so the total is bitwise
// the same whatever the number of threads and however at::parallel_for groups the tiles.
// Backward: a tile takes the weights w_ij = D_ij / (||f_j|| + eps) of every offset of the whole window from
// the difference (a mirrored offset's D stored at the partner), gathers g_i[c] = dL/df_hat_i[c] =
// 4 sign grad sum_j w_ij f_j[c] (offsets in row-major window order, a row of offsets per pass) for all
// channels into a C x tile buffer, and takes it through the normalisation (nodes::radial_term's and channel_backward's formula)
// and the pooling, writing its own nodes' pixels once.
// No atomics; every output element is written by one thread.
//
// Memory: the norms (2 B m), the difference and teacher affinities (2 B half m) and the partials (one per
// tile), all double; per thread a few KiB of buffers, and in the backward the C x tile g and f buffers
// (2 C max(16, min(256, 4096 / C)) doubles). The inputs are read in place at any strides, and mixed student
// and teacher dtypes are not converted: each is read in its own dtype and widened per element to double, which
// gives exactly what widening to the common dtype first would (float16/bfloat16 -> float32 -> float64 are
// exact).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "affinity_window_math.cuh"
#include "../common/cpu_clones.h"
#include "../common/huge_pages_cpu.h"
#include "../common/nodes_math.cuh"
#include "../common/pixel_rows_cpu.h"

namespace fastkd {
namespace cpu {
namespace {

using affinity_window::Grid;
using nodes::Map;

// Nodes per tile: the forward's partial sums are per tile, so that the total does not depend on the thread
// count. 256 rather than 64: longer runs of each row for the hardware prefetchers (the forward took 0.68x the
// time of 64-node tiles at C = 64, 128x256 and 512x1024, on a 2-core AMD EPYC). The backward's tiles are
// narrower for many channels: kBackwardDoubles / C nodes, 16 to kTileNodes, so that its C x tile buffers stay
// near kBackwardDoubles doubles.
constexpr std::int64_t kTileNodes = 256;
constexpr std::int64_t kBackwardDoubles = 1 << 12;
// Channels the forward's dot products take in one pass over a tile's offsets.
constexpr std::int64_t kChannelBlock = 4;

Map map_of(const at::Tensor& x) {
  return {x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, "`", name, "` must be (B, C, H, W), got ", x.dim(), " dimensions");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "`", name, "` must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "`", name, "` must be a CPU tensor, got one on ", x.device());
}

Grid checked_grid(const at::Tensor& x, int64_t kernel_h, int64_t kernel_w, bool max_pool, int64_t window) {
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1, "`kernel_h` and `kernel_w` must be >= 1, got ", kernel_h, " and ",
              kernel_w);
  TORCH_CHECK(window >= 0, "`window` must be >= 0, got ", window);
  return affinity_window::make_grid(x.size(2), x.size(3), kernel_h, kernel_w, max_pool, window);
}

// Tiles of `width` nodes: tile index = (b * grid_h + row) * per_row + run.
struct Tiling {
  std::int64_t width, per_row, count;
};

Tiling tiling(const Grid& grid, std::int64_t batch, std::int64_t width) {
  const std::int64_t per_row = (grid.grid_w + width - 1) / width;
  return {width, per_row, batch * grid.grid_h * per_row};
}

// One tile: image b, node row `row`, nodes (row, col0 + n) for n < count; `first` = row * grid_w + col0.
struct Tile {
  std::int64_t b, row, col0, count, first;
};

Tile tile_at(const Grid& grid, const Tiling& tiling, std::int64_t index) {
  const std::int64_t run = index % tiling.per_row, row_index = index / tiling.per_row;
  const std::int64_t b = row_index / grid.grid_h, row = row_index % grid.grid_h, col0 = run * tiling.width;
  return {b, row, col0, std::min(tiling.width, grid.grid_w - col0), row * grid.grid_w + col0};
}

// Channel c of image b at pixel (y, x).
template <typename T>
inline const T* pixel(const T* data, const Map& map, std::int64_t b, std::int64_t c, std::int64_t y, std::int64_t x) {
  return data + b * map.stride_b + c * map.stride_c + y * map.stride_h + x * map.stride_w;
}

// out[n] = f_c of node (row, col0 + n) of image b for n < count (row inside the grid), 0 for the columns
// outside it. Unit patches read the pixels directly (a max over one pixel adds pixel - pixel, as nodes::pool
// does: NaN for +-Inf); larger ones pool each node with nodes::pooled.
template <typename T>
inline void pooled_row(const T* x, const Map& map, const Grid& grid, std::int64_t b, std::int64_t c,
                       std::int64_t row, std::int64_t col0, std::int64_t count, double* out) {
  const Run run = inside(col0, count, grid.grid_w);
  std::fill(out, out + run.begin, 0.0);
  std::fill(out + run.end, out + count, 0.0);
  if (grid.kernel_h == 1 && grid.kernel_w == 1) {
    load_row(pixel(x, map, b, c, row, col0 + run.begin), map.stride_w, run.end - run.begin, out + run.begin);
    if (grid.max_pool) {
#pragma omp simd
      for (std::int64_t n = run.begin; n < run.end; ++n) out[n] += out[n] - out[n];
    }
  } else {
    for (std::int64_t n = run.begin; n < run.end; ++n) {
      out[n] = nodes::pooled(x, map, grid, b, c, row * grid.grid_w + col0 + n);
    }
  }
}

// Prefetches what pooled_row reads for node rows first_row .. last_row of `tile` (those inside the grid; unit
// patches: larger ones read longer runs, left to the hardware), col0 - margin .. col0 + count + margin.
template <typename T>
inline void prefetch_pooled_rows(const T* x, const Map& map, const Grid& grid, const Tile& tile, std::int64_t c,
                                 std::int64_t first_row, std::int64_t last_row, std::int64_t margin) {
  if (grid.kernel_h != 1 || grid.kernel_w != 1) return;
  const Run run = inside(tile.col0 - margin, tile.count + 2 * margin, grid.grid_w);
  for (std::int64_t row = std::max<std::int64_t>(first_row, 0); row <= std::min(last_row, grid.grid_h - 1); ++row) {
    prefetch_row(pixel(x, map, tile.b, c, row, tile.col0 - margin + run.begin), map.stride_w, run.end - run.begin);
  }
}

// The (dy, dx) of stored offset k (affinity_window::half_partner's numbering).
struct Offset {
  std::int64_t dy, dx;
};

inline Offset half_offset(const Grid& grid, std::int64_t k) {
  const std::int64_t span = 2 * grid.reach_w + 1, dy = (k + grid.reach_w) / span;
  return {dy, k - dy * span};
}

// norms[n] = ||f|| of the tile's nodes; prefetches the pixels of `next` (the thread's next tile, or null).
template <typename T>
FASTKD_CPU_CLONES void tile_norms(const T* x, const Map& map, const Grid& grid, const Tile& tile, const Tile* next,
                                  double* row, double* squares, double* norms) {
  const std::int64_t count = tile.count;
  std::fill(squares, squares + count, 0.0);
  for (std::int64_t c = 0; c < map.channels; ++c) {
    pooled_row(x, map, grid, tile.b, c, tile.row, tile.col0, count, row);
    if (next != nullptr) prefetch_pooled_rows(x, map, grid, *next, c, next->row, next->row, 0);
#pragma omp simd
    for (std::int64_t n = 0; n < count; ++n) squares[n] += row[n] * row[n];
  }
#pragma omp simd
  for (std::int64_t n = 0; n < count; ++n) norms[n] = std::sqrt(squares[n]);
}

// s_norms[b * m + i] and t_norms[b * m + i] = ||f_i|| of every node of s and t: the tiles of s, then those of t,
// in parallel.
template <typename S, typename T>
void node_norms(const S* s, const Map& s_map, const T* t, const Map& t_map, const Grid& grid, std::int64_t batch,
                double* s_norms, double* t_norms) {
  const Tiling tiles = tiling(grid, batch, kTileNodes);
  const std::int64_t m = nodes::node_count(grid);
  at::parallel_for(0, 2 * tiles.count, 1, [&](std::int64_t begin, std::int64_t end) {
    std::vector<double> buffers(2 * kTileNodes);
    Tile tile = tile_at(grid, tiles, begin % tiles.count), next = tile;
    for (std::int64_t index = begin; index < end; ++index, tile = next) {
      const bool ahead = index + 1 < end && (index + 1) % tiles.count != 0;  // the next tile of the same input
      if (index + 1 < end) next = tile_at(grid, tiles, (index + 1) % tiles.count);
      double* out = (index < tiles.count ? s_norms : t_norms) + tile.b * m + tile.first;
      if (index < tiles.count) {
        tile_norms(s, s_map, grid, tile, ahead ? &next : nullptr, buffers.data(), buffers.data() + kTileNodes, out);
      } else {
        tile_norms(t, t_map, grid, tile, ahead ? &next : nullptr, buffers.data(), buffers.data() + kTileNodes, out);
      }
    }
  });
}

// rows[j * rows_inside * span + dy * span + n] = f_c of node (row + dy, col0 - reach_w + n) of channel c =
// c0 + j, j < channels, dy < rows_inside (span = count + 2 reach_w); prefetches the same of `next` (the thread's
// next tile, or null).
template <typename T>
inline void pooled_block(const T* x, const Map& map, const Grid& grid, const Tile& tile, const Tile* next,
                         std::int64_t c0, std::int64_t channels, std::int64_t rows_inside, double* rows) {
  const std::int64_t reach_w = grid.reach_w, span = tile.count + 2 * reach_w;
  for (std::int64_t j = 0; j < channels; ++j) {
    for (std::int64_t dy = 0; dy < rows_inside; ++dy) {
      pooled_row(x, map, grid, tile.b, c0 + j, tile.row + dy, tile.col0 - reach_w, span,
                 rows + (j * rows_inside + dy) * span);
    }
    if (next != nullptr) {
      prefetch_pooled_rows(x, map, grid, *next, c0 + j, next->row, next->row + rows_inside - 1, reach_w);
    }
  }
}

// dots[k * kTileNodes + n] = f_i . f_j for the tile's nodes i = n and their partners j at every stored offset k
// whose partner row is inside the grid (n with a partner; the others are left as they are), summed in channel
// order, kChannelBlock channels a pass. rows: two sets of the pooled rows row .. row + reach_h of a block of
// channels (2 kChannelBlock (reach_h + 1) span doubles, span = count + 2 reach_w): the next block is read into
// one while the dot products are taken from the other, so that no load waits for the stores of a conversion
// (unaligned loads of just-stored data cannot be forwarded). Prefetches the rows of `next` (the thread's next
// tile, or null).
template <typename T>
FASTKD_CPU_CLONES void window_dots(const T* x, const Map& map, const Grid& grid, const Tile& tile, const Tile* next,
                                   double* rows, double* dots) {
  const std::int64_t half = affinity_window::half_window(grid), reach_w = grid.reach_w;
  const std::int64_t span = tile.count + 2 * reach_w;
  const std::int64_t rows_inside = std::min(grid.reach_h, grid.grid_h - 1 - tile.row) + 1;
  const std::int64_t block = rows_inside * span, set = kChannelBlock * block;  // one channel's rows, a set
  std::fill(dots, dots + half * kTileNodes, 0.0);
  pooled_block(x, map, grid, tile, next, 0, std::min(kChannelBlock, map.channels), rows_inside, rows);
  for (std::int64_t c0 = 0, parity = 0; c0 < map.channels; c0 += kChannelBlock, parity ^= 1) {
    const std::int64_t channels = std::min(kChannelBlock, map.channels - c0);
    const double* buffer = rows + parity * set;
    if (c0 + kChannelBlock < map.channels) {
      pooled_block(x, map, grid, tile, next, c0 + kChannelBlock,
                   std::min(kChannelBlock, map.channels - c0 - kChannelBlock), rows_inside, rows + (parity ^ 1) * set);
    }
    for (std::int64_t k = 0; k < half; ++k) {
      const Offset offset = half_offset(grid, k);
      if (offset.dy >= rows_inside) break;  // k runs row by row
      const Run run = inside(tile.col0 + offset.dx, tile.count, grid.grid_w);
      const double* centre = buffer + reach_w;
      const double* partner = buffer + offset.dy * span + reach_w + offset.dx;
      double* dot = dots + k * kTileNodes;
      if (channels == kChannelBlock) {  // four channels a pass: one load and store of dot for four products
        const double *c1 = centre + block, *c2 = c1 + block, *c3 = c2 + block;
        const double *p1 = partner + block, *p2 = p1 + block, *p3 = p2 + block;
#pragma omp simd
        for (std::int64_t n = run.begin; n < run.end; ++n) {
          double sum = dot[n];
          sum += centre[n] * partner[n];
          sum += c1[n] * p1[n];
          sum += c2[n] * p2[n];
          sum += c3[n] * p3[n];
          dot[n] = sum;
        }
      } else {
        for (std::int64_t j = 0; j < channels; ++j) {
          const double* centre_j = centre + j * block;
          const double* partner_j = partner + j * block;
#pragma omp simd
          for (std::int64_t n = run.begin; n < run.end; ++n) dot[n] += centre_j[n] * partner_j[n];
        }
      }
    }
  }
}

// rows[dy * span + n] = ||f|| + eps of node (row + dy, col0 - reach_w + n) for the rows inside the grid (1 for
// the columns outside it).
FASTKD_CPU_CLONES void norm_rows(const double* norms, const Grid& grid, const Tile& tile, std::int64_t first_dy,
                      std::int64_t rows_count, double eps, double* rows) {
  const std::int64_t reach_w = grid.reach_w, span = tile.count + 2 * reach_w;
  const Run run = inside(tile.col0 - reach_w, span, grid.grid_w);
  for (std::int64_t r = 0; r < rows_count; ++r) {
    const std::int64_t row = tile.row + first_dy + r;
    double* out = rows + r * span;
    if (row < 0 || row >= grid.grid_h) continue;
    const double* in = norms + row * grid.grid_w + tile.col0 - reach_w + run.begin;
    std::fill(out, out + run.begin, 1.0);
    std::fill(out + run.end, out + span, 1.0);
#pragma omp simd
    for (std::int64_t n = run.begin; n < run.end; ++n) out[n] = in[n - run.begin] + eps;
  }
}

struct ForwardBuffers {
  std::vector<double> rows, dots_s, dots_t, norms_s, norms_t, squares;
  explicit ForwardBuffers(const Grid& grid) {
    const std::size_t rows_count = static_cast<std::size_t>(grid.reach_h + 1);
    const std::size_t span = static_cast<std::size_t>(kTileNodes + 2 * grid.reach_w);
    const std::size_t dots = static_cast<std::size_t>(affinity_window::half_window(grid) * kTileNodes);
    rows.resize(static_cast<std::size_t>(2 * kChannelBlock) * rows_count * span);
    dots_s.resize(dots);
    dots_t.resize(dots);
    norms_s.resize(rows_count * span);
    norms_t.resize(rows_count * span);
    squares.resize(kTileNodes);
  }
};

// The tile's D = a_s - a_t and a_t into difference and teacher_affinity ((B, half, m)) and its share of the
// total; s_norms and t_norms are image b's.
template <typename S, typename T>
FASTKD_CPU_CLONES double forward_tile(const S* s, const Map& s_map, const double* s_norms, const T* t,
                                      const Map& t_map, const double* t_norms, const Grid& grid, const Tile& tile,
                                      const Tile* next, double eps, double* difference, double* teacher_affinity,
                                      ForwardBuffers& buffers) {
  const std::int64_t m = nodes::node_count(grid), half = affinity_window::half_window(grid);
  const std::int64_t count = tile.count, reach_w = grid.reach_w, span = count + 2 * reach_w;
  const std::int64_t rows_inside = std::min(grid.reach_h, grid.grid_h - 1 - tile.row) + 1;
  window_dots(s, s_map, grid, tile, next, buffers.rows.data(), buffers.dots_s.data());
  window_dots(t, t_map, grid, tile, next, buffers.rows.data(), buffers.dots_t.data());
  norm_rows(s_norms, grid, tile, 0, rows_inside, eps, buffers.norms_s.data());
  norm_rows(t_norms, grid, tile, 0, rows_inside, eps, buffers.norms_t.data());
  double* squares = buffers.squares.data();
  std::fill(squares, squares + count, 0.0);
  const double* ns_i = buffers.norms_s.data() + reach_w;
  const double* nt_i = buffers.norms_t.data() + reach_w;
  for (std::int64_t k = 0; k < half; ++k) {
    const Offset offset = half_offset(grid, k);
    double* out = difference + (tile.b * half + k) * m + tile.first;
    double* out_t = teacher_affinity + (tile.b * half + k) * m + tile.first;
    const Run run = offset.dy < rows_inside ? inside(tile.col0 + offset.dx, count, grid.grid_w) : Run{0, 0};
    std::fill(out, out + run.begin, 0.0);  // no partner: no term (and a NaN node must not pass)
    std::fill(out + run.end, out + count, 0.0);
    std::fill(out_t, out_t + run.begin, 0.0);
    std::fill(out_t + run.end, out_t + count, 0.0);
    const double* dot_s = buffers.dots_s.data() + k * kTileNodes;
    const double* dot_t = buffers.dots_t.data() + k * kTileNodes;
    const double* ns_j = buffers.norms_s.data() + offset.dy * span + reach_w + offset.dx;
    const double* nt_j = buffers.norms_t.data() + offset.dy * span + reach_w + offset.dx;
    const double weight = k == 0 ? 1.0 : 2.0;  // (i, j) and its mirror (j, i) are one stored offset
#pragma omp simd
    for (std::int64_t n = run.begin; n < run.end; ++n) {
      const double a_t = dot_t[n] / (nt_i[n] * nt_j[n]);
      const double d = dot_s[n] / (ns_i[n] * ns_j[n]) - a_t;
      out[n] = d;
      out_t[n] = a_t;
      squares[n] += weight * d * d;
    }
  }
  double total = 0.0;  // node order: fixed
  for (std::int64_t n = 0; n < count; ++n) total += squares[n];
  return total;
}

// The difference and teacher affinities (B, half, m) and the per-tile sums of D^2, for inputs of (storage)
// types S and T.
template <typename S, typename T>
void forward_tiles(const S* s, const Map& s_map, const double* s_norms, const T* t, const Map& t_map,
                   const double* t_norms, const Grid& grid, std::int64_t batch, double eps, double* difference,
                   double* teacher_affinity, double* partials) {
  const Tiling tiles = tiling(grid, batch, kTileNodes);
  const std::int64_t m = nodes::node_count(grid);
  at::parallel_for(0, tiles.count, 1, [&](std::int64_t begin, std::int64_t end) {
    ForwardBuffers buffers(grid);
    Tile tile = tile_at(grid, tiles, begin), next = tile;
    for (std::int64_t index = begin; index < end; ++index, tile = next) {
      if (index + 1 < end) next = tile_at(grid, tiles, index + 1);
      partials[index] = forward_tile(s, s_map, s_norms + tile.b * m, t, t_map, t_norms + tile.b * m, grid, tile,
                                     index + 1 < end ? &next : nullptr, eps, difference, teacher_affinity, buffers);
    }
  });
}

struct BackwardBuffers {
  std::vector<double> rows, norms, weights, g, f, radial;
  BackwardBuffers(const Grid& grid, std::int64_t channels, std::int64_t width) {
    const std::size_t rows_count = static_cast<std::size_t>(2 * grid.reach_h + 1);
    const std::size_t span = static_cast<std::size_t>(width + 2 * grid.reach_w);
    const std::size_t offsets = rows_count * static_cast<std::size_t>(2 * grid.reach_w + 1);
    const std::size_t tile = static_cast<std::size_t>(width);
    rows.resize(2 * rows_count * span);  // two sets: see backward_tile
    norms.resize(rows_count * span);
    weights.resize(offsets * tile);
    g.resize(static_cast<std::size_t>(channels) * tile);
    f.resize(static_cast<std::size_t>(channels) * tile);
    radial.resize(2 * tile);
  }
};

// The pixels of node `node` of image b, channel c, from dL/df_c = grad_pooled (nodes::unpool).
template <typename T>
inline void unpool(const T* x, const Map& map, const Grid& grid, std::int64_t b, std::int64_t c, std::int64_t node,
                   double grad_pooled, T* grad, const Map& grad_map) {
  const nodes::Patch patch = nodes::patch_of(map, grid, node);
  nodes::unpool(x + nodes::patch_origin(map, patch, b, c), map, patch, grid.max_pool, grad_pooled,
                1.0 / static_cast<double>(patch.rows * patch.cols), grad + nodes::patch_origin(grad_map, patch, b, c),
                grad_map);
}

// g[n] += sum over dx = -reach .. reach of w[(dx + reach) * width + n] * f[n + dx] (n < count), dx in order:
// one row of the window's offsets. With the reach fixed at compile time the loop over dx is unrolled inside the
// loop over n, which keeps the sum in a register.
template <int kReach>
inline void gather_row_of(double* g, const double* w, const double* f, std::int64_t count, std::int64_t width) {
#pragma omp simd
  for (std::int64_t n = 0; n < count; ++n) {
    double sum = g[n];
    for (int dx = -kReach; dx <= kReach; ++dx) sum += w[(dx + kReach) * width + n] * f[n + dx];
    g[n] = sum;
  }
}

inline void gather_row(double* g, const double* w, const double* f, std::int64_t count, std::int64_t width,
                       std::int64_t reach) {
  switch (reach) {
    case 0: return gather_row_of<0>(g, w, f, count, width);
    case 1: return gather_row_of<1>(g, w, f, count, width);
    case 2: return gather_row_of<2>(g, w, f, count, width);
    case 3: return gather_row_of<3>(g, w, f, count, width);
    default:
      for (std::int64_t dx = -reach; dx <= reach; ++dx) {
        const double* w_dx = w + (dx + reach) * width;
#pragma omp simd
        for (std::int64_t n = 0; n < count; ++n) g[n] += w_dx[n] * f[n + dx];
      }
  }
}

// dL/dx of the tile's nodes' pixels: norms and difference are image b's ((m) and (half, m)). Prefetches the
// pixels of `next` (the thread's next tile, or null).
template <typename T>
FASTKD_CPU_CLONES void backward_tile(const T* x, const Map& map, const double* norms, const double* difference,
                                     const Grid& grid, const Tile& tile, const Tile* next, double eps,
                                     bool detach_norm, double scale, T* grad, const Map& grad_map,
                                     BackwardBuffers& buffers) {
  const std::int64_t m = nodes::node_count(grid), count = tile.count, width = static_cast<std::int64_t>(
                                                                           buffers.radial.size() / 2);
  const std::int64_t reach_h = grid.reach_h, reach_w = grid.reach_w, span = count + 2 * reach_w;
  const std::int64_t first_row = std::max<std::int64_t>(-reach_h, -tile.row);  // dy of the rows inside the grid
  const std::int64_t last_row = std::min(reach_h, grid.grid_h - 1 - tile.row);
  norm_rows(norms, grid, tile, -reach_h, 2 * reach_h + 1, eps, buffers.norms.data());
  // w[o][n] = D_ij / (||f_j|| + eps) for the offsets o = (dy, dx) of the whole window, row-major, 0 where the
  // partner j of node i = n is missing.
  double* weights = buffers.weights.data();
  for (std::int64_t dy = first_row; dy <= last_row; ++dy) {
    for (std::int64_t dx = -reach_w; dx <= reach_w; ++dx) {
      double* w = weights + ((dy + reach_h) * (2 * reach_w + 1) + dx + reach_w) * width;
      const Run run = inside(tile.col0 + dx, count, grid.grid_w);
      std::fill(w, w + run.begin, 0.0);
      std::fill(w + run.end, w + count, 0.0);
      const double* stored = affinity_window::in_stored_half(dy, dx)
                                 ? difference + affinity_window::half_index(grid, dy, dx) * m + tile.first
                                 : difference + affinity_window::half_index(grid, -dy, -dx) * m + tile.first +
                                       dy * grid.grid_w + dx;  // D_ji, stored at the partner
      const double* norm_j = buffers.norms.data() + (dy + reach_h) * span + reach_w + dx;
#pragma omp simd
      for (std::int64_t n = run.begin; n < run.end; ++n) w[n] = stored[n] / norm_j[n];
    }
  }
  // g[c][n] = scale * sum_o w[o][n] f_j[c] and radial[n] = sum_c g[c][n] f_i[c], channel by channel. The
  // pooled rows of channel c + 1 are read into one set of buffers while channel c is gathered from the other (as
  // in window_dots).
  const std::int64_t set = (2 * reach_h + 1) * span;
  double* radial = buffers.radial.data();
  std::fill(radial, radial + count, 0.0);
  for (std::int64_t c = -1; c < map.channels; ++c) {
    if (c + 1 < map.channels) {
      double* load = buffers.rows.data() + (c + 1) % 2 * set;
      for (std::int64_t dy = first_row; dy <= last_row; ++dy) {
        pooled_row(x, map, grid, tile.b, c + 1, tile.row + dy, tile.col0 - reach_w, span,
                   load + (dy + reach_h) * span);
      }
      if (next != nullptr) {
        prefetch_pooled_rows(x, map, grid, *next, c + 1, next->row - reach_h, next->row + reach_h, reach_w);
      }
    }
    if (c < 0) continue;
    const double* rows = buffers.rows.data() + c % 2 * set;
    double* g = buffers.g.data() + c * width;
    double* f = buffers.f.data() + c * width;
    std::fill(g, g + count, 0.0);
    for (std::int64_t dy = first_row; dy <= last_row; ++dy) {  // w and f are 0 where the partner is missing
      gather_row(g, weights + (dy + reach_h) * (2 * reach_w + 1) * width, rows + (dy + reach_h) * span + reach_w,
                 count, width, reach_w);
    }
    const double* f_i = rows + reach_h * span + reach_w;
#pragma omp simd
    for (std::int64_t n = 0; n < count; ++n) {
      g[n] *= scale;
      f[n] = f_i[n];
      radial[n] += g[n] * f_i[n];
    }
  }
  // The normalisation (nodes::radial_term, channel_backward): with k = 1 / (n + eps), dL/df = k g - k^2 (f . g) f / n, only
  // k g when the norm is detached or zero.
  double* k = radial + width;
  const double* norm_i = norms + tile.first;
#pragma omp simd
  for (std::int64_t n = 0; n < count; ++n) {
    const double inverse = 1.0 / (norm_i[n] + eps);
    k[n] = inverse;
    radial[n] = !detach_norm && norm_i[n] > 0 ? radial[n] * inverse * inverse / norm_i[n] : 0.0;
  }
  const bool unit = grid.kernel_h == 1 && grid.kernel_w == 1;
  for (std::int64_t c = 0; c < map.channels; ++c) {
    const double* g = buffers.g.data() + c * width;
    const double* f = buffers.f.data() + c * width;
    if (unit) {
      T* out = grad + tile.b * grad_map.stride_b + c * grad_map.stride_c + tile.row * grad_map.stride_h +
               tile.col0 * grad_map.stride_w;
      const std::int64_t stride = grad_map.stride_w;
      if (stride == 1) {
#pragma omp simd
        for (std::int64_t n = 0; n < count; ++n) out[n] = from_double<T>(g[n] * k[n] - radial[n] * f[n]);
      } else {
        for (std::int64_t n = 0; n < count; ++n) out[n * stride] = from_double<T>(g[n] * k[n] - radial[n] * f[n]);
      }
    } else {
      for (std::int64_t n = 0; n < count; ++n) {
        unpool(x, map, grid, tile.b, c, tile.first + n, g[n] * k[n] - radial[n] * f[n], grad, grad_map);
      }
    }
  }
}

// grad = dL/dx for the total, tiles in parallel.
template <typename T>
void backward_tiles(const T* x, const Map& map, const double* norms, const double* difference, const Grid& grid,
                    std::int64_t batch, double eps, bool detach_norm, double scale, T* grad, const Map& grad_map) {
  const std::int64_t width = std::clamp<std::int64_t>(kBackwardDoubles / std::max<std::int64_t>(1, map.channels),
                                                      16, kTileNodes);
  const Tiling tiles = tiling(grid, batch, width);
  const std::int64_t m = nodes::node_count(grid), half = affinity_window::half_window(grid);
  at::parallel_for(0, tiles.count, 1, [&](std::int64_t begin, std::int64_t end) {
    BackwardBuffers buffers(grid, map.channels, width);
    Tile tile = tile_at(grid, tiles, begin), next = tile;
    for (std::int64_t index = begin; index < end; ++index, tile = next) {
      if (index + 1 < end) next = tile_at(grid, tiles, index + 1);
      backward_tile(x, map, norms + tile.b * m, difference + tile.b * half * m, grid, tile,
                    index + 1 < end ? &next : nullptr, eps, detach_norm, scale, grad, grad_map, buffers);
    }
  });
}

// (total: 0-dim double, difference, teacher_affinity: (B, half, m) double, s_norms, t_norms: (B, m) double) for
// features s, t of one shape but their channels: the windowed sum, D = a_s - a_t and a_t on the stored half of
// the window (0 where the partner is missing) and the node norms. detach_norm is only read by the autograd
// backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> affinity_window_forward(
    const at::Tensor& s, const at::Tensor& t, int64_t kernel_h, int64_t kernel_w, bool max_pool, int64_t window,
    double eps, bool /*detach_norm*/) {
  check_input(s, "s");
  check_input(t, "t");
  TORCH_CHECK(s.size(0) == t.size(0) && s.size(2) == t.size(2) && s.size(3) == t.size(3),
              "`s` and `t` must share B, H and W, got ", s.sizes(), " and ", t.sizes());
  const Grid grid = checked_grid(s, kernel_h, kernel_w, max_pool, window);
  const int64_t batch = s.size(0), m = nodes::node_count(grid), half = affinity_window::half_window(grid);
  const auto doubles = s.options().dtype(at::kDouble);
  at::Tensor difference = at::empty({batch, half, m}, doubles), teacher_affinity = at::empty({batch, half, m}, doubles);
  at::Tensor s_norms = at::empty({batch, m}, doubles), t_norms = at::empty({batch, m}, doubles);
  if (batch * m == 0) return {at::zeros({}, doubles), difference, teacher_affinity, s_norms, t_norms};
  std::vector<double> partials(static_cast<std::size_t>(tiling(grid, batch, kTileNodes).count));
  const Map s_map = map_of(s), t_map = map_of(t);
  double* s_norm_data = s_norms.mutable_data_ptr<double>();
  double* t_norm_data = t_norms.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "affinity_window_forward", [&] {
    using s_t = scalar_t;
    const s_t* s_data = s.const_data_ptr<s_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "affinity_window_forward", [&] {
      const scalar_t* t_data = t.const_data_ptr<scalar_t>();
      node_norms(s_data, s_map, t_data, t_map, grid, batch, s_norm_data, t_norm_data);
      forward_tiles(s_data, s_map, s_norm_data, t_data, t_map, t_norm_data, grid, batch, eps,
                    difference.mutable_data_ptr<double>(), teacher_affinity.mutable_data_ptr<double>(),
                    partials.data());
    });
  });
  double total = 0.0;  // one thread, tile order: independent of the number of threads
  for (const double partial : partials) total += partial;
  return {at::scalar_tensor(total, doubles), difference, teacher_affinity, s_norms, t_norms};
}

// dL/dx (x's dtype and layout) for the total, given dL/dtotal (one element), x's node norms and the
// forward's difference; sign +1 for the student, -1 for the teacher. teacher_affinity is checked, not read: the
// norm's share comes from g of all channels, which a tile holds (the CUDA tiles split the channels).
at::Tensor affinity_window_backward(const at::Tensor& grad_total, const at::Tensor& x, const at::Tensor& norms,
                                    const at::Tensor& difference, const at::Tensor& teacher_affinity,
                                    int64_t kernel_h, int64_t kernel_w, bool max_pool, int64_t window, double eps,
                                    bool detach_norm, double sign) {
  check_input(x, "x");
  const Grid grid = checked_grid(x, kernel_h, kernel_w, max_pool, window);
  const int64_t batch = x.size(0), m = nodes::node_count(grid);
  const int64_t half = affinity_window::half_window(grid);
  TORCH_CHECK(norms.sizes() == at::IntArrayRef({batch, m}), "`norms` must be (B, m) = (", batch, ", ", m,
              "), got ", norms.sizes());
  TORCH_CHECK(difference.sizes() == at::IntArrayRef({batch, half, m}), "`difference` must be (B, half window, m) = (",
              batch, ", ", half, ", ", m, "), got ", difference.sizes());
  TORCH_CHECK(teacher_affinity.sizes() == difference.sizes(), "`teacher_affinity` must be (B, half window, m) = (",
              batch, ", ", half, ", ", m, "), got ", teacher_affinity.sizes());
  TORCH_CHECK(grad_total.numel() == 1, "`grad_total` must hold one element, got ", grad_total.numel());
  at::Tensor grad = empty_like_on_huge_pages(x);
  if (x.numel() == 0) return grad;
  const double scale = 4.0 * sign * grad_total.item<double>();
  const at::Tensor norms_double = norms.to(at::kDouble).contiguous();
  const at::Tensor difference_double = difference.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affinity_window_backward", [&] {
    backward_tiles(x.const_data_ptr<scalar_t>(), map_of(x), norms_double.const_data_ptr<double>(),
                   difference_double.const_data_ptr<double>(), grid, batch, eps, detach_norm, scale,
                   grad.mutable_data_ptr<scalar_t>(), map_of(grad));
  });
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("affinity_window_forward", &fastkd::cpu::affinity_window_forward);
  m.impl("affinity_window_backward", &fastkd::cpu::affinity_window_backward);
}
