"""Affinity distillation loss (He et al. 2019, eqs. 3-4; FORMULAS.md section 2): ``AffinityDistillationLoss``.

Per image ``A_ij = f_hat_i . f_hat_j / m`` and ``L_b = sum_i ||A_s[i,:] - A_t[i,:]||_2``. The torch backend
gets each row's squared norm from C x C Gram matrices instead of the m x m matrices:

    m^2 ||A_s[i,:] - A_t[i,:]||^2 = s_i' (S S') s_i - 2 s_i' (S T') t_i + t_i' (T T') t_i

in float64 (the three terms cancel to ~1e-6 of their size near convergence). Small maps use the direct
m x m evaluation when the cost model says it is cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastkd import _validation as v
from fastkd.ops._common import COMPUTE_DTYPE, dispatch
from fastkd.ops.nodes import normalize_nodes
from fastkd.ops.pairwise_affinity import ALGORITHMS, affinity_difference, choose_gram, gram_matrices

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


def row_difference_squares(s_hat: torch.Tensor, t_hat: torch.Tensor, gram: bool) -> torch.Tensor:
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


def _torch_implementation(s: torch.Tensor, t: torch.Tensor, config: AffinityDistillationConfig) -> torch.Tensor:
    s_hat = normalize_nodes(s.to(COMPUTE_DTYPE), config.eps, detach_norm=False).flatten(2)
    t_hat = normalize_nodes(t.to(COMPUTE_DTYPE), config.eps, detach_norm=False).flatten(2)
    gram = choose_gram(config.algorithm, s_hat.shape[2], s_hat.shape[1], t_hat.shape[1])
    return loss_from_rows(row_difference_squares(s_hat, t_hat, gram), config)


IMPLEMENTATIONS = {"torch": _torch_implementation}


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
            :func:`fastkd.ops.pairwise_affinity.pairwise_affinity_loss`.

    Returns a 0-dim tensor, float64 for float64 inputs and float32 otherwise; gradients come back in the
    inputs' dtypes.
    """
    config = AffinityDistillationConfig.make(eps, reduction, algorithm)
    v.check_student_teacher(s, t, OP)
    return dispatch(OP, IMPLEMENTATIONS, backend, s, t, config)
