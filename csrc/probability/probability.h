// Launchers of the probability kernels (probability.cu): raw pointers, sizes, strides and a stream.
// Declared for the namespace the including file compiles for (fastkd::cuda or fastkd::emulated).
#pragma once

#include <cstdint>

#include "../common/fastkd_cuda.cuh"
#include "../common/softmax_math.cuh"

namespace fastkd {
namespace FASTKD_KERNELS {

// terms: (B, H, W) contiguous double, ||softmax(s) - softmax(t)||^2 over the channels per pixel, NaN where a
// logit of the pixel is not finite. s and t: one shape (B, C, H, W) with C >= 1, any strides, each in its own
// storage type.
template <typename S, typename T>
void probability_forward(const S* s, const softmax::Map& s_map, const T* t, const softmax::Map& t_map,
                         std::int64_t batch, double* terms, fastkd_stream_t stream);

// dL/ds into grad_s (s's storage type) or dL/dt into grad_t (t's): exactly one of them is non-null, of layout
// grad_map. grad_terms: (B, H, W) contiguous double dL/dterms; the gradient is exactly 0 where it is 0.
template <typename S, typename T>
void probability_backward(const double* grad_terms, const S* s, const softmax::Map& s_map, const T* t,
                          const softmax::Map& t_map, std::int64_t batch, S* grad_s, T* grad_t,
                          const softmax::Map& grad_map, fastkd_stream_t stream);

}  // namespace FASTKD_KERNELS
}  // namespace fastkd
