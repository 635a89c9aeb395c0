// Launchers of the consistency kernels (consistency.cu): raw pointers, sizes, strides and a stream.
// Declared for the namespace the including file compiles for (fastkd::cuda or fastkd::emulated).
#pragma once

#include <cstdint>

#include "consistency_math.cuh"
#include "../common/fastkd_cuda.cuh"

namespace fastkd {
namespace FASTKD_KERNELS {

// Number of per-block partial sums consistency_forward writes.
std::int64_t consistency_partial_count(std::int64_t batch, std::int64_t height, std::int64_t width);

// difference: (B, H, W) contiguous double, c_s - c_t where c is defined and 0 elsewhere; partials: the
// per-block sums of its squares. s and t share B, H, W (and dtype); their channel counts may differ.
template <typename T>
void consistency_forward(const T* s, const consistency::Map& s_map, const T* t, const consistency::Map& t_map,
                         std::int64_t batch, std::int64_t dilation, bool valid, double* difference, double* partials,
                         fastkd_stream_t stream);

// grad (any strides, x's dtype) = dL/dx for the loss sum, with grad_loss a device pointer to dL/dloss and
// sign +1 for the student, -1 for the teacher.
template <typename T>
void consistency_backward(const T* x, const consistency::Map& map, const double* difference, const double* grad_loss,
                          double sign, std::int64_t batch, std::int64_t dilation, T* grad,
                          const consistency::Map& grad_map, fastkd_stream_t stream);

}  // namespace FASTKD_KERNELS
}  // namespace fastkd
