// The CPU implementation of fastkd::consistency_forward / _backward (schema: consistency_schema.cpp;
// backend="cpp"; FORMULAS.md section 3): the per-pixel math of the CUDA kernels (consistency_math.cuh: which
// pixels have c, c(x) = sum over the neighbours y inside the image of ||l(y) - l(x)||^2, and dL/dl(x) =
// sum_y 2 (g(x) + g(y)) (l(x) - l(y)) for g = dL/dc) computed on tiles of pixels, so that the inner loops
// vectorise.
//
// A tile is a block of up to kTileRows x kTilePixels pixels of one image (forward; one row backward), tiles
// numbered by image, row of tiles and column of tiles; each tile is one task of at::parallel_for. For each
// channel the tile reads the image rows it needs (its rows and those d above and below, d pixels to either
// side: each row once) into small double buffers (common/pixel_rows_cpu.h), and the loops over a row of the
// tile's pixels run with the channel fixed, contiguous in NCHW: where all 8 neighbours exist, one loop adds the
// 8 terms of each pixel in the neighbours' order; near the image's border, one loop per neighbour over the
// pixels that have it. Per-pixel sums are double arrays of the tile, in channel order and, within a channel,
// neighbour order. The next channel is read into a second set of buffers while one is summed, and each channel
// prefetches the rows of the thread's next tile.
// Forward: a tile writes c_s - c_t (double, 0 where c is undefined) for its pixels into the (B, H, W) map
// difference and the sum of their squares, in pixel order, into partials[tile]. The partials are then summed
// by one thread in tile order, so the loss is bitwise the same whatever the number of threads and however
// at::parallel_for groups the tiles.
// Backward: a tile takes g(x) + g(y) of its pixels for each neighbour from the map difference once, then
// gathers dL/dl for every channel of its pixels; every gradient element is written once (no atomics), into
// empty_like(x) at its own strides.
//
// Memory: the (B, H, W) difference and the partials (one per tile), both double, and per thread buffers of
// about 30 KiB; the inputs are read in place at any strides (no shifted copies, no (B, C, H, W) temporaries).
// Mixed student and teacher dtypes are not converted either: each is read in its own dtype and widened per
// element to double, which gives exactly what widening to the common dtype first would
// (float16/bfloat16 -> float32 -> float64 are exact).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "consistency_math.cuh"
#include "../common/cpu_clones.h"
#include "../common/huge_pages_cpu.h"
#include "../common/pixel_rows_cpu.h"

namespace fastkd {
namespace cpu {
namespace {

using consistency::Map;

// Tiles: kTileRows x kTilePixels pixels forward (one partial sum each, so that the loss does not depend on the
// thread count), one row of kTilePixels backward (whose per-neighbour sums g(x) + g(y) stay in L1).
constexpr std::int64_t kTilePixels = 128;
constexpr std::int64_t kTileRows = 8;
constexpr int kNeighbours = 8;
// The neighbours' offsets in units of the dilation, in consistency_math.cuh's order (row-major).
constexpr int kDy[kNeighbours] = {-1, -1, -1, 0, 0, 1, 1, 1};
constexpr int kDx[kNeighbours] = {-1, 0, 1, -1, 1, -1, 0, 1};

Map map_of(const at::Tensor& x) {
  return {x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, "`", name, "` must be (B, C, H, W), got ", x.dim(), " dimensions");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "`", name, "` must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "`", name, "` must be a CPU tensor, got one on ", x.device());
}

// Tiles of up to `rows` x kTilePixels pixels, numbered (b * per_column + tile row) * per_row + tile column.
struct Tiling {
  std::int64_t rows, per_column, per_row, count;
};

Tiling tiling(const Map& map, std::int64_t batch, std::int64_t rows) {
  const std::int64_t per_column = (map.height + rows - 1) / rows;
  const std::int64_t per_row = (map.width + kTilePixels - 1) / kTilePixels;
  return {rows, per_column, per_row, batch * per_column * per_row};
}

// One tile: pixels (y0 + r, x0 + n) of image b for r < rows, n < count. Its buffers hold, per channel, the
// image rows y0 + r + k d (k = -1, 0, 1) that exist, row y0 + r + k d in slot r + (k + 1) step (step =
// min(d, rows): the three bands of rows overlap where d < rows), columns x0 - pad .. x0 + count + pad.
struct Tile {
  std::int64_t b, y0, rows, x0, count;
  std::int64_t d, pad, step, slots, span;
  Run columns[3];  // the pixels whose column x0 + n + dx d is inside the image, dx = -1, 0, 1
};

Tile tile_at(const Map& map, const Tiling& tiling, std::int64_t d, std::int64_t index) {
  const std::int64_t column = index % tiling.per_row, row_index = index / tiling.per_row;
  Tile tile;
  tile.b = row_index / tiling.per_column;
  tile.y0 = row_index % tiling.per_column * tiling.rows;
  tile.rows = std::min(tiling.rows, map.height - tile.y0);
  tile.x0 = column * kTilePixels;
  tile.count = std::min(kTilePixels, map.width - tile.x0);
  tile.d = d;
  tile.pad = std::min(d, map.width);  // where d >= width no pixel has a neighbour to its left or right
  tile.step = std::min(d, tile.rows);
  tile.slots = tile.rows + 2 * tile.step;
  tile.span = tile.count + 2 * tile.pad;
  for (int dx = -1; dx <= 1; ++dx) tile.columns[dx + 1] = inside(tile.x0 + dx * d, tile.count, map.width);
  return tile;
}

// The image row of buffer slot `slot`.
std::int64_t slot_row(const Tile& tile, std::int64_t slot) {
  if (tile.step == tile.d) return tile.y0 - tile.d + slot;
  return tile.y0 + slot % tile.rows + (slot / tile.rows - 1) * tile.d;
}

// buffers[slot * span + n] = channel c of image b at (slot_row(slot), x0 - pad + n), for the rows and columns
// inside the image (the others are left as they are); prefetches the same of `next` (the thread's next tile,
// or null).
template <typename T>
inline void channel_rows(const T* x, const Map& map, const Tile& tile, const Tile* next, std::int64_t c,
                         double* buffers) {
  const Run run = inside(tile.x0 - tile.pad, tile.span, map.width);
  const T* channel = x + tile.b * map.stride_b + c * map.stride_c + (tile.x0 - tile.pad + run.begin) * map.stride_w;
  for (std::int64_t slot = 0; slot < tile.slots; ++slot) {
    const std::int64_t row = slot_row(tile, slot);
    if (row < 0 || row >= map.height) continue;
    load_row(channel + row * map.stride_h, map.stride_w, run.end - run.begin, buffers + slot * tile.span + run.begin);
  }
  if (next == nullptr) return;
  const Run ahead = inside(next->x0 - next->pad, next->span, map.width);
  const T* next_channel =
      x + next->b * map.stride_b + c * map.stride_c + (next->x0 - next->pad + ahead.begin) * map.stride_w;
  for (std::int64_t slot = 0; slot < next->slots; ++slot) {
    const std::int64_t row = slot_row(*next, slot);
    if (row >= 0 && row < map.height) prefetch_row(next_channel + row * map.stride_h, map.stride_w, ahead.end - ahead.begin);
  }
}

// Row r of a tile: where the buffered rows y - d, y, y + d start at the tile's first pixel (buffers[line[dy + 1]
// + n + dx d] is neighbour (dy, dx) of pixel n), the pixels that have each neighbour, and those that have all 8.
struct Row {
  std::int64_t y;
  std::int64_t line[3];
  Run neighbour[kNeighbours];
  Run interior;
};

Row row_of(const Map& map, const Tile& tile, std::int64_t r) {
  Row row;
  row.y = tile.y0 + r;
  const bool exists[3] = {row.y - tile.d >= 0, true, row.y + tile.d < map.height};
  row.interior = {0, tile.count};
  for (int k = 0; k < 3; ++k) row.line[k] = (r + k * tile.step) * tile.span + tile.pad;
  for (int k = 0; k < kNeighbours; ++k) {
    row.neighbour[k] = exists[kDy[k] + 1] ? tile.columns[kDx[k] + 1] : Run{0, 0};
    row.interior.begin = std::max(row.interior.begin, row.neighbour[k].begin);
    row.interior.end = std::min(row.interior.end, row.neighbour[k].end);
  }
  row.interior.end = std::max(row.interior.begin, row.interior.end);
  return row;
}

// sums[n] += sum over the neighbours k of pixel n (in order) of (l_k - l_n)^2, for n in [begin, end), one
// loop per neighbour over the pixels that have it.
inline void add_squares_per_neighbour(const double* buffer, const Row& row, std::int64_t d, std::int64_t begin,
                                      std::int64_t end, double* sums) {
  const double* centre = buffer + row.line[1];
  for (int k = 0; k < kNeighbours; ++k) {
    const std::int64_t first = std::max(begin, row.neighbour[k].begin), last = std::min(end, row.neighbour[k].end);
    if (first >= last) continue;
    const double* other = buffer + row.line[kDy[k] + 1] + kDx[k] * d;
#pragma omp simd
    for (std::int64_t n = first; n < last; ++n) {
      const double edge = other[n] - centre[n];
      sums[n] += edge * edge;
    }
  }
}

// sums[r * kTilePixels + n] = c(x) of the tile's pixels (y0 + r, x0 + n) for the rows where c is defined
// (rows[r]) and the n in `defined`. buffers: two sets of the tile's buffers (2 slots span doubles): channel c + 1
// is read into one while channel c is summed from the other, so that no load waits for the stores of a
// conversion (unaligned loads of just-stored data cannot be forwarded).
template <typename T>
FASTKD_CPU_CLONES void neighbour_sums(const T* x, const Map& map, const Tile& tile, const Tile* next,
                                      const bool* rows, Run defined, double* buffers, double* sums) {
  const std::int64_t d = tile.d, set = tile.slots * tile.span;
  Row views[kTileRows];
  for (std::int64_t r = 0; r < tile.rows; ++r) {
    views[r] = row_of(map, tile, r);
    if (rows[r]) std::fill(sums + r * kTilePixels + defined.begin, sums + r * kTilePixels + defined.end, 0.0);
  }
  channel_rows(x, map, tile, next, 0, buffers);
  for (std::int64_t c = 0; c < map.channels; ++c) {
    const double* buffer = buffers + c % 2 * set;
    if (c + 1 < map.channels) channel_rows(x, map, tile, next, c + 1, buffers + (c + 1) % 2 * set);
    for (std::int64_t r = 0; r < tile.rows; ++r) {
      if (!rows[r]) continue;
      const Row& row = views[r];
      double* out = sums + r * kTilePixels;
      const std::int64_t begin = std::max(defined.begin, row.interior.begin);
      const std::int64_t end = std::max(begin, std::min(defined.end, row.interior.end));
      const double *r0 = buffer + row.line[0], *r1 = buffer + row.line[1], *r2 = buffer + row.line[2];
#pragma omp simd
      for (std::int64_t n = begin; n < end; ++n) {  // all 8 neighbours, in order
        const double centre = r1[n];
        const double e0 = r0[n - d] - centre, e1 = r0[n] - centre, e2 = r0[n + d] - centre;
        const double e3 = r1[n - d] - centre, e4 = r1[n + d] - centre;
        const double e5 = r2[n - d] - centre, e6 = r2[n] - centre, e7 = r2[n + d] - centre;
        double sum = out[n];
        sum += e0 * e0;
        sum += e1 * e1;
        sum += e2 * e2;
        sum += e3 * e3;
        sum += e4 * e4;
        sum += e5 * e5;
        sum += e6 * e6;
        sum += e7 * e7;
        out[n] = sum;
      }
      add_squares_per_neighbour(buffer, row, d, defined.begin, begin, out);
      add_squares_per_neighbour(buffer, row, d, end, defined.end, out);
    }
  }
}

struct ForwardBuffers {
  std::vector<double> rows, sums_s, sums_t;
  explicit ForwardBuffers(std::int64_t dilation, std::int64_t width) {
    const std::int64_t slots = kTileRows + 2 * std::min(dilation, kTileRows);
    rows.resize(static_cast<std::size_t>(2 * slots * (kTilePixels + 2 * std::min(dilation, width))));
    sums_s.resize(kTileRows * kTilePixels);
    sums_t.resize(kTileRows * kTilePixels);
  }
};

// The tile's c_s - c_t into the map difference (image b's rows, (H, W)), 0 where c is undefined, and the sum of
// their squares in pixel order.
template <typename S, typename T>
FASTKD_CPU_CLONES double forward_tile(const S* s, const Map& s_map, const T* t, const Map& t_map, const Tile& tile,
                                      const Tile* next, bool valid, double* difference, ForwardBuffers& buffers) {
  const std::int64_t d = tile.d, count = tile.count, height = s_map.height, width = s_map.width;
  bool rows[kTileRows];
  bool any = false;
  for (std::int64_t r = 0; r < tile.rows; ++r) {
    const std::int64_t y = tile.y0 + r;
    rows[r] = !valid || (y >= d && y < height - d);
    any = any || rows[r];
  }
  const Run defined = valid ? inside(tile.x0 - d, count, width - 2 * d) : Run{0, count};
  if (any && defined.begin < defined.end) {
    neighbour_sums(s, s_map, tile, next, rows, defined, buffers.rows.data(), buffers.sums_s.data());
    neighbour_sums(t, t_map, tile, next, rows, defined, buffers.rows.data(), buffers.sums_t.data());
  }
  double squares = 0.0;  // pixel order: fixed
  for (std::int64_t r = 0; r < tile.rows; ++r) {
    double* out = difference + (tile.y0 + r) * width + tile.x0;
    if (!rows[r] || defined.begin == defined.end) {
      std::fill(out, out + count, 0.0);
      continue;
    }
    std::fill(out, out + defined.begin, 0.0);
    std::fill(out + defined.end, out + count, 0.0);
    const double* c_s = buffers.sums_s.data() + r * kTilePixels;
    const double* c_t = buffers.sums_t.data() + r * kTilePixels;
    for (std::int64_t n = defined.begin; n < defined.end; ++n) {
      const double value = c_s[n] - c_t[n];
      out[n] = value;
      squares += value * value;
    }
  }
  return squares;
}

// The map difference and the per-tile sums of its squares, for logits of (storage) types S and T.
template <typename S, typename T>
void forward_tiles(const S* s, const Map& s_map, const T* t, const Map& t_map, std::int64_t batch,
                   std::int64_t dilation, bool valid, double* difference, double* partials) {
  const Tiling tiles = tiling(s_map, batch, kTileRows);
  at::parallel_for(0, tiles.count, 1, [&](std::int64_t begin, std::int64_t end) {
    ForwardBuffers buffers(dilation, s_map.width);
    Tile tile = tile_at(s_map, tiles, dilation, begin), next = tile;
    for (std::int64_t index = begin; index < end; ++index, tile = next) {
      if (index + 1 < end) next = tile_at(s_map, tiles, dilation, index + 1);
      partials[index] = forward_tile(s, s_map, t, t_map, tile, index + 1 < end ? &next : nullptr, valid,
                                     difference + tile.b * s_map.height * s_map.width, buffers);
    }
  });
}

// dL/dl of the tile's pixels (one row), every channel, from the map difference g (image b's, (H, W)): scale *
// sum over the neighbours k of (g(x) + g(y_k)) (l(x) - l(y_k)), written at grad's strides. buffers: two sets
// (6 span doubles).
template <typename T>
FASTKD_CPU_CLONES void backward_tile(const T* x, const Map& map, const double* g, const Tile& tile, const Tile* next,
                                     double scale, T* grad, const Map& grad_map, double* buffers, double* pair_sums,
                                     double* sums) {
  const std::int64_t d = tile.d, count = tile.count, width = map.width, set = tile.slots * tile.span;
  const Row row = row_of(map, tile, 0);
  // pair_sums[k][n] = g(x) + g(y_k), for the pixels that have neighbour k.
  const double* g_centre = g + row.y * width + tile.x0;
  for (int k = 0; k < kNeighbours; ++k) {
    const Run run = row.neighbour[k];
    if (run.begin == run.end) continue;
    const double* g_other = g_centre + kDy[k] * d * width + kDx[k] * d + run.begin;
    double* out = pair_sums + k * kTilePixels;
#pragma omp simd
    for (std::int64_t n = run.begin; n < run.end; ++n) out[n] = g_centre[n] + g_other[n - run.begin];
  }
  const double* p0 = pair_sums;
  const double *p1 = p0 + kTilePixels, *p2 = p1 + kTilePixels, *p3 = p2 + kTilePixels, *p4 = p3 + kTilePixels;
  const double *p5 = p4 + kTilePixels, *p6 = p5 + kTilePixels, *p7 = p6 + kTilePixels;
  const Run interior = row.interior;
  channel_rows(x, map, tile, next, 0, buffers);
  for (std::int64_t c = 0; c < map.channels; ++c) {  // two sets of buffers, as in neighbour_sums
    const double* buffer = buffers + c % 2 * set;
    if (c + 1 < map.channels) channel_rows(x, map, tile, next, c + 1, buffers + (c + 1) % 2 * set);
    const double *r0 = buffer + row.line[0], *r1 = buffer + row.line[1], *r2 = buffer + row.line[2];
    std::fill(sums, sums + interior.begin, 0.0);
    std::fill(sums + interior.end, sums + count, 0.0);
#pragma omp simd
    for (std::int64_t n = interior.begin; n < interior.end; ++n) {  // all 8 neighbours, in order
      const double centre = r1[n];
      double sum = 0.0;
      sum += p0[n] * (centre - r0[n - d]);
      sum += p1[n] * (centre - r0[n]);
      sum += p2[n] * (centre - r0[n + d]);
      sum += p3[n] * (centre - r1[n - d]);
      sum += p4[n] * (centre - r1[n + d]);
      sum += p5[n] * (centre - r2[n - d]);
      sum += p6[n] * (centre - r2[n]);
      sum += p7[n] * (centre - r2[n + d]);
      sums[n] = sum;
    }
    if (interior.begin > 0 || interior.end < count) {  // the pixels missing a neighbour, one neighbour at a time
      for (int k = 0; k < kNeighbours; ++k) {
        const double* pair = pair_sums + k * kTilePixels;
        for (const Run part : {Run{0, interior.begin}, Run{interior.end, count}}) {
          const std::int64_t first = std::max(part.begin, row.neighbour[k].begin);
          const std::int64_t last = std::min(part.end, row.neighbour[k].end);
          if (first >= last) continue;
          const double* other = buffer + row.line[kDy[k] + 1] + kDx[k] * d;
#pragma omp simd
          for (std::int64_t n = first; n < last; ++n) sums[n] += pair[n] * (r1[n] - other[n]);
        }
      }
    }
    T* out = grad + tile.b * grad_map.stride_b + c * grad_map.stride_c + row.y * grad_map.stride_h +
             tile.x0 * grad_map.stride_w;
    const std::int64_t stride = grad_map.stride_w;
    if (stride == 1) {
#pragma omp simd
      for (std::int64_t n = 0; n < count; ++n) out[n] = from_double<T>(scale * sums[n]);
    } else {
      for (std::int64_t n = 0; n < count; ++n) out[n * stride] = from_double<T>(scale * sums[n]);
    }
  }
}

// grad = dL/dx for the loss sum, tiles of one row in parallel.
template <typename T>
void backward_tiles(const T* x, const Map& map, const double* difference, double scale, std::int64_t batch,
                    std::int64_t dilation, T* grad, const Map& grad_map) {
  const Tiling tiles = tiling(map, batch, 1);
  at::parallel_for(0, tiles.count, 1, [&](std::int64_t begin, std::int64_t end) {
    const std::int64_t row_doubles = 2 * 3 * (kTilePixels + 2 * std::min(dilation, map.width));
    std::vector<double> buffers(static_cast<std::size_t>(row_doubles + (kNeighbours + 1) * kTilePixels));
    double* rows = buffers.data();
    double* pair_sums = rows + row_doubles;
    double* sums = pair_sums + kNeighbours * kTilePixels;
    Tile tile = tile_at(map, tiles, dilation, begin), next = tile;
    for (std::int64_t index = begin; index < end; ++index, tile = next) {
      if (index + 1 < end) next = tile_at(map, tiles, dilation, index + 1);
      backward_tile(x, map, difference + tile.b * map.height * map.width, tile, index + 1 < end ? &next : nullptr,
                    scale, grad, grad_map, rows, pair_sums, sums);
    }
  });
}

// (loss_sum: 0-dim double, difference: (B, H, W) double) for logits s, t of one shape but their channels.
std::tuple<at::Tensor, at::Tensor> consistency_forward(const at::Tensor& s, const at::Tensor& t, bool valid,
                                                       int64_t dilation) {
  check_logits(s, "s");
  check_logits(t, "t");
  TORCH_CHECK(s.size(0) == t.size(0) && s.size(2) == t.size(2) && s.size(3) == t.size(3),
              "`s` and `t` must share B, H and W, got ", s.sizes(), " and ", t.sizes());
  TORCH_CHECK(dilation >= 1, "`dilation` must be >= 1, got ", dilation);
  const int64_t batch = s.size(0), height = s.size(2), width = s.size(3);
  const auto doubles = s.options().dtype(at::kDouble);
  at::Tensor difference = at::empty({batch, height, width}, doubles);
  if (difference.numel() == 0) return {at::zeros({}, doubles), difference};
  std::vector<double> partials(static_cast<std::size_t>(tiling(map_of(s), batch, kTileRows).count));
  const Map s_map = map_of(s), t_map = map_of(t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "consistency_forward", [&] {
    using s_t = scalar_t;
    const s_t* s_data = s.const_data_ptr<s_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "consistency_forward", [&] {
      forward_tiles(s_data, s_map, t.const_data_ptr<scalar_t>(), t_map, batch, dilation, valid,
                    difference.mutable_data_ptr<double>(), partials.data());
    });
  });
  double total = 0.0;  // one thread, tile order: independent of the number of threads
  for (const double partial : partials) total += partial;
  return {at::scalar_tensor(total, doubles), difference};
}

// dL/dx (x's dtype and layout) for the loss sum, given dL/dloss_sum (one element) and the forward's map
// difference; sign +1 for the student, -1 for the teacher.
at::Tensor consistency_backward(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& difference,
                                int64_t dilation, double sign) {
  check_logits(x, "x");
  TORCH_CHECK(dilation >= 1, "`dilation` must be >= 1, got ", dilation);
  TORCH_CHECK(grad_loss.numel() == 1, "`grad_loss` must have one element, got ", grad_loss.numel());
  TORCH_CHECK(difference.dim() == 3 && difference.size(0) == x.size(0) && difference.size(1) == x.size(2) &&
                  difference.size(2) == x.size(3),
              "`difference` must be (B, H, W) = (", x.size(0), ", ", x.size(2), ", ", x.size(3), "), got ",
              difference.sizes());
  at::Tensor grad = empty_like_on_huge_pages(x);
  if (x.numel() == 0) return grad;
  const double scale = 4.0 * sign * grad_loss.item<double>();
  const at::Tensor difference_double = difference.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "consistency_backward", [&] {
    backward_tiles(x.const_data_ptr<scalar_t>(), map_of(x), difference_double.const_data_ptr<double>(), scale,
                   x.size(0), dilation, grad.mutable_data_ptr<scalar_t>(), map_of(grad));
  });
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("consistency_forward", &fastkd::cpu::consistency_forward);
  m.impl("consistency_backward", &fastkd::cpu::consistency_backward);
}
