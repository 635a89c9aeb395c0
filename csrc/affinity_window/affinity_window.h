// Launchers of the windowed pair-wise affinity kernels (affinity_window.cu): raw pointers, sizes, strides
// and a stream. Declared for the namespace the including file compiles for (fastkd::cuda or fastkd::emulated).
#pragma once

#include <cstdint>

#include "affinity_window_math.cuh"
#include "../common/fastkd_cuda.cuh"
#include "../common/nodes.h"
#include "../common/nodes_math.cuh"

namespace fastkd {
namespace FASTKD_KERNELS {

// Whether the window runs the tiled kernels (reach 1 or 2 along both grid axes), whose backward needs no
// workspace.
bool affinity_window_tiled(const affinity_window::Grid& grid);

// Number of per-block partial sums affinity_window_forward writes.
std::int64_t affinity_window_partial_count(std::int64_t batch, const affinity_window::Grid& grid);

// s_norms, t_norms: (B, m) contiguous double, ||f|| of every node; difference and teacher_affinity:
// (B, half_window(grid), m) contiguous double, D = a_s - a_t and a_t of every node and every offset of the
// stored half of the window (0 where the partner is outside the grid); partials: the
// affinity_window_partial_count per-block sums of D^2 weighted 1 on the diagonal and 2 elsewhere. s and t share
// B, H, W (and dtype); their channels may differ.
template <typename T>
void affinity_window_forward(const T* s, const nodes::Map& s_map, const T* t, const nodes::Map& t_map,
                             const affinity_window::Grid& grid, std::int64_t batch, double eps, double* s_norms,
                             double* t_norms, double* difference, double* teacher_affinity, double* partials,
                             fastkd_stream_t stream);

// grad (any strides, x's dtype) = dL/dx for the total, with grad_total a device pointer to dL/dtotal and
// sign +1 for the student, -1 for the teacher. Workspaces, where the window is not tiled: grad_hat (B, C, m)
// double (dL/df_hat), radial (B, m) double (node_backward's, not read when the norm is detached).
template <typename T>
void affinity_window_backward(const T* x, const nodes::Map& map, const double* norms, const double* difference,
                              const double* teacher_affinity, const affinity_window::Grid& grid, std::int64_t batch,
                              double eps, bool detach_norm, const double* grad_total, double sign, double* grad_hat,
                              double* radial, T* grad, const nodes::Map& grad_map, fastkd_stream_t stream);

}  // namespace FASTKD_KERNELS
}  // namespace fastkd
