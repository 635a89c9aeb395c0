"""``PairwiseAffinityLoss`` (Liu et al. 2020, eq. 2; FORMULAS.md section 1): the loss built on the
``affinity_full`` op (:mod:`fastkd.ops.affinity_full`; no window, or one spanning the node grid) and the
``affinity_window`` op (:mod:`fastkd.ops.affinity_window`), its configuration checks and its reduction.
No backend materialises an m x m matrix where m exceeds the channel count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from fastkd import _backends
from fastkd import _validation as v
from fastkd.ops._common import evaluate
from fastkd.ops._graph import ALGORITHMS, choose_gram, covers_full_graph, node_grid, window_pairs_1d

OP = "PairwiseAffinityLoss"
POOLS = ("avg", "max")


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
        v.check_bool(detach_norm, "detach_norm", OP)
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


def reduce_total(total: torch.Tensor, config: PairwiseAffinityConfig, batch: int, rows: int, cols: int):
    """The loss from the sum over (b, i, connected j): that sum, or its mean over those terms."""
    if config.reduction == "sum":
        return total
    if covers_full_graph(config.window, rows, cols):
        return total / (batch * (rows * cols) ** 2)
    return total / (batch * window_pairs_1d(rows, config.window) * window_pairs_1d(cols, config.window))


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
    grid = node_grid(s.shape[2], s.shape[3], config.patch, config.pool, config.pool_scale)
    if covers_full_graph(config.window, grid.grid_h, grid.grid_w):
        _, full_graph_terms = _backends.resolve(backend, OP, "affinity_full", s.device)
        use_gram = choose_gram(config.algorithm, grid.nodes, s.shape[1], t.shape[1])

        def total():
            return full_graph_terms(s, t, grid, config.eps, config.detach_norm, use_gram, False).sum()
    else:
        _, window_graph_sum = _backends.resolve(backend, OP, "affinity_window", s.device)

        def total():
            return window_graph_sum(s, t, grid, config.window, config.eps, config.detach_norm)

    return evaluate(s, t, lambda: reduce_total(total(), config, s.shape[0], grid.grid_h, grid.grid_w))
