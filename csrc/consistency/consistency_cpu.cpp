// The CPU implementation of fastkd::consistency_forward / _backward (schema: consistency_schema.cpp;
// backend="cpp"; FORMULAS.md section 3): the per-pixel math of the CUDA kernels (consistency_math.cuh,
// compiled here as plain C++), run by at::parallel_for over the rows of the (B, H, W) map.
//
// Forward: each row (b, y) is handled by one thread, which writes c_s - c_t (double, 0 where c is
// undefined) for its pixels into the (B, H, W) map difference and the sum of their squares, in column
// order, into partials[b * H + y]. The partials are then summed by one thread in row order, so the loss is
// bitwise the same whatever the number of threads and however at::parallel_for splits the rows.
// Backward: each row (b, y) gathers dL/dl for all channels of its pixels from the map difference of their
// neighbours; every gradient element is written once (no atomics), into empty_like(x) at its own strides.
//
// Memory: the (B, H, W) difference and the (B * H) partials, both double; the inputs are read in place at
// any strides (no shifted copies, no (B, C, H, W) temporaries). Mixed student and teacher dtypes are not
// converted either: each is read in its own dtype and widened per element to double, which gives exactly
// what widening to the common dtype first would (float16/bfloat16 -> float32 -> float64 are exact).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "consistency_math.cuh"

namespace fastkd {
namespace cpu {
namespace {

// Work per at::parallel_for task: about this many (pixel, channel) visits, at least one row.
constexpr std::int64_t kGrainVisits = 1 << 15;

consistency::Map map_of(const at::Tensor& x) {
  return {x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

std::int64_t grain_rows(std::int64_t width, std::int64_t channels) {
  return std::max<std::int64_t>(1, kGrainVisits / std::max<std::int64_t>(1, width * channels));
}

void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, "`", name, "` must be (B, C, H, W), got ", x.dim(), " dimensions");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "`", name, "` must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "`", name, "` must be a CPU tensor, got one on ", x.device());
}

// The map difference and the per-row sums of its squares, for logits of (storage) types S and T.
template <typename S, typename T>
void forward_rows(const S* s, const consistency::Map& s_map, const T* t, const consistency::Map& t_map,
                  std::int64_t batch, std::int64_t dilation, bool valid, double* difference, double* partials) {
  const std::int64_t height = s_map.height, width = s_map.width;
  const std::int64_t grain = grain_rows(width, s_map.channels + t_map.channels);
  at::parallel_for(0, batch * height, grain, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t row = begin; row < end; ++row) {
      const std::int64_t b = row / height, y = row % height;
      double* out = difference + row * width;
      double squares = 0.0;
      for (std::int64_t x = 0; x < width; ++x) {
        double d = 0.0;
        if (consistency::defined(s_map, y, x, dilation, valid)) {
          d = consistency::neighbour_sum(s, s_map, b, y, x, dilation) -
              consistency::neighbour_sum(t, t_map, b, y, x, dilation);
        }
        out[x] = d;
        squares += d * d;
      }
      partials[row] = squares;
    }
  });
}

// grad = dL/dx for the loss sum: scale * gradient_at at every (b, c, y, x), rows in parallel. The loop over
// one row runs along the smaller of the gradient's channel and column strides, for contiguous writes.
template <typename T>
void backward_rows(const T* x, const consistency::Map& map, const double* difference, double scale,
                   std::int64_t batch, std::int64_t dilation, T* grad, const consistency::Map& grad_map) {
  const std::int64_t height = map.height, width = map.width, channels = map.channels;
  const bool columns_inner = grad_map.stride_w <= grad_map.stride_c;
  at::parallel_for(0, batch * height, grain_rows(width, channels), [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t row = begin; row < end; ++row) {
      const std::int64_t b = row / height, y = row % height;
      T* out = grad + b * grad_map.stride_b + y * grad_map.stride_h;
      if (columns_inner) {
        for (std::int64_t c = 0; c < channels; ++c) {
          for (std::int64_t col = 0; col < width; ++col) {
            out[c * grad_map.stride_c + col * grad_map.stride_w] =
                from_double<T>(scale * consistency::gradient_at(x, map, difference, b, c, y, col, dilation));
          }
        }
      } else {
        for (std::int64_t col = 0; col < width; ++col) {
          for (std::int64_t c = 0; c < channels; ++c) {
            out[c * grad_map.stride_c + col * grad_map.stride_w] =
                from_double<T>(scale * consistency::gradient_at(x, map, difference, b, c, y, col, dilation));
          }
        }
      }
    }
  });
}

// (loss_sum: 0-dim double, difference: (B, H, W) double) for logits s, t of one shape but their channels.
std::tuple<at::Tensor, at::Tensor> consistency_forward(const at::Tensor& s, const at::Tensor& t, bool valid,
                                                       int64_t dilation) {
  check_logits(s, "s");
  check_logits(t, "t");
  TORCH_CHECK(s.size(0) == t.size(0) && s.size(2) == t.size(2) && s.size(3) == t.size(3),
              "`s` and `t` must share B, H and W, got ", s.sizes(), " and ", t.sizes());
  TORCH_CHECK(dilation >= 1, "`dilation` must be >= 1, got ", dilation);
  const int64_t batch = s.size(0), height = s.size(2), width = s.size(3);
  const auto doubles = s.options().dtype(at::kDouble);
  at::Tensor difference = at::empty({batch, height, width}, doubles);
  if (difference.numel() == 0) return {at::zeros({}, doubles), difference};
  std::vector<double> partials(static_cast<std::size_t>(batch * height));
  const consistency::Map s_map = map_of(s), t_map = map_of(t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "consistency_forward", [&] {
    using s_t = scalar_t;
    const s_t* s_data = s.const_data_ptr<s_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "consistency_forward", [&] {
      forward_rows(s_data, s_map, t.const_data_ptr<scalar_t>(), t_map, batch, dilation, valid,
                   difference.mutable_data_ptr<double>(), partials.data());
    });
  });
  double total = 0.0;  // one thread, row order: independent of the number of threads
  for (const double partial : partials) total += partial;
  return {at::scalar_tensor(total, doubles), difference};
}

// dL/dx (x's dtype and layout) for the loss sum, given dL/dloss_sum (one element) and the forward's map
// difference; sign +1 for the student, -1 for the teacher.
at::Tensor consistency_backward(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& difference,
                                int64_t dilation, double sign) {
  check_logits(x, "x");
  TORCH_CHECK(dilation >= 1, "`dilation` must be >= 1, got ", dilation);
  TORCH_CHECK(grad_loss.numel() == 1, "`grad_loss` must have one element, got ", grad_loss.numel());
  TORCH_CHECK(difference.dim() == 3 && difference.size(0) == x.size(0) && difference.size(1) == x.size(2) &&
                  difference.size(2) == x.size(3),
              "`difference` must be (B, H, W) = (", x.size(0), ", ", x.size(2), ", ", x.size(3), "), got ",
              difference.sizes());
  at::Tensor grad = at::empty_like(x);
  if (x.numel() == 0) return grad;
  const double scale = 4.0 * sign * grad_loss.item<double>();
  const at::Tensor difference_double = difference.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "consistency_backward", [&] {
    backward_rows(x.const_data_ptr<scalar_t>(), map_of(x), difference_double.const_data_ptr<double>(), scale,
                  x.size(0), dilation, grad.mutable_data_ptr<scalar_t>(), map_of(grad));
  });
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("consistency_forward", &fastkd::cpu::consistency_forward);
  m.impl("consistency_backward", &fastkd::cpu::consistency_backward);
}
