"""``PixelwiseKDLoss`` (Liu et al. 2020, eq. 1; Hinton et al.; FORMULAS.md section 5), built on the
``pixelwise_kd`` op (:mod:`fastkd.ops.pixelwise_kd`).

Per pixel ``T^2 KL(q_t || q_s)`` with ``q = softmax(l / T)`` over channels. The authors' code uses the
cross-entropy ``-sum q_t log q_s`` divided by H*W; it differs from this KL by the teacher's entropy, which
has no gradient with respect to the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastkd import _backends
from fastkd import _validation as v
from fastkd.ops._common import evaluate, reduce_pixels

OP = "PixelwiseKDLoss"


@dataclass(frozen=True)
class PixelwiseKDConfig:
    temperature: float
    reduction: str

    @classmethod
    def make(cls, temperature=1.0, reduction="mean") -> "PixelwiseKDConfig":
        return cls(
            temperature=v.check_positive_float(temperature, "temperature", OP),
            reduction=v.check_reduction(reduction, OP),
        )


def pixelwise_kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, mask=None, temperature=1.0,
                      reduction="mean", backend="auto") -> torch.Tensor:
    """Pixel-wise knowledge distillation (Liu et al. 2020, eq. 1; Hinton et al. 2015):
    ``T^2 KL(softmax(l_t/T) || softmax(l_s/T))`` per pixel.

    Args:
        s_logits, t_logits: (B, C, H, W) logits with the same classes.
        mask: None (every pixel counted) or a (B, H, W) bool tensor, True = counted.
        temperature: T > 0. reduction: "sum" over counted pixels, or "mean" over them (0 when none is).
        backend: "auto", "torch", "triton" or "cpp" (fastkd/_backends.py).

    Returns a 0-dim tensor, float64 for float64 inputs and float32 otherwise; gradients come back in the
    inputs' dtypes.
    """
    config = PixelwiseKDConfig.make(temperature, reduction)
    v.check_student_teacher(s_logits, t_logits, OP, s_name="s_logits", t_name="t_logits", same_channels=True)
    v.check_mask(mask, s_logits, OP)
    _, terms = _backends.resolve(backend, OP, "pixelwise_kd", s_logits.device)
    return evaluate(s_logits, t_logits, lambda: reduce_pixels(terms(s_logits, t_logits, config.temperature), mask,
                                                          config.reduction) * config.temperature**2)
