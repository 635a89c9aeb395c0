// The CPU implementation of fastkd::probability_forward / _backward (schema: probability_schema.cpp;
// backend="cpp"; FORMULAS.md section 4): per pixel ||p_s - p_t||^2, p = softmax(l) over the channels.
//
// Blocks of pixels in parallel (common/softmax_block_cpu.h), each block's logits read in their own dtypes and its
// softmaxes computed in double, e = exp(l - max) kept in the block's buffers. With d = p_s - p_t:
//   terms = sum_c d_c^2,
//   dL/ds_k = 2 g p_s,k (d_k - sum_c d_c p_s,c),    dL/dt_k = -2 g p_t,k (d_k - sum_c d_c p_t,c)
// (the softmax Jacobian dp_c/dl_k = p_c (delta_ck - p_k)), g = dL/dterms. Forward: one pass over the logits,
// the (B, H, W) double terms written. Backward recomputes the block's softmaxes (nothing but the inputs is saved)
// and writes the gradient once, in the input's dtype and layout: exactly 0 where g is 0, NaN where a logit of a
// counted pixel is not finite.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/softmax_block_cpu.h"

namespace fastkd {
namespace cpu {
namespace {

namespace sb = softmax_block;

constexpr const char* kForwardName = "fastkd::probability_forward";
constexpr const char* kBackwardName = "fastkd::probability_backward";

// The block's terms sum_c (p_s - p_t)^2 into out[0 .. lanes).
FASTKD_CPU_CLONES void squared_distances(const sb::Block& block, double* out) {
  const std::int64_t lanes = block.lanes;
  double inv_s[sb::kMaxLanes], inv_t[sb::kMaxLanes];
  for (std::int64_t p = 0; p < lanes; ++p) {
    inv_s[p] = 1.0 / block.sum_s[p];
    inv_t[p] = 1.0 / block.sum_t[p];
    out[p] = block.poison[p];
  }
  const double* e_s = block.e_s.data();
  const double* e_t = block.e_t.data();
  for (std::int64_t c = 0; c < block.channels; ++c) {
#pragma omp simd
    for (std::int64_t p = 0; p < lanes; ++p) {
      const double d = e_s[c * lanes + p] * inv_s[p] - e_t[c * lanes + p] * inv_t[p];
      out[p] += d * d;
    }
  }
}

// The block's gradient with respect to s (kStudent) or t, from its softmaxes and g = dL/dterms of its pixels.
template <bool kUnit, bool kStudent, typename S, typename T, typename G>
FASTKD_CPU_CLONES void squared_distance_gradient(const sb::GradientBlock<S, T, G>& io) {
  const sb::Block& block = io.block;
  const std::int64_t lanes = block.lanes;
  const sb::Pixels<kUnit> pg{block.offsets_grad, io.p0};
  const double* g = io.g;
  double inv_s[sb::kMaxLanes], inv_t[sb::kMaxLanes], dot[sb::kMaxLanes], scale[sb::kMaxLanes];
  for (std::int64_t p = 0; p < lanes; ++p) {
    inv_s[p] = 1.0 / block.sum_s[p];
    inv_t[p] = 1.0 / block.sum_t[p];
    dot[p] = 0.0;
    scale[p] = (kStudent ? 2.0 : -2.0) * g[p] + block.poison[p];
  }
  const double* e_s = block.e_s.data();
  const double* e_t = block.e_t.data();
  const double* e_x = kStudent ? e_s : e_t;
  const double* inv_x = kStudent ? inv_s : inv_t;
  for (std::int64_t c = 0; c < block.channels; ++c) {  // dot = sum_c d_c p_x,c
#pragma omp simd
    for (std::int64_t p = 0; p < lanes; ++p) {
      const double d = e_s[c * lanes + p] * inv_s[p] - e_t[c * lanes + p] * inv_t[p];
      dot[p] += d * e_x[c * lanes + p] * inv_x[p];
    }
  }
  for (std::int64_t c = 0; c < block.channels; ++c) {
    G* grad_channel = pg.start(io.grad_image + c * io.grad_layout.channel);
#pragma omp simd
    for (std::int64_t p = 0; p < lanes; ++p) {
      const double d = e_s[c * lanes + p] * inv_s[p] - e_t[c * lanes + p] * inv_t[p];
      const double value = scale[p] * e_x[c * lanes + p] * inv_x[p] * (d - dot[p]);
      grad_channel[pg(p)] = from_double<G>(g[p] == 0.0 ? 0.0 : value);
    }
  }
}

at::Tensor probability_forward(const at::Tensor& s, const at::Tensor& t) {
  sb::check_logits(s, t, kForwardName);
  return sb::per_pixel_terms<true>(s, t, 1.0, squared_distances);
}

at::Tensor probability_backward(const at::Tensor& grad_terms, const at::Tensor& s, const at::Tensor& t, int64_t wrt) {
  sb::check_logits(s, t, kBackwardName);
  sb::check_grad_terms(grad_terms, s, kBackwardName);
  TORCH_CHECK(wrt == 0 || wrt == 1, kBackwardName, ": `wrt` must be 0 (s) or 1 (t), got ", wrt);
  return sb::per_pixel_gradient(grad_terms, s, t, wrt, 1.0, [](auto unit, auto student, const auto& io) {
    squared_distance_gradient<decltype(unit)::value, decltype(student)::value>(io);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("probability_forward", &fastkd::cpu::probability_forward);
  m.impl("probability_backward", &fastkd::cpu::probability_backward);
}
