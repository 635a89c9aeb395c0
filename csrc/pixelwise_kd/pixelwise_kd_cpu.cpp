// The CPU implementation of fastkd::pixelwise_kd_forward / _backward (schema: pixelwise_kd_schema.cpp;
// backend="cpp"; FORMULAS.md section 5): per pixel KL(q_t || q_s), q = softmax(l / T) over the channels.
//
// Blocks of pixels in parallel (common/softmax_block_cpu.h), each block's logits read in their own dtypes and its
// softmaxes computed in double. With z = (l - max) / T, e = exp(z) and the block's sums S = sum_c e and
// X = sum_c e_t (z_t - z_s):
//   KL = sum_c q_t (log q_t - log q_s) = X / S_t + log(S_s / S_t)
// (log q = z - log S). Forward: one pass over the logits, the (B, H, W) double terms written. Backward, given
// g = dL/dterms, recomputes the block's softmaxes (nothing but the inputs is saved) and writes
//   dL/ds = g / T (q_s - q_t),    dL/dt = g / T q_t (z_t - z_s - X / S_t)
// (the teacher's: d KL / dz_t = q_t (log q_t - log q_s - KL), and log q_t - log q_s - KL = z_t - z_s - X / S_t),
// exactly 0 where g is 0, NaN where a logit of a counted pixel is not finite. No full-size temporaries: the
// gradient is written once, in the input's dtype and layout.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "../common/softmax_block_cpu.h"

namespace fastkd {
namespace cpu {
namespace {

namespace sb = softmax_block;

constexpr const char* kForwardName = "fastkd::pixelwise_kd_forward";
constexpr const char* kBackwardName = "fastkd::pixelwise_kd_backward";

void check_temperature(double temperature, const char* op) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": `temperature` must be finite and > 0, got ",
              temperature);
}

// The block's KL terms into out[0 .. lanes).
FASTKD_CPU_CLONES void kl_terms(const sb::Block& block, double* out) {
  for (std::int64_t p = 0; p < block.lanes; ++p) {
    out[p] = block.cross[p] / block.sum_t[p] + std::log(block.sum_s[p] / block.sum_t[p]) + block.poison[p];
  }
}

// The block's gradient with respect to s (kStudent) or t, from its softmaxes and g = dL/dterms of its pixels.
template <bool kUnit, bool kStudent, typename S, typename T, typename G>
FASTKD_CPU_CLONES void kl_gradient(const sb::GradientBlock<S, T, G>& io) {
  const sb::Block& block = io.block;
  const std::int64_t lanes = block.lanes;
  const double inv_t = io.inv_t;
  const sb::Pixels<kUnit> ps{block.offsets_s, io.p0}, pt{block.offsets_t, io.p0}, pg{block.offsets_grad, io.p0};
  double scale_s[sb::kMaxLanes], scale_t[sb::kMaxLanes], shift[sb::kMaxLanes];
  for (std::int64_t p = 0; p < lanes; ++p) {  // q = e * scale; NaN in g or the logits stays NaN
    const double common = io.g[p] * inv_t + block.poison[p];
    scale_s[p] = common / block.sum_s[p];
    scale_t[p] = common / block.sum_t[p];
    shift[p] = block.cross[p] / block.sum_t[p];
  }
  const double* e_s = block.e_s.data();
  const double* e_t = block.e_t.data();
  const double* g = io.g;
  for (std::int64_t c = 0; c < block.channels; ++c) {
    const S* s_channel = ps.start(io.s_image + c * io.s_layout.channel);
    const T* t_channel = pt.start(io.t_image + c * io.t_layout.channel);
    G* grad_channel = pg.start(io.grad_image + c * io.grad_layout.channel);
#pragma omp simd
    for (std::int64_t p = 0; p < lanes; ++p) {
      double value;
      if (kStudent) {
        value = e_s[c * lanes + p] * scale_s[p] - e_t[c * lanes + p] * scale_t[p];
      } else {
        const double zs = (to_double(s_channel[ps(p)]) - block.max_s[p]) * inv_t;
        const double zt = (to_double(t_channel[pt(p)]) - block.max_t[p]) * inv_t;
        value = e_t[c * lanes + p] * scale_t[p] * (zt - zs - shift[p]);
      }
      grad_channel[pg(p)] = from_double<G>(g[p] == 0.0 ? 0.0 : value);
    }
  }
}

at::Tensor pixelwise_kd_forward(const at::Tensor& s, const at::Tensor& t, double temperature) {
  sb::check_logits(s, t, kForwardName);
  check_temperature(temperature, kForwardName);
  return sb::per_pixel_terms<false>(s, t, 1.0 / temperature, kl_terms);
}

at::Tensor pixelwise_kd_backward(const at::Tensor& grad_terms, const at::Tensor& s, const at::Tensor& t,
                                 double temperature, int64_t wrt) {
  sb::check_logits(s, t, kBackwardName);
  sb::check_grad_terms(grad_terms, s, kBackwardName);
  check_temperature(temperature, kBackwardName);
  TORCH_CHECK(wrt == 0 || wrt == 1, kBackwardName, ": `wrt` must be 0 (s) or 1 (t), got ", wrt);
  return sb::per_pixel_gradient(grad_terms, s, t, wrt, 1.0 / temperature, [](auto unit, auto student, const auto& io) {
    kl_gradient<decltype(unit)::value, decltype(student)::value>(io);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("pixelwise_kd_forward", &fastkd::cpu::pixelwise_kd_forward);
  m.impl("pixelwise_kd_backward", &fastkd::cpu::pixelwise_kd_backward);
}
