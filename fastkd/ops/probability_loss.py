"""``ProbabilityLoss`` (Xie et al. 2018, sec. 3.1; FORMULAS.md section 4), built on the ``probability`` op
(:mod:`fastkd.ops.probability`).

``sum_x ||softmax(l_s(x)) - softmax(l_t(x))||_2^2`` over the counted pixels, softmax over channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastkd import _backends
from fastkd import _validation as v
from fastkd.ops._common import evaluate, reduce_pixels

OP = "ProbabilityLoss"


@dataclass(frozen=True)
class ProbabilityConfig:
    reduction: str

    @classmethod
    def make(cls, reduction="mean") -> "ProbabilityConfig":
        return cls(reduction=v.check_reduction(reduction, OP))


def probability_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, mask=None, reduction="mean",
                     backend="auto") -> torch.Tensor:
    """Squared distance between student and teacher class probabilities (Xie et al. 2018, sec. 3.1).

    Args:
        s_logits, t_logits: (B, C, H, W) logits with the same classes.
        mask: None (every pixel counted) or a (B, H, W) bool tensor, True = counted.
        reduction: "sum" over counted pixels of ``||softmax(l_s) - softmax(l_t)||_2^2``, or "mean" (divided
            by the number of counted pixels; 0 when none is counted).
        backend: "auto", "torch", "triton" or "cpp" (fastkd/_backends.py).

    Returns a 0-dim tensor, float64 for float64 inputs and float32 otherwise; gradients come back in the
    inputs' dtypes.
    """
    config = ProbabilityConfig.make(reduction)
    v.check_student_teacher(s_logits, t_logits, OP, s_name="s_logits", t_name="t_logits", same_channels=True)
    v.check_mask(mask, s_logits, OP)
    _, terms = _backends.resolve(backend, OP, "probability", s_logits.device)
    return evaluate(s_logits, t_logits, lambda: reduce_pixels(terms(s_logits, t_logits), mask, config.reduction))
