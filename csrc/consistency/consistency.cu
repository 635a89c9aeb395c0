// CUDA kernels of the 8-neighbour consistency loss and their launchers (compile with nvcc alone; the
// emulator runs this same file on the CPU through consistency_emulated.cpp).
//
// Forward: one thread per pixel computes c_s(x) - c_t(x) (consistency_math.cuh) and writes the (B, H, W)
// map difference; each block sums its squares in a fixed order (warp shuffles, then shared memory) into one
// partial, and the glue sums the partials: no atomics, the same result on every run.
// Backward: one thread per pixel gathers dL/dl for every channel from the map difference of its neighbours.
#include "../common/block_sum.cuh"
#include "consistency.h"
#include "consistency_math.cuh"

namespace fastkd {
namespace FASTKD_KERNELS {
namespace {

constexpr int kThreads = 256;

template <typename T>
FASTKD_GLOBAL void consistency_forward_kernel(global_ptr<const T> s, consistency::Map s_map, global_ptr<const T> t,
                                              consistency::Map t_map, std::int64_t batch, std::int64_t dilation,
                                              bool valid, global_ptr<double> difference, global_ptr<double> partials) {
  const std::int64_t pixels = s_map.height * s_map.width;
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double square = 0.0;
  if (index < batch * pixels) {
    const std::int64_t b = index / pixels, y = index % pixels / s_map.width, x = index % s_map.width;
    double d = 0.0;
    if (consistency::defined(s_map, y, x, dilation, valid)) {
      d = consistency::neighbour_sum(s, s_map, b, y, x, dilation) - consistency::neighbour_sum(t, t_map, b, y, x, dilation);
    }
    difference[index] = d;
    square = d * d;
  }
  square = block_sum<kThreads>(square);  // in a fixed order
  if (threadIdx.x == 0) partials[blockIdx.x] = square;
}

template <typename T>
FASTKD_GLOBAL void consistency_backward_kernel(global_ptr<const T> x, consistency::Map map,
                                               global_ptr<const double> difference, global_ptr<const double> grad_loss,
                                               double sign, std::int64_t batch, std::int64_t dilation,
                                               global_ptr<T> grad, consistency::Map grad_map) {
  const std::int64_t pixels = map.height * map.width;
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= batch * pixels) return;
  const std::int64_t b = index / pixels, y = index % pixels / map.width, col = index % map.width;
  const double scale = 4.0 * sign * grad_loss[0];
  const global_ptr<T> out = grad + b * grad_map.stride_b + y * grad_map.stride_h + col * grad_map.stride_w;
  for (std::int64_t c = 0; c < map.channels; ++c) {
    out[c * grad_map.stride_c] =
        from_double<T>(scale * consistency::gradient_at(x, map, difference, b, c, y, col, dilation));
  }
}

std::int64_t blocks_for(std::int64_t items) { return (items + kThreads - 1) / kThreads; }

}  // namespace

std::int64_t consistency_partial_count(std::int64_t batch, std::int64_t height, std::int64_t width) {
  return blocks_for(batch * height * width);
}

template <typename T>
void consistency_forward(const T* s, const consistency::Map& s_map, const T* t, const consistency::Map& t_map,
                         std::int64_t batch, std::int64_t dilation, bool valid, double* difference, double* partials,
                         fastkd_stream_t stream) {
  const std::int64_t blocks = blocks_for(batch * s_map.height * s_map.width);
  FASTKD_LAUNCH(consistency_forward_kernel<T>, LaunchExtent(blocks), dim3(kThreads), stream, s, s_map, t, t_map, batch,
                dilation, valid, difference, partials);
}

template <typename T>
void consistency_backward(const T* x, const consistency::Map& map, const double* difference, const double* grad_loss,
                          double sign, std::int64_t batch, std::int64_t dilation, T* grad,
                          const consistency::Map& grad_map, fastkd_stream_t stream) {
  const std::int64_t blocks = blocks_for(batch * map.height * map.width);
  FASTKD_LAUNCH(consistency_backward_kernel<T>, LaunchExtent(blocks), dim3(kThreads), stream, x, map, difference,
                grad_loss, sign, batch, dilation, grad, grad_map);
}

#define FASTKD_INSTANTIATE(T)                                                                                      \
  template void consistency_forward<T>(const T*, const consistency::Map&, const T*, const consistency::Map&,       \
                                       std::int64_t, std::int64_t, bool, double*, double*, fastkd_stream_t);       \
  template void consistency_backward<T>(const T*, const consistency::Map&, const double*, const double*, double, \
                                        std::int64_t, std::int64_t, T*, const consistency::Map&, fastkd_stream_t);
FASTKD_INSTANTIATE(float)
FASTKD_INSTANTIATE(double)
FASTKD_INSTANTIATE(__half)
FASTKD_INSTANTIATE(__nv_bfloat16)
#undef FASTKD_INSTANTIATE

}  // namespace FASTKD_KERNELS
}  // namespace fastkd
