"""The Triton pieces both per-pixel ops (``pixelwise_kd``, ``probability``) share (a leaf: torch, triton and
:mod:`fastkd.ops._triton_launch`): the pixel tiles, the channel-chunk loads and the first pass of every kernel,
the softmax statistics of the student and the teacher.

Every kernel is one program per tile of ``BLOCK_P`` pixels of one image (the flattened H x W map; pixel p of
image b of a (B, C, H, W) tensor is at ``b sb + c sc + (p // W) sh + (p % W) sw``, int64 offsets, so any layout
is read in place) and loops over all C channels ``BLOCK_C`` at a time, reading each input in its own dtype
and computing in float64. A program writes only its own pixels: no atomics.

Passes over the channels: the first (:func:`softmax_tile`) gets each pixel's log-sum-exp with the online
recurrence (running max and rescaled sum of exponentials), so it reads each logit once; the op's later passes,
if any, read the tile again from the same program, which finds it in L1/L2 (a 128-pixel tile of C=19 float32
channels is 10 KB per input), so DRAM sees each input once per kernel. The ops take a second pass rather than
expanding their sums into running moments (``sum p_s^2 - 2 sum p_s p_t + sum p_t^2``) because the expansion
cancels catastrophically near convergence, where p_s ~ p_t and the loss is small.

Arithmetic: each pass takes one float64 exp per logit (``exp(x - lse)``; the first also one rescaling exp per
pixel, input and chunk). Float64 exps are software sequences of ~20 FP64 operations: on an H100 (34 FP64
TFLOP/s outside the tensor cores) two per float32 logit pair stay under the memory time, but the three passes
of the probability backward do not quite, and on an RTX 4090 (FP64 at 1/64 of FP32) the exps, not memory,
bound every one of these kernels.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from fastkd.ops._triton_launch import KERNEL_OPTIONS, to_element_type

BLOCK_P = 128  # pixels per program (a tile of the flattened H x W map of one image)
BLOCK_C = 4  # channels per step of a program's channel loops
# At most 128 registers, so that four programs of 4 warps fit on an SM for these memory-bound kernels: with
# KERNEL_OPTIONS' limit of 255, ptxas took up to 164 for the contiguous (vectorised) variants, which leaves room
# for three. None spills at 128 on sm_80, sm_89 or sm_90 (tests/triton_compile_check.py). Each online step
# costs one rescaling exp per pixel and input, 1 / BLOCK_C per logit; BLOCK_C = 8 took up to 254 registers.
LAUNCH_OPTIONS = dict(KERNEL_OPTIONS, maxnreg=128)


def pixel_grid(x: torch.Tensor) -> Tuple[int, int]:
    """(programs, tiles per image): every image of the (B, C, H, W) batch is cut into tiles of BLOCK_P pixels."""
    tiles = triton.cdiv(x.shape[2] * x.shape[3], BLOCK_P)
    return x.shape[0] * tiles, tiles


@triton.jit
def _pixel_tile(pid, tiles, pixels, BLOCK_P: tl.constexpr):
    """Program ``pid``'s image b and its BLOCK_P flat pixel indices p (both int64), and the mask p < H*W."""
    b = (pid // tiles).to(tl.int64)
    p = (pid % tiles).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    return b, p, p < pixels


@triton.jit
def spatial_offsets(p, width, stride_h, stride_w):
    """The int64 element offsets of the flat pixels p within one channel of one image."""
    return (p // width) * stride_h + (p % width) * stride_w


@triton.jit
def channel_chunk(c0, num_channels, BLOCK_C: tl.constexpr):
    """The int64 channel indices c0 .. c0 + BLOCK_C - 1 of one step of a channel loop, and the mask c < C."""
    channels = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
    return channels, channels < num_channels


@triton.jit
def load_logits(image_ptr, channels, channel_mask, stride_c, offsets, pixel_mask, scale):
    """``scale * x`` in float64 for a (BLOCK_C, BLOCK_P) chunk of one image's logits, read in their own dtype;
    -Inf at the channels past C (so that their exponentials are 0) and 0 at the pixels past H*W."""
    x = tl.load(image_ptr + channels[:, None] * stride_c + offsets[None, :],
                mask=channel_mask[:, None] & pixel_mask[None, :], other=0.0).to(tl.float64) * scale
    return tl.where(channel_mask[:, None], x, float("-inf"))


@triton.jit
def _online_step(running_max, running_sum, x):
    """One chunk of the online log-sum-exp: (new max, new sum of exp(x - new max), the factor
    exp(old max - new max) that rescales sums taken against the old max, and exp(x - new max))."""
    new_max = tl.maximum(running_max, tl.max(x, axis=0))
    rescale = tl.exp(running_max - new_max)
    weights = tl.exp(x - new_max[None, :])
    return new_max, running_sum * rescale + tl.sum(weights, axis=0), rescale, weights


@triton.jit
def _softmax_statistics(s_image, t_image, num_channels, s_stride_c, t_stride_c, s_offsets, t_offsets, pixel_mask,
                       scale, WITH_MEAN_DIFFERENCE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """One pass over the channels of a tile of student and teacher logits, each read once.

    Returns per pixel (float64, (BLOCK_P,)): the log-sum-exps ``lse_s`` and ``lse_t`` of ``scale * s`` and
    ``scale * t`` (so that ``softmax = exp(scale * x - lse)``), both NaN where any logit of the pixel is NaN
    or +-Inf, so that every result computed from them is NaN there (FORMULAS.md asks that non-finite input give
    NaN; a -Inf logit alone would give a finite softmax); and with ``WITH_MEAN_DIFFERENCE`` the mean of
    ``scale * (t - s)`` under ``softmax(scale * t)`` (rescaled along with the teacher's running sum), else 0.
    """
    max_s = tl.full([BLOCK_P], float("-inf"), tl.float64)
    max_t = tl.full([BLOCK_P], float("-inf"), tl.float64)
    sum_s = tl.zeros([BLOCK_P], tl.float64)
    sum_t = tl.zeros([BLOCK_P], tl.float64)
    weighted_difference = tl.zeros([BLOCK_P], tl.float64)
    for c0 in range(0, num_channels, BLOCK_C):
        channels, channel_mask = channel_chunk(c0, num_channels, BLOCK_C)
        xs = load_logits(s_image, channels, channel_mask, s_stride_c, s_offsets, pixel_mask, scale)
        xt = load_logits(t_image, channels, channel_mask, t_stride_c, t_offsets, pixel_mask, scale)
        # x - x is NaN for NaN and +-Inf, else 0 (the padding channels' -Inf is left out): added to both
        # running sums, it makes both log-sum-exps NaN at a pixel with a non-finite logit
        poison = tl.sum(tl.where(channel_mask[:, None], (xs - xs) + (xt - xt), 0.0), axis=0)
        max_s, sum_s, rescale_s, weights_s = _online_step(max_s, sum_s, xs)
        max_t, sum_t, rescale_t, weights_t = _online_step(max_t, sum_t, xt)
        sum_s += poison
        sum_t += poison
        if WITH_MEAN_DIFFERENCE:
            weighted_difference = weighted_difference * rescale_t + tl.sum(
                tl.where(channel_mask[:, None], weights_t * (xt - xs), 0.0), axis=0)
    mean_difference = weighted_difference / sum_t
    return max_s + tl.log(sum_s), max_t + tl.log(sum_t), mean_difference


@triton.jit
def softmax_tile(s_ptr, t_ptr, num_channels, width, pixels, tiles, s_stride_b, s_stride_c, s_stride_h, s_stride_w,
                 t_stride_b, t_stride_c, t_stride_h, t_stride_w, scale, WITH_MEAN_DIFFERENCE: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """What every per-pixel kernel starts with: this program's tile and the first pass over its channels.

    Returns ``(b, p, pixel_mask, s_image, s_offsets, t_image, t_offsets, lse_s, lse_t, mean_difference)``: the
    image and flat pixels of the tile (:func:`_pixel_tile`), the student's and teacher's image pointers and
    spatial offsets for :func:`load_logits`, and the statistics of :func:`_softmax_statistics`.
    """
    b, p, pixel_mask = _pixel_tile(tl.program_id(0), tiles, pixels, BLOCK_P)
    s_image, s_offsets = s_ptr + b * s_stride_b, spatial_offsets(p, width, s_stride_h, s_stride_w)
    t_image, t_offsets = t_ptr + b * t_stride_b, spatial_offsets(p, width, t_stride_h, t_stride_w)
    lse_s, lse_t, mean_difference = _softmax_statistics(
        s_image, t_image, num_channels, s_stride_c, t_stride_c, s_offsets, t_offsets, pixel_mask, scale,
        WITH_MEAN_DIFFERENCE, BLOCK_C, BLOCK_P)
    return b, p, pixel_mask, s_image, s_offsets, t_image, t_offsets, lse_s, lse_t, mean_difference


@triton.jit
def load_grad_terms(grad_ptr, b, p, width, pixel_mask, stride_b, stride_h, stride_w):
    """dL/dterms (float64) at the pixels p of image b, in any layout (autograd's is often a broadcast scalar)."""
    return tl.load(grad_ptr + b * stride_b + spatial_offsets(p, width, stride_h, stride_w), mask=pixel_mask,
                   other=0.0)


@triton.jit
def store_gradient(out_image, channels, channel_mask, stride_c, offsets, pixel_mask, grad_terms, value):
    """Writes ``grad_terms * value`` for a (BLOCK_C, BLOCK_P) chunk in the output's dtype, exactly 0 where
    ``grad_terms`` is 0 (uncounted pixels), whatever the logits there (``value`` may be NaN)."""
    gradient = tl.where((grad_terms == 0)[None, :], 0.0, grad_terms[None, :] * value)
    tl.store(out_image + channels[:, None] * stride_c + offsets[None, :], to_element_type(gradient, out_image),
             mask=channel_mask[:, None] & pixel_mask[None, :])
