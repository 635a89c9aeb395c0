// What the C++ CPU implementations of the per-pixel ops (pixelwise_kd_cpu.cpp, probability_cpu.cpp) share: the
// channel softmaxes of a block of pixels of s and t, in double, read once from the logits in their own dtypes.
//
// A block is up to kMaxLanes consecutive pixels of one image in the flattened H x W order. Its logits are read
// channel by channel, each channel a run of the block's pixels (contiguous for NCHW tensors), so the inner loops
// run over pixels and vectorise: the per-pixel sums are arrays of doubles and exp is a branch-free polynomial
// (exp_nonpositive). Three passes over the block's channels, the first from memory, the others from cache:
//   1. the per-pixel maxima of s and t, and a NaN flag of every logit that is not finite;
//   2. e = exp((l - max) / T) into the block's buffers, their sums, and (for KD) sum e_t (z_t - z_s);
//   3. the op's own: its loss per pixel, or its gradient from the buffers.
// Each block is one task of at::parallel_for and writes only its own pixels: no reductions across threads,
// so results are bitwise the same for any number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_clones.h"
#include "huge_pages_cpu.h"
#include "precision.cuh"

namespace fastkd {
namespace cpu {
namespace softmax_block {

constexpr std::int64_t kMaxLanes = 256;       // pixels per block
constexpr std::int64_t kBufferDoubles = 8192;  // e_s and e_t of a block: 2 x 64 KiB, in L2

inline double bits_to_double(std::int64_t bits) { return __builtin_bit_cast(double, bits); }

inline std::int64_t double_to_bits(double value) { return __builtin_bit_cast(std::int64_t, value); }

// exp(x) for x <= 0 (NaN stays NaN), within 2 ulp; branch-free, so loops over it vectorise. x = n ln2 + r
// with n integral and |r| <= ln2 / 2 (ln2 split in a high part exact in n * ln2_hi and a low part), exp(r) by its
// Taylor series to r^13 (truncation < 5e-18), times 2^n built in the exponent bits. Below -708 the result is
// exp(-708) ~ 3e-308 instead of a subnormal or 0: a probability no sum can tell from 0.
inline double exp_nonpositive(double x) {
  constexpr double kLog2e = 1.4426950408889634;
  constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52: x * log2(e) + kRound has n in its low bits
  constexpr double kLn2High = 6.93147180369123816490e-01, kLn2Low = 1.90821492927058770002e-10;
  x = x < -708.0 ? -708.0 : x;
  const double shifted = x * kLog2e + kRound;
  const double n = shifted - kRound;
  const double r = (x - n * kLn2High) - n * kLn2Low;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const std::int64_t exponent = double_to_bits(shifted) - double_to_bits(kRound) + 1023;  // n + 1023 >= 1
  return p * bits_to_double(exponent << 52);
}

// How a (B, C, H, W) tensor's elements are addressed: pixel p of image b, channel c at
// b * batch + c * channel + offset(p), offset(p) = p * pixel where H x W flattens to one stride (NCHW and any
// layout with a single row or column), else (p / W) * row + (p % W) * column.
struct Layout {
  std::int64_t batch, channel, row, column, width;
  bool flat;
  std::int64_t pixel;
};

inline Layout layout_of(const at::Tensor& x) {
  const std::int64_t height = x.size(2), width = x.size(3);
  Layout layout{x.stride(0), x.stride(1), x.stride(2), x.stride(3), width, false, 0};
  if (height == 1 || x.stride(2) == width * x.stride(3)) {
    layout.flat = true;
    layout.pixel = x.stride(3);
  } else if (width == 1) {
    layout.flat = true;
    layout.pixel = x.stride(2);
  }
  return layout;
}

// The element offsets of the block's pixels p0 .. p0 + lanes - 1 (relative to their image and channel 0).
inline void pixel_offsets(const Layout& layout, std::int64_t p0, std::int64_t lanes, std::int64_t* offsets) {
  for (std::int64_t p = 0; p < lanes; ++p) {
    const std::int64_t pixel = p0 + p;
    offsets[p] = layout.flat ? pixel * layout.pixel
                             : (pixel / layout.width) * layout.row + (pixel % layout.width) * layout.column;
  }
}

// The per-pixel softmax state of one block of s and t, and the buffers of e_s and e_t (channel-major:
// e[c * lanes + p]).
struct Block {
  std::int64_t lanes = 0, channels = 0;
  double max_s[kMaxLanes], max_t[kMaxLanes];
  double sum_s[kMaxLanes], sum_t[kMaxLanes];
  double cross[kMaxLanes];   // sum_c e_t (z_t - z_s), z = (l - max) / T
  double poison[kMaxLanes];  // 0, or NaN where a logit of the pixel is not finite
  std::int64_t offsets_s[kMaxLanes], offsets_t[kMaxLanes], offsets_grad[kMaxLanes];
  std::vector<double> e_s, e_t;
};

// Pixels per block for C channels: as many as fit kMaxLanes and the buffers (at least 1).
inline std::int64_t lanes_for(std::int64_t channels) {
  return std::max<std::int64_t>(1, std::min<std::int64_t>(kMaxLanes, kBufferDoubles / std::max<std::int64_t>(1, channels)));
}

// Element p of the block in one channel of a tensor: channel[p] where every tensor of the op has unit pixel
// stride (kUnit: contiguous NCHW, whose runs of pixels vectorise; `channel` then points at the block's first
// pixel), else channel[offsets[p]].
template <bool kUnit>
struct Pixels {
  const std::int64_t* offsets;
  std::int64_t p0;
  template <typename T>
  T* start(T* channel) const { return kUnit ? channel + p0 : channel; }
  std::int64_t operator()(std::int64_t p) const { return kUnit ? p : offsets[p]; }
};

// Whether s, t and the gradient (if defined) all have unit pixel stride.
inline bool unit_pixels(std::initializer_list<Layout> layouts) {
  for (const Layout& layout : layouts) {
    if (!layout.flat || layout.pixel != 1) return false;
  }
  return true;
}

// Sets up the block of `lanes` pixels from p0 of one image: its size and the offsets of its pixels in s, t and
// (if given) the gradient.
inline void start_block(Block& block, std::int64_t channels, std::int64_t p0, std::int64_t lanes,
                        const Layout& s_layout, const Layout& t_layout, const Layout* grad_layout) {
  block.lanes = lanes;
  block.channels = channels;
  pixel_offsets(s_layout, p0, lanes, block.offsets_s);
  pixel_offsets(t_layout, p0, lanes, block.offsets_t);
  if (grad_layout != nullptr) pixel_offsets(*grad_layout, p0, lanes, block.offsets_grad);
  if (static_cast<std::int64_t>(block.e_s.size()) < lanes * channels) {
    block.e_s.resize(static_cast<std::size_t>(lanes * channels));
    block.e_t.resize(static_cast<std::size_t>(lanes * channels));
  }
}

// Passes 1 and 2 over the started block: maxima, poison, e = exp((l - max) * inv_t) into the buffers (if
// kStore), their sums and sum_c e_t (z_t - z_s). s_image and t_image point at the block's image.
template <bool kUnit, bool kStore, typename S, typename T>
FASTKD_CPU_CLONES void softmaxes(const S* s_image, const Layout& s_layout, const T* t_image, const Layout& t_layout,
                                 std::int64_t p0, double inv_t, Block& block) {
  const std::int64_t lanes = block.lanes, channels = block.channels;
  const Pixels<kUnit> ps{block.offsets_s, p0}, pt{block.offsets_t, p0};
  double* max_s = block.max_s;
  double* max_t = block.max_t;
  double* sum_s = block.sum_s;
  double* sum_t = block.sum_t;
  double* cross = block.cross;
  double* poison = block.poison;
  const double infinity = std::numeric_limits<double>::infinity();
  for (std::int64_t p = 0; p < lanes; ++p) {
    max_s[p] = max_t[p] = -infinity;
    poison[p] = sum_s[p] = sum_t[p] = cross[p] = 0.0;
  }
  for (std::int64_t c = 0; c < channels; ++c) {
    const S* s_channel = ps.start(s_image + c * s_layout.channel);
    const T* t_channel = pt.start(t_image + c * t_layout.channel);
#pragma omp simd
    for (std::int64_t p = 0; p < lanes; ++p) {
      const double vs = to_double(s_channel[ps(p)]), vt = to_double(t_channel[pt(p)]);
      max_s[p] = vs > max_s[p] ? vs : max_s[p];
      max_t[p] = vt > max_t[p] ? vt : max_t[p];
      poison[p] += (vs - vs) + (vt - vt);  // NaN for NaN and +-Inf: x - x
    }
  }
  double* e_s = block.e_s.data();
  double* e_t = block.e_t.data();
  for (std::int64_t c = 0; c < channels; ++c) {
    const S* s_channel = ps.start(s_image + c * s_layout.channel);
    const T* t_channel = pt.start(t_image + c * t_layout.channel);
#pragma omp simd
    for (std::int64_t p = 0; p < lanes; ++p) {
      const double zs = (to_double(s_channel[ps(p)]) - max_s[p]) * inv_t;
      const double zt = (to_double(t_channel[pt(p)]) - max_t[p]) * inv_t;
      const double es = exp_nonpositive(zs), et = exp_nonpositive(zt);
      sum_s[p] += es;
      sum_t[p] += et;
      cross[p] += et * (zt - zs);
      if (kStore) {
        e_s[c * lanes + p] = es;
        e_t[c * lanes + p] = et;
      }
    }
  }
}

// Runs body(b, p0, lanes, block) for every block of every image of a (B, C, H, W) input, blocks in parallel,
// each task with its own Block.
template <typename Body>
void for_each_block(std::int64_t batch, std::int64_t pixels, std::int64_t channels, const Body& body) {
  const std::int64_t lanes = lanes_for(channels);
  const std::int64_t blocks_per_image = (pixels + lanes - 1) / lanes;
  at::parallel_for(0, batch * blocks_per_image, 1, [&](std::int64_t begin, std::int64_t end) {
    Block block;
    for (std::int64_t index = begin; index < end; ++index) {
      const std::int64_t b = index / blocks_per_image, p0 = (index % blocks_per_image) * lanes;
      body(b, p0, std::min(lanes, pixels - p0), block);
    }
  });
}

// f(s_data, t_data) with the data pointers of s and t in their own storage types.
template <typename F>
void dispatch_pair(const at::Tensor& s, const at::Tensor& t, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "per_pixel_s", [&] {
    const scalar_t* s_data = s.const_data_ptr<scalar_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "per_pixel_t",
                                    [&] { f(s_data, t.const_data_ptr<scalar_t>()); });
  });
}

// What a block's gradient pass reads and writes: the block's image of s, t and the gradient, and g = dL/dterms
// of its pixels.
template <typename S, typename T, typename G>
struct GradientBlock {
  const S* s_image;
  const Layout& s_layout;
  const T* t_image;
  const Layout& t_layout;
  G* grad_image;
  const Layout& grad_layout;
  const double* g;
  std::int64_t p0;
  double inv_t;
  const Block& block;
};

// The (B, H, W) double terms of a per-pixel op: for every block, passes 1 and 2 (filling the buffers if
// kStore), then finish(block, out) writes the block's terms to out[0 .. lanes).
template <bool kStore, typename Finish>
at::Tensor per_pixel_terms(const at::Tensor& s, const at::Tensor& t, double inv_t, const Finish& finish) {
  const std::int64_t batch = s.size(0), channels = s.size(1), pixels = s.size(2) * s.size(3);
  at::Tensor terms = at::zeros({batch, s.size(2), s.size(3)}, s.options().dtype(at::kDouble));
  if (terms.numel() == 0 || channels == 0) return terms;  // no channels: a loss over nothing is 0
  const Layout s_layout = layout_of(s), t_layout = layout_of(t);
  const bool unit = unit_pixels({s_layout, t_layout});
  double* out = terms.mutable_data_ptr<double>();
  dispatch_pair(s, t, [&](const auto* s_data, const auto* t_data) {
    for_each_block(batch, pixels, channels, [&](std::int64_t b, std::int64_t p0, std::int64_t lanes, Block& block) {
      start_block(block, channels, p0, lanes, s_layout, t_layout, nullptr);
      const auto* s_image = s_data + b * s_layout.batch;
      const auto* t_image = t_data + b * t_layout.batch;
      if (unit) {
        softmaxes<true, kStore>(s_image, s_layout, t_image, t_layout, p0, inv_t, block);
      } else {
        softmaxes<false, kStore>(s_image, s_layout, t_image, t_layout, p0, inv_t, block);
      }
      finish(block, out + b * pixels + p0);
    });
  });
  return terms;
}

// dL/ds (wrt 0) or dL/dt (wrt 1) of a per-pixel op from grad_terms, in that input's dtype and layout: for every
// block, passes 1 and 2 with the buffers, then gradient(unit, student, GradientBlock) writes the block's
// gradient (unit and student as std::integral_constant<bool, ...>).
template <typename Gradient>
at::Tensor per_pixel_gradient(const at::Tensor& grad_terms, const at::Tensor& s, const at::Tensor& t, int64_t wrt,
                              double inv_t, const Gradient& gradient) {
  at::Tensor grad = empty_like_on_huge_pages(wrt == 0 ? s : t);
  const std::int64_t batch = s.size(0), channels = s.size(1), pixels = s.size(2) * s.size(3);
  if (grad.numel() == 0) return grad;
  const at::Tensor g = grad_terms.to(at::kDouble).contiguous();
  const double* g_data = g.const_data_ptr<double>();
  const Layout s_layout = layout_of(s), t_layout = layout_of(t), grad_layout = layout_of(grad);
  const bool unit = unit_pixels({s_layout, t_layout, grad_layout});
  dispatch_pair(s, t, [&](const auto* s_data, const auto* t_data) {
    const auto run = [&](auto* grad_data, auto student) {
      for_each_block(batch, pixels, channels, [&](std::int64_t b, std::int64_t p0, std::int64_t lanes, Block& block) {
        start_block(block, channels, p0, lanes, s_layout, t_layout, &grad_layout);
        const auto* s_image = s_data + b * s_layout.batch;
        const auto* t_image = t_data + b * t_layout.batch;
        const GradientBlock<std::remove_const_t<std::remove_pointer_t<decltype(s_data)>>,
                            std::remove_const_t<std::remove_pointer_t<decltype(t_data)>>,
                            std::remove_pointer_t<decltype(grad_data)>>
            io{s_image, s_layout, t_image, t_layout, grad_data + b * grad_layout.batch, grad_layout,
               g_data + b * pixels + p0, p0, inv_t, block};
        if (unit) {
          softmaxes<true, true>(s_image, s_layout, t_image, t_layout, p0, inv_t, block);
          gradient(std::true_type{}, student, io);
        } else {
          softmaxes<false, true>(s_image, s_layout, t_image, t_layout, p0, inv_t, block);
          gradient(std::false_type{}, student, io);
        }
      });
    };
    using S = std::remove_const_t<std::remove_pointer_t<decltype(s_data)>>;
    using T = std::remove_const_t<std::remove_pointer_t<decltype(t_data)>>;
    if (wrt == 0) {
      run(grad.mutable_data_ptr<S>(), std::true_type{});
    } else {
      run(grad.mutable_data_ptr<T>(), std::false_type{});
    }
  });
  return grad;
}

// The checks every per-pixel op makes of its logits s and t (one shape) and of grad_terms (B, H, W).
inline void check_logits(const at::Tensor& s, const at::Tensor& t, const char* op) {
  for (const auto& [x, name] : {std::pair<const at::Tensor&, const char*>{s, "s"}, {t, "t"}}) {
    TORCH_CHECK(x.dim() == 4, op, ": `", name, "` must be (B, C, H, W), got ", x.dim(), " dimensions");
    TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": `", name, "` must be floating point, got ",
                x.scalar_type());
    TORCH_CHECK(x.device().is_cpu(), op, ": `", name, "` must be a CPU tensor, got one on ", x.device());
  }
  TORCH_CHECK(s.sizes() == t.sizes(), op, ": `s` and `t` must have one shape, got ", s.sizes(), " and ", t.sizes());
}

inline void check_grad_terms(const at::Tensor& grad_terms, const at::Tensor& s, const char* op) {
  TORCH_CHECK(grad_terms.sizes() == at::IntArrayRef({s.size(0), s.size(2), s.size(3)}), op,
              ": `grad_terms` must be (B, H, W) = (", s.size(0), ", ", s.size(2), ", ", s.size(3), "), got ",
              grad_terms.sizes());
  TORCH_CHECK(grad_terms.device().is_cpu(), op, ": `grad_terms` must be a CPU tensor");
}

}  // namespace softmax_block
}  // namespace cpu
}  // namespace fastkd
