// CUDA kernels of the full-graph affinity losses (PairwiseAffinityLoss(window=None),
// AffinityDistillationLoss) and their launchers; compile with nvcc alone, and the emulator runs this same
// file on the CPU through affinity_full_emulated.cpp. Ports fastkd/ops/affinity_full/triton_backend.py (whose
// docstring has the math): with S (Cs x m), T (Ct x m) the pooled, normalised nodes of one image and
// D = S'S - T'T, r_i = sum_j D_ij^2.
//
//   gram_kernel            16 x 16 threads compute a 16 x 16 tile of X W Y' over one range of nodes, staging
//                          16-channel x 16-node tiles of the normalised nodes in shared memory; one partial
//                          matrix per (image, split), summed by the caller in a fixed order
//   apply_kernel           out = A1 P + B1 Q + w (A2 P + B2 Q) for 16 rows x 16 nodes per block (matrix and
//                          node tiles in shared memory), and/or the per-node forms p . (A1 p), p . (B1 q)
//   direct_rows_kernel     a block owns 16 rows i and sweeps j in 16-node tiles of D formed in shared memory
//   direct_backward_kernel the same tiles, weighted by 2 (w_i + w_j), times the nodes j: the block owns the
//                          columns i of the outputs
// The node norms ahead and the normalisation and pooling backward after are the node launchers shared with
// the windowed graph (common/nodes.cu); the glue turns each norm into the node's scale 1 / (||f|| + eps) once,
// so that normalising a staged element is one product. Every kernel has a flat variant (kFlat: one pixel a
// node, rows back to back) whose staging is one load: no pooling loop, no division of node indices.
//
// Everything is accumulated in double (the Gram terms cancel to ~1e-6 of their size near convergence). No
// atomics: each output element is written by one thread, so the result is the same on every run.
#include "affinity_full.h"
#include "../common/nodes_math.cuh"

namespace fastkd {
namespace FASTKD_KERNELS {
namespace {

constexpr int kTile = kAffinityFullTile;
// Row stride of the shared tiles, one double more than a row: the 16 lanes of a half warp reading down a
// column (t[i * kPitch + k], i = lane) then hit 16 different bank pairs; at a stride of kTile doubles (128
// bytes) they would all hit one (a 16-way bank conflict, seen in the emulator's profile).
constexpr int kPitch = kTile + 1;
constexpr int kTileElements = kTile * kPitch;

using nodes::Grid;
using nodes::Map;
using nodes::Nodes;

// acc + sum_k a_tile[a0 + k a_step] b_tile[b0 + k b_step], adding the terms in the order of k, once every
// thread of the block has staged its elements of both tiles; the tiles may be staged again when it returns.
template <typename Tile>
FASTKD_DEVICE double add_staged_dot(double acc, Tile& a_tile, int a0, int a_step, Tile& b_tile, int b0, int b_step) {
  __syncthreads();
  for (int k = 0; k < kTile; ++k) acc += a_tile[a0 + k * a_step] * b_tile[b0 + k * b_step];
  __syncthreads();
  return acc;
}

// Block (kTile, kTile), grid (x tiles * y tiles, splits, B): thread (tx, ty) owns out[x0 + ty][y0 + tx].
template <typename T, bool kFlat>
FASTKD_GLOBAL void gram_kernel(Nodes<T> x, Nodes<T> y, Grid grid, global_ptr<const double> weight,
                               std::int64_t nodes_per_split, global_ptr<double> partials) {
  FASTKD_SHARED(double, x_tile, kTileElements);  // [channel][node]
  FASTKD_SHARED(double, y_tile, kTileElements);
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t x_channels = x.map.channels, y_channels = y.map.channels;
  const std::int64_t y_tiles = (y_channels + kTile - 1) / kTile;
  const std::int64_t x0 = blockIdx.x / y_tiles * kTile, y0 = blockIdx.x % y_tiles * kTile;
  const std::int64_t split = blockIdx.y, splits = gridDim.y, b = blockIdx.z;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const std::int64_t first = split * nodes_per_split;
  const std::int64_t last = first + nodes_per_split < m ? first + nodes_per_split : m;
  double acc = 0.0;
  for (std::int64_t n0 = first; n0 < last; n0 += kTile) {
    const std::int64_t node = n0 + tx;
    double x_value = 0.0, y_value = 0.0;
    if (node < last) {
      x_value = nodes::normalized<kFlat>(x, grid, b, x0 + ty, node);
      if (weight != nullptr) x_value *= weight[b * m + node];
      y_value = nodes::normalized<kFlat>(y, grid, b, y0 + ty, node);
    }
    x_tile[ty * kPitch + tx] = x_value;
    y_tile[ty * kPitch + tx] = y_value;
    acc = add_staged_dot(acc, x_tile, ty * kPitch, 1, y_tile, tx * kPitch, 1);
  }
  const std::int64_t row = x0 + ty, col = y0 + tx;
  if (row < x_channels && col < y_channels) partials[((b * splits + split) * x_channels + row) * y_channels + col] = acc;
}

// acc + M[row0 + ty, :] . X_hat[:, n0 + tx] for a contiguous (B, rows, X channels) matrix M.
template <bool kFlat, typename T, typename Tile>
FASTKD_DEVICE double matrix_times_nodes(global_ptr<const double> matrix, std::int64_t rows, const Nodes<T>& x,
                                        const Grid& grid, std::int64_t b, std::int64_t row0,
                                        std::int64_t n0, Tile& matrix_tile, Tile& node_tile) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const std::int64_t channels = x.map.channels;
  double acc = 0.0;
  for (std::int64_t c0 = 0; c0 < channels; c0 += kTile) {
    const std::int64_t row = row0 + ty, column = c0 + tx;
    matrix_tile[ty * kPitch + tx] = row < rows && column < channels ? matrix[(b * rows + row) * channels + column] : 0.0;
    node_tile[ty * kPitch + tx] = nodes::normalized<kFlat>(x, grid, b, c0 + ty, n0 + tx);
    acc = add_staged_dot(acc, matrix_tile, ty * kPitch, 1, node_tile, tx, kPitch);
  }
  return acc;
}

// Block (kTile, kTile), grid (node tiles, row groups, B): thread (tx, ty) computes row r0 + ty and node
// n0 + tx for the row tiles r0 = (blockIdx.y + k gridDim.y) kTile. The forms need every row of a node in one
// block (gridDim.y == 1): each thread sums its rows, then the 16 threads of a node are summed in order.
template <typename T, bool kFlat>
FASTKD_GLOBAL void apply_kernel(Nodes<T> p, Nodes<T> q, Grid grid, global_ptr<const double> a1,
                                global_ptr<const double> b1, global_ptr<const double> a2, global_ptr<const double> b2,
                                global_ptr<const double> weight, global_ptr<double> out, global_ptr<double> dot_a,
                                global_ptr<double> dot_b) {
  FASTKD_SHARED(double, matrix_tile, kTileElements);
  FASTKD_SHARED(double, node_tile, kTileElements);
  FASTKD_SHARED(double, sums_a, kTileElements);
  FASTKD_SHARED(double, sums_b, kTileElements);
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t rows = p.map.channels;
  const std::int64_t b = blockIdx.z, n0 = static_cast<std::int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const std::int64_t node = n0 + tx;
  const double w = a2 != nullptr && node < m ? weight[b * m + node] : 0.0;
  double form_a = 0.0, form_b = 0.0;
  for (std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * kTile; r0 < rows;
       r0 += static_cast<std::int64_t>(gridDim.y) * kTile) {
    const double from_p = matrix_times_nodes<kFlat>(a1, rows, p, grid, b, r0, n0, matrix_tile, node_tile);
    double from_q = 0.0, weighted = 0.0;
    if (b1 != nullptr) from_q = matrix_times_nodes<kFlat>(b1, rows, q, grid, b, r0, n0, matrix_tile, node_tile);
    if (a2 != nullptr) {
      weighted = matrix_times_nodes<kFlat>(a2, rows, p, grid, b, r0, n0, matrix_tile, node_tile);
      if (b1 != nullptr) weighted += matrix_times_nodes<kFlat>(b2, rows, q, grid, b, r0, n0, matrix_tile, node_tile);
    }
    const std::int64_t row = r0 + ty;
    if (out != nullptr && row < rows && node < m) {
      double result = from_p + from_q;
      if (a2 != nullptr) result += w * weighted;
      out[(b * rows + row) * m + node] = result;
    }
    if (dot_a != nullptr) {
      const double p_value = nodes::normalized<kFlat>(p, grid, b, row, node);
      form_a += p_value * from_p;
      form_b += p_value * from_q;
    }
  }
  if (dot_a != nullptr) {
    sums_a[ty * kPitch + tx] = form_a;
    sums_b[ty * kPitch + tx] = form_b;
    __syncthreads();
    if (ty == 0 && node < m) {
      double total_a = 0.0, total_b = 0.0;
      for (int k = 0; k < kTile; ++k) {
        total_a += sums_a[k * kPitch + tx];
        total_b += sums_b[k * kPitch + tx];
      }
      dot_a[b * m + node] = total_a;
      dot_b[b * m + node] = total_b;
    }
  }
}

// a_ij = x_i . x_j for i = i0 + threadIdx.y, j = j0 + threadIdx.x (0 for a node out of range).
template <bool kFlat, typename T, typename Tile>
FASTKD_DEVICE double affinity(const Nodes<T>& x, const Grid& grid, std::int64_t b, std::int64_t i0, std::int64_t j0,
                              Tile& i_tile, Tile& j_tile) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  double acc = 0.0;
  for (std::int64_t c0 = 0; c0 < x.map.channels; c0 += kTile) {
    i_tile[ty * kPitch + tx] = nodes::normalized<kFlat>(x, grid, b, c0 + ty, i0 + tx);  // [channel][node]
    j_tile[ty * kPitch + tx] = nodes::normalized<kFlat>(x, grid, b, c0 + ty, j0 + tx);
    acc = add_staged_dot(acc, i_tile, ty, kPitch, j_tile, tx, kPitch);
  }
  return acc;
}

// Block (kTile, kTile), grid (row tiles, B): thread (tx, ty) forms D[i0 + ty][j0 + tx] for every j tile.
template <typename T, bool kFlat>
FASTKD_GLOBAL void direct_rows_kernel(Nodes<T> s, Nodes<T> t, Grid grid, global_ptr<double> rows) {
  FASTKD_SHARED(double, i_tile, kTileElements);
  FASTKD_SHARED(double, j_tile, kTileElements);
  FASTKD_SHARED(double, sums, kTileElements);
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t b = blockIdx.y, i0 = static_cast<std::int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  double row = 0.0;
  for (std::int64_t j0 = 0; j0 < m; j0 += kTile) {
    const double difference = affinity<kFlat>(s, grid, b, i0, j0, i_tile, j_tile) -
                              affinity<kFlat>(t, grid, b, i0, j0, i_tile, j_tile);
    row += difference * difference;
  }
  sums[ty * kPitch + tx] = row;
  __syncthreads();
  if (tx == 0 && i0 + ty < m) {
    double total = 0.0;
    for (int k = 0; k < kTile; ++k) total += sums[ty * kPitch + k];
    rows[b * m + i0 + ty] = total;
  }
}

// out[:, i0 + tx] += sign sum_j weighted[i][j] x_j over one j tile, thread (tx, ty) owning the channels
// c0 + ty; out (B, C, m) double. Only this block writes the columns i0..i0 + kTile - 1.
template <bool kFlat, typename T, typename Tile>
FASTKD_DEVICE void accumulate_columns(global_ptr<double> out, double sign, const Nodes<T>& x, const Grid& grid,
                                      std::int64_t b, std::int64_t i0, std::int64_t j0, Tile& weighted,
                                      Tile& j_tile) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t channels = x.map.channels;
  for (std::int64_t c0 = 0; c0 < channels; c0 += kTile) {
    j_tile[ty * kPitch + tx] = nodes::normalized<kFlat>(x, grid, b, c0 + ty, j0 + tx);  // [channel][node]
    const double sum = add_staged_dot(0.0, weighted, tx * kPitch, 1, j_tile, ty * kPitch, 1);
    const std::int64_t c = c0 + ty, i = i0 + tx;
    if (c < channels && i < m) out[(b * channels + c) * m + i] += sign * sum;
  }
}

// Block (kTile, kTile), grid (node tiles, B).
template <typename T, bool kFlat>
FASTKD_GLOBAL void direct_backward_kernel(Nodes<T> s, Nodes<T> t, Grid grid, global_ptr<const double> weight,
                                          global_ptr<double> grad_s,
                                          global_ptr<double> grad_t) {
  FASTKD_SHARED(double, i_tile, kTileElements);
  FASTKD_SHARED(double, j_tile, kTileElements);
  FASTKD_SHARED(double, weighted, kTileElements);  // [i][j]: 2 (w_i + w_j) D_ij
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t b = blockIdx.y, i0 = static_cast<std::int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const double weight_i = i0 + ty < m ? weight[b * m + i0 + ty] : 0.0;
  for (std::int64_t j0 = 0; j0 < m; j0 += kTile) {
    const double difference = affinity<kFlat>(s, grid, b, i0, j0, i_tile, j_tile) -
                              affinity<kFlat>(t, grid, b, i0, j0, i_tile, j_tile);
    const double weight_j = j0 + tx < m ? weight[b * m + j0 + tx] : 0.0;
    // The last readers of `weighted` (the previous tile's accumulation) passed the barriers in affinity().
    weighted[ty * kPitch + tx] = 2.0 * (weight_i + weight_j) * difference;
    __syncthreads();
    if (grad_s != nullptr) accumulate_columns<kFlat>(grad_s, 1.0, s, grid, b, i0, j0, weighted, j_tile);
    if (grad_t != nullptr) accumulate_columns<kFlat>(grad_t, -1.0, t, grid, b, i0, j0, weighted, j_tile);
  }
}

std::int64_t tiles_for(std::int64_t items) { return (items + kTile - 1) / kTile; }

// Whether both operands take the flat path (one pixel a node, rows back to back; nodes_math.cuh).
template <typename T>
bool flat(const Nodes<T>& x, const Nodes<T>& y, const Grid& grid) {
  return nodes::flat_pixels(x.map, grid) && nodes::flat_pixels(y.map, grid);
}

}  // namespace

template <typename T>
void affinity_full_gram(const nodes::Nodes<T>& x, const nodes::Nodes<T>& y, const nodes::Grid& grid,
                        const double* weight, std::int64_t batch, std::int64_t splits, std::int64_t nodes_per_split,
                        double* partials, fastkd_stream_t stream) {
  const std::int64_t tiles = tiles_for(x.map.channels) * tiles_for(y.map.channels);
  if (tiles == 0 || batch == 0 || splits == 0) return;
  const LaunchExtent blocks(tiles, splits, batch);
  if (flat(x, y, grid)) {
    FASTKD_LAUNCH((gram_kernel<T, true>), blocks, dim3(kTile, kTile), stream, x, y, grid, weight, nodes_per_split,
                  partials);
  } else {
    FASTKD_LAUNCH((gram_kernel<T, false>), blocks, dim3(kTile, kTile), stream, x, y, grid, weight, nodes_per_split,
                  partials);
  }
}

template <typename T>
void affinity_full_apply(const nodes::Nodes<T>& p, const nodes::Nodes<T>& q, const nodes::Grid& grid,
                         const double* a1, const double* b1, const double* a2, const double* b2,
                         const double* weight, std::int64_t batch, double* out, double* dot_a, double* dot_b,
                         fastkd_stream_t stream) {
  const std::int64_t node_tiles = tiles_for(nodes::node_count(grid));
  const std::int64_t row_groups = dot_a != nullptr ? 1 : tiles_for(p.map.channels);
  if (node_tiles == 0 || row_groups == 0 || batch == 0) return;
  const LaunchExtent blocks(node_tiles, row_groups, batch);
  if (flat(p, q, grid)) {
    FASTKD_LAUNCH((apply_kernel<T, true>), blocks, dim3(kTile, kTile), stream, p, q, grid, a1, b1, a2, b2, weight,
                  out, dot_a, dot_b);
  } else {
    FASTKD_LAUNCH((apply_kernel<T, false>), blocks, dim3(kTile, kTile), stream, p, q, grid, a1, b1, a2, b2, weight,
                  out, dot_a, dot_b);
  }
}

template <typename T>
void affinity_full_direct_rows(const nodes::Nodes<T>& s, const nodes::Nodes<T>& t, const nodes::Grid& grid,
                               std::int64_t batch, double* rows, fastkd_stream_t stream) {
  const std::int64_t node_tiles = tiles_for(nodes::node_count(grid));
  if (node_tiles == 0 || batch == 0) return;
  const LaunchExtent blocks(node_tiles, batch);
  if (flat(s, t, grid)) {
    FASTKD_LAUNCH((direct_rows_kernel<T, true>), blocks, dim3(kTile, kTile), stream, s, t, grid, rows);
  } else {
    FASTKD_LAUNCH((direct_rows_kernel<T, false>), blocks, dim3(kTile, kTile), stream, s, t, grid, rows);
  }
}

template <typename T>
void affinity_full_direct_backward(const nodes::Nodes<T>& s, const nodes::Nodes<T>& t, const nodes::Grid& grid,
                                   const double* weight, std::int64_t batch, double* grad_s, double* grad_t,
                                   fastkd_stream_t stream) {
  const std::int64_t node_tiles = tiles_for(nodes::node_count(grid));
  if (node_tiles == 0 || batch == 0 || (grad_s == nullptr && grad_t == nullptr)) return;
  const LaunchExtent blocks(node_tiles, batch);
  if (flat(s, t, grid)) {
    FASTKD_LAUNCH((direct_backward_kernel<T, true>), blocks, dim3(kTile, kTile), stream, s, t, grid, weight, grad_s,
                  grad_t);
  } else {
    FASTKD_LAUNCH((direct_backward_kernel<T, false>), blocks, dim3(kTile, kTile), stream, s, t, grid, weight,
                  grad_s, grad_t);
  }
}

#define FASTKD_INSTANTIATE(T)                                                                                      \
  template void affinity_full_gram<T>(const nodes::Nodes<T>&, const nodes::Nodes<T>&, const nodes::Grid&,          \
                                      const double*, std::int64_t, std::int64_t, std::int64_t, double*,            \
                                      fastkd_stream_t);                                                            \
  template void affinity_full_apply<T>(const nodes::Nodes<T>&, const nodes::Nodes<T>&, const nodes::Grid&,         \
                                       const double*, const double*, const double*, const double*, const double*,  \
                                       std::int64_t, double*, double*, double*, fastkd_stream_t);                  \
  template void affinity_full_direct_rows<T>(const nodes::Nodes<T>&, const nodes::Nodes<T>&, const nodes::Grid&,   \
                                             std::int64_t, double*, fastkd_stream_t);                              \
  template void affinity_full_direct_backward<T>(const nodes::Nodes<T>&, const nodes::Nodes<T>&,                   \
                                                 const nodes::Grid&, const double*, std::int64_t, double*,         \
                                                 double*, fastkd_stream_t);
FASTKD_FOR_EACH_STORAGE_TYPE(FASTKD_INSTANTIATE)
#undef FASTKD_INSTANTIATE

}  // namespace FASTKD_KERNELS
}  // namespace fastkd
