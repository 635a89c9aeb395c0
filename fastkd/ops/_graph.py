"""The node and graph math every backend of the affinity ops shares (a leaf: torch and :mod:`fastkd.ops._common` only).

Nodes (Liu et al. 2020, sec. 2.1; FORMULAS.md section 1, steps 1-2): each node is a ``kernel_h x kernel_w``
patch of pixels aggregated by average or max pooling (ceil mode: the last patches may be partial), then
L2-normalised. The graph: every node connected to every node (``affinity_full``), or to the nodes within a
Chebyshev window of radius r on the node grid (``affinity_window``).
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from fastkd.ops._common import COMPUTE_DTYPE


def pool_kernel(height: int, width: int, patch: Tuple[int, int], pool_scale: Optional[float]) -> Tuple[int, int]:
    """The pooling kernel (= stride) for a ``height x width`` map.

    ``pool_scale=r`` is the authors' code: ``(max(1, int(H*r)), max(1, int(W*r)))``. A patch larger than
    the map covers the whole map, so it is clamped to the map size.
    """
    if pool_scale is not None:
        return max(1, int(height * pool_scale)), max(1, int(width * pool_scale))
    return min(patch[0], max(height, 1)), min(patch[1], max(width, 1))


class NodeGrid(NamedTuple):
    """How a map is cut into nodes: the patch (= stride), the grid, the pooling."""

    kernel_h: int
    kernel_w: int
    grid_h: int
    grid_w: int
    max_pool: bool

    @property
    def nodes(self) -> int:
        return self.grid_h * self.grid_w


def node_grid(height: int, width: int, patch: Tuple[int, int], pool: str, pool_scale: Optional[float]) -> NodeGrid:
    """The node grid of a ``height x width`` map (ceil mode: the last patches may be partial);
    ``pool_scale`` always max-pools (the authors' code)."""
    kernel_h, kernel_w = pool_kernel(height, width, patch, pool_scale)
    return NodeGrid(kernel_h, kernel_w, -(-height // kernel_h), -(-width // kernel_w),
                    pool == "max" or pool_scale is not None)


# Float64 pieces of an input are at most this many elements (8 MiB): average pooling accumulates in float64
# without a full-size float64 copy of the input.
CHUNK_ELEMENTS = 1 << 20


def poison_non_finite(nodes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``nodes``, all NaN if any element of ``x`` is NaN or +-Inf (FORMULAS.md: such input gives NaN). A max
    ignores -Inf and average pooling can hide an overflow, so the input itself is checked: one read, no
    temporary (``aminmax``), and no Python branch (``torch.compile`` traces it)."""
    low, high = torch.aminmax(x.detach())
    finite = torch.isfinite(low) & torch.isfinite(high)
    return nodes + torch.where(finite, 0.0, float("nan")).to(nodes.dtype)


def pool_nodes(x: torch.Tensor, grid: NodeGrid) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, grid_h, grid_w) float64 node features; ``avg`` averages only the pixels that exist.

    The input is read in its own dtype: max pooling is exact in any precision, so it pools first and widens
    the (patch-times smaller) result; average pooling sums in float64, a few channels at a time.
    """
    kernel = (grid.kernel_h, grid.kernel_w)
    if kernel == (1, 1):  # the nodes are the pixels: the result is a float64 copy of the input
        return x.to(COMPUTE_DTYPE)
    if x.numel() == 0:
        return F.max_pool2d(x.to(COMPUTE_DTYPE), kernel, kernel, ceil_mode=True)
    if grid.max_pool:
        pooled = F.max_pool2d(x, kernel, kernel, ceil_mode=True).to(COMPUTE_DTYPE)
    else:
        channels_per_piece = max(1, CHUNK_ELEMENTS // x[:, :1].numel())
        pooled = torch.cat([F.avg_pool2d(piece.to(COMPUTE_DTYPE), kernel, kernel, ceil_mode=True,
                                         count_include_pad=False)
                            for piece in x.split(channels_per_piece, dim=1)], dim=1)
    return poison_non_finite(pooled, x)


def normalize_nodes(f: torch.Tensor, eps: float, detach_norm: bool) -> torch.Tensor:
    """``f / (||f||_2 + eps)`` along the channel dimension 1; ``detach_norm`` treats the norm as a constant."""
    norm = torch.linalg.vector_norm(f, dim=1, keepdim=True)
    if detach_norm:
        norm = norm.detach()
    return f / (norm + eps)


# How the nodes of an input are pooled: (x, grid) -> (B, C, grid_h, grid_w) float64, as pool_nodes.
Pool = Callable[[torch.Tensor, NodeGrid], torch.Tensor]


def graph_nodes(x: torch.Tensor, grid: NodeGrid, eps: float, detach_norm: bool,
                pool: Pool = pool_nodes) -> torch.Tensor:
    """(B, C, H, W) input -> (B, C, grid_h, grid_w) pooled, normalised float64 nodes."""
    return normalize_nodes(pool(x, grid), eps, detach_norm)


# ----------------------------------------------------------------------------------------- the full graph

# How the full graph is summed: "gram" (C x C Gram matrices, O(m C^2)), "direct" (m x m affinities formed
# tile by tile, O(m^2 C)), or "auto" (the cheaper one by :func:`use_gram`).
ALGORITHMS = ("auto", "gram", "direct")


def use_gram(m: int, cs: int, ct: int) -> bool:
    """Cost model: multiply-adds of the Gram identity, ``m (Cs^2 + Cs Ct + Ct^2)``, against the direct
    evaluation, ``m^2 (Cs + Ct + 1)``. The direct path also bounds its m x m memory by the C x C it saves."""
    return m * (cs * cs + cs * ct + ct * ct) <= m * m * (cs + ct + 1)


def choose_gram(algorithm: str, m: int, cs: int, ct: int) -> bool:
    """Whether the full graph is summed through Gram matrices: the caller's ``algorithm``, or the cost model."""
    return use_gram(m, cs, ct) if algorithm == "auto" else algorithm == "gram"


def covers_full_graph(window: Optional[int], rows: int, cols: int) -> bool:
    """Whether every node is connected to every node: no window, or one that spans the node grid."""
    return window is None or window >= max(rows, cols) - 1


# ------------------------------------------------------------------------------------- the windowed graph

def window_pairs_1d(n: int, r: int) -> int:
    """Number of ordered pairs (y, y') in 0..n-1 with |y - y'| <= r."""
    k = min(r, n - 1)
    return n + 2 * (k * n - k * (k + 1) // 2)


def window_offsets(r: int, rows: int, cols: int) -> Iterator[Tuple[int, int]]:
    """The offsets (dy, dx) of one half of the Chebyshev window, the diagonal (0, 0) excluded (the other
    half mirrors them), skipping offsets that leave every node of a rows x cols grid without a partner."""
    for dy in range(0, min(r, rows - 1) + 1):
        for dx in range(-min(r, cols - 1), min(r, cols - 1) + 1):
            if dy > 0 or dx > 0:
                yield dy, dx


def stored_half_window(r: int, rows: int, cols: int) -> int:
    """How many offsets the kernels store D for: the diagonal and :func:`window_offsets`,
    ``reach_h (2 reach_w + 1) + reach_w + 1`` with the reach ``min(r, rows - 1) x min(r, cols - 1)``."""
    reach_h, reach_w = min(r, max(rows - 1, 0)), min(r, max(cols - 1, 0))
    return reach_h * (2 * reach_w + 1) + reach_w + 1
