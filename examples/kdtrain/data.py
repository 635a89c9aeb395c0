"""Data: an embedded procedural segmentation dataset (no download) and a loader for real dataset folders.

Every split is indexable (``dataset[i] -> (image (3, H, W) float, label (H, W) long)``); batches are drawn by
:class:`BatchStream`, whose batch at step k is a pure function of (seed, k), so that a resumed run sees
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
SHAPES_CLASSES = ("background", "disk", "square", "triangle", "ring")
STRIPE_PERIODS = (None, 3.0, 4.5, 6.0, 8.0)  # each shape class has its own stripe period


class ShapesDataset(torch.utils.data.Dataset):
    """Procedural images of 1-3 shapes (disk, square, triangle, ring) on a textured background.

    The class of a pixel is the shape that covers it; every class has its own stripe period (in a random
    orientation and colour), so texture and geometry both tell the classes apart, and the background is a
    smooth gradient. Image ``i`` of a split is generated from its own seed
    ``(seed, split, i)``: splits never share images and every image can be regenerated on its own.
    """

    def __init__(self, size: int, count: int, split: str, seed: int = 0):
        self.size, self.count = size, count
        self.split_offset = {"train": 0, "unlabelled": 1, "val": 2}[split]
        self.seed = seed
        self.num_classes = len(SHAPES_CLASSES)
        self.images, self.labels = zip(*(self._generate(i) for i in range(count))) if count else ((), ())

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]

    def _generate(self, index: int):
        g = torch.Generator().manual_seed((self.seed * 3 + self.split_offset) * 1_000_003 + index)
        n = self.size
        y, x = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32),
                              indexing="ij")
        # background: a smooth colour gradient, no stripes
        ramp = (x * float(torch.randn((), generator=g)) + y * float(torch.randn((), generator=g))) / (4 * n)
        image = (0.5 + ramp) * torch.rand(3, 1, 1, generator=g) + 0.25 * torch.rand(3, 1, 1, generator=g)
        label = torch.zeros(n, n, dtype=torch.long)
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            cls = int(torch.randint(1, self.num_classes, (), generator=g))
            cx, cy = (torch.rand(2, generator=g) * n).tolist()
            radius = float(n * (0.18 + 0.14 * torch.rand((), generator=g)))
            angle = float(torch.rand((), generator=g)) * 2 * math.pi
            mask = _shape_mask(cls, x - cx, y - cy, radius, angle)
            texture = _stripes(x, y, g, period=STRIPE_PERIODS[cls])
            image = torch.where(mask, texture * torch.rand(3, 1, 1, generator=g), image)
            label[mask] = cls
        image = image + 0.1 * torch.randn(3, n, n, generator=g)
        return image.clamp(0, 1), label


def _stripes(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, period: float) -> torch.Tensor:
    """A stripe texture in [0.5, 1] of the given period (pixels), in a random orientation."""
    angle = float(torch.rand((), generator=g)) * math.pi
    phase = (x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period
    return 0.75 + 0.25 * torch.sin(phase)


def _shape_mask(cls: int, dx: torch.Tensor, dy: torch.Tensor, radius: float, angle: float) -> torch.Tensor:
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    r = torch.sqrt(u * u + v * v)
    if cls == 1:
        return r <= radius
    if cls == 2:
        return (u.abs() <= 0.8 * radius) & (v.abs() <= 0.8 * radius)
    if cls == 3:  # inside the three half-planes of an equilateral triangle of circumradius `radius`
        edges = [(math.cos(a), math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
        return torch.stack([u * ex + v * ey <= radius / 2 for ex, ey in edges]).all(0)
    return (r <= radius) & (r >= 0.55 * radius)


class SegmentationFolder(torch.utils.data.Dataset):
    """A real dataset on disk, laid out like Pascal VOC or Cityscapes, resized to ``size`` x ``size``.

    ``layout="voc"``: ``root/JPEGImages/<id>.jpg``, ``root/SegmentationClass/<id>.png`` (palette indices,
    255 = ignore), ids listed in ``root/ImageSets/Segmentation/<split>.txt``; 21 classes.
    ``layout="cityscapes"``: ``root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
    ``root/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png`` (made by cityscapesscripts'
    createTrainIdLabelImgs); 19 classes. Splits: "train", "val"; the "unlabelled" split is the train images
    without their labels (point ``--unlabelled-root`` elsewhere in the CLI for extra images).
    """

    LAYOUTS = {"voc": 21, "cityscapes": 19}

    def __init__(self, root: str, layout: str, split: str, size: int):
        from PIL import Image  # noqa: F401  (fail here, not in the middle of training, without Pillow)

        self.root, self.size = Path(root), size
        self.num_classes = self.LAYOUTS[layout]
        folder_split = "train" if split == "unlabelled" else split
        if layout == "voc":
            ids = (self.root / "ImageSets" / "Segmentation" / f"{folder_split}.txt").read_text().split()
            self.pairs = [(self.root / "JPEGImages" / f"{i}.jpg", self.root / "SegmentationClass" / f"{i}.png")
                          for i in ids]
        else:
            images = sorted((self.root / "leftImg8bit" / folder_split).glob("*/*_leftImg8bit.png"))
            self.pairs = [(p, self.root / "gtFine" / folder_split / p.parent.name /
                           p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")) for p in images]
        if not self.pairs:
            raise FileNotFoundError(f"no {layout} images for split {folder_split!r} under {self.root}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        from PIL import Image

        image_path, label_path = self.pairs[index]
        with Image.open(image_path) as im:
            image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float().div(255)
        with Image.open(label_path) as im:  # palette or grey-level PNG: the pixel values are the class ids
            label = torch.from_numpy(np.array(im)).long()
        image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=(self.size, self.size), mode="nearest")[0, 0]
        return image, label.long()


class BatchStream:
    """Shuffled batches of a dataset for one rank; the batch at ``step`` is a function of (seed, step) alone.

    Epoch e visits the dataset in the order ``randperm(len, seed + e)``; the global batch of ``batch_size``
    images is split between the ``world_size`` ranks (rank r takes every world_size-th image). Random
    horizontal flips (``augment``) also come from (seed, step). No state to save: the step is the position.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 augment: bool = True):
        if len(dataset) < batch_size:
            raise ValueError(f"a batch of {batch_size} needs at least as many images, the dataset has {len(dataset)}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.augment = rank, world_size, augment
        self.batches_per_epoch = len(dataset) // batch_size

    def batch(self, step: int):
        epoch, position = divmod(step, self.batches_per_epoch)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
        indices = order[position * self.batch_size:(position + 1) * self.batch_size][self.rank::self.world_size]
        images, labels = zip(*(self.dataset[int(i)] for i in indices))
        images, labels = torch.stack(images), torch.stack(labels)
        if self.augment:
            g = torch.Generator().manual_seed(self.seed * 7_919 + step)
            flip = (torch.rand(self.batch_size, generator=g) < 0.5)[self.rank::self.world_size]
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            labels = torch.where(flip[:, None, None], labels.flip(-1), labels)
        return images, labels


def build_datasets(args):
    """(teacher_train, student_train, unlabelled, val, num_classes) from the CLI arguments."""
    if args.data == "shapes":
        teacher_train = ShapesDataset(args.image_size, args.teacher_images, "train", args.data_seed)
        student_train = torch.utils.data.Subset(teacher_train, range(args.labelled_images))
        unlabelled = ShapesDataset(args.image_size, args.unlabelled_images, "unlabelled", args.data_seed)
        val = ShapesDataset(args.image_size, args.val_images, "val", args.data_seed)
        return teacher_train, student_train, unlabelled, val, teacher_train.num_classes
    teacher_train = SegmentationFolder(args.data_root, args.data, "train", args.image_size)
    student_train = torch.utils.data.Subset(teacher_train, range(min(args.labelled_images, len(teacher_train))))
    unlabelled = SegmentationFolder(args.data_root, args.data, "unlabelled", args.image_size)
    val = SegmentationFolder(args.data_root, args.data, "val", args.image_size)
    return teacher_train, student_train, unlabelled, val, teacher_train.num_classes
