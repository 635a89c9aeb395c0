"""Literal float64 definition of the 8-neighbour consistency loss (FORMULAS.md section 3): the map is
built from the eight shifted copies of the logits, exactly as written."""

from __future__ import annotations

import torch


def neighbour_map(logits: torch.Tensor, dilation: int = 1, border: str = "valid") -> torch.Tensor:
    """``c(x) = sum_{y in N8(x)} ||l(y) - l(x)||^2`` over the neighbours inside the image; "valid" keeps
    the pixels whose 8 neighbours all lie inside."""
    logits = logits.to(torch.float64)
    batch, _, height, width = logits.shape
    d = dilation
    c = torch.zeros(batch, height, width, dtype=torch.float64, device=logits.device)
    for dy in (-d, 0, d):
        for dx in (-d, 0, d):
            if (dy, dx) == (0, 0):
                continue
            # the pixels x whose neighbour x + (dy, dx) lies inside the image
            y0, y1 = max(0, -dy), height - max(0, dy)
            x0, x1 = max(0, -dx), width - max(0, dx)
            shifted = logits[:, :, y0 + dy:y1 + dy, x0 + dx:x1 + dx]
            c[:, y0:y1, x0:x1] += ((shifted - logits[:, :, y0:y1, x0:x1]) ** 2).sum(dim=1)
    if border == "valid":
        c = c[:, d:height - d, d:width - d]
    return c


def consistency_loss(s, t, border="valid", dilation=1, reduction="mean") -> torch.Tensor:
    difference = neighbour_map(s, dilation, border) - neighbour_map(t, dilation, border)
    total = (difference**2).sum()
    return total / difference.numel() if reduction == "mean" else total
