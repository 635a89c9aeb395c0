"""``AffinityDistillationLoss`` (He et al. 2019, eqs. 3-4; FORMULAS.md section 2): the loss built on the
``affinity_full`` op (:mod:`fastkd.ops.affinity_full`, every pixel a node, one term per row), its
configuration checks and its reduction.

Per image ``A_ij = f_hat_i . f_hat_j / m`` and ``L_b = sum_i ||A_s[i,:] - A_t[i,:]||_2``, with
``m^2 ||A_s[i,:] - A_t[i,:]||^2 = r_i``, the op's row terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastkd import _backends
from fastkd import _validation as v
from fastkd.ops._common import evaluate
from fastkd.ops._graph import ALGORITHMS, NodeGrid, choose_gram

OP = "AffinityDistillationLoss"


@dataclass(frozen=True)
class AffinityDistillationConfig:
    eps: float
    reduction: str
    algorithm: str = "auto"

    @classmethod
    def make(cls, eps=1e-8, reduction="mean", algorithm="auto") -> "AffinityDistillationConfig":
        return cls(eps=v.check_positive_float(eps, "eps", OP), reduction=v.check_reduction(reduction, OP),
                   algorithm=v.check_choice(algorithm, "algorithm", OP, ALGORITHMS))


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` for x >= 0 whose gradient at 0 is 0 instead of inf (a zero row difference has a zero
    subgradient, FORMULAS.md section 2); NaN stays NaN."""
    zero = x == 0
    return torch.where(zero, torch.zeros_like(x), torch.where(zero, torch.ones_like(x), x).sqrt())


def loss_from_rows(rows: torch.Tensor, config: AffinityDistillationConfig) -> torch.Tensor:
    """The loss from ``r_i = ||a_s[i,:] - a_t[i,:]||^2`` (B, m): ``||A_s[i,:] - A_t[i,:]|| = sqrt(r_i) / m``."""
    batch, m = rows.shape
    total = safe_sqrt(rows).sum() / m
    return total / batch if config.reduction == "mean" else total


def affinity_distillation_loss(s: torch.Tensor, t: torch.Tensor, eps=1e-8, reduction="mean",
                               backend="auto", *, algorithm="auto") -> torch.Tensor:
    """Affinity distillation loss (He et al. 2019, eqs. 3-4).

    Args:
        s: student features (B, Cs, H, W). t: teacher features (B, Ct, H, W) (He et al. use the
            autoencoder-translated teacher features E(phi_t)); Cs and Ct may differ.
        eps: ``f_hat = f / (||f||_2 + eps)``.
        reduction: "mean" gives ``sum_b L_b / B``, "sum" gives ``sum_b L_b``, with
            ``L_b = sum_i ||A_s[i,:] - A_t[i,:]||_2`` and ``A_ij = f_hat_i . f_hat_j / (H W)``.
        backend: "auto", "torch", "triton", "cuda" or "cpp" (see README, Backends).
        algorithm: "gram", "direct" or "auto" (keyword only), as for
            :func:`fastkd.functional.pairwise_affinity_loss`.

    Returns a 0-dim tensor, float64 for float64 inputs and float32 otherwise; gradients come back in the
    inputs' dtypes.
    """
    config = AffinityDistillationConfig.make(eps, reduction, algorithm)
    v.check_student_teacher(s, t, OP)
    _, full_graph_terms = _backends.resolve(backend, OP, "affinity_full", s.device)
    grid = NodeGrid(1, 1, s.shape[2], s.shape[3], False)
    use_gram = choose_gram(config.algorithm, grid.nodes, s.shape[1], t.shape[1])
    return evaluate(s, t, lambda: loss_from_rows(
        full_graph_terms(s, t, grid, config.eps, False, use_gram, True), config))
