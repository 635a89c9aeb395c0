"""The ``triton`` backend of the ``pixelwise_kd`` op: ``KL(q_t || q_s)`` per pixel with ``q = softmax(l / T)``
over channels (Liu et al. 2020, eq. 1; Hinton et al.; FORMULAS.md section 5), as the custom ops
``fastkd_triton::pixelwise_kd_forward`` and ``_backward`` (the schema of :mod:`fastkd.ops.pixelwise_kd.schema`).

With ``x = l / T`` and ``lse`` its log-sum-exp over channels, ``log q_t - log q_s = (x_t - x_s) - lse_t + lse_s``,
so ``KL = E_qt[x_t - x_s] - lse_t + lse_s``: the online pass of
:func:`fastkd.ops._triton_per_pixel.softmax_tile` gets the log-sum-exps and the mean ``E_qt[x_t - x_s]``
together (the weighted sum is rescaled with the teacher's running sum), so the forward reads each logit once
and needs no second pass. The gradients:

    dL/ds = g / T (q_s - q_t)
    dL/dt = g / T q_t (log q_t - log q_s - KL) = g / T q_t ((x_t - x_s) - E_qt[x_t - x_s])

(the second form has no log-sum-exp in it). The backward kernel recomputes the statistics from s and t (only
the inputs are saved) and writes its gradient in a second pass over the channels. The temperature reaches the
kernels as the float64 ``inverse_temperature`` (a Python float would be float32 on a GPU).

Memory traffic per pixel: forward reads ``2 C`` logits and writes one float64; backward reads ``2 C`` logits
twice (the second time from L1/L2) and dL/dterms once, and writes ``C`` gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd.ops._per_pixel_schema import TEACHER
from fastkd.ops._triton_launch import on_device, strides
from fastkd.ops._triton_per_pixel import (BLOCK_C, BLOCK_P, LAUNCH_OPTIONS, channel_chunk, load_grad_terms, load_logits,
                                          pixel_grid, softmax_tile, spatial_offsets, store_gradient)
from fastkd.ops.pixelwise_kd import schema


@triton.jit
def _pixelwise_kd_forward_kernel(
    s_ptr, t_ptr, terms_ptr,
    num_channels, width, pixels, tiles, inverse_temperature: tl.float64,
    s_stride_b, s_stride_c, s_stride_h, s_stride_w,
    t_stride_b, t_stride_c, t_stride_h, t_stride_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """``KL(q_t || q_s)`` of BLOCK_P pixels of one image into the (B, H, W) float64 ``terms``, in one online
    pass over the channels (each logit read once); NaN where a logit of the pixel is not finite."""
    b, p, pixel_mask, _, _, _, _, lse_s, lse_t, mean_difference = softmax_tile(
        s_ptr, t_ptr, num_channels, width, pixels, tiles, s_stride_b, s_stride_c, s_stride_h, s_stride_w,
        t_stride_b, t_stride_c, t_stride_h, t_stride_w, inverse_temperature, True, BLOCK_C, BLOCK_P)
    tl.store(terms_ptr + b * pixels + p, mean_difference - lse_t + lse_s, mask=pixel_mask)


@triton.jit
def _pixelwise_kd_backward_kernel(
    grad_ptr, s_ptr, t_ptr, out_ptr,
    num_channels, width, pixels, tiles, inverse_temperature: tl.float64,
    grad_stride_b, grad_stride_h, grad_stride_w,
    s_stride_b, s_stride_c, s_stride_h, s_stride_w,
    t_stride_b, t_stride_c, t_stride_h, t_stride_w,
    out_stride_b, out_stride_c, out_stride_h, out_stride_w,
    WRT_TEACHER: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dL/ds (or dL/dt where ``WRT_TEACHER``) of BLOCK_P pixels of one image, all channels: the softmax statistics
    in a first pass, then the gradient chunk by chunk in a second; exactly 0 where dL/dterms is 0."""
    b, p, pixel_mask, s_image, s_offsets, t_image, t_offsets, lse_s, lse_t, mean_difference = softmax_tile(
        s_ptr, t_ptr, num_channels, width, pixels, tiles, s_stride_b, s_stride_c, s_stride_h, s_stride_w,
        t_stride_b, t_stride_c, t_stride_h, t_stride_w, inverse_temperature, WRT_TEACHER, BLOCK_C, BLOCK_P)
    grad_terms = inverse_temperature * load_grad_terms(grad_ptr, b, p, width, pixel_mask, grad_stride_b,
                                                       grad_stride_h, grad_stride_w)
    out_image, out_offsets = out_ptr + b * out_stride_b, spatial_offsets(p, width, out_stride_h, out_stride_w)
    for c0 in range(0, num_channels, BLOCK_C):
        channels, channel_mask = channel_chunk(c0, num_channels, BLOCK_C)
        xs = load_logits(s_image, channels, channel_mask, s_stride_c, s_offsets, pixel_mask, inverse_temperature)
        xt = load_logits(t_image, channels, channel_mask, t_stride_c, t_offsets, pixel_mask, inverse_temperature)
        q_t = tl.exp(xt - lse_t[None, :])
        if WRT_TEACHER:
            # 0 at the padding channels, where xt - xs is -Inf - -Inf
            value = tl.where(channel_mask[:, None], q_t * ((xt - xs) - mean_difference[None, :]), 0.0)
        else:
            value = tl.exp(xs - lse_s[None, :]) - q_t
        store_gradient(out_image, channels, channel_mask, out_stride_c, out_offsets, pixel_mask, grad_terms, value)


@torch.library.custom_op("fastkd_triton::pixelwise_kd_forward", mutates_args=())
def pixelwise_kd_forward(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, H, W) float64 ``KL(softmax(t / T) || softmax(s / T))`` per pixel; NaN where a logit is not finite."""
    batch, _, height, width = s.shape
    terms = torch.empty(batch, height, width, dtype=torch.float64, device=s.device)
    programs, tiles = pixel_grid(s)
    with on_device(s):
        _pixelwise_kd_forward_kernel[(programs,)](
            s, t, terms, s.shape[1], width, height * width, tiles, 1.0 / temperature, *strides(s), *strides(t),
            BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, **LAUNCH_OPTIONS)
    return terms


@torch.library.custom_op("fastkd_triton::pixelwise_kd_backward", mutates_args=())
def pixelwise_kd_backward(grad_terms: torch.Tensor, s: torch.Tensor, t: torch.Tensor, temperature: float,
                          wrt: int) -> torch.Tensor:
    """dL/ds (``wrt`` 0) or dL/dt (``wrt`` 1) from dL/dterms, in that input's dtype and layout."""
    x = t if wrt == TEACHER else s
    out = torch.empty_like(x)
    programs, tiles = pixel_grid(x)
    with on_device(x):
        _pixelwise_kd_backward_kernel[(programs,)](
            grad_terms, s, t, out, x.shape[1], x.shape[3], x.shape[2] * x.shape[3], tiles, 1.0 / temperature,
            *grad_terms.stride(), *strides(s), *strides(t), *strides(out), WRT_TEACHER=wrt == TEACHER,
            BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, **LAUNCH_OPTIONS)
    return out


pixelwise_kd_terms = schema.register("fastkd_triton")
