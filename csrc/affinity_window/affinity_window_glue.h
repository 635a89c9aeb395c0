// Torch glue of the CUDA windowed pair-wise affinity kernels, included by affinity_window_emulated.cpp (CPU
// tensors, the emulator) and affinity_window_cuda.cpp (CUDA tensors), each after choosing the launchers'
// namespace (FASTKD_EMULATE_CUDA or FASTKD_CUDA_HOST) and defining FASTKD_GLUE_STREAM() and
// FASTKD_GLUE_GUARD(tensor).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

#include "affinity_window.h"
#include "../common/glue_common.h"

namespace fastkd {
namespace {  // one copy per including file: the two call different launchers

using glue::map_of;

affinity_window::Grid checked_grid(const at::Tensor& x, int64_t kernel_h, int64_t kernel_w, bool max_pool,
                                   int64_t window) {
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1, "`kernel_h` and `kernel_w` must be >= 1, got ", kernel_h, " and ",
              kernel_w);
  TORCH_CHECK(window >= 0, "`window` must be >= 0, got ", window);
  return affinity_window::make_grid(x.size(2), x.size(3), kernel_h, kernel_w, max_pool, window);
}

// (total: 0-dim double, difference, teacher_affinity: (B, half, m) double, s_norms, t_norms: (B, m) double) for
// features s, t of one shape but their channels: the windowed sum, D = a_s - a_t and a_t on the stored half of
// the window (0 where the partner is missing) and the node norms. detach_norm is only read by the autograd
// backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> affinity_window_forward_op(
    const at::Tensor& s, const at::Tensor& t, int64_t kernel_h, int64_t kernel_w, bool max_pool, int64_t window,
    double eps, bool /*detach_norm*/) {
  glue::check_pair(s, t);
  glue::check_same_device("affinity_window_forward", {{"s", s}, {"t", t}});
  const affinity_window::Grid grid = checked_grid(s, kernel_h, kernel_w, max_pool, window);
  FASTKD_GLUE_GUARD(s);
  // Mixed dtypes are widened to the common one (exact: float16/bfloat16 -> float32 -> float64).
  const auto common = at::promote_types(s.scalar_type(), t.scalar_type());
  const at::Tensor s_common = s.to(common), t_common = t.to(common);
  const int64_t batch = s.size(0), m = nodes::node_count(grid);
  const auto doubles = s.options().dtype(at::kDouble);
  at::Tensor difference = at::empty({batch, affinity_window::half_window(grid), m}, doubles);
  at::Tensor teacher_affinity = at::empty_like(difference);
  at::Tensor s_norms = at::empty({batch, m}, doubles), t_norms = at::empty({batch, m}, doubles);
  if (batch * m == 0) return {at::zeros({}, doubles), difference, teacher_affinity, s_norms, t_norms};
  at::Tensor partials = at::empty({FASTKD_KERNELS::affinity_window_partial_count(batch, grid)}, doubles);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, common, "affinity_window_forward", [&] {
    FASTKD_KERNELS::affinity_window_forward(storage_data<scalar_t>(s_common), map_of(s_common),
                                            storage_data<scalar_t>(t_common), map_of(t_common), grid, batch, eps,
                                            s_norms.mutable_data_ptr<double>(), t_norms.mutable_data_ptr<double>(),
                                            difference.mutable_data_ptr<double>(),
                                            teacher_affinity.mutable_data_ptr<double>(),
                                            partials.mutable_data_ptr<double>(), FASTKD_GLUE_STREAM());
  });
  // a fixed-order sum of the per-block partials
  return {partials.sum(), difference, teacher_affinity, s_norms, t_norms};
}

// dL/dx (x's dtype and layout) for the total, given dL/dtotal (0-dim), x's node norms and the forward's
// difference and teacher_affinity; sign +1 for the student, -1 for the teacher.
at::Tensor affinity_window_backward_op(const at::Tensor& grad_total, const at::Tensor& x, const at::Tensor& norms,
                                       const at::Tensor& difference, const at::Tensor& teacher_affinity,
                                       int64_t kernel_h, int64_t kernel_w, bool max_pool, int64_t window, double eps,
                                       bool detach_norm, double sign) {
  glue::check_input(x, "x");
  const affinity_window::Grid grid = checked_grid(x, kernel_h, kernel_w, max_pool, window);
  const int64_t batch = x.size(0), channels = x.size(1), m = nodes::node_count(grid);
  const int64_t half = affinity_window::half_window(grid);
  TORCH_CHECK(norms.sizes() == at::IntArrayRef({batch, m}), "`norms` must be (B, m) = (", batch, ", ", m,
              "), got ", norms.sizes());
  TORCH_CHECK(difference.sizes() == at::IntArrayRef({batch, half, m}), "`difference` must be (B, half window, m) = (",
              batch, ", ", half, ", ", m, "), got ", difference.sizes());
  TORCH_CHECK(teacher_affinity.sizes() == difference.sizes(), "`teacher_affinity` must be (B, half window, m) = (",
              batch, ", ", half, ", ", m, "), got ", teacher_affinity.sizes());
  TORCH_CHECK(grad_total.numel() == 1, "`grad_total` must hold one element, got ", grad_total.numel());
  glue::check_same_device("affinity_window_backward", {{"x", x},
                                                       {"grad_total", grad_total},
                                                       {"norms", norms},
                                                       {"difference", difference},
                                                       {"teacher_affinity", teacher_affinity}});
  FASTKD_GLUE_GUARD(x);
  at::Tensor grad = at::empty_like(x);
  if (x.numel() == 0) return grad.zero_();
  const at::Tensor grad_total_double = grad_total.to(at::kDouble).contiguous();
  const at::Tensor norms_double = norms.to(at::kDouble).contiguous();
  const at::Tensor difference_double = difference.to(at::kDouble).contiguous();
  const at::Tensor teacher_affinity_double = teacher_affinity.to(at::kDouble).contiguous();
  // The per-node kernels' workspaces; the tiled ones need none.
  const bool tiled = FASTKD_KERNELS::affinity_window_tiled(grid);
  const auto doubles = x.options().dtype(at::kDouble);
  at::Tensor grad_hat = tiled ? at::Tensor() : at::empty({batch, channels, m}, doubles);
  at::Tensor radial = tiled || detach_norm ? at::Tensor() : at::empty({batch, m}, doubles);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affinity_window_backward", [&] {
    FASTKD_KERNELS::affinity_window_backward(
        storage_data<scalar_t>(x), map_of(x), norms_double.const_data_ptr<double>(),
        difference_double.const_data_ptr<double>(), teacher_affinity_double.const_data_ptr<double>(), grid, batch,
        eps, detach_norm, grad_total_double.const_data_ptr<double>(), sign,
        grad_hat.defined() ? grad_hat.mutable_data_ptr<double>() : nullptr,
        radial.defined() ? radial.mutable_data_ptr<double>() : nullptr, mutable_storage_data<scalar_t>(grad),
        map_of(grad), FASTKD_GLUE_STREAM());
  });
  return grad;
}

}  // namespace
}  // namespace fastkd
