// The CPU implementation of fastkd::affinity_window_forward / _backward (schema: affinity_window_schema.cpp;
// backend="cpp"; Liu et al. 2020, eq. 2; FORMULAS.md section 1): the per-node math of the CUDA kernels
// (common/nodes_math.cuh and affinity_window_math.cuh, compiled here as plain C++), run by at::parallel_for.
//
// Nodes are pooled from the inputs on the fly, never stored; the node norms ((B, m) double each) are
// computed ahead, nodes in parallel.
// Forward: the flat nodes b * m + i are cut into fixed blocks of kBlockNodes; each block is handled by one
// thread, which walks the stored half of the window of each of its nodes (the diagonal, then one offset of
// each mirrored pair), writes D = a_s - a_t into the (B, half, m) difference and sums D^2 (the diagonal
// once, the others twice), in node then offset order, into partials[block]. The partials are summed by one
// thread in block order, so the total is bitwise the same whatever the number of threads and however
// at::parallel_for groups the blocks.
// Backward: one thread per range of (b, c, i) gathers dL/df_hat_i[c] = 4 sign grad sum_{j in window(i)} D_ij
// f_hat_j[c] from the difference into a (B, C, m) double workspace; then nodes in parallel take it through
// the normalisation and the pooling (nodes::node_backward), each writing its own patch's pixels once.
// No atomics; every output element is written by one thread.
//
// Memory: the norms (2 B m), the difference (B half m) and the partials (B m / kBlockNodes) in the forward,
// the (B, C, m) workspace in the backward, all double; the inputs are read in place at any strides, and
// mixed student and teacher dtypes are not converted: each is read in its own dtype and widened per element
// to double, which gives exactly what widening to the common dtype first would (float16/bfloat16 ->
// float32 -> float64 are exact).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "affinity_window_math.cuh"
#include "../common/nodes_math.cuh"

namespace fastkd {
namespace cpu {
namespace {

using affinity_window::Grid;
using nodes::Map;

// Nodes per forward partial sum: a fixed block, so that the total does not depend on the thread count.
constexpr std::int64_t kBlockNodes = 64;
// Work per at::parallel_for task: about this many element visits.
constexpr std::int64_t kGrainVisits = 1 << 15;

Map map_of(const at::Tensor& x) {
  return {x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

std::int64_t grain_for(std::int64_t visits_per_item) {
  return std::max<std::int64_t>(1, kGrainVisits / std::max<std::int64_t>(1, visits_per_item));
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

// norms[b * m + i] = ||f_i|| of image b, nodes in parallel.
template <typename T>
void node_norms(const T* x, const Map& map, const Grid& grid, std::int64_t batch, double* norms) {
  const std::int64_t m = nodes::node_count(grid);
  const std::int64_t grain = grain_for(map.channels * grid.kernel_h * grid.kernel_w);
  at::parallel_for(0, batch * m, grain, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t index = begin; index < end; ++index) {
      norms[index] = nodes::node_norm(x, map, grid, index / m, index % m);
    }
  });
}

// The difference (B, half, m) and the per-block weighted sums of its squares, for inputs of (storage)
// types S and T.
template <typename S, typename T>
void forward_blocks(const S* s, const Map& s_map, const double* s_norms, const T* t, const Map& t_map,
                    const double* t_norms, const Grid& grid, std::int64_t batch, double eps, double* difference,
                    double* partials) {
  const std::int64_t m = nodes::node_count(grid), half = affinity_window::half_window(grid);
  const std::int64_t nodes_total = batch * m, blocks = (nodes_total + kBlockNodes - 1) / kBlockNodes;
  const std::int64_t per_block =
      kBlockNodes * half * (s_map.channels + t_map.channels) * 2 * grid.kernel_h * grid.kernel_w;
  at::parallel_for(0, blocks, grain_for(per_block), [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t block = begin; block < end; ++block) {
      const std::int64_t first = block * kBlockNodes, last = std::min(first + kBlockNodes, nodes_total);
      double squares = 0.0;
      for (std::int64_t index = first; index < last; ++index) {
        squares += affinity_window::half_window_row(s, s_map, s_norms, t, t_map, t_norms, grid, index / m, index % m,
                                                    eps, difference);
      }
      partials[block] = squares;
    }
  });
}

// grad = dL/dx for the total: grad_hat[b, c, i] = scale * window_gradient for every (b, c, i) in parallel,
// then node_backward for every node in parallel.
template <typename T>
void backward_nodes(const T* x, const Map& map, const double* norms, const double* difference, const Grid& grid,
                    std::int64_t batch, double eps, bool detach_norm, double scale, double* grad_hat, T* grad,
                    const Map& grad_map) {
  const std::int64_t m = nodes::node_count(grid), half = affinity_window::half_window(grid);
  const std::int64_t per_image = map.channels * m;
  const std::int64_t window_nodes = (2 * grid.reach_h + 1) * (2 * grid.reach_w + 1);
  at::parallel_for(0, batch * per_image, grain_for(window_nodes * grid.kernel_h * grid.kernel_w),
                   [&](std::int64_t begin, std::int64_t end) {
                     for (std::int64_t index = begin; index < end; ++index) {
                       const std::int64_t b = index / per_image, c = index % per_image / m, i = index % m;
                       grad_hat[index] = scale * affinity_window::window_gradient(x, map, norms + b * m,
                                                                                  difference + b * half * m, grid, b,
                                                                                  c, i, eps);
                     }
                   });
  at::parallel_for(0, batch * m, grain_for(2 * map.channels * grid.kernel_h * grid.kernel_w),
                   [&](std::int64_t begin, std::int64_t end) {
                     for (std::int64_t index = begin; index < end; ++index) {
                       nodes::node_backward(grad_hat, x, map, norms, grid, eps, detach_norm, index / m, index % m,
                                            grad, grad_map);
                     }
                   });
}

// (total: 0-dim double, difference: (B, half, m) double, s_norms, t_norms: (B, m) double) for features s, t
// of one shape but their channels: the windowed sum, D = a_s - a_t on the stored half of the window (0 where
// the partner is missing) and the node norms. detach_norm is only read by the autograd backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> affinity_window_forward(
    const at::Tensor& s, const at::Tensor& t, int64_t kernel_h, int64_t kernel_w, bool max_pool, int64_t window,
    double eps, bool /*detach_norm*/) {
  check_input(s, "s");
  check_input(t, "t");
  TORCH_CHECK(s.size(0) == t.size(0) && s.size(2) == t.size(2) && s.size(3) == t.size(3),
              "`s` and `t` must share B, H and W, got ", s.sizes(), " and ", t.sizes());
  const Grid grid = checked_grid(s, kernel_h, kernel_w, max_pool, window);
  const int64_t batch = s.size(0), m = nodes::node_count(grid), half = affinity_window::half_window(grid);
  const auto doubles = s.options().dtype(at::kDouble);
  at::Tensor difference = at::empty({batch, half, m}, doubles);
  at::Tensor s_norms = at::empty({batch, m}, doubles), t_norms = at::empty({batch, m}, doubles);
  if (batch * m == 0) return {at::zeros({}, doubles), difference, s_norms, t_norms};
  std::vector<double> partials(static_cast<std::size_t>((batch * m + kBlockNodes - 1) / kBlockNodes));
  const Map s_map = map_of(s), t_map = map_of(t);
  double* s_norm_data = s_norms.mutable_data_ptr<double>();
  double* t_norm_data = t_norms.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "affinity_window_forward", [&] {
    using s_t = scalar_t;
    const s_t* s_data = s.const_data_ptr<s_t>();
    node_norms(s_data, s_map, grid, batch, s_norm_data);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "affinity_window_forward", [&] {
      const scalar_t* t_data = t.const_data_ptr<scalar_t>();
      node_norms(t_data, t_map, grid, batch, t_norm_data);
      forward_blocks(s_data, s_map, s_norm_data, t_data, t_map, t_norm_data, grid, batch, eps,
                     difference.mutable_data_ptr<double>(), partials.data());
    });
  });
  double total = 0.0;  // one thread, block order: independent of the number of threads
  for (const double partial : partials) total += partial;
  return {at::scalar_tensor(total, doubles), difference, s_norms, t_norms};
}

// dL/dx (x's dtype and layout) for the total, given dL/dtotal (one element), x's node norms and the
// forward's difference; sign +1 for the student, -1 for the teacher.
at::Tensor affinity_window_backward(const at::Tensor& grad_total, const at::Tensor& x, const at::Tensor& norms,
                                    const at::Tensor& difference, int64_t kernel_h, int64_t kernel_w, bool max_pool,
                                    int64_t window, double eps, bool detach_norm, double sign) {
  check_input(x, "x");
  const Grid grid = checked_grid(x, kernel_h, kernel_w, max_pool, window);
  const int64_t batch = x.size(0), channels = x.size(1), m = nodes::node_count(grid);
  const int64_t half = affinity_window::half_window(grid);
  TORCH_CHECK(norms.sizes() == at::IntArrayRef({batch, m}), "`norms` must be (B, m) = (", batch, ", ", m,
              "), got ", norms.sizes());
  TORCH_CHECK(difference.sizes() == at::IntArrayRef({batch, half, m}), "`difference` must be (B, half window, m) = (",
              batch, ", ", half, ", ", m, "), got ", difference.sizes());
  TORCH_CHECK(grad_total.numel() == 1, "`grad_total` must hold one element, got ", grad_total.numel());
  at::Tensor grad = at::empty_like(x);
  if (x.numel() == 0) return grad;
  const double scale = 4.0 * sign * grad_total.item<double>();
  const at::Tensor norms_double = norms.to(at::kDouble).contiguous();
  const at::Tensor difference_double = difference.to(at::kDouble).contiguous();
  at::Tensor grad_hat = at::empty({batch, channels, m}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affinity_window_backward", [&] {
    backward_nodes(x.const_data_ptr<scalar_t>(), map_of(x), norms_double.const_data_ptr<double>(),
                   difference_double.const_data_ptr<double>(), grid, batch, eps, detach_norm, scale,
                   grad_hat.mutable_data_ptr<double>(), grad.mutable_data_ptr<scalar_t>(), map_of(grad));
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
