"""fastkd: knowledge-distillation losses for dense prediction, with memory-light kernels.

Every loss is an ``nn.Module`` here and a function in :mod:`fastkd.functional`; :mod:`fastkd.reference`
holds their literal float64 definitions. ``backend="auto" | "torch" | "triton" | "cuda" | "cpp"`` selects
the implementation of the memory-heavy ops.
"""

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
from fastkd import functional, reference
from fastkd import triton_kernels  # noqa: F401  (adds the triton backend to the ops' tables where triton imports)
from fastkd import cuda_kernels  # noqa: F401  (adds the cuda backend where fastkd._C is loaded)
from fastkd import cpp_kernels  # noqa: F401  (adds the cpp backend where fastkd._C is loaded)

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
    "functional",
    "reference",
    "BACKENDS",
    "BackendUnavailableError",
    "build_info",
]
