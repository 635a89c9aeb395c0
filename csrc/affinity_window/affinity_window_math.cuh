// The window math of the windowed pair-wise affinity loss (Liu et al. 2020, eq. 2; FORMULAS.md section 1),
// shared by the CUDA kernels (affinity_window.cu, also run by the emulator) and a CPU implementation. The
// nodes (patch geometry, pooling, norms, node backward) are nodes_math.cuh's, as for the full graph.
//
// Nodes f_i are kernel_h x kernel_w patches of one image, pooled on the fly (the average of the patch's
// pixels inside the map, or their max); f_hat_i = f_i / (||f_i|| + eps), a_ij = f_hat_i . f_hat_j, and the
// loss sums (a_s_ij - a_t_ij)^2 over the nodes j within Chebyshev distance r of i on the node grid. The
// pair (j, i) gives the same term as (i, j), so D_ij = a_s_ij - a_t_ij is kept for one half of the window
// only: the offsets (dy, dx) with dy > 0, or dy = 0 and dx >= 0 (the diagonal first). Everything is
// accumulated in double; indices are 64-bit.
#pragma once

#include <cstdint>

#include "../common/fastkd_cuda.cuh"
#include "../common/nodes_math.cuh"

namespace fastkd {
namespace affinity_window {

// The node grid (nodes::Grid) and the window's reach along its rows and columns: min(r, grid_h - 1) and
// min(r, grid_w - 1), since a longer offset leaves every node without a partner.
struct Grid : nodes::Grid {
  std::int64_t reach_h, reach_w;
};

FASTKD_HOST_DEVICE inline std::int64_t reach(std::int64_t window, std::int64_t extent) {
  const std::int64_t longest = extent > 1 ? extent - 1 : 0;
  return window < longest ? window : longest;
}

FASTKD_HOST_DEVICE inline Grid make_grid(std::int64_t height, std::int64_t width, std::int64_t kernel_h,
                                         std::int64_t kernel_w, bool max_pool, std::int64_t window) {
  const nodes::Grid node_grid = nodes::make_grid(height, width, kernel_h, kernel_w, max_pool);
  return {node_grid, reach(window, node_grid.grid_h), reach(window, node_grid.grid_w)};
}

// Offsets in the stored half of the window, numbered k = dy (2 reach_w + 1) + dx: the diagonal is 0.
FASTKD_HOST_DEVICE inline std::int64_t half_window(const Grid& grid) {
  return grid.reach_h * (2 * grid.reach_w + 1) + grid.reach_w + 1;
}

FASTKD_HOST_DEVICE inline bool in_stored_half(std::int64_t dy, std::int64_t dx) {
  return dy > 0 || (dy == 0 && dx >= 0);
}

FASTKD_HOST_DEVICE inline std::int64_t half_index(const Grid& grid, std::int64_t dy, std::int64_t dx) {
  return dy * (2 * grid.reach_w + 1) + dx;
}

// Whether node (row, col) lies on the grid (a row and column test: a bound on the flat index would let a
// window's partner wrap around to the next row).
FASTKD_HOST_DEVICE inline bool on_grid(const nodes::Grid& grid, std::int64_t row, std::int64_t col) {
  return row >= 0 && row < grid.grid_h && col >= 0 && col < grid.grid_w;
}

// The node at offset (dy, dx) from `node`, or -1 where that leaves the grid.
FASTKD_HOST_DEVICE inline std::int64_t partner(const Grid& grid, std::int64_t node, std::int64_t dy, std::int64_t dx) {
  const std::int64_t row = node / grid.grid_w + dy, col = node % grid.grid_w + dx;
  return on_grid(grid, row, col) ? row * grid.grid_w + col : -1;
}

// The partner of `node` at offset k of the stored half, or -1.
FASTKD_HOST_DEVICE inline std::int64_t half_partner(const Grid& grid, std::int64_t node, std::int64_t k) {
  const std::int64_t span = 2 * grid.reach_w + 1, dy = (k + grid.reach_w) / span;
  return partner(grid, node, dy, k - dy * span);
}

// a_ij = f_hat_i . f_hat_j = (f_i . f_j) / ((||f_i|| + eps) (||f_j|| + eps)); `norms` are image b's.
template <typename T>
FASTKD_HOST_DEVICE double affinity(global_ptr<const T> x, const nodes::Map& map, global_ptr<const double> norms,
                                   const Grid& grid,
                                   std::int64_t b, std::int64_t i, std::int64_t j, double eps) {
  double dot = 0.0;
  for (std::int64_t c = 0; c < map.channels; ++c) {
    dot += nodes::pooled(x, map, grid, b, c, i) * nodes::pooled(x, map, grid, b, c, j);
  }
  return dot / ((norms[i] + eps) * (norms[j] + eps));
}

// sum over the whole window of node i (i itself included) of D_ij f_hat_j[c], for image b's `norms` and
// `difference` ((half, m), contiguous). D_ij of an offset outside the stored half was stored at the partner
// j under the mirrored offset (D_ji = D_ij).
template <typename T>
FASTKD_HOST_DEVICE double window_gradient(global_ptr<const T> x, const nodes::Map& map, global_ptr<const double> norms,
                                          global_ptr<const double> difference, const Grid& grid, std::int64_t b,
                                          std::int64_t c, std::int64_t i, double eps) {
  const std::int64_t m = nodes::node_count(grid);
  double sum = 0.0;
  for (std::int64_t dy = -grid.reach_h; dy <= grid.reach_h; ++dy) {
    for (std::int64_t dx = -grid.reach_w; dx <= grid.reach_w; ++dx) {
      const std::int64_t j = partner(grid, i, dy, dx);
      if (j < 0) continue;
      const double d = in_stored_half(dy, dx) ? difference[half_index(grid, dy, dx) * m + i]
                                              : difference[half_index(grid, -dy, -dx) * m + j];
      sum += d * nodes::pooled(x, map, grid, b, c, j) / (norms[j] + eps);
    }
  }
  return sum;
}

// Node i's row of the stored half window: D_ik = a_s - a_t and a_t for every stored offset k, written to
// difference and teacher_affinity at [(b * half + k) * m + i] (0 where the partner is missing: no term, and a
// NaN node must not pass), and returns the node's share of the total, sum_k D_ik^2 with the diagonal once and
// the others twice ((i, j) and its mirror (j, i) are one stored offset).
template <typename S, typename T>
FASTKD_HOST_DEVICE double half_window_row(global_ptr<const S> s, const nodes::Map& s_map,
                                          global_ptr<const double> s_norms, global_ptr<const T> t,
                                          const nodes::Map& t_map, global_ptr<const double> t_norms, const Grid& grid,
                                          std::int64_t b, std::int64_t i, double eps, global_ptr<double> difference,
                                          global_ptr<double> teacher_affinity) {
  const std::int64_t m = nodes::node_count(grid), half = half_window(grid);
  double squares = 0.0;
  for (std::int64_t k = 0; k < half; ++k) {
    const std::int64_t j = half_partner(grid, i, k);
    double d = 0.0, a_t = 0.0;
    if (j >= 0) {
      a_t = affinity(t, t_map, t_norms + b * m, grid, b, i, j, eps);
      d = affinity(s, s_map, s_norms + b * m, grid, b, i, j, eps) - a_t;
    }
    difference[(b * half + k) * m + i] = d;
    teacher_affinity[(b * half + k) * m + i] = a_t;
    squares += (k == 0 ? 1.0 : 2.0) * d * d;
  }
  return squares;
}

}  // namespace affinity_window
}  // namespace fastkd
