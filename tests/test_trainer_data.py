"""Real dataset folders in the reference trainer (examples/kdtrain/data.py, report.py): training samples
(random scale with the aspect kept, crop, padding, flip, ImageNet normalisation), reproducible batches and
their split between ranks, the image counts and their refusals, unlabelled image folders, and evaluation at
full resolution with a sliding window. Small generated folders in the Pascal VOC and Cityscapes layouts."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import train  # noqa: E402  (examples/train.py)
from kdtrain import report  # noqa: E402
from kdtrain.data import (IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, BatchStream, SegmentationFolder,  # noqa: E402
                          ShapesDataset, build_datasets, denormalise, normalise, scale_crop)
from kdtrain.models import build_model  # noqa: E402
from kdtrain.trainer import Trainer  # noqa: E402

SINGLE_PROCESS = SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1, sum=lambda tensor: tensor)
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def pattern(height: int, width: int, classes: int) -> torch.Tensor:
    """A label of 4 x 4 blocks, class (column block + 3 row block) mod classes: its geometry shows a squash."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return ((x // 4 + 3 * (y // 4)) % classes).to(torch.uint8)


def write_voc(root: Path, gen, train_sizes, val_sizes) -> dict:
    """A Pascal VOC layout: JPEG images, palette PNG labels (255 on the first row), the split lists.
    Returns {name: label} (uint8 (H, W))."""
    image_module = pytest.importorskip("PIL.Image")
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    labels = {}
    for split, sizes in (("train", train_sizes), ("val", val_sizes)):
        names = [f"{split}{i}" for i in range(len(sizes))]
        for name, (height, width) in zip(names, sizes):
            pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
            image_module.fromarray(pixels.numpy()).save(root / "JPEGImages" / f"{name}.jpg")
            label = torch.randint(0, 21, (height, width), generator=gen, dtype=torch.uint8)
            label[0] = 255
            palette_png = image_module.new("P", (width, height))  # VOC's format: palette indices are the classes
            palette_png.putdata(label.flatten().tolist())
            palette_png.putpalette([v for i in range(256) for v in (i, 7 * i % 256, 13 * i % 256)])
            palette_png.save(root / "SegmentationClass" / f"{name}.png")
            labels[name] = label
        (root / f"ImageSets/Segmentation/{split}.txt").write_text("\n".join(names))
    return labels


def write_cityscapes(root: Path, gen, size=(16, 32)) -> dict:
    """A Cityscapes layout of 2:1 images (lossless PNG), trainId labels of the block :func:`pattern`, one
    folder per city. Returns {(split, name): (pixels uint8 (H, W, 3), label uint8 (H, W))}."""
    image_module = pytest.importorskip("PIL.Image")
    samples = {}
    for split, city, count in (("train", "aachen", 2), ("train", "bremen", 1), ("val", "lindau", 2)):
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        for i in range(count):
            name = f"{city}_{i:06d}_000019"
            pixels = torch.randint(0, 256, (*size, 3), generator=gen, dtype=torch.uint8)
            label = pattern(*size, 19)
            image_module.fromarray(pixels.numpy()).save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            label_path = root / "gtFine" / split / city / f"{name}_gtFine_labelTrainIds.png"
            image_module.fromarray(label.numpy()).save(label_path)
            samples[split, name] = pixels, label
    return samples


def folder_args(root: Path, layout: str, *extra):
    return train.parse_args(["--data", layout, "--data-root", str(root), *extra])


class PixelModel(torch.nn.Module):
    """A 1x1 convolution: the logits of a pixel depend on that pixel alone. Records its input shapes."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, weight.shape[0], 1, bias=False)
        self.conv.weight.data.copy_(weight.view(*weight.shape, 1, 1))
        self.inputs = []

    def forward(self, images):
        self.inputs.append(tuple(images.shape))
        logits = self.conv(images)
        return logits, logits


def test_scale_crop_keeps_the_aspect_and_pads(gen):
    """scale_crop at fixed scales: the label's 4 x 4 blocks stay square (2:1 image), the crop lies where the
    position says, and the padding is 0 in the image and IGNORE_INDEX in the label."""
    image, label = torch.randn(3, 16, 32, generator=gen), pattern(16, 32, 19).long()

    out_image, out_label = scale_crop(image, label, 1.0, (0.3, 0.7), 40)  # no room: the image at the top left
    assert out_image.shape == (3, 40, 40) and out_label.shape == (40, 40)
    assert torch.equal(out_image[:, :16, :32], image) and torch.equal(out_label[:16, :32], label)
    assert (out_image[:, 16:] == 0).all() and (out_image[:, :, 32:] == 0).all()
    assert (out_label[16:] == IGNORE_INDEX).all() and (out_label[:, 32:] == IGNORE_INDEX).all()

    out_image, out_label = scale_crop(image, label, 2.0, (0.0, 0.5), 48)  # 32 x 64: 16 columns of room
    doubled = label.repeat_interleave(2, 0).repeat_interleave(2, 1)  # 8 x 8 blocks: the aspect kept
    left = int(0.5 * 17)
    assert torch.equal(out_label[:32], doubled[:, left:left + 48]) and (out_label[32:] == IGNORE_INDEX).all()
    scaled = F.interpolate(image[None], size=(32, 64), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out_image[:, :32], scaled[:, :, left:left + 48], rtol=0, atol=1e-5)
    assert (out_image[:, 32:] == 0).all()

    _, out_label = scale_crop(image, label, 0.5, (0.9, 0.99), 8)  # 8 x 16: the label's pixel centres kept
    assert torch.equal(out_label, label[1::2, 1::2][:, 8:16])


def _resize_then_crop(image, label, scale, position, crop_size):
    """The literal training sample: F.interpolate of the whole image and label, then the crop, padded."""
    height, width = image.shape[1:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    top, left = (int(fraction * (max(n - crop_size, 0) + 1)) for fraction, n in zip(position, size))
    image, label = image[:, top:top + crop_size, left:left + crop_size], label[top:top + crop_size, left:left + crop_size]
    padding = (0, crop_size - image.shape[2], 0, crop_size - image.shape[1])
    return F.pad(image, padding, value=0.0), F.pad(label, padding, value=IGNORE_INDEX)


def test_scale_crop_resamples_only_the_window_as_a_whole_resize_would(gen):
    """Random sizes, scales 0.3-2.5, positions and crops: the label equals the whole-image resize's crop
    exactly, the image to within the rounding of F.interpolate's float32 source coordinates."""
    for _ in range(200):
        height, width, crop_size = (int(v) for v in torch.randint(1, 80, (3,), generator=gen))
        image = torch.randn(3, height, width, generator=gen)
        label = torch.randint(0, 19, (height, width), generator=gen)
        scale, position = float(0.3 + 2.2 * torch.rand((), generator=gen)), torch.rand(2, generator=gen).tolist()
        got_image, got_label = scale_crop(image, label, scale, position, crop_size)
        want_image, want_label = _resize_then_crop(image, label, scale, position, crop_size)
        assert torch.equal(got_label, want_label), (height, width, scale, position, crop_size)
        torch.testing.assert_close(got_image, want_image, rtol=0, atol=1e-4)


def test_folder_images_are_normalised_at_their_own_size(tmp_path, gen):
    samples = write_cityscapes(tmp_path / "cityscapes", gen)
    val = SegmentationFolder(str(tmp_path / "cityscapes"), "cityscapes", "val", crop_size=8)
    assert (len(val), val.num_classes, val.crop_size) == (2, 19, 8)
    pixels, label = samples["val", "lindau_000000_000019"]
    image, read_label = val[0]
    expected = (pixels.permute(2, 0, 1).float() / 255 - MEAN) / STD
    assert image.shape == (3, 16, 32) and torch.allclose(image, expected, atol=1e-6)
    assert torch.equal(read_label, label.long())
    assert torch.allclose(denormalise(image), pixels.permute(2, 0, 1).float() / 255, atol=1e-6)
    assert torch.allclose(normalise(torch.tensor(IMAGENET_MEAN).view(3, 1, 1)), torch.zeros(3, 1, 1))
    with pytest.raises(FileNotFoundError, match="no cityscapes images for split 'test'"):
        SegmentationFolder(str(tmp_path / "cityscapes"), "cityscapes", "test")


def test_training_crops_of_a_cityscapes_folder(tmp_path, gen):
    """Batches of 2:1 images at scale 1 (crop larger than the image: padded) and at scale 2 (a window of the
    doubled label), possibly flipped."""
    samples = write_cityscapes(tmp_path / "cityscapes", gen)
    label = pattern(16, 32, 19).long()
    root = str(tmp_path / "cityscapes")
    train_images = [pixels for (split, _), (pixels, _) in sorted(samples.items()) if split == "train"]
    seed = int(torch.randint(0, 2**20, (), generator=gen))

    stream = BatchStream(SegmentationFolder(root, "cityscapes", "train", crop_size=40, scale_range=(1, 1)), 3, seed)
    flipped = []
    for step in range(8):
        images, labels = stream.batch(step)
        assert images.shape == (3, 3, 40, 40) and labels.shape == (3, 40, 40)
        for image, crop in zip(images, labels):
            flip = not torch.equal(crop[:16, :32], label)
            flipped.append(flip)
            image, crop = (image.flip(-1), crop.flip(-1)) if flip else (image, crop)
            assert torch.equal(crop[:16, :32], label) and (crop[16:] == IGNORE_INDEX).all()
            assert (crop[:, 32:] == IGNORE_INDEX).all() and (image[:, 16:] == 0).all()
            assert any(torch.allclose(image[:, :16, :32], (p.permute(2, 0, 1).float() / 255 - MEAN) / STD, atol=1e-6)
                       for p in train_images)
    assert any(flipped) and not all(flipped)  # 24 coin tosses: all alike with probability 2^-23

    stream = BatchStream(SegmentationFolder(root, "cityscapes", "train", crop_size=24, scale_range=(2, 2)), 3, seed)
    doubled = label.repeat_interleave(2, 0).repeat_interleave(2, 1)
    windows = [doubled[top:top + 24, left:left + 24] for top in range(9) for left in range(41)]
    for crop in stream.batch(0)[1]:
        assert any(torch.equal(crop, w) or torch.equal(crop.flip(-1), w) for w in windows)


def test_batches_are_reproducible_and_shared_between_ranks(tmp_path, gen):
    """Images of several sizes and aspects, the default scale range: a batch is a function of (seed, step),
    the same from a new stream; each of 2 ranks gets every other image of the 1-process batch, alike."""
    sizes = [(20, 24), (30, 18), (12, 40), (24, 24), (17, 33), (26, 21)]
    write_voc(tmp_path / "VOC", gen, sizes, [(20, 24)])
    teacher, *_ = build_datasets(folder_args(tmp_path / "VOC", "voc", "--crop-size", "16"))
    seed = int(torch.randint(0, 2**20, (), generator=gen))
    stream = BatchStream(teacher, 4, seed)
    images, labels = stream.batch(3)
    assert images.shape == (4, 3, 16, 16) and labels.shape == (4, 16, 16)
    again = BatchStream(teacher, 4, seed).batch(3)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    other = stream.batch(4)
    assert not torch.equal(images, other[0])
    for rank in range(2):
        part_images, part_labels = BatchStream(teacher, 4, seed, rank, 2).batch(3)
        assert torch.equal(part_images, images[rank::2]) and torch.equal(part_labels, labels[rank::2])


def test_shapes_batches_and_evaluation_are_as_before(gen):
    """The embedded dataset keeps its batches (order from seed + epoch, flips from seed * 7919 + step) and its
    evaluation (batches of whole images), bit for bit: the reference here is the code before the folders'
    crops were added."""
    seed = int(torch.randint(0, 2**20, (), generator=gen))
    dataset = ShapesDataset(8, 12, "train", seed)
    for world_size in (1, 2):
        for rank in range(world_size):
            stream = BatchStream(dataset, 4, seed, rank, world_size)
            for step in (0, 2, 5):
                epoch, position = divmod(step, 3)
                order = torch.randperm(12, generator=torch.Generator().manual_seed(seed + epoch))
                indices = order[position * 4:(position + 1) * 4][rank::world_size]
                images = torch.stack([dataset[int(i)][0] for i in indices])
                labels = torch.stack([dataset[int(i)][1] for i in indices])
                g = torch.Generator().manual_seed(seed * 7_919 + step)
                flip = (torch.rand(4, generator=g) < 0.5)[rank::world_size]
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
                labels = torch.where(flip[:, None, None], labels.flip(-1), labels)
                got_images, got_labels = stream.batch(step)
                assert torch.equal(got_images, images) and torch.equal(got_labels, labels)

    torch.manual_seed(seed)
    model = build_model("encoder-decoder", 5, 4).eval()
    val = ShapesDataset(8, 7, "val", seed)
    confusion = torch.zeros(5, 5, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, 7, 3):
            images, labels = (torch.stack(parts) for parts in zip(*(val[i] for i in range(start, min(start + 3, 7)))))
            predictions = model(images)[0].argmax(1)
            confusion += torch.bincount(labels.flatten() * 5 + predictions.flatten(), minlength=25).view(5, 5).double()
    metrics = report.evaluate(model, val, 5, SINGLE_PROCESS, 3)
    assert metrics["pixel_accuracy"] == (confusion.diag().sum() / confusion.sum()).item()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    assert metrics["miou"] == (confusion.diag()[union > 0] / union[union > 0]).mean().item()


def test_shapes_defaults_are_kept():
    args = train.parse_args(["--teacher-images", "24", "--unlabelled-images", "1", "--val-images", "1"])
    teacher, student, unlabelled, val, classes = build_datasets(args)
    assert args.image_size is None and teacher[0][0].shape == (3, 32, 32) and classes == 5
    assert (len(teacher), len(student), len(unlabelled), len(val)) == (24, 24, 1, 1)
    teacher, student, unlabelled, val, _ = build_datasets(train.parse_args(["--image-size", "4"]))
    assert (len(teacher), len(student), len(unlabelled), len(val)) == (512, 24, 512, 256)
    assert teacher.crop_size is None and val.crop_size is None and student.crop_size is None


def test_folder_counts_are_honoured(tmp_path, gen):
    write_voc(tmp_path / "VOC", gen, [(20, 24)] * 5, [(20, 24)] * 3)
    teacher, student, unlabelled, val, classes = build_datasets(folder_args(tmp_path / "VOC", "voc"))
    assert (len(teacher), len(student), len(unlabelled), len(val), classes) == (5, 5, 0, 3, 21)
    with pytest.raises(ValueError, match="has 0 .*--unlabelled-root"):  # asked for, the empty set says why
        BatchStream(unlabelled, 2, 0)

    args = folder_args(tmp_path / "VOC", "voc", "--teacher-images", "4", "--labelled-images", "1",
                       "--val-images", "2")
    teacher, student, unlabelled, val, _ = build_datasets(args)
    assert (len(teacher), len(student), len(unlabelled), len(val)) == (4, 1, 3, 2)
    assert torch.equal(student[0][1], teacher[0][1])
    for i in range(3):  # the teacher's images 1-3, their labels hidden
        image, label = unlabelled[i]
        assert torch.equal(image, teacher[i + 1][0]) and (label == IGNORE_INDEX).all()
        assert label.shape == image.shape[1:]
    _, _, unlabelled, _, _ = build_datasets(folder_args(tmp_path / "VOC", "voc", "--labelled-images", "2",
                                                        "--unlabelled-images", "2"))
    assert len(unlabelled) == 2 and torch.equal(unlabelled[1][0], teacher[3][0])


@pytest.mark.parametrize("extra, message", [
    (["--teacher-images", "6"], r"--teacher-images 6 is more than the 5 training images"),
    (["--labelled-images", "6"], r"--labelled-images 6 is more than the 5 images of the teacher \(--teacher-images\)"),
    (["--val-images", "4"], r"--val-images 4 is more than the 3 val images"),
    (["--unlabelled-images", "1"], r"--unlabelled-images 1 is more than the 0 .*--unlabelled-root"),
    (["--labelled-images", "3", "--unlabelled-images", "3"], r"--unlabelled-images 3 is more than the 2 "),
])
def test_folder_counts_above_the_images_there_are_are_refused(tmp_path, gen, extra, message):
    write_voc(tmp_path / "VOC", gen, [(8, 8)] * 5, [(8, 8)] * 3)
    with pytest.raises(ValueError, match=message):
        build_datasets(folder_args(tmp_path / "VOC", "voc", *extra))


def test_unlabelled_root(tmp_path, gen, capsys):
    """--unlabelled-root: the images in its sub-folders, sorted, with all-ignored labels; refused for shapes."""
    image_module = pytest.importorskip("PIL.Image")
    write_voc(tmp_path / "VOC", gen, [(20, 24)] * 2, [(20, 24)])
    extra = tmp_path / "extra"
    files = [extra / "b" / "c" / "one.png", extra / "b" / "two.jpeg", extra / "three.JPG", extra / "zero.png"]
    for path, height in zip(files, (18, 22, 30, 12)):
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (height, 26, 3), generator=gen, dtype=torch.uint8)
        image_module.fromarray(pixels.numpy()).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    (extra / "b" / "notes.txt").write_text("not an image")

    args = folder_args(tmp_path / "VOC", "voc", "--unlabelled-root", str(extra), "--crop-size", "16")
    _, student, unlabelled, _, _ = build_datasets(args)
    assert len(student) == 2 and [p.name for p in unlabelled.paths] == ["one.png", "two.jpeg", "three.JPG",
                                                                        "zero.png"]
    image, label = unlabelled[0]
    assert image.shape == (3, 18, 26) and label.shape == (18, 26) and (label == IGNORE_INDEX).all()
    images, labels = BatchStream(unlabelled, 4, 0).batch(0)
    assert images.shape == (4, 3, 16, 16) and (labels == IGNORE_INDEX).all()
    capped = build_datasets(folder_args(tmp_path / "VOC", "voc", "--unlabelled-root", str(extra),
                                        "--unlabelled-images", "3"))[2]
    assert len(capped) == 3
    with pytest.raises(ValueError, match=r"--unlabelled-images 5 is more than the 4 images in .*--unlabelled-root"):
        build_datasets(folder_args(tmp_path / "VOC", "voc", "--unlabelled-root", str(extra),
                                   "--unlabelled-images", "5"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--unlabelled-root"):
        build_datasets(folder_args(tmp_path / "VOC", "voc", "--unlabelled-root", str(tmp_path / "empty")))

    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--unlabelled-root", str(extra)])
    assert exit_info.value.code == 2 and "--unlabelled-root" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["--data", "voc", "--image-size", "32"], ["--image-size", "--crop-size"]),
    (["--crop-size", "16"], ["--crop-size"]),
    (["--scale-range", "0.5,2"], ["--scale-range"]),
    (["--data", "voc", "--scale-range", "2,1"], ["--scale-range"]),
    (["--data", "voc", "--scale-range", "0,1"], ["--scale-range"]),
    (["--data", "voc", "--scale-range", "1"], ["--scale-range"]),
    (["--data", "voc", "--scale-range", "a,b"], ["--scale-range"]),
    (["--data", "voc", "--teacher-images", "3", "--labelled-images", "4"], ["--labelled-images", "--teacher-images"]),
    (["--teacher-images", "16"], ["--labelled-images", "--teacher-images"]),  # shapes: 24 labelled by default
    (["--data", "voc", "--unlabelled-root", "/nonexistent/folder"], ["--unlabelled-root"]),
    # a folder's student has every label by default: unlabelled images must come from somewhere
    (["--data", "voc", "--losses", "ce,probability,unlabelled"], ["--unlabelled-root", "--labelled-images"]),
    (["--data", "voc", "--losses", "ce,pixel", "--distill-on", "all"], ["--unlabelled-root", "--labelled-images"]),
])
def test_data_command_line_is_refused_naming_the_argument(tmp_path, capsys, argv, named):
    root = ["--data-root", str(tmp_path)] if "voc" in argv else []
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv + root)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert all(flag in error for flag in named), error


def test_data_command_line_of_a_folder(tmp_path):
    args = train.parse_args(["--data", "voc", "--data-root", str(tmp_path), "--scale-range", "0.75,1.5",
                             "--crop-size", "64", "--unlabelled-root", str(tmp_path)])
    assert (args.scale_range, args.crop_size, args.unlabelled_root) == ((0.75, 1.5), 64, str(tmp_path))
    args = train.parse_args(["--data", "cityscapes", "--data-root", str(tmp_path)])
    assert None is args.crop_size is args.scale_range is args.teacher_images is args.labelled_images


def test_sliding_window_equals_the_whole_image(gen):
    """With logits that are a function of each pixel alone, the tiles' averaged probabilities are the whole
    image's; the tiles are crop x crop, 3 x 5 of them for 37 x 53 (stride 11, the last at the border), and an
    image smaller than the crop in one dimension is padded there."""
    model = PixelModel(torch.randn(5, 3, generator=gen))
    for shape, tiles in (((2, 3, 37, 53), 15), ((1, 3, 10, 50), 5)):
        images = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            whole = model(images)[0]
            model.inputs.clear()
            probabilities = report.sliding_window(model, images, 16)
            assert model.inputs == [(shape[0], 3, 16, 16)] * tiles
            predictions = report.predict(model, images, 16)
        assert torch.allclose(probabilities, whole.softmax(1), atol=1e-6)
        top2 = whole.topk(2, dim=1).values
        decisive = top2[:, 0] - top2[:, 1] > 1e-4  # elsewhere the argmax may go either way by rounding
        assert decisive.float().mean() > 0.95
        assert torch.equal(predictions[decisive], whole.argmax(1)[decisive])


def test_evaluation_at_full_resolution(tmp_path, gen):
    """VOC val images of several sizes: evaluate with sliding windows of 16 (batched by size) scores every
    pixel at full resolution exactly as the whole images do, and as counted here."""
    labels = write_voc(tmp_path / "VOC", gen, [(8, 8)], [(20, 24), (20, 24), (30, 18), (12, 40), (14, 14)])
    val = build_datasets(folder_args(tmp_path / "VOC", "voc", "--crop-size", "16"))[3]
    assert val.crop_size == 16 and val[2][0].shape[1:] == (30, 18)
    model = PixelModel(100 * torch.eye(21, 3))  # logits 100 x (normalised colour): no near ties on 8-bit colours
    correct = counted = 0
    for i in range(5):
        image, label = val[i]
        assert torch.equal(label, labels[f"val{i}"].long())
        prediction = model(image[None])[0].argmax(1)[0]
        counted += int((label != IGNORE_INDEX).sum())
        correct += int(((prediction == label) & (label != IGNORE_INDEX)).sum())
    with torch.no_grad():
        model.inputs.clear()
        windowed = report.evaluate(model, val, 21, SINGLE_PROCESS, 2)  # crop size: the dataset's
        assert (2, 3, 16, 16) in model.inputs and (1, 3, 14, 14) in model.inputs  # two 20 x 24 images together
        assert all(shape[2:] == (16, 16) for shape in model.inputs if shape[2:] != (14, 14))
        whole = report.evaluate(model, val, 21, SINGLE_PROCESS, 2, crop_size=1000)
    assert windowed == whole
    assert windowed["pixel_accuracy"] == pytest.approx(correct / counted, abs=1e-12)


def test_plot_predictions_shows_images_of_different_sizes(tmp_path, gen, monkeypatch):
    pytest.importorskip("matplotlib")
    write_voc(tmp_path / "VOC", gen, [(8, 8)], [(20, 24), (30, 18), (12, 40)])
    val = build_datasets(folder_args(tmp_path / "VOC", "voc", "--crop-size", "16"))[3]
    predicted = []
    predict = report.predict

    def recording_predict(model, images, crop_size=None):
        predicted.append((tuple(images.shape), crop_size))
        return predict(model, images, crop_size)

    monkeypatch.setattr(report, "predict", recording_predict)
    report.plot_predictions(val, {"student": build_model("encoder-decoder", 21, 4)}, tmp_path / "p.png", "cpu")
    assert predicted == [((1, 3, 20, 24), 16), ((1, 3, 30, 18), 16), ((1, 3, 12, 40), 16)]
    assert (tmp_path / "p.png").stat().st_size > 0


TINY = ["--teacher-width", "8", "--student-width", "4", "--latent-channels", "8", "--critic-width", "8",
        "--steps", "4", "--teacher-steps", "3", "--autoencoder-steps", "2", "--checkpoint-every", "2",
        "--no-progress", "--device", "cpu"]


def test_trainer_on_a_voc_folder(tmp_path, gen):
    """A tiny VOC folder trains end to end on 16 x 16 crops (unlabelled: the teacher's images after the
    student's) and is evaluated at full resolution."""
    write_voc(tmp_path / "VOC", gen, [(20, 24), (30, 18), (12, 40), (24, 24)], [(20, 24), (17, 30)])
    seed, data_seed = (int(v) for v in torch.randint(0, 2**20, (2,), generator=gen))
    args = train.parse_args(TINY + ["--data", "voc", "--data-root", str(tmp_path / "VOC"), "--crop-size", "16",
                                    "--labelled-images", "2", "--batch-size", "2", "--unlabelled-batch-size", "2",
                                    "--losses", "ce,pixel", "--distill-on", "all", "--out", str(tmp_path / "out"),
                                    "--seed", str(seed), "--data-seed", str(data_seed)])
    trainer = Trainer(args)
    assert trainer.num_classes == 21 and len(trainer.val) == 2 and trainer.val.crop_size == 16
    assert trainer.val[1][0].shape == (3, 17, 30)
    images, labels = trainer.unlabelled_stream.batch(0)
    assert images.shape == (2, 3, 16, 16) and (labels == IGNORE_INDEX).all()
    metrics = trainer.run()
    for stage in ("teacher", "student"):
        assert 0 <= metrics[stage]["miou"] <= 1 and 0 <= metrics[stage]["pixel_accuracy"] <= 1
