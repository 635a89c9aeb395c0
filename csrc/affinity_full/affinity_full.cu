// CUDA kernels of the full-graph affinity losses (PairwiseAffinityLoss(window=None),
// AffinityDistillationLoss) and their launchers; compile with nvcc alone, and the emulator runs this same
// file on the CPU through affinity_full_emulated.cpp. Ports fastkd/ops/affinity_full/triton_backend.py (whose
// docstring has the math): with S (Cs x m), T (Ct x m) the pooled, normalised nodes of one image and
// D = S'S - T'T, r_i = sum_j D_ij^2.
//
//   gram_kernel            4 warps compute a 64 x 64 tile of X W Y' over one range of nodes with FP64 tensor-core
//                          products (mma.sync m8n8k4, common/mma.cuh; 32 x 32 outputs a warp in registers),
//                          staging 64-channel x 32-node tiles of the normalised nodes in shared memory; one
//                          partial matrix per (image, split), summed by the caller in a fixed order
//   apply_kernel           out = A1 P + B1 Q + w (A2 P + B2 Q) for 64 rows x 64 nodes per block with the same
//                          tensor-core products (32 x 32 outputs a warp, one accumulator for the four terms),
//                          or the per-node forms p . (A1 p), p . (B1 q) for all rows of 64 nodes
//   direct_rows_kernel     4 warps own 64 rows i and sweep one range of 64-node column tiles of D, each tile
//                          summed over the channels with the same tensor-core products (32 x 32 a warp in
//                          registers), then squared and summed per row; a partial per (rows, range), summed by
//                          the caller in a fixed order
//   direct_difference_kernel  a 64 x 64 tile of a slab of D's rows, formed with the same tensor-core products,
//                          by a block per range of channels where the tiles are few (a partial per range,
//                          summed by the caller in a fixed order): D itself for few nodes' forward
//                          (kAffinityFewNodes, one tile an image), and for the backward W = 2 (w_i + w_j) D
//                          stored transposed
//   direct_columns_kernel  the backward's W times the nodes j with the same tensor-core products, 64 channels x
//                          64 nodes i a block in registers over every j, written once
// The node norms ahead and the normalisation and pooling backward after are the node launchers shared with
// the windowed graph (common/nodes.cu); the glue turns each norm into the node's scale 1 / (||f|| + eps) once,
// so that normalising a staged element is one product. Every kernel has a flat variant (kFlat: one pixel a
// node, rows back to back) whose staging is one load: no pooling loop, no division of node indices. The glue
// pools patches into such nodes first (pool_nodes), so the general variant serves strided pixel views.
//
// Everything is accumulated in double (the Gram terms cancel to ~1e-6 of their size near convergence). No
// atomics: each output element is written by one thread, so the result is the same on every run.
#include "affinity_full.h"

#include <stdexcept>

#include "../common/mma.cuh"
#include "../common/nodes_math.cuh"

namespace fastkd {
namespace FASTKD_KERNELS {
namespace {

using nodes::Grid;
using nodes::Map;
using nodes::Nodes;

// Where output (r, c) of a block's outputs, `width` columns a row, lies in shared memory on its way out:
// row-major, each row's columns permuted by an XOR of bits 0 and 3 with bits 1 and 0 of r. The fragment stores
// (lane l: row l / 4, column 2 (l % 4) + e) then hit 16 different bank pairs per half warp, and a warp reading
// 32 columns of one row reads a permutation of them: both take the ideal 2 wavefronts (without it, the stores
// would conflict 2-way). Stored this way, each warp writes 32 consecutive elements of a row to global memory
// (the fragments hold 2 of every 8).
FASTKD_DEVICE inline int output_index(int r, int c, int width) {
  return r * width + (c ^ ((r & 1) * 8 + (r >> 1 & 1)));
}

// Both tensor-core kernels give each warp 32 x 32 outputs as 4 x 4 FP64 mma tiles of 8 x 8 in registers (32
// doubles a lane): lane l holds rows 8 i + l / 4, columns 8 j + 2 (l % 4) + e.
constexpr int kWarpTiles = 4;
constexpr int kWarpSide = 8 * kWarpTiles;
using WarpAccumulators = double[kWarpTiles][kWarpTiles][2];

// acc += A B over kDepth staged k (a multiple of 4) for the warp's 32 x 32 outputs, in FP64 mma products:
// A[r][k] at staged[a_at(r, k)] and B[k][c] at staged[b_at(c, k)], r and c counted from the warp's first row
// and column. Every lane of the warp calls it together.
template <int kDepth, typename Tile, typename AAt, typename BAt>
FASTKD_DEVICE void add_warp_products(WarpAccumulators& acc, Tile& staged, AAt a_at, BAt b_at) {
  const int lane = threadIdx.x % 32, group = lane / 4, in_group = lane % 4;
  for (int k0 = 0; k0 < kDepth; k0 += 4) {
    const int k = k0 + in_group;
    double a[kWarpTiles], b_fragment[kWarpTiles];
    for (int i = 0; i < kWarpTiles; ++i) {
      a[i] = staged[a_at(8 * i + group, k)];
      b_fragment[i] = staged[b_at(8 * i + group, k)];
    }
    for (int i = 0; i < kWarpTiles; ++i) {
      for (int j = 0; j < kWarpTiles; ++j) mma_m8n8k4(acc[i][j], a[i], b_fragment[j]);
    }
  }
}

// The warp's outputs (rows warp_row.., columns warp_col.. of a block's `width` columns) into shared memory at
// output_index, once the last products' barrier has passed.
template <typename Tile>
FASTKD_DEVICE void stage_outputs(Tile& staged, const WarpAccumulators& acc, int warp_row, int warp_col, int width) {
  const int lane = threadIdx.x % 32, group = lane / 4, in_group = lane % 4;
  FASTKD_UNROLL
  for (int i = 0; i < kWarpTiles; ++i) {
    for (int j = 0; j < kWarpTiles; ++j) {
      for (int e = 0; e < 2; ++e) {
        staged[output_index(warp_row + 8 * i + group, warp_col + 8 * j + 2 * in_group + e, width)] = acc[i][j][e];
      }
    }
  }
}

// The Gram kernel's block: 4 warps (2 x 2) own a kGramSide x kGramSide tile of outputs, each warp 32 x 32 as
// 4 x 4 FP64 mma tiles of 8 x 8 held in registers (32 doubles a lane); nodes are staged kGramChunk at a time.
constexpr int kGramSide = kAffinityGramSide;
constexpr int kGramChunk = kAffinityGramChunk;
constexpr int kGramWarps = (kGramSide / kWarpSide) * (kGramSide / kWarpSide);
constexpr int kGramThreads = 32 * kGramWarps;
// Row stride of the [channel][node] tiles in doubles, 4 (mod 16) doubles: a fragment load (lane l reads row
// l / 4, node l % 4) then covers the 16 bank pairs once per half warp, and a staging store (32 consecutive
// nodes of one row) is contiguous; both take the ideal 2 wavefronts.
constexpr int kGramPitch = kGramChunk + 4;
static_assert(kGramSide % kWarpSide == 0 && kGramChunk % 32 == 0 && kGramPitch % 16 == 4, "Gram tiling");

constexpr int kGramTileElements = kGramSide * kGramPitch;
static_assert(kGramSide * kGramSide <= 2 * kGramTileElements, "the outputs fit where the tiles were staged");

// tile[offset + r * kGramPitch + n] = the normalised x[row0 + r] at node n0 + n, times the node's weight, or 0
// past `last` or the channels: lane n of each warp stages node n0 + n of every kGramWarps-th row (coalesced
// along the nodes).
template <bool kFlat, typename T, typename Tile>
FASTKD_DEVICE void stage_gram_chunk(Tile& tile, int offset, const Nodes<T>& x, const Grid& grid,
                                    global_ptr<const double> weight, std::int64_t b, std::int64_t row0,
                                    std::int64_t n0, std::int64_t last) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int n = lane; n < kGramChunk; n += 32) {
    const std::int64_t node = n0 + n;
    const bool inside = node < last;
    const double node_weight = inside && weight != nullptr ? weight[b * nodes::node_count(grid) + node] : 1.0;
    const nodes::NodeAt at = nodes::locate<kFlat>(x, grid, b, node);  // once for all the rows
    for (int r = warp; r < kGramSide; r += kGramWarps) {
      const double value = inside ? nodes::normalized_at<kFlat>(x, grid, at, b, row0 + r) * node_weight : 0.0;
      tile[offset + r * kGramPitch + n] = value;
    }
  }
}

// Block kGramThreads, grid (x tiles * y tiles, splits, B) for tiles of kGramSide channels: the partial
// X W Y' of one output tile over one range of nodes.
template <typename T, bool kFlat>
FASTKD_GLOBAL void gram_kernel(Nodes<T> x, Nodes<T> y, Grid grid, global_ptr<const double> weight,
                               std::int64_t nodes_per_split, global_ptr<double> partials) {
  // The x tile, then the y tile ([channel][node] each); at the end, the block's outputs (output_index).
  FASTKD_SHARED(double, staged, 2 * kGramTileElements);
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t x_channels = x.map.channels, y_channels = y.map.channels;
  const std::int64_t y_tiles = (y_channels + kGramSide - 1) / kGramSide;
  const std::int64_t x0 = blockIdx.x / y_tiles * kGramSide, y0 = blockIdx.x % y_tiles * kGramSide;
  const std::int64_t split = blockIdx.y, splits = gridDim.y, b = blockIdx.z;
  const std::int64_t first = split * nodes_per_split;
  const std::int64_t last = first + nodes_per_split < m ? first + nodes_per_split : m;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warp_x = warp / (kGramSide / kWarpSide) * kWarpSide;
  const int warp_y = warp % (kGramSide / kWarpSide) * kWarpSide;
  // A warp whose outputs all lie past the channels (at C < kGramSide) stages but skips the products; the
  // condition is the same for all its lanes, as mma.sync needs.
  const bool products = x0 + warp_x < x_channels && y0 + warp_y < y_channels;
  WarpAccumulators acc = {};
  for (std::int64_t n0 = first; n0 < last; n0 += kGramChunk) {
    stage_gram_chunk<kFlat>(staged, 0, x, grid, weight, b, x0, n0, last);
    stage_gram_chunk<kFlat>(staged, kGramTileElements, y, grid, nullptr, b, y0, n0, last);
    __syncthreads();
    if (products) {
      add_warp_products<kGramChunk>(
          acc, staged, [&](int r, int k) { return (warp_x + r) * kGramPitch + k; },  // X[rows][k]
          [&](int c, int k) { return kGramTileElements + (warp_y + c) * kGramPitch + k; });  // Y[cols][k]
    }
    __syncthreads();
  }
  // The outputs go out through shared memory (output_index); the loop's last barrier has passed, so the
  // tiles may be overwritten.
  stage_outputs(staged, acc, warp_x, warp_y, kGramSide);
  __syncthreads();
  for (int r = warp; r < kGramSide; r += kGramWarps) {
    const std::int64_t row = x0 + r;
    for (int c = lane; c < kGramSide; c += 32) {
      const std::int64_t col = y0 + c;
      if (row < x_channels && col < y_channels) {
        partials[((b * splits + split) * x_channels + row) * y_channels + col] = staged[output_index(r, c, kGramSide)];
      }
    }
  }
}

// The apply kernel's block: 4 warps (2 x 2) own kApplyRows rows x kApplyNodes nodes of M X (M a matrix, X the
// nodes), each warp 32 x 32 as 4 x 4 FP64 mma tiles of 8 x 8 in registers; channels (the k of the product) are
// staged kApplyChunk at a time. One accumulator serves all four terms: w (A2 P) = A2 (P W), W = diag(w) acting
// on the nodes, so the weighted terms are products of the second matrix with a second node tile, the nodes times
// their weights. Staged per chunk: one or two matrices' [row][channel] tiles, one or two [channel][node] tiles.
constexpr int kApplyRows = kAffinityApplyRows;
constexpr int kApplyNodes = 64;
constexpr int kApplyChunk = 16;
constexpr int kApplyWarps = (kApplyRows / kWarpSide) * (kApplyNodes / kWarpSide);
constexpr int kApplyThreads = 32 * kApplyWarps;
// Pitches 4 (mod 16) doubles, as kGramPitch: fragment loads and staging stores take the ideal 2 wavefronts.
constexpr int kMatrixPitch = kApplyChunk + 4;
constexpr int kNodePitch = kApplyNodes + 4;
constexpr int kMatrixTileElements = kApplyRows * kMatrixPitch;
constexpr int kNodeTileElements = kApplyChunk * kNodePitch;
// The direct row kernel's tiles of D: kDirectSide nodes square, on the apply kernel's warps and node tiles.
constexpr int kDirectSide = kAffinityDirectSide;
static_assert(kDirectSide == kApplyNodes && kApplyThreads == 128, "direct_rows_kernel runs on apply's tiling");
constexpr int kNodeTilesAt = 2 * kMatrixTileElements;  // staged: [matrix][row][channel], then [tile][channel][node]
constexpr int kApplyStagedElements = kNodeTilesAt + 2 * kNodeTileElements;
static_assert(kApplyNodes == 64 && kApplyChunk == 16 && kMatrixPitch % 16 == 4 && kNodePitch % 16 == 4,
              "apply tiling");
static_assert(kApplyRows * kApplyNodes <= kApplyStagedElements, "the outputs fit where the tiles were staged");
static_assert(kApplyThreads == 2 * kApplyNodes && kApplyRows == 64, "add_forms: a thread per node and row half");

// Stages channels c0..c0 + kApplyChunk - 1 of the rows r0.. of `first` (and of `second`, unless nullptr; both
// contiguous (B, rows, x channels)) and of the normalised nodes n0.. of x, and with `second` those nodes times
// node_weight (this lane's nodes n0 + lane and n0 + lane + 32); 0 past the rows, channels, nodes.
template <bool kFlat, typename T, typename Tile>
FASTKD_DEVICE void stage_apply_chunk(Tile& staged, global_ptr<const double> first, global_ptr<const double> second,
                                     std::int64_t rows, const Nodes<T>& x, const Grid& grid,
                                     const double (&node_weight)[2], std::int64_t b, std::int64_t r0, std::int64_t c0,
                                     std::int64_t n0) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const std::int64_t channels = x.map.channels, column = c0 + lane % kApplyChunk;
  for (int r = 2 * warp + lane / kApplyChunk; r < kApplyRows; r += 2 * kApplyWarps) {  // half a warp a row
    const std::int64_t row = r0 + r, at = (b * rows + row) * channels + column;
    const bool inside = row < rows && column < channels;
    const int to = r * kMatrixPitch + lane % kApplyChunk;
    staged[to] = inside ? first[at] : 0.0;
    if (second != nullptr) staged[kMatrixTileElements + to] = inside ? second[at] : 0.0;
  }
  for (int c = warp; c < kApplyChunk; c += kApplyWarps) {
    FASTKD_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int n = lane + 32 * half;
      const double value = nodes::normalized<kFlat>(x, grid, b, c0 + c, n0 + n);
      staged[kNodeTilesAt + c * kNodePitch + n] = value;
      if (second != nullptr) staged[kNodeTilesAt + kNodeTileElements + c * kNodePitch + n] = value * node_weight[half];
    }
  }
}

// acc += staged matrix tile `tile` times staged node tile `tile` (0: first and the nodes, 1: second and the
// weighted nodes), for the warp's 32 rows from warp_row and 32 nodes from warp_node.
template <typename Tile>
FASTKD_DEVICE void add_apply_products(WarpAccumulators& acc, Tile& staged, int tile, int warp_row, int warp_node) {
  const int matrix = tile * kMatrixTileElements, node_tile = kNodeTilesAt + tile * kNodeTileElements;
  add_warp_products<kApplyChunk>(
      acc, staged, [&](int r, int k) { return matrix + (warp_row + r) * kMatrixPitch + k; },  // M[rows][k]
      [&](int c, int k) { return node_tile + k * kNodePitch + warp_node + c; });              // X[k][nodes]
}

// acc += first X + second (X W) over all channels of x (no second term when second is nullptr; weight (B, m)
// is read only with it), for the block's rows r0.. and nodes n0..; `products`: whether this warp's outputs
// reach the rows and nodes.
template <bool kFlat, typename T, typename Tile>
FASTKD_DEVICE void add_matrices_times_nodes(WarpAccumulators& acc, global_ptr<const double> first,
                                            global_ptr<const double> second, std::int64_t rows, const Nodes<T>& x,
                                            const Grid& grid, global_ptr<const double> weight, std::int64_t b,
                                            std::int64_t r0, std::int64_t n0, bool products, int warp_row,
                                            int warp_node, Tile& staged) {
  const std::int64_t m = nodes::node_count(grid);
  const int lane = threadIdx.x % 32;
  double node_weight[2] = {0.0, 0.0};
  if (second != nullptr) {
    FASTKD_UNROLL
    for (int half = 0; half < 2; ++half) {
      const std::int64_t node = n0 + lane + 32 * half;
      node_weight[half] = node < m ? weight[b * m + node] : 0.0;
    }
  }
  for (std::int64_t c0 = 0; c0 < x.map.channels; c0 += kApplyChunk) {
    stage_apply_chunk<kFlat>(staged, first, second, rows, x, grid, node_weight, b, r0, c0, n0);
    __syncthreads();
    if (products) {
      add_apply_products(acc, staged, 0, warp_row, warp_node);
      if (second != nullptr) add_apply_products(acc, staged, 1, warp_row, warp_node);
    }
    __syncthreads();
  }
}

// form_sums[form][half][node] += sum over the rows r0 + 32 half.. of p_r (matrix x)_r at the nodes n0..: the
// products go through shared memory, where each thread sums one node's 32 rows of a half in order (its loads of
// p run along the nodes, coalesced). A block's row tiles run in order: every sum is taken in the same order on
// every run.
template <bool kFlat, typename T, typename Tile, typename Sums>
FASTKD_DEVICE void add_forms(Sums& form_sums, int form, global_ptr<const double> matrix, const Nodes<T>& p,
                             const Nodes<T>& x, const Grid& grid, std::int64_t b, std::int64_t r0, std::int64_t n0,
                             bool products, int warp_row, int warp_node, Tile& staged) {
  {
    WarpAccumulators acc = {};
    add_matrices_times_nodes<kFlat>(acc, matrix, nullptr, p.map.channels, x, grid, nullptr, b, r0, n0, products,
                                    warp_row, warp_node, staged);
    stage_outputs(staged, acc, warp_row, warp_node, kApplyNodes);
  }
  __syncthreads();
  const int node = threadIdx.x % kApplyNodes, half = threadIdx.x / kApplyNodes;
  double sum = 0.0;
  for (int r = 32 * half; r < 32 * half + 32; ++r) {
    sum += nodes::normalized<kFlat>(p, grid, b, r0 + r, n0 + node) * staged[output_index(r, node, kApplyNodes)];
  }
  form_sums[(2 * form + half) * kApplyNodes + node] += sum;
  __syncthreads();  // before the next products stage
}

// Block kApplyThreads, grid (node tiles, row groups, B): the block computes the rows r0 = (blockIdx.y + k
// gridDim.y) kApplyRows.. of its kApplyNodes nodes. Either out (A1 P + B1 Q + w (A2 P + B2 Q)), and unless
// form == nullptr each node's p . out over the block's rows into form[b][blockIdx.y] (B, row groups, m: the
// norm's share of the gradient, summed by the caller in a fixed order), or the forms (dot_a, dot_b; a2 ==
// nullptr, gridDim.y == 1: every row of a node in one block) are computed.
template <typename T, bool kFlat>
FASTKD_GLOBAL void apply_kernel(Nodes<T> p, Nodes<T> q, Grid grid, global_ptr<const double> a1,
                                global_ptr<const double> b1, global_ptr<const double> a2, global_ptr<const double> b2,
                                global_ptr<const double> weight, global_ptr<double> out, global_ptr<double> form,
                                global_ptr<double> dot_a, global_ptr<double> dot_b) {
  // The tiles; between row tiles, the outputs on their way out (output_index).
  FASTKD_SHARED(double, staged, kApplyStagedElements);
  FASTKD_SHARED(double, form_sums, 2 * 2 * kApplyNodes);  // [form][row half][node], for the forms
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t rows = p.map.channels;
  const std::int64_t b = blockIdx.z, n0 = static_cast<std::int64_t>(blockIdx.x) * kApplyNodes;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warp_row = warp / (kApplyNodes / kWarpSide) * kWarpSide;
  const int warp_node = warp % (kApplyNodes / kWarpSide) * kWarpSide;
  const bool forms = dot_a != nullptr;
  for (int i = threadIdx.x; i < 2 * 2 * kApplyNodes; i += kApplyThreads) form_sums[i] = 0.0;  // each its own
  for (std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * kApplyRows; r0 < rows;
       r0 += static_cast<std::int64_t>(gridDim.y) * kApplyRows) {
    const bool products = r0 + warp_row < rows && n0 + warp_node < m;  // the same for the warp's lanes
    if (forms) {
      add_forms<kFlat>(form_sums, 0, a1, p, p, grid, b, r0, n0, products, warp_row, warp_node, staged);
      if (b1 != nullptr) {
        add_forms<kFlat>(form_sums, 1, b1, p, q, grid, b, r0, n0, products, warp_row, warp_node, staged);
      }
      continue;
    }
    WarpAccumulators acc = {};
    add_matrices_times_nodes<kFlat>(acc, a1, a2, rows, p, grid, weight, b, r0, n0, products, warp_row, warp_node,
                                    staged);
    if (b1 != nullptr) {
      add_matrices_times_nodes<kFlat>(acc, b1, a2 != nullptr ? b2 : nullptr, rows, q, grid, weight, b, r0, n0,
                                      products, warp_row, warp_node, staged);
    }
    stage_outputs(staged, acc, warp_row, warp_node, kApplyNodes);
    __syncthreads();
    for (int r = warp; r < kApplyRows; r += kApplyWarps) {
      for (int c = lane; c < kApplyNodes; c += 32) {
        if (r0 + r < rows && n0 + c < m) {
          out[(b * rows + r0 + r) * m + n0 + c] = staged[output_index(r, c, kApplyNodes)];
        }
      }
    }
    if (form != nullptr) {  // a thread per node and row half, its 32 rows in order (as add_forms)
      const int node = threadIdx.x % kApplyNodes, half = threadIdx.x / kApplyNodes;
      double sum = 0.0;
      for (int r = 32 * half; r < 32 * half + 32; ++r) {
        sum += nodes::normalized<kFlat>(p, grid, b, r0 + r, n0 + node) * staged[output_index(r, node, kApplyNodes)];
      }
      form_sums[half * kApplyNodes + node] += sum;
    }
    __syncthreads();  // before the next row tile stages
  }
  if (form != nullptr) {
    __syncthreads();  // both row halves' sums, also where there were no rows to sum
    const int node = threadIdx.x;
    if (node < kApplyNodes && n0 + node < m) {
      form[(b * gridDim.y + blockIdx.y) * m + n0 + node] = form_sums[node] + form_sums[kApplyNodes + node];
    }
  }
  if (forms) {
    __syncthreads();  // the sums of both row halves, also where there were no rows to sum
    const int node = threadIdx.x;
    if (node < kApplyNodes && n0 + node < m) {
      dot_a[b * m + n0 + node] = form_sums[node] + form_sums[kApplyNodes + node];
      dot_b[b * m + n0 + node] = form_sums[2 * kApplyNodes + node] + form_sums[3 * kApplyNodes + node];
    }
  }
}

// acc += X_i' X_j over the channels [first, last) of x (first a multiple of kApplyChunk; normalized gives 0
// past the channels) for the warp's 32 x 32 of the block's 64 x 64 tile of affinities (rows from i0, columns
// from j0), as FP64 mma products over kApplyChunk channels staged at a time ([tile][channel][node] at
// kNodePitch: lanes along the nodes, coalesced). `products`: whether the warp's rows and columns reach the
// nodes (the same for all its lanes).
template <bool kFlat, typename T, typename Tile>
FASTKD_DEVICE void add_affinity_products(WarpAccumulators& acc, Tile& staged, const Nodes<T>& x, const Grid& grid,
                                         std::int64_t b, std::int64_t i0, std::int64_t j0, bool products,
                                         int warp_row, int warp_col, std::int64_t first, std::int64_t last) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (std::int64_t c0 = first; c0 < last; c0 += kApplyChunk) {
    for (int c = warp; c < kApplyChunk; c += kApplyWarps) {
      FASTKD_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int n = lane + 32 * half;
        staged[c * kNodePitch + n] = nodes::normalized<kFlat>(x, grid, b, c0 + c, i0 + n);
        staged[kNodeTileElements + c * kNodePitch + n] = nodes::normalized<kFlat>(x, grid, b, c0 + c, j0 + n);
      }
    }
    __syncthreads();
    if (products) {
      add_warp_products<kApplyChunk>(
          acc, staged, [&](int i, int k) { return k * kNodePitch + warp_row + i; },  // X_i'[i][k]
          [&](int j, int k) { return kNodeTileElements + k * kNodePitch + warp_col + j; });  // X_j[k][j]
    }
    __syncthreads();
  }
}

// d = S_i'S_j - T_i'T_j over the channels [first, last) (clamped to each operand's) for the warp's 32 x 32 of
// the block's tile of D: each affinity in accumulators of its own, then their difference, so that identical
// rows of s and t give exactly 0 (in one accumulator, s's products and then t's negated leave the FMAs'
// rounding errors, and a distillation loss's row norm takes a unit gradient from that noise).
template <bool kFlat, typename T, typename Tile>
FASTKD_DEVICE void form_difference(WarpAccumulators& d, Tile& staged, const Nodes<T>& s, const Nodes<T>& t,
                                   const Grid& grid, std::int64_t b, std::int64_t i0, std::int64_t j0, bool products,
                                   int warp_row, int warp_col, std::int64_t first, std::int64_t last) {
  WarpAccumulators a_t = {};
  for (int i = 0; i < kWarpTiles; ++i) {
    for (int j = 0; j < kWarpTiles; ++j) d[i][j][0] = d[i][j][1] = 0.0;
  }
  add_affinity_products<kFlat>(d, staged, s, grid, b, i0, j0, products, warp_row, warp_col, first,
                               last < s.map.channels ? last : s.map.channels);
  add_affinity_products<kFlat>(a_t, staged, t, grid, b, i0, j0, products, warp_row, warp_col, first,
                               last < t.map.channels ? last : t.map.channels);
  for (int i = 0; i < kWarpTiles; ++i) {
    for (int j = 0; j < kWarpTiles; ++j) {
      for (int e = 0; e < 2; ++e) d[i][j][e] -= a_t[i][j][e];
    }
  }
}

// Block kApplyThreads (4 warps, 2 x 2, each 32 x 32 outputs in registers), grid (row tiles, column splits, B):
// partials[b][split][i] = sum_j D_ij^2 for the block's kDirectSide rows i over the split's column tiles, each
// tile of D = S_i'S_j - T_i'T_j formed in registers (form_difference).
template <typename T, bool kFlat>
FASTKD_GLOBAL void direct_rows_kernel(Nodes<T> s, Nodes<T> t, Grid grid, std::int64_t tiles_per_split,
                                      global_ptr<double> partials) {
  FASTKD_SHARED(double, staged, 2 * kNodeTileElements);  // the i tile, then the j tile
  FASTKD_SHARED(double, row_sums, 2 * kDirectSide);      // [column half][row]
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t all_channels = s.map.channels > t.map.channels ? s.map.channels : t.map.channels;
  const std::int64_t i0 = static_cast<std::int64_t>(blockIdx.x) * kDirectSide, split = blockIdx.y, b = blockIdx.z;
  const std::int64_t first = split * tiles_per_split * kDirectSide;
  const std::int64_t last = first + tiles_per_split * kDirectSide < m ? first + tiles_per_split * kDirectSide : m;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, group = lane / 4, in_group = lane % 4;
  const int warp_row = warp / 2 * kWarpSide, warp_col = warp % 2 * kWarpSide;
  double rows[kWarpTiles] = {};  // this lane's columns' share of rows warp_row + 8 i + group
  for (std::int64_t j0 = first; j0 < last; j0 += kDirectSide) {
    const bool products = i0 + warp_row < m && j0 + warp_col < m;
    WarpAccumulators acc;
    form_difference<kFlat>(acc, staged, s, t, grid, b, i0, j0, products, warp_row, warp_col, 0, all_channels);
    for (int i = 0; i < kWarpTiles; ++i) {
      for (int j = 0; j < kWarpTiles; ++j) rows[i] += acc[i][j][0] * acc[i][j][0] + acc[i][j][1] * acc[i][j][1];
    }
  }
  // The 4 lanes of a group hold a row's columns 2 q, 2 q + 1 of every 8: summed by shuffles (one order, and
  // the same sum in each of them).
  for (int i = 0; i < kWarpTiles; ++i) {
    rows[i] += __shfl_xor_sync(0xffffffffu, rows[i], 1);
    rows[i] += __shfl_xor_sync(0xffffffffu, rows[i], 2);
    if (in_group == 0) row_sums[warp % 2 * kDirectSide + warp_row + 8 * i + group] = rows[i];
  }
  __syncthreads();
  const int r = threadIdx.x;
  if (r < kDirectSide && i0 + r < m) {
    partials[(b * gridDim.y + split) * m + i0 + r] = row_sums[r] + row_sums[kDirectSide + r];
  }
}

// The direct difference kernel's shared memory: the node tiles, then its 64 x 64 outputs on their way out: D
// at output_index (rows i), or W transposed at transposed_index (rows j).
constexpr int kTransposedPitch = kDirectSide + 2;
constexpr int kDifferenceElements = kDirectSide * kTransposedPitch;
static_assert(2 * kNodeTileElements <= kDifferenceElements && kDifferenceElements * 8 <= 48 * 1024,
              "the difference kernel's tiles");
static_assert(kAffinityChannelChunk == kApplyChunk, "the difference kernel's channel splits");

// Where W[i][j] of a 64 x 64 tile lies on its way out transposed (rows j, lanes along i): at a pitch of 2
// (mod 16) doubles the fragment stores (a half warp: i = 4 consecutive, j = 2 q + e) hit 16 different bank
// pairs, and a warp reading 32 consecutive i of one row j reads consecutive doubles.
FASTKD_DEVICE inline int transposed_index(int i, int j) { return j * kTransposedPitch + i; }

// Block kApplyThreads (4 warps, 2 x 2, each 32 x 32 in registers), grid (row tiles x column tiles of the slab,
// splits, B): one 64 x 64 tile of the slab of D's rows [first_row, first_row + slab_rows) over the split's
// channels [split n, (split + 1) n) of s and of t (n = channels_per_split, a multiple of kApplyChunk), formed
// as in direct_rows_kernel (form_difference), into partials[b][split] (slab_rows, m); or, given row weights,
// W_ij = 2 (w_i + w_j) D_ij transposed, (m, slab_rows): the operand direct_columns_kernel stages with lanes
// along i. Written through shared memory, lanes along consecutive elements of a row.
template <typename T, bool kFlat>
FASTKD_GLOBAL void direct_difference_kernel(Nodes<T> s, Nodes<T> t, Grid grid, std::int64_t first_row,
                                            std::int64_t slab_rows, std::int64_t channels_per_split,
                                            global_ptr<const double> weight, global_ptr<double> partials) {
  FASTKD_SHARED(double, staged, kDifferenceElements);
  const std::int64_t m = nodes::node_count(grid), column_tiles = (m + kDirectSide - 1) / kDirectSide;
  const std::int64_t tile = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const std::int64_t row0 = tile / column_tiles * kDirectSide, j0 = tile % column_tiles * kDirectSide;
  const std::int64_t i0 = first_row + row0;  // row0: the tile's first row in the slab
  const std::int64_t first = split * channels_per_split, last = first + channels_per_split;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, group = lane / 4, in_group = lane % 4;
  const int warp_row = warp / 2 * kWarpSide, warp_col = warp % 2 * kWarpSide;
  const bool products = i0 + warp_row < m && j0 + warp_col < m;
  WarpAccumulators acc;
  form_difference<kFlat>(acc, staged, s, t, grid, b, i0, j0, products, warp_row, warp_col, first, last);
  // The node tiles' last readers passed form_difference's last barrier: the outputs may overwrite them.
  const std::int64_t rows = slab_rows - row0 < kDirectSide ? slab_rows - row0 : kDirectSide;
  const std::int64_t columns = m - j0 < kDirectSide ? m - j0 : kDirectSide;
  const std::int64_t image = b * gridDim.y + split;
  if (weight == nullptr) {
    stage_outputs(staged, acc, warp_row, warp_col, kDirectSide);
    __syncthreads();
    global_ptr<double> out = partials + (image * slab_rows + row0) * m + j0;
    for (std::int64_t i = warp; i < rows; i += kApplyWarps) {
      for (std::int64_t j = lane; j < columns; j += 32) {
        out[i * m + j] = staged[output_index(static_cast<int>(i), static_cast<int>(j), kDirectSide)];
      }
    }
    return;
  }
  double weight_i[kWarpTiles];
  for (int i = 0; i < kWarpTiles; ++i) {
    const std::int64_t node = i0 + warp_row + 8 * i + group;
    weight_i[i] = node < m ? weight[b * m + node] : 0.0;
  }
  for (int j = 0; j < kWarpTiles; ++j) {
    for (int e = 0; e < 2; ++e) {
      const int column = warp_col + 8 * j + 2 * in_group + e;
      const double weight_j = j0 + column < m ? weight[b * m + j0 + column] : 0.0;
      for (int i = 0; i < kWarpTiles; ++i) {
        staged[transposed_index(warp_row + 8 * i + group, column)] = 2.0 * (weight_i[i] + weight_j) * acc[i][j][e];
      }
    }
  }
  __syncthreads();
  global_ptr<double> out = partials + (image * m + j0) * slab_rows + row0;
  for (std::int64_t j = warp; j < columns; j += kApplyWarps) {
    for (std::int64_t i = lane; i < rows; i += 32) {
      out[j * slab_rows + i] = staged[transposed_index(static_cast<int>(i), static_cast<int>(j))];
    }
  }
}

// The columns kernel's shared memory: the weighted tile W[i][j] (at weighted_index), then a tile of 64 channels
// x kApplyChunk nodes j at kMatrixPitch; its 64 x 64 outputs use the start on their way out, their forms' halves
// the doubles after them.
constexpr int kWeightedElements = kDirectSide * kNodePitch;
constexpr int kColumnTileAt = kWeightedElements;
constexpr int kColumnsElements = kWeightedElements + kDirectSide * kMatrixPitch;
constexpr int kFormSumsAt = kDirectSide * kDirectSide;  // after the outputs: [channel half][node]
static_assert(kFormSumsAt + 2 * kDirectSide <= kColumnsElements && kColumnsElements * 8 <= 48 * 1024,
              "the columns kernel's tiles");

// Where W[i][j] of the block's 64 x 64 tile lies in shared memory: row j, the column i XOR-ed with bit 2 of j.
// The staging stores (lanes along i) are consecutive and the mma B-fragment loads (i = 4 consecutive, j = 4
// consecutive) hit 16 different bank pairs per half warp.
FASTKD_DEVICE inline int weighted_index(int i, int j) { return j * kNodePitch + (i ^ (j & 4)); }

// acc += X[c][j] W[i][j] over the 64 nodes j from j0 for the warp's 32 channels x 32 nodes i of the block's
// 64 channels from c0 and W staged at weighted_index, in FP64 mma products; the nodes are staged kApplyChunk at
// a time ([channel][node], kMatrixPitch). `products`: whether the warp's channels and nodes exist.
template <bool kFlat, typename T, typename Tile>
FASTKD_DEVICE void add_weighted_products(WarpAccumulators& acc, Tile& staged, const Nodes<T>& x, const Grid& grid,
                                         std::int64_t b, std::int64_t c0, std::int64_t j0, bool products,
                                         int warp_row, int warp_col) {
  for (int n0 = 0; n0 < kDirectSide; n0 += kApplyChunk) {
    for (int at = threadIdx.x; at < kDirectSide * kApplyChunk; at += kApplyThreads) {  // lanes along the nodes
      const int c = at / kApplyChunk, n = at % kApplyChunk;
      staged[kColumnTileAt + c * kMatrixPitch + n] = nodes::normalized<kFlat>(x, grid, b, c0 + c, j0 + n0 + n);
    }
    __syncthreads();
    if (products) {
      add_warp_products<kApplyChunk>(
          acc, staged, [&](int c, int k) { return kColumnTileAt + (warp_row + c) * kMatrixPitch + k; },  // X[c][j]
          [&](int i, int k) { return weighted_index(warp_col + i, n0 + k); });                           // W[i][j]
    }
    __syncthreads();  // before the next nodes are staged
  }
}

// Block kApplyThreads (4 warps, 2 x 2, each 32 channels x 32 nodes in registers), grid (channel tiles, row tiles
// of the slab, B): out[b][c][first_row + i] = sign sum_j W_ij x_j[c] for the block's 64 channels c and 64 nodes i
// of the slab, W given transposed (weighted_t (B, m, slab_rows), from direct_difference_kernel), staged a 64 x 64
// tile at a time with lanes along i, the products summed over every node j in registers, then written once
// through shared memory (lanes along i). Only this block writes those entries of out (B, C, m). Unless form ==
// nullptr, also each node's x_hat . out over the block's channels into form[b][blockIdx.x] (B, channel tiles, m),
// summed by the caller in a fixed order.
template <typename T, bool kFlat>
FASTKD_GLOBAL void direct_columns_kernel(Nodes<T> x, Grid grid, global_ptr<const double> weighted_t,
                                         std::int64_t first_row, std::int64_t slab_rows, double sign,
                                         global_ptr<double> out, global_ptr<double> form) {
  FASTKD_SHARED(double, staged, kColumnsElements);
  const std::int64_t m = nodes::node_count(grid), channels = x.map.channels;
  const std::int64_t c0 = static_cast<std::int64_t>(blockIdx.x) * kDirectSide;
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.y) * kDirectSide, b = blockIdx.z;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warp_row = warp / 2 * kWarpSide, warp_col = warp % 2 * kWarpSide;
  const std::int64_t rows = slab_rows - row0 < kDirectSide ? slab_rows - row0 : kDirectSide;
  const bool products = c0 + warp_row < channels && warp_col < rows;  // the same for the warp's lanes
  WarpAccumulators acc = {};
  for (std::int64_t j0 = 0; j0 < m; j0 += kDirectSide) {
    for (int at = threadIdx.x; at < kDirectSide * kDirectSide; at += kApplyThreads) {  // lanes along i
      const int i = at % kDirectSide, j = at / kDirectSide;
      staged[weighted_index(i, j)] = i < rows && j0 + j < m ? weighted_t[(b * m + j0 + j) * slab_rows + row0 + i] : 0.0;
    }
    // add_weighted_products' first barrier orders these stores before its products read them.
    add_weighted_products<kFlat>(acc, staged, x, grid, b, c0, j0, products, warp_row, warp_col);
  }
  stage_outputs(staged, acc, warp_row, warp_col, kDirectSide);  // W's last readers passed the last barrier
  __syncthreads();
  const std::int64_t last_channel = channels - c0 < kDirectSide ? channels - c0 : kDirectSide;
  for (std::int64_t c = warp; c < last_channel; c += kApplyWarps) {
    for (std::int64_t i = lane; i < rows; i += 32) {
      out[(b * channels + c0 + c) * m + first_row + row0 + i] =
          sign * staged[output_index(static_cast<int>(c), static_cast<int>(i), kDirectSide)];
    }
  }
  if (form == nullptr) return;
  // A thread per node and channel half, its 32 channels in order, the halves then added in order.
  const int node = threadIdx.x % kDirectSide, half = threadIdx.x / kDirectSide;
  double sum = 0.0;
  for (int c = 32 * half; c < 32 * half + 32; ++c) {
    sum += nodes::normalized<kFlat>(x, grid, b, c0 + c, first_row + row0 + node) *
           staged[output_index(c, node, kDirectSide)];
  }
  staged[kFormSumsAt + half * kDirectSide + node] = sum;
  __syncthreads();
  if (threadIdx.x < kDirectSide && threadIdx.x < rows) {
    form[(b * gridDim.x + blockIdx.x) * m + first_row + row0 + threadIdx.x] =
        sign * (staged[kFormSumsAt + threadIdx.x] + staged[kFormSumsAt + kDirectSide + threadIdx.x]);
  }
}

std::int64_t gram_tiles_for(std::int64_t channels) { return (channels + kGramSide - 1) / kGramSide; }
std::int64_t direct_tiles_for(std::int64_t nodes) { return (nodes + kDirectSide - 1) / kDirectSide; }

// Whether both operands take the flat path (one pixel a node, rows back to back; nodes_math.cuh).
template <typename T>
bool flat(const Nodes<T>& x, const Nodes<T>& y, const Grid& grid) {
  return nodes::flat_pixels(x.map, grid) && nodes::flat_pixels(y.map, grid);
}

}  // namespace

// Launches kernel<T, true> (the flat variant) where `is_flat`, else kernel<T, false>.
#define FASTKD_LAUNCH_FLAT_OR_GENERAL(kernel, is_flat, ...) \
  do {                                                     \
    if (is_flat) {                                         \
      FASTKD_LAUNCH((kernel<T, true>), __VA_ARGS__);       \
    } else {                                               \
      FASTKD_LAUNCH((kernel<T, false>), __VA_ARGS__);      \
    }                                                      \
  } while (0)

template <typename T>
void affinity_full_gram(const nodes::Nodes<T>& x, const nodes::Nodes<T>& y, const nodes::Grid& grid,
                        const double* weight, std::int64_t batch, std::int64_t splits, std::int64_t nodes_per_split,
                        double* partials, fastkd_stream_t stream) {
  const std::int64_t tiles = gram_tiles_for(x.map.channels) * gram_tiles_for(y.map.channels);
  if (tiles == 0 || batch == 0 || splits == 0) return;
  const LaunchExtent blocks(tiles, splits, batch);
  FASTKD_LAUNCH_FLAT_OR_GENERAL(gram_kernel, flat(x, y, grid), blocks, dim3(kGramThreads), stream, x, y, grid, weight,
                                nodes_per_split, partials);
}

template <typename T>
void affinity_full_apply(const nodes::Nodes<T>& p, const nodes::Nodes<T>& q, const nodes::Grid& grid,
                         const double* a1, const double* b1, const double* a2, const double* b2,
                         const double* weight, std::int64_t batch, double* out, double* form, double* dot_a,
                         double* dot_b, fastkd_stream_t stream) {
  if ((out == nullptr) == (dot_a == nullptr) || (dot_a != nullptr && (dot_b == nullptr || a2 != nullptr)) ||
      (form != nullptr && out == nullptr)) {
    throw std::invalid_argument("affinity_full_apply: either out (and form), or dot_a and dot_b without a2");
  }
  const std::int64_t node_tiles = (nodes::node_count(grid) + kApplyNodes - 1) / kApplyNodes;
  const std::int64_t row_groups = dot_a != nullptr ? 1 : (p.map.channels + kApplyRows - 1) / kApplyRows;
  if (node_tiles == 0 || row_groups == 0 || batch == 0) return;
  const LaunchExtent blocks(node_tiles, row_groups, batch);
  FASTKD_LAUNCH_FLAT_OR_GENERAL(apply_kernel, flat(p, q, grid), blocks, dim3(kApplyThreads), stream, p, q, grid, a1,
                                b1, a2, b2, weight, out, form, dot_a, dot_b);
}

template <typename T>
void affinity_full_direct_rows(const nodes::Nodes<T>& s, const nodes::Nodes<T>& t, const nodes::Grid& grid,
                               std::int64_t batch, std::int64_t splits, std::int64_t tiles_per_split,
                               double* partials, fastkd_stream_t stream) {
  const std::int64_t row_tiles = direct_tiles_for(nodes::node_count(grid));
  if (row_tiles == 0 || batch == 0 || splits == 0) return;
  const LaunchExtent blocks(row_tiles, splits, batch);
  FASTKD_LAUNCH_FLAT_OR_GENERAL(direct_rows_kernel, flat(s, t, grid), blocks, dim3(kApplyThreads), stream, s, t, grid,
                                tiles_per_split, partials);
}

template <typename T>
void affinity_full_direct_difference(const nodes::Nodes<T>& s, const nodes::Nodes<T>& t, const nodes::Grid& grid,
                                     std::int64_t batch, std::int64_t first_row, std::int64_t slab_rows,
                                     std::int64_t splits, std::int64_t channels_per_split, const double* weight,
                                     double* partials, fastkd_stream_t stream) {
  const std::int64_t m = nodes::node_count(grid);
  if (channels_per_split % kApplyChunk != 0 || first_row < 0 || slab_rows < 0 || first_row + slab_rows > m) {
    throw std::invalid_argument(
        "affinity_full_direct_difference: channels_per_split must be a multiple of kAffinityChannelChunk, and the "
        "slab's rows within the nodes");
  }
  const std::int64_t tiles = direct_tiles_for(slab_rows) * direct_tiles_for(m);
  if (tiles == 0 || batch == 0 || splits == 0) return;
  const LaunchExtent blocks(tiles, splits, batch);
  FASTKD_LAUNCH_FLAT_OR_GENERAL(direct_difference_kernel, flat(s, t, grid), blocks, dim3(kApplyThreads), stream, s,
                                t, grid, first_row, slab_rows, channels_per_split, weight, partials);
}

template <typename T>
void affinity_full_direct_columns(const nodes::Nodes<T>& x, const nodes::Grid& grid, const double* weighted_t,
                                  std::int64_t batch, std::int64_t first_row, std::int64_t slab_rows, double sign,
                                  double* out, double* form, fastkd_stream_t stream) {
  if (first_row < 0 || slab_rows < 0 || first_row + slab_rows > nodes::node_count(grid)) {
    throw std::invalid_argument("affinity_full_direct_columns: the slab's rows must lie within the nodes");
  }
  const std::int64_t channel_tiles = direct_tiles_for(x.map.channels), row_tiles = direct_tiles_for(slab_rows);
  if (channel_tiles == 0 || row_tiles == 0 || batch == 0) return;
  const LaunchExtent blocks(channel_tiles, row_tiles, batch);
  FASTKD_LAUNCH_FLAT_OR_GENERAL(direct_columns_kernel, flat(x, x, grid), blocks, dim3(kApplyThreads), stream, x,
                                grid, weighted_t, first_row, slab_rows, sign, out, form);
}

#undef FASTKD_LAUNCH_FLAT_OR_GENERAL

#define FASTKD_INSTANTIATE(T)                                                                                      \
  template void affinity_full_gram<T>(const nodes::Nodes<T>&, const nodes::Nodes<T>&, const nodes::Grid&,          \
                                      const double*, std::int64_t, std::int64_t, std::int64_t, double*,            \
                                      fastkd_stream_t);                                                            \
  template void affinity_full_apply<T>(const nodes::Nodes<T>&, const nodes::Nodes<T>&, const nodes::Grid&,         \
                                       const double*, const double*, const double*, const double*, const double*,  \
                                       std::int64_t, double*, double*, double*, double*, fastkd_stream_t);         \
  template void affinity_full_direct_rows<T>(const nodes::Nodes<T>&, const nodes::Nodes<T>&, const nodes::Grid&,   \
                                             std::int64_t, std::int64_t, std::int64_t, double*, fastkd_stream_t);  \
  template void affinity_full_direct_difference<T>(const nodes::Nodes<T>&, const nodes::Nodes<T>&,                 \
                                                   const nodes::Grid&, std::int64_t, std::int64_t, std::int64_t,   \
                                                   std::int64_t, std::int64_t, const double*, double*,             \
                                                   fastkd_stream_t);                                               \
  template void affinity_full_direct_columns<T>(const nodes::Nodes<T>&, const nodes::Grid&, const double*,         \
                                                std::int64_t, std::int64_t, std::int64_t, double, double*,         \
                                                double*, fastkd_stream_t);
FASTKD_FOR_EACH_STORAGE_TYPE(FASTKD_INSTANTIATE)
#undef FASTKD_INSTANTIATE

}  // namespace FASTKD_KERNELS
}  // namespace fastkd
