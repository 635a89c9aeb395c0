"""The student's objective: the task loss plus any mix of fastkd's distillation terms, with the papers' weights.

Terms (names used by ``--losses``):

    ce           cross-entropy on the labelled images (the task loss)
    pixel        PixelwiseKDLoss on logits                       x 10   Liu et al. eq. 4 (lambda_1)
    pairwise     PairwiseAffinityLoss on features                x 10   Liu et al. eq. 4 (lambda_1)
    holistic     holistic_g_loss, WGAN-GP critic trained alternately  x 0.1  Liu et al. eq. 4 (lambda_2)
    probability  ProbabilityLoss on logits                       x 4    Xie et al. eq. 2 (alpha)
    consistency  ConsistencyLoss on logits                       x 0.4  Xie et al. eq. 2 (beta)
    adaptation   AdaptationLoss(C_f(phi_s), E(phi_t))            x 50   He et al. (beta), eq. 2
    affinity     AffinityDistillationLoss(C_f(phi_s), E(phi_t))  x 1    He et al. (gamma), eqs. 3-4
    unlabelled   cross-entropy on the teacher's pseudo-labels of unlabelled images  x lambda = 0.5
                 (Xie et al. eq. 3, lambda in 0.1..1; confidence threshold 0.7)

The distillation terms need no labels: with ``distill_on="all"`` they are computed on the labelled and the
unlabelled images of the step, with ``"labelled"`` on the labelled images only (the papers' setting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastkd
from kdtrain.data import IGNORE_INDEX

TERMS = ("ce", "pixel", "pairwise", "holistic", "probability", "consistency", "adaptation", "affinity",
         "unlabelled")
PAPER_WEIGHTS = {"ce": 1.0, "pixel": 10.0, "pairwise": 10.0, "holistic": 0.1, "probability": 4.0,
                 "consistency": 0.4, "adaptation": 50.0, "affinity": 1.0, "unlabelled": 0.5}
TEACHER_TERMS = frozenset(TERMS) - {"ce"}
ADAPTATION_TERMS = frozenset({"adaptation", "affinity"})


@dataclass
class DistillConfig:
    terms: tuple
    weights: dict
    temperature: float = 1.0
    pairwise_patch: int = 1
    pairwise_window: int | None = None
    pairwise_pool: str = "avg"
    pseudo_threshold: float = 0.7
    distill_on: str = "all"

    @property
    def needs_unlabelled(self) -> bool:
        """Whether a step draws unlabelled images: for pseudo-labels, or to distil on them."""
        return "unlabelled" in self.terms or (self.distill_on == "all" and bool(TEACHER_TERMS & set(self.terms)))


class StudentObjective:
    """Computes the weighted terms of one student step; ``models`` holds teacher, adapter, autoencoder, critic."""

    def __init__(self, config: DistillConfig):
        self.config = config
        self.pixel = fastkd.PixelwiseKDLoss(temperature=config.temperature)
        self.probability = fastkd.ProbabilityLoss()
        self.consistency = fastkd.ConsistencyLoss()
        self.pairwise = fastkd.PairwiseAffinityLoss(patch=config.pairwise_patch, window=config.pairwise_window,
                                                    pool=config.pairwise_pool)
        self.adaptation = fastkd.AdaptationLoss()
        self.affinity = fastkd.AffinityDistillationLoss()

    def __call__(self, images, labels, labelled_count, s_logits, s_features, teacher_out, adapter=None,
                 autoencoder=None, critic=None):
        """The weighted terms {name: 0-dim tensor}; ``images`` = labelled images then unlabelled ones."""
        c, w = self.config, self.config.weights
        terms = {}
        n = labelled_count if c.distill_on == "labelled" else images.shape[0]
        if "ce" in c.terms:
            terms["ce"] = F.cross_entropy(s_logits[:labelled_count], labels, ignore_index=IGNORE_INDEX)
        if teacher_out is None:
            return {name: w[name] * value for name, value in terms.items()}
        t_logits, t_features = teacher_out
        if "unlabelled" in c.terms:  # Xie et al. eq. 3: L_labelled + lambda L_unlabelled
            pseudo = fastkd.pseudo_labels(t_logits[labelled_count:], c.pseudo_threshold, IGNORE_INDEX)
            unlabelled_ce = F.cross_entropy(s_logits[labelled_count:], pseudo, ignore_index=IGNORE_INDEX,
                                            reduction="sum")
            # mean over the confident pixels; 0 (with a gradient) when the teacher is confident nowhere
            terms["unlabelled"] = unlabelled_ce / (pseudo != IGNORE_INDEX).sum().clamp(min=1)
        if "pixel" in c.terms:
            terms["pixel"] = self.pixel(s_logits[:n], t_logits[:n])
        if "probability" in c.terms:
            terms["probability"] = self.probability(s_logits[:n], t_logits[:n])
        if "consistency" in c.terms:
            terms["consistency"] = self.consistency(s_logits[:n], t_logits[:n])
        if "pairwise" in c.terms:
            terms["pairwise"] = self.pairwise(s_features[:n], t_features[:n])
        if ADAPTATION_TERMS & set(c.terms):
            with torch.no_grad():
                code = autoencoder.encode(t_features[:n])
            # He et al. compare C_f(phi_s) with the code E(phi_t); the code is coarser (stride-2 encoder), so
            # the student features are average-pooled to the code's grid before the adapter.
            adapted = adapter(F.adaptive_avg_pool2d(s_features[:n], code.shape[2:]))
            if "adaptation" in c.terms:
                terms["adaptation"] = self.adaptation(adapted, code)
            if "affinity" in c.terms:
                terms["affinity"] = self.affinity(adapted, code)
        if "holistic" in c.terms:
            terms["holistic"] = fastkd.holistic_g_loss(critic, s_logits[:n].softmax(1), images[:n])
        return {name: w[name] * value for name, value in terms.items()}

    def critic_loss(self, critic, images, s_logits, t_logits, labelled_count):
        """WGAN-GP loss of the critic (Liu et al. eq. 3): teacher maps are real, student maps fake."""
        n = labelled_count if self.config.distill_on == "labelled" else images.shape[0]
        return fastkd.holistic_d_loss(critic, s_logits[:n].detach().softmax(1), t_logits[:n].softmax(1),
                                      images[:n])
