// Torch glue of the CUDA consistency kernels, included by consistency_emulated.cpp (CPU tensors, the
// emulator) and consistency_cuda.cpp (CUDA tensors), each after choosing the launchers' namespace
// (FASTKD_EMULATE_CUDA or FASTKD_CUDA_HOST) and defining FASTKD_GLUE_STREAM() and FASTKD_GLUE_GUARD(tensor).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

#include "../kernels/consistency.h"

namespace fastkd {
namespace {  // one copy per including file: the two call different launchers

// The kernels' storage type of a torch scalar type (same bits).
template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<at::Half> {
  using type = fastkd_half;
};
template <>
struct Storage<at::BFloat16> {
  using type = fastkd_bfloat16;
};

consistency::Map map_of(const at::Tensor& x) {
  return {x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, "`", name, "` must be (B, C, H, W), got ", x.dim(), " dimensions");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "`", name, "` must be floating point, got ", x.scalar_type());
}

// (loss_sum: 0-dim double, difference: (B, H, W) double) for logits s, t of one shape but their channels.
std::tuple<at::Tensor, at::Tensor> consistency_forward_op(const at::Tensor& s, const at::Tensor& t,
                                                                  bool valid, int64_t dilation) {
  check_logits(s, "s");
  check_logits(t, "t");
  TORCH_CHECK(s.size(0) == t.size(0) && s.size(2) == t.size(2) && s.size(3) == t.size(3),
              "`s` and `t` must share B, H and W");
  TORCH_CHECK(s.device() == t.device(), "`s` and `t` must be on one device");
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
    using storage = typename Storage<scalar_t>::type;
    FASTKD_KERNELS::consistency_forward<storage>(
        reinterpret_cast<const storage*>(s_common.const_data_ptr<scalar_t>()), map_of(s_common),
        reinterpret_cast<const storage*>(t_common.const_data_ptr<scalar_t>()), map_of(t_common), batch, dilation,
        valid, difference.mutable_data_ptr<double>(), partials.mutable_data_ptr<double>(), FASTKD_GLUE_STREAM());
  });
  return {partials.sum(), difference};  // a fixed-order sum of the per-block partials
}

// dL/dx (x's dtype and layout) for the loss sum, given dL/dloss_sum (0-dim double) and the forward's map
// difference; sign +1 for the student, -1 for the teacher.
at::Tensor consistency_backward_op(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& difference,
                                       int64_t dilation, double sign) {
  check_logits(x, "x");
  FASTKD_GLUE_GUARD(x);
  at::Tensor grad = at::empty_like(x);
  if (x.numel() == 0) return grad.zero_();
  const at::Tensor grad_loss_double = grad_loss.to(at::kDouble).contiguous();
  const at::Tensor difference_double = difference.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "consistency_backward", [&] {
    using storage = typename Storage<scalar_t>::type;
    FASTKD_KERNELS::consistency_backward<storage>(
        reinterpret_cast<const storage*>(x.const_data_ptr<scalar_t>()), map_of(x),
        difference_double.const_data_ptr<double>(), grad_loss_double.const_data_ptr<double>(), sign, x.size(0),
        dilation, reinterpret_cast<storage*>(grad.mutable_data_ptr<scalar_t>()), map_of(grad), FASTKD_GLUE_STREAM());
  });
  return grad;
}

}  // namespace
}  // namespace fastkd
