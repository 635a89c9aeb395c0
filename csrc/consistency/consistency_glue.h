// Torch glue of the CUDA consistency kernels, included by consistency_emulated.cpp (CPU tensors, the
// emulator) and consistency_cuda.cpp (CUDA tensors), each after choosing the launchers' namespace
// (FASTKD_EMULATE_CUDA or FASTKD_CUDA_HOST) and defining FASTKD_GLUE_STREAM() and FASTKD_GLUE_GUARD(tensor).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

#include "consistency.h"
#include "../common/glue_common.h"

namespace fastkd {
namespace {  // one copy per including file: the two call different launchers

using glue::map_of;

// (loss_sum: 0-dim double, difference: (B, H, W) double) for logits s, t of one shape but their channels.
std::tuple<at::Tensor, at::Tensor> consistency_forward_op(const at::Tensor& s, const at::Tensor& t, bool valid,
                                                          int64_t dilation) {
  glue::check_pair(s, t);
  glue::check_same_device("consistency_forward", {{"s", s}, {"t", t}});
  TORCH_CHECK(dilation >= 1, "`dilation` must be >= 1");
  FASTKD_GLUE_GUARD(s);
  // Mixed dtypes are widened to the common one (exact: float16/bfloat16 -> float32 -> float64).
  const auto common = at::promote_types(s.scalar_type(), t.scalar_type());
  const at::Tensor s_common = s.to(common), t_common = t.to(common);
  const int64_t batch = s.size(0), height = s.size(2), width = s.size(3);
  const auto doubles = s.options().dtype(at::kDouble);
  at::Tensor difference = at::zeros({batch, height, width}, doubles);
  if (difference.numel() == 0) return {at::zeros({}, doubles), difference};
  at::Tensor partials = at::empty({FASTKD_KERNELS::consistency_partial_count(batch, height, width)}, doubles);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, common, "consistency_forward", [&] {
    FASTKD_KERNELS::consistency_forward(storage_data<scalar_t>(s_common), map_of(s_common),
                                        storage_data<scalar_t>(t_common), map_of(t_common), batch, dilation, valid,
                                        difference.mutable_data_ptr<double>(), partials.mutable_data_ptr<double>(),
                                        FASTKD_GLUE_STREAM());
  });
  return {partials.sum(), difference};  // a fixed-order sum of the per-block partials
}

// dL/dx (x's dtype and layout) for the loss sum, given dL/dloss_sum (0-dim double) and the forward's map
// difference; sign +1 for the student, -1 for the teacher.
at::Tensor consistency_backward_op(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& difference,
                                   int64_t dilation, double sign) {
  glue::check_input(x, "x");
  glue::check_same_device("consistency_backward", {{"x", x}, {"grad_loss", grad_loss}, {"difference", difference}});
  TORCH_CHECK(grad_loss.numel() == 1, "`grad_loss` must hold one element, got ", grad_loss.numel());
  TORCH_CHECK(difference.sizes() == at::IntArrayRef({x.size(0), x.size(2), x.size(3)}),
              "`difference` must be (B, H, W) = (", x.size(0), ", ", x.size(2), ", ", x.size(3), "), got ",
              difference.sizes());
  FASTKD_GLUE_GUARD(x);
  at::Tensor grad = at::empty_like(x);
  if (x.numel() == 0) return grad.zero_();
  const at::Tensor grad_loss_double = grad_loss.to(at::kDouble).contiguous();
  const at::Tensor difference_double = difference.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "consistency_backward", [&] {
    FASTKD_KERNELS::consistency_backward(storage_data<scalar_t>(x), map_of(x),
                                         difference_double.const_data_ptr<double>(),
                                         grad_loss_double.const_data_ptr<double>(), sign, x.size(0), dilation,
                                         mutable_storage_data<scalar_t>(grad), map_of(grad), FASTKD_GLUE_STREAM());
  });
  return grad;
}

}  // namespace
}  // namespace fastkd
