"""The student's objective: the task loss plus any mix of fastkd's distillation terms, and their weights.

Terms (names used by ``--losses``), with the papers' weights (``--weighting paper``):

    ce           cross-entropy on the labelled images (the task loss)
    pixel        PixelwiseKDLoss on logits                       x 10   Liu et al. eq. 4 (lambda_1)
    pairwise     PairwiseAffinityLoss on features                x 10   Liu et al. eq. 4 (lambda_1)
    holistic     holistic_g_loss, WGAN-GP critic trained alternately  x 0.1  Liu et al. eq. 4 (lambda_2)
    probability  ProbabilityLoss on logits                       x 4    Xie et al. eq. 2 (alpha)
    consistency  ConsistencyLoss on logits                       x 0.4  Xie et al. eq. 2 (beta)
    adaptation   AdaptationLoss(C_f(phi_s), E(phi_t))            x 50   He et al. Algorithm 1 (beta), eq. 2
    affinity     AffinityDistillationLoss(C_a(phi_s), E(phi_t))  x 1    He et al. Algorithm 1 (gamma), eqs. 3-4
    unlabelled   Xie et al. eq. 3's unlabelled objective         x lambda = 0.5 (Xie et al.: 0.1..1)

Weights. No fixed weight is portable between networks (the consistency loss grows as the fourth power of the
logits, the adaptation loss as sqrt(C)), so by default (``--weighting magnitude``) the terms of
:data:`CALIBRATED_TERMS` are weighted by Xie et al.'s rule (sec. 4.1, :func:`fastkd.magnitude_weights`):
each starts at the cross-entropy's magnitude on the first batches. ``holistic`` (a signed adversarial
score, no magnitude at the start) and ``unlabelled`` (lambda, a weight of a cross-entropy objective) keep
fixed weights.

Images. The distillation terms need no labels. With ``distill_on="labelled"`` (the papers' setting, the
default) they see the labelled images; with ``unlabelled`` on, Xie et al.'s eq. 3 adds
``lambda * (CE(pseudo-labels) + the same weighted distillation terms)`` on the unlabelled images (the
holistic critic sees the labelled images only). With ``distill_on="all"`` the distillation terms see the
labelled and the unlabelled images alike, and ``unlabelled`` adds ``lambda * CE(pseudo-labels)`` alone.
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
CALIBRATED_TERMS = frozenset({"pixel", "pairwise", "probability", "consistency", "adaptation", "affinity"})
CRITIC_LOSS_SCALE = {"paper": 1.0, "code": 0.1}  # Liu et al.'s code scales the critic's loss by 0.1


@dataclass
class DistillConfig:
    terms: tuple
    temperature: float = 1.0
    pairwise_patch: int = 1
    pairwise_window: int | None = None
    pairwise_pool: str = "avg"
    pseudo_threshold: float = 0.7
    distill_on: str = "labelled"
    critic_setup: str = "paper"

    @property
    def needs_unlabelled(self) -> bool:
        """Whether a step draws unlabelled images: for pseudo-labels, or to distil on them."""
        return "unlabelled" in self.terms or (self.distill_on == "all" and bool(TEACHER_TERMS & set(self.terms)))

    @property
    def calibrated_terms(self) -> tuple:
        return tuple(term for term in self.terms if term in CALIBRATED_TERMS)


class StudentObjective:
    """The terms of one student step; ``models`` holds the autoencoder, the adapters and the critic."""

    def __init__(self, config: DistillConfig):
        self.config = config
        self.pixel = fastkd.PixelwiseKDLoss(temperature=config.temperature)
        self.probability = fastkd.ProbabilityLoss()
        self.consistency = fastkd.ConsistencyLoss()
        self.pairwise = fastkd.PairwiseAffinityLoss(patch=config.pairwise_patch, window=config.pairwise_window,
                                                    pool=config.pairwise_pool)
        self.adaptation = fastkd.AdaptationLoss()
        self.affinity = fastkd.AffinityDistillationLoss()

    def _critic_input(self, logits: torch.Tensor, images: torch.Tensor):
        """What the critic scores: softmax maps with the image (the paper), or raw logits alone (the code)."""
        if self.config.critic_setup == "code":
            return logits, None
        return logits.softmax(1), images

    def task_loss(self, s_logits, labels) -> torch.Tensor:
        """The cross-entropy of the labelled images (the first ``len(labels)`` of the batch)."""
        return F.cross_entropy(s_logits[:labels.shape[0]], labels, ignore_index=IGNORE_INDEX)

    def distillation_terms(self, part: slice, images, student_out, teacher_out, models, holistic=True) -> dict:
        """The unweighted distillation terms of ``config.terms`` on the images ``part`` of the batch."""
        terms, c = {}, self.config
        (s_logits, s_features), (t_logits, t_features) = student_out, teacher_out
        s_logits, s_features, t_logits, t_features = (x[part] for x in (s_logits, s_features, t_logits, t_features))
        if "pixel" in c.terms:
            terms["pixel"] = self.pixel(s_logits, t_logits)
        if "probability" in c.terms:
            terms["probability"] = self.probability(s_logits, t_logits)
        if "consistency" in c.terms:
            terms["consistency"] = self.consistency(s_logits, t_logits)
        if "pairwise" in c.terms:
            terms["pairwise"] = self.pairwise(s_features, t_features)
        if ADAPTATION_TERMS & set(c.terms):
            with torch.no_grad():
                code = models["autoencoder"].encode(t_features)
            # He et al. compare the adapted student features with the code E(phi_t); the code is coarser
            # (stride-2 encoder), so the student features are average-pooled to its grid first. Each term has
            # an adapter of its own: C_f for the adaptation loss (eq. 2), C_a for the affinity loss (eq. 4).
            pooled = F.adaptive_avg_pool2d(s_features, code.shape[2:])
            if "adaptation" in c.terms:
                terms["adaptation"] = self.adaptation(models["adapter"](pooled), code)
            if "affinity" in c.terms:
                terms["affinity"] = self.affinity(models["affinity_adapter"](pooled), code)
        if holistic and "holistic" in c.terms:
            terms["holistic"] = fastkd.holistic_g_loss(models["critic"], *self._critic_input(s_logits, images[part]))
        return terms

    def _distilled_part(self, labelled_count: int) -> slice:
        return slice(None) if self.config.distill_on == "all" else slice(0, labelled_count)

    def __call__(self, images, labels, student_out, teacher_out, models, weights):
        """``(total, {name: weighted term})`` of one step; ``images`` = the labelled images, then unlabelled."""
        c, labelled_count = self.config, labels.shape[0]
        terms = {"ce": self.task_loss(student_out[0], labels)} if "ce" in c.terms else {}
        if teacher_out is not None:
            terms.update(self.distillation_terms(self._distilled_part(labelled_count), images, student_out,
                                                 teacher_out, models))
        total, weighted = fastkd.weighted_sum(terms, weights)
        if "unlabelled" in c.terms:
            unlabelled = slice(labelled_count, None)
            pseudo = fastkd.pseudo_labels(teacher_out[0][unlabelled], c.pseudo_threshold, IGNORE_INDEX)
            pseudo_ce = F.cross_entropy(student_out[0][unlabelled], pseudo, ignore_index=IGNORE_INDEX,
                                        reduction="sum")
            # mean over the confident pixels; 0 (with a gradient) when the teacher is confident nowhere
            objective = {"ce": pseudo_ce / (pseudo != IGNORE_INDEX).sum().clamp(min=1)}
            if c.distill_on == "labelled":  # Xie et al. eq. 3: lambda (CE + alpha L_p + beta L_c) unlabelled
                objective.update(self.distillation_terms(unlabelled, images, student_out, teacher_out, models,
                                                         holistic=False))
            weighted["unlabelled"] = weights["unlabelled"] * fastkd.weighted_sum(objective, weights)[0]
            total = total + weighted["unlabelled"]
        return total, weighted

    def calibration_terms(self, images, labels, student_out, teacher_out, models) -> tuple:
        """``(cross-entropy, {term: value})``, unweighted, of the terms the magnitude rule weights."""
        terms = self.distillation_terms(self._distilled_part(labels.shape[0]), images, student_out, teacher_out,
                                        models, holistic=False)
        return self.task_loss(student_out[0], labels), {name: terms[name] for name in self.config.calibrated_terms}

    def critic_loss(self, critic, images, s_logits, t_logits, labelled_count):
        """WGAN-GP loss of the critic (Liu et al. eq. 3): teacher maps are real, student maps fake."""
        part = self._distilled_part(labelled_count)
        fake, image = self._critic_input(s_logits[part].detach(), images[part])
        real, _ = self._critic_input(t_logits[part], images[part])
        return CRITIC_LOSS_SCALE[self.config.critic_setup] * fastkd.holistic_d_loss(critic, fake, real, image)
