// CUDA kernels of the graph nodes both affinity ops share, and their launchers (compile with nvcc alone; the
// emulator runs this same file on the CPU through nodes_emulated.cpp). The per-node math is nodes_math.cuh.
//
//   node_norm_kernel       one thread per node: ||f_i||, pooling on the fly
//   pool_nodes_kernel      one thread per channel of a node: its pooled feature (the threads of a warp take
//                          consecutive nodes of one channel: coalesced stores, and loads whose sectors the
//                          next pixels of the patches reuse)
//   node_radial_kernel     one thread per node: the norm's share k^2 (f . g) / n of its gradient
//   node_backward_kernel   one thread per channel of a node: normalisation then pooling backward, writing its
//                          own pixels
//
// Patches do not overlap, so every output element is written by one thread: no atomics.
#include "nodes.h"
#include "nodes_math.cuh"

namespace fastkd {
namespace FASTKD_KERNELS {
namespace {

constexpr int kThreads = 256;

using nodes::Grid;
using nodes::Map;

template <typename T>
FASTKD_GLOBAL void node_norm_kernel(global_ptr<const T> x, Map map, Grid grid, std::int64_t batch,
                                    global_ptr<double> norms) {
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= batch * m) return;
  norms[index] = nodes::node_norm(x, map, grid, index / m, index % m);
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

template <typename T>
FASTKD_GLOBAL void node_radial_kernel(global_ptr<const double> grad_hat, global_ptr<const T> x, Map map,
                                      global_ptr<const double> nodes_in, global_ptr<const double> norms, Grid grid,
                                      double eps, std::int64_t batch, global_ptr<double> radial) {
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= batch * m) return;
  radial[index] = nodes::radial_term(grad_hat, x, map, nodes_in, norms, grid, eps, index / m, index % m);
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

std::int64_t blocks_for(std::int64_t items) { return (items + kThreads - 1) / kThreads; }

}  // namespace

template <typename T>
void node_norms(const T* x, const nodes::Map& map, const nodes::Grid& grid, std::int64_t batch, double* norms,
                fastkd_stream_t stream) {
  const std::int64_t items = batch * nodes::node_count(grid);
  if (items == 0) return;
  FASTKD_LAUNCH(node_norm_kernel<T>, LaunchExtent(blocks_for(items)), dim3(kThreads), stream, x, map, grid, batch,
                norms);
}

template <typename T>
void pool_nodes(const T* x, const nodes::Map& map, const nodes::Grid& grid, std::int64_t batch, double* nodes_out,
                fastkd_stream_t stream) {
  const std::int64_t items = batch * map.channels * nodes::node_count(grid);
  if (items == 0) return;
  FASTKD_LAUNCH(pool_nodes_kernel<T>, LaunchExtent(blocks_for(items)), dim3(kThreads), stream, x, map, grid, batch,
                nodes_out);
}

template <typename T>
void node_backward(const double* grad_hat, const T* x, const nodes::Map& map, const double* nodes_in,
                   const double* norms, const nodes::Grid& grid, double eps, bool detach_norm, std::int64_t batch,
                   double* radial, T* grad, const nodes::Map& grad_map, fastkd_stream_t stream) {
  const std::int64_t node_items = batch * nodes::node_count(grid);
  if (node_items * map.channels == 0) return;
  if (!detach_norm) {
    FASTKD_LAUNCH(node_radial_kernel<T>, LaunchExtent(blocks_for(node_items)), dim3(kThreads), stream, grad_hat, x, map,
                  nodes_in, norms, grid, eps, batch, radial);
  }
  const double* node_radial = detach_norm ? nullptr : radial;
  FASTKD_LAUNCH(node_backward_kernel<T>, LaunchExtent(blocks_for(node_items * map.channels)), dim3(kThreads), stream,
                grad_hat, x, map, norms, node_radial, grid, eps, batch, grad, grad_map);
}

#define FASTKD_INSTANTIATE(T)                                                                                   \
  template void node_norms<T>(const T*, const nodes::Map&, const nodes::Grid&, std::int64_t, double*,           \
                              fastkd_stream_t);                                                                 \
  template void pool_nodes<T>(const T*, const nodes::Map&, const nodes::Grid&, std::int64_t, double*,           \
                              fastkd_stream_t);                                                                 \
  template void node_backward<T>(const double*, const T*, const nodes::Map&, const double*, const double*,     \
                                 const nodes::Grid&, double, bool, std::int64_t, double*, T*, const nodes::Map&, \
                                 fastkd_stream_t);
FASTKD_FOR_EACH_STORAGE_TYPE(FASTKD_INSTANTIATE)
#undef FASTKD_INSTANTIATE

}  // namespace FASTKD_KERNELS
}  // namespace fastkd
