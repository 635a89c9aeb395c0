"""The ``torch`` backend of the ``pixelwise_kd`` op, in float64."""

from __future__ import annotations

import torch

from fastkd.ops._common import COMPUTE_DTYPE, poison_non_finite_pixels


def pixelwise_kd_terms(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(q_t || q_s)`` per pixel, (B, H, W) float64, with ``q = softmax(l / T)`` over channels; NaN where a
    logit is not finite."""
    log_q_s = torch.log_softmax(s_logits.to(COMPUTE_DTYPE) / temperature, dim=1)
    log_q_t = torch.log_softmax(t_logits.to(COMPUTE_DTYPE) / temperature, dim=1)
    kl = (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=1)
    return poison_non_finite_pixels(kl, s_logits, t_logits)
