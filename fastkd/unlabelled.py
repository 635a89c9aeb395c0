"""Pseudo-labels for unlabelled images (Xie et al., 2018, "Improving Fast Segmentation With Teacher-student
Learning", sec. 3.2 and the implementation details of sec. 4.1). FORMULAS.md section 8 is the contract."""

from __future__ import annotations

import torch

from fastkd._validation import is_int, check_float_tensor, check_probability


@torch.no_grad()
def pseudo_labels(t_logits: torch.Tensor, threshold: float = 0.7, ignore_index: int = 255) -> torch.Tensor:
    """Hard labels from the teacher's logits, with unconfident pixels ignored.

    ``t_logits`` (B, C, H, W) -> labels (B, H, W), ``torch.long``: at each pixel the argmax class (the
    first one on ties) where ``max_c softmax(t_logits)_c >= threshold``, else ``ignore_index``. The softmax
    runs over channels in float32 or better; a pixel whose softmax is NaN (a NaN or +Inf logit) gets
    ``ignore_index``. ``threshold`` is a real in [0, 1]; 0.7 is the paper's value (its implementation
    details, sec. 4.1: "pixels will not be annotated if their corresponding class likelihood is less
    confident than 0.7"), so a confidence equal to the threshold is kept. ``ignore_index`` is an int
    outside [0, C), so that an ignored pixel cannot be mistaken for a class. Runs without autograd; the
    result does not require grad. Train on unlabelled images with ``L = L_labelled + lambda *
    L_unlabelled`` (eq. 3, lambda 0.1 to 1), e.g. ``cross_entropy(s_logits, labels,
    ignore_index=ignore_index)`` as the task term of ``L_unlabelled``.
    """
    where = "pseudo_labels"
    check_float_tensor(t_logits, "t_logits", where, 4, "(B, C, H, W)")
    classes = t_logits.shape[1]
    if classes == 0:
        raise ValueError(f"{where}: `t_logits` has no channels (classes), got shape {tuple(t_logits.shape)}")
    threshold = check_probability(threshold, "threshold", where)
    if not is_int(ignore_index):
        raise TypeError(f"{where}: `ignore_index` must be an int, got {ignore_index!r}")
    if 0 <= ignore_index < classes:
        raise ValueError(
            f"{where}: `ignore_index`={ignore_index} is a valid class index for C={classes} classes, so "
            f"ignored pixels could not be told from class {ignore_index}; choose a value outside "
            f"[0, {classes}), e.g. 255 or -1"
        )
    acc = torch.promote_types(t_logits.dtype, torch.float32)
    logits = t_logits.to(acc)
    confidence = torch.softmax(logits, dim=1).amax(dim=1)
    labels = logits.argmax(dim=1)
    # The comparison runs in `acc`: round the threshold up, not to nearest, so that it stays exact.
    bound = torch.tensor(threshold, dtype=acc)
    if bound.item() < threshold:
        bound = torch.nextafter(bound, torch.ones_like(bound))
    return torch.where(confidence >= bound.item(), labels, torch.full_like(labels, ignore_index))
