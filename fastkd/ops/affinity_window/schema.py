"""The schema every kernel backend of the ``affinity_window`` op implements, with its fake implementations
(for ``torch.compile``) and autograd, registered once per namespace (``fastkd_triton``, ``fastkd``,
``fastkd_emulated``):

    affinity_window_forward(Tensor s, Tensor t, int kernel_h, int kernel_w, bool max_pool, int window,
                            float eps, bool detach_norm) -> (Tensor total, Tensor difference,
                                                             Tensor teacher_affinity, Tensor s_norms,
                                                             Tensor t_norms)
    affinity_window_backward(Tensor grad_total, Tensor x, Tensor norms, Tensor difference,
                             Tensor teacher_affinity, int kernel_h, int kernel_w, bool max_pool, int window,
                             float eps, bool detach_norm, float sign) -> Tensor

``difference`` is ``D = a_s - a_t`` and ``teacher_affinity`` is ``a_t`` of every node and every offset of the
stored half of the window (the diagonal and one offset of each mirrored pair,
:func:`fastkd.ops._graph.stored_half_window`), (B, half, m) float64 each, 0 where the partner is missing; the
norms are ``||f_i||``, (B, m) float64. The backward op gives dL/dx for the student (sign +1) or the teacher
(sign -1) in x's dtype and layout. From x's affinities (``a_t``, or ``D + a_t`` for the student) a kernel that
splits the channels finds the norm's share of the gradient, ``k^2 (f_i . g_i) / ||f_i||`` with
``f_i . g_i = 4 sign grad sum_j D_ij a_ij (||f_i|| + eps)``, without a pass over the channels (the CUDA tiles);
kernels that hold g of all channels need not read them. Only the inputs, the norms, D and a_t are saved for
backward; ``detach_norm`` is read by the backward only.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastkd.ops._custom_ops import op_pair
from fastkd.ops._graph import NodeGrid, stored_half_window


def _fake_forward(s, t, kernel_h, kernel_w, max_pool, window, eps, detach_norm):
    rows, cols = -(-s.shape[2] // kernel_h), -(-s.shape[3] // kernel_w)  # ceil mode: partial last patches
    batch, nodes = s.shape[0], rows * cols
    f64 = dict(dtype=torch.float64)
    half = stored_half_window(window, rows, cols)
    return (s.new_empty((), **f64), s.new_empty((batch, half, nodes), **f64), s.new_empty((batch, half, nodes), **f64),
            s.new_empty((batch, nodes), **f64), s.new_empty((batch, nodes), **f64))


def _fake_backward(grad_total, x, norms, difference, teacher_affinity, kernel_h, kernel_w, max_pool, window, eps,
                   detach_norm, sign):
    return torch.empty_like(x)


def register(namespace: str) -> Callable:
    """Registers the fake implementations and autograd of ``<namespace>::affinity_window_forward`` and
    ``_backward`` and returns ``window_graph_sum(s, t, grid, window, eps, detach_norm)``, the differentiable
    float64 total."""
    forward, backward = op_pair(namespace, "affinity_window", _fake_forward, _fake_backward)

    def setup_context(ctx, inputs, output):
        s, t, *settings = inputs
        _, difference, teacher_affinity, s_norms, t_norms = output
        ctx.mark_non_differentiable(difference, teacher_affinity, s_norms, t_norms)
        ctx.save_for_backward(s, t, s_norms, t_norms, difference, teacher_affinity)
        ctx.settings = settings  # kernel_h, kernel_w, max_pool, window, eps, detach_norm

    def backward_fn(ctx, grad_total, _grad_difference, _grad_teacher_affinity, _grad_s_norms, _grad_t_norms):
        s, t, s_norms, t_norms, difference, teacher_affinity = ctx.saved_tensors
        grad_s = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_s = backward(grad_total, s, s_norms, difference, teacher_affinity, *ctx.settings, 1.0)
        if ctx.needs_input_grad[1]:
            grad_t = backward(grad_total, t, t_norms, difference, teacher_affinity, *ctx.settings, -1.0)
        return (grad_s, grad_t) + (None,) * len(ctx.settings)

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)

    def window_graph_sum(s: torch.Tensor, t: torch.Tensor, grid: NodeGrid, window: int, eps: float,
                         detach_norm: bool) -> torch.Tensor:
        return forward(s, t, grid.kernel_h, grid.kernel_w, grid.max_pool, window, eps, detach_norm)[0]

    return window_graph_sum
