"""The ``triton`` backend of the ``probability`` op: ``||p_s - p_t||_2^2`` per pixel with ``p = softmax(l)`` over
channels (Xie et al. 2018, sec. 3.1; FORMULAS.md section 4), as the custom ops
``fastkd_triton::probability_forward`` and ``_backward`` (the schema of :mod:`fastkd.ops.probability.schema`).

Every kernel first gets both log-sum-exps in one online pass over the channels
(:func:`fastkd.ops._triton_per_pixel.softmax_tile`); the sums below then take a pass of their own over
the normalised probabilities, re-reading the tile from L1/L2, instead of being expanded into running moments
(``sum p_s^2 - 2 sum p_s p_t + sum p_t^2``), which would cancel near convergence, where the loss is small.
The gradients, with ``d = p_s - p_t``:

    dL/ds_k =  2 g p_sk (d_k - sum_j d_j p_sj)
    dL/dt_k = -2 g p_tk (d_k - sum_j d_j p_tj)

Memory traffic per pixel: forward reads ``2 C`` logits twice (the second time from L1/L2) and writes one
float64; backward reads them three times (statistics, ``sum_j d_j p_j``, the gradient) and dL/dterms once, and
writes ``C`` gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd.ops._per_pixel_schema import TEACHER
from fastkd.ops._triton_launch import on_device, strides
from fastkd.ops._triton_per_pixel import (BLOCK_C, BLOCK_P, LAUNCH_OPTIONS, channel_chunk, load_grad_terms, load_logits,
                                          pixel_grid, softmax_tile, spatial_offsets, store_gradient)
from fastkd.ops.probability import schema


@triton.jit
def _probabilities(s_image, t_image, channels, channel_mask, s_stride_c, t_stride_c, s_offsets, t_offsets,
                   pixel_mask, lse_s, lse_t):
    """(p_s, p_t): the float64 (BLOCK_C, BLOCK_P) softmaxes at ``channels`` of a tile, 0 at the channels past C."""
    xs = load_logits(s_image, channels, channel_mask, s_stride_c, s_offsets, pixel_mask, 1.0)
    xt = load_logits(t_image, channels, channel_mask, t_stride_c, t_offsets, pixel_mask, 1.0)
    return tl.exp(xs - lse_s[None, :]), tl.exp(xt - lse_t[None, :])


@triton.jit
def _probability_forward_kernel(
    s_ptr, t_ptr, terms_ptr,
    num_channels, width, pixels, tiles,
    s_stride_b, s_stride_c, s_stride_h, s_stride_w,
    t_stride_b, t_stride_c, t_stride_h, t_stride_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """``sum_k (p_sk - p_tk)^2`` of BLOCK_P pixels of one image into the (B, H, W) float64 ``terms``: the
    statistics pass, then the sum of squares; NaN where a logit of the pixel is not finite."""
    b, p, pixel_mask, s_image, s_offsets, t_image, t_offsets, lse_s, lse_t, _ = softmax_tile(
        s_ptr, t_ptr, num_channels, width, pixels, tiles, s_stride_b, s_stride_c, s_stride_h, s_stride_w,
        t_stride_b, t_stride_c, t_stride_h, t_stride_w, 1.0, False, BLOCK_C, BLOCK_P)
    squares = tl.zeros([BLOCK_P], tl.float64)
    for c0 in range(0, num_channels, BLOCK_C):
        channels, channel_mask = channel_chunk(c0, num_channels, BLOCK_C)
        p_s, p_t = _probabilities(s_image, t_image, channels, channel_mask, s_stride_c, t_stride_c, s_offsets,
                                  t_offsets, pixel_mask, lse_s, lse_t)
        squares += tl.sum((p_s - p_t) * (p_s - p_t), axis=0)
    tl.store(terms_ptr + b * pixels + p, squares, mask=pixel_mask)


@triton.jit
def _probability_backward_kernel(
    grad_ptr, s_ptr, t_ptr, out_ptr,
    num_channels, width, pixels, tiles,
    grad_stride_b, grad_stride_h, grad_stride_w,
    s_stride_b, s_stride_c, s_stride_h, s_stride_w,
    t_stride_b, t_stride_c, t_stride_h, t_stride_w,
    out_stride_b, out_stride_c, out_stride_h, out_stride_w,
    WRT_TEACHER: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dL/ds (or dL/dt where ``WRT_TEACHER``) of BLOCK_P pixels of one image, all channels: the statistics
    pass, ``sum_j d_j p_j`` (p the differentiated input's softmax), then the gradient chunk by chunk; exactly 0
    where dL/dterms is 0."""
    b, p, pixel_mask, s_image, s_offsets, t_image, t_offsets, lse_s, lse_t, _ = softmax_tile(
        s_ptr, t_ptr, num_channels, width, pixels, tiles, s_stride_b, s_stride_c, s_stride_h, s_stride_w,
        t_stride_b, t_stride_c, t_stride_h, t_stride_w, 1.0, False, BLOCK_C, BLOCK_P)
    projection = tl.zeros([BLOCK_P], tl.float64)  # sum_j d_j p_j
    for c0 in range(0, num_channels, BLOCK_C):
        channels, channel_mask = channel_chunk(c0, num_channels, BLOCK_C)
        p_s, p_t = _probabilities(s_image, t_image, channels, channel_mask, s_stride_c, t_stride_c, s_offsets,
                                  t_offsets, pixel_mask, lse_s, lse_t)
        projection += tl.sum((p_s - p_t) * (p_t if WRT_TEACHER else p_s), axis=0)
    grad_terms = (-2.0 if WRT_TEACHER else 2.0) * load_grad_terms(grad_ptr, b, p, width, pixel_mask, grad_stride_b,
                                                                  grad_stride_h, grad_stride_w)
    out_image, out_offsets = out_ptr + b * out_stride_b, spatial_offsets(p, width, out_stride_h, out_stride_w)
    for c0 in range(0, num_channels, BLOCK_C):
        channels, channel_mask = channel_chunk(c0, num_channels, BLOCK_C)
        p_s, p_t = _probabilities(s_image, t_image, channels, channel_mask, s_stride_c, t_stride_c, s_offsets,
                                  t_offsets, pixel_mask, lse_s, lse_t)
        value = (p_t if WRT_TEACHER else p_s) * ((p_s - p_t) - projection[None, :])
        store_gradient(out_image, channels, channel_mask, out_stride_c, out_offsets, pixel_mask, grad_terms, value)


@torch.library.custom_op("fastkd_triton::probability_forward", mutates_args=())
def probability_forward(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float64 ``||softmax(s) - softmax(t)||^2`` per pixel; NaN where a logit is not finite."""
    batch, _, height, width = s.shape
    terms = torch.empty(batch, height, width, dtype=torch.float64, device=s.device)
    programs, tiles = pixel_grid(s)
    with on_device(s):
        _probability_forward_kernel[(programs,)](
            s, t, terms, s.shape[1], width, height * width, tiles, *strides(s), *strides(t),
            BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, **LAUNCH_OPTIONS)
    return terms


@torch.library.custom_op("fastkd_triton::probability_backward", mutates_args=())
def probability_backward(grad_terms: torch.Tensor, s: torch.Tensor, t: torch.Tensor, wrt: int) -> torch.Tensor:
    """dL/ds (``wrt`` 0) or dL/dt (``wrt`` 1) from dL/dterms, in that input's dtype and layout."""
    x = t if wrt == TEACHER else s
    out = torch.empty_like(x)
    programs, tiles = pixel_grid(x)
    with on_device(x):
        _probability_backward_kernel[(programs,)](
            grad_terms, s, t, out, x.shape[1], x.shape[3], x.shape[2] * x.shape[3], tiles, *grad_terms.stride(),
            *strides(s), *strides(t), *strides(out), WRT_TEACHER=wrt == TEACHER, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P,
            **LAUNCH_OPTIONS)
    return out


probability_terms = schema.register("fastkd_triton")
