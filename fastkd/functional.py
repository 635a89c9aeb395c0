"""Every fastkd loss as a function. The formulas, signatures and refused inputs are FORMULAS.md's."""

from fastkd.ops.affinity_distillation_loss import affinity_distillation_loss
from fastkd.ops.consistency_loss import consistency_loss
from fastkd.ops.pairwise_affinity_loss import pairwise_affinity_loss
from fastkd.ops.pixelwise_kd_loss import pixelwise_kd_loss
from fastkd.ops.probability_loss import probability_loss
from fastkd.adaptation import adaptation_loss
from fastkd.holistic import holistic_d_loss, holistic_g_loss
from fastkd.unlabelled import pseudo_labels

__all__ = [
    "pairwise_affinity_loss",
    "affinity_distillation_loss",
    "consistency_loss",
    "probability_loss",
    "pixelwise_kd_loss",
    "adaptation_loss",
    "holistic_d_loss",
    "holistic_g_loss",
    "pseudo_labels",
]
