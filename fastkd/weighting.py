"""Weighting distillation terms against the task loss.

No fixed weight is portable between networks: the consistency loss grows as the fourth power of the logits'
scale, the adaptation loss as ``sqrt(C)``, the pair-wise loss with the features' correlation. Xie et al.
(sec. 4.1) state the rule instead: choose the weights so that every term is "on the same order of
magnitude" as the cross-entropy. :func:`magnitude_weights` applies it to values measured on the first
batches of a run; :func:`weighted_sum` combines the terms of a step with whatever weights were chosen.

    ce, terms = measure_first_batches()            # {name: [value per batch]} from your own loop
    weights = fastkd.magnitude_weights(ce, terms)  # each term starts at the cross-entropy's magnitude
    total, weighted = fastkd.weighted_sum({"ce": ce_now, **terms_now}, {"ce": 1.0, **weights})
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence, Tuple, Union

import torch

from fastkd._validation import check_positive_float, is_real

Measurement = Union[float, torch.Tensor, Sequence[Union[float, torch.Tensor]]]


def _mean(values: Measurement, name: str, where: str) -> Tuple[float, int]:
    """The mean of a number, a 0-dim tensor or a sequence of them, and how many values it had."""
    if isinstance(values, torch.Tensor):
        values = values.detach().reshape(-1).tolist()
    elif is_real(values):
        values = [values]
    elif isinstance(values, Sequence) and not isinstance(values, str):
        values = [v.detach().item() if isinstance(v, torch.Tensor) else v for v in values]
    else:
        raise TypeError(f"{where}: `{name}` must be a number, a tensor or a sequence of numbers, got {values!r}")
    if not values or not all(is_real(v) for v in values):
        raise TypeError(f"{where}: `{name}` must hold at least one real number, got {values!r}")
    mean = math.fsum(values) / len(values)
    if not (math.isfinite(mean) and mean > 0):
        raise ValueError(f"{where}: `{name}` has mean {mean} over its {len(values)} value(s): a weight by "
                         f"magnitude needs a finite mean > 0 (give this term a fixed weight instead)")
    return mean, len(values)


def magnitude_weights(task_loss: Measurement, terms: Mapping[str, Measurement], *,
                      ratio: float = 1.0) -> Dict[str, float]:
    """Xie et al.'s rule (sec. 4.1): ``w_k = ratio * mean(task_loss) / mean(term_k)``.

    ``task_loss`` and every value of ``terms`` hold the unweighted values measured on the same calibration
    batches (a number, a 0-dim tensor, or one per batch; all of the same length), typically the first few
    batches of the run with the student at its initial weights. With the returned weights every term starts
    at ``ratio`` times the task loss. Terms whose value has no meaningful magnitude at the start (a signed
    adversarial score such as :func:`fastkd.holistic_g_loss`) or that already are a cross-entropy
    (pseudo-labels) keep fixed weights. Raises ``ValueError`` naming a term whose mean is not finite and > 0.
    """
    where = "magnitude_weights"
    ratio = check_positive_float(ratio, "ratio", where)
    if not isinstance(terms, Mapping) or not terms:
        raise TypeError(f"{where}: `terms` must be a non-empty mapping {{name: values}}, got {terms!r}")
    reference, count = _mean(task_loss, "task_loss", where)
    weights = {}
    for name, values in terms.items():
        mean, term_count = _mean(values, f"terms[{name!r}]", where)
        if term_count != count:
            raise ValueError(f"{where}: `terms[{name!r}]` has {term_count} value(s) but `task_loss` has {count}; "
                             f"measure them on the same batches")
        weights[name] = ratio * reference / mean
    return weights


def weighted_sum(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``(sum_k w_k * term_k, {name: w_k * term_k})``, summed in the order of ``terms``.

    Every term needs a weight (``ValueError`` naming the ones without); weights of absent terms are ignored,
    so one table of weights serves every step whatever terms it computes.
    """
    missing = [name for name in terms if name not in weights]
    if missing:
        raise ValueError(f"weighted_sum: no weight for {', '.join(map(repr, missing))}")
    if not terms:
        raise ValueError("weighted_sum: `terms` is empty")
    weighted = {name: weights[name] * value for name, value in terms.items()}
    return sum(weighted.values()), weighted
