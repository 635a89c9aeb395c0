"""The reference trainer (examples/train.py): every loss combination end to end, exact resumption after an
interruption, two processes, and the command line's refusals. Tiny images and a few steps keep it short."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import train  # noqa: E402  (examples/train.py)
from kdtrain.data import SegmentationFolder  # noqa: E402
from kdtrain.trainer import Interrupted, Trainer  # noqa: E402

TINY = ["--image-size", "16", "--teacher-images", "16", "--labelled-images", "8", "--unlabelled-images", "8",
        "--val-images", "8", "--batch-size", "4", "--unlabelled-batch-size", "4", "--teacher-width", "8",
        "--student-width", "4", "--latent-channels", "8", "--critic-width", "8", "--steps", "4",
        "--teacher-steps", "3", "--autoencoder-steps", "2", "--checkpoint-every", "2", "--no-progress"]


def tiny_args(out, gen, *extra):
    seed, data_seed = (int(v) for v in torch.randint(0, 2**20, (2,), generator=gen))
    return train.parse_args(TINY + ["--out", str(out), "--seed", str(seed), "--data-seed", str(data_seed),
                                    *extra])


COMBINATIONS = [  # (losses, other options)
    (["ce"], []),
    (["ce", "pixel", "pairwise", "holistic"], []),
    (["ce", "pairwise"], ["--pairwise-patch", "2", "--pairwise-window", "1", "--pairwise-pool", "max"]),
    (["ce", "probability", "consistency", "unlabelled"], []),
    (["ce", "adaptation", "affinity"], []),
    (["pixel", "probability", "unlabelled"], ["--distill-on", "labelled", "--student-model", "multipath"]),
]


@pytest.mark.parametrize("losses, options", COMBINATIONS, ids=lambda c: "+".join(c) or "-")
def test_each_loss_combination_trains_end_to_end(tmp_path, gen, losses, options):
    args = tiny_args(tmp_path, gen, "--losses", ",".join(losses), *options)
    trainer = Trainer(args)
    initial = {k: v.clone() for k, v in trainer.models["student"].state_dict().items()}
    metrics = trainer.run()

    needs_teacher = losses != ["ce"]
    expected_stages = (["teacher"] if needs_teacher else []) + (["autoencoder"] if "affinity" in losses else [])
    assert metrics["stages"] == expected_stages + ["student"]
    for stage in metrics["stages"]:
        assert len(trainer.history[stage]) == trainer.stage_steps[stage]
    recorded = set(trainer.history["student"][0])
    assert set(losses) <= recorded and "total" in recorded
    assert ("critic" in recorded) == ("holistic" in losses)
    assert all(torch.isfinite(torch.tensor(list(terms.values()))).all() for terms in trainer.history["student"])
    for stage in ("student", "teacher") if needs_teacher else ("student",):
        assert 0 <= metrics[stage]["miou"] <= 1 and 0 <= metrics[stage]["pixel_accuracy"] <= 1
    final = trainer.models["student"].state_dict()
    assert any(not torch.equal(initial[k], final[k]) for k in initial if final[k].is_floating_point())
    assert json.loads((tmp_path / "metrics.json").read_text())["losses"] == losses
    pytest.importorskip("matplotlib")
    assert (tmp_path / "loss_curves.png").stat().st_size > 0 and (tmp_path / "predictions.png").stat().st_size > 0


def test_interrupted_run_resumes_exactly(tmp_path, gen, monkeypatch):
    """SIGTERM in the teacher stage, then --stop-after in every later stage: the resumed run ends with
    the same weights, optimizer states and metrics, bit for bit, as the uninterrupted one. The losses
    cover every piece of state (dropout of the multi-path student, the critic's random interpolation,
    autoencoder, adapter, unlabelled stream)."""
    options = ["--losses", "ce,pixel,holistic,adaptation,affinity,unlabelled", "--student-model", "multipath"]
    reference_args = tiny_args(tmp_path / "reference", gen, *options)
    seeds = ["--seed", str(reference_args.seed), "--data-seed", str(reference_args.data_seed)]
    reference = Trainer(reference_args)
    reference_metrics = reference.run()

    resumed_out = tmp_path / "resumed"
    args = train.parse_args(TINY + options + seeds + ["--out", str(resumed_out)])
    first = Trainer(args)
    teacher_step = first._teacher_step

    def step_then_signal(step):
        terms = teacher_step(step)
        if step == 1:
            signal.raise_signal(signal.SIGTERM)  # delivered to the handler the run installed
        return terms

    monkeypatch.setattr(first, "_teacher_step", step_then_signal)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="SIGTERM"):
        first.run()
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the run restores the caller's handler
    assert torch.load(resumed_out / "checkpoint.pt", weights_only=False)["step"] == 2

    interruptions = 1
    stop_args = train.parse_args(TINY + options + seeds + ["--out", str(resumed_out), "--stop-after", "1"])
    while True:
        try:
            resumed = Trainer(stop_args)
            metrics = resumed.run()
            break
        except Interrupted:
            interruptions += 1
    assert interruptions >= 8  # it stopped in the teacher, autoencoder and student stages

    assert metrics == reference_metrics
    for name, model in reference.models.items():
        expected, got = model.state_dict(), resumed.models[name].state_dict()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    for name, optimizer in reference.optimizers.items():
        expected = optimizer.state_dict()["state"]
        got = resumed.optimizers[name].state_dict()["state"]
        assert all(torch.equal(expected[i]["exp_avg"], got[i]["exp_avg"]) for i in expected), name
    assert resumed.history == reference.history


def test_two_processes_with_torchrun(tmp_path, gen):
    seed = int(torch.randint(0, 2**20, (), generator=gen))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(EXAMPLES / "train.py"), *TINY, "--losses", "ce,pixel,pairwise,holistic,adaptation",
               "--out", str(tmp_path), "--seed", str(seed), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["replicas_identical"] is True
    assert 0 <= metrics["student"]["miou"] <= 1
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["stage"] == "done"


@pytest.mark.parametrize("argv, named", [
    (["--losses", "ce,kd"], "--losses"),
    (["--steps", "0"], "--steps"),
    (["--pseudo-threshold", "1.5"], "--pseudo-threshold"),
    (["--pixel-weight", "-1"], "--pixel-weight"),
    (["--data", "voc"], "--data-root"),
    (["--pairwise-pool", "max"], "--pairwise-pool"),
])
def test_bad_command_line_is_refused_naming_the_argument(capsys, argv, named):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_voc_folder_trains(tmp_path, gen):
    """A folder laid out like Pascal VOC (palette PNG labels, 255 = ignore) is read, resized and trained on."""
    image_module = pytest.importorskip("PIL.Image")
    root = tmp_path / "VOC"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    names = [f"img{i}" for i in range(6)]
    labels = {}
    for name in names:
        pixels = torch.randint(0, 256, (20, 24, 3), generator=gen, dtype=torch.uint8)
        image_module.fromarray(pixels.numpy()).save(root / "JPEGImages" / f"{name}.jpg")
        label = torch.randint(0, 21, (20, 24), generator=gen, dtype=torch.uint8)
        label[0] = 255
        labels[name] = label
        palette_png = image_module.new("P", (24, 20))  # VOC's format: palette indices are the classes
        palette_png.putdata(label.flatten().tolist())
        palette_png.putpalette([v for i in range(256) for v in (i, 7 * i % 256, 13 * i % 256)])
        palette_png.save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(names[:4]))
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(names[4:]))

    args = tiny_args(tmp_path / "out", gen, "--data", "voc", "--data-root", str(root), "--image-size", "20",
                     "--losses", "ce,pixel", "--labelled-images", "4", "--val-images", "2")
    trainer = Trainer(args)
    assert trainer.num_classes == 21 and len(trainer.val) == 2
    image, label = trainer.val[0]
    assert image.shape == (3, 20, 20) and label.shape == (20, 20) and 0 <= image.min() <= image.max() <= 1
    assert (label[0] == 255).all() and label[1:].max() < 21
    metrics = trainer.run()
    assert 0 <= metrics["student"]["miou"] <= 1


def test_cityscapes_folder_is_read(tmp_path, gen):
    """A folder laid out like Cityscapes (trainId label PNGs next to leftImg8bit images, one folder per city)."""
    image_module = pytest.importorskip("PIL.Image")
    root = tmp_path / "cityscapes"
    labels = {}
    for split, city, count in (("train", "aachen", 2), ("train", "bremen", 1), ("val", "lindau", 1)):
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        for i in range(count):
            name = f"{city}_{i:06d}_000019"
            pixels = torch.randint(0, 256, (16, 32, 3), generator=gen, dtype=torch.uint8)
            image_module.fromarray(pixels.numpy()).save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            label = torch.randint(0, 19, (16, 32), generator=gen, dtype=torch.uint8)
            label[:, :4] = 255
            image_module.fromarray(label.numpy()).save(root / "gtFine" / split / city / f"{name}_gtFine_labelTrainIds.png")
            labels[split, name] = label
    train = SegmentationFolder(str(root), "cityscapes", "train", 16)
    unlabelled = SegmentationFolder(str(root), "cityscapes", "unlabelled", 16)
    val = SegmentationFolder(str(root), "cityscapes", "val", 16)
    assert (len(train), len(unlabelled), len(val), train.num_classes) == (3, 3, 1, 19)
    image, label = val[0]
    assert image.shape == (3, 16, 16) and label.shape == (16, 16) and 0 <= image.min() <= image.max() <= 1
    expected = labels["val", "lindau_000000_000019"][:, ::2]  # nearest resize of 32 columns to 16
    assert torch.equal(label, expected.long())
    with pytest.raises(FileNotFoundError, match="no cityscapes images for split 'test'"):
        SegmentationFolder(str(root), "cityscapes", "test", 16)
