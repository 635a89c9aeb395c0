"""Consistency loss on the 8-neighbour map (Xie et al. 2018, sec. 3.1; FORMULAS.md section 3).

``c(x) = sum_{y in N8(x)} ||l(y) - l(x)||_2^2`` with neighbours at offsets ``{-d, 0, d}^2 \\ {(0, 0)}``, and
``loss = sum_x (c_s(x) - c_t(x))^2``.

The torch backend never builds the 8 shifted copies of the logits. Each unordered neighbour pair
(x, x + o) is an edge whose weight ``e = ||l(x + o) - l(x)||^2`` enters both ``c(x)`` and ``c(x + o)``, so
one pass over the 4 offsets of a half-neighbourhood builds the map from two strided views per offset.
Backward recomputes the edges instead of saving them: with ``g = dL/dc``, an edge adds
``2 (g(x) + g(x + o)) (l(x + o) - l(x))`` to the gradient at x + o and subtracts it at x. Differences
are taken directly in float64 (the expansion ``||l_y||^2 + ||l_x||^2 - 2 l_y.l_x`` cancels).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Tuple

import torch
from torch.autograd.function import once_differentiable

from fastkd import _validation as v
from fastkd.ops._common import COMPUTE_DTYPE, dispatch

OP = "ConsistencyLoss"
BORDERS = ("valid", "same")


@dataclass(frozen=True)
class ConsistencyConfig:
    border: str
    dilation: int
    reduction: str

    @classmethod
    def make(cls, border="valid", dilation=1, reduction="mean") -> "ConsistencyConfig":
        return cls(
            border=v.check_choice(border, "border", OP, BORDERS),
            dilation=v.check_int(dilation, "dilation", OP, 1),
            reduction=v.check_reduction(reduction, OP),
        )


def check_map_size(s: torch.Tensor, config: ConsistencyConfig) -> None:
    """``border="valid"`` needs all 8 neighbours of at least one pixel: 2d+1 rows and columns."""
    needed = 2 * config.dilation + 1
    height, width = s.shape[2], s.shape[3]
    if config.border == "valid" and (height < needed or width < needed):
        raise ValueError(
            f"{OP}: the map is {height}x{width}, too small for border='valid' with dilation="
            f"{config.dilation}: it needs at least {needed} rows and {needed} columns (or use border='same')"
        )


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


def defined_region(height: int, width: int, config: ConsistencyConfig) -> Region:
    """Where ``c`` is defined: every pixel ("same") or the pixels with all 8 neighbours inside ("valid")."""
    if config.border == "same":
        return slice(0, height), slice(0, width)
    d = config.dilation
    return slice(d, height - d), slice(d, width - d)


class ConsistencyLossFunction(torch.autograd.Function):
    """The torch backend's loss: saves the inputs and the (B, H', W') map difference, nothing per edge."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, config: ConsistencyConfig) -> torch.Tensor:
        rows, cols = defined_region(s.shape[2], s.shape[3], config)
        c_s = neighbour_map(s.to(COMPUTE_DTYPE), config.dilation)[:, rows, cols]
        c_t = neighbour_map(t.to(COMPUTE_DTYPE), config.dilation)[:, rows, cols]
        difference = c_s - c_t
        scale = 1.0 / difference.numel() if config.reduction == "mean" else 1.0
        ctx.save_for_backward(s, t, difference)
        ctx.config, ctx.scale = config, scale
        return difference.square().sum() * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        s, t, difference = ctx.saved_tensors
        config = ctx.config
        rows, cols = defined_region(s.shape[2], s.shape[3], config)
        grad_map = difference.new_zeros(s.shape[0], s.shape[2], s.shape[3])  # dL/dc_s, 0 where c is undefined
        grad_map[:, rows, cols] = 2 * ctx.scale * grad_loss * difference
        grad_s = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_s = neighbour_map_backward(s.to(COMPUTE_DTYPE), grad_map, config.dilation).to(s.dtype)
        if ctx.needs_input_grad[1]:
            grad_t = neighbour_map_backward(t.to(COMPUTE_DTYPE), -grad_map, config.dilation).to(t.dtype)
        return grad_s, grad_t, None


def _fake_forward(s, t, valid, dilation):
    return s.new_empty((), dtype=torch.float64), s.new_empty((s.shape[0], s.shape[2], s.shape[3]), dtype=torch.float64)


def _fake_backward(grad_sum, x, difference, dilation, sign):
    return torch.empty_like(x)


def add_kernel_backend(name: str, forward_op: str, backward_op: str) -> None:
    """Registers a kernel backend's ops ``forward_op(s, t, valid, dilation) -> (loss_sum, difference)``, with
    difference = c_s - c_t (B, H, W) float64, and ``backward_op(grad_sum, x, difference, dilation, sign) ->
    dL/dx`` (sign +1 for the student, -1 for the teacher), given by their qualified names: their fake
    implementations and autograd; and adds the backend to ``IMPLEMENTATIONS``. Only the inputs and the map
    difference are saved for backward."""
    torch.library.register_fake(forward_op, _fake_forward)
    torch.library.register_fake(backward_op, _fake_backward)
    namespace, forward_name = forward_op.split("::")
    forward = getattr(getattr(torch.ops, namespace), forward_name).default
    backward = getattr(getattr(torch.ops, namespace), backward_op.split("::")[1]).default
    _register_kernel_autograd(forward_op, backward)
    IMPLEMENTATIONS[name] = functools.partial(kernel_loss, forward)


def _register_kernel_autograd(forward_op, backward_op) -> None:

    def setup_context(ctx, inputs, output):
        s, t, _, dilation = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(s, t, output[1])
        ctx.dilation = dilation

    def backward(ctx, grad_sum, _grad_difference):
        s, t, difference = ctx.saved_tensors
        grad_s = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_s = backward_op(grad_sum, s, difference, ctx.dilation, 1.0)
        if ctx.needs_input_grad[1]:
            grad_t = backward_op(grad_sum, t, difference, ctx.dilation, -1.0)
        return grad_s, grad_t, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def kernel_loss(forward_op, s: torch.Tensor, t: torch.Tensor, config: ConsistencyConfig) -> torch.Tensor:
    """The float64 loss from a kernel backend's forward op: the sum, or the mean over the (b, x) terms."""
    valid = config.border == "valid"
    loss_sum, _ = forward_op(s, t, valid, config.dilation)
    if config.reduction == "sum":
        return loss_sum
    margin = 2 * config.dilation if valid else 0  # "valid" defines c on an (H - 2d) x (W - 2d) map
    return loss_sum / (s.shape[0] * (s.shape[2] - margin) * (s.shape[3] - margin))


def _torch_implementation(s: torch.Tensor, t: torch.Tensor, config: ConsistencyConfig) -> torch.Tensor:
    return ConsistencyLossFunction.apply(s, t, config)


IMPLEMENTATIONS = {"torch": _torch_implementation}


def consistency_loss(s: torch.Tensor, t: torch.Tensor, border="valid", dilation=1, reduction="mean",
                     backend="auto") -> torch.Tensor:
    """Consistency loss between the 8-neighbour maps of student and teacher logits (Xie et al. 2018, 3.1).

    Args:
        s: student logits (B, Cs, H, W). t: teacher logits (B, Ct, H, W); Cs and Ct may differ (only the
            scalar maps are compared).
        border: "valid" defines c where all 8 neighbours lie inside the image, an (H-2d) x (W-2d) map (the
            authors' code); "same" defines c everywhere, summing over the neighbours inside the image.
        dilation: d, the neighbour offsets are ``{-d, 0, d}^2 \\ {(0, 0)}``.
        reduction: "sum" of ``(c_s(x) - c_t(x))^2`` over (b, x), or "mean" over those terms.
        backend: "auto", "torch", "triton", "cuda" or "cpp" (see README, Backends).

    Returns a 0-dim tensor, float64 for float64 inputs and float32 otherwise; gradients come back in the
    inputs' dtypes.
    """
    config = ConsistencyConfig.make(border, dilation, reduction)
    v.check_student_teacher(s, t, OP)
    check_map_size(s, config)
    return dispatch(OP, IMPLEMENTATIONS, backend, s, t, config)
