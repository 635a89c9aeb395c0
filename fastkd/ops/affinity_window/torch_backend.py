"""The ``torch`` backend of the ``affinity_window`` op: one pass per node offset ``(dy, dx)`` of the Chebyshev
window, each pair evaluated from two strided views of the node grid; a pair and its mirror are equal, so only
half of the offsets are visited. Autograd differentiates it; nothing m x m is formed."""

from __future__ import annotations

import torch

from fastkd.ops._graph import NodeGrid, graph_nodes, window_offsets


def pair_affinities(nodes: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``a_ij`` for every node i = (y, x) whose partner j = (y + dy, x + dx) lies in the grid, dy >= 0."""
    rows, cols = nodes.shape[2], nodes.shape[3]
    x0, x1 = max(0, -dx), cols - max(0, dx)
    first = nodes[:, :, 0:rows - dy, x0:x1]
    second = nodes[:, :, dy:rows, x0 + dx:x1 + dx]
    return (first * second).sum(dim=1)


def window_graph_sum(s: torch.Tensor, t: torch.Tensor, grid: NodeGrid, window: int, eps: float,
                     detach_norm: bool) -> torch.Tensor:
    """``sum_b sum_i sum_{j: cheb(i,j) <= window} (a_s_ij - a_t_ij)^2`` in float64."""
    s_hat, t_hat = graph_nodes(s, grid, eps, detach_norm), graph_nodes(t, grid, eps, detach_norm)
    # The diagonal j = i: a_ii = ||f_hat_i||^2, below 1 only where eps matters (near-zero nodes).
    total = (s_hat.square().sum(1) - t_hat.square().sum(1)).square().sum()
    for dy, dx in window_offsets(window, grid.grid_h, grid.grid_w):
        difference = pair_affinities(s_hat, dy, dx) - pair_affinities(t_hat, dy, dx)
        total = total + 2 * difference.square().sum()
    return total
