"""The ``torch`` backend of the ``probability`` op, in float64."""

from __future__ import annotations

import torch

from fastkd.ops._common import COMPUTE_DTYPE, poison_non_finite_pixels


def probability_terms(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """``||softmax(l_s) - softmax(l_t)||_2^2`` per pixel, (B, H, W) float64, softmax over channels; NaN where a
    logit is not finite."""
    p_s = torch.softmax(s_logits.to(COMPUTE_DTYPE), dim=1)
    p_t = torch.softmax(t_logits.to(COMPUTE_DTYPE), dim=1)
    return poison_non_finite_pixels((p_s - p_t).square().sum(dim=1), s_logits, t_logits)
