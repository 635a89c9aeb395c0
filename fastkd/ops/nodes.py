"""Graph nodes for the affinity losses: patch pooling (granularity beta) and L2 normalisation.

Liu et al. 2020, sec. 2.1 (pair-wise distillation): each node is a patch of ``ph x pw`` pixels aggregated
by average or max pooling; FORMULAS.md section 1, steps 1 and 2.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F


def pool_kernel(height: int, width: int, patch: Tuple[int, int], pool_scale: Optional[float]) -> Tuple[int, int]:
    """The pooling kernel (= stride) for a ``height x width`` map.

    ``pool_scale=r`` is the authors' code: ``(max(1, int(H*r)), max(1, int(W*r)))``. A patch larger than
    the map covers the whole map, so it is clamped to the map size.
    """
    if pool_scale is not None:
        return max(1, int(height * pool_scale)), max(1, int(width * pool_scale))
    return min(patch[0], max(height, 1)), min(patch[1], max(width, 1))


class NodeGrid(NamedTuple):
    """How the kernel backends cut a map into nodes: the patch (= stride), the grid, the pooling."""

    kernel_h: int
    kernel_w: int
    grid_h: int
    grid_w: int
    max_pool: bool

    @property
    def nodes(self) -> int:
        return self.grid_h * self.grid_w


def node_grid(height: int, width: int, patch: Tuple[int, int], pool: str, pool_scale: Optional[float]) -> NodeGrid:
    """The node grid of :func:`pool_nodes` (ceil mode: the last patches may be partial)."""
    kernel_h, kernel_w = pool_kernel(height, width, patch, pool_scale)
    return NodeGrid(kernel_h, kernel_w, -(-height // kernel_h), -(-width // kernel_w),
                    pool == "max" or pool_scale is not None)


def pool_nodes(x: torch.Tensor, patch: Tuple[int, int], pool: str, pool_scale: Optional[float]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, ceil(H/kh), ceil(W/kw)) node features; the last patches may be partial.

    ``pool_scale`` always max-pools (the authors' code); ``pool="avg"`` averages only the pixels that exist.
    """
    kernel = pool_kernel(x.shape[2], x.shape[3], patch, pool_scale)
    if kernel == (1, 1):
        return x
    if pool == "max" or pool_scale is not None:
        # A max ignores -Inf, but FORMULAS.md asks that NaN or Inf in the input give NaN: such patches are NaN.
        non_finite = F.max_pool2d((~torch.isfinite(x.detach())).to(x.dtype), kernel, kernel, ceil_mode=True)
        pooled = F.max_pool2d(x, kernel, kernel, ceil_mode=True)
        return torch.where(non_finite > 0, torch.full_like(pooled, float("nan")), pooled)
    return F.avg_pool2d(x, kernel, kernel, ceil_mode=True, count_include_pad=False)


def normalize_nodes(f: torch.Tensor, eps: float, detach_norm: bool) -> torch.Tensor:
    """``f / (||f||_2 + eps)`` along the channel dimension 1; ``detach_norm`` treats the norm as a constant."""
    norm = torch.linalg.vector_norm(f, dim=1, keepdim=True)
    if detach_norm:
        norm = norm.detach()
    return f / (norm + eps)
