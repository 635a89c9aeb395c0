"""Graph nodes for the Triton kernels of both affinity ops: pooled on the fly or once ahead, normalised by a
precomputed scale (a leaf: torch, triton and the shared math of :mod:`fastkd.ops._graph`).

A node is a ``kernel_h x kernel_w`` patch of one image (Liu et al. 2020, sec. 2.1; FORMULAS.md section 1,
steps 1-2), averaged over the pixels that exist or max-pooled. :func:`load_patch_sums` pools a (channels x
nodes) tile in registers whenever a kernel needs it, leaving an average's division by its pixels to one factor a
node outside the loops (:func:`pooling_factors`); the node norms ``||f_i||`` (one float64 per node) are computed
ahead, and the dot kernels read ``f_hat_i`` as a patch's sum times one float64 per node (:func:`node_scales`),
and take each node's row and column on the grid once, outside their loops (:func:`node_coordinates`, stepped
along a loop over nodes by :func:`advance_coordinates`), so that their loops hold no division. The windowed
graph pools on the fly; the full graph, whose every node is staged by many programs, pools once
(:func:`pool_nodes`) into float64 nodes that its kernels then read as pixels.

Nodes are numbered row-major on the ``grid_h x grid_w`` node grid, ``m = grid_h * grid_w``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastkd.ops._graph import NodeGrid
from fastkd.ops._triton_launch import KERNEL_OPTIONS, on_device, strides, to_element_type

BLOCK_NODES = 32
BLOCK_CHANNELS = 32
# Below this many nodes (B m) the reductions over a node's channels (norms, the norm's share of the gradient)
# split the channels over programs, BLOCK_CHANNELS a program, and sum the partials in a fixed order: a program
# per BLOCK_NODES nodes would leave the GPU idle (pool_scale: 9 nodes at 65 x 65, 8 programs for B = 8, each
# reading 512 channels in sequence). As csrc/common/nodes.cu's kFewNodes.
FEW_NODES = 8192


@triton.jit
def node_coordinates(nodes, grid_w):
    """Each node's row and column on the node grid: the one division a node, which kernels take outside the
    loops that stage the node (:func:`advance_coordinates` steps them along a loop over nodes)."""
    return nodes // grid_w, nodes % grid_w


@triton.jit
def advance_coordinates(node_row, node_col, step_rows, step_cols, grid_w):
    """The coordinates of the nodes ``step_rows * grid_w + step_cols`` further on (``0 <= step_cols < grid_w``,
    found once by the caller): an add and a carry, no division."""
    node_col = node_col + step_cols
    carry = node_col >= grid_w
    return node_row + step_rows + tl.where(carry, 1, 0), tl.where(carry, node_col - grid_w, node_col)


@triton.jit
def pooling_factors(node_row, node_col, height, width, kernel_h, kernel_w, MAX_POOL: tl.constexpr):
    """What turns each node's :func:`load_patch_sums` into its pooled feature, float64 (BLOCK_N,): 1 over the
    patch's pixels in the map for an average (edge patches of ceil mode hold fewer; 1 past the last node), 1 for
    a max. One division a node, taken where a kernel's loop does not repeat it."""
    if MAX_POOL:
        return tl.full(node_row.shape, 1.0, tl.float64)
    pixels = tl.minimum(height - node_row * kernel_h, kernel_h) * tl.minimum(width - node_col * kernel_w, kernel_w)
    return 1.0 / tl.maximum(pixels, 1).to(tl.float64)


@triton.jit
def load_patch_sums(x_ptr, b, channels, nodes, node_row, node_col, num_channels, num_nodes, height, width,
                    stride_b, stride_c, stride_h, stride_w, kernel_h, kernel_w, MAX_POOL: tl.constexpr):
    """The sums (MAX_POOL: the maxima) over each node's patch of ``channels`` (BLOCK_C,) x ``nodes`` (BLOCK_N,)
    of image ``b`` as a float64 (BLOCK_C, BLOCK_N) tile; 0 outside the map. ``node_row``, ``node_col``: the
    nodes' :func:`node_coordinates`. Indices are int64. A max over a patch holding NaN or +-Inf is NaN."""
    valid = (channels[:, None] < num_channels) & (nodes[None, :] < num_nodes)
    base = x_ptr + b * stride_b + channels[:, None] * stride_c
    if MAX_POOL:
        pooled = tl.full(valid.shape, float("-inf"), tl.float64)
        non_finite = tl.zeros(valid.shape, tl.int1)
    else:
        pooled = tl.zeros(valid.shape, tl.float64)
    for dy in range(0, kernel_h):
        row = node_row * kernel_h + dy
        for dx in range(0, kernel_w):
            col = node_col * kernel_w + dx
            inside = (row < height) & (col < width)
            pixel = tl.load(base + (row * stride_h + col * stride_w)[None, :], mask=valid & inside[None, :],
                            other=0.0).to(tl.float64)
            if MAX_POOL:
                pooled = tl.where(inside[None, :] & (pixel > pooled), pixel, pooled)
                non_finite |= inside[None, :] & (pixel - pixel != 0)  # NaN or +-Inf
            else:
                pooled += pixel
    if MAX_POOL:  # a max ignores -Inf, but FORMULAS.md asks that non-finite input give NaN
        pooled = tl.where(non_finite, float("nan"), pooled)
    return tl.where(valid, pooled, 0.0)


@triton.jit
def load_normalized(x_ptr, scale_ptr, b, channels, nodes, node_row, node_col, num_channels, num_nodes, height,
                    width, stride_b, stride_c, stride_h, stride_w, kernel_h, kernel_w, MAX_POOL: tl.constexpr):
    """``f_hat = f / (||f|| + eps)`` for a (BLOCK_C, BLOCK_N) tile: the patch sums times each node's scale from
    :func:`node_scales` (which holds the average's 1 / pixels too), one product an element and no division."""
    sums = load_patch_sums(x_ptr, b, channels, nodes, node_row, node_col, num_channels, num_nodes, height, width,
                           stride_b, stride_c, stride_h, stride_w, kernel_h, kernel_w, MAX_POOL)
    scale = tl.load(scale_ptr + b * num_nodes + nodes, mask=nodes < num_nodes, other=0.0)
    return sums * scale[None, :]


@triton.jit
def node_norm_kernel(x_ptr, out_ptr, num_channels, num_nodes, height, width, grid_w,
                     stride_b, stride_c, stride_h, stride_w, kernel_h, kernel_w, channels_per_split,
                     SPLIT: tl.constexpr, MAX_POOL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """``||f_i||_2`` (float64) of every node, or with SPLIT the sums of ``f_c^2`` over each split's channels
    ``[split n, (split + 1) n)`` (n = channels_per_split), (B, splits, m); grid (node blocks, splits, B)."""
    b = tl.program_id(2).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    nodes = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    node_row, node_col = node_coordinates(nodes, grid_w)
    first = split * channels_per_split
    squares = tl.zeros((BLOCK_N,), tl.float64)
    for c0 in range(first, tl.minimum(first + channels_per_split, num_channels), BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        sums = load_patch_sums(x_ptr, b, channels, nodes, node_row, node_col, num_channels, num_nodes, height,
                               width, stride_b, stride_c, stride_h, stride_w, kernel_h, kernel_w, MAX_POOL)
        squares += tl.sum(sums * sums, axis=0)
    factor = pooling_factors(node_row, node_col, height, width, kernel_h, kernel_w, MAX_POOL)
    squares = squares * (factor * factor)
    if SPLIT:
        tl.store(out_ptr + (b * tl.num_programs(1) + split) * num_nodes + nodes, squares, mask=nodes < num_nodes)
    else:
        tl.store(out_ptr + b * num_nodes + nodes, tl.sqrt(squares), mask=nodes < num_nodes)


@triton.jit
def pool_nodes_kernel(x_ptr, out_ptr, num_channels, num_nodes, height, width, grid_w,
                      stride_b, stride_c, stride_h, stride_w, kernel_h, kernel_w,
                      MAX_POOL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """The pooled features (B, C, m) float64, contiguous, of every node; grid (node blocks, channel blocks, B)."""
    b = tl.program_id(2).to(tl.int64)
    nodes = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    channels = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    node_row, node_col = node_coordinates(nodes, grid_w)
    pooled = load_patch_sums(x_ptr, b, channels, nodes, node_row, node_col, num_channels, num_nodes, height, width,
                             stride_b, stride_c, stride_h, stride_w, kernel_h, kernel_w, MAX_POOL) \
        * pooling_factors(node_row, node_col, height, width, kernel_h, kernel_w, MAX_POOL)[None, :]
    valid = (channels[:, None] < num_channels) & (nodes[None, :] < num_nodes)
    tl.store(out_ptr + (b * num_channels + channels[:, None]) * num_nodes + nodes[None, :], pooled, mask=valid)


@triton.jit
def program_nodes(norm_ptr, b, num_nodes, eps, BLOCK_N: tl.constexpr):
    """This program's BLOCK_N nodes (int64, along program_id(0)), which of them exist, their norms, and their
    scales 1 / (||f|| + eps)."""
    nodes = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    node_ok = nodes < num_nodes
    norm = tl.load(norm_ptr + b * num_nodes + nodes, mask=node_ok, other=0.0)
    return nodes, node_ok, norm, 1.0 / (norm + eps)


@triton.jit
def node_backward_kernel(grad_hat_ptr, x_ptr, norm_ptr, radial_ptr, grad_x_ptr, num_channels, num_nodes, height,
                         width, grid_w, stride_b, stride_c, stride_h, stride_w,
                         grad_stride_b, grad_stride_c, grad_stride_h, grad_stride_w, kernel_h, kernel_w,
                         eps: tl.float64, DETACH_NORM: tl.constexpr, MAX_POOL: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """dL/dx from dL/df_hat (B, C, m float64, contiguous) and the nodes' radial terms (:func:`node_backward`; not
    read when DETACH_NORM); grid (node blocks, channel blocks, B): a few large nodes still spread over many
    programs.

    Normalisation: with k = 1 / (n + eps) and n = ||f||, ``df_hat = k df - k^2 f (f . df) / n``, so
    ``dL/df = k g - k^2 (f . g) f / n`` (only ``k g`` when the norm is detached; f = 0 has n = 0 and a
    zero second term). Pooling: an average spreads dL/df over the patch's pixels, a max sends it to the
    first maximal pixel. Patches do not overlap, so each program writes only its own pixels.
    """
    b = tl.program_id(2).to(tl.int64)
    nodes, node_ok, norm, scale = program_nodes(norm_ptr, b, num_nodes, eps, BLOCK_N)
    grad_hat_base = grad_hat_ptr + b * num_channels * num_nodes
    if DETACH_NORM:
        radial = tl.zeros((BLOCK_N,), tl.float64)
    else:
        radial = tl.load(radial_ptr + b * num_nodes + nodes, mask=node_ok, other=0.0)
    node_row, node_col = node_coordinates(nodes, grid_w)
    channels = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    ok = (channels[:, None] < num_channels) & node_ok[None, :]
    g = tl.load(grad_hat_base + channels[:, None] * num_nodes + nodes[None, :], mask=ok, other=0.0)
    factor = pooling_factors(node_row, node_col, height, width, kernel_h, kernel_w, MAX_POOL)[None, :]
    pooled = load_patch_sums(x_ptr, b, channels, nodes, node_row, node_col, num_channels, num_nodes, height, width,
                             stride_b, stride_c, stride_h, stride_w, kernel_h, kernel_w, MAX_POOL) * factor
    grad_pooled = g * scale[None, :] - radial[None, :] * pooled
    if MAX_POOL:  # the first pixel (row-major in the patch) that holds the max; NaN is its own max
        winner = tl.full(ok.shape, -1, tl.int32)
        for dy in range(0, kernel_h):
            row = node_row * kernel_h + dy
            for dx in range(0, kernel_w):
                col = node_col * kernel_w + dx
                inside = (row < height) & (col < width)
                pixel = tl.load(x_ptr + b * stride_b + channels[:, None] * stride_c
                                + (row * stride_h + col * stride_w)[None, :],
                                mask=ok & inside[None, :], other=0.0).to(tl.float64)
                same = (pixel == pooled) | ((pixel != pixel) & (pooled != pooled))
                winner = tl.where((winner < 0) & inside[None, :] & same, dy * kernel_w + dx, winner)
    else:  # an average's gradient: the same share to each of its pixels
        grad_pooled = grad_pooled * factor
    for dy in range(0, kernel_h):
        row = node_row * kernel_h + dy
        for dx in range(0, kernel_w):
            col = node_col * kernel_w + dx
            inside = (row < height) & (col < width)
            grad_pixel = grad_pooled
            if MAX_POOL:
                grad_pixel = tl.where(winner == dy * kernel_w + dx, grad_pooled, 0.0)
            target = (grad_x_ptr + b * grad_stride_b + channels[:, None] * grad_stride_c
                      + (row * grad_stride_h + col * grad_stride_w)[None, :])
            tl.store(target, to_element_type(grad_pixel, grad_x_ptr), mask=ok & inside[None, :])


def channel_splits(batch: int, nodes: int, channels: int) -> int:
    """How many programs share each node's channels in the node reductions: one (all channels), or below
    FEW_NODES nodes in all one per BLOCK_CHANNELS channels."""
    return triton.cdiv(channels, BLOCK_CHANNELS) if batch * nodes < FEW_NODES and channels > BLOCK_CHANNELS else 1


def node_norms(x: torch.Tensor, grid: NodeGrid) -> torch.Tensor:
    """``||f_i||_2`` of every node of every image: (B, m) float64."""
    batch, channels, height, width = x.shape
    splits = channel_splits(batch, grid.nodes, channels)
    out = torch.empty(batch, *([splits] if splits > 1 else []), grid.nodes, dtype=torch.float64, device=x.device)
    with on_device(x):
        node_norm_kernel[(triton.cdiv(grid.nodes, BLOCK_NODES), splits, batch)](
            x, out, channels, grid.nodes, height, width, grid.grid_w, *strides(x), grid.kernel_h, grid.kernel_w,
            BLOCK_CHANNELS if splits > 1 else channels, SPLIT=splits > 1, MAX_POOL=grid.max_pool,
            BLOCK_C=BLOCK_CHANNELS, BLOCK_N=BLOCK_NODES, **KERNEL_OPTIONS)
    return out.sum(dim=1).sqrt() if splits > 1 else out  # a fixed-order sum of the splits' partials


def node_scales(x: torch.Tensor, norms: torch.Tensor, grid: NodeGrid, eps: float) -> torch.Tensor:
    """Each node's ``1 / (n_i (||f_i|| + eps))``, (B, m) float64, n_i the pixels its average pools (1 for a max):
    the scale :func:`load_normalized` turns a patch's sum into ``f_hat_i`` with, so that the dot kernels'
    loops, which stage a node many times, hold no division."""
    scales = (norms + eps).reciprocal()
    if grid.max_pool or (grid.kernel_h, grid.kernel_w) == (1, 1):
        return scales
    corners = torch.arange(grid.grid_h, device=x.device) * grid.kernel_h, \
        torch.arange(grid.grid_w, device=x.device) * grid.kernel_w
    rows = (x.shape[2] - corners[0]).clamp(max=grid.kernel_h)
    cols = (x.shape[3] - corners[1]).clamp(max=grid.kernel_w)
    return scales / (rows[:, None] * cols[None, :]).reshape(-1).to(torch.float64)


def pool_nodes(x: torch.Tensor, grid: NodeGrid) -> torch.Tensor:
    """The pooled features of every node: (B, C, grid_h, grid_w) float64, contiguous."""
    batch, channels, height, width = x.shape
    pooled = torch.empty(batch, channels, grid.grid_h, grid.grid_w, dtype=torch.float64, device=x.device)
    with on_device(x):
        pool_nodes_kernel[(triton.cdiv(grid.nodes, BLOCK_NODES), triton.cdiv(channels, BLOCK_CHANNELS), batch)](
            x, pooled, channels, grid.nodes, height, width, grid.grid_w, *strides(x), grid.kernel_h, grid.kernel_w,
            MAX_POOL=grid.max_pool, BLOCK_C=BLOCK_CHANNELS, BLOCK_N=BLOCK_NODES, **KERNEL_OPTIONS)
    return pooled


def node_backward(grad_hat: torch.Tensor, x: torch.Tensor, norms: torch.Tensor, grid: NodeGrid, eps: float,
                  detach_norm: bool, hat_dots: Optional[torch.Tensor]) -> torch.Tensor:
    """dL/dx (x's dtype and layout) from dL/df_hat, a contiguous (B, C, m) float64 tensor, and ``hat_dots``, each
    node's ``f_hat . dL/df_hat`` (B, m) float64 (None when the norm is detached), which the kernels that make
    dL/df_hat sum as they go: the norm's share of the gradient is ``k^2 (f . g) / n = k (f_hat . g) / n`` with
    k = 1 / (n + eps), 0 where n = 0."""
    if not detach_norm and hat_dots is None:
        raise ValueError("node_backward: hat_dots is needed unless the norm is detached")
    batch, channels, height, width = x.shape
    grad_x = torch.empty_like(x)
    radial = norms  # stands for the radial terms when the norm is detached; never read
    with on_device(x):
        if not detach_norm:
            radial = torch.where(norms > 0, hat_dots / ((norms + eps) * torch.where(norms > 0, norms, 1.0)), 0.0)
        node_backward_kernel[(triton.cdiv(grid.nodes, BLOCK_NODES), triton.cdiv(channels, BLOCK_CHANNELS), batch)](
            grad_hat, x, norms, radial, grad_x, channels, grid.nodes, height, width, grid.grid_w, *strides(x),
            *strides(grad_x), grid.kernel_h, grid.kernel_w, eps, DETACH_NORM=detach_norm,
            MAX_POOL=grid.max_pool, BLOCK_C=BLOCK_CHANNELS, BLOCK_N=BLOCK_NODES, **KERNEL_OPTIONS)
    return grad_x
