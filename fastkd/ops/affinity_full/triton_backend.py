"""The ``triton`` backend of the ``affinity_full`` op, the full graph of ``PairwiseAffinityLoss`` and
``AffinityDistillationLoss``: fused kernels behind the custom ops ``fastkd_triton::affinity_full_forward`` and
``_backward`` (the schema of :mod:`fastkd.ops.affinity_full.schema`).

Both losses are built from the same per-row quantity. With f_hat the pooled, normalised nodes of one image
(S: Cs x m for the student, T: Ct x m for the teacher) and ``D = S'S - T'T`` (m x m, never stored):

    r_i = sum_j D_ij^2                       (Liu et al. 2020, eq. 2: the pair-wise loss is sum_i r_i;
                                              He et al. 2019, eqs. 3-4: L = sum_i sqrt(r_i) / m)

Two algorithms compute it, chosen by :func:`fastkd.ops._graph.use_gram` unless overridden:

* **Gram** (O(m C^2) work, C x C memory): ``sum_i r_i = ||SS'||^2 - 2 ||ST'||^2 + ||TT'||^2`` and
  ``r_i = s_i'(SS')s_i - 2 s_i'(ST')t_i + t_i'(TT')t_i``. The terms cancel to ~1e-6 of their size near
  convergence, so the Gram matrices and everything after them are accumulated in float64.
* **direct** (O(m^2 C) work, O(m C) memory, flash-style): tiles of D are formed in registers from node
  tiles and reduced at once; used when m is small next to C. With few nodes (m <= FEW_NODES) D itself is
  formed, (B, m, m), its channels split over programs so that a few tiles still fill the GPU. The backward
  forms D in slabs of rows no larger than the gradients (:func:`slab_rows_for`), then applies each slab.

Backward, for any row weights ``w_i = dL/dr_i`` (uniform for the pair-wise loss):

    dL/ds_k = 2 sum_j (w_k + w_j) D_kj s_j = 2 w_k (SS' s_k - ST' t_k) + 2 (S W S' s_k - S W T' t_k)
    dL/dt_k = -2 sum_j (w_k + w_j) D_kj t_j = 2 w_k (TT' t_k - TS' s_k) + 2 (T W T' t_k - T W S' s_k)

with W = diag(w): weighted Gram matrices (Gram path) or D re-formed (direct path). The result,
dL/df_hat, goes through :func:`fastkd.ops._triton_nodes.node_backward` to the inputs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastkd.ops._graph import NodeGrid
from fastkd.ops._triton_launch import KERNEL_OPTIONS, on_device, strides
from fastkd.ops._triton_nodes import (advance_coordinates, load_normalized, load_patch_sums, node_backward,
                                     node_coordinates, node_norms, node_scales, pool_nodes)
from fastkd.ops.affinity_full import schema

BLOCK_NODES = 32
BLOCK_CHANNELS = 32
# The Gram kernel's channel tiles, GRAM_CHANNELS square: at 32 its staging (loads, conversions, the scale's
# products, index arithmetic) outnumbered the float64 MMAs, 552 instructions for 32 DMMA a warp in the loop on
# sm_90 (model: 46% of the H100 floor); at 64 a staged element feeds twice the products (1095 for 128: 93%). No
# spills on sm_80, sm_89 or sm_90 (tests/triton_compile_check.py).
GRAM_CHANNELS = 64
# gram_apply_kernel's output rows a program, APPLY_ROWS x BLOCK_NODES nodes, in one accumulator for all its
# products: at 32 rows (and an accumulator a matrix) its loop took 790 instructions for 64 DMMA a warp on sm_90
# (57%), at 64 1020 for 128 (73%). 64 x 64 spilled up to 616 bytes, and so did its variant with weighted
# products (four products a staged tile) at 64 x 32 on sm_80 (72 bytes): that one keeps BLOCK_CHANNELS rows.
APPLY_ROWS = 64
# Gram programs split the node range so that small batches still fill the GPU; each split writes its own
# partial matrix and the partials are summed in a fixed order (no atomics).
TARGET_PROGRAMS = 1024
# Up to this many nodes an image, the direct forward forms D (B, m, m) with its channels split over programs
# (direct_difference), instead of a program per BLOCK_NODES rows (pool_scale: 9 nodes, 8 programs for B = 8,
# each summing all 512 + 512 channels in sequence). As csrc/affinity_full/affinity_full.h's kAffinityFewNodes.
FEW_NODES = 64
# The direct kernels' tiles of D, DIRECT_ROWS rows i x BLOCK_NODES nodes j. direct_rows_kernel: at 32 x 32 its
# loop took 1093 instructions for 64 DMMA a warp on sm_90 (model: 47% of the H100 floor), at 64 x 32 1330 for
# 128 (78%); at 64 x 64 (74%) its variant with 64-bit offsets spilled 144-160 bytes on sm_80, sm_89 and sm_90.
# direct_difference_kernel: 440 for 32 at 32 x 32 (58%), 554 for 64 at 64 x 32 (89%); it spilled at 64 x 64.
# direct_columns_kernel (64 nodes x 32 channels of the output): 344 for 32 at 32 x 32 (67%), 447 for 64 (89%),
# reading W transposed (read as W's rows and transposed in registers, it spilled up to 40 bytes). No spills at
# 64 x 32 in any variant (tests/triton_compile_check.py).
DIRECT_ROWS = 64
# A 1 x 1 patch is not made a compile-time constant in the kernels with tl.dot: with it, Triton (3.8) moves
# the float16/bfloat16 -> float64 conversion of the loaded tile into the MMA operand layout and fails to
# compile them (an assertion in its MMAv2 lowering); a runtime patch size keeps the conversion before it.
UNSPECIALISED = ["kernel_h", "kernel_w"]


@triton.jit(do_not_specialize=UNSPECIALISED)
def gram_kernel(x_ptr, x_scale_ptr, y_ptr, y_scale_ptr, weight_ptr, out_ptr, x_channels, y_channels, num_nodes,
                height, width, grid_w, x_sb, x_sc, x_sh, x_sw, y_sb, y_sc, y_sh, y_sw, kernel_h, kernel_w,
                nodes_per_split, HAS_WEIGHT: tl.constexpr, MAX_POOL: tl.constexpr,
                BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (BLOCK_X x BLOCK_Y) tile of ``X W Y'`` summed over one split of the nodes; grid
    (tiles, splits, B). Writes out[b, split] (B, splits, Cx, Cy) float64."""
    tile = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    y_tiles = tl.cdiv(y_channels, BLOCK_Y)
    x_rows = (tile // y_tiles).to(tl.int64) * BLOCK_X + tl.arange(0, BLOCK_X).to(tl.int64)
    y_rows = (tile % y_tiles).to(tl.int64) * BLOCK_Y + tl.arange(0, BLOCK_Y).to(tl.int64)
    acc = tl.zeros((BLOCK_X, BLOCK_Y), tl.float64)
    first = split * nodes_per_split
    last = tl.minimum(first + nodes_per_split, num_nodes)
    node_row, node_col = node_coordinates(first + tl.arange(0, BLOCK_N).to(tl.int64), grid_w)
    step_rows, step_cols = BLOCK_N // grid_w, BLOCK_N % grid_w
    for n0 in range(first, last, BLOCK_N):
        nodes = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        nodes = tl.where(nodes < last, nodes, num_nodes)  # past this split: loaded as 0
        x_hat = load_normalized(x_ptr, x_scale_ptr, b, x_rows, nodes, node_row, node_col, x_channels, num_nodes,
                                height, width, x_sb, x_sc, x_sh, x_sw, kernel_h, kernel_w, MAX_POOL)
        y_hat = load_normalized(y_ptr, y_scale_ptr, b, y_rows, nodes, node_row, node_col, y_channels, num_nodes,
                                height, width, y_sb, y_sc, y_sh, y_sw, kernel_h, kernel_w, MAX_POOL)
        if HAS_WEIGHT:
            x_hat = x_hat * tl.load(weight_ptr + b * num_nodes + nodes, mask=nodes < num_nodes, other=0.0)[None, :]
        acc += tl.dot(x_hat, tl.trans(y_hat))
        node_row, node_col = advance_coordinates(node_row, node_col, step_rows, step_cols, grid_w)
    splits = tl.num_programs(1).to(tl.int64)
    out = out_ptr + ((b * splits + split) * x_channels + x_rows[:, None]) * y_channels + y_rows[None, :]
    tl.store(out, acc, mask=(x_rows[:, None] < x_channels) & (y_rows[None, :] < y_channels))


@triton.jit
def _matrices_times_nodes(acc, first_ptr, second_ptr, weight, b, out_rows, out_channels, x_ptr, x_scale_ptr,
                          x_channels, nodes, node_row, node_col, num_nodes, height, width, x_sb, x_sc, x_sh, x_sw,
                          kernel_h, kernel_w, HAS_SECOND: tl.constexpr, MAX_POOL: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """``acc + M1[out_rows, :] @ X_hat[:, nodes]``, and with HAS_SECOND ``+ M2[out_rows, :] @ X_hat[:, nodes]
    diag(weight)``, for contiguous float64 matrices M1, M2 (B, out_channels, x_channels): each staged tile of
    X_hat feeds both products."""
    for c0 in range(0, x_channels, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        offsets = (b * out_channels + out_rows[:, None]) * x_channels + channels[None, :]
        in_matrix = (out_rows[:, None] < out_channels) & (channels[None, :] < x_channels)
        x_hat = load_normalized(x_ptr, x_scale_ptr, b, channels, nodes, node_row, node_col, x_channels, num_nodes,
                                height, width, x_sb, x_sc, x_sh, x_sw, kernel_h, kernel_w, MAX_POOL)
        acc += tl.dot(tl.load(first_ptr + offsets, mask=in_matrix, other=0.0), x_hat)
        if HAS_SECOND:
            acc += tl.dot(tl.load(second_ptr + offsets, mask=in_matrix, other=0.0), x_hat * weight[None, :])
    return acc


@triton.jit(do_not_specialize=UNSPECIALISED)
def gram_apply_kernel(p_ptr, p_scale_ptr, q_ptr, q_scale_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr, weight_ptr,
                      out_ptr, dot_a_ptr, dot_b_ptr, p_channels, q_channels, num_nodes, height, width, grid_w,
                      p_sb, p_sc, p_sh, p_sw, q_sb, q_sc, q_sh, q_sw, kernel_h, kernel_w,
                      HAS_Q: tl.constexpr, HAS_WEIGHTED: tl.constexpr, DOTS: tl.constexpr, FORM: tl.constexpr,
                      MAX_POOL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """For a block of nodes of one image; grid (node blocks, B), P and Q the normalised nodes:

    ``out = A1 P + B1 Q + (A2 P + B2 Q) diag(w)`` (Cp x m), with FORM also ``dot_a = p . out`` per node (the
    norm's share of the gradient, node_backward's ``hat_dots``), or with DOTS (and neither out nor w) the
    per-node quadratic forms ``dot_a = p . (A1 p)`` and ``dot_b = p . (B1 q)``. Output rows BLOCK_R at a time.
    """
    b = tl.program_id(1).to(tl.int64)
    nodes = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    node_ok = nodes < num_nodes
    node_row, node_col = node_coordinates(nodes, grid_w)
    weight = tl.zeros((BLOCK_N,), tl.float64)
    if HAS_WEIGHTED:
        weight = tl.load(weight_ptr + b * num_nodes + nodes, mask=node_ok, other=0.0)
    dot_a = tl.zeros((BLOCK_N,), tl.float64)
    dot_b = tl.zeros((BLOCK_N,), tl.float64)
    for r0 in range(0, p_channels, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        if DOTS:  # two accumulators: the forms are kept apart
            from_p = _matrices_times_nodes(tl.zeros((BLOCK_R, BLOCK_N), tl.float64), a1_ptr, a1_ptr, weight, b,
                                           rows, p_channels, p_ptr, p_scale_ptr, p_channels, nodes, node_row,
                                           node_col, num_nodes, height, width, p_sb, p_sc, p_sh, p_sw, kernel_h,
                                           kernel_w, False, MAX_POOL, BLOCK_C)
            p_hat = load_normalized(p_ptr, p_scale_ptr, b, rows, nodes, node_row, node_col, p_channels, num_nodes,
                                    height, width, p_sb, p_sc, p_sh, p_sw, kernel_h, kernel_w, MAX_POOL)
            dot_a += tl.sum(p_hat * from_p, axis=0)
            if HAS_Q:
                from_q = _matrices_times_nodes(tl.zeros((BLOCK_R, BLOCK_N), tl.float64), b1_ptr, b1_ptr, weight,
                                               b, rows, p_channels, q_ptr, q_scale_ptr, q_channels, nodes,
                                               node_row, node_col, num_nodes, height, width, q_sb, q_sc, q_sh,
                                               q_sw, kernel_h, kernel_w, False, MAX_POOL, BLOCK_C)
                dot_b += tl.sum(p_hat * from_q, axis=0)
        else:  # one accumulator for all four products
            result = _matrices_times_nodes(tl.zeros((BLOCK_R, BLOCK_N), tl.float64), a1_ptr, a2_ptr, weight, b,
                                           rows, p_channels, p_ptr, p_scale_ptr, p_channels, nodes, node_row,
                                           node_col, num_nodes, height, width, p_sb, p_sc, p_sh, p_sw, kernel_h,
                                           kernel_w, HAS_WEIGHTED, MAX_POOL, BLOCK_C)
            if HAS_Q:
                result = _matrices_times_nodes(result, b1_ptr, b2_ptr, weight, b, rows, p_channels, q_ptr,
                                               q_scale_ptr, q_channels, nodes, node_row, node_col, num_nodes,
                                               height, width, q_sb, q_sc, q_sh, q_sw, kernel_h, kernel_w,
                                               HAS_WEIGHTED, MAX_POOL, BLOCK_C)
            if FORM:  # the patch sums' dots with out, scaled to p_hat's once per node after the loop
                sums = load_patch_sums(p_ptr, b, rows, nodes, node_row, node_col, p_channels, num_nodes, height,
                                       width, p_sb, p_sc, p_sh, p_sw, kernel_h, kernel_w, MAX_POOL)
                dot_a += tl.sum(sums * result, axis=0)
            out = out_ptr + (b * p_channels + rows[:, None]) * num_nodes + nodes[None, :]
            tl.store(out, result, mask=(rows[:, None] < p_channels) & node_ok[None, :])
    if FORM:
        dot_a = dot_a * tl.load(p_scale_ptr + b * num_nodes + nodes, mask=node_ok, other=0.0)
    if DOTS or FORM:
        tl.store(dot_a_ptr + b * num_nodes + nodes, dot_a, mask=node_ok)
    if DOTS:
        tl.store(dot_b_ptr + b * num_nodes + nodes, dot_b, mask=node_ok)


@triton.jit
def _affinity_tile(x_ptr, x_scale_ptr, b, nodes_i, row_i, col_i, nodes_j, row_j, col_j, x_channels, num_nodes,
                   height, width, x_sb, x_sc, x_sh, x_sw, kernel_h, kernel_w, first, last, MAX_POOL: tl.constexpr,
                   BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """``a[i, j] = x_i . x_j`` over the channels ``[first, last)`` for a (BLOCK_I, BLOCK_J) tile of normalised
    nodes (their node_coordinates: row_i, col_i and row_j, col_j), in registers; ``last`` is the channel count or
    a multiple of BLOCK_C."""
    affinity = tl.zeros((BLOCK_I, BLOCK_J), tl.float64)
    for c0 in range(first, last, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        x_i = load_normalized(x_ptr, x_scale_ptr, b, channels, nodes_i, row_i, col_i, x_channels, num_nodes,
                              height, width, x_sb, x_sc, x_sh, x_sw, kernel_h, kernel_w, MAX_POOL)
        x_j = load_normalized(x_ptr, x_scale_ptr, b, channels, nodes_j, row_j, col_j, x_channels, num_nodes,
                              height, width, x_sb, x_sc, x_sh, x_sw, kernel_h, kernel_w, MAX_POOL)
        affinity += tl.dot(tl.trans(x_i), x_j)
    return affinity


@triton.jit
def _difference_tile(s_ptr, s_scale_ptr, t_ptr, t_scale_ptr, b, nodes_i, row_i, col_i, nodes_j, row_j, col_j,
                     s_channels, t_channels, num_nodes, height, width, s_sb, s_sc, s_sh, s_sw, t_sb, t_sc, t_sh,
                     t_sw, kernel_h, kernel_w, MAX_POOL: tl.constexpr, BLOCK_I: tl.constexpr,
                     BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """``D[i, j] = s_i . s_j - t_i . t_j`` for a (BLOCK_I, BLOCK_J) tile, in registers."""
    a_s = _affinity_tile(s_ptr, s_scale_ptr, b, nodes_i, row_i, col_i, nodes_j, row_j, col_j, s_channels,
                         num_nodes, height, width, s_sb, s_sc, s_sh, s_sw, kernel_h, kernel_w, 0, s_channels,
                         MAX_POOL, BLOCK_I, BLOCK_J, BLOCK_C)
    a_t = _affinity_tile(t_ptr, t_scale_ptr, b, nodes_i, row_i, col_i, nodes_j, row_j, col_j, t_channels,
                         num_nodes, height, width, t_sb, t_sc, t_sh, t_sw, kernel_h, kernel_w, 0, t_channels,
                         MAX_POOL, BLOCK_I, BLOCK_J, BLOCK_C)
    return a_s - a_t


@triton.jit(do_not_specialize=UNSPECIALISED)
def direct_rows_kernel(s_ptr, s_scale_ptr, t_ptr, t_scale_ptr, rows_ptr, s_channels, t_channels, num_nodes,
                       height, width, grid_w, s_sb, s_sc, s_sh, s_sw, t_sb, t_sc, t_sh, t_sw, kernel_h, kernel_w,
                       MAX_POOL: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """``r_i = sum_j D_ij^2`` for a block of rows i of one image, sweeping j in tiles; grid (row blocks, B)."""
    b = tl.program_id(1).to(tl.int64)
    nodes_i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    row_i, col_i = node_coordinates(nodes_i, grid_w)
    row_j, col_j = node_coordinates(tl.arange(0, BLOCK_J).to(tl.int64), grid_w)
    step_rows, step_cols = BLOCK_J // grid_w, BLOCK_J % grid_w
    rows = tl.zeros((BLOCK_I,), tl.float64)
    for j0 in range(0, num_nodes, BLOCK_J):
        nodes_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        difference = _difference_tile(s_ptr, s_scale_ptr, t_ptr, t_scale_ptr, b, nodes_i, row_i, col_i, nodes_j,
                                      row_j, col_j, s_channels, t_channels, num_nodes, height, width,
                                      s_sb, s_sc, s_sh, s_sw, t_sb, t_sc, t_sh, t_sw, kernel_h, kernel_w,
                                      MAX_POOL, BLOCK_I, BLOCK_J, BLOCK_C)
        rows += tl.sum(difference * difference, axis=1)
        row_j, col_j = advance_coordinates(row_j, col_j, step_rows, step_cols, grid_w)
    tl.store(rows_ptr + b * num_nodes + nodes_i, rows, mask=nodes_i < num_nodes)


@triton.jit(do_not_specialize=UNSPECIALISED)
def direct_difference_kernel(s_ptr, s_scale_ptr, t_ptr, t_scale_ptr, weight_ptr, partials_ptr, s_channels,
                             t_channels, num_nodes, height, width, grid_w, s_sb, s_sc, s_sh, s_sw, t_sb, t_sc, t_sh,
                             t_sw, kernel_h, kernel_w, first_row, slab_rows, channels_per_split,
                             WEIGHTED: tl.constexpr, MAX_POOL: tl.constexpr, BLOCK_I: tl.constexpr,
                             BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """A (BLOCK_I, BLOCK_J) tile of the slab of D's rows ``[first_row, first_row + slab_rows)`` over the split's
    channels ``[split n, (split + 1) n)`` of s and of t (n = channels_per_split, a multiple of BLOCK_C), or with
    WEIGHTED of ``W_ij = 2 (w_i + w_j) D_ij`` (w: (B, m) float64), into partials (B, splits, slab_rows, m); grid
    (i blocks x j blocks, splits, B)."""
    tiles_j = tl.cdiv(num_nodes, BLOCK_J)
    tile = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    slab = (tile // tiles_j).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)  # rows in the slab
    nodes_i = first_row + slab
    nodes_j = (tile % tiles_j).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    row_i, col_i = node_coordinates(nodes_i, grid_w)
    row_j, col_j = node_coordinates(nodes_j, grid_w)
    first = split * channels_per_split
    a_s = _affinity_tile(s_ptr, s_scale_ptr, b, nodes_i, row_i, col_i, nodes_j, row_j, col_j, s_channels,
                         num_nodes, height, width, s_sb, s_sc, s_sh, s_sw, kernel_h, kernel_w, first,
                         tl.minimum(first + channels_per_split, s_channels), MAX_POOL, BLOCK_I, BLOCK_J, BLOCK_C)
    a_t = _affinity_tile(t_ptr, t_scale_ptr, b, nodes_i, row_i, col_i, nodes_j, row_j, col_j, t_channels,
                         num_nodes, height, width, t_sb, t_sc, t_sh, t_sw, kernel_h, kernel_w, first,
                         tl.minimum(first + channels_per_split, t_channels), MAX_POOL, BLOCK_I, BLOCK_J, BLOCK_C)
    in_slab, in_graph = slab < slab_rows, nodes_j < num_nodes
    difference = a_s - a_t
    if WEIGHTED:
        weight_i = tl.load(weight_ptr + b * num_nodes + nodes_i, mask=in_slab, other=0.0)
        weight_j = tl.load(weight_ptr + b * num_nodes + nodes_j, mask=in_graph, other=0.0)
        difference = 2.0 * (weight_i[:, None] + weight_j[None, :]) * difference
    image = b * tl.num_programs(1) + split
    if WEIGHTED:  # stored transposed, (B, splits, m, slab_rows): the operand direct_columns_kernel multiplies
        out = partials_ptr + (image * num_nodes + nodes_j[None, :]) * slab_rows + slab[:, None]
    else:
        out = partials_ptr + (image * slab_rows + slab[:, None]) * num_nodes + nodes_j[None, :]
    tl.store(out, difference, mask=in_slab[:, None] & in_graph[None, :])


@triton.jit(do_not_specialize=UNSPECIALISED)
def direct_columns_kernel(x_ptr, x_scale_ptr, weighted_t_ptr, out_ptr, form_ptr, x_channels, num_nodes, height,
                          width, grid_w, x_sb, x_sc, x_sh, x_sw, kernel_h, kernel_w, first_row, slab_rows,
                          NEGATE: tl.constexpr, FORM: tl.constexpr, MAX_POOL: tl.constexpr, BLOCK_I: tl.constexpr,
                          BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out[b, c, i] = sum_j W_ij x_j[c]`` (negated with NEGATE) for the nodes i of a slab of W's rows (weighted_t:
    W' (B, m, slab_rows), from direct_difference_kernel; out: (B, C, m); both float64), a block of those nodes
    and of channels; grid (node blocks, channel blocks, B). With FORM, also ``x_hat_i . out_i`` over the block's
    channels into form (B, channel blocks, m) float64, for node_backward's ``hat_dots``."""
    b = tl.program_id(2).to(tl.int64)
    slab = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    in_slab = slab < slab_rows
    channels = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    acc = tl.zeros((BLOCK_C, BLOCK_I), tl.float64)
    row_j, col_j = node_coordinates(tl.arange(0, BLOCK_J).to(tl.int64), grid_w)
    step_rows, step_cols = BLOCK_J // grid_w, BLOCK_J % grid_w
    for j0 in range(0, num_nodes, BLOCK_J):
        nodes_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        weighted_t = tl.load(weighted_t_ptr + (b * num_nodes + nodes_j[:, None]) * slab_rows + slab[None, :],
                             mask=(nodes_j[:, None] < num_nodes) & in_slab[None, :], other=0.0)
        x_j = load_normalized(x_ptr, x_scale_ptr, b, channels, nodes_j, row_j, col_j, x_channels, num_nodes,
                              height, width, x_sb, x_sc, x_sh, x_sw, kernel_h, kernel_w, MAX_POOL)
        acc += tl.dot(x_j, weighted_t)
        row_j, col_j = advance_coordinates(row_j, col_j, step_rows, step_cols, grid_w)
    if NEGATE:  # dL/dt_hat_i = -sum_j W_ij t_j
        acc = -acc
    nodes_i = first_row + slab
    ok = (channels[:, None] < x_channels) & in_slab[None, :]
    tl.store(out_ptr + (b * x_channels + channels[:, None]) * num_nodes + nodes_i[None, :], acc, mask=ok)
    if FORM:
        row_i, col_i = node_coordinates(nodes_i, grid_w)
        x_i = load_normalized(x_ptr, x_scale_ptr, b, channels, nodes_i, row_i, col_i, x_channels, num_nodes,
                              height, width, x_sb, x_sc, x_sh, x_sw, kernel_h, kernel_w, MAX_POOL)
        tl.store(form_ptr + (b * tl.num_programs(1) + tl.program_id(1)) * num_nodes + nodes_i,
                 tl.sum(x_i * acc, axis=0), mask=in_slab)


# ---------------------------------------------------------------------------------------------- launchers

def _geometry(x: torch.Tensor, grid: NodeGrid):
    return (grid.nodes, x.shape[2], x.shape[3], grid.grid_w)


def kernel_operands(s: torch.Tensor, t: torch.Tensor, grid: NodeGrid) -> Tuple[torch.Tensor, torch.Tensor, NodeGrid]:
    """What the kernels read of s and t, and on which grid: the inputs where every node is a pixel, else their
    nodes pooled once into float64 maps whose pixels are the nodes (pooling in the kernels redid it for every
    program that staged a node, with run-time loop bounds). The pooled maps hold B C m doubles, as dL/df_hat."""
    if (grid.kernel_h, grid.kernel_w) == (1, 1):
        return s, t, grid
    return pool_nodes(s, grid), pool_nodes(t, grid), NodeGrid(1, 1, grid.grid_h, grid.grid_w, False)


def gram(x, x_scale, y, y_scale, grid: NodeGrid, weight: Optional[torch.Tensor] = None):
    """``X W Y'`` per image for the normalised nodes of x and y (W = diag(weight), or the identity):
    (B, Cx, Cy) float64."""
    batch, x_channels, y_channels = x.shape[0], x.shape[1], y.shape[1]
    tiles = triton.cdiv(x_channels, GRAM_CHANNELS) * triton.cdiv(y_channels, GRAM_CHANNELS)
    node_blocks = triton.cdiv(grid.nodes, BLOCK_NODES)
    splits = 1 if not x.is_cuda else max(1, min(node_blocks, TARGET_PROGRAMS // max(1, tiles * batch)))
    nodes_per_split = triton.cdiv(node_blocks, splits) * BLOCK_NODES
    splits = triton.cdiv(grid.nodes, nodes_per_split)
    partials = torch.empty(batch, splits, x_channels, y_channels, dtype=torch.float64, device=x.device)
    with on_device(x):
        gram_kernel[(tiles, splits, batch)](
            x, x_scale, y, y_scale, x_scale if weight is None else weight, partials, x_channels, y_channels,
            *_geometry(x, grid), *strides(x), *strides(y), grid.kernel_h, grid.kernel_w, nodes_per_split,
            HAS_WEIGHT=weight is not None, MAX_POOL=grid.max_pool, BLOCK_X=GRAM_CHANNELS,
            BLOCK_Y=GRAM_CHANNELS, BLOCK_N=BLOCK_NODES, **KERNEL_OPTIONS)
    return partials.sum(dim=1)


def gram_apply(p, p_scale, q, q_scale, grid: NodeGrid, a1, b1=None, weighted=None, dots=False, form=False):
    """``A1 P + B1 Q + (A2 P + B2 Q) diag(w)`` with ``weighted = (A2, B2, w)`` (with ``form``, and ``p . out``
    per node as dot_a), or with ``dots`` the forms ``(p . A1 p, p . B1 q)`` per node. Returns
    ``(out or None, dot_a or None, dot_b or None)``."""
    batch, p_channels = p.shape[0], p.shape[1]
    q_channels = q.shape[1] if q is not None else 0
    out = torch.empty(batch, p_channels, grid.nodes, dtype=torch.float64, device=p.device) if not dots else None
    dot_a = torch.empty(batch, grid.nodes, dtype=torch.float64, device=p.device) if dots or form else None
    dot_b = torch.empty_like(dot_a) if dots else None
    a2, b2, weight = weighted if weighted is not None else (None, None, None)
    dummy = p_scale  # stands for an absent operand; never read
    operands = [a1, b1, a2, b2]
    a1, b1, a2, b2 = (dummy if m is None else m.contiguous() for m in operands)
    with on_device(p):
        gram_apply_kernel[(triton.cdiv(grid.nodes, BLOCK_NODES), batch)](
            p, p_scale, p if q is None else q, p_scale if q is None else q_scale, a1, b1, a2, b2,
            dummy if weight is None else weight, dummy if out is None else out,
            dummy if dot_a is None else dot_a, dummy if dot_b is None else dot_b, p_channels, q_channels,
            *_geometry(p, grid), *strides(p), *strides(p if q is None else q), grid.kernel_h, grid.kernel_w,
            HAS_Q=q is not None, HAS_WEIGHTED=weighted is not None, DOTS=dots, FORM=form and not dots,
            MAX_POOL=grid.max_pool,
            BLOCK_R=BLOCK_CHANNELS if weighted is not None else APPLY_ROWS, BLOCK_C=BLOCK_CHANNELS,
            BLOCK_N=BLOCK_NODES, **KERNEL_OPTIONS)
    return out, dot_a, dot_b


def direct_difference(s, s_scale, t, t_scale, grid: NodeGrid, first_row: int = 0,
                      slab_rows: Optional[int] = None, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The rows ``[first_row, first_row + slab_rows)`` (all of them by default) of ``D = S'S - T'T``,
    (B, slab_rows, m) float64, or given row weights w (B, m) those of ``W = 2 (w_i + w_j) D_ij`` transposed,
    (B, m, slab_rows). Where the slab's tiles are too few to fill the GPU, each program sums one range of
    channels (about TARGET_PROGRAMS programs in all), the ranges' partials then summed in a fixed order."""
    slab_rows = grid.nodes - first_row if slab_rows is None else slab_rows
    batch = s.shape[0]
    tiles = triton.cdiv(slab_rows, DIRECT_ROWS) * triton.cdiv(grid.nodes, BLOCK_NODES)
    chunks = triton.cdiv(max(s.shape[1], t.shape[1]), BLOCK_CHANNELS)
    splits = max(1, min(chunks, TARGET_PROGRAMS // max(1, tiles * batch)))
    channels_per_split = triton.cdiv(chunks, splits) * BLOCK_CHANNELS
    splits = max(1, triton.cdiv(chunks * BLOCK_CHANNELS, channels_per_split))
    layout = (grid.nodes, slab_rows) if weight is not None else (slab_rows, grid.nodes)
    partials = torch.empty(batch, splits, *layout, dtype=torch.float64, device=s.device)
    with on_device(s):
        direct_difference_kernel[(tiles, splits, batch)](
            s, s_scale, t, t_scale, s_scale if weight is None else weight, partials, s.shape[1], t.shape[1],
            *_geometry(s, grid), *strides(s), *strides(t), grid.kernel_h, grid.kernel_w, first_row, slab_rows,
            channels_per_split, WEIGHTED=weight is not None, MAX_POOL=grid.max_pool, BLOCK_I=DIRECT_ROWS,
            BLOCK_J=BLOCK_NODES, BLOCK_C=BLOCK_CHANNELS, **KERNEL_OPTIONS)
    return partials[:, 0] if splits == 1 else partials.sum(dim=1)


def direct_columns(x, x_scale, weighted_t, out, first_row: int, grid: NodeGrid, negate: bool,
                   form: Optional[torch.Tensor] = None):
    """Into ``out[:, :, first_row:first_row + slab_rows]`` (out: (B, C, m) float64): ``X W'`` per image (negated
    with ``negate``) for a slab of W's rows, given transposed (B, m, slab_rows), X the normalised nodes of x; and
    into the same columns of ``form`` (B, channel blocks, m), if given, each channel block's ``x_hat . out``."""
    batch, channels, slab_rows = x.shape[0], x.shape[1], weighted_t.shape[2]
    with on_device(x):
        direct_columns_kernel[(triton.cdiv(slab_rows, DIRECT_ROWS), triton.cdiv(channels, BLOCK_CHANNELS), batch)](
            x, x_scale, weighted_t, out, x_scale if form is None else form, channels, *_geometry(x, grid),
            *strides(x), grid.kernel_h, grid.kernel_w, first_row, slab_rows, NEGATE=negate, FORM=form is not None,
            MAX_POOL=grid.max_pool, BLOCK_I=DIRECT_ROWS, BLOCK_J=BLOCK_NODES,
            BLOCK_C=BLOCK_CHANNELS, **KERNEL_OPTIONS)


def slab_rows_for(nodes: int, channels: int) -> int:
    """Rows of D a backward slab holds: all m, or so many that the slab, B x rows x m doubles, is no larger than
    the larger gradient it makes, B x channels x m (channels = max(Cs, Ct)), or than one tile of DIRECT_ROWS
    rows. The cost model leaves m above Cs + Ct to the Gram path; only ``algorithm='direct'`` takes it there."""
    return min(nodes, max(DIRECT_ROWS, channels // DIRECT_ROWS * DIRECT_ROWS))


def direct_rows(s, s_scale, t, t_scale, grid: NodeGrid) -> torch.Tensor:
    """``r_i = sum_j D_ij^2`` for every node: (B, m) float64."""
    rows = torch.empty(s.shape[0], grid.nodes, dtype=torch.float64, device=s.device)
    with on_device(s):
        direct_rows_kernel[(triton.cdiv(grid.nodes, DIRECT_ROWS), s.shape[0])](
            s, s_scale, t, t_scale, rows, s.shape[1], t.shape[1], *_geometry(s, grid), *strides(s), *strides(t),
            grid.kernel_h, grid.kernel_w, MAX_POOL=grid.max_pool, BLOCK_I=DIRECT_ROWS, BLOCK_J=BLOCK_NODES,
            BLOCK_C=BLOCK_CHANNELS, **KERNEL_OPTIONS)
    return rows


def direct_backward(s, s_scale, t, t_scale, weight, grid: NodeGrid, need_s: bool, need_t: bool, forms: bool):
    """dL/ds_hat_i = 2 sum_j (w_i + w_j) D_ij s_j and dL/dt_hat_i = -2 sum_j (w_i + w_j) D_ij t_j, contiguous
    (B, C, m) float64 (None where not needed), for row weights ``weight`` (B, m): D formed a slab of rows at a
    time, then applied with the outputs in registers. With ``forms``, also each node's ``x_hat . dL/dx_hat``
    (B, m) for s and for t (else None)."""
    batch, nodes = s.shape[0], grid.nodes
    grads, partials = [], []
    for x, needed in ((s, need_s), (t, need_t)):
        grads.append(torch.empty(batch, x.shape[1], nodes, dtype=torch.float64, device=s.device) if needed else None)
        partials.append(torch.empty(batch, triton.cdiv(x.shape[1], BLOCK_CHANNELS), nodes, dtype=torch.float64,
                                    device=s.device) if needed and forms else None)
    rows = slab_rows_for(nodes, max(s.shape[1], t.shape[1]))
    for first_row in range(0, nodes, rows):
        weighted = direct_difference(s, s_scale, t, t_scale, grid, first_row, min(rows, nodes - first_row), weight)
        if need_s:
            direct_columns(s, s_scale, weighted, grads[0], first_row, grid, negate=False, form=partials[0])
        if need_t:
            direct_columns(t, t_scale, weighted, grads[1], first_row, grid, negate=True, form=partials[1])
    s_form, t_form = (None if p is None else p.sum(dim=1) for p in partials)  # the channel blocks', in order
    return grads[0], grads[1], s_form, t_form


def gram_rows(s, s_scale, t, t_scale, grams, grid: NodeGrid) -> torch.Tensor:
    """``r_i = s_i'(SS')s_i - 2 s_i'(ST')t_i + t_i'(TT')t_i`` (B, m). Values within 64 ulps of the forms are
    rounding noise and become exactly 0 (as in the torch backend), so identical rows have a zero loss and
    gradient."""
    gram_ss, gram_st, gram_tt = grams
    _, form_ss, minus_form_st = gram_apply(s, s_scale, t, t_scale, grid, gram_ss, -gram_st, dots=True)
    _, form_tt, _ = gram_apply(t, t_scale, None, None, grid, gram_tt, dots=True)
    rows = form_ss + 2 * minus_form_st + form_tt
    noise = 64 * torch.finfo(torch.float64).eps * (form_ss + form_tt)
    return torch.where(rows <= noise, torch.zeros_like(rows), rows)  # NaN stays NaN


# ------------------------------------------------------------------------------------- custom ops, autograd

@torch.library.custom_op("fastkd_triton::affinity_full_forward", mutates_args=())
def affinity_full_forward(s: torch.Tensor, t: torch.Tensor, kernel_h: int, kernel_w: int, grid_h: int, grid_w: int,
                          max_pool: bool, eps: float, use_gram: bool, per_row: bool, detach_norm: bool,
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]:
    """``(terms, ||s_i||, ||t_i||, SS', ST', TT')``: terms are r (B, m) with ``per_row``, else sum_i r_i
    (B,). The Gram matrices are empty on the direct path. ``detach_norm`` only changes the backward."""
    s, t, grid = kernel_operands(s, t, NodeGrid(kernel_h, kernel_w, grid_h, grid_w, max_pool))
    s_norm, t_norm = node_norms(s, grid), node_norms(t, grid)
    s_scale, t_scale = node_scales(s, s_norm, grid, eps), node_scales(t, t_norm, grid, eps)
    empty = s.new_empty((0,), dtype=torch.float64)
    if not use_gram:
        rows = direct_difference(s, s_scale, t, t_scale, grid).square().sum(dim=2) if grid.nodes <= FEW_NODES \
            else direct_rows(s, s_scale, t, t_scale, grid)
        return (rows if per_row else rows.sum(dim=1)), s_norm, t_norm, empty, empty.clone(), empty.clone()
    grams = gram(s, s_scale, s, s_scale, grid), gram(s, s_scale, t, t_scale, grid), \
        gram(t, t_scale, t, t_scale, grid)
    if per_row:
        terms = gram_rows(s, s_scale, t, t_scale, grams, grid)
    else:  # ||SS'||^2 - 2||ST'||^2 + ||TT'||^2, a sum of squares that rounding may leave at -1e-17
        terms = (grams[0].square().sum((1, 2)) - 2 * grams[1].square().sum((1, 2))
                 + grams[2].square().sum((1, 2))).clamp_min(0)
    return (terms, s_norm, t_norm) + grams


def grad_hats(grad_terms, s, s_scale, t, t_scale, grams, grid: NodeGrid, use_gram: bool,
              need_s: bool, need_t: bool, forms: bool):
    """(dL/ds_hat, dL/dt_hat, s_form, t_form) from the kernels' operands: the gradients (B, C, m) float64 and,
    with ``forms``, each node's ``x_hat . dL/dx_hat`` (B, m) float64, which node_backward takes for the norm's
    share (None where not needed)."""
    gram_ss, gram_st, gram_tt = grams
    uniform = grad_terms.dim() == 1
    weight = grad_terms.to(torch.float64).contiguous()  # autograd may hand in an expanded (stride 0) tensor
    if not use_gram:
        weight = (weight[:, None].expand(-1, grid.nodes) if uniform else weight).contiguous()
        return direct_backward(s, s_scale, t, t_scale, weight, grid, need_s, need_t, forms)
    s_grad = t_grad = (None, None, None)
    if uniform:  # w_k = w: dL/ds = 4 w (SS' s - ST' t), dL/dt = 4 w (TT' t - TS' s)
        w = weight[:, None, None]
        if need_s:
            s_grad = gram_apply(s, s_scale, t, t_scale, grid, 4 * w * gram_ss, -4 * w * gram_st, form=forms)
        if need_t:
            t_grad = gram_apply(t, t_scale, s, s_scale, grid, 4 * w * gram_tt, -4 * w * gram_st.transpose(1, 2),
                                form=forms)
    else:
        weighted_st = gram(s, s_scale, t, t_scale, grid, weight)  # S W T'
        if need_s:
            weighted_ss = gram(s, s_scale, s, s_scale, grid, weight)
            s_grad = gram_apply(s, s_scale, t, t_scale, grid, 2 * weighted_ss, -2 * weighted_st,
                                weighted=(2 * gram_ss, -2 * gram_st, weight), form=forms)
        if need_t:
            weighted_tt = gram(t, t_scale, t, t_scale, grid, weight)
            t_grad = gram_apply(t, t_scale, s, s_scale, grid, 2 * weighted_tt, -2 * weighted_st.transpose(1, 2),
                                weighted=(2 * gram_tt, -2 * gram_st.transpose(1, 2), weight), form=forms)
    return s_grad[0], t_grad[0], s_grad[1], t_grad[1]


@torch.library.custom_op("fastkd_triton::affinity_full_backward", mutates_args=())
def affinity_full_backward(grad_terms: torch.Tensor, s: torch.Tensor, t: torch.Tensor, s_norm: torch.Tensor,
                           t_norm: torch.Tensor, gram_ss: torch.Tensor, gram_st: torch.Tensor, gram_tt: torch.Tensor,
                           kernel_h: int, kernel_w: int, grid_h: int, grid_w: int, max_pool: bool, eps: float,
                           use_gram: bool, detach_norm: bool, need_s: bool, need_t: bool
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dL/ds, dL/dt) for ``grad_terms`` = dL/dr (B, m) or dL/d(sum_i r_i) (B,); an empty tensor for a
    gradient that is not needed."""
    grid = NodeGrid(kernel_h, kernel_w, grid_h, grid_w, max_pool)
    s_nodes, t_nodes, node_grid = kernel_operands(s, t, grid)  # pooled again: nothing is kept between the passes
    s_scale, t_scale = node_scales(s_nodes, s_norm, node_grid, eps), node_scales(t_nodes, t_norm, node_grid, eps)
    grad_s_hat, grad_t_hat, s_form, t_form = grad_hats(grad_terms, s_nodes, s_scale, t_nodes, t_scale,
                                                       (gram_ss, gram_st, gram_tt), node_grid, use_gram, need_s,
                                                       need_t, forms=not detach_norm)
    empty = s.new_empty((0,))
    grad_s = node_backward(grad_s_hat, s, s_norm, grid, eps, detach_norm, s_form) if need_s else empty
    grad_t = node_backward(grad_t_hat, t, t_norm, grid, eps, detach_norm, t_form) if need_t else empty.to(t.dtype)
    return grad_s, grad_t


full_graph_terms = schema.register("fastkd_triton")
