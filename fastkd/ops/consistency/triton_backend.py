"""The ``triton`` backend of the ``consistency`` op: the 8-neighbour map loss (Xie et al. 2018, sec. 3.1;
FORMULAS.md section 3), fused forward and backward, as the custom ops ``fastkd_triton::consistency_forward``
and ``_backward`` (the schema of :mod:`fastkd.ops.consistency.schema`).

``c(x) = sum_{o in N8, x + o inside} ||l(x + o) - l(x)||^2`` with ``N8 = {-d, 0, d}^2 \\ {(0, 0)}`` and
``loss_sum = sum_{b, x defined} (c_s(x) - c_t(x))^2``; "mean" divides by the number of (b, x) terms.

Forward: one program per tile of ``BLOCK_P`` pixels of one image. It builds ``c_s`` and ``c_t`` of its
pixels straight from the logits (the 8 neighbours are masked loads, no shifted copies), ``BLOCK_C``
channels at a time, in float64; it writes the (B, H, W) float64 difference map ``c_s - c_t`` (0 where c is
undefined) and its own partial sum of squares, reduced afterwards in a fixed order.

Backward: with ``g = dL/dc_s = 2 grad (c_s - c_t)`` (``-g`` for the teacher), each program gathers, for its
own pixels and all channels, ``dL/dl(x) = sum_{o in N8, x + o inside} 2 (g(x) + g(x + o)) (l(x) - l(x + o))``
(x enters c(x) through the edge to x + o, and c(x + o) through the same edge seen from x + o). Only the
inputs and the difference map are saved for backward; no atomics, so results are bitwise reproducible.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl

from fastkd.ops._triton_launch import KERNEL_OPTIONS, fixed_order_sum, on_device, strides, to_element_type
from fastkd.ops.consistency import schema

BLOCK_P = 128  # pixels per program (a tile of the flattened H x W map of one image)
BLOCK_C = 8  # channels per step of a program's channel loop


@triton.jit
def _pixel_tile(pid, tiles, pixels, width, BLOCK_P: tl.constexpr):
    """Program ``pid``'s image b and its BLOCK_P flat pixel indices p (int64), their mask, rows and columns."""
    b = (pid // tiles).to(tl.int64)
    p = (pid % tiles).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    return b, p, p < pixels, p // width, p % width


@triton.jit
def _neighbour_map(ptr, channels, height, width, stride_b, stride_c, stride_h, stride_w, b, rows, cols,
                   pixel_mask, dilation, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """``c(x)`` in float64 at the pixels (rows, cols) of image b, over the neighbours inside the image."""
    image = ptr + b * stride_b
    centre_offsets = rows * stride_h + cols * stride_w
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float64)
    for c0 in range(0, channels, BLOCK_C):
        ch = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        channel_rows = image + ch[:, None] * stride_c
        channel_mask = (ch < channels)[:, None]
        centre = tl.load(channel_rows + centre_offsets[None, :], mask=channel_mask & pixel_mask[None, :],
                         other=0.0).to(tl.float64)
        for dy in tl.static_range(-1, 2):  # the neighbour at (r, q) = (row, col) + (dy, dx) * d
            r = rows + dy * dilation
            row_inside = pixel_mask & (r >= 0) & (r < height)
            for dx in tl.static_range(-1, 2):
                if dy != 0 or dx != 0:
                    q = cols + dx * dilation
                    mask = channel_mask & (row_inside & (q >= 0) & (q < width))[None, :]
                    neighbour = tl.load(channel_rows + (r * stride_h + q * stride_w)[None, :], mask=mask,
                                        other=0.0).to(tl.float64)
                    # where, not a product with the mask: a non-finite centre must not leak through an
                    # edge that does not exist
                    edge = tl.where(mask, neighbour - centre, 0.0)
                    acc += edge * edge
    return tl.sum(acc, axis=0)


@triton.jit
def _consistency_forward_kernel(
    s_ptr, t_ptr, difference_ptr, partial_ptr,
    s_channels, t_channels, height, width, pixels, tiles, dilation,
    s_stride_b, s_stride_c, s_stride_h, s_stride_w,
    t_stride_b, t_stride_c, t_stride_h, t_stride_w,
    VALID: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    b, p, pixel_mask, rows, cols = _pixel_tile(pid, tiles, pixels, width, BLOCK_P)
    c_s = _neighbour_map(s_ptr, s_channels, height, width, s_stride_b, s_stride_c, s_stride_h, s_stride_w,
                         b, rows, cols, pixel_mask, dilation, BLOCK_C, BLOCK_P)
    c_t = _neighbour_map(t_ptr, t_channels, height, width, t_stride_b, t_stride_c, t_stride_h, t_stride_w,
                         b, rows, cols, pixel_mask, dilation, BLOCK_C, BLOCK_P)
    defined = pixel_mask
    if VALID:  # only the pixels whose 8 neighbours all lie inside
        defined = defined & (rows >= dilation) & (rows < height - dilation)
        defined = defined & (cols >= dilation) & (cols < width - dilation)
    difference = tl.where(defined, c_s - c_t, 0.0)
    tl.store(difference_ptr + b * pixels + p, difference, mask=pixel_mask)
    tl.store(partial_ptr + pid, tl.sum(difference * difference, axis=0))


@triton.jit
def _consistency_backward_kernel(
    grad_ptr, x_ptr, difference_ptr, out_ptr,
    channels, height, width, pixels, tiles, dilation, sign: tl.float64,
    difference_stride_b, difference_stride_h, difference_stride_w,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    out_stride_b, out_stride_c, out_stride_h, out_stride_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    b, p, pixel_mask, rows, cols = _pixel_tile(pid, tiles, pixels, width, BLOCK_P)
    # g = dL/dc = 2 * sign * grad * difference (0 where c is undefined); times the edge's own factor 2
    coefficient = 4.0 * sign * tl.load(grad_ptr).to(tl.float64)
    difference = difference_ptr + b * difference_stride_b
    g_centre = tl.load(difference + rows * difference_stride_h + cols * difference_stride_w, mask=pixel_mask,
                       other=0.0)
    image = x_ptr + b * x_stride_b
    out_image = out_ptr + b * out_stride_b
    centre_offsets = rows * x_stride_h + cols * x_stride_w
    for c0 in range(0, channels, BLOCK_C):
        ch = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        channel_rows = image + ch[:, None] * x_stride_c
        channel_mask = (ch < channels)[:, None]
        centre = tl.load(channel_rows + centre_offsets[None, :], mask=channel_mask & pixel_mask[None, :],
                         other=0.0).to(tl.float64)
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float64)
        for dy in tl.static_range(-1, 2):  # the neighbour at (r, q) = (row, col) + (dy, dx) * d
            r = rows + dy * dilation
            row_inside = pixel_mask & (r >= 0) & (r < height)
            for dx in tl.static_range(-1, 2):
                if dy != 0 or dx != 0:
                    q = cols + dx * dilation
                    inside = row_inside & (q >= 0) & (q < width)
                    mask = channel_mask & inside[None, :]
                    g_neighbour = tl.load(difference + r * difference_stride_h + q * difference_stride_w, mask=inside,
                                          other=0.0)
                    neighbour = tl.load(channel_rows + (r * x_stride_h + q * x_stride_w)[None, :], mask=mask,
                                        other=0.0).to(tl.float64)
                    acc += tl.where(mask, (g_centre + g_neighbour)[None, :] * (centre - neighbour), 0.0)
        out_offsets = ch[:, None] * out_stride_c + (rows * out_stride_h + cols * out_stride_w)[None, :]
        tl.store(out_image + out_offsets, to_element_type(coefficient * acc, out_ptr),
                 mask=channel_mask & pixel_mask[None, :])


def _grid(x: torch.Tensor) -> Tuple[int, int]:
    """(programs, tiles per image): every image of the batch is cut into tiles of BLOCK_P pixels."""
    tiles = triton.cdiv(x.shape[2] * x.shape[3], BLOCK_P)
    return x.shape[0] * tiles, tiles


@torch.library.custom_op("fastkd_triton::consistency_forward", mutates_args=())
def consistency_forward(s: torch.Tensor, t: torch.Tensor, valid: bool,
                               dilation: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, difference): the float64 sum of squares and the (B, H, W) map ``c_s - c_t``, 0 outside
    the defined region (``valid``: the pixels with all 8 neighbours inside; else every pixel)."""
    batch, _, height, width = s.shape
    programs, tiles = _grid(s)
    difference = torch.empty(batch, height, width, dtype=torch.float64, device=s.device)
    partials = torch.empty(programs, dtype=torch.float64, device=s.device)
    with on_device(s):
        _consistency_forward_kernel[(programs,)](
            s, t, difference, partials, s.shape[1], t.shape[1], height, width, height * width, tiles, dilation,
            *strides(s), *strides(t), VALID=valid, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, **KERNEL_OPTIONS)
    return fixed_order_sum(partials), difference


@torch.library.custom_op("fastkd_triton::consistency_backward", mutates_args=())
def consistency_backward(grad_loss: torch.Tensor, x: torch.Tensor, difference: torch.Tensor,
                         dilation: int, sign: float) -> torch.Tensor:
    """The gradient of ``sign * grad_loss * sum(difference^2)`` with respect to the logits x (sign +1 for the
    student, -1 for the teacher), in x's dtype."""
    out = torch.empty_like(x)
    programs, tiles = _grid(x)
    with on_device(x):
        _consistency_backward_kernel[(programs,)](
            grad_loss, x, difference, out, x.shape[1], x.shape[2], x.shape[3], x.shape[2] * x.shape[3], tiles,
            dilation, sign, *difference.stride(), *strides(x), *strides(out), BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P,
            **KERNEL_OPTIONS)
    return out



consistency_sum = schema.register("fastkd_triton")
