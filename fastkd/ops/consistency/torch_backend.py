"""The ``torch`` backend of the ``consistency`` op (Xie et al. 2018, sec. 3.1; FORMULAS.md section 3).

It never builds the 8 shifted copies of the logits. Each unordered neighbour pair (x, x + o) is an edge
whose weight ``e = ||l(x + o) - l(x)||^2`` enters both ``c(x)`` and ``c(x + o)``, so one pass over the 4
offsets of a half-neighbourhood builds the map from two strided views per offset. Backward recomputes the
edges instead of saving them: with ``g = dL/dc``, an edge adds ``2 (g(x) + g(x + o)) (l(x + o) - l(x))`` to
the gradient at x + o and subtracts it at x. Differences are taken directly in float64 (the expansion
``||l_y||^2 + ||l_x||^2 - 2 l_y.l_x`` cancels).
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch
from torch.autograd.function import once_differentiable

from fastkd.ops._common import COMPUTE_DTYPE

Region = Tuple[slice, slice]


def edges(height: int, width: int, d: int) -> Iterator[Tuple[Region, Region]]:
    """For each offset o of a half-neighbourhood: the pixels x that have a partner x + o in the image,
    and those partners, as (rows, columns) slices of the H x W grid."""
    for dy, dx in ((0, d), (d, -d), (d, 0), (d, d)):
        x0, x1 = max(0, -dx), width - max(0, dx)
        if height - dy > 0 and x1 - x0 > 0:
            yield (slice(0, height - dy), slice(x0, x1)), (slice(dy, height), slice(x0 + dx, x1 + dx))


def neighbour_map(logits: torch.Tensor, d: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W): ``c(x)`` summed over the neighbours inside the image (border="same")."""
    height, width = logits.shape[2], logits.shape[3]
    c = logits.new_zeros(logits.shape[0], height, width)
    for (rows, cols), (rows_o, cols_o) in edges(height, width, d):
        edge = (logits[:, :, rows_o, cols_o] - logits[:, :, rows, cols]).square().sum(dim=1)
        c[:, rows, cols] += edge
        c[:, rows_o, cols_o] += edge
    return c


def neighbour_map_backward(logits: torch.Tensor, grad_map: torch.Tensor, d: int) -> torch.Tensor:
    """The gradient of ``sum_x grad_map(x) c(x)`` with respect to the (B, C, H, W) logits."""
    height, width = logits.shape[2], logits.shape[3]
    grad = torch.zeros_like(logits)
    for (rows, cols), (rows_o, cols_o) in edges(height, width, d):
        weight = (grad_map[:, rows, cols] + grad_map[:, rows_o, cols_o]).unsqueeze(1)
        contribution = 2 * weight * (logits[:, :, rows_o, cols_o] - logits[:, :, rows, cols])
        grad[:, :, rows_o, cols_o] += contribution
        grad[:, :, rows, cols] -= contribution
    return grad


def defined_region(height: int, width: int, valid: bool, d: int) -> Region:
    """Where ``c`` is defined: the pixels with all 8 neighbours inside (``valid``), or every pixel."""
    if not valid:
        return slice(0, height), slice(0, width)
    return slice(d, height - d), slice(d, width - d)


class ConsistencySum(torch.autograd.Function):
    """The torch backend's sum: saves the inputs and the (B, H', W') map difference, nothing per edge."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, valid: bool, dilation: int) -> torch.Tensor:
        rows, cols = defined_region(s.shape[2], s.shape[3], valid, dilation)
        c_s = neighbour_map(s.to(COMPUTE_DTYPE), dilation)[:, rows, cols]
        c_t = neighbour_map(t.to(COMPUTE_DTYPE), dilation)[:, rows, cols]
        difference = c_s - c_t
        ctx.save_for_backward(s, t, difference)
        ctx.valid, ctx.dilation = valid, dilation
        return difference.square().sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        s, t, difference = ctx.saved_tensors
        rows, cols = defined_region(s.shape[2], s.shape[3], ctx.valid, ctx.dilation)
        grad_map = difference.new_zeros(s.shape[0], s.shape[2], s.shape[3])  # dL/dc_s, 0 where c is undefined
        grad_map[:, rows, cols] = 2 * grad_loss * difference
        grad_s = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_s = neighbour_map_backward(s.to(COMPUTE_DTYPE), grad_map, ctx.dilation).to(s.dtype)
        if ctx.needs_input_grad[1]:
            grad_t = neighbour_map_backward(t.to(COMPUTE_DTYPE), -grad_map, ctx.dilation).to(t.dtype)
        return grad_s, grad_t, None, None


def consistency_sum(s: torch.Tensor, t: torch.Tensor, valid: bool, dilation: int) -> torch.Tensor:
    """``sum_{b, x defined} (c_s(x) - c_t(x))^2`` in float64, differentiable with respect to s and t."""
    return ConsistencySum.apply(s, t, valid, dilation)
