// Launchers of the node kernels both affinity ops share (nodes.cu): raw pointers, sizes, strides and a stream.
// Declared for the namespace the including file compiles for (fastkd::cuda or fastkd::emulated).
#pragma once

#include <cstdint>

#include "fastkd_cuda.cuh"
#include "nodes_math.cuh"

namespace fastkd {
namespace FASTKD_KERNELS {

// norms (B, m): ||f_i|| of every node, pooling on the fly.
template <typename T>
void node_norms(const T* x, const nodes::Map& map, const nodes::Grid& grid, std::int64_t batch, double* norms,
                fastkd_stream_t stream);

// nodes_out (B, C, m) contiguous double: the pooled feature of every channel of every node, as `pooled`
// (nodes_math.cuh) computes it.
template <typename T>
void pool_nodes(const T* x, const nodes::Map& map, const nodes::Grid& grid, std::int64_t batch, double* nodes_out,
                fastkd_stream_t stream);

// grad (x's layout, any strides) = dL/dx from grad_hat = dL/df_hat (B, C, m): the normalisation, then the
// pooling backward (nodes_math.cuh). nodes_in: x's nodes pooled ahead ((B, C, m) double), or nullptr to pool
// them again; radial: (B, m) double, the norm's share k^2 (f . g) / n of each node's gradient, given by the
// caller (radial_given) or else summed into it here from grad_hat (not read when the norm is detached).
template <typename T>
void node_backward(const double* grad_hat, const T* x, const nodes::Map& map, const double* nodes_in,
                   const double* norms, const nodes::Grid& grid, double eps, bool detach_norm, std::int64_t batch,
                   double* radial, bool radial_given, T* grad, const nodes::Map& grad_map, fastkd_stream_t stream);

}  // namespace FASTKD_KERNELS
}  // namespace fastkd
