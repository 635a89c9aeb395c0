// CUDA kernels of the per-pixel KD op, KL(q_t || q_s) with q = softmax(l / T) over the channels (FORMULAS.md
// section 5), and their launchers (compile with nvcc alone; the emulator runs this same file on the CPU through
// pixelwise_kd_emulated.cpp). The math is that of pixelwise_kd_cpu.cpp: with z = (l - max) / T, e = exp(z),
// S = sum_c e and X = sum_c e_t (z_t - z_s),
//   KL = X / S_t + log(S_s / S_t),   dL/ds = g / T (q_s - q_t),   dL/dt = g / T q_t (z_t - z_s - X / S_t),
// g = dL/dterms, NaN where a logit of the pixel is not finite, the gradient exactly 0 where g is 0.
//
// One thread per pixel (common/softmax_math.cuh: consecutive threads on consecutive pixels, so each channel's
// loads coalesce for NCHW; 64-bit offsets, any strides), looping over the channels and reading its pixel's
// logits in their own dtypes; all math in double registers; no shared memory, no atomics (each output is
// written by one thread). Bytes per pixel, with C channels and b_s, b_t, b_g bytes per element of s, t and the
// gradient:
// Forward: one pass, the online softmaxes of s and t (running maxima, rescaled sums, and X rescaled with them:
// X' = a_t (X + (shift_t - shift_s) S_t) when a max rises), one exp per logit: reads C (b_s + b_t), writes 8.
// Backward: two passes. The gradient of every channel needs the pixel's final maxima, sums and X, known only
// after its last channel; holding the C exponentials per thread would take C registers (spilling to local
// memory beyond a few dozen channels) or shared memory (fewer resident blocks), so the second pass reads the
// logits again and recomputes the exponentials. A block's 256 pixels span 256 C (b_s + b_t) bytes (38 KiB for
// C = 19 float32), so the second read comes from L1 or L2 (50 MB on H100, 72 MB on RTX 4090) and DRAM sees
// C (b_s + b_t) + 8 read (dL/dterms) and C b_g written, the floor; at worst 2 C (b_s + b_t) + 8 + C b_g.
// Exps: two per channel in the first pass, two (student) or one (teacher) in the second. Pixels with g = 0
// read no logits: C b_g bytes. (With FP64 at 1/64 of FP32, as on RTX 4090, the double exps rather than DRAM
// may bound the time.)
#include "pixelwise_kd.h"

#include "../common/precision.cuh"
#include "../common/softmax_math.cuh"

namespace fastkd {
namespace FASTKD_KERNELS {
namespace {

using softmax::Map;
using softmax::kThreads;

// The statistics of one pixel: the online softmaxes of s and t, X = sum_c e_t (z_t - z_s) against their
// current maxima, and the poison (NaN if a logit is not finite).
struct KlStatistics {
  softmax::Running s, t;
  double cross, poison;
};

template <typename S, typename T>
FASTKD_DEVICE KlStatistics kl_statistics(global_ptr<const S> s, std::int64_t s_channel, global_ptr<const T> t,
                                         std::int64_t t_channel, std::int64_t channels, double inv_t) {
  const double s0 = to_double(s[0]), t0 = to_double(t[0]);
  KlStatistics k{softmax::start(s0), softmax::start(t0), 0.0, softmax::poison_of(s0) + softmax::poison_of(t0)};
  S s_next = softmax::channel_ahead(s, s_channel, 1, channels);
  T t_next = softmax::channel_ahead(t, t_channel, 1, channels);
  for (std::int64_t c = 1; c < channels; ++c) {
    const double vs = to_double(s_next), vt = to_double(t_next);
    s_next = softmax::channel_ahead(s, s_channel, c + 1, channels);
    t_next = softmax::channel_ahead(t, t_channel, c + 1, channels);
    k.poison += softmax::poison_of(vs) + softmax::poison_of(vt);
    const softmax::Step ss = softmax::step(k.s, vs, inv_t), st = softmax::step(k.t, vt, inv_t);
    // the old terms' z_t - z_s move by shift_t - shift_s and their e_t by the factor a_t
    k.cross = st.scale * (k.cross + (st.shift - ss.shift) * k.t.sum) + st.e * (st.z - ss.z);
    softmax::take(k.s, ss);
    softmax::take(k.t, st);
  }
  return k;
}

template <typename S, typename T>
FASTKD_GLOBAL void pixelwise_kd_forward_kernel(global_ptr<const S> s, Map s_map, global_ptr<const T> t, Map t_map,
                                               std::int64_t batch, double inv_t, global_ptr<double> terms) {
  const std::int64_t count = batch * s_map.height * s_map.width;
  for (std::int64_t index = softmax::first_pixel(); index < count; index += softmax::pixel_stride()) {
    const softmax::Pixel pixel = softmax::pixel_of(index, s_map.height, s_map.width);
    const KlStatistics k = kl_statistics(s + softmax::offset_of(s_map, pixel), s_map.stride_c,
                                         t + softmax::offset_of(t_map, pixel), t_map.stride_c, s_map.channels, inv_t);
    terms[index] = k.cross / k.t.sum + log(k.s.sum / k.t.sum) + k.poison;
  }
}

// dL/ds (kStudent) or dL/dt into grad (G: the storage type of that input).
template <bool kStudent, typename S, typename T, typename G>
FASTKD_GLOBAL void pixelwise_kd_backward_kernel(global_ptr<const double> grad_terms, global_ptr<const S> s, Map s_map,
                                                global_ptr<const T> t, Map t_map, std::int64_t batch, double inv_t,
                                                global_ptr<G> grad, Map grad_map) {
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
    const KlStatistics k = kl_statistics(s_pixel, s_map.stride_c, t_pixel, t_map.stride_c, channels, inv_t);
    const double common = g * inv_t + k.poison;  // q = e * scale; NaN in g or the logits stays NaN
    const double scale_s = common / k.s.sum, scale_t = common / k.t.sum, shift = k.cross / k.t.sum;
    S s_next = s_pixel[0];
    T t_next = t_pixel[0];
    for (std::int64_t c = 0; c < channels; ++c) {
      const double vs = to_double(s_next), vt = to_double(t_next);
      s_next = softmax::channel_ahead(s_pixel, s_map.stride_c, c + 1, channels);
      t_next = softmax::channel_ahead(t_pixel, t_map.stride_c, c + 1, channels);
      const double et = softmax::exp_of(vt, k.t, inv_t);
      double value;
      if (kStudent) {
        value = softmax::exp_of(vs, k.s, inv_t) * scale_s - et * scale_t;
      } else {
        value = et * scale_t * ((vt - k.t.max) * inv_t - (vs - k.s.max) * inv_t - shift);
      }
      out[c * grad_map.stride_c] = from_double<G>(value);
    }
  }
}

}  // namespace

template <typename S, typename T>
void pixelwise_kd_forward(const S* s, const Map& s_map, const T* t, const Map& t_map, std::int64_t batch,
                          double temperature, double* terms, fastkd_stream_t stream) {
  const unsigned blocks = softmax::blocks_for(batch * s_map.height * s_map.width);
  FASTKD_LAUNCH((pixelwise_kd_forward_kernel<S, T>), dim3(blocks), dim3(kThreads), stream, s, s_map, t, t_map, batch,
                1.0 / temperature, terms);
}

template <typename S, typename T>
void pixelwise_kd_backward(const double* grad_terms, const S* s, const Map& s_map, const T* t, const Map& t_map,
                           std::int64_t batch, double temperature, S* grad_s, T* grad_t, const Map& grad_map,
                           fastkd_stream_t stream) {
  const unsigned blocks = softmax::blocks_for(batch * s_map.height * s_map.width);
  const double inv_t = 1.0 / temperature;
  if (grad_s != nullptr) {
    FASTKD_LAUNCH((pixelwise_kd_backward_kernel<true, S, T, S>), dim3(blocks), dim3(kThreads), stream, grad_terms, s,
                  s_map, t, t_map, batch, inv_t, grad_s, grad_map);
  } else {
    FASTKD_LAUNCH((pixelwise_kd_backward_kernel<false, S, T, T>), dim3(blocks), dim3(kThreads), stream, grad_terms, s,
                  s_map, t, t_map, batch, inv_t, grad_t, grad_map);
  }
}

#define FASTKD_INSTANTIATE(S, T)                                                                                   \
  template void pixelwise_kd_forward<S, T>(const S*, const Map&, const T*, const Map&, std::int64_t, double,      \
                                           double*, fastkd_stream_t);                                             \
  template void pixelwise_kd_backward<S, T>(const double*, const S*, const Map&, const T*, const Map&,            \
                                            std::int64_t, double, S*, T*, const Map&, fastkd_stream_t);
FASTKD_FOR_EACH_STORAGE_PAIR(FASTKD_INSTANTIATE)
#undef FASTKD_INSTANTIATE

}  // namespace FASTKD_KERNELS
}  // namespace fastkd
