"""The windowed graph of ``PairwiseAffinityLoss(window=r)`` on the CUDA kernels of
``csrc/kernels/affinity_window.cu`` (Liu et al. 2020, eq. 2; FORMULAS.md section 1).

With nodes f_i pooled from ``kernel_h x kernel_w`` patches, ``f_hat_i = f_i / (||f_i|| + eps)`` and
``a_ij = f_hat_i . f_hat_j``, :func:`window_graph_sum` computes the float64 sum
``total = sum_b sum_i sum_{j: cheb(i, j) <= r} (a_s_ij - a_t_ij)^2`` (j = i included), cheb being the
Chebyshev distance on the node grid; the caller divides by the number of terms for ``reduction="mean"``.

``fastkd::cuda_affinity_window_forward(s, t, kernel_h, kernel_w, max_pool, window, eps, detach_norm)
-> (total, difference, s_norms, t_norms)`` pools the nodes on the fly (one thread per node), computes the
node norms (B, m) and ``D = a_s - a_t`` for one half of the window (the diagonal and one offset of each
mirrored pair), (B, half, m) float64, and sums ``D^2`` per block in a fixed order. The backward op gathers
``dL/df_hat_i = 4 sign grad sum_{j in window(i)} D_ij f_hat_j`` from D (one thread per node and channel),
then takes it through the normalisation and the pooling (one thread per node). No atomics: the result is
the same on every run. Only the inputs, the node norms and D are saved for backward; ``detach_norm`` is
read by the backward only.
"""

import torch

from fastkd.ops.nodes import pool_kernel

FORWARD = "fastkd::cuda_affinity_window_forward"


@torch.library.register_fake(FORWARD)
def _(s, t, kernel_h, kernel_w, max_pool, window, eps, detach_norm):
    rows, cols = -(-s.shape[2] // kernel_h), -(-s.shape[3] // kernel_w)  # ceil mode: partial last patches
    # The stored half of the window (affinity_window_math.cuh): the offsets dy > 0 or (dy = 0, dx >= 0)
    # within the reach min(r, rows - 1) x min(r, cols - 1), the diagonal included.
    reach_h, reach_w = min(window, max(rows - 1, 0)), min(window, max(cols - 1, 0))
    half = reach_h * (2 * reach_w + 1) + reach_w + 1
    batch, nodes = s.shape[0], rows * cols
    return (s.new_empty((), dtype=torch.float64), s.new_empty((batch, half, nodes), dtype=torch.float64),
            s.new_empty((batch, nodes), dtype=torch.float64), s.new_empty((batch, nodes), dtype=torch.float64))


@torch.library.register_fake("fastkd::cuda_affinity_window_backward")
def _(grad_total, x, norms, difference, kernel_h, kernel_w, max_pool, window, eps, detach_norm, sign):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    s, t, *settings = inputs
    _, difference, s_norms, t_norms = output
    ctx.mark_non_differentiable(difference, s_norms, t_norms)
    ctx.save_for_backward(s, t, s_norms, t_norms, difference)
    ctx.settings = settings  # kernel_h, kernel_w, max_pool, window, eps, detach_norm


def _backward(ctx, grad_total, _grad_difference, _grad_s_norms, _grad_t_norms):
    s, t, s_norms, t_norms, difference = ctx.saved_tensors
    backward_op = torch.ops.fastkd.cuda_affinity_window_backward
    grad_s = grad_t = None
    if ctx.needs_input_grad[0]:
        grad_s = backward_op(grad_total, s, s_norms, difference, *ctx.settings, 1.0)
    if ctx.needs_input_grad[1]:
        grad_t = backward_op(grad_total, t, t_norms, difference, *ctx.settings, -1.0)
    return (grad_s, grad_t) + (None,) * len(ctx.settings)


torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)


def window_graph_sum(s: torch.Tensor, t: torch.Tensor, config) -> torch.Tensor:
    """``sum_b sum_i sum_{j: cheb(i, j) <= config.window} (a_s_ij - a_t_ij)^2``, a float64 0-dim tensor, for
    a validated :class:`~fastkd.ops.pairwise_affinity.PairwiseAffinityConfig` with an int window."""
    kernel_h, kernel_w = pool_kernel(s.shape[2], s.shape[3], config.patch, config.pool_scale)
    max_pool = config.pool == "max" or config.pool_scale is not None
    total, _, _, _ = torch.ops.fastkd.cuda_affinity_window_forward(s, t, kernel_h, kernel_w, max_pool, config.window,
                                                                   config.eps, config.detach_norm)
    return total
