"""Evaluation (mIoU, pixel accuracy), the loss-curve and prediction pictures, and the ablation table."""

from __future__ import annotations

import statistics

import torch

from kdtrain.data import IGNORE_INDEX


@torch.no_grad()
def evaluate(model, dataset, num_classes: int, distributed, batch_size: int) -> dict:
    """mIoU (mean over the classes present in the labels or the predictions) and pixel accuracy.

    Every rank scores its share of the images; the confusion matrices are summed over the ranks.
    """
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=distributed.device)
    indices = list(range(distributed.rank, len(dataset), distributed.world_size))
    for start in range(0, len(indices), batch_size):
        images, labels = zip(*(dataset[i] for i in indices[start:start + batch_size]))
        images, labels = torch.stack(images).to(distributed.device), torch.stack(labels).to(distributed.device)
        predictions = model(images)[0].argmax(1)
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
def plot_predictions(dataset, models: dict, path, device, count: int = 4) -> None:
    """Rows of validation images: the image, the ground truth, then each model's prediction."""
    plt = _pyplot()
    if plt is None:
        return
    images, labels = zip(*(dataset[i] for i in range(min(count, len(dataset)))))
    images = torch.stack(images)
    columns = {"image": None, "ground truth": torch.stack(labels)}
    for name, model in models.items():
        was_training = model.training
        model.eval()
        columns[name] = model(images.to(device))[0].argmax(1).cpu()
        model.train(was_training)
    figure, axes = plt.subplots(len(images), len(columns), figsize=(2 * len(columns), 2 * len(images)),
                                squeeze=False)
    classes = max(int(c.max()) for c in columns.values() if c is not None and c.numel())
    for row, image in enumerate(images):
        for axis, (title, maps) in zip(axes[row], columns.items()):
            if maps is None:
                axis.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            else:
                axis.imshow(maps[row].numpy(), cmap="tab20", vmin=0, vmax=max(classes, 1), interpolation="nearest")
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
