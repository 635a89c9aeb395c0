"""The ``triton`` backend of the ``affinity_window`` op, the windowed graph of ``PairwiseAffinityLoss(window=r)``
(Liu et al. 2020, eq. 2; FORMULAS.md section 1): fused forward and backward, as the custom ops
``fastkd_triton::affinity_window_forward`` and ``_backward`` (the schema of :mod:`fastkd.ops.affinity_window.schema`).

With nodes f_i pooled from patches, ``f_hat_i = f_i / (||f_i|| + eps)`` and ``a_ij = f_hat_i . f_hat_j``,
:func:`window_graph_sum` computes the float64 sum
``total = sum_b sum_i sum_{j: cheb(i, j) <= r} (a_s_ij - a_t_ij)^2`` (j = i included), where cheb is the
Chebyshev distance on the node grid; the caller divides by the number of terms for ``reduction="mean"``.
Nodes are pooled and normalised on the fly from the inputs (:mod:`fastkd.ops._triton_nodes`); only the
node norms (B x m float64) are computed ahead.

Forward: grid (node blocks, B). A program walks one half of the (2r+1)^2 window of offsets, the diagonal
and one of each mirrored pair (the pair (j, i) gives the same term as (i, j), so those count twice). Per
offset it builds ``a_s`` and ``a_t`` of its nodes and their partners over channel blocks, stores
``D = a_s - a_t`` into a (B, half, m) float64 map (half = r (2r + 1) + r + 1 offsets, 13 for r = 2, fewer on
small grids) and adds ``D^2`` to its partial sum; the partials are reduced in a fixed order. The inputs, the
norms and D are saved for backward.

Backward: ``dL/df_hat_s_i = 4 grad sum_{j in window(i)} D_ij f_hat_s_j`` (j = i included) and
``dL/df_hat_t_i = -4 grad sum_j D_ij f_hat_t_j``. Grid (node blocks, B), one launch per input that needs a
gradient (sign +1 for the student, -1 for the teacher): for each channel block a program walks the whole
window, reading D from the saved map (at its own node for an offset of the stored half, at the partner's node
under the mirrored offset otherwise), and
accumulates ``D f_hat_partner`` in registers; it writes its (channels x nodes) tile of dL/df_hat once.
:func:`~fastkd.ops._triton_nodes.node_backward` then takes dL/df_hat through the normalisation and the
pooling to dL/dx. Every program owns what it writes: no atomics, bitwise reproducible results.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
# Not triton.runtime.interpreter: that imports numpy, which a CUDA torch and its triton do not install.
from triton.runtime.jit import JITFunction

from fastkd.ops._graph import NodeGrid, stored_half_window
from fastkd.ops._triton_launch import KERNEL_OPTIONS, fixed_order_sum, on_device, strides
from fastkd.ops._triton_nodes import (BLOCK_CHANNELS, BLOCK_NODES, load_normalized, node_backward, node_coordinates,
                                     node_norms, node_scales)
from fastkd.ops.affinity_window import schema


@triton.jit
def _partners(nodes, node_row, node_col, dy, dx, num_nodes, grid_h, grid_w):
    """The partner ``(row + dy, col + dx)`` of each node (at ``node_row``, ``node_col``: node_coordinates), its
    row and column, and whether it exists. A missing partner gets the index ``num_nodes``, which
    :func:`load_normalized` reads as a zero vector; the row/column test (not a bound on the flattened index)
    keeps a partner from wrapping around to the next row."""
    row = node_row + dy
    col = node_col + dx
    valid = (nodes < num_nodes) & (row >= 0) & (row < grid_h) & (col >= 0) & (col < grid_w)
    return tl.where(valid, row * grid_w + col, num_nodes), row, col, valid


@triton.jit
def _affinities(x_ptr, scale_ptr, b, nodes, node_row, node_col, partners, partner_row, partner_col, num_channels,
                num_nodes, height, width, stride_b, stride_c, stride_h, stride_w, kernel_h, kernel_w,
                MAX_POOL: tl.constexpr, BLOCK_C: tl.constexpr):
    """``a_ij = f_hat_i . f_hat_j`` in float64 for the nodes i (BLOCK_N,) and their partners j."""
    a = tl.zeros(nodes.shape, tl.float64)
    for c0 in range(0, num_channels, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        f_i = load_normalized(x_ptr, scale_ptr, b, channels, nodes, node_row, node_col, num_channels, num_nodes,
                              height, width, stride_b, stride_c, stride_h, stride_w, kernel_h, kernel_w, MAX_POOL)
        f_j = load_normalized(x_ptr, scale_ptr, b, channels, partners, partner_row, partner_col, num_channels,
                              num_nodes, height, width, stride_b, stride_c, stride_h, stride_w, kernel_h, kernel_w,
                              MAX_POOL)
        a += tl.sum(f_i * f_j, axis=0)
    return a


@triton.jit
def _window_forward_kernel(
    s_ptr, t_ptr, s_scale_ptr, t_scale_ptr, difference_ptr, teacher_affinity_ptr, partial_ptr,
    s_channels, t_channels, num_nodes, height, width, grid_h, grid_w, kernel_h, kernel_w, reach_h, reach_w,
    s_stride_b, s_stride_c, s_stride_h, s_stride_w,
    t_stride_b, t_stride_c, t_stride_h, t_stride_w,
    MAX_POOL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    nodes = block * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    node_row, node_col = node_coordinates(nodes, grid_w)
    # Offsets k of the (2 reach_h + 1) x (2 reach_w + 1) window, row-major; from the centre on they are the
    # half with dy > 0 or (dy = 0, dx >= 0): the diagonal, then one of each mirrored pair of offsets.
    span = 2 * reach_w + 1
    centre = reach_h * span + reach_w
    half = (2 * reach_h + 1) * span - centre
    squares = tl.zeros((BLOCK_N,), tl.float64)
    for k in range(centre, (2 * reach_h + 1) * span):
        partners, partner_row, partner_col, valid = _partners(nodes, node_row, node_col, k // span - reach_h,
                                                              k % span - reach_w, num_nodes, grid_h, grid_w)
        a_s = _affinities(s_ptr, s_scale_ptr, b, nodes, node_row, node_col, partners, partner_row, partner_col,
                          s_channels, num_nodes, height, width, s_stride_b, s_stride_c, s_stride_h, s_stride_w,
                          kernel_h, kernel_w, MAX_POOL, BLOCK_C)
        a_t = _affinities(t_ptr, t_scale_ptr, b, nodes, node_row, node_col, partners, partner_row, partner_col,
                          t_channels, num_nodes, height, width, t_stride_b, t_stride_c, t_stride_h, t_stride_w,
                          kernel_h, kernel_w, MAX_POOL, BLOCK_C)
        d = tl.where(valid, a_s - a_t, 0.0)  # where: a NaN node must not leak through a missing partner
        tl.store(difference_ptr + (b * half + k - centre) * num_nodes + nodes, d, mask=nodes < num_nodes)
        tl.store(teacher_affinity_ptr + (b * half + k - centre) * num_nodes + nodes, tl.where(valid, a_t, 0.0),
                 mask=nodes < num_nodes)
        weight = tl.where(k == centre, 1.0, 2.0).to(tl.float64)
        squares += weight * d * d
    tl.store(partial_ptr + b * tl.num_programs(0) + block, tl.sum(squares, axis=0))


@triton.jit
def _window_backward_kernel(
    grad_ptr, x_ptr, scale_ptr, difference_ptr, grad_hat_ptr, form_ptr, sign: tl.float64,
    num_channels, num_nodes, height, width, grid_h, grid_w, kernel_h, kernel_w, reach_h, reach_w,
    stride_b, stride_c, stride_h, stride_w,
    FORM: tl.constexpr, MAX_POOL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``grad_hat[b, c, i] = sign 4 grad sum_{j in window(i)} D_ij f_hat[b, c, j]``, and with FORM each node's
    ``f_hat_i . grad_hat_i`` into form (B, m) (node_backward's ``hat_dots``); grid (node blocks, B)."""
    b = tl.program_id(1).to(tl.int64)
    nodes = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    node_row, node_col = node_coordinates(nodes, grid_w)
    # d total / d f_hat_i = sum_j 2 D_ij (d a_ij / d f_hat_i) over the terms (i, j) and (j, i): 4 D_ij f_hat_j
    # for j != i, and 2 D_ii * 2 f_hat_i for the diagonal, so one factor 4 over the whole window.
    scale = 4.0 * sign * tl.load(grad_ptr).to(tl.float64)
    span = 2 * reach_w + 1
    centre = reach_h * span + reach_w
    half = (2 * reach_h + 1) * span - centre
    form = tl.zeros((BLOCK_N,), tl.float64)
    for c0 in range(0, num_channels, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        acc = tl.zeros((BLOCK_C, BLOCK_N), tl.float64)
        for k in range(0, (2 * reach_h + 1) * span):
            partners, partner_row, partner_col, valid = _partners(nodes, node_row, node_col, k // span - reach_h,
                                                                  k % span - reach_w, num_nodes, grid_h, grid_w)
            # The forward stored D for the half window: D_ij at offset o is stored at node i for o in the half,
            # and at node j under the mirrored offset -o (full index 2 centre - k) otherwise.
            if k >= centre:
                d = tl.load(difference_ptr + (b * half + k - centre) * num_nodes + nodes, mask=valid, other=0.0)
            else:
                d = tl.load(difference_ptr + (b * half + centre - k) * num_nodes + partners, mask=valid, other=0.0)
            f_j = load_normalized(x_ptr, scale_ptr, b, channels, partners, partner_row, partner_col, num_channels,
                                  num_nodes, height, width, stride_b, stride_c, stride_h, stride_w, kernel_h,
                                  kernel_w, MAX_POOL)
            acc += d[None, :] * f_j
        tl.store(grad_hat_ptr + (b * num_channels + channels[:, None]) * num_nodes + nodes[None, :], scale * acc,
                 mask=(channels[:, None] < num_channels) & (nodes[None, :] < num_nodes))
        if FORM:  # the node's own f_hat, the window's centre partner, read again
            f_i = load_normalized(x_ptr, scale_ptr, b, channels, nodes, node_row, node_col, num_channels,
                                  num_nodes, height, width, stride_b, stride_c, stride_h, stride_w, kernel_h,
                                  kernel_w, MAX_POOL)
            form += tl.sum(f_i * (scale * acc), axis=0)
    if FORM:
        tl.store(form_ptr + b * num_nodes + nodes, form, mask=nodes < num_nodes)


# Nodes per program. Under the Triton interpreter (CPU tensors) an op costs about the same Python overhead
# whatever the tile size, so wide tiles (fewer programs) run much faster; on a GPU, 32 x 32 float64 tiles stay
# in registers (no spills on sm_80, sm_89 or sm_90) and give more programs.
BLOCK_N = BLOCK_NODES if isinstance(_window_forward_kernel, JITFunction) else 256  # else: interpreted


def _node_grid(x: torch.Tensor, kernel_h: int, kernel_w: int, max_pool: bool) -> NodeGrid:
    """The node grid of a (B, C, H, W) map cut into ``kernel_h x kernel_w`` patches (ceil mode)."""
    return NodeGrid(kernel_h, kernel_w, triton.cdiv(x.shape[2], kernel_h), triton.cdiv(x.shape[3], kernel_w),
                    max_pool)


def _reach(grid: NodeGrid, window: int) -> Tuple[int, int]:
    """The window's reach along rows and columns: offsets past the grid leave every node without a partner."""
    return min(window, grid.grid_h - 1), min(window, grid.grid_w - 1)


def _grid_args(x: torch.Tensor, grid: NodeGrid, window: int):
    """The sizes every window kernel takes after the channel count(s)."""
    return (grid.nodes, x.shape[2], x.shape[3], grid.grid_h, grid.grid_w, grid.kernel_h, grid.kernel_w,
            *_reach(grid, window))


@torch.library.custom_op("fastkd_triton::affinity_window_forward", mutates_args=())
def affinity_window_forward(
    s: torch.Tensor, t: torch.Tensor, kernel_h: int, kernel_w: int, max_pool: bool, window: int, eps: float,
    detach_norm: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, difference, teacher_affinity, s_norms, t_norms): the float64 windowed sum; ``D = a_s - a_t`` and
    ``a_t`` of every node and every offset of the half window, (B, half, m) float64 (0 where the partner is
    missing); the (B, m) float64 node norms. ``detach_norm`` only matters to the backward."""
    grid = _node_grid(s, kernel_h, kernel_w, max_pool)
    batch, blocks = s.shape[0], triton.cdiv(grid.nodes, BLOCK_N)
    partials = torch.empty(batch, blocks, dtype=torch.float64, device=s.device)
    half = stored_half_window(window, grid.grid_h, grid.grid_w)
    difference = torch.empty(batch, half, grid.nodes, dtype=torch.float64, device=s.device)
    teacher_affinity = torch.empty_like(difference)
    s_norms, t_norms = node_norms(s, grid), node_norms(t, grid)
    s_scales, t_scales = node_scales(s, s_norms, grid, eps), node_scales(t, t_norms, grid, eps)
    with on_device(s):
        _window_forward_kernel[(blocks, batch)](
            s, t, s_scales, t_scales, difference, teacher_affinity, partials, s.shape[1], t.shape[1],
            *_grid_args(s, grid, window), *strides(s), *strides(t), MAX_POOL=max_pool, BLOCK_C=BLOCK_CHANNELS,
            BLOCK_N=BLOCK_N, **KERNEL_OPTIONS)
    return fixed_order_sum(partials), difference, teacher_affinity, s_norms, t_norms


@torch.library.custom_op("fastkd_triton::affinity_window_backward", mutates_args=())
def affinity_window_backward(
    grad_total: torch.Tensor, x: torch.Tensor, norms: torch.Tensor, difference: torch.Tensor,
    teacher_affinity: torch.Tensor, kernel_h: int, kernel_w: int, max_pool: bool, window: int, eps: float,
    detach_norm: bool, sign: float,
) -> torch.Tensor:
    """dL/dx in x's dtype and layout for the upstream gradient ``grad_total`` of the total, sign +1 for the
    student and -1 for the teacher: dL/df_hat from D, with each node's ``f_hat . dL/df_hat`` for the norm's
    share (so ``teacher_affinity`` is not read), then ``node_backward``."""
    grid = _node_grid(x, kernel_h, kernel_w, max_pool)
    batch, channels = x.shape[0], x.shape[1]
    grad_hat = torch.empty(batch, channels, grid.nodes, dtype=torch.float64, device=x.device)
    form = None if detach_norm else torch.empty(batch, grid.nodes, dtype=torch.float64, device=x.device)
    scales = node_scales(x, norms, grid, eps)
    with on_device(x):
        _window_backward_kernel[(triton.cdiv(grid.nodes, BLOCK_N), batch)](
            grad_total, x, scales, difference, grad_hat, scales if form is None else form, sign, channels,
            *_grid_args(x, grid, window), *strides(x), FORM=form is not None, MAX_POOL=grid.max_pool,
            BLOCK_C=BLOCK_CHANNELS, BLOCK_N=BLOCK_N, **KERNEL_OPTIONS)
    return node_backward(grad_hat, x, norms, grid, eps, detach_norm, form)


window_graph_sum = schema.register("fastkd_triton")
