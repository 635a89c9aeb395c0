"""The schema every kernel backend of the ``consistency`` op implements, with its fake implementations (for
``torch.compile``) and autograd, registered once per namespace (``fastkd_triton``, ``fastkd``,
``fastkd_emulated``):

    consistency_forward(Tensor s, Tensor t, bool valid, int dilation) -> (Tensor loss_sum, Tensor difference)
    consistency_backward(Tensor grad_loss, Tensor x, Tensor difference, int dilation, float sign) -> Tensor

``difference`` is ``c_s - c_t``, (B, H, W) float64, 0 where c is undefined; the backward op gives dL/dx for
the student (sign +1) or the teacher (sign -1), in x's dtype and layout. Only the inputs and the difference
map are saved for backward.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastkd.ops._custom_ops import op_pair

def _fake_forward(s, t, valid, dilation):
    return s.new_empty((), dtype=torch.float64), s.new_empty((s.shape[0], s.shape[2], s.shape[3]), dtype=torch.float64)


def _fake_backward(grad_loss, x, difference, dilation, sign):
    return torch.empty_like(x)


def register(namespace: str) -> Callable:
    """Registers the fake implementations and autograd of ``<namespace>::consistency_forward`` and
    ``_backward`` and returns ``consistency_sum(s, t, valid, dilation)``, the differentiable float64 sum."""
    forward, backward = op_pair(namespace, "consistency", _fake_forward, _fake_backward)

    def setup_context(ctx, inputs, output):
        s, t, _, dilation = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(s, t, output[1])
        ctx.dilation = dilation

    def backward_fn(ctx, grad_loss, _grad_difference):
        s, t, difference = ctx.saved_tensors
        grad_s = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_s = backward(grad_loss, s, difference, ctx.dilation, 1.0)
        if ctx.needs_input_grad[1]:
            grad_t = backward(grad_loss, t, difference, ctx.dilation, -1.0)
        return grad_s, grad_t, None, None

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)

    def consistency_sum(s: torch.Tensor, t: torch.Tensor, valid: bool, dilation: int) -> torch.Tensor:
        return forward(s, t, valid, dilation)[0]

    return consistency_sum
