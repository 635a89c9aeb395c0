"""Literal float64 definition of pseudo-labelling (FORMULAS.md section 8; Xie et al., sec. 3.2): a loop over
pixels in plain Python floats."""

from __future__ import annotations

import math

import torch


def pseudo_labels(t_logits, threshold=0.7, ignore_index=255) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W) long: per pixel the first class with the largest logit if its softmax
    probability ``1 / sum_c exp(l_c - l_max)`` is >= threshold, else ignore_index (also for NaN logits)."""
    batch, classes, height, width = t_logits.shape
    logits = t_logits.to(torch.float64).tolist()
    labels = torch.empty(batch, height, width, dtype=torch.long)
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                pixel = [logits[b][c][y][x] for c in range(classes)]
                best = max(range(classes), key=lambda c: (pixel[c], -c))
                confidence = 1.0 / sum(math.exp(value - pixel[best]) for value in pixel)
                labels[b, y, x] = best if confidence >= threshold else ignore_index
    return labels
