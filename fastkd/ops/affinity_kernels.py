"""What the kernel backends (``triton``, ``cuda``) of the two full-graph affinity losses share.

Each backend provides a forward op ``(s, t, kernel_h, kernel_w, grid_h, grid_w, max_pool, eps, use_gram,
per_row, detach_norm) -> (terms, ||s_i||, ||t_i||, SS', ST', TT')`` (terms: ``r_i = sum_j D_ij^2`` per row
(B, m) with ``per_row``, else per image (B,); the Gram matrices are empty on the direct path) and a backward
op ``(grad_terms, s, t, norms and Grams, kernel_h, ..., use_gram, detach_norm, need_s, need_t) -> (dL/ds,
dL/dt)``, an empty tensor standing for a gradient not needed. Their fake implementations, autograd and the
losses built on them are defined here once; the window routing and the means are those of the torch backend.
"""

from __future__ import annotations

import functools

import torch

from fastkd.ops import affinity_distillation as distillation_op
from fastkd.ops import pairwise_affinity as pairwise_op
from fastkd.ops.nodes import NodeGrid, node_grid, pool_kernel

_NO_TENSOR = (0,)  # shape of the placeholders the Gram-only outputs have on the direct path


def fake_forward(s, t, kernel_h, kernel_w, grid_h, grid_w, max_pool, eps, use_gram, per_row, detach_norm):
    batch, nodes = s.shape[0], grid_h * grid_w
    f64 = dict(dtype=torch.float64)
    terms = s.new_empty((batch, nodes) if per_row else (batch,), **f64)
    if not use_gram:
        grams = [s.new_empty(_NO_TENSOR, **f64) for _ in range(3)]
    else:
        grams = [s.new_empty(batch, a.shape[1], b.shape[1], **f64) for a, b in ((s, s), (s, t), (t, t))]
    return (terms, s.new_empty(batch, nodes, **f64), s.new_empty(batch, nodes, **f64), *grams)


def fake_backward(grad_terms, s, t, s_norm, t_norm, gram_ss, gram_st, gram_tt, kernel_h, kernel_w, grid_h, grid_w,
                  max_pool, eps, use_gram, detach_norm, need_s, need_t):
    return (torch.empty_like(s) if need_s else s.new_empty(_NO_TENSOR),
            torch.empty_like(t) if need_t else t.new_empty(_NO_TENSOR))


def register(forward_op, backward_op) -> None:
    """Fake implementations and autograd for a backend's forward and backward ops. Only ``terms`` is
    differentiable: the norms and Gram matrices are saved intermediates."""
    torch.library.register_fake(forward_op, fake_forward)
    torch.library.register_fake(backward_op, fake_backward)

    def setup_context(ctx, inputs, output):
        s, t, kernel_h, kernel_w, grid_h, grid_w, max_pool, eps, use_gram, _, detach_norm = inputs
        _, s_norm, t_norm, gram_ss, gram_st, gram_tt = output
        ctx.mark_non_differentiable(s_norm, t_norm, gram_ss, gram_st, gram_tt)
        ctx.save_for_backward(s, t, s_norm, t_norm, gram_ss, gram_st, gram_tt)
        ctx.arguments = (kernel_h, kernel_w, grid_h, grid_w, max_pool, eps, use_gram, detach_norm)

    def backward(ctx, grad_terms, *_saved_intermediates):
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_s, grad_t = backward_op(grad_terms, *ctx.saved_tensors, *ctx.arguments, need_s, need_t)
        return (grad_s if need_s else None, grad_t if need_t else None) + (None,) * 9

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def full_graph_terms(forward_op, s: torch.Tensor, t: torch.Tensor, grid: NodeGrid, eps: float, detach_norm: bool,
                     use_gram: bool, per_row: bool) -> torch.Tensor:
    """r (B, m) with ``per_row``, else ``sum_i r_i`` (B,), differentiable with respect to s and t."""
    return forward_op(s, t, *grid, eps, use_gram, per_row, detach_norm)[0]


def pairwise_loss(forward_op, window_graph_sum, s: torch.Tensor, t: torch.Tensor, config) -> torch.Tensor:
    """``PairwiseAffinityLoss`` from a backend's full-graph op and its ``window_graph_sum(s, t, config)``."""
    grid = node_grid(s.shape[2], s.shape[3], config.patch, config.pool, config.pool_scale)
    if pairwise_op.covers_full_graph(config.window, grid.grid_h, grid.grid_w):
        use_gram = pairwise_op.choose_gram(config.algorithm, grid.nodes, s.shape[1], t.shape[1])
        total = full_graph_terms(forward_op, s, t, grid, config.eps, config.detach_norm, use_gram, False).sum()
    else:
        total = window_graph_sum(s, t, config)
    return pairwise_op.reduce_total(total, config, s.shape[0], grid.grid_h, grid.grid_w)


def distillation_loss(forward_op, s: torch.Tensor, t: torch.Tensor, config) -> torch.Tensor:
    """``AffinityDistillationLoss`` from a backend's full-graph op (every pixel a node)."""
    grid = NodeGrid(1, 1, s.shape[2], s.shape[3], False)
    use_gram = pairwise_op.choose_gram(config.algorithm, grid.nodes, s.shape[1], t.shape[1])
    rows = full_graph_terms(forward_op, s, t, grid, config.eps, False, use_gram, True)
    return distillation_op.loss_from_rows(rows, config)


def add_backend(name: str, forward_op, backward_op, window_graph_sum) -> None:
    """Registers a backend's ops and adds it to both losses' ``IMPLEMENTATIONS``."""
    register(forward_op, backward_op)
    pairwise_op.IMPLEMENTATIONS[name] = functools.partial(pairwise_loss, forward_op, window_graph_sum)
    distillation_op.IMPLEMENTATIONS[name] = functools.partial(distillation_loss, forward_op)


# ------------------------------------------------------------------------------------- the windowed graph
# The C++ backends (cuda, cpp) share one pair of schemas: ``forward(s, t, kernel_h, kernel_w, max_pool,
# window, eps, detach_norm) -> (total, difference, s_norms, t_norms)``, with D = a_s - a_t of every node and
# every offset of the stored half window (B, half, m), and ``backward(grad_total, x, norms, difference,
# kernel_h, kernel_w, max_pool, window, eps, detach_norm, sign) -> dL/dx`` (sign +1 student, -1 teacher).


def _fake_window_forward(s, t, kernel_h, kernel_w, max_pool, window, eps, detach_norm):
    rows, cols = -(-s.shape[2] // kernel_h), -(-s.shape[3] // kernel_w)  # ceil mode: partial last patches
    # The stored half of the window (affinity_window_math.cuh): the offsets dy > 0 or (dy = 0, dx >= 0)
    # within the reach min(r, rows - 1) x min(r, cols - 1), the diagonal included.
    reach_h, reach_w = min(window, max(rows - 1, 0)), min(window, max(cols - 1, 0))
    half = reach_h * (2 * reach_w + 1) + reach_w + 1
    batch, nodes = s.shape[0], rows * cols
    return (s.new_empty((), dtype=torch.float64), s.new_empty((batch, half, nodes), dtype=torch.float64),
            s.new_empty((batch, nodes), dtype=torch.float64), s.new_empty((batch, nodes), dtype=torch.float64))


def _fake_window_backward(grad_total, x, norms, difference, kernel_h, kernel_w, max_pool, window, eps, detach_norm,
                          sign):
    return torch.empty_like(x)


def window_ops(forward_name: str, backward_name: str):
    """Registers fake implementations and autograd for a C++ backend's window ops (qualified names) and
    returns its ``window_graph_sum(s, t, config)``: ``sum_b sum_i sum_{j: cheb(i, j) <= config.window}
    (a_s_ij - a_t_ij)^2`` as a float64 0-dim tensor. Only the inputs, the norms and D are saved."""
    torch.library.register_fake(forward_name, _fake_window_forward)
    torch.library.register_fake(backward_name, _fake_window_backward)
    forward = getattr(torch.ops.fastkd, forward_name.split("::")[1]).default
    backward = getattr(torch.ops.fastkd, backward_name.split("::")[1]).default

    def setup_context(ctx, inputs, output):
        s, t, *settings = inputs
        _, difference, s_norms, t_norms = output
        ctx.mark_non_differentiable(difference, s_norms, t_norms)
        ctx.save_for_backward(s, t, s_norms, t_norms, difference)
        ctx.settings = settings  # kernel_h, kernel_w, max_pool, window, eps, detach_norm

    def backward_fn(ctx, grad_total, _grad_difference, _grad_s_norms, _grad_t_norms):
        s, t, s_norms, t_norms, difference = ctx.saved_tensors
        grad_s = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_s = backward(grad_total, s, s_norms, difference, *ctx.settings, 1.0)
        if ctx.needs_input_grad[1]:
            grad_t = backward(grad_total, t, t_norms, difference, *ctx.settings, -1.0)
        return (grad_s, grad_t) + (None,) * len(ctx.settings)

    torch.library.register_autograd(forward_name, backward_fn, setup_context=setup_context)

    def window_graph_sum(s: torch.Tensor, t: torch.Tensor, config) -> torch.Tensor:
        kernel_h, kernel_w = pool_kernel(s.shape[2], s.shape[3], config.patch, config.pool_scale)
        max_pool = config.pool == "max" or config.pool_scale is not None
        return forward(s, t, kernel_h, kernel_w, max_pool, config.window, config.eps, config.detach_norm)[0]

    return window_graph_sum
