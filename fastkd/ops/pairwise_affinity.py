"""Pair-wise affinity loss (Liu et al. 2020, eq. 2; FORMULAS.md section 1): ``PairwiseAffinityLoss``.

The torch backend never materialises an m x m matrix where m exceeds the channel count:

* full graph (``window=None``): ``sum_ij (a_s_ij - a_t_ij)^2 = ||S S'||^2 - 2 ||S T'||^2 + ||T T'||^2`` with
  S (Cs x m), T (Ct x m) the normalised nodes of one image, so only C x C Gram matrices exist. The three
  terms nearly cancel when student and teacher agree, so they are accumulated in float64. When m is small
  next to C (e.g. ``pool_scale`` grids of 3 x 3 nodes) the direct m x m evaluation is cheaper and is used.
* windowed graph (``window=r``): one pass per node offset ``(dy, dx)`` in the Chebyshev window, each pair
  evaluated from two strided views of the node grid; a pair and its mirror are equal, so only half of the
  offsets are visited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from fastkd import _validation as v
from fastkd.ops._common import COMPUTE_DTYPE, dispatch
from fastkd.ops.nodes import normalize_nodes, pool_nodes

OP = "PairwiseAffinityLoss"
POOLS = ("avg", "max")
# How the full graph is summed: "gram" (C x C Gram matrices, O(m C^2)), "direct" (m x m affinities formed
# tile by tile, O(m^2 C)), or "auto" (the cheaper one by :func:`use_gram`).
ALGORITHMS = ("auto", "gram", "direct")


@dataclass(frozen=True)
class PairwiseAffinityConfig:
    patch: Tuple[int, int]
    pool: str
    pool_scale: Optional[float]
    window: Optional[int]
    eps: float
    detach_norm: bool
    reduction: str
    algorithm: str = "auto"

    @classmethod
    def make(cls, patch=1, pool="avg", pool_scale=None, window=None, eps=1e-8, detach_norm=False,
             reduction="mean", algorithm="auto") -> "PairwiseAffinityConfig":
        """Validates the hyper-parameters (ValueError / TypeError naming the argument)."""
        patch = v.check_patch(patch, OP)
        pool_scale = v.check_pool_scale(pool_scale, OP)
        if pool_scale is not None and patch != (1, 1):
            raise ValueError(
                f"{OP}: `patch` and `pool_scale` are exclusive ways to choose the node grid; "
                f"got patch={patch} and pool_scale={pool_scale}"
            )
        if not isinstance(detach_norm, bool):
            raise TypeError(f"{OP}: `detach_norm` must be a bool, got {detach_norm!r}")
        return cls(
            patch=patch,
            pool=v.check_choice(pool, "pool", OP, POOLS),
            pool_scale=pool_scale,
            window=v.check_window(window, OP),
            eps=v.check_positive_float(eps, "eps", OP),
            detach_norm=detach_norm,
            reduction=v.check_reduction(reduction, OP),
            algorithm=v.check_choice(algorithm, "algorithm", OP, ALGORITHMS),
        )


def graph_nodes(x: torch.Tensor, config: PairwiseAffinityConfig) -> torch.Tensor:
    """(B, C, H, W) input -> (B, C, Hn, Wn) pooled, normalised float64 nodes."""
    nodes = pool_nodes(x.to(COMPUTE_DTYPE), config.patch, config.pool, config.pool_scale)
    return normalize_nodes(nodes, config.eps, config.detach_norm)


def use_gram(m: int, cs: int, ct: int) -> bool:
    """Cost model: multiply-adds of the Gram identity, ``m (Cs^2 + Cs Ct + Ct^2)``, against the direct
    evaluation, ``m^2 (Cs + Ct + 1)``. The direct path also bounds its m x m memory by the C x C it saves."""
    return m * (cs * cs + cs * ct + ct * ct) <= m * m * (cs + ct + 1)


def choose_gram(algorithm: str, m: int, cs: int, ct: int) -> bool:
    """Whether the full graph is summed through Gram matrices: the caller's ``algorithm``, or the cost model."""
    return use_gram(m, cs, ct) if algorithm == "auto" else algorithm == "gram"


def gram_matrices(s_hat: torch.Tensor, t_hat: torch.Tensor):
    """``(S S', S T', T T')`` per image for nodes (B, C, m): (B, Cs, Cs), (B, Cs, Ct), (B, Ct, Ct)."""
    return (torch.bmm(s_hat, s_hat.transpose(1, 2)), torch.bmm(s_hat, t_hat.transpose(1, 2)),
            torch.bmm(t_hat, t_hat.transpose(1, 2)))


def affinity_difference(s_hat: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """``a_s - a_t`` materialised, (B, m, m): the direct evaluation, for when m is small next to C."""
    return torch.bmm(s_hat.transpose(1, 2), s_hat) - torch.bmm(t_hat.transpose(1, 2), t_hat)


def full_graph_sum(s_hat: torch.Tensor, t_hat: torch.Tensor, gram: bool) -> torch.Tensor:
    """``sum_b sum_ij (a_s_ij - a_t_ij)^2`` for normalised nodes (B, C, m), by the Gram identity or directly."""
    if not gram:
        return affinity_difference(s_hat, t_hat).square().sum()
    gram_ss, gram_st, gram_tt = gram_matrices(s_hat, t_hat)
    total = gram_ss.square().sum() - 2 * gram_st.square().sum() + gram_tt.square().sum()
    return total.clamp_min(0)  # a sum of squares; rounding may leave -1e-17 when s == t


def covers_full_graph(window: Optional[int], rows: int, cols: int) -> bool:
    """Whether every node is connected to every node: no window, or one that spans the node grid."""
    return window is None or window >= max(rows, cols) - 1


def window_pairs_1d(n: int, r: int) -> int:
    """Number of ordered pairs (y, y') in 0..n-1 with |y - y'| <= r."""
    k = min(r, n - 1)
    return n + 2 * (k * n - k * (k + 1) // 2)


def window_offsets(r: int, rows: int, cols: int):
    """The offsets (dy, dx) of one half of the Chebyshev window (the other half mirrors them), skipping
    offsets that leave every node of a rows x cols grid without a partner."""
    for dy in range(0, min(r, rows - 1) + 1):
        for dx in range(-min(r, cols - 1), min(r, cols - 1) + 1):
            if dy > 0 or dx > 0:
                yield dy, dx


def pair_affinities(nodes: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``a_ij`` for every node i = (y, x) whose partner j = (y + dy, x + dx) lies in the grid, dy >= 0."""
    rows, cols = nodes.shape[2], nodes.shape[3]
    x0, x1 = max(0, -dx), cols - max(0, dx)
    first = nodes[:, :, 0:rows - dy, x0:x1]
    second = nodes[:, :, dy:rows, x0 + dx:x1 + dx]
    return (first * second).sum(dim=1)


def window_sum(s_hat: torch.Tensor, t_hat: torch.Tensor, r: int) -> torch.Tensor:
    """``sum_b sum_i sum_{j: cheb(i,j) <= r} (a_s_ij - a_t_ij)^2`` for normalised node grids (B, C, Hn, Wn)."""
    # The diagonal j = i: a_ii = ||f_hat_i||^2, below 1 only where eps matters (near-zero nodes).
    total = (s_hat.square().sum(1) - t_hat.square().sum(1)).square().sum()
    for dy, dx in window_offsets(r, s_hat.shape[2], s_hat.shape[3]):
        difference = pair_affinities(s_hat, dy, dx) - pair_affinities(t_hat, dy, dx)
        total = total + 2 * difference.square().sum()
    return total


def reduce_total(total: torch.Tensor, config: PairwiseAffinityConfig, batch: int, rows: int, cols: int):
    """The loss from the sum over (b, i, connected j): that sum, or its mean over those terms."""
    if config.reduction == "sum":
        return total
    if covers_full_graph(config.window, rows, cols):
        return total / (batch * (rows * cols) ** 2)
    return total / (batch * window_pairs_1d(rows, config.window) * window_pairs_1d(cols, config.window))


def _torch_implementation(s: torch.Tensor, t: torch.Tensor, config: PairwiseAffinityConfig) -> torch.Tensor:
    s_hat, t_hat = graph_nodes(s, config), graph_nodes(t, config)
    batch, _, rows, cols = s_hat.shape
    if covers_full_graph(config.window, rows, cols):
        gram = choose_gram(config.algorithm, rows * cols, s_hat.shape[1], t_hat.shape[1])
        total = full_graph_sum(s_hat.flatten(2), t_hat.flatten(2), gram)
    else:
        total = window_sum(s_hat, t_hat, config.window)
    return reduce_total(total, config, batch, rows, cols)


IMPLEMENTATIONS = {"torch": _torch_implementation}


def pairwise_affinity_loss(s: torch.Tensor, t: torch.Tensor, patch=1, pool="avg", pool_scale=None,
                           window=None, eps=1e-8, detach_norm=False, reduction="mean",
                           backend="auto", *, algorithm="auto") -> torch.Tensor:
    """Pair-wise affinity distillation loss (Liu et al. 2020, eq. 2).

    Args:
        s: student features (B, Cs, H, W). t: teacher features (B, Ct, H, W); Cs and Ct may differ.
        patch: node size ``ph x pw`` (int or pair; granularity beta); ``pool``: "avg" or "max" over a patch.
        pool_scale: the authors' node grid, kernel ``max(1, int(H*r)) x max(1, int(W*r))``, max pooling;
            exclusive with ``patch``.
        window: None connects every node to every node; an int r connects nodes within Chebyshev distance r.
        eps: ``f_hat = f / (||f||_2 + eps)``. detach_norm: treat ``||f||`` as a constant in backward.
        reduction: "sum" over (b, i, connected j) of ``(a_s_ij - a_t_ij)^2``, or "mean" over those terms
            (``B * m^2`` for the full graph).
        backend: "auto", "torch", "triton", "cuda" or "cpp" (see README, Backends).
        algorithm: how the full graph is summed (keyword only; results agree to rounding): "gram", the
            C x C Gram identity, O(m C^2); "direct", tiles of the m x m affinities, O(m^2 C), for maps with
            few nodes next to the channels; "auto" picks the cheaper.

    Returns a 0-dim tensor, float64 for float64 inputs and float32 otherwise; gradients come back in the
    inputs' dtypes.
    """
    config = PairwiseAffinityConfig.make(patch, pool, pool_scale, window, eps, detach_norm, reduction, algorithm)
    v.check_student_teacher(s, t, OP)
    return dispatch(OP, IMPLEMENTATIONS, backend, s, t, config)
