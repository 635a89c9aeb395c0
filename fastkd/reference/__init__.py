"""Literal float64 definitions of every fastkd loss: materialised matrices, loops where clearer.

The oracle for the tests and the accuracy column of the benchmarks. Not fast; obviously correct. Each
function takes the same arguments as its counterpart in :mod:`fastkd.functional` (less ``backend``) and
returns a float64 result.
"""

from fastkd.reference.affinity import affinity_distillation_loss, pairwise_affinity_loss
from fastkd.reference.consistency import consistency_loss
from fastkd.reference.probability import pixelwise_kd_loss, probability_loss
from fastkd.reference.adaptation import adaptation_loss, autoencoder_loss
from fastkd.reference.holistic import gradient_penalty, holistic_d_loss, holistic_g_loss
from fastkd.reference.unlabelled import pseudo_labels

__all__ = [
    "pairwise_affinity_loss",
    "affinity_distillation_loss",
    "consistency_loss",
    "probability_loss",
    "pixelwise_kd_loss",
    "adaptation_loss",
    "autoencoder_loss",
    "gradient_penalty",
    "holistic_d_loss",
    "holistic_g_loss",
    "pseudo_labels",
]
