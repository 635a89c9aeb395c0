"""Literal float64 definitions of the per-pixel losses (FORMULAS.md sections 4 and 5)."""

from __future__ import annotations

import torch


def _reduce(per_pixel: torch.Tensor, mask, reduction: str) -> torch.Tensor:
    counted = torch.ones_like(per_pixel, dtype=torch.bool) if mask is None else mask
    total = per_pixel[counted].sum()
    if reduction == "sum":
        return total
    return total / counted.sum() if counted.any() else total * 0


def probability_loss(s_logits, t_logits, mask=None, reduction="mean") -> torch.Tensor:
    p_s = torch.softmax(s_logits.to(torch.float64), dim=1)
    p_t = torch.softmax(t_logits.to(torch.float64), dim=1)
    return _reduce(((p_s - p_t) ** 2).sum(dim=1), mask, reduction)


def pixelwise_kd_loss(s_logits, t_logits, mask=None, temperature=1.0, reduction="mean") -> torch.Tensor:
    q_s = torch.softmax(s_logits.to(torch.float64) / temperature, dim=1)
    q_t = torch.softmax(t_logits.to(torch.float64) / temperature, dim=1)
    kl = (q_t * (torch.log(q_t) - torch.log(q_s))).sum(dim=1)
    return _reduce(kl, mask, reduction) * temperature**2
