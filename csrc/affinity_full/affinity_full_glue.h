// Torch glue of the CUDA full-graph affinity kernels, included by affinity_full_emulated.cpp (CPU tensors,
// the emulator) and affinity_full_cuda.cpp (CUDA tensors), each after choosing the launchers' namespace
// (FASTKD_EMULATE_CUDA or FASTKD_CUDA_HOST) and defining FASTKD_GLUE_STREAM() and FASTKD_GLUE_GUARD(tensor).
//
// The ops mirror fastkd_triton::affinity_full_forward / _backward (fastkd/ops/affinity_full/triton_backend.py):
// the O(B C m) and larger work runs in the kernels (pooled nodes are pooled once, by pool_nodes, ahead of the
// others); only the C x C matrices and (B, m) vectors see torch arithmetic.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "affinity_full.h"
#include "../common/glue_common.h"

namespace fastkd {
namespace {  // one copy per including file: the two call different launchers

using glue::map_of;

template <typename scalar_t>
nodes::Nodes<storage_t<scalar_t>> affinity_full_nodes(const at::Tensor& x, const at::Tensor& scale) {
  return {storage_data<scalar_t>(x), map_of(x), scale.const_data_ptr<double>()};
}

// The scale 1 / (||f|| + eps) (B, m) of every node, from its norm: what the kernels multiply a staged element by.
at::Tensor affinity_full_scales(const at::Tensor& norm, double eps) { return (norm + eps).reciprocal(); }

const double* affinity_full_pointer(const at::Tensor& x) {
  return x.defined() ? x.const_data_ptr<double>() : nullptr;
}

// Checks the inputs and the node grid; returns the grid.
nodes::Grid affinity_full_grid(const at::Tensor& s, const at::Tensor& t, int64_t kernel_h, int64_t kernel_w,
                               int64_t grid_h, int64_t grid_w, bool max_pool) {
  glue::check_pair(s, t);
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1, "the pooling kernel must be at least 1 x 1");
  TORCH_CHECK(grid_h == (s.size(2) + kernel_h - 1) / kernel_h && grid_w == (s.size(3) + kernel_w - 1) / kernel_w,
              "the node grid ", grid_h, " x ", grid_w, " does not match a ", s.size(2), " x ", s.size(3),
              " map pooled by ", kernel_h, " x ", kernel_w);
  TORCH_CHECK(s.size(0) <= 65535, "at most 65535 images per call, got ", s.size(0));
  return {kernel_h, kernel_w, grid_h, grid_w, max_pool};
}

// ||f_i|| (B, m) double of every node of x (in x's own dtype).
at::Tensor affinity_full_norms(const at::Tensor& x, const nodes::Grid& grid) {
  at::Tensor norms = at::empty({x.size(0), nodes::node_count(grid)}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affinity_full_norms", [&] {
    FASTKD_KERNELS::node_norms(storage_data<scalar_t>(x), map_of(x), grid, x.size(0),
                                        norms.mutable_data_ptr<double>(), FASTKD_GLUE_STREAM());
  });
  return norms;
}

// What the kernels read of s and t, and on which grid. Where every node is a pixel, the inputs themselves (in
// their common dtype: float16/bfloat16 -> float32 -> float64 widens exactly). Otherwise their nodes, pooled once
// into (B, C, grid_h, grid_w) double buffers whose pixels are the nodes: pooling inside the kernels redid it for
// every tile that staged a node, and left their inner loops issue-bound (sm_90 model, when they pooled: the
// Gram loop at 49% of the FP64 floor, apply at 7%, the direct ones at 1%; on pixel nodes now 100%, 75% and
// 96-100%), and a few large patches (pool_scale) serialised on a few threads. The buffers hold B C m doubles, as
// dL/df_hat does.
struct KernelOperands {
  at::Tensor s, t;
  nodes::Grid grid;
};

at::Tensor affinity_full_pooled(const at::Tensor& x, const nodes::Grid& grid) {
  at::Tensor pooled = at::empty({x.size(0), x.size(1), grid.grid_h, grid.grid_w}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affinity_full_pool_nodes", [&] {
    FASTKD_KERNELS::pool_nodes(storage_data<scalar_t>(x), map_of(x), grid, x.size(0),
                               pooled.mutable_data_ptr<double>(), FASTKD_GLUE_STREAM());
  });
  return pooled;
}

KernelOperands affinity_full_operands(const at::Tensor& s, const at::Tensor& t, const nodes::Grid& grid) {
  if (grid.kernel_h == 1 && grid.kernel_w == 1) {
    const auto common = at::promote_types(s.scalar_type(), t.scalar_type());
    return {s.to(common), t.to(common), grid};
  }
  return {affinity_full_pooled(s, grid), affinity_full_pooled(t, grid),
          nodes::Grid{1, 1, grid.grid_h, grid.grid_w, false}};
}

// X W Y' (B, Cx, Cy) double for the normalised nodes of x and y (one dtype), W = diag(weight) or identity.
at::Tensor affinity_full_gram(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& y,
                              const at::Tensor& y_scale, const nodes::Grid& grid,
                              const at::Tensor& weight = at::Tensor()) {
  const int64_t batch = x.size(0), m = nodes::node_count(grid);
  const int64_t side = FASTKD_KERNELS::kAffinityGramSide, chunk = FASTKD_KERNELS::kAffinityGramChunk;
  const auto doubles = x.options().dtype(at::kDouble);
  if (m == 0 || batch == 0) return at::zeros({batch, x.size(1), y.size(1)}, doubles);
  // The node range is split so that small batches still fill a GPU (one partial matrix per split, about 1024
  // blocks in all); the emulator splits the same way, so that it runs what a GPU runs.
  const int64_t tiles = ((x.size(1) + side - 1) / side) * ((y.size(1) + side - 1) / side);
  const int64_t chunks = (m + chunk - 1) / chunk;
  const int64_t splits_wanted = 1024 / std::max<int64_t>(1, tiles * batch);
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(chunks, splits_wanted));
  const int64_t nodes_per_split = (chunks + splits - 1) / splits * chunk;
  splits = (m + nodes_per_split - 1) / nodes_per_split;
  at::Tensor partials = at::empty({batch, splits, x.size(1), y.size(1)}, doubles);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affinity_full_gram", [&] {
    FASTKD_KERNELS::affinity_full_gram(affinity_full_nodes<scalar_t>(x, x_scale),
                                       affinity_full_nodes<scalar_t>(y, y_scale), grid,
                                       affinity_full_pointer(weight), batch, splits, nodes_per_split,
                                       partials.mutable_data_ptr<double>(), FASTKD_GLUE_STREAM());
  });
  return partials.sum(1);  // a fixed-order sum of the per-split partials
}

// Either out = A1 P + B1 Q + w (A2 P + B2 Q) (B, Cp, m) (`store`), or the per-node forms (p . A1 p, p . B1 q)
// (B, m) (`dots`, with a2 undefined): the kernel computes one of them a launch. Undefined b1: no Q terms;
// undefined a2: no weighted terms.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_full_apply(
    const at::Tensor& p, const at::Tensor& p_scale, const at::Tensor& q, const at::Tensor& q_scale,
    const nodes::Grid& grid, const at::Tensor& a1, const at::Tensor& b1, const at::Tensor& a2,
    const at::Tensor& b2, const at::Tensor& weight, bool store, bool dots, bool form = false) {
  const int64_t batch = p.size(0), m = nodes::node_count(grid);
  const auto doubles = p.options().dtype(at::kDouble);
  at::Tensor out = store ? at::empty({batch, p.size(1), m}, doubles) : at::Tensor();
  const int64_t apply_rows = FASTKD_KERNELS::kAffinityApplyRows;  // the form partials' tiles of rows
  const int64_t row_tiles = (p.size(1) + apply_rows - 1) / apply_rows;
  at::Tensor forms = store && form ? at::empty({batch, row_tiles, m}, doubles) : at::Tensor();
  at::Tensor dot_a = dots ? at::empty({batch, m}, doubles) : at::Tensor();
  at::Tensor dot_b = dots ? at::empty({batch, m}, doubles) : at::Tensor();
  const at::Tensor a1_c = a1.contiguous();
  const at::Tensor b1_c = b1.defined() ? b1.contiguous() : b1;
  const at::Tensor a2_c = a2.defined() ? a2.contiguous() : a2;
  const at::Tensor b2_c = b2.defined() ? b2.contiguous() : b2;
  const at::Tensor& q_used = b1.defined() ? q : p;  // not read without B1
  const at::Tensor& q_scale_used = b1.defined() ? q_scale : p_scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "affinity_full_apply", [&] {
    FASTKD_KERNELS::affinity_full_apply(
        affinity_full_nodes<scalar_t>(p, p_scale), affinity_full_nodes<scalar_t>(q_used, q_scale_used), grid,
        affinity_full_pointer(a1_c), affinity_full_pointer(b1_c), affinity_full_pointer(a2_c),
        affinity_full_pointer(b2_c), affinity_full_pointer(weight), batch,
        store ? out.mutable_data_ptr<double>() : nullptr, forms.defined() ? forms.mutable_data_ptr<double>() : nullptr,
        dots ? dot_a.mutable_data_ptr<double>() : nullptr, dots ? dot_b.mutable_data_ptr<double>() : nullptr,
        FASTKD_GLUE_STREAM());
  });
  if (forms.defined()) dot_a = forms.sum(1);  // p . out, the row tiles' partials summed in a fixed order
  return {out, dot_a, dot_b};
}

// The rows [first_row, first_row + slab_rows) of D = S'S - T'T, (B, slab_rows, m) double, or given row weights
// (B, m) those of W = 2 (w_i + w_j) D transposed, (B, m, slab_rows); where the slab's 64 x 64 tiles are too few to
// fill a GPU, each block sums one range of channels (about 1024 blocks in all, as the Gram's splits), the ranges'
// partials then summed in a fixed order.
at::Tensor affinity_full_difference(const at::Tensor& s, const at::Tensor& s_scale, const at::Tensor& t,
                                    const at::Tensor& t_scale, const nodes::Grid& grid, int64_t first_row,
                                    int64_t slab_rows, const at::Tensor& weight) {
  const int64_t batch = s.size(0), m = nodes::node_count(grid), chunk = FASTKD_KERNELS::kAffinityChannelChunk;
  const int64_t side = FASTKD_KERNELS::kAffinityDirectSide;
  const int64_t chunks = (std::max(s.size(1), t.size(1)) + chunk - 1) / chunk;
  const auto doubles = s.options().dtype(at::kDouble);
  const std::vector<int64_t> layout = weight.defined() ? std::vector<int64_t>{m, slab_rows}
                                                       : std::vector<int64_t>{slab_rows, m};
  if (slab_rows == 0 || batch == 0 || chunks == 0) return at::zeros({batch, layout[0], layout[1]}, doubles);
  const int64_t tiles = ((slab_rows + side - 1) / side) * ((m + side - 1) / side);
  const int64_t splits_wanted = std::min(chunks, std::max<int64_t>(1, 1024 / (batch * tiles)));
  const int64_t channels_per_split = (chunks + splits_wanted - 1) / splits_wanted * chunk;
  const int64_t splits = (chunks * chunk + channels_per_split - 1) / channels_per_split;
  at::Tensor partials = at::empty({batch, splits, layout[0], layout[1]}, doubles);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "affinity_full_direct_difference", [&] {
    FASTKD_KERNELS::affinity_full_direct_difference(
        affinity_full_nodes<scalar_t>(s, s_scale), affinity_full_nodes<scalar_t>(t, t_scale), grid, batch, first_row,
        slab_rows, splits, channels_per_split, weight.defined() ? weight.const_data_ptr<double>() : nullptr,
        partials.mutable_data_ptr<double>(), FASTKD_GLUE_STREAM());
  });
  return splits == 1 ? partials.select(1, 0) : partials.sum(1);  // a fixed-order sum of the per-range partials
}

// Into the columns [first_row, first_row + slab_rows) of out (B, C, m) double: sign X W' for the normalised
// nodes X of x and a slab of W's rows given transposed, weighted_t (B, m, slab_rows); and, if defined, into the
// same columns of forms (B, channel tiles of 64, m) each tile's x_hat . out.
void affinity_full_columns(const at::Tensor& x, const at::Tensor& x_scale, const nodes::Grid& grid,
                           const at::Tensor& weighted_t, int64_t first_row, double sign, at::Tensor& out,
                           at::Tensor& forms) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affinity_full_direct_columns", [&] {
    FASTKD_KERNELS::affinity_full_direct_columns(affinity_full_nodes<scalar_t>(x, x_scale), grid,
                                                 weighted_t.const_data_ptr<double>(), x.size(0), first_row,
                                                 weighted_t.size(2), sign, out.mutable_data_ptr<double>(),
                                                 forms.defined() ? forms.mutable_data_ptr<double>() : nullptr,
                                                 FASTKD_GLUE_STREAM());
  });
}

// Rows of D a backward slab holds: all m, or so many that the slab, B x rows x m doubles, is no larger than the
// larger gradient it makes, B x channels x m (channels = max(Cs, Ct)), or than one tile of kAffinityDirectSide
// rows (fastkd/ops/affinity_full/triton_backend.py's slab_rows_for). The cost model leaves m above Cs + Ct to the
// Gram path; only algorithm='direct' takes it there.
int64_t affinity_full_slab_rows(int64_t m, int64_t channels) {
  const int64_t side = FASTKD_KERNELS::kAffinityDirectSide;
  return std::min(m, std::max(side, channels / side * side));
}

// (terms, ||s_i||, ||t_i||, SS', ST', TT'): terms are r (B, m) with per_row, else sum_i r_i (B,); the Gram
// matrices are empty (0,) tensors on the direct path. detach_norm only changes the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> affinity_full_forward_op(
    const at::Tensor& s, const at::Tensor& t, int64_t kernel_h, int64_t kernel_w, int64_t grid_h, int64_t grid_w,
    bool max_pool, double eps, bool use_gram, bool per_row, bool /*detach_norm*/) {
  const nodes::Grid grid = affinity_full_grid(s, t, kernel_h, kernel_w, grid_h, grid_w, max_pool);
  glue::check_same_device("affinity_full_forward", {{"s", s}, {"t", t}});
  FASTKD_GLUE_GUARD(s);
  const KernelOperands operands = affinity_full_operands(s, t, grid);
  const at::Tensor &s_c = operands.s, &t_c = operands.t;
  const nodes::Grid& node_grid = operands.grid;
  const at::Tensor s_norm = affinity_full_norms(s_c, node_grid), t_norm = affinity_full_norms(t_c, node_grid);
  const at::Tensor s_scale = affinity_full_scales(s_norm, eps), t_scale = affinity_full_scales(t_norm, eps);
  const auto doubles = s.options().dtype(at::kDouble);
  const int64_t batch = s.size(0), m = nodes::node_count(grid);
  if (!use_gram) {
    at::Tensor rows;
    if (m <= FASTKD_KERNELS::kAffinityFewNodes) {
      rows = affinity_full_difference(s_c, s_scale, t_c, t_scale, node_grid, 0, m, at::Tensor()).square().sum(2);
    } else {
      // The column tiles split so that small batches still fill a GPU (about 1024 blocks, as the Gram's splits).
      const int64_t side = FASTKD_KERNELS::kAffinityDirectSide, tiles = std::max<int64_t>(1, (m + side - 1) / side);
      const int64_t splits_wanted = std::min(tiles, std::max<int64_t>(1, 1024 / std::max<int64_t>(1, tiles * batch)));
      const int64_t tiles_per_split = (tiles + splits_wanted - 1) / splits_wanted;
      const int64_t splits = (tiles + tiles_per_split - 1) / tiles_per_split;
      at::Tensor partials = at::empty({batch, splits, m}, doubles);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s_c.scalar_type(), "affinity_full_direct_rows", [&] {
        FASTKD_KERNELS::affinity_full_direct_rows(affinity_full_nodes<scalar_t>(s_c, s_scale),
                                                  affinity_full_nodes<scalar_t>(t_c, t_scale), node_grid, batch,
                                                  splits, tiles_per_split, partials.mutable_data_ptr<double>(),
                                                  FASTKD_GLUE_STREAM());
      });
      rows = partials.sum(1);  // a fixed-order sum of the per-range partials
    }
    return {per_row ? rows : rows.sum(1), s_norm, t_norm, at::empty({0}, doubles), at::empty({0}, doubles),
            at::empty({0}, doubles)};
  }
  at::Tensor gram_ss = affinity_full_gram(s_c, s_scale, s_c, s_scale, node_grid);
  at::Tensor gram_st = affinity_full_gram(s_c, s_scale, t_c, t_scale, node_grid);
  at::Tensor gram_tt = affinity_full_gram(t_c, t_scale, t_c, t_scale, node_grid);
  at::Tensor terms;
  if (per_row) {
    // r_i = s_i'(SS')s_i - 2 s_i'(ST')t_i + t_i'(TT')t_i; values within 64 ulps of the forms are rounding
    // noise and become exactly 0 (as in the torch backend): identical rows have a zero loss and gradient.
    const at::Tensor none;
    const auto st_forms = affinity_full_apply(s_c, s_scale, t_c, t_scale, node_grid, gram_ss, gram_st.neg(), none,
                                              none, none, false, true);
    const auto tt_forms =
        affinity_full_apply(t_c, t_scale, t_c, t_scale, node_grid, gram_tt, none, none, none, none, false, true);
    const at::Tensor& form_ss = std::get<1>(st_forms);
    const at::Tensor& minus_form_st = std::get<2>(st_forms);
    const at::Tensor& form_tt = std::get<1>(tt_forms);
    const at::Tensor rows = form_ss + 2 * minus_form_st + form_tt;
    const at::Tensor noise = 64 * std::numeric_limits<double>::epsilon() * (form_ss + form_tt);
    terms = at::where(rows <= noise, at::zeros_like(rows), rows);  // NaN stays NaN
  } else {  // ||SS'||^2 - 2||ST'||^2 + ||TT'||^2, a sum of squares that rounding may leave at -1e-17
    terms = (gram_ss.square().sum({1, 2}) - 2 * gram_st.square().sum({1, 2}) + gram_tt.square().sum({1, 2}))
                .clamp_min(0);
  }
  return {terms, s_norm, t_norm, gram_ss, gram_st, gram_tt};
}

// (dL/ds, dL/dt) for grad_terms = dL/dr (B, m) or dL/d(sum_i r_i) (B,); an empty tensor for a gradient
// that is not needed.
std::tuple<at::Tensor, at::Tensor> affinity_full_backward_op(
    const at::Tensor& grad_terms, const at::Tensor& s, const at::Tensor& t, const at::Tensor& s_norm_in,
    const at::Tensor& t_norm_in, const at::Tensor& gram_ss, const at::Tensor& gram_st, const at::Tensor& gram_tt,
    int64_t kernel_h, int64_t kernel_w, int64_t grid_h, int64_t grid_w, bool max_pool, double eps, bool use_gram,
    bool detach_norm, bool need_s, bool need_t) {
  const nodes::Grid grid = affinity_full_grid(s, t, kernel_h, kernel_w, grid_h, grid_w, max_pool);
  glue::check_same_device("affinity_full_backward",
                          {{"s", s}, {"t", t}, {"grad_terms", grad_terms}, {"s_norm", s_norm_in}, {"t_norm", t_norm_in},
                           {"gram_ss", gram_ss}, {"gram_st", gram_st}, {"gram_tt", gram_tt}});
  FASTKD_GLUE_GUARD(s);
  const int64_t batch = s.size(0), m = nodes::node_count(grid);
  TORCH_CHECK(grad_terms.dim() == 1 || (grad_terms.dim() == 2 && grad_terms.size(1) == m),
              "`grad_terms` must be (B,) or (B, m)");
  const at::Tensor s_norm = s_norm_in.to(at::kDouble).contiguous(), t_norm = t_norm_in.to(at::kDouble).contiguous();
  const at::Tensor s_scale = affinity_full_scales(s_norm, eps), t_scale = affinity_full_scales(t_norm, eps);
  const bool uniform = grad_terms.dim() == 1;
  at::Tensor weight = grad_terms.to(at::kDouble).contiguous();  // autograd may hand in an expanded tensor
  const KernelOperands operands = affinity_full_operands(s, t, grid);  // pooled again: nothing kept in between
  const at::Tensor &s_c = operands.s, &t_c = operands.t;
  const nodes::Grid& node_grid = operands.grid;
  const auto doubles = s.options().dtype(at::kDouble);
  const at::Tensor none;
  // dL/ds_hat and dL/dt_hat, and unless the norm is detached each node's x_hat . dL/dx_hat (the norm's share of
  // the gradient), summed where the gradients are made.
  at::Tensor grad_s_hat, grad_t_hat, s_form, t_form;
  const bool forms = !detach_norm;
  if (!use_gram) {  // dL/ds_i = 2 sum_j (w_i + w_j) D_ij s_j, and minus the same of t for dL/dt: a slab of W at a time
    if (uniform) weight = weight.unsqueeze(1).expand({batch, m}).contiguous();
    const int64_t side = FASTKD_KERNELS::kAffinityDirectSide;
    if (need_s) grad_s_hat = at::empty({batch, s.size(1), m}, doubles);
    if (need_t) grad_t_hat = at::empty({batch, t.size(1), m}, doubles);
    if (need_s && forms) s_form = at::empty({batch, (s.size(1) + side - 1) / side, m}, doubles);
    if (need_t && forms) t_form = at::empty({batch, (t.size(1) + side - 1) / side, m}, doubles);
    const int64_t rows = affinity_full_slab_rows(m, std::max(s.size(1), t.size(1)));
    for (int64_t first_row = 0; first_row < m; first_row += rows) {
      const at::Tensor weighted_t = affinity_full_difference(s_c, s_scale, t_c, t_scale, node_grid, first_row,
                                                             std::min(rows, m - first_row), weight);
      if (need_s) affinity_full_columns(s_c, s_scale, node_grid, weighted_t, first_row, 1.0, grad_s_hat, s_form);
      if (need_t) affinity_full_columns(t_c, t_scale, node_grid, weighted_t, first_row, -1.0, grad_t_hat, t_form);
    }
    if (s_form.defined()) s_form = s_form.sum(1);  // the channel tiles' partials, in a fixed order
    if (t_form.defined()) t_form = t_form.sum(1);
  } else {
    const at::Tensor ss = gram_ss.to(at::kDouble), st = gram_st.to(at::kDouble), tt = gram_tt.to(at::kDouble);
    const at::Tensor ts = st.transpose(1, 2);
    if (uniform) {  // w_k = w: dL/ds = 4 w (SS' s - ST' t), dL/dt = 4 w (TT' t - TS' s)
      const at::Tensor w = weight.view({-1, 1, 1});
      if (need_s) {
        std::tie(grad_s_hat, s_form, std::ignore) = affinity_full_apply(
            s_c, s_scale, t_c, t_scale, node_grid, 4 * w * ss, -4 * w * st, none, none, none, true, false, forms);
      }
      if (need_t) {
        std::tie(grad_t_hat, t_form, std::ignore) = affinity_full_apply(
            t_c, t_scale, s_c, s_scale, node_grid, 4 * w * tt, -4 * w * ts, none, none, none, true, false, forms);
      }
    } else {  // 2 w_k (SS' s_k - ST' t_k) + 2 (S W S' s_k - S W T' t_k), and the same for t
      const at::Tensor weighted_st = affinity_full_gram(s_c, s_scale, t_c, t_scale, node_grid, weight);  // S W T'
      if (need_s) {
        const at::Tensor weighted_ss = affinity_full_gram(s_c, s_scale, s_c, s_scale, node_grid, weight);
        std::tie(grad_s_hat, s_form, std::ignore) =
            affinity_full_apply(s_c, s_scale, t_c, t_scale, node_grid, 2 * weighted_ss, -2 * weighted_st, 2 * ss,
                                -2 * st, weight, true, false, forms);
      }
      if (need_t) {
        const at::Tensor weighted_tt = affinity_full_gram(t_c, t_scale, t_c, t_scale, node_grid, weight);
        std::tie(grad_t_hat, t_form, std::ignore) =
            affinity_full_apply(t_c, t_scale, s_c, s_scale, node_grid, 2 * weighted_tt,
                                -2 * weighted_st.transpose(1, 2), 2 * tt, -2 * ts, weight, true, false, forms);
      }
    }
  }
  // dL/dx from dL/df_hat, in each input's own dtype and layout; the norm's share of each node's gradient,
  // k^2 (f . g) / n = k (f_hat . g) / n with k = 1 / (n + eps) (0 where n = 0), from the forms.
  const bool pooled = node_grid.kernel_h != grid.kernel_h || node_grid.kernel_w != grid.kernel_w;
  auto node_backward = [&](const at::Tensor& grad_hat, const at::Tensor& x, const at::Tensor& x_nodes,
                           const at::Tensor& norm, const at::Tensor& form) {
    at::Tensor grad = at::empty_like(x);
    if (grad.numel() == 0) return grad;
    at::Tensor radial;
    if (!detach_norm) {
      radial = at::where(norm > 0, form / ((norm + eps) * at::where(norm > 0, norm, at::ones_like(norm))),
                         at::zeros_like(norm)).contiguous();
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affinity_full_node_backward", [&] {
      FASTKD_KERNELS::node_backward(grad_hat.const_data_ptr<double>(), storage_data<scalar_t>(x), map_of(x),
                                    pooled ? x_nodes.const_data_ptr<double>() : nullptr, norm.const_data_ptr<double>(),
                                    grid, eps, detach_norm, batch,
                                    detach_norm ? nullptr : radial.mutable_data_ptr<double>(), /*radial_given=*/true,
                                    mutable_storage_data<scalar_t>(grad), map_of(grad), FASTKD_GLUE_STREAM());
    });
    return grad;
  };
  at::Tensor grad_s = need_s ? node_backward(grad_s_hat, s, s_c, s_norm, s_form) : at::empty({0}, s.options());
  at::Tensor grad_t = need_t ? node_backward(grad_t_hat, t, t_c, t_norm, t_form) : at::empty({0}, t.options());
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace fastkd
