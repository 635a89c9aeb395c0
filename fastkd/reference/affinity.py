"""Literal float64 definitions of the affinity losses: every node pooled by a loop over its patch, the
m x m affinity matrices materialised, the window as an m x m 0/1 matrix. Slow and obviously correct."""

from __future__ import annotations

import torch


def _patch_grid(height: int, width: int, patch=1, pool_scale=None):
    """The kernel (ph, pw) and the patches' (row, column) starts, FORMULAS.md section 1 step 1."""
    if pool_scale is not None:
        ph, pw = max(1, int(height * pool_scale)), max(1, int(width * pool_scale))
    else:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return ph, pw, range(0, height, ph), range(0, width, pw)


def graph_nodes(x: torch.Tensor, patch=1, pool="avg", pool_scale=None) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, m) node features, m = ceil(H/ph) * ceil(W/pw), row-major over the grid."""
    x = x.to(torch.float64)
    ph, pw, row_starts, col_starts = _patch_grid(x.shape[2], x.shape[3], patch, pool_scale)
    if (ph, pw) == (1, 1):  # every pixel is a node
        return x.flatten(2)
    use_max = pool == "max" or pool_scale is not None
    nodes = []
    for y in row_starts:
        for x0 in col_starts:
            pixels = x[:, :, y:y + ph, x0:x0 + pw].flatten(2)  # a partial patch has fewer pixels
            nodes.append(pixels.amax(dim=2) if use_max else pixels.mean(dim=2))
    return torch.stack(nodes, dim=2)


def node_grid_shape(height: int, width: int, patch=1, pool_scale=None):
    ph, pw, row_starts, col_starts = _patch_grid(height, width, patch, pool_scale)
    return len(row_starts), len(col_starts)


def normalize(f: torch.Tensor, eps: float, detach_norm: bool = False) -> torch.Tensor:
    norm = f.norm(dim=1, keepdim=True)
    return f / ((norm.detach() if detach_norm else norm) + eps)


def affinity_matrix(f_hat: torch.Tensor) -> torch.Tensor:
    """``a_ij = f_hat_i . f_hat_j``: (B, C, m) -> (B, m, m)."""
    return f_hat.transpose(1, 2) @ f_hat


def window_matrix(rows: int, cols: int, window, device=None) -> torch.Tensor:
    """(m, m) 1.0 where nodes i and j are connected: Chebyshev distance <= window (all for None)."""
    m = rows * cols
    if window is None:
        return torch.ones(m, m, dtype=torch.float64, device=device)
    y, x = torch.arange(m, device=device) // cols, torch.arange(m, device=device) % cols
    distance = torch.maximum((y[:, None] - y[None, :]).abs(), (x[:, None] - x[None, :]).abs())
    return (distance <= window).to(torch.float64)


def pairwise_affinity_loss(s, t, patch=1, pool="avg", pool_scale=None, window=None, eps=1e-8,
                           detach_norm=False, reduction="mean") -> torch.Tensor:
    """FORMULAS.md section 1, evaluated literally."""
    a_s = affinity_matrix(normalize(graph_nodes(s, patch, pool, pool_scale), eps, detach_norm))
    a_t = affinity_matrix(normalize(graph_nodes(t, patch, pool, pool_scale), eps, detach_norm))
    squares = (a_s - a_t) ** 2
    if window is None:  # every node connected to every node: B * m^2 terms
        total, terms = squares.sum(), squares.numel()
    else:
        connected = window_matrix(*node_grid_shape(s.shape[2], s.shape[3], patch, pool_scale), window, s.device)
        total, terms = (squares * connected).sum(), s.shape[0] * connected.sum()
    return total / terms if reduction == "mean" else total


def affinity_distillation_loss(s, t, eps=1e-8, reduction="mean") -> torch.Tensor:
    """FORMULAS.md section 2: ``L_b = sum_i ||A_s[i,:] - A_t[i,:]||_2`` with ``A = a / m``."""
    m = s.shape[2] * s.shape[3]
    a_s = affinity_matrix(normalize(graph_nodes(s), eps)) / m
    a_t = affinity_matrix(normalize(graph_nodes(t), eps)) / m
    per_image = torch.linalg.vector_norm(a_s - a_t, dim=2).sum(dim=1)
    return per_image.sum() / s.shape[0] if reduction == "mean" else per_image.sum()

