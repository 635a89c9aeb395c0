// Torch glue of the CUDA per-pixel KD kernels, included by pixelwise_kd_emulated.cpp (CPU tensors, the emulator)
// and pixelwise_kd_cuda.cpp (CUDA tensors), each after choosing the launchers' namespace (FASTKD_EMULATE_CUDA or
// FASTKD_CUDA_HOST) and defining FASTKD_GLUE_STREAM() and FASTKD_GLUE_GUARD(tensor).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <type_traits>

#include "pixelwise_kd.h"
#include "../common/glue_common.h"

namespace fastkd {
namespace {  // one copy per including file: the two call different launchers

void check_pixelwise_kd_temperature(const char* op, double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "fastkd::", op,
              ": `temperature` must be finite and > 0, got ", temperature);
}

// terms: (B, H, W) double, KL(softmax(t / T) || softmax(s / T)) per pixel; s and t read in their own dtypes.
at::Tensor pixelwise_kd_forward_op(const at::Tensor& s, const at::Tensor& t, double temperature) {
  constexpr const char* kOp = "pixelwise_kd_forward";
  glue::check_logits_pair(kOp, s, t);
  check_pixelwise_kd_temperature(kOp, temperature);
  FASTKD_GLUE_GUARD(s);
  const auto doubles = s.options().dtype(at::kDouble);
  if (s.numel() == 0) return at::zeros({s.size(0), s.size(2), s.size(3)}, doubles);  // no channels: KL is 0
  at::Tensor terms = at::empty({s.size(0), s.size(2), s.size(3)}, doubles);
  dispatch_pair(s, t, [&](const auto* s_data, const auto* t_data) {
    FASTKD_KERNELS::pixelwise_kd_forward(s_data, glue::map_of(s), t_data, glue::map_of(t), s.size(0), temperature,
                                         terms.mutable_data_ptr<double>(), FASTKD_GLUE_STREAM());
  });
  return terms;
}

// dL/ds (wrt 0) or dL/dt (wrt 1), in that input's dtype and layout, from dL/dterms ((B, H, W), any dtype).
at::Tensor pixelwise_kd_backward_op(const at::Tensor& grad_terms, const at::Tensor& s, const at::Tensor& t,
                                    double temperature, int64_t wrt) {
  constexpr const char* kOp = "pixelwise_kd_backward";
  glue::check_logits_pair(kOp, s, t);
  glue::check_grad_terms(kOp, grad_terms, s);
  check_pixelwise_kd_temperature(kOp, temperature);
  TORCH_CHECK(wrt == 0 || wrt == 1, "fastkd::", kOp, ": `wrt` must be 0 (s) or 1 (t), got ", wrt);
  FASTKD_GLUE_GUARD(s);
  at::Tensor grad = at::empty_like(wrt == 0 ? s : t);
  if (grad.numel() == 0) return grad;
  const at::Tensor g = grad_terms.to(at::kDouble).contiguous();
  dispatch_pair(s, t, [&](const auto* s_data, const auto* t_data) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(s_data)>>;
    using T = std::remove_const_t<std::remove_pointer_t<decltype(t_data)>>;
    FASTKD_KERNELS::pixelwise_kd_backward(g.const_data_ptr<double>(), s_data, glue::map_of(s), t_data,
                                          glue::map_of(t), s.size(0), temperature,
                                          wrt == 0 ? static_cast<S*>(grad.mutable_data_ptr()) : nullptr,
                                          wrt == 1 ? static_cast<T*>(grad.mutable_data_ptr()) : nullptr,
                                          glue::map_of(grad), FASTKD_GLUE_STREAM());
  });
  return grad;
}

}  // namespace
}  // namespace fastkd
