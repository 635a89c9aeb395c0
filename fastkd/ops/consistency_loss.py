"""``ConsistencyLoss`` (Xie et al. 2018, sec. 3.1; FORMULAS.md section 3): the loss built on the ``consistency``
op (:mod:`fastkd.ops.consistency`), its configuration checks and its reduction.

``c(x) = sum_{y in N8(x)} ||l(y) - l(x)||_2^2`` with neighbours at offsets ``{-d, 0, d}^2 \\ {(0, 0)}``, and
``loss = sum_x (c_s(x) - c_t(x))^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastkd import _backends
from fastkd import _validation as v
from fastkd.ops._common import evaluate

OP = "ConsistencyLoss"
BORDERS = ("valid", "same")


@dataclass(frozen=True)
class ConsistencyConfig:
    border: str
    dilation: int
    reduction: str

    @classmethod
    def make(cls, border="valid", dilation=1, reduction="mean") -> "ConsistencyConfig":
        return cls(
            border=v.check_choice(border, "border", OP, BORDERS),
            dilation=v.check_int(dilation, "dilation", OP, 1),
            reduction=v.check_reduction(reduction, OP),
        )


def check_map_size(s: torch.Tensor, config: ConsistencyConfig) -> None:
    """``border="valid"`` needs all 8 neighbours of at least one pixel: 2d+1 rows and columns."""
    needed = 2 * config.dilation + 1
    height, width = s.shape[2], s.shape[3]
    if config.border == "valid" and (height < needed or width < needed):
        raise ValueError(
            f"{OP}: the map is {height}x{width}, too small for border='valid' with dilation="
            f"{config.dilation}: it needs at least {needed} rows and {needed} columns (or use border='same')"
        )


def defined_terms(s: torch.Tensor, config: ConsistencyConfig) -> int:
    """The number of (b, x) terms: "valid" defines c on an (H - 2d) x (W - 2d) map, "same" on H x W."""
    margin = 2 * config.dilation if config.border == "valid" else 0
    return s.shape[0] * (s.shape[2] - margin) * (s.shape[3] - margin)


def consistency_loss(s: torch.Tensor, t: torch.Tensor, border="valid", dilation=1, reduction="mean",
                     backend="auto") -> torch.Tensor:
    """Consistency loss between the 8-neighbour maps of student and teacher logits (Xie et al. 2018, 3.1).

    Args:
        s: student logits (B, Cs, H, W). t: teacher logits (B, Ct, H, W); Cs and Ct may differ (only the
            scalar maps are compared).
        border: "valid" defines c where all 8 neighbours lie inside the image, an (H-2d) x (W-2d) map (the
            authors' code); "same" defines c everywhere, summing over the neighbours inside the image.
        dilation: d, the neighbour offsets are ``{-d, 0, d}^2 \\ {(0, 0)}``.
        reduction: "sum" of ``(c_s(x) - c_t(x))^2`` over (b, x), or "mean" over those terms.
        backend: "auto", "torch", "triton", "cuda" or "cpp" (see README, Backends).

    Returns a 0-dim tensor, float64 for float64 inputs and float32 otherwise; gradients come back in the
    inputs' dtypes.
    """
    config = ConsistencyConfig.make(border, dilation, reduction)
    v.check_student_teacher(s, t, OP)
    check_map_size(s, config)
    _, consistency_sum = _backends.resolve(backend, OP, "consistency", s.device)

    def compute():
        total = consistency_sum(s, t, config.border == "valid", config.dilation)
        return total if config.reduction == "sum" else total / defined_terms(s, config)

    return evaluate(s, t, compute)
