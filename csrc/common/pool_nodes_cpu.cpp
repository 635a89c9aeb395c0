// The CPU implementation of fastkd::pool_nodes_forward / _backward (schema: pool_nodes_schema.cpp): the pooled
// nodes of the affinity_full op's cpp backend (Liu et al. 2020, sec. 2.1; FORMULAS.md section 1, step 1), whose
// Gram or direct sums are the torch backend's on these float64 nodes.
//
// The input is read once, in its own dtype, with the check for NaN and +-Inf in the same pass (the torch backend
// reads it a second time for that). A task is one band of kernel_h rows of one channel: row by row (a contiguous
// run for NCHW), each patch's part of the row is folded into the patch's running max (max pooling is exact in
// any precision) or its double sum, and into its non-finite check, the sum of pixel - pixel (0, or NaN once a
// pixel is NaN or +-Inf). A patch holding NaN or +-Inf gives a NaN node, as nodes::pool (the CUDA kernels'
// pooling) does. Patches narrower than kWideRun are folded a patch column at a time across the row (a loop
// over the patches that vectorises), wider ones a patch at a time. Max pooling also keeps each node's winner,
// the first pixel equal to the max in row-major patch order: the first row whose max exceeds the rows above
// it, and in it the first column (tracked while folding narrow patches, found by a scan of that row, in cache,
// for wide ones); a NaN patch's is its first NaN, found by a scan, and +-Inf without NaN has none (-1). The backward
// writes every pixel of dL/dx once, in x's dtype and layout: dL/df / count over an average's patch, dL/df at a
// max's winner and 0 elsewhere. Each output element is written by one task: bitwise reproducible for any
// number of threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_clones.h"
#include "huge_pages_cpu.h"
#include "precision.cuh"

namespace fastkd {
namespace cpu {
namespace {

constexpr const char* kForwardName = "fastkd::pool_nodes_forward";
constexpr const char* kBackwardName = "fastkd::pool_nodes_backward";
// Pixels a parallel task reads at least (bands are batched up to it): about 128 KiB of float32.
constexpr std::int64_t kTaskPixels = 1 << 15;

// How a (B, C, H, W) input is cut into nodes.
struct Pooling {
  std::int64_t batch, channels, height, width, kernel_h, kernel_w, grid_h, grid_w;
  bool max_pool;

  std::int64_t bands() const { return batch * channels * grid_h; }
  std::int64_t grain() const {
    return std::max<std::int64_t>(1, kTaskPixels / std::max<std::int64_t>(1, kernel_h * width));
  }
};

// A (B, C, H, W) tensor's strides.
struct Strides {
  std::int64_t b, c, h, w;
};

Strides strides_of(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)}; }

Pooling checked_pooling(const at::Tensor& x, int64_t kernel_h, int64_t kernel_w, bool max_pool, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": `x` must be (B, C, H, W), got ", x.dim(), " dimensions");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": `x` must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), op, ": `x` must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1, op, ": `kernel_h` and `kernel_w` must be >= 1, got ", kernel_h,
              " and ", kernel_w);
  const std::int64_t height = x.size(2), width = x.size(3);
  return {x.size(0), x.size(1), height, width, kernel_h, kernel_w, (height + kernel_h - 1) / kernel_h,
          (width + kernel_w - 1) / kernel_w, max_pool};
}

// Band `band` = (b C + c) grid_h + node row: its image, channel and first input row.
struct Band {
  std::int64_t b, c, row0, rows;
};

Band band_at(const Pooling& p, std::int64_t band) {
  const std::int64_t plane = band / p.grid_h, row0 = band % p.grid_h * p.kernel_h;
  return {plane / p.channels, plane % p.channels, row0, std::min(p.kernel_h, p.height - row0)};
}

// Element `n` of a run: n or n * stride.
template <bool kUnit>
inline std::int64_t at_step(std::int64_t n, std::int64_t stride) {
  return kUnit ? n : n * stride;
}

// Patches at least this wide are folded one patch at a time, a reduction over a contiguous run; narrower ones
// one patch column at a time across all of a row's full patches, a loop over the patches (strided by kernel_w).
constexpr std::int64_t kWideRun = 16;

// The node columns of a row that are folded a patch column at a time: the full patches, for narrow patches.
inline std::int64_t by_column(const Pooling& p) { return p.kernel_w >= kWideRun ? 0 : p.width / p.kernel_w; }

// A task's buffers, one entry per node column of a band.
struct BandBuffers {
  std::vector<double> row_value, non_finite;
  // max pooling: the column in the patch of the row's first max (patches folded by column), and the row of
  // the band and that column of the node's first max
  std::vector<std::int64_t> row_col, best_row, best_col;

  explicit BandBuffers(std::int64_t grid_w)
      : row_value(static_cast<std::size_t>(grid_w)),
        non_finite(static_cast<std::size_t>(grid_w)),
        row_col(static_cast<std::size_t>(grid_w)),
        best_row(static_cast<std::size_t>(grid_w)),
        best_col(static_cast<std::size_t>(grid_w)) {}
};

// row_value[gx] = the max (kMax) or sum of node column gx's pixels in `row`, row_col[gx] where the max first is
// (patches folded by column); non_finite[gx] += their pixel - pixel (NaN in a max's row_value is left to it).
template <bool kUnit, bool kMax, typename T>
FASTKD_CPU_CLONES void fold_row(const T* row, std::int64_t stride, const Pooling& p, BandBuffers& buffers) {
  double* row_value = buffers.row_value.data();
  double* non_finite = buffers.non_finite.data();
  std::int64_t* row_col = buffers.row_col.data();
  const std::int64_t kw = p.kernel_w, columns = by_column(p);
  for (std::int64_t j = 0; j < (columns > 0 ? kw : 0); ++j) {
#pragma omp simd
    for (std::int64_t gx = 0; gx < columns; ++gx) {
      const double pixel = to_double(row[at_step<kUnit>(gx * kw + j, stride)]);
      const double acc = row_value[gx];
      if (kMax) {
        const bool first = j == 0 || acc < pixel;
        row_value[gx] = first ? pixel : acc;
        row_col[gx] = first ? j : row_col[gx];
      } else {
        row_value[gx] = j == 0 ? pixel : acc + pixel;
      }
      non_finite[gx] += pixel - pixel;
    }
  }
  for (std::int64_t gx = columns; gx < p.grid_w; ++gx) {
    const std::int64_t x0 = gx * kw, cols = std::min(kw, p.width - x0);
    const T* run = row + at_step<kUnit>(x0, stride);
    double acc = kMax ? -std::numeric_limits<double>::infinity() : 0.0, bad = non_finite[gx];
    if (kMax) {
#pragma omp simd reduction(max : acc) reduction(+ : bad)
      for (std::int64_t n = 0; n < cols; ++n) {
        const double pixel = to_double(run[at_step<kUnit>(n, stride)]);
        acc = acc < pixel ? pixel : acc;
        bad += pixel - pixel;
      }
    } else {
#pragma omp simd reduction(+ : acc, bad)
      for (std::int64_t n = 0; n < cols; ++n) {
        const double pixel = to_double(run[at_step<kUnit>(n, stride)]);
        acc += pixel;
        bad += pixel - pixel;
      }
    }
    row_value[gx] = acc;
    non_finite[gx] = bad;
  }
}

// value[gx] = the max (kMax) or sum of node column gx of the band at `origin`, and the buffers' non_finite,
// best_row (the last row whose max exceeded the rows above it: the first to hold the band's max) and best_col.
template <bool kUnit, bool kMax, typename T>
FASTKD_CPU_CLONES void pool_band(const T* origin, const Strides& x, const Pooling& p, std::int64_t rows,
                                 double* value, BandBuffers& buffers) {
  const double* row_value = buffers.row_value.data();
  const std::int64_t* row_col = buffers.row_col.data();
  std::int64_t* best_row = buffers.best_row.data();
  std::int64_t* best_col = buffers.best_col.data();
  std::fill(value, value + p.grid_w, kMax ? -std::numeric_limits<double>::infinity() : 0.0);
  std::fill(buffers.non_finite.begin(), buffers.non_finite.end(), 0.0);
  std::fill(buffers.best_row.begin(), buffers.best_row.end(), 0);
  std::fill(buffers.best_col.begin(), buffers.best_col.end(), 0);
  for (std::int64_t r = 0; r < rows; ++r) {
    fold_row<kUnit, kMax>(origin + r * x.h, x.w, p, buffers);
#pragma omp simd
    for (std::int64_t gx = 0; gx < p.grid_w; ++gx) {
      if (!kMax) {
        value[gx] += row_value[gx];
      } else {
        const bool higher = row_value[gx] > value[gx];
        value[gx] = higher ? row_value[gx] : value[gx];
        best_row[gx] = higher ? r : best_row[gx];
        best_col[gx] = higher ? row_col[gx] : best_col[gx];
      }
    }
  }
}

// The winner (y W + x) of max-pooled node column gx of a band, whose node is f: the first pixel equal to f in
// row-major patch order (in row best_row, the first to hold it; at best_col where the patch was folded by
// column), the first NaN where f is NaN, -1 if there is none (+-Inf without NaN).
template <bool kUnit, typename T>
std::int64_t winner(const T* origin, const Strides& x, const Pooling& p, const Band& band, std::int64_t gx,
                    double f, const BandBuffers& buffers) {
  const std::int64_t x0 = gx * p.kernel_w, cols = std::min(p.kernel_w, p.width - x0);
  const bool nan = f != f;
  const std::int64_t best_row = buffers.best_row[gx];
  if (!nan && gx < by_column(p)) return (band.row0 + best_row) * p.width + x0 + buffers.best_col[gx];
  for (std::int64_t r = nan ? 0 : best_row; r < (nan ? band.rows : best_row + 1); ++r) {
    const T* run = origin + r * x.h + at_step<kUnit>(x0, x.w);
    for (std::int64_t n = 0; n < cols; ++n) {
      const double pixel = to_double(run[at_step<kUnit>(n, x.w)]);
      if (nan ? pixel != pixel : pixel == f) return (band.row0 + r) * p.width + x0 + n;
    }
  }
  return -1;
}

template <bool kUnit, bool kMax, typename T>
void forward_bands(const T* data, const Strides& x, const Pooling& p, double* nodes, std::int64_t* winners) {
  at::parallel_for(0, p.bands(), p.grain(), [&](std::int64_t begin, std::int64_t end) {
    BandBuffers buffers(p.grid_w);
    for (std::int64_t index = begin; index < end; ++index) {
      const Band band = band_at(p, index);
      const T* origin = data + band.b * x.b + band.c * x.c + band.row0 * x.h;
      double* value = nodes + index * p.grid_w;
      pool_band<kUnit, kMax>(origin, x, p, band.rows, value, buffers);
      for (std::int64_t gx = 0; gx < p.grid_w; ++gx) {
        const double count = static_cast<double>(band.rows * std::min(p.kernel_w, p.width - gx * p.kernel_w));
        value[gx] = (kMax ? value[gx] : value[gx] / count) + buffers.non_finite[gx];
        if (kMax) winners[index * p.grid_w + gx] = winner<kUnit>(origin, x, p, band, gx, value[gx], buffers);
      }
    }
  });
}

// Every pixel of one row of a band's gradient: 0 (kMax: the winners are written afterwards), or node column
// gx's share of its dL/df, share[gx].
template <bool kUnit, bool kMax, typename T>
FASTKD_CPU_CLONES void write_row(T* row, std::int64_t stride, const Pooling& p, const T* share) {
  if (kMax) {
    const T zero = from_double<T>(0.0);
#pragma omp simd
    for (std::int64_t n = 0; n < p.width; ++n) row[at_step<kUnit>(n, stride)] = zero;
    return;
  }
  const std::int64_t kw = p.kernel_w, columns = by_column(p);
  for (std::int64_t j = 0; j < (columns > 0 ? kw : 0); ++j) {
#pragma omp simd
    for (std::int64_t gx = 0; gx < columns; ++gx) row[at_step<kUnit>(gx * kw + j, stride)] = share[gx];
  }
  for (std::int64_t gx = columns; gx < p.grid_w; ++gx) {
    const std::int64_t x0 = gx * kw, cols = std::min(kw, p.width - x0);
    T* run = row + at_step<kUnit>(x0, stride);
    const T value = share[gx];
#pragma omp simd
    for (std::int64_t n = 0; n < cols; ++n) run[at_step<kUnit>(n, stride)] = value;
  }
}

template <bool kUnit, bool kMax, typename T>
void backward_bands(const double* grad_nodes, const std::int64_t* winners, const Pooling& p, T* grad,
                    const Strides& g) {
  at::parallel_for(0, p.bands(), p.grain(), [&](std::int64_t begin, std::int64_t end) {
    std::vector<T> share(static_cast<std::size_t>(p.grid_w));
    for (std::int64_t index = begin; index < end; ++index) {
      const Band band = band_at(p, index);
      T* origin = grad + band.b * g.b + band.c * g.c + band.row0 * g.h;
      const double* grad_f = grad_nodes + index * p.grid_w;
      for (std::int64_t gx = 0; gx < p.grid_w && !kMax; ++gx) {  // an average's dL/df over its pixels
        const double count = static_cast<double>(band.rows * std::min(p.kernel_w, p.width - gx * p.kernel_w));
        share[gx] = from_double<T>(grad_f[gx] / count);
      }
      for (std::int64_t r = 0; r < band.rows; ++r) write_row<kUnit, kMax>(origin + r * g.h, g.w, p, share.data());
      for (std::int64_t gx = 0; gx < p.grid_w && kMax; ++gx) {
        const std::int64_t at = winners[index * p.grid_w + gx];
        if (at < 0) continue;
        grad[band.b * g.b + band.c * g.c + at / p.width * g.h + at % p.width * g.w] = from_double<T>(grad_f[gx]);
      }
    }
  });
}

// f<kUnit, kMax>() for the run-time unit and max_pool.
template <typename F>
void with_layout(bool unit, bool max_pool, F&& f) {
  if (unit) {
    max_pool ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  } else {
    max_pool ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
  }
}

std::tuple<at::Tensor, at::Tensor> pool_nodes_forward(const at::Tensor& x, int64_t kernel_h, int64_t kernel_w,
                                                      bool max_pool) {
  const Pooling p = checked_pooling(x, kernel_h, kernel_w, max_pool, kForwardName);
  at::Tensor nodes = at::empty({p.batch, p.channels, p.grid_h, p.grid_w}, x.options().dtype(at::kDouble));
  at::Tensor winners = at::empty(max_pool ? nodes.sizes() : at::IntArrayRef({0}), x.options().dtype(at::kLong));
  if (nodes.numel() == 0) return {nodes, winners};
  const Strides strides = strides_of(x);
  std::int64_t* winner_data = max_pool ? winners.mutable_data_ptr<std::int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_nodes_forward", [&] {
    with_layout(strides.w == 1, max_pool, [&](auto unit, auto max) {
      forward_bands<decltype(unit)::value, decltype(max)::value>(x.const_data_ptr<scalar_t>(), strides, p,
                                                                 nodes.mutable_data_ptr<double>(), winner_data);
    });
  });
  return {nodes, winners};
}

at::Tensor pool_nodes_backward(const at::Tensor& grad_nodes, const at::Tensor& x, const at::Tensor& winners,
                               int64_t kernel_h, int64_t kernel_w, bool max_pool) {
  const Pooling p = checked_pooling(x, kernel_h, kernel_w, max_pool, kBackwardName);
  const std::vector<std::int64_t> shape{p.batch, p.channels, p.grid_h, p.grid_w};
  const at::IntArrayRef node_shape(shape);
  TORCH_CHECK(grad_nodes.sizes() == node_shape, kBackwardName, ": `grad_nodes` must be (B, C, grid_h, grid_w) = ",
              node_shape, ", got ", grad_nodes.sizes());
  TORCH_CHECK(!max_pool || (winners.sizes() == node_shape && winners.scalar_type() == at::kLong), kBackwardName,
              ": `winners` must be int64 of the nodes' shape ", node_shape, ", got ", winners.scalar_type(), " ",
              winners.sizes());
  at::Tensor grad = empty_like_on_huge_pages(x);
  if (x.numel() == 0) return grad;
  const at::Tensor grad_double = grad_nodes.to(at::kDouble).contiguous();
  const at::Tensor winners_contiguous = max_pool ? winners.contiguous() : winners;
  const Strides strides = strides_of(grad);
  const std::int64_t* winner_data = max_pool ? winners_contiguous.const_data_ptr<std::int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_nodes_backward", [&] {
    with_layout(strides.w == 1, max_pool, [&](auto unit, auto max) {
      backward_bands<decltype(unit)::value, decltype(max)::value>(grad_double.const_data_ptr<double>(), winner_data,
                                                                  p, grad.mutable_data_ptr<scalar_t>(), strides);
    });
  });
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("pool_nodes_forward", &fastkd::cpu::pool_nodes_forward);
  m.impl("pool_nodes_backward", &fastkd::cpu::pool_nodes_backward);
}
