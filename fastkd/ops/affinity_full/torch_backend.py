"""The ``torch`` backend of the ``affinity_full`` op. Autograd differentiates it.

Gram path: ``sum_ij (a_s_ij - a_t_ij)^2 = ||S S'||^2 - 2 ||S T'||^2 + ||T T'||^2`` per image and, per row,
``r_i = s_i' (S S') s_i - 2 s_i' (S T') t_i + t_i' (T T') t_i``, with S (Cs x m), T (Ct x m) the normalised
nodes, so only C x C Gram matrices exist. The terms nearly cancel when student and teacher agree, so
everything is in float64. Direct path (when m is small next to C): the m x m difference materialised.
"""

from __future__ import annotations

import torch

from fastkd.ops._common import COMPUTE_DTYPE
from fastkd.ops._graph import NodeGrid, graph_nodes


def gram_matrices(s_hat: torch.Tensor, t_hat: torch.Tensor):
    """``(S S', S T', T T')`` per image for nodes (B, C, m): (B, Cs, Cs), (B, Cs, Ct), (B, Ct, Ct)."""
    return (torch.bmm(s_hat, s_hat.transpose(1, 2)), torch.bmm(s_hat, t_hat.transpose(1, 2)),
            torch.bmm(t_hat, t_hat.transpose(1, 2)))


def affinity_difference(s_hat: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """``a_s - a_t`` materialised, (B, m, m): the direct evaluation, for when m is small next to C."""
    return torch.bmm(s_hat.transpose(1, 2), s_hat) - torch.bmm(t_hat.transpose(1, 2), t_hat)


def image_sums(s_hat: torch.Tensor, t_hat: torch.Tensor, gram: bool) -> torch.Tensor:
    """``sum_ij (a_s_ij - a_t_ij)^2`` per image (B,) for normalised nodes (B, C, m)."""
    if not gram:
        return affinity_difference(s_hat, t_hat).square().sum((1, 2))
    gram_ss, gram_st, gram_tt = gram_matrices(s_hat, t_hat)
    total = gram_ss.square().sum((1, 2)) - 2 * gram_st.square().sum((1, 2)) + gram_tt.square().sum((1, 2))
    return total.clamp_min(0)  # a sum of squares; rounding may leave -1e-17 when s == t


def row_sums(s_hat: torch.Tensor, t_hat: torch.Tensor, gram: bool) -> torch.Tensor:
    """``sum_j (a_s_ij - a_t_ij)^2`` for every row i: (B, C, m) normalised nodes -> (B, m).

    On the Gram path, values within a few ulps of the Gram terms are rounding noise and are set to exactly
    0, so identical rows give a zero loss and a zero (not an enormous) gradient.
    """
    if not gram:
        return affinity_difference(s_hat, t_hat).square().sum(dim=2)
    gram_ss, gram_st, gram_tt = gram_matrices(s_hat, t_hat)
    form_ss = (torch.bmm(gram_ss, s_hat) * s_hat).sum(dim=1)  # s_i' (S S') s_i
    form_st = (torch.bmm(gram_st, t_hat) * s_hat).sum(dim=1)  # s_i' (S T') t_i
    form_tt = (torch.bmm(gram_tt, t_hat) * t_hat).sum(dim=1)  # t_i' (T T') t_i
    squares = form_ss - 2 * form_st + form_tt
    noise = 64 * torch.finfo(COMPUTE_DTYPE).eps * (form_ss + form_tt)
    return torch.where(squares <= noise, torch.zeros_like(squares), squares)  # NaN stays NaN


def full_graph_terms(s: torch.Tensor, t: torch.Tensor, grid: NodeGrid, eps: float, detach_norm: bool,
                     use_gram: bool, per_row: bool) -> torch.Tensor:
    """``r_i`` (B, m) with ``per_row``, else ``sum_i r_i`` (B,), float64."""
    s_hat = graph_nodes(s, grid, eps, detach_norm).flatten(2)
    t_hat = graph_nodes(t, grid, eps, detach_norm).flatten(2)
    return (row_sums if per_row else image_sums)(s_hat, t_hat, use_gram)
