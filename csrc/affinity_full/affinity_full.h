// Launchers of the full-graph affinity kernels (affinity_full.cu): raw pointers, sizes, strides and a
// stream. Declared for the namespace the including file compiles for (fastkd::cuda or fastkd::emulated).
//
// Operands are nodes::Nodes<T> (an input of any strides plus its (B, m) double node scales 1 / (||f|| + eps));
// every output is a contiguous double buffer the caller allocates. Where both operands are flat (one pixel a
// node, rows back to back: nodes::flat_pixels), the launchers run the kernels' flat variant, which neither
// pools nor divides node indices. Matrices are contiguous double (B, rows, cols).
#pragma once

#include <cstdint>

#include "../common/fastkd_cuda.cuh"
#include "../common/nodes.h"
#include "../common/nodes_math.cuh"

namespace fastkd {
namespace FASTKD_KERNELS {

// Channels the tensor-core products of D stage at a time; the few-node difference kernel's channel splits are
// a multiple of it.
constexpr int kAffinityChannelChunk = 16;
// Side of the square tiles of D the direct row kernel forms with tensor-core products.
constexpr int kAffinityDirectSide = 64;
// Up to this many nodes an image, the direct forward forms D (B, m, m) with its channels split over blocks
// (affinity_full_direct_difference) instead of a block per 64 rows: with pool_scale (9 nodes at 65 x 65) that
// would be 8 blocks for B = 8, each summing all 512 + 512 channels in sequence. D is then one tile
// (kAffinityDirectSide square) an image.
constexpr int kAffinityFewNodes = 64;
// The Gram kernel's output tiles (kAffinityGramSide channels square) and the nodes it stages at a time.
constexpr int kAffinityGramSide = 64;
constexpr int kAffinityGramChunk = 32;
// The apply kernel's output rows a block (the tiles of affinity_full_apply's form partials).
constexpr int kAffinityApplyRows = 64;

// partials (B, splits, Cx, Cy): X W Y' over the nodes [split * nodes_per_split, (split + 1) * nodes_per_split)
// of each image, for the normalised nodes X, Y and W = diag(weight) (weight (B, m), or nullptr: identity).
// nodes_per_split must be a multiple of kAffinityGramChunk; the caller sums the partials in a fixed order.
template <typename T>
void affinity_full_gram(const nodes::Nodes<T>& x, const nodes::Nodes<T>& y, const nodes::Grid& grid,
                        const double* weight, std::int64_t batch, std::int64_t splits, std::int64_t nodes_per_split,
                        double* partials, fastkd_stream_t stream);

// For the normalised nodes P (Cp x m) and Q (Cq x m) of each image, one of:
//   out = A1 P + B1 Q + w (A2 P + B2 Q)      (B, Cp, m), when out is not nullptr; and then, unless form is
//                                            nullptr, each node's p . out over each tile of kAffinityApplyRows
//                                            rows into form (B, ceil(Cp / kAffinityApplyRows), m)
//   dot_a_i = p_i . (A1 p_i), dot_b_i = p_i . (B1 q_i)  (B, m), when dot_a and dot_b are not nullptr (a2 is)
// A1, A2: (B, Cp, Cp); B1, B2: (B, Cp, Cq). b1 == nullptr: no Q terms (q is not read); a2 == nullptr: no
// weighted terms (b2, weight not read). Other combinations throw std::invalid_argument.
template <typename T>
void affinity_full_apply(const nodes::Nodes<T>& p, const nodes::Nodes<T>& q, const nodes::Grid& grid,
                         const double* a1, const double* b1, const double* a2, const double* b2,
                         const double* weight, std::int64_t batch, double* out, double* form, double* dot_a,
                         double* dot_b, fastkd_stream_t stream);

// partials (B, splits, m): r_i = sum_j D_ij^2 with D = S'S - T'T formed tile by tile (kAffinityDirectSide
// nodes square), over the column tiles [split n, (split + 1) n) (n = tiles_per_split); the caller sums the
// partials in a fixed order.
template <typename T>
void affinity_full_direct_rows(const nodes::Nodes<T>& s, const nodes::Nodes<T>& t, const nodes::Grid& grid,
                               std::int64_t batch, std::int64_t splits, std::int64_t tiles_per_split,
                               double* partials, fastkd_stream_t stream);

// partials[b][split] over the channels [split n, (split + 1) n) of s and t (n = channels_per_split, a multiple of
// kAffinityChannelChunk) for the slab of rows [first_row, first_row + slab_rows) of D = S'S - T'T: that slab of
// D, (B, splits, slab_rows, m), or given row weights (weight (B, m), else nullptr) W_ij = 2 (w_i + w_j) D_ij
// transposed, (B, splits, m, slab_rows). The caller sums the partials in a fixed order. A split or slab out of
// range throws std::invalid_argument.
template <typename T>
void affinity_full_direct_difference(const nodes::Nodes<T>& s, const nodes::Nodes<T>& t, const nodes::Grid& grid,
                                     std::int64_t batch, std::int64_t first_row, std::int64_t slab_rows,
                                     std::int64_t splits, std::int64_t channels_per_split, const double* weight,
                                     double* partials, fastkd_stream_t stream);

// out[b][c][first_row + i] = sign sum_j W_ij x_j[c] for the normalised nodes X (C x m) of each image and the
// rows i < slab_rows of a slab of W given transposed, weighted_t (B, m, slab_rows) as affinity_full_direct_difference
// writes it; out (B, C, m): only the slab's columns are written. Unless form is nullptr, also each node's
// x_hat . out over each tile of kAffinityDirectSide channels into the slab's columns of form (B, tiles, m).
template <typename T>
void affinity_full_direct_columns(const nodes::Nodes<T>& x, const nodes::Grid& grid, const double* weighted_t,
                                  std::int64_t batch, std::int64_t first_row, std::int64_t slab_rows, double sign,
                                  double* out, double* form, fastkd_stream_t stream);

}  // namespace FASTKD_KERNELS
}  // namespace fastkd
