// CUDA kernels of the windowed pair-wise affinity loss (Liu et al. 2020, eq. 2; FORMULAS.md section 1) and
// their launchers (compile with nvcc alone; the emulator runs this same file on the CPU through
// affinity_window_emulated.cpp). The window math is in affinity_window_math.cuh, the node math in
// nodes_math.cuh.
//
// Nodes are pooled from the inputs on the fly, never stored; only the node norms (B x m doubles) are
// computed ahead, one thread per node, by the shared launcher node_norms (common/nodes.cu).
// Forward: one thread per node walks the stored half of the window (the diagonal, then one offset of each
// mirrored pair), computes a_s - a_t there over the channels, writes it to the (B, half, m) difference map
// and sums its squares, the mirrored ones twice; each block sums those in a fixed order (warp shuffles,
// then shared memory) into one partial, and the glue sums the partials.
// Backward: one thread per (node, channel) gathers dL/df_hat = 4 sign grad sum_{j in window(i)} D_ij
// f_hat_j over the whole window from the difference map into a (B, C, m) double workspace; then the shared
// launcher node_backward takes it through the normalisation (one thread a node for the norm's share) and the
// pooling (one thread a channel of a node, writing its own patch's pixels).
// No atomics: the same result on every run.
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
                                                  global_ptr<double> difference, global_ptr<double> partials) {
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t index = thread_index();
  double squares = 0.0;
  if (index < batch * m) {
    squares = affinity_window::half_window_row(s, s_map, s_norms, t, t_map, t_norms, grid, index / m, index % m, eps,
                                               difference);
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

std::int64_t blocks_for(std::int64_t items) { return (items + kThreads - 1) / kThreads; }

}  // namespace

std::int64_t affinity_window_partial_count(std::int64_t batch, const Grid& grid) {
  return blocks_for(batch * nodes::node_count(grid));
}

template <typename T>
void affinity_window_forward(const T* s, const Map& s_map, const double* s_norms, const T* t, const Map& t_map,
                             const double* t_norms, const Grid& grid, std::int64_t batch, double eps,
                             double* difference, double* partials, fastkd_stream_t stream) {
  const std::int64_t blocks = blocks_for(batch * nodes::node_count(grid));
  FASTKD_LAUNCH(affinity_window_forward_kernel<T>, LaunchExtent(blocks), dim3(kThreads), stream, s, s_map, s_norms,
                t, t_map, t_norms, grid, batch, eps, difference, partials);
}

template <typename T>
void affinity_window_backward(const T* x, const Map& map, const double* norms, const double* difference,
                              const Grid& grid, std::int64_t batch, double eps, bool detach_norm,
                              const double* grad_total, double sign, double* grad_hat, double* radial, T* grad,
                              const Map& grad_map, fastkd_stream_t stream) {
  const std::int64_t m = nodes::node_count(grid);
  FASTKD_LAUNCH(affinity_window_gradient_kernel<T>, LaunchExtent(blocks_for(batch * map.channels * m)), dim3(kThreads),
                stream, x, map, norms, difference, grid, batch, eps, grad_total, sign, grad_hat);
  node_backward(grad_hat, x, map, nullptr, norms, grid, eps, detach_norm, batch, radial, grad, grad_map, stream);
}

#define FASTKD_INSTANTIATE(T)                                                                                        \
  template void affinity_window_forward<T>(const T*, const Map&, const double*, const T*, const Map&, const double*, \
                                           const Grid&, std::int64_t, double, double*, double*, fastkd_stream_t);    \
  template void affinity_window_backward<T>(const T*, const Map&, const double*, const double*, const Grid&,         \
                                            std::int64_t, double, bool, const double*, double, double*, double*,     \
                                            T*, const Map&, fastkd_stream_t);
FASTKD_FOR_EACH_STORAGE_TYPE(FASTKD_INSTANTIATE)
#undef FASTKD_INSTANTIATE

}  // namespace FASTKD_KERNELS
}  // namespace fastkd
