"""fastkd: knowledge-distillation losses for dense prediction, with memory-light kernels.

Every loss is an ``nn.Module`` here and a function in :mod:`fastkd.functional`; :mod:`fastkd.reference`
holds their literal float64 definitions. ``backend="auto" | "torch" | "triton" | "cuda" | "cpp"`` selects
the implementation of the memory-heavy ops; :mod:`fastkd._backends` is the registry of which backends
implement which op, and ``fastkd/ops/<op>/`` holds each op's implementations.
"""

from fastkd import _backends
from fastkd._backends import BACKENDS, BackendUnavailableError
from fastkd._extension import build_info
from fastkd.adaptation import AdaptationLoss, FeatureAdapter, FeatureAutoencoder
from fastkd.holistic import HolisticDiscriminator, holistic_d_loss, holistic_g_loss
from fastkd.losses import (
    AffinityDistillationLoss,
    ConsistencyLoss,
    PairwiseAffinityLoss,
    PixelwiseKDLoss,
    ProbabilityLoss,
)
from fastkd.unlabelled import pseudo_labels
from fastkd.weighting import magnitude_weights, weighted_sum
from fastkd import functional, reference

_backends.load_available()  # the implementations that can run here; torch.compile cannot trace an import

__version__ = "0.1.0"

__all__ = [
    "PairwiseAffinityLoss",
    "AffinityDistillationLoss",
    "ConsistencyLoss",
    "ProbabilityLoss",
    "PixelwiseKDLoss",
    "FeatureAutoencoder",
    "FeatureAdapter",
    "AdaptationLoss",
    "HolisticDiscriminator",
    "holistic_d_loss",
    "holistic_g_loss",
    "pseudo_labels",
    "magnitude_weights",
    "weighted_sum",
    "functional",
    "reference",
    "BACKENDS",
    "BackendUnavailableError",
    "build_info",
]
