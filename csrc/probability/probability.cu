// CUDA kernels of the probability op, ||p_s - p_t||^2 with p = softmax(l) over the channels (FORMULAS.md
// section 4), and their launchers (compile with nvcc alone; the emulator runs this same file on the CPU through
// probability_emulated.cpp). The math is that of probability_cpu.cpp: with d = p_s - p_t and g = dL/dterms,
//   terms = sum_c d_c^2,   dL/ds_k = 2 g p_s,k (d_k - sum_c d_c p_s,c),   dL/dt_k = -2 g p_t,k (d_k - sum_c d_c p_t,c),
// NaN where a logit of the pixel is not finite, the gradient exactly 0 where g is 0.
//
// One thread per pixel (common/softmax_math.cuh: consecutive threads on consecutive pixels, so each channel's
// loads coalesce for NCHW; 64-bit offsets, any strides), looping over the channels and reading its pixel's
// logits in their own dtypes; all math in double registers; no shared memory, no atomics (each output is
// written by one thread). Both kernels first take one online pass over the channels: the running maxima m and
// sums S of e = exp(l - m), and the moments E_ss = sum e_s^2, E_st = sum e_s e_t, E_tt = sum e_t^2, each
// rescaled by the factors of the maxima when one rises. Then
//   terms = E_ss / S_s^2 - 2 E_st / (S_s S_t) + E_tt / S_t^2,
//   sum_c d_c p_s,c = E_ss / S_s^2 - E_st / (S_s S_t),   sum_c d_c p_t,c = E_st / (S_s S_t) - E_tt / S_t^2.
// The expanded terms carry an absolute error of a few ulp of sum_c p^2 <= 1 (~1e-16): their relative error
// grows as the loss of the pixel approaches 0 (it is not below 0: clamped), where the pixel no longer matters
// to the loss; summing d_c^2 directly instead would need a second read and two more exps per logit. The dots
// carry an absolute error of a few ulp of sum_c p^2, as a direct sum_c d_c p_c would (each d_c is off by a few
// ulp of p_c), so the gradient loses nothing to the expansion.
// Bytes per pixel, with C channels and b_s, b_t, b_g bytes per element of s, t and the gradient:
// Forward: one pass, one exp per logit: reads C (b_s + b_t), writes 8.
// Backward: two passes. The gradient of every channel needs the pixel's final maxima, sums and dot, known only
// after its last channel; holding the C exponentials per thread would take C registers (spilling to local
// memory beyond a few dozen channels) or shared memory (fewer resident blocks), so the second pass reads the
// logits again and recomputes both exponentials. A block's 256 pixels span 256 C (b_s + b_t) bytes (38 KiB
// for C = 19 float32), so the second read comes from L1 or L2 (50 MB on H100, 72 MB on RTX 4090) and DRAM sees
// C (b_s + b_t) + 8 read (dL/dterms) and C b_g written, the floor; at worst 2 C (b_s + b_t) + 8 + C b_g.
// Pixels with g = 0 read no logits: C b_g bytes. (With FP64 at 1/64 of FP32, as on RTX 4090, the double exps
// rather than DRAM may bound the time.)
#include "probability.h"

#include "../common/precision.cuh"
#include "../common/softmax_math.cuh"

namespace fastkd {
namespace FASTKD_KERNELS {
namespace {

using softmax::Map;
using softmax::kThreads;

// The statistics of one pixel: the online softmaxes of s and t, the moments E_ss, E_st, E_tt against their
// current maxima, and the poison (NaN if a logit is not finite).
struct Moments {
  softmax::Running s, t;
  double ss, st, tt, poison;
};

template <typename S, typename T>
FASTKD_DEVICE Moments moments(global_ptr<const S> s, std::int64_t s_channel, global_ptr<const T> t,
                              std::int64_t t_channel, std::int64_t channels) {
  const double s0 = to_double(s[0]), t0 = to_double(t[0]);
  Moments m{softmax::start(s0), softmax::start(t0), 1.0, 1.0, 1.0, softmax::poison_of(s0) + softmax::poison_of(t0)};
  S s_next = softmax::channel_ahead(s, s_channel, 1, channels);
  T t_next = softmax::channel_ahead(t, t_channel, 1, channels);
  for (std::int64_t c = 1; c < channels; ++c) {
    const double vs = to_double(s_next), vt = to_double(t_next);
    s_next = softmax::channel_ahead(s, s_channel, c + 1, channels);
    t_next = softmax::channel_ahead(t, t_channel, c + 1, channels);
    m.poison += softmax::poison_of(vs) + softmax::poison_of(vt);
    const softmax::Step ss = softmax::step(m.s, vs, 1.0), st = softmax::step(m.t, vt, 1.0);
    m.ss = m.ss * (ss.scale * ss.scale) + ss.e * ss.e;
    m.st = m.st * (ss.scale * st.scale) + ss.e * st.e;
    m.tt = m.tt * (st.scale * st.scale) + st.e * st.e;
    softmax::take(m.s, ss);
    softmax::take(m.t, st);
  }
  return m;
}

template <typename S, typename T>
FASTKD_GLOBAL void probability_forward_kernel(global_ptr<const S> s, Map s_map, global_ptr<const T> t, Map t_map,
                                              std::int64_t batch, global_ptr<double> terms) {
  const std::int64_t count = batch * s_map.height * s_map.width;
  for (std::int64_t index = softmax::first_pixel(); index < count; index += softmax::pixel_stride()) {
    const softmax::Pixel pixel = softmax::pixel_of(index, s_map.height, s_map.width);
    const Moments m = moments(s + softmax::offset_of(s_map, pixel), s_map.stride_c,
                              t + softmax::offset_of(t_map, pixel), t_map.stride_c, s_map.channels);
    const double inv_s = 1.0 / m.s.sum, inv_t = 1.0 / m.t.sum;
    const double squares = m.ss * inv_s * inv_s - 2.0 * (m.st * inv_s * inv_t) + m.tt * inv_t * inv_t;
    terms[index] = (squares < 0.0 ? 0.0 : squares) + m.poison;  // NaN stays NaN
  }
}

// dL/ds (kStudent) or dL/dt into grad (G: the storage type of that input).
template <bool kStudent, typename S, typename T, typename G>
FASTKD_GLOBAL void probability_backward_kernel(global_ptr<const double> grad_terms, global_ptr<const S> s, Map s_map,
                                               global_ptr<const T> t, Map t_map, std::int64_t batch, global_ptr<G> grad,
                                               Map grad_map) {
  const std::int64_t count = batch * s_map.height * s_map.width, channels = s_map.channels;
  for (std::int64_t index = softmax::first_pixel(); index < count; index += softmax::pixel_stride()) {
    const softmax::Pixel pixel = softmax::pixel_of(index, s_map.height, s_map.width);
    const global_ptr<G> out = grad + softmax::offset_of(grad_map, pixel);
    const double g = grad_terms[index];
    if (g == 0.0) {  // an uncounted pixel: exactly 0, whatever its logits
      for (std::int64_t c = 0; c < channels; ++c) out[c * grad_map.stride_c] = from_double<G>(0.0);
      continue;
    }
    const global_ptr<const S> s_pixel = s + softmax::offset_of(s_map, pixel);
    const global_ptr<const T> t_pixel = t + softmax::offset_of(t_map, pixel);
    const Moments m = moments(s_pixel, s_map.stride_c, t_pixel, t_map.stride_c, channels);
    const double inv_s = 1.0 / m.s.sum, inv_t = 1.0 / m.t.sum, cross = m.st * inv_s * inv_t;
    const double dot = kStudent ? m.ss * inv_s * inv_s - cross : cross - m.tt * inv_t * inv_t;  // sum_c d_c p_x,c
    const double scale = (kStudent ? 2.0 : -2.0) * g + m.poison;  // NaN in g or the logits stays NaN
    S s_next = s_pixel[0];
    T t_next = t_pixel[0];
    for (std::int64_t c = 0; c < channels; ++c) {
      const double ps = softmax::exp_of(to_double(s_next), m.s, 1.0) * inv_s;
      const double pt = softmax::exp_of(to_double(t_next), m.t, 1.0) * inv_t;
      s_next = softmax::channel_ahead(s_pixel, s_map.stride_c, c + 1, channels);
      t_next = softmax::channel_ahead(t_pixel, t_map.stride_c, c + 1, channels);
      out[c * grad_map.stride_c] = from_double<G>(scale * (kStudent ? ps : pt) * ((ps - pt) - dot));
    }
  }
}

}  // namespace

template <typename S, typename T>
void probability_forward(const S* s, const Map& s_map, const T* t, const Map& t_map, std::int64_t batch,
                         double* terms, fastkd_stream_t stream) {
  const unsigned blocks = softmax::blocks_for(batch * s_map.height * s_map.width);
  FASTKD_LAUNCH((probability_forward_kernel<S, T>), dim3(blocks), dim3(kThreads), stream, s, s_map, t, t_map, batch,
                terms);
}

template <typename S, typename T>
void probability_backward(const double* grad_terms, const S* s, const Map& s_map, const T* t, const Map& t_map,
                          std::int64_t batch, S* grad_s, T* grad_t, const Map& grad_map, fastkd_stream_t stream) {
  const unsigned blocks = softmax::blocks_for(batch * s_map.height * s_map.width);
  if (grad_s != nullptr) {
    FASTKD_LAUNCH((probability_backward_kernel<true, S, T, S>), dim3(blocks), dim3(kThreads), stream, grad_terms, s,
                  s_map, t, t_map, batch, grad_s, grad_map);
  } else {
    FASTKD_LAUNCH((probability_backward_kernel<false, S, T, T>), dim3(blocks), dim3(kThreads), stream, grad_terms, s,
                  s_map, t, t_map, batch, grad_t, grad_map);
  }
}

#define FASTKD_INSTANTIATE(S, T)                                                                                   \
  template void probability_forward<S, T>(const S*, const Map&, const T*, const Map&, std::int64_t, double*,      \
                                          fastkd_stream_t);                                                       \
  template void probability_backward<S, T>(const double*, const S*, const Map&, const T*, const Map&, std::int64_t, \
                                           S*, T*, const Map&, fastkd_stream_t);
FASTKD_FOR_EACH_STORAGE_PAIR(FASTKD_INSTANTIATE)
#undef FASTKD_INSTANTIATE

}  // namespace FASTKD_KERNELS
}  // namespace fastkd
