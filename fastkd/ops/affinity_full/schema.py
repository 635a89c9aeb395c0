"""The schema every kernel backend of the ``affinity_full`` op implements, with its fake implementations (for
``torch.compile``) and autograd, registered once per namespace (``fastkd_triton``, ``fastkd``,
``fastkd_emulated``):

    affinity_full_forward(Tensor s, Tensor t, int kernel_h, int kernel_w, int grid_h, int grid_w, bool max_pool,
                          float eps, bool use_gram, bool per_row, bool detach_norm)
        -> (Tensor terms, Tensor s_norm, Tensor t_norm, Tensor gram_ss, Tensor gram_st, Tensor gram_tt)
    affinity_full_backward(Tensor grad_terms, Tensor s, Tensor t, Tensor s_norm, Tensor t_norm, Tensor gram_ss,
                           Tensor gram_st, Tensor gram_tt, int kernel_h, int kernel_w, int grid_h, int grid_w,
                           bool max_pool, float eps, bool use_gram, bool detach_norm, bool need_s, bool need_t)
        -> (Tensor grad_s, Tensor grad_t)

``terms``: ``r_i = sum_j D_ij^2`` per row (B, m) with ``per_row``, else per image (B,), D = S'S - T'T of the
pooled, normalised nodes; the norms ``||f_i||`` (B, m); the Gram matrices SS', ST', TT' (empty on the direct
path). The backward op gives (dL/ds, dL/dt), an empty tensor standing for a gradient not needed. Only
``terms`` is differentiable: the norms and Gram matrices are saved intermediates.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastkd.ops._custom_ops import op_pair
from fastkd.ops._graph import NodeGrid

_NO_TENSOR = (0,)  # shape of the placeholders the Gram-only outputs have on the direct path


def _fake_forward(s, t, kernel_h, kernel_w, grid_h, grid_w, max_pool, eps, use_gram, per_row, detach_norm):
    batch, nodes = s.shape[0], grid_h * grid_w
    f64 = dict(dtype=torch.float64)
    terms = s.new_empty((batch, nodes) if per_row else (batch,), **f64)
    if not use_gram:
        grams = [s.new_empty(_NO_TENSOR, **f64) for _ in range(3)]
    else:
        grams = [s.new_empty(batch, a.shape[1], b.shape[1], **f64) for a, b in ((s, s), (s, t), (t, t))]
    return (terms, s.new_empty(batch, nodes, **f64), s.new_empty(batch, nodes, **f64), *grams)


def _fake_backward(grad_terms, s, t, s_norm, t_norm, gram_ss, gram_st, gram_tt, kernel_h, kernel_w, grid_h, grid_w,
                   max_pool, eps, use_gram, detach_norm, need_s, need_t):
    return (torch.empty_like(s) if need_s else s.new_empty(_NO_TENSOR),
            torch.empty_like(t) if need_t else t.new_empty(_NO_TENSOR))


def register(namespace: str) -> Callable:
    """Registers the fake implementations and autograd of ``<namespace>::affinity_full_forward`` and
    ``_backward`` and returns ``full_graph_terms(s, t, grid, eps, detach_norm, use_gram, per_row)``: the
    differentiable terms."""
    forward, backward = op_pair(namespace, "affinity_full", _fake_forward, _fake_backward)

    def setup_context(ctx, inputs, output):
        s, t, kernel_h, kernel_w, grid_h, grid_w, max_pool, eps, use_gram, _, detach_norm = inputs
        _, s_norm, t_norm, gram_ss, gram_st, gram_tt = output
        ctx.mark_non_differentiable(s_norm, t_norm, gram_ss, gram_st, gram_tt)
        ctx.save_for_backward(s, t, s_norm, t_norm, gram_ss, gram_st, gram_tt)
        ctx.arguments = (kernel_h, kernel_w, grid_h, grid_w, max_pool, eps, use_gram, detach_norm)

    def backward_fn(ctx, grad_terms, *_saved_intermediates):
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_s, grad_t = backward(grad_terms, *ctx.saved_tensors, *ctx.arguments, need_s, need_t)
        return (grad_s if need_s else None, grad_t if need_t else None) + (None,) * 9

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)

    def full_graph_terms(s: torch.Tensor, t: torch.Tensor, grid: NodeGrid, eps: float, detach_norm: bool,
                         use_gram: bool, per_row: bool) -> torch.Tensor:
        return forward(s, t, *grid, eps, use_gram, per_row, detach_norm)[0]

    return full_graph_terms
