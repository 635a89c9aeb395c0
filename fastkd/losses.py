"""The losses as ``nn.Module``s: each validates its configuration and backend when built and calls its
function in :mod:`fastkd.functional`."""

from __future__ import annotations

import torch
from torch import nn

from fastkd._backends import availability, check_backend
from fastkd.ops import (
    affinity_distillation_loss as affinity_distillation,
    consistency_loss as consistency,
    pairwise_affinity_loss as pairwise_affinity,
    pixelwise_kd_loss as pixelwise_kd,
    probability_loss as probability,
)


class _Loss(nn.Module):
    """Holds a validated configuration and the backend checked against the registry (``fastkd._backends``)."""

    _op_module = None  # each loss's module in fastkd.ops

    def __init__(self, config, backend):
        super().__init__()
        self.config = config
        self.backend = check_backend(backend, self._op_module.OP)

    @classmethod
    def available_backends(cls, device="cpu") -> dict:
        """``{backend: None if it can run this loss on tensors of `device` here, else the reason why not}``
        for every backend but ``auto``."""
        return availability(cls._op_module.OP, torch.device(device))

    def extra_repr(self) -> str:
        return f"{self.config}, backend={self.backend!r}"


class PairwiseAffinityLoss(_Loss):
    """Pair-wise affinity distillation (Liu et al. 2020, eq. 2) on a graph of pooled, normalised nodes.

    ``PairwiseAffinityLoss(...)(s, t)`` with s: (B, Cs, H, W), t: (B, Ct, H, W). See
    :func:`fastkd.functional.pairwise_affinity_loss` for the arguments and formula.
    """

    _op_module = pairwise_affinity

    def __init__(self, patch=1, pool="avg", pool_scale=None, window=None, eps=1e-8, detach_norm=False,
                 reduction="mean", backend="auto", *, algorithm="auto"):
        config = pairwise_affinity.PairwiseAffinityConfig.make(
            patch, pool, pool_scale, window, eps, detach_norm, reduction, algorithm)
        super().__init__(config, backend)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.config
        return pairwise_affinity.pairwise_affinity_loss(
            s, t, c.patch, c.pool, c.pool_scale, c.window, c.eps, c.detach_norm, c.reduction, self.backend,
            algorithm=c.algorithm)


class AffinityDistillationLoss(_Loss):
    """Affinity distillation (He et al. 2019, eqs. 3-4): sum over rows of the row-difference norms of the
    (1/m)-scaled affinity matrices. See :func:`fastkd.functional.affinity_distillation_loss`."""

    _op_module = affinity_distillation

    def __init__(self, eps=1e-8, reduction="mean", backend="auto", *, algorithm="auto"):
        config = affinity_distillation.AffinityDistillationConfig.make(eps, reduction, algorithm)
        super().__init__(config, backend)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return affinity_distillation.affinity_distillation_loss(
            s, t, self.config.eps, self.config.reduction, self.backend, algorithm=self.config.algorithm)


class ConsistencyLoss(_Loss):
    """Consistency of the 8-neighbour maps of student and teacher logits (Xie et al. 2018, sec. 3.1).
    See :func:`fastkd.functional.consistency_loss`."""

    _op_module = consistency

    def __init__(self, border="valid", dilation=1, reduction="mean", backend="auto"):
        super().__init__(consistency.ConsistencyConfig.make(border, dilation, reduction), backend)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.config
        return consistency.consistency_loss(s, t, c.border, c.dilation, c.reduction, self.backend)


class ProbabilityLoss(_Loss):
    """Squared distance of class probabilities per pixel (Xie et al. 2018, sec. 3.1).
    ``ProbabilityLoss()(s_logits, t_logits, mask=None)``; see :func:`fastkd.functional.probability_loss`."""

    _op_module = probability

    def __init__(self, reduction="mean", backend="auto"):
        super().__init__(probability.ProbabilityConfig.make(reduction), backend)

    def forward(self, s_logits: torch.Tensor, t_logits: torch.Tensor, mask=None) -> torch.Tensor:
        return probability.probability_loss(s_logits, t_logits, mask, self.config.reduction, self.backend)


class PixelwiseKDLoss(_Loss):
    """Pixel-wise distillation, ``T^2 KL(q_t || q_s)`` per pixel (Liu et al. 2020, eq. 1; Hinton et al.).
    ``PixelwiseKDLoss()(s_logits, t_logits, mask=None)``; see :func:`fastkd.functional.pixelwise_kd_loss`."""

    _op_module = pixelwise_kd

    def __init__(self, temperature=1.0, reduction="mean", backend="auto"):
        super().__init__(pixelwise_kd.PixelwiseKDConfig.make(temperature, reduction), backend)

    def forward(self, s_logits: torch.Tensor, t_logits: torch.Tensor, mask=None) -> torch.Tensor:
        return pixelwise_kd.pixelwise_kd_loss(
            s_logits, t_logits, mask, self.config.temperature, self.config.reduction, self.backend)
