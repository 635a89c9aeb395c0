"""The schema shape the per-pixel ops (``pixelwise_kd``, ``probability``) share, with its fake implementations
(for ``torch.compile``) and autograd, registered once per namespace (``fastkd_triton``, ``fastkd``,
``fastkd_emulated``) by each op's ``schema`` module (a leaf: torch only):

    <op>_forward(Tensor s, Tensor t, <params>) -> Tensor terms
    <op>_backward(Tensor grad_terms, Tensor s, Tensor t, <params>, int wrt) -> Tensor

``terms`` is the (B, H, W) float64 loss per pixel, NaN where a logit of the pixel is not finite. The backward
op gives dL/ds (``wrt`` 0) or dL/dt (``wrt`` 1) in that input's dtype and layout from ``grad_terms``,
recomputing the softmaxes from the inputs (only the inputs are saved), and exactly 0 at pixels whose
``grad_terms`` is 0 (uncounted pixels), whatever their logits.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastkd.ops._custom_ops import op_pair

STUDENT, TEACHER = 0, 1  # the backward op's ``wrt``


def _fake_forward(s, t, *params):
    return s.new_empty((s.shape[0], s.shape[2], s.shape[3]), dtype=torch.float64)


def _fake_backward(grad_terms, s, t, *params_and_wrt):
    return torch.empty_like(t if params_and_wrt[-1] == TEACHER else s)


def register(namespace: str, op: str) -> Callable:
    """Registers the fake implementations and autograd of ``<namespace>::<op>_forward`` and ``_backward`` and
    returns ``terms(s, t, *params)``, the differentiable (B, H, W) float64 per-pixel loss."""
    forward, backward = op_pair(namespace, op, _fake_forward, _fake_backward)

    def setup_context(ctx, inputs, output):
        s, t, *params = inputs
        ctx.save_for_backward(s, t)
        ctx.params = params

    def backward_fn(ctx, grad_terms):
        s, t = ctx.saved_tensors
        grads = [backward(grad_terms, s, t, *ctx.params, wrt) if ctx.needs_input_grad[wrt] else None
                 for wrt in (STUDENT, TEACHER)]
        return (*grads, *(None for _ in ctx.params))

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)

    def terms(s: torch.Tensor, t: torch.Tensor, *params) -> torch.Tensor:
        return forward(s, t, *params)

    return terms
