// Torch glue of the CUDA probability kernels, included by probability_emulated.cpp (CPU tensors, the emulator)
// and probability_cuda.cpp (CUDA tensors), each after choosing the launchers' namespace (FASTKD_EMULATE_CUDA or
// FASTKD_CUDA_HOST) and defining FASTKD_GLUE_STREAM() and FASTKD_GLUE_GUARD(tensor).
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

#include "probability.h"
#include "../common/glue_common.h"

namespace fastkd {
namespace {  // one copy per including file: the two call different launchers

// terms: (B, H, W) double, ||softmax(s) - softmax(t)||^2 per pixel; s and t read in their own dtypes.
at::Tensor probability_forward_op(const at::Tensor& s, const at::Tensor& t) {
  constexpr const char* kOp = "probability_forward";
  glue::check_logits_pair(kOp, s, t);
  FASTKD_GLUE_GUARD(s);
  const auto doubles = s.options().dtype(at::kDouble);
  if (s.numel() == 0) return at::zeros({s.size(0), s.size(2), s.size(3)}, doubles);  // no channels: 0
  at::Tensor terms = at::empty({s.size(0), s.size(2), s.size(3)}, doubles);
  dispatch_pair(s, t, [&](const auto* s_data, const auto* t_data) {
    FASTKD_KERNELS::probability_forward(s_data, glue::map_of(s), t_data, glue::map_of(t), s.size(0),
                                        terms.mutable_data_ptr<double>(), FASTKD_GLUE_STREAM());
  });
  return terms;
}

// dL/ds (wrt 0) or dL/dt (wrt 1), in that input's dtype and layout, from dL/dterms ((B, H, W), any dtype).
at::Tensor probability_backward_op(const at::Tensor& grad_terms, const at::Tensor& s, const at::Tensor& t,
                                   int64_t wrt) {
  constexpr const char* kOp = "probability_backward";
  glue::check_logits_pair(kOp, s, t);
  glue::check_grad_terms(kOp, grad_terms, s);
  TORCH_CHECK(wrt == 0 || wrt == 1, "fastkd::", kOp, ": `wrt` must be 0 (s) or 1 (t), got ", wrt);
  FASTKD_GLUE_GUARD(s);
  at::Tensor grad = at::empty_like(wrt == 0 ? s : t);
  if (grad.numel() == 0) return grad;
  const at::Tensor g = grad_terms.to(at::kDouble).contiguous();
  dispatch_pair(s, t, [&](const auto* s_data, const auto* t_data) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(s_data)>>;
    using T = std::remove_const_t<std::remove_pointer_t<decltype(t_data)>>;
    FASTKD_KERNELS::probability_backward(g.const_data_ptr<double>(), s_data, glue::map_of(s), t_data,
                                         glue::map_of(t), s.size(0),
                                         wrt == 0 ? static_cast<S*>(grad.mutable_data_ptr()) : nullptr,
                                         wrt == 1 ? static_cast<T*>(grad.mutable_data_ptr()) : nullptr,
                                         glue::map_of(grad), FASTKD_GLUE_STREAM());
  });
  return grad;
}

}  // namespace
}  // namespace fastkd
