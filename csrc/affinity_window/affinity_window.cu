// CUDA kernels of the windowed pair-wise affinity loss (Liu et al. 2020, eq. 2; FORMULAS.md section 1) and
// their launchers (compile with nvcc alone; the emulator runs this same file on the CPU through
// affinity_window_emulated.cpp). The window math is in affinity_window_math.cuh, the node math in
// nodes_math.cuh.
//
// Windows of reach 1 or 2 (along both grid axes) run tiled kernels: a block owns kTileRows x kTileCols nodes
// of one image, a thread per node, and stages those nodes and their halo (the window's reach around them),
// pooled in double, kChunk channels at a time in shared memory; every node is read from global memory once
// per block that stages it (1.4-1.7 times, with the halo) instead of once per window offset.
//   window_tile_forward_kernel   per node, the raw dots f_i . f_j over the stored half of the window and, from
//                                the staged values, the norms of the tile and its halo (one pass over each
//                                input, no norm pass ahead); D = a_s - a_t and a_t from them, written to the
//                                (B, half, m) maps, and the block's sum of D^2 (the mirrored ones twice) as
//                                one partial
//   window_tile_backward_kernel  per node and kGradientChannels channels, dL/dx in one pass: dL/df_hat from
//                                the 25 (or 9) weights D_ij / (||f_j|| + eps) in registers and the staged f_j,
//                                the norm's share from D and x's affinities (no pass over the channels), then
//                                the pooling backward, writing the node's pixels (no dL/df_hat buffer)
// Other windows (reach 0, reach above 2, or a grid so thin that the reaches differ) run one thread per node,
// pooling on the fly, after the norms (node_norms, common/nodes.cu): affinity_window_forward_kernel over the
// stored half (the diagonal, then one offset of each mirrored pair), affinity_window_gradient_kernel over the
// whole window, per (node, channel), into a (B, C, m) dL/df_hat workspace, then the shared launcher
// node_backward (the normalisation, one thread a node for the norm's share, and the pooling, one thread a
// channel of a node, writing its own patch's pixels). Block sums are in a fixed order (warp shuffles, then
// shared memory), the glue sums the partials in a fixed order; every output element is written by one
// thread: no atomics, the same result on every run.
#include "affinity_window.h"
#include "affinity_window_math.cuh"
#include "../common/block_sum.cuh"
#include "../common/nodes.h"
#include "../common/nodes_math.cuh"

namespace fastkd {
namespace FASTKD_KERNELS {
namespace {

constexpr int kThreads = 256;

using affinity_window::Grid;
using nodes::Map;

FASTKD_DEVICE std::int64_t thread_index() {
  return static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

template <typename T>
FASTKD_GLOBAL void affinity_window_forward_kernel(global_ptr<const T> s, Map s_map, global_ptr<const double> s_norms,
                                                  global_ptr<const T> t, Map t_map, global_ptr<const double> t_norms,
                                                  Grid grid, std::int64_t batch, double eps,
                                                  global_ptr<double> difference,
                                                  global_ptr<double> teacher_affinity, global_ptr<double> partials) {
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t index = thread_index();
  double squares = 0.0;
  if (index < batch * m) {
    squares = affinity_window::half_window_row(s, s_map, s_norms, t, t_map, t_norms, grid, index / m, index % m, eps,
                                               difference, teacher_affinity);
  }
  squares = block_sum<kThreads>(squares);  // in a fixed order
  if (threadIdx.x == 0) partials[blockIdx.x] = squares;
}

// grad_hat[b, c, i] = 4 sign grad sum_{j in window(i)} D_ij f_hat_j[c]: d total / d f_hat_i collects
// 2 D_ij f_hat_j from each of the terms (i, j) and (j, i), and 2 D_ii 2 f_hat_i from the diagonal.
template <typename T>
FASTKD_GLOBAL void affinity_window_gradient_kernel(global_ptr<const T> x, Map map, global_ptr<const double> norms,
                                                   global_ptr<const double> difference, Grid grid, std::int64_t batch,
                                                   double eps, global_ptr<const double> grad_total, double sign,
                                                   global_ptr<double> grad_hat) {
  const std::int64_t m = nodes::node_count(grid), half = affinity_window::half_window(grid);
  const std::int64_t per_image = map.channels * m, index = thread_index();
  if (index >= batch * per_image) return;
  const std::int64_t b = index / per_image, c = index % per_image / m, i = index % m;
  grad_hat[index] = 4.0 * sign * grad_total[0] *
                    affinity_window::window_gradient(x, map, norms + b * m, difference + b * half * m, grid, b, c, i,
                                                     eps);
}

// ------------------------------------------------------------------------------------------ tiled kernels

constexpr int kTileRows = 8, kTileCols = 32, kTileThreads = kTileRows * kTileCols;
constexpr int kChunk = 8;              // channels staged at a time
constexpr int kGradientChannels = 64;  // channels a block of the gradient kernel

FASTKD_HOST_DEVICE constexpr int halo_cols(int reach) { return kTileCols + 2 * reach; }
// Halo nodes: the forward's stored half only reaches down (dy >= 0), the gradient's whole window both ways.
FASTKD_HOST_DEVICE constexpr int forward_halo(int reach) { return (kTileRows + reach) * halo_cols(reach); }
FASTKD_HOST_DEVICE constexpr int gradient_halo(int reach) { return (kTileRows + 2 * reach) * halo_cols(reach); }
FASTKD_HOST_DEVICE constexpr int halo_slots(int halo) { return (halo + kTileThreads - 1) / kTileThreads; }
FASTKD_HOST_DEVICE constexpr int stored_offsets(int reach) { return reach * (2 * reach + 1) + reach + 1; }
FASTKD_HOST_DEVICE constexpr int window_offsets(int reach) { return (2 * reach + 1) * (2 * reach + 1); }

// Offset k of the stored half, in half_index's order: (0, 0), (0, 1) .. (0, reach), then the rows dy = 1 ..
// reach from dx = -reach to reach.
FASTKD_HOST_DEVICE constexpr int stored_dy(int reach, int k) {
  return k <= reach ? 0 : 1 + (k - reach - 1) / (2 * reach + 1);
}
FASTKD_HOST_DEVICE constexpr int stored_dx(int reach, int k) {
  return k <= reach ? k : (k - reach - 1) % (2 * reach + 1) - reach;
}

// Whether a window runs the tiled kernels, and with which reach (0: the per-node kernels).
FASTKD_HOST_DEVICE inline int tiled_reach(const Grid& grid) {
  return grid.reach_h == grid.reach_w && (grid.reach_h == 1 || grid.reach_h == 2) ? static_cast<int>(grid.reach_h)
                                                                                  : 0;
}

// Blocks an SM the tiled kernels' registers are capped for (128 a thread for 2). Where the cap of 2 spilled,
// they keep 1 (up to 255 registers): double inputs, whose loads in flight take twice the registers (32-112
// bytes spilled), and the backward of reach 2 with its 25 weights (32-56 bytes). With 1 block, 8 warps an SM
// still keep each thread's staging loads (2 halo nodes x 8 channels x the patch) in flight together.
template <typename T>
FASTKD_HOST_DEVICE constexpr int tile_blocks_per_sm(bool heavy) {
  return sizeof(T) > 4 || heavy ? 1 : 2;
}

struct Tile {
  std::int64_t row0, col0;  // the first node row and column of the block's nodes
};

FASTKD_HOST_DEVICE inline std::int64_t tiles_per_image(const Grid& grid) {
  return (grid.grid_h + kTileRows - 1) / kTileRows * ((grid.grid_w + kTileCols - 1) / kTileCols);
}

FASTKD_DEVICE Tile tile_of(const Grid& grid, std::int64_t tile) {
  const std::int64_t tiles_w = (grid.grid_w + kTileCols - 1) / kTileCols;
  return {tile / tiles_w * kTileRows, tile % tiles_w * kTileCols};
}

// The node at halo position n (halo_cols(kReach) a row, from node row tile.row0 - top and column tile.col0 -
// kReach), or -1 outside the grid.
template <int kReach>
FASTKD_DEVICE std::int64_t halo_index(const Grid& grid, const Tile& tile, int n, int top) {
  const std::int64_t row = tile.row0 - top + n / halo_cols(kReach), col = tile.col0 - kReach + n % halo_cols(kReach);
  return affinity_window::on_grid(grid, row, col) ? row * grid.grid_w + col : -1;
}

// One halo node a thread stages: where its patch starts (channel 0 of image b), the patch's size (0 x 0
// outside the grid) and 1 / (pixel count) for an average. (nodes::NodeAt locates a full-graph node with its
// norm's scale; this one has no scale yet, and its offset and int sizes take 6 registers a slot against
// NodeAt's 11: the tiled kernels' register caps hold 2-3 slots a thread.)
struct HaloNode {
  std::int64_t origin;
  int rows, cols;
  double inverse_count;
};

FASTKD_DEVICE HaloNode halo_node(const Map& map, const Grid& grid, std::int64_t b, std::int64_t node) {
  HaloNode at{};
  if (node >= 0) {
    const nodes::Patch patch = nodes::patch_of(map, grid, node);
    at.origin = nodes::patch_origin(map, patch, b, 0);
    at.rows = static_cast<int>(patch.rows);
    at.cols = static_cast<int>(patch.cols);
    at.inverse_count = 1.0 / static_cast<double>(patch.rows * patch.cols);
  }
  return at;
}

// The pooled channel c of a staged halo node (0 outside the grid or at c >= `channels`).
template <typename T>
FASTKD_DEVICE double halo_value(global_ptr<const T> x, const Map& map, const Grid& grid, const HaloNode& at,
                                std::int64_t c, std::int64_t channels) {
  if (at.rows == 0 || c >= channels) return 0.0;
  const nodes::Patch patch{0, 0, at.rows, at.cols};
  const global_ptr<const T> origin = x + at.origin + c * map.stride_c;
  return grid.max_pool ? nodes::pool(origin, map, patch, true) : nodes::patch_sum(origin, map, patch) *
                                                                     at.inverse_count;
}

// Thread t stages halo positions t + k kTileThreads of channels [c0, c0 + kChunk) into staged[c * kHalo + n],
// adding each value's square to squares[k] where `squares` is given.
template <int kHalo, typename T, typename Staged>
FASTKD_DEVICE void stage_halo(Staged& staged, global_ptr<const T> x, const Map& map, const Grid& grid,
                              const HaloNode (&halo)[halo_slots(kHalo)], std::int64_t c0,
                              std::int64_t channels, double* squares) {
  FASTKD_UNROLL
  for (int k = 0; k < halo_slots(kHalo); ++k) {
    const int n = static_cast<int>(threadIdx.x) + k * kTileThreads;
    if (n >= kHalo) break;
    for (int cc = 0; cc < kChunk; ++cc) {
      const double f = halo_value(x, map, grid, halo[k], c0 + cc, channels);
      staged[cc * kHalo + n] = f;
      if (squares != nullptr) squares[k] += f * f;
    }
  }
}

// dots += the raw dots f_i . f_j of this thread's node (staged at `own`) with its stored-half partners, over all
// channels of x; on return scales[n] = 1 / (||f|| + eps) of every halo node n (0 outside the grid) and
// norms (B, m) holds ||f|| of the block's own nodes.
template <int kReach, typename T, typename Staged, typename Scales>
FASTKD_DEVICE void half_window_dots(Staged& staged, Scales& scales, global_ptr<const T> x, const Map& map,
                                    const Grid& grid, const Tile& tile, std::int64_t b, double eps, int own,
                                    double (&dots)[stored_offsets(kReach)], global_ptr<double> norms) {
  constexpr int kHalo = forward_halo(kReach), kSlots = halo_slots(kHalo);
  HaloNode halo[kSlots];
  double squares[kSlots] = {};
  FASTKD_UNROLL
  for (int k = 0; k < kSlots; ++k) {
    halo[k] = halo_node(map, grid, b, halo_index<kReach>(grid, tile, threadIdx.x + k * kTileThreads, 0));
  }
  for (std::int64_t c0 = 0; c0 < map.channels; c0 += kChunk) {
    stage_halo<kHalo>(staged, x, map, grid, halo, c0, map.channels, squares);
    __syncthreads();
    FASTKD_UNROLL
    for (int cc = 0; cc < kChunk; ++cc) {
      const double f = staged[cc * kHalo + own];
      FASTKD_UNROLL
      for (int k = 0; k < stored_offsets(kReach); ++k) {
        dots[k] += f * staged[cc * kHalo + own + stored_dy(kReach, k) * halo_cols(kReach) + stored_dx(kReach, k)];
      }
    }
    __syncthreads();  // before the next chunk is staged
  }
  const std::int64_t m = nodes::node_count(grid);
  FASTKD_UNROLL
  for (int k = 0; k < kSlots; ++k) {
    const int n = static_cast<int>(threadIdx.x) + k * kTileThreads;
    if (n >= kHalo) break;
    const double norm = sqrt(squares[k]);
    const std::int64_t node = halo_index<kReach>(grid, tile, n, 0);
    scales[n] = node >= 0 ? 1.0 / (norm + eps) : 0.0;
    const int row = n / halo_cols(kReach), col = n % halo_cols(kReach) - kReach;
    if (node >= 0 && row < kTileRows && col >= 0 && col < kTileCols) norms[b * m + node] = norm;
  }
}

// Whether the partner of node (row, col) at stored offset k lies on the grid.
template <int kReach>
FASTKD_DEVICE bool has_partner(const Grid& grid, std::int64_t row, std::int64_t col, int k) {
  return affinity_window::on_grid(grid, row + stored_dy(kReach, k), col + stored_dx(kReach, k));
}

// Block kTileThreads, one block per tile of kTileRows x kTileCols nodes of one image (grid: tiles x B). s's
// affinities a_s wait in `difference` while t's dots are summed (13 doubles fewer in registers: without it, 168
// registers a thread and 1 block an SM).
template <int kReach, typename T>
FASTKD_GLOBAL void FASTKD_LAUNCH_BOUNDS(kTileThreads, tile_blocks_per_sm<T>(false))
    window_tile_forward_kernel(global_ptr<const T> s, Map s_map, global_ptr<const T> t, Map t_map, Grid grid,
                               double eps, global_ptr<double> s_norms, global_ptr<double> t_norms,
                               global_ptr<double> difference, global_ptr<double> teacher_affinity,
                               global_ptr<double> partials) {
  constexpr int kHalo = forward_halo(kReach), kOffsets = stored_offsets(kReach);
  FASTKD_SHARED(double, staged, kChunk * kHalo);
  FASTKD_SHARED(double, scales, kHalo);
  const std::int64_t tiles = tiles_per_image(grid), b = blockIdx.x / tiles;
  const Tile tile = tile_of(grid, blockIdx.x % tiles);
  const int tx = threadIdx.x % kTileCols, ty = threadIdx.x / kTileCols;
  const int own = ty * halo_cols(kReach) + tx + kReach;
  const std::int64_t m = nodes::node_count(grid), half = affinity_window::half_window(grid);
  const std::int64_t row = tile.row0 + ty, col = tile.col0 + tx;
  const bool active = row < grid.grid_h && col < grid.grid_w;
  const std::int64_t own_first = b * half * m + row * grid.grid_w + col;  // offset 0 of the node
  const global_ptr<double> own_difference = difference + own_first, own_teacher_affinity = teacher_affinity + own_first;
  double dots[kOffsets] = {};
  half_window_dots<kReach>(staged, scales, s, s_map, grid, tile, b, eps, own, dots, s_norms);
  __syncthreads();  // every halo node's scales
  if (active) {
    FASTKD_UNROLL
    for (int k = 0; k < kOffsets; ++k) {
      // Every lane reads the scales (a partner off the grid has a staged scale of 0): whole-warp requests.
      const double a_s = dots[k] * scales[own] * scales[own + stored_dy(kReach, k) * halo_cols(kReach) +
                                                        stored_dx(kReach, k)];
      own_difference[k * m] = has_partner<kReach>(grid, row, col, k) ? a_s : 0.0;
      dots[k] = 0.0;
    }
  }
  __syncthreads();  // before t's scales overwrite s's
  half_window_dots<kReach>(staged, scales, t, t_map, grid, tile, b, eps, own, dots, t_norms);
  __syncthreads();
  double squares = 0.0;
  if (active) {
    FASTKD_UNROLL
    for (int k = 0; k < kOffsets; ++k) {
      const double a_t = dots[k] * scales[own] * scales[own + stored_dy(kReach, k) * halo_cols(kReach) +
                                                        stored_dx(kReach, k)];
      // 0 where the partner is missing: no term, and a NaN node must not pass.
      const bool inside = has_partner<kReach>(grid, row, col, k);
      const double d = inside ? static_cast<double>(own_difference[k * m]) - a_t : 0.0;
      own_difference[k * m] = d;
      own_teacher_affinity[k * m] = inside ? a_t : 0.0;
      squares += (k == 0 ? 1.0 : 2.0) * d * d;
    }
  }
  squares = block_sum<kTileThreads>(squares);  // in a fixed order
  if (threadIdx.x == 0) partials[blockIdx.x] = squares;
}

// Block kTileThreads, one block per (tile, group of kGradientChannels channels, image) (grid: their product):
// dL/dx for the pixels of the group's channels of the tile's nodes, in one pass. With g = dL/df_hat_i =
// 4 sign grad sum_{j in window(i)} D_ij f_hat_j (from the staged f_j) and k = 1 / (||f_i|| + eps),
// dL/df_i = k g - radial f_i, and radial = k^2 (f_i . g) / ||f_i|| (nodes::radial_term) needs no pass over the
// channels: f_i . g = 4 sign grad sum_j D_ij a_ij / k, from the forward's D and x's affinities a (a_t, or
// D + a_t for the student). Then the pooling backward (nodes::unpool) writes the node's pixels.
template <int kReach, typename T>
FASTKD_GLOBAL void FASTKD_LAUNCH_BOUNDS(kTileThreads, tile_blocks_per_sm<T>(kReach == 2))
    window_tile_backward_kernel(global_ptr<const T> x, Map map, global_ptr<const double> norms,
                                global_ptr<const double> difference, global_ptr<const double> teacher_affinity,
                                Grid grid, double eps, bool detach_norm, global_ptr<const double> grad_total,
                                double sign, global_ptr<T> grad, Map grad_map) {
  constexpr int kHalo = gradient_halo(kReach), kSlots = halo_slots(kHalo), kOffsets = window_offsets(kReach);
  constexpr int kSide = 2 * kReach + 1;
  FASTKD_SHARED(double, staged, kChunk * kHalo);
  FASTKD_SHARED(double, scales, kHalo);
  const std::int64_t tiles = tiles_per_image(grid), groups = (map.channels + kGradientChannels - 1) / kGradientChannels;
  const Tile tile = tile_of(grid, blockIdx.x % tiles);
  const std::int64_t group = blockIdx.x / tiles % groups, b = blockIdx.x / tiles / groups;
  const std::int64_t m = nodes::node_count(grid), half = affinity_window::half_window(grid);
  HaloNode halo[kSlots];
  FASTKD_UNROLL
  for (int k = 0; k < kSlots; ++k) {
    const int n = static_cast<int>(threadIdx.x) + k * kTileThreads;
    const std::int64_t node = halo_index<kReach>(grid, tile, n, kReach);
    halo[k] = halo_node(map, grid, b, node);
    if (n < kHalo) scales[n] = node >= 0 ? 1.0 / (norms[b * m + node] + eps) : 0.0;
  }
  __syncthreads();
  const int tx = threadIdx.x % kTileCols, ty = threadIdx.x / kTileCols;
  const int own = (ty + kReach) * halo_cols(kReach) + tx + kReach;
  const std::int64_t row = tile.row0 + ty, col = tile.col0 + tx;
  const bool active = row < grid.grid_h && col < grid.grid_w;
  const std::int64_t i = row * grid.grid_w + col;
  const double factor = 4.0 * sign * grad_total[0], scale = scales[own];
  // weights[k] = 4 sign grad D_ij k / (||f_j|| + eps) for the window's offset k = (dy + reach) kSide + dx +
  // reach, with k = 1 / (||f_i|| + eps). D_ij of an offset outside the stored half was stored at the partner j
  // under the mirrored offset (D_ji = D_ij), and so was a_ij.
  double weights[kOffsets];
  double radial_sum = 0.0;  // sum_j D_ij a_ij
  FASTKD_UNROLL
  for (int k = 0; k < kOffsets; ++k) {
    const int dy = k / kSide - kReach, dx = k % kSide - kReach;
    const bool inside = active && affinity_window::on_grid(grid, row + dy, col + dx);
    double d = 0.0, a = 0.0;
    if (inside) {
      const std::int64_t at = affinity_window::in_stored_half(dy, dx)
                                  ? (b * half + affinity_window::half_index(grid, dy, dx)) * m + i
                                  : (b * half + affinity_window::half_index(grid, -dy, -dx)) * m + i +
                                        dy * grid.grid_w + dx;
      d = difference[at];
      a = sign > 0 ? d + static_cast<double>(teacher_affinity[at]) : static_cast<double>(teacher_affinity[at]);
    }
    weights[k] = factor * scale * d * scales[own + dy * halo_cols(kReach) + dx];
    radial_sum += d * a;
  }
  const double norm = active ? static_cast<double>(norms[b * m + i]) : 0.0;
  const double radial = detach_norm || !(norm > 0) ? 0.0 : factor * scale * radial_sum / norm;
  // The own node's patch, in x (HaloNode's origin) and in grad.
  const HaloNode at = halo_node(map, grid, b, active ? i : -1);
  const nodes::Patch patch{0, 0, at.rows, at.cols};
  const std::int64_t grad_origin =
      active ? nodes::patch_origin(grad_map, nodes::Patch{row * grid.kernel_h, col * grid.kernel_w, 0, 0}, b, 0) : 0;
  const std::int64_t c_first = group * kGradientChannels;
  const std::int64_t c_end = c_first + kGradientChannels < map.channels ? c_first + kGradientChannels : map.channels;
  for (std::int64_t c0 = c_first; c0 < c_end; c0 += kChunk) {
    stage_halo<kHalo>(staged, x, map, grid, halo, c0, c_end, nullptr);
    __syncthreads();
    for (int cc = 0; cc < kChunk; ++cc) {
      double sum = 0.0;
      FASTKD_UNROLL
      for (int k = 0; k < kOffsets; ++k) {
        sum += weights[k] * staged[cc * kHalo + own + (k / kSide - kReach) * halo_cols(kReach) + k % kSide - kReach];
      }
      const std::int64_t c = c0 + cc;
      if (!active || c >= c_end) continue;
      const double grad_pooled = sum - radial * staged[cc * kHalo + own];  // k g - radial f_i
      nodes::unpool(x + at.origin + c * map.stride_c, map, patch, grid.max_pool, grad_pooled, at.inverse_count,
                    grad + grad_origin + c * grad_map.stride_c, grad_map);
    }
    __syncthreads();  // before the next chunk is staged
  }
}

std::int64_t blocks_for(std::int64_t items) { return (items + kThreads - 1) / kThreads; }

}  // namespace

bool affinity_window_tiled(const Grid& grid) { return tiled_reach(grid) > 0; }

std::int64_t affinity_window_partial_count(std::int64_t batch, const Grid& grid) {
  return affinity_window_tiled(grid) ? batch * tiles_per_image(grid) : blocks_for(batch * nodes::node_count(grid));
}

template <typename T>
void affinity_window_forward(const T* s, const Map& s_map, const T* t, const Map& t_map, const Grid& grid,
                             std::int64_t batch, double eps, double* s_norms, double* t_norms, double* difference,
                             double* teacher_affinity, double* partials, fastkd_stream_t stream) {
  const std::int64_t blocks = affinity_window_partial_count(batch, grid);
  switch (tiled_reach(grid)) {
    case 1:
      FASTKD_LAUNCH((window_tile_forward_kernel<1, T>), LaunchExtent(blocks), dim3(kTileThreads), stream, s, s_map, t,
                    t_map, grid, eps, s_norms, t_norms, difference, teacher_affinity, partials);
      return;
    case 2:
      FASTKD_LAUNCH((window_tile_forward_kernel<2, T>), LaunchExtent(blocks), dim3(kTileThreads), stream, s, s_map, t,
                    t_map, grid, eps, s_norms, t_norms, difference, teacher_affinity, partials);
      return;
    default:
      node_norms(s, s_map, grid, batch, s_norms, stream);
      node_norms(t, t_map, grid, batch, t_norms, stream);
      FASTKD_LAUNCH(affinity_window_forward_kernel<T>, LaunchExtent(blocks), dim3(kThreads), stream, s, s_map,
                    s_norms, t, t_map, t_norms, grid, batch, eps, difference, teacher_affinity, partials);
  }
}

template <typename T>
void affinity_window_backward(const T* x, const Map& map, const double* norms, const double* difference,
                              const double* teacher_affinity, const Grid& grid, std::int64_t batch, double eps,
                              bool detach_norm, const double* grad_total, double sign, double* grad_hat,
                              double* radial, T* grad, const Map& grad_map, fastkd_stream_t stream) {
  const std::int64_t tile_blocks =
      batch * tiles_per_image(grid) * ((map.channels + kGradientChannels - 1) / kGradientChannels);
  switch (tiled_reach(grid)) {
    case 1:
      FASTKD_LAUNCH((window_tile_backward_kernel<1, T>), LaunchExtent(tile_blocks), dim3(kTileThreads), stream, x, map,
                    norms, difference, teacher_affinity, grid, eps, detach_norm, grad_total, sign, grad, grad_map);
      return;
    case 2:
      FASTKD_LAUNCH((window_tile_backward_kernel<2, T>), LaunchExtent(tile_blocks), dim3(kTileThreads), stream, x, map,
                    norms, difference, teacher_affinity, grid, eps, detach_norm, grad_total, sign, grad, grad_map);
      return;
    default:
      FASTKD_LAUNCH(affinity_window_gradient_kernel<T>,
                    LaunchExtent(blocks_for(batch * map.channels * nodes::node_count(grid))), dim3(kThreads), stream,
                    x, map, norms, difference, grid, batch, eps, grad_total, sign, grad_hat);
      node_backward(grad_hat, x, map, nullptr, norms, grid, eps, detach_norm, batch, radial, false, grad, grad_map,
                    stream);
  }
}

#define FASTKD_INSTANTIATE(T)                                                                                      \
  template void affinity_window_forward<T>(const T*, const Map&, const T*, const Map&, const Grid&, std::int64_t, \
                                           double, double*, double*, double*, double*, double*, fastkd_stream_t);  \
  template void affinity_window_backward<T>(const T*, const Map&, const double*, const double*, const double*,    \
                                            const Grid&, std::int64_t, double, bool, const double*, double,        \
                                            double*, double*, T*, const Map&, fastkd_stream_t);
FASTKD_FOR_EACH_STORAGE_TYPE(FASTKD_INSTANTIATE)
#undef FASTKD_INSTANTIATE

}  // namespace FASTKD_KERNELS
}  // namespace fastkd
