"""Evaluation (mIoU, pixel accuracy), the loss-curve and prediction pictures, and the ablation table."""

from __future__ import annotations

import math
import statistics

import numpy as np
import torch
import torch.nn.functional as F

from kdtrain.data import IGNORE_INDEX, denormalise


def _tile_starts(length: int, crop_size: int, stride: int) -> list:
    """Starts of the windows covering ``length``: every ``stride``, the last one against the border."""
    return list(range(0, length - crop_size, stride)) + [length - crop_size]


def sliding_window(model, images: torch.Tensor, crop_size: int) -> torch.Tensor:
    """Class probabilities (B, classes, H, W) of images (B, 3, H, W) from ``crop_size`` x ``crop_size`` tiles.

    The tiles step by about 2/3 of the crop, the last one aligned to the border; the softmax of the tiles
    that overlap a pixel are averaged. An image smaller than the crop in a dimension is padded there with 0
    (the mean colour of a normalised image) and the padding cut off the result.
    """
    height, width = images.shape[2:]
    padded = F.pad(images, (0, max(crop_size - width, 0), 0, max(crop_size - height, 0)))
    stride = math.ceil(2 * crop_size / 3)
    total = coverage = None
    for top in _tile_starts(padded.shape[2], crop_size, stride):
        for left in _tile_starts(padded.shape[3], crop_size, stride):
            window = (..., slice(top, top + crop_size), slice(left, left + crop_size))
            probabilities = model(padded[window])[0].softmax(1)
            if total is None:
                total = padded.new_zeros(padded.shape[0], probabilities.shape[1], *padded.shape[2:])
                coverage = padded.new_zeros(padded.shape[2:])
            total[window] += probabilities
            coverage[window] += 1
    return (total / coverage)[..., :height, :width]


def predict(model, images: torch.Tensor, crop_size: int | None = None) -> torch.Tensor:
    """The predicted classes (B, H, W) of images (B, 3, H, W) of one size, at that size.

    The whole images in one pass, or, where they are larger than ``crop_size`` in either dimension, the
    argmax of the :func:`sliding_window` probabilities.
    """
    height, width = images.shape[2:]
    if crop_size is None or (height <= crop_size and width <= crop_size):
        return model(images)[0].argmax(1)
    return sliding_window(model, images, crop_size).argmax(1)


def _same_size_batches(dataset, indices: list, batch_size: int):
    """(images, labels) of the images ``indices`` in turn, in batches of at most ``batch_size`` of one size."""
    batch = []
    for index in indices:
        sample = dataset[index]
        if batch and (len(batch) == batch_size or sample[0].shape != batch[0][0].shape):
            yield tuple(torch.stack(parts) for parts in zip(*batch))
            batch = []
        batch.append(sample)
    if batch:
        yield tuple(torch.stack(parts) for parts in zip(*batch))


@torch.no_grad()
def evaluate(model, dataset, num_classes: int, distributed, batch_size: int, crop_size: int | None = None) -> dict:
    """mIoU (mean over the classes present in the labels or the predictions) and pixel accuracy.

    Every image is scored at its own size (:func:`predict`; consecutive images of one size in batches of
    ``batch_size``): whole, or with a sliding window of ``crop_size`` tiles where larger than that.
    ``crop_size`` None takes the dataset's ``crop_size`` attribute (None for the shapes: whole images).
    Every rank scores its share of the images; the confusion matrices are summed over the ranks.
    """
    crop_size = getattr(dataset, "crop_size", None) if crop_size is None else crop_size
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=distributed.device)
    indices = list(range(distributed.rank, len(dataset), distributed.world_size))
    for images, labels in _same_size_batches(dataset, indices, batch_size):
        images, labels = images.to(distributed.device), labels.to(distributed.device)
        predictions = predict(model, images, crop_size)
        counted = labels != IGNORE_INDEX
        pairs = labels[counted] * num_classes + predictions[counted]
        confusion += torch.bincount(pairs, minlength=num_classes**2).view(num_classes, num_classes).double()
    model.train(was_training)
    confusion = distributed.sum(confusion)
    true_positives = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positives
    iou = true_positives[union > 0] / union[union > 0]
    return {"miou": iou.mean().item(), "pixel_accuracy": (true_positives.sum() / confusion.sum()).item(),
            "iou_per_class": (true_positives / union.clamp(min=1)).tolist()}


def _pyplot():
    """matplotlib's pyplot with a file backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no pictures written (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: dict, path) -> None:
    """One panel per stage, one curve per loss term (weighted, as optimised), log scale where positive."""
    plt = _pyplot()
    stages = [stage for stage, steps in history.items() if steps]
    if plt is None or not stages:
        return
    figure, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    for axis, stage in zip(axes[0], stages):
        for name in history[stage][0]:
            axis.plot([terms[name] for terms in history[stage]], label=name, linewidth=1)
        if all(v > 0 for terms in history[stage] for v in terms.values()):
            axis.set_yscale("log")
        axis.set(title=stage, xlabel="step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@torch.no_grad()
def plot_predictions(dataset, models: dict, path, device, count: int = 4, crop_size: int | None = None) -> None:
    """Rows of validation images: the image, the ground truth, then each model's prediction.

    Each image is predicted alone (:func:`predict`, ``crop_size`` None taking the dataset's), so the images
    may differ in size; a normalised image is shown un-normalised, ignored pixels of the ground truth blank.
    """
    plt = _pyplot()
    if plt is None:
        return
    crop_size = getattr(dataset, "crop_size", None) if crop_size is None else crop_size
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    shown = [denormalise(image) if dataset.normalised else image for image, _ in samples]
    maps = {"ground truth": [label for _, label in samples]}
    for name, model in models.items():
        was_training = model.training
        model.eval()
        maps[name] = [predict(model, image[None].to(device), crop_size)[0].cpu() for image, _ in samples]
        model.train(was_training)
    aspect = max(image.shape[2] / image.shape[1] for image in shown)
    figure, axes = plt.subplots(len(shown), 1 + len(maps), figsize=(2 * aspect * (1 + len(maps)), 2 * len(shown)),
                                squeeze=False)
    for row, image in enumerate(shown):
        axes[row][0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        for axis, classes in zip(axes[row][1:], maps.values()):
            axis.imshow(np.ma.masked_equal(classes[row].numpy(), IGNORE_INDEX), cmap="tab20", vmin=0,
                        vmax=dataset.num_classes - 1, interpolation="nearest")
        for axis, title in zip(axes[row], ["image", *maps]):
            axis.set_axis_off()
            if row == 0:
                axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def ablation_table(rows: list, results: dict, teacher_miou: float, seeds: list) -> str:
    """Markdown: one row per configuration, mIoU mean +- std over the seeds, and the gain over row 0."""
    lines = [f"| student | mIoU (%), mean +- std over seeds {', '.join(map(str, seeds))} | gain over student alone |",
             "|---|---|---|"]
    baseline = statistics.mean(100 * v for v in results[rows[0][0]])
    for label, _ in rows:
        values = [100 * v for v in results[label]]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        gain = statistics.mean(values) - baseline
        lines.append(f"| {label} | {statistics.mean(values):.1f} +- {spread:.1f} | {gain:+.1f} |")
    lines.append(f"| (teacher) | {100 * teacher_miou:.1f} | |")
    return "\n".join(lines) + "\n"
