// CUDA kernels of the graph nodes both affinity ops share, and their launchers (compile with nvcc alone; the
// emulator runs this same file on the CPU through nodes_emulated.cpp). The per-node math is nodes_math.cuh.
//
//   node_norm_kernel       one thread per node: ||f_i||, pooling on the fly
//   node_norm_split_kernel the same for few nodes (below kFewNodes), a block per 32 nodes: lanes along the
//                          nodes (coalesced), warp w summing the channels w, w + kChannelGroups, .., and warp 0
//                          adding the warps' sums in a fixed order
//   pool_nodes_kernel      one thread per channel of a node: its pooled feature (the threads of a warp take
//                          consecutive nodes of one channel: coalesced stores, and loads whose sectors the
//                          next pixels of the patches reuse)
//   pool_nodes_warp_kernel the same for wide patches (kWidePatch), a warp per channel of a node: lanes along
//                          the patch's rows (coalesced loads), their sums or maxima combined by shuffles in a
//                          fixed order
//   node_radial_kernel     one thread per node: the norm's share k^2 (f . g) / n of its gradient
//   node_radial_split_kernel  the same for few nodes, as node_norm_split_kernel
//   node_backward_kernel   one thread per channel of a node: normalisation then pooling backward, writing its
//                          own pixels
//   node_backward_warp_kernel  the same for wide patches with the nodes pooled ahead, a warp per channel of a
//                          node: lanes along the patch's rows (coalesced stores; a max pool's winning pixel found
//                          by shuffles), f read from the pooled nodes
//
// Patches do not overlap, so every output element is written by one thread: no atomics. Which kernel runs
// depends on the shape alone, so a shape gives the same result on every run.
#include "nodes.h"
#include "block_sum.cuh"
#include "nodes_math.cuh"

namespace fastkd {
namespace FASTKD_KERNELS {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

// Below this many nodes (B m) the reductions over a node's channels split them over kChannelGroups warps. One
// thread a node would keep few threads busy, each reading all C channels one after another: with pool_scale (9
// nodes at 65 x 65, B = 8) 72 threads, each with 512 loads in sequence, on a GPU that holds 270,000 threads (132
// SMs x 2048). At 8192 nodes the split fills an H100, and one thread a node reads 32 nodes a request coalesced.
// (A warp a node, its lanes along the channels, read a sector a lane: 4 times the ideal for double nodes.)
constexpr std::int64_t kFewNodes = 8192;
constexpr int kChannelGroups = 32;  // warps of a split block: 1024 threads, 32 nodes x 32 ranges of channels
constexpr int kSplitThreads = 32 * kChannelGroups;

// Patches at least this wide pool a warp a channel of a node. One thread a node reads pixels kernel_w apart
// across its warp's lanes, a sector a lane for 4-8 useful bytes (pool_scale at 65 x 65: 32 x 32 patches, 15
// sectors a request against 2); lanes along a patch row read it coalesced, with at least half of them busy.
constexpr std::int64_t kWidePatch = 16;

using nodes::Grid;
using nodes::Map;

template <typename T>
FASTKD_GLOBAL void node_norm_kernel(global_ptr<const T> x, Map map, Grid grid, std::int64_t batch,
                                    global_ptr<double> norms) {
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= batch * m) return;
  norms[index] = sqrt(nodes::node_squares(x, map, grid, index / m, index % m));
}

// The index of this thread's warp among the grid's, and its lane.
FASTKD_DEVICE std::int64_t warp_index() {
  return static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
}

// Block kSplitThreads: `share` of this thread's node (lane l: node 32 blockIdx.x + l of the B m) over the
// channels w, w + kChannelGroups, .. (warp w), summed over the warps in their order: valid in warp 0. A lane
// past the nodes gives 0. Every thread of the block must call it (a barrier).
template <typename Share>
FASTKD_DEVICE double sum_over_channel_groups(std::int64_t nodes_in_all, Share share) {
  FASTKD_SHARED(double, partial, kSplitThreads);  // [warp][lane]
  const int lane = threadIdx.x % 32, group = threadIdx.x / 32;
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * 32 + lane;
  partial[threadIdx.x] = index < nodes_in_all ? share(index, group) : 0.0;
  __syncthreads();
  double sum = 0.0;
  if (group == 0) {
    for (int g = 0; g < kChannelGroups; ++g) sum += partial[g * 32 + lane];
  }
  return sum;
}

template <typename T>
FASTKD_GLOBAL void FASTKD_LAUNCH_BOUNDS(kSplitThreads, 1)
    node_norm_split_kernel(global_ptr<const T> x, Map map, Grid grid, std::int64_t batch, global_ptr<double> norms) {
  const std::int64_t m = nodes::node_count(grid);
  const double squares = sum_over_channel_groups(batch * m, [&](std::int64_t index, int group) {
    return nodes::node_squares(x, map, grid, index / m, index % m, group, kChannelGroups);
  });
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * 32 + threadIdx.x;
  if (threadIdx.x < 32 && index < batch * m) norms[index] = sqrt(squares);
}

template <typename T>
FASTKD_GLOBAL void pool_nodes_kernel(global_ptr<const T> x, Map map, Grid grid, std::int64_t batch,
                                     global_ptr<double> nodes_out) {
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= batch * map.channels * m) return;
  const std::int64_t channel_of_image = index / m;  // b * C + c
  nodes_out[index] = nodes::pooled(x, map, grid, channel_of_image / map.channels, channel_of_image % map.channels,
                                   index % m);
}

// The pooled feature of one channel of a node (as nodes::pool), found by the 32 lanes of a warp and valid in
// lane 0: lane l takes the columns l, l + 32, .. of every row of the patch, and the lanes' sums (or maxima and
// their sums of pixel - pixel, NaN once a pixel is NaN or +-Inf) are combined by shuffles in a fixed order.
template <typename T>
FASTKD_DEVICE double pool_by_warp(global_ptr<const T> origin, const Map& map, const nodes::Patch& patch,
                                  bool max_pool, int lane) {
  double sum = 0.0, best = to_double(origin[0]), non_finite = 0.0;
  for (std::int64_t py = 0; py < patch.rows; ++py) {
    for (std::int64_t px = lane; px < patch.cols; px += 32) {
      const double pixel = to_double(origin[py * map.stride_h + px * map.stride_w]);
      if (max_pool) {
        best = pixel > best ? pixel : best;
        non_finite += pixel - pixel;
      } else {
        sum += pixel;
      }
    }
  }
  if (!max_pool) return warp_sum(sum) / static_cast<double>(patch.rows * patch.cols);
  for (int offset = 16; offset > 0; offset /= 2) {
    const double other = __shfl_down_sync(0xffffffffu, best, offset);
    best = other > best ? other : best;
  }
  return best + warp_sum(non_finite);
}

template <typename T>
FASTKD_GLOBAL void pool_nodes_warp_kernel(global_ptr<const T> x, Map map, Grid grid, std::int64_t batch,
                                          global_ptr<double> nodes_out) {
  const std::int64_t m = nodes::node_count(grid), index = warp_index();
  if (index >= batch * map.channels * m) return;  // the same for the warp's lanes
  const std::int64_t channel_of_image = index / m;  // b * C + c
  const nodes::Patch patch = nodes::patch_of(map, grid, index % m);
  const global_ptr<const T> origin =
      x + nodes::patch_origin(map, patch, channel_of_image / map.channels, channel_of_image % map.channels);
  const double pooled = pool_by_warp(origin, map, patch, grid.max_pool, threadIdx.x % 32);
  if (threadIdx.x % 32 == 0) nodes_out[index] = pooled;
}

template <typename T>
FASTKD_GLOBAL void node_radial_kernel(global_ptr<const double> grad_hat, global_ptr<const T> x, Map map,
                                      global_ptr<const double> nodes_in, global_ptr<const double> norms, Grid grid,
                                      double eps, std::int64_t batch, global_ptr<double> radial) {
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= batch * m) return;
  radial[index] = nodes::radial_term(nodes::radial_dot(grad_hat, x, map, nodes_in, grid, index / m, index % m),
                                     norms[index], eps);
}

template <typename T>
FASTKD_GLOBAL void FASTKD_LAUNCH_BOUNDS(kSplitThreads, 1)
    node_radial_split_kernel(global_ptr<const double> grad_hat, global_ptr<const T> x, Map map,
                             global_ptr<const double> nodes_in, global_ptr<const double> norms, Grid grid, double eps,
                             std::int64_t batch, global_ptr<double> radial) {
  const std::int64_t m = nodes::node_count(grid);
  const double dot = sum_over_channel_groups(batch * m, [&](std::int64_t index, int group) {
    return nodes::radial_dot(grad_hat, x, map, nodes_in, grid, index / m, index % m, group, kChannelGroups);
  });
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * 32 + threadIdx.x;
  if (threadIdx.x < 32 && index < batch * m) radial[index] = nodes::radial_term(dot, norms[index], eps);
}

// radial: the nodes' radial terms, or nullptr (the norm detached: none).
template <typename T>
FASTKD_GLOBAL void node_backward_kernel(global_ptr<const double> grad_hat, global_ptr<const T> x, Map map,
                                        global_ptr<const double> norms, global_ptr<const double> radial, Grid grid,
                                        double eps, std::int64_t batch, global_ptr<T> grad, Map grad_map) {
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= batch * map.channels * m) return;
  const std::int64_t channel_of_image = index / m, node = index % m;  // b * C + c
  const std::int64_t b = channel_of_image / map.channels, c = channel_of_image % map.channels;
  const double node_radial = radial != nullptr ? static_cast<double>(radial[b * m + node]) : 0.0;
  nodes::channel_backward(grad_hat, x, map, norms, node_radial, grid, eps, b, c, node, grad, grad_map);
}

// The pixel of a patch that a max pool's gradient goes to, as nodes::pool's winner (py * patch.cols + px of the
// first maximal pixel in row-major order; the first NaN pixel when the patch holds NaN; -1, none, for +-Inf
// without NaN), found by the 32 lanes of a warp and valid in all of them: lane l takes the columns l, l + 32,
// .. of every row, and the lanes' candidates are combined by xor shuffles (equal maxima: the lower index), an
// order-free choice that leaves every lane with the same winner.
template <typename T>
FASTKD_DEVICE std::int64_t max_pool_winner_by_warp(global_ptr<const T> origin, const Map& map,
                                                   const nodes::Patch& patch, int lane) {
  constexpr std::int64_t kNone = INT64_MAX;
  double best = to_double(origin[0]);
  std::int64_t best_at = 0, first_nan = kNone;
  int non_finite = 0;  // whether a pixel is NaN or +-Inf: then pool's f is NaN
  for (std::int64_t py = 0; py < patch.rows; ++py) {
    for (std::int64_t px = lane; px < patch.cols; px += 32) {
      const double pixel = to_double(origin[py * map.stride_h + px * map.stride_w]);
      const std::int64_t at = py * patch.cols + px;
      if (pixel > best) {
        best = pixel;
        best_at = at;
      }
      if (pixel != pixel && first_nan == kNone) first_nan = at;
      if (!(pixel - pixel == 0.0)) non_finite = 1;
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const double other = __shfl_xor_sync(0xffffffffu, best, offset);
    const std::int64_t other_at = __shfl_xor_sync(0xffffffffu, best_at, offset);
    if (other > best || (other == best && other_at < best_at)) {
      best = other;
      best_at = other_at;
    }
    const std::int64_t other_nan = __shfl_xor_sync(0xffffffffu, first_nan, offset);
    first_nan = other_nan < first_nan ? other_nan : first_nan;
    non_finite |= __shfl_xor_sync(0xffffffffu, non_finite, offset);
  }
  if (!non_finite) return best_at;
  return first_nan == kNone ? -1 : first_nan;
}

// Wide patches (kWidePatch): dL/dx of the patch's pixels from grad_pooled (as channel_backward: an average's
// grad_pooled / the pixel count on every pixel, a max's on its winner), lane l writing the columns l, l + 32,
// .. of every row; f from nodes_in, the nodes pooled ahead ((B, C, m) double; read only with radial).
template <typename T>
FASTKD_GLOBAL void node_backward_warp_kernel(global_ptr<const double> grad_hat, global_ptr<const T> x, Map map,
                                             global_ptr<const double> nodes_in, global_ptr<const double> norms,
                                             global_ptr<const double> radial, Grid grid, double eps,
                                             std::int64_t batch, global_ptr<T> grad, Map grad_map) {
  const std::int64_t m = nodes::node_count(grid), index = warp_index();
  if (index >= batch * map.channels * m) return;  // the same for the warp's lanes
  const int lane = threadIdx.x % 32;
  const std::int64_t channel_of_image = index / m, node = index % m;  // b * C + c
  const std::int64_t b = channel_of_image / map.channels, c = channel_of_image % map.channels;
  const nodes::Patch patch = nodes::patch_of(map, grid, node);
  const double radial_share = radial != nullptr ? radial[b * m + node] * nodes_in[index] : 0.0;  // k^2 (f.g) f / n
  const double grad_pooled = grad_hat[index] * (1.0 / (norms[b * m + node] + eps)) - radial_share;
  const std::int64_t winner =
      grid.max_pool ? max_pool_winner_by_warp(x + nodes::patch_origin(map, patch, b, c), map, patch, lane) : -1;
  const T per_pixel =
      from_double<T>(grid.max_pool ? grad_pooled : grad_pooled / static_cast<double>(patch.rows * patch.cols));
  const T zero = from_double<T>(0.0);
  const global_ptr<T> out = grad + nodes::patch_origin(grad_map, patch, b, c);
  for (std::int64_t py = 0; py < patch.rows; ++py) {
    for (std::int64_t px = lane; px < patch.cols; px += 32) {
      const bool gets_it = !grid.max_pool || py * patch.cols + px == winner;
      out[py * grad_map.stride_h + px * grad_map.stride_w] = gets_it ? per_pixel : zero;
    }
  }
}

std::int64_t blocks_for(std::int64_t items) { return (items + kThreads - 1) / kThreads; }
std::int64_t warp_blocks_for(std::int64_t items) { return (items + kWarpsPerBlock - 1) / kWarpsPerBlock; }
std::int64_t split_blocks_for(std::int64_t nodes_in_all) { return (nodes_in_all + 31) / 32; }

}  // namespace

template <typename T>
void node_norms(const T* x, const nodes::Map& map, const nodes::Grid& grid, std::int64_t batch, double* norms,
                fastkd_stream_t stream) {
  const std::int64_t items = batch * nodes::node_count(grid);
  if (items == 0) return;
  if (items < kFewNodes) {
    FASTKD_LAUNCH(node_norm_split_kernel<T>, LaunchExtent(split_blocks_for(items)), dim3(kSplitThreads), stream, x,
                  map, grid, batch, norms);
  } else {
    FASTKD_LAUNCH(node_norm_kernel<T>, LaunchExtent(blocks_for(items)), dim3(kThreads), stream, x, map, grid, batch,
                  norms);
  }
}

template <typename T>
void pool_nodes(const T* x, const nodes::Map& map, const nodes::Grid& grid, std::int64_t batch, double* nodes_out,
                fastkd_stream_t stream) {
  const std::int64_t items = batch * map.channels * nodes::node_count(grid);
  if (items == 0) return;
  if (grid.kernel_w >= kWidePatch) {
    FASTKD_LAUNCH(pool_nodes_warp_kernel<T>, LaunchExtent(warp_blocks_for(items)), dim3(kThreads), stream, x, map,
                  grid, batch, nodes_out);
  } else {
    FASTKD_LAUNCH(pool_nodes_kernel<T>, LaunchExtent(blocks_for(items)), dim3(kThreads), stream, x, map, grid,
                  batch, nodes_out);
  }
}

template <typename T>
void node_backward(const double* grad_hat, const T* x, const nodes::Map& map, const double* nodes_in,
                   const double* norms, const nodes::Grid& grid, double eps, bool detach_norm, std::int64_t batch,
                   double* radial, bool radial_given, T* grad, const nodes::Map& grad_map, fastkd_stream_t stream) {
  const std::int64_t node_items = batch * nodes::node_count(grid);
  if (node_items * map.channels == 0) return;
  if (radial_given || detach_norm) {
    // nothing to sum: the caller's radial terms, or none
  } else if (node_items < kFewNodes) {
    FASTKD_LAUNCH(node_radial_split_kernel<T>, LaunchExtent(split_blocks_for(node_items)), dim3(kSplitThreads), stream,
                  grad_hat, x, map, nodes_in, norms, grid, eps, batch, radial);
  } else if (!detach_norm) {
    FASTKD_LAUNCH(node_radial_kernel<T>, LaunchExtent(blocks_for(node_items)), dim3(kThreads), stream, grad_hat, x, map,
                  nodes_in, norms, grid, eps, batch, radial);
  }
  const double* node_radial = detach_norm ? nullptr : radial;
  if (grid.kernel_w >= kWidePatch && (nodes_in != nullptr || node_radial == nullptr)) {
    FASTKD_LAUNCH(node_backward_warp_kernel<T>, LaunchExtent(warp_blocks_for(node_items * map.channels)),
                  dim3(kThreads), stream, grad_hat, x, map, nodes_in, norms, node_radial, grid, eps, batch, grad,
                  grad_map);
  } else {
    FASTKD_LAUNCH(node_backward_kernel<T>, LaunchExtent(blocks_for(node_items * map.channels)), dim3(kThreads),
                  stream, grad_hat, x, map, norms, node_radial, grid, eps, batch, grad, grad_map);
  }
}

#define FASTKD_INSTANTIATE(T)                                                                                   \
  template void node_norms<T>(const T*, const nodes::Map&, const nodes::Grid&, std::int64_t, double*,           \
                              fastkd_stream_t);                                                                 \
  template void pool_nodes<T>(const T*, const nodes::Map&, const nodes::Grid&, std::int64_t, double*,           \
                              fastkd_stream_t);                                                                 \
  template void node_backward<T>(const double*, const T*, const nodes::Map&, const double*, const double*,     \
                                 const nodes::Grid&, double, bool, std::int64_t, double*, bool, T*,             \
                                 const nodes::Map&, fastkd_stream_t);
FASTKD_FOR_EACH_STORAGE_TYPE(FASTKD_INSTANTIATE)
#undef FASTKD_INSTANTIATE

}  // namespace FASTKD_KERNELS
}  // namespace fastkd
