"""Data: an embedded procedural segmentation dataset (no download) and a loader for real dataset folders.

Every split is indexable (``dataset[i] -> (image (3, H, W) float, label (H, W) long)``); batches are drawn by
:class:`BatchStream`, whose batch at step k is a pure function of (seed, k), so that a resumed run sees
exactly the batches an uninterrupted run would have seen. The shapes are square images of one size, in
[0, 1], augmented by flips; folder images keep their own size and aspect, are normalised with ImageNet's
mean and std, and train on random crops of random rescalings (``crop_size``, ``scale_range``).
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
# the shapes' sizes and counts where the command line leaves them at None
SHAPES_DEFAULTS = {"image_size": 32, "teacher_images": 512, "labelled_images": 24, "unlabelled_images": 512,
                   "val_images": 256}
CROP_SIZE, SCALE_RANGE = 512, (0.5, 2.0)  # folders' training crops and random scales (the papers' values)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # folder images are normalised so


class ShapesDataset(torch.utils.data.Dataset):
    """Procedural images of 1-3 shapes (disk, square, triangle, ring) on a textured background.

    The class of a pixel is the shape that covers it; every class has its own stripe period (in a random
    orientation and colour), so texture and geometry both tell the classes apart, and the background is a
    smooth gradient. Image ``i`` of a split is generated from its own seed
    ``(seed, split, i)``: splits never share images and every image can be regenerated on its own.
    """

    crop_size = scale_range = None  # whole images of one size: flips only, no scale or crop
    normalised = False

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


def _imagenet_statistics(like: torch.Tensor):
    """ImageNet's per-channel mean and std, (3, 1, 1) each, in the dtype and on the device of ``like``."""
    return (torch.tensor(values, dtype=like.dtype, device=like.device).view(3, 1, 1)
            for values in (IMAGENET_MEAN, IMAGENET_STD))


def normalise(image: torch.Tensor) -> torch.Tensor:
    """``(image - mean) / std`` per channel with ImageNet's statistics, for images (..., 3, H, W) in [0, 1]."""
    mean, std = _imagenet_statistics(image)
    return (image - mean) / std


def denormalise(image: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`normalise` (to show a normalised image)."""
    mean, std = _imagenet_statistics(image)
    return image * std + mean


def _read_image(path: Path) -> torch.Tensor:
    """The RGB image at ``path`` as (3, H, W), normalised (:func:`normalise`)."""
    from PIL import Image

    with Image.open(path) as im:
        return normalise(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float().div(255))


def _linear_taps(size: int, scaled: int, start: int, count: int):
    """Bilinear resampling (``align_corners=False``) of ``size`` pixels to ``scaled``, for the ``count``
    outputs from ``start``: the two source indices and the second one's weight of each output."""
    centres = torch.arange(start, start + count, dtype=torch.float64)
    source = ((centres + 0.5) * (size / scaled) - 0.5).clamp(min=0)
    first = source.floor().long().clamp(max=size - 1)
    return first, (first + 1).clamp(max=size - 1), (source - first).float()


def _nearest_taps(size: int, scaled: int, start: int, count: int) -> torch.Tensor:
    """The source index of each of the ``count`` outputs from ``start`` of ``nearest-exact`` resampling of
    ``size`` pixels to ``scaled``, exactly as F.interpolate rounds them (it is asked, on the indices)."""
    indices = torch.arange(size, dtype=torch.float32)[None, None]
    return F.interpolate(indices, size=scaled, mode="nearest-exact")[0, 0, start:start + count].long()


def scale_crop(image: torch.Tensor, label: torch.Tensor, scale: float, position, crop_size: int):
    """The training sample of a folder image: the ``crop_size`` x ``crop_size`` window at ``position`` =
    (y, x), fractions in [0, 1) of the room left in each dimension, of the image and its label scaled by
    ``scale`` (the aspect ratio kept; bilinear for the image, nearest-exact for the label).

    Only the window is resampled: the result is that of F.interpolate on the whole image followed by the
    crop (the label exactly; the image within about 1e-5, F.interpolate placing its source coordinates in
    float32, this in float64), at the cost of the crop rather than of the scaled image
    (a 1024 x 2048 frame at scale 2 would be 2048 x 4096). Where the scaled image is smaller than the crop,
    the window is padded at the bottom and right: with 0 for the (normalised) image, i.e. the mean colour,
    and with IGNORE_INDEX for the label.
    """
    height, width = image.shape[1:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    top, left = (int(fraction * (max(n - crop_size, 0) + 1)) for fraction, n in zip(position, size))
    rows, columns = min(crop_size, size[0] - top), min(crop_size, size[1] - left)
    y0, y1, wy = _linear_taps(height, size[0], top, rows)
    x0, x1, wx = _linear_taps(width, size[1], left, columns)
    wy, wx = wy.to(image.dtype)[:, None], wx.to(image.dtype)
    image = image[:, y0] * (1 - wy) + image[:, y1] * wy  # the window's rows, then its columns
    image = image[:, :, x0] * (1 - wx) + image[:, :, x1] * wx
    label = label[_nearest_taps(height, size[0], top, rows)][:, _nearest_taps(width, size[1], left, columns)]
    padding = (0, crop_size - columns, 0, crop_size - rows)
    return F.pad(image, padding, value=0.0), F.pad(label, padding, value=IGNORE_INDEX)


class SegmentationFolder(torch.utils.data.Dataset):
    """A real dataset on disk, laid out like Pascal VOC or Cityscapes; images at their own size.

    ``layout="voc"``: ``root/JPEGImages/<id>.jpg``, ``root/SegmentationClass/<id>.png`` (palette indices,
    255 = ignore), ids listed in ``root/ImageSets/Segmentation/<split>.txt`` (in that order); 21 classes.
    ``layout="cityscapes"``: ``root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
    ``root/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png`` (made by cityscapesscripts'
    createTrainIdLabelImgs), sorted by path; 19 classes. Splits: "train", "val" (any listed split).

    ``dataset[i]`` is the image, normalised with ImageNet's mean and std (:func:`normalise`, in training
    and in evaluation alike), and its label, both at the image's own size: evaluation scores them so (with
    a sliding window of ``crop_size`` tiles, :func:`kdtrain.report.predict`); :class:`BatchStream` makes
    the training samples (:func:`scale_crop` with a random scale in ``scale_range``, a random crop).
    """

    LAYOUTS = {"voc": 21, "cityscapes": 19}
    normalised = True

    def __init__(self, root: str, layout: str, split: str, crop_size: int = CROP_SIZE,
                 scale_range: tuple = SCALE_RANGE):
        from PIL import Image  # noqa: F401  (fail here, not in the middle of training, without Pillow)

        self.root, self.crop_size, self.scale_range = Path(root), crop_size, tuple(scale_range)
        self.num_classes = self.LAYOUTS[layout]
        if layout == "voc":
            ids = (self.root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
            self.pairs = [(self.root / "JPEGImages" / f"{i}.jpg", self.root / "SegmentationClass" / f"{i}.png")
                          for i in ids]
        else:
            images = sorted((self.root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
            self.pairs = [(p, self.root / "gtFine" / split / p.parent.name /
                           p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")) for p in images]
        if not self.pairs:
            raise FileNotFoundError(f"no {layout} images for split {split!r} under {self.root}")
        missing = [str(path) for pair in self.pairs for path in pair if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} files of the {layout} split {split!r} are missing: "
                                    f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        from PIL import Image

        image_path, label_path = self.pairs[index]
        image = _read_image(image_path)
        with Image.open(label_path) as im:  # palette or grey-level PNG: the pixel values are the class ids
            label = torch.from_numpy(np.array(im)).long()
        if label.shape != image.shape[1:]:
            raise ValueError(f"{label_path}: a label map of shape {tuple(label.shape)} for an image of "
                             f"{tuple(image.shape[1:])} (one class id per pixel expected)")
        return image, label


def image_files(root: str) -> list:
    """The images under ``root`` (*.jpg, *.jpeg, *.png, in any sub-folder), sorted by path."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.is_file())


class UnlabelledImages(torch.utils.data.Dataset):
    """Images without labels: ``dataset[i]`` is the normalised image and an all-IGNORE_INDEX label map of its
    size (so that batches stack with the labelled ones' code), with a folder's crop settings.

    ``note`` says where the images come from; :class:`BatchStream` quotes it when there are too few.
    """

    normalised = True

    def __init__(self, paths: list, num_classes: int, crop_size: int, scale_range: tuple, note: str = ""):
        from PIL import Image  # noqa: F401  (fail here, not in the middle of training, without Pillow)

        self.paths, self.num_classes, self.note = list(paths), num_classes, note
        self.crop_size, self.scale_range = crop_size, tuple(scale_range)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = _read_image(self.paths[index])
        return image, torch.full(image.shape[1:], IGNORE_INDEX, dtype=torch.long)


class Subset(torch.utils.data.Dataset):
    """The images ``indices`` of ``dataset``, with its class count, crop settings and normalisation."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)
        self.num_classes, self.normalised = dataset.num_classes, dataset.normalised
        self.crop_size, self.scale_range = dataset.crop_size, dataset.scale_range

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


class BatchStream:
    """Shuffled batches of a dataset for one rank; the batch at ``step`` is a function of (seed, step) alone.

    Epoch e visits the dataset in the order ``randperm(len, seed + e)``; the global batch of ``batch_size``
    images is split between the ``world_size`` ranks (rank r takes every world_size-th image). The random
    augmentation comes from a generator seeded with (seed, step), drawn for the whole global batch and
    then sliced, so a slot of the global batch is augmented alike whatever the world size: horizontal
    flips, then, for a dataset with a ``crop_size`` (the folders), a scale factor uniform in its
    ``scale_range`` and a crop position per image (:func:`scale_crop`). ``augment=False``: no flips, scale
    1 and the central crop. No state to save: the step is the position.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 augment: bool = True):
        if len(dataset) < batch_size:
            note = getattr(dataset, "note", "")
            raise ValueError(f"a batch of {batch_size} needs at least as many images, the dataset has "
                             f"{len(dataset)}" + (f" ({note})" if note else ""))
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.augment = rank, world_size, augment
        self.batches_per_epoch = len(dataset) // batch_size
        self.crop_size = getattr(dataset, "crop_size", None)

    def batch(self, step: int):
        epoch, position = divmod(step, self.batches_per_epoch)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
        indices = order[position * self.batch_size:(position + 1) * self.batch_size][self.rank::self.world_size]
        samples = [self.dataset[int(i)] for i in indices]
        g = torch.Generator().manual_seed(self.seed * 7_919 + step)
        # the flips are drawn first: the shapes' batches are those of before the folders' crops
        flip = (torch.rand(self.batch_size, generator=g) < 0.5 if self.augment
                else torch.zeros(self.batch_size, dtype=torch.bool))
        if self.crop_size is not None:
            samples = self._training_samples(samples, g)
        images, labels = (torch.stack(parts) for parts in zip(*samples))
        flip = flip[self.rank::self.world_size]
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        labels = torch.where(flip[:, None, None], labels.flip(-1), labels)
        return images, labels

    def _training_samples(self, samples: list, g: torch.Generator) -> list:
        """:func:`scale_crop` of this rank's samples, the scales and positions drawn for the global batch."""
        if self.augment:
            low, high = self.dataset.scale_range
            scales = low + (high - low) * torch.rand(self.batch_size, generator=g, dtype=torch.float64)
            positions = torch.rand(self.batch_size, 2, generator=g, dtype=torch.float64)
        else:
            scales = torch.ones(self.batch_size, dtype=torch.float64)
            positions = torch.full((self.batch_size, 2), 0.5, dtype=torch.float64)
        slots = slice(self.rank, None, self.world_size)
        return [scale_crop(image, label, float(scale), where.tolist(), self.crop_size)
                for (image, label), scale, where in zip(samples, scales[slots], positions[slots])]


class StepBatches(torch.utils.data.Dataset):
    """Item ``step`` is ``[stream.batch(step) for stream in streams]``: a pure function of the step, so a
    DataLoader's worker processes can prepare any step's batches and return exactly what the training
    process would have read itself."""

    def __init__(self, streams: list):
        self.streams = list(streams)

    def __getitem__(self, step: int) -> list:
        return [stream.batch(step) for stream in self.streams]


def _count(requested, available: int, flag: str, what: str) -> int:
    """``requested`` images, all ``available`` when None; more than there are is refused, naming ``flag``."""
    if requested is None:
        return available
    if requested > available:
        raise ValueError(f"{flag} {requested} is more than the {available} {what}")
    return requested


def build_datasets(args):
    """(teacher_train, student_train, unlabelled, val, num_classes) from the CLI arguments.

    Shapes: the counts and the size left at None take :data:`SHAPES_DEFAULTS`. Folders: a count left at
    None takes every image there is (teacher: the training split; labelled: the teacher's images;
    unlabelled: the images of ``--unlabelled-root``, or else the teacher's images after the first
    ``--labelled-images``, whose labels the student does not see; val: the val split), a given count the
    first images in the folder's order, and a count above what there is raises ValueError naming its flag.
    """
    if args.data == "shapes":
        n = {name: default if getattr(args, name) is None else getattr(args, name)
             for name, default in SHAPES_DEFAULTS.items()}
        teacher_train = ShapesDataset(n["image_size"], n["teacher_images"], "train", args.data_seed)
        student_train = Subset(teacher_train, range(n["labelled_images"]))
        unlabelled = ShapesDataset(n["image_size"], n["unlabelled_images"], "unlabelled", args.data_seed)
        val = ShapesDataset(n["image_size"], n["val_images"], "val", args.data_seed)
        return teacher_train, student_train, unlabelled, val, teacher_train.num_classes
    crop = CROP_SIZE if args.crop_size is None else args.crop_size
    scale_range = SCALE_RANGE if args.scale_range is None else args.scale_range
    train = SegmentationFolder(args.data_root, args.data, "train", crop, scale_range)
    teachers = _count(args.teacher_images, len(train), "--teacher-images", f"training images in {args.data_root}")
    labelled = _count(args.labelled_images, teachers, "--labelled-images", "images of the teacher (--teacher-images)")
    if args.unlabelled_root is not None:
        paths = image_files(args.unlabelled_root)
        if not paths:
            raise FileNotFoundError(f"--unlabelled-root {args.unlabelled_root}: no .jpg, .jpeg or .png images")
        source = f"images in {args.unlabelled_root} (--unlabelled-root)"
    else:
        paths = [image for image, _ in train.pairs[labelled:teachers]]
        source = (f"training images of the teacher after the first {labelled} (--labelled-images); "
                  f"--unlabelled-root DIR gives a folder of unlabelled images")
    paths = paths[:_count(args.unlabelled_images, len(paths), "--unlabelled-images", source)]
    unlabelled = UnlabelledImages(paths, train.num_classes, crop, scale_range, note=f"unlabelled: the {source}")
    val = SegmentationFolder(args.data_root, args.data, "val", crop, scale_range)
    val = Subset(val, range(_count(args.val_images, len(val), "--val-images", f"val images in {args.data_root}")))
    return Subset(train, range(teachers)), Subset(train, range(labelled)), unlabelled, val, train.num_classes
