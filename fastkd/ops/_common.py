"""Pieces the losses share (a leaf: torch only): the compute dtype, empty inputs, non-finite results."""

from __future__ import annotations

from typing import Callable

import torch

# The torch backend evaluates every loss in float64. Near convergence the student and teacher terms agree
# to ~1e-3 and the loss is their small difference: float32 intermediates (even a float32 pooled node or
# channel difference) carry ~1e-7 relative errors that become ~1e-4 relative errors of that difference.
COMPUTE_DTYPE = torch.float64


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Losses are returned in the promoted dtype of their inputs but at least float32: a half-precision
    loss keeps only 3 significant digits and a summed one overflows float16 (65504) on ordinary maps.
    Gradients come back in each input's own dtype."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def mean_or_zero(x: torch.Tensor) -> torch.Tensor:
    """The mean of all elements, 0 (not NaN) when there are none, e.g. for an empty batch."""
    return x.sum() / max(x.numel(), 1)


def empty_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """The loss over no terms (B = 0 or an empty map): 0, still connected to the inputs for backward."""
    return sum(tensor.sum() for tensor in tensors).to(result_dtype(*tensors)) * 0


def finish(loss: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """Casts a float64 loss to the result dtype; an infinite loss (only Inf inputs make one in float64)
    becomes NaN, so that NaN or Inf in the input always gives NaN."""
    loss = torch.where(torch.isinf(loss), torch.full_like(loss, float("nan")), loss)
    return loss.to(result_dtype(*tensors))


def evaluate(s: torch.Tensor, t: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``, the float64 loss of validated inputs, cast to the inputs' promoted dtype.

    Inputs with no terms (B = 0 or an empty map) give 0 without running a kernel.
    """
    if s.numel() == 0 or t.numel() == 0:
        return empty_loss(s, t)
    return finish(compute(), s, t)


def poison_non_finite_pixels(per_pixel: torch.Tensor, *logits: torch.Tensor) -> torch.Tensor:
    """NaN at the pixels where any logit is NaN or +-Inf. Softmax alone turns a -Inf logit into a finite 0
    probability, but FORMULAS.md asks that non-finite input give NaN."""
    finite = torch.isfinite(logits[0]).all(dim=1)
    for x in logits[1:]:
        finite &= torch.isfinite(x).all(dim=1)
    return torch.where(finite, per_pixel, torch.full_like(per_pixel, float("nan")))


def reduce_pixels(per_pixel: torch.Tensor, mask, reduction: str) -> torch.Tensor:
    """Sum or mean of a (B, H, W) per-pixel loss over the counted pixels (``mask`` True, or all).

    Uncounted pixels are excluded with ``where``, so NaN there does not reach the loss; no counted pixel
    gives 0.
    """
    if mask is not None:
        per_pixel = torch.where(mask, per_pixel, torch.zeros_like(per_pixel))
        count = mask.sum().clamp_min(1)
    else:
        count = per_pixel.numel()
    total = per_pixel.sum()
    return total if reduction == "sum" else total / count
