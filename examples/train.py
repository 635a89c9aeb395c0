"""The reference trainer of fastkd: train a teacher, then distil a compact student with any of its losses.

    python examples/train.py                                   # Liu et al.'s terms on the embedded shapes data
    python examples/train.py --losses ce,probability,consistency,unlabelled   # Xie et al.
    python examples/train.py --losses ce,adaptation,affinity   # He et al. (autoencoder stage, then student)
    python examples/train.py --student-model multipath         # Zhuang et al.'s multi-path student
    python examples/train.py --ablation                        # the papers' ablation in miniature
    torchrun --nproc_per_node=2 examples/train.py              # data parallel (gloo on CPU, nccl on GPU)
    python examples/train.py --data voc --data-root VOCdevkit/VOC2012 --optimizer sgd --amp ...

Weights: by default the magnitude rule of Xie et al. (each term starts at the cross-entropy's magnitude,
measured on the first batches); --weighting paper takes the papers' numbers or the --<term>-weight flags.
Interrupt with Ctrl-C (or SIGTERM): a checkpoint is written; rerun the same command to resume exactly.
Outputs in --out: checkpoint.pt, best.pt (the student with the best val mIoU), teacher.pt, metrics.json,
loss_curves.png, predictions.png (and ablation.md with --ablation). The modules of kdtrain/ are the trainer's parts; see kdtrain/__init__.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kdtrain/ sits beside this file

from kdtrain.ablation import ABLATION_ROWS, run_ablation  # noqa: E402
from kdtrain.data import CROP_SIZE, SCALE_RANGE, SHAPES_DEFAULTS  # noqa: E402
from kdtrain.distill import CALIBRATED_TERMS, PAPER_WEIGHTS, TERMS  # noqa: E402
from kdtrain.trainer import Interrupted, main_guarded  # noqa: E402


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def loss_list(text: str) -> list:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TERMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown loss {', '.join(unknown) or '(none given)'}; "
                                         f"choose among {','.join(TERMS)}")
    return list(dict.fromkeys(names))


def seed_list(text: str) -> list:
    return [nonnegative_int(part) for part in text.split(",")]


def scale_range(text: str) -> tuple:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be two numbers LO,HI, got {text}") from None
    if not 0 < low <= high < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 < LO <= HI (finite), got {text}")
    return low, high


OPTIMIZER_DEFAULTS = {"adam": {"lr": 5e-3, "weight_decay": 1e-4}, "sgd": {"lr": 0.01, "weight_decay": 5e-4}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", choices=("shapes", "voc", "cityscapes"), default="shapes",
                      help="shapes: the embedded procedural dataset (default); voc/cityscapes: a folder")
    data.add_argument("--data-root", help="the dataset folder for --data voc or cityscapes")
    data.add_argument("--image-size", type=positive_int, default=None,
                      help=f"shapes only: the side of the square images (default {SHAPES_DEFAULTS['image_size']})")
    data.add_argument("--crop-size", type=positive_int, default=None,
                      help=f"folders only: training crops of crop x crop pixels, and the sliding window of the "
                      f"evaluation (which scores images at their own size) (default {CROP_SIZE})")
    data.add_argument("--scale-range", type=scale_range, default=None, metavar="LO,HI",
                      help=f"folders only: training images are rescaled by a factor uniform in [LO, HI], aspect "
                      f"kept, before the crop (default {SCALE_RANGE[0]},{SCALE_RANGE[1]})")
    data.add_argument("--teacher-images", type=positive_int, default=None,
                      help=f"labelled images of the teacher (default: shapes {SHAPES_DEFAULTS['teacher_images']}, "
                      f"folders all of the train split)")
    data.add_argument("--labelled-images", type=positive_int, default=None,
                      help=f"labelled images of the student, the first of the teacher's (default: shapes "
                      f"{SHAPES_DEFAULTS['labelled_images']}, folders all of the teacher's)")
    data.add_argument("--unlabelled-images", type=positive_int, default=None,
                      help=f"unlabelled images (default: shapes {SHAPES_DEFAULTS['unlabelled_images']}, folders "
                      f"all there are)")
    data.add_argument("--unlabelled-root", metavar="DIR",
                      help="folders only: the unlabelled images (*.jpg, *.jpeg, *.png, in any sub-folder); "
                      "default: the teacher's images after the first --labelled-images, without their labels")
    data.add_argument("--val-images", type=positive_int, default=None,
                      help=f"validation images (default: shapes {SHAPES_DEFAULTS['val_images']}, folders all of "
                      f"the val split)")
    data.add_argument("--data-seed", type=nonnegative_int, default=0)

    models = p.add_argument_group("models")
    choices = ("encoder-decoder", "multipath")
    models.add_argument("--teacher-model", choices=choices, default="encoder-decoder")
    models.add_argument("--student-model", choices=choices, default="encoder-decoder")
    models.add_argument("--teacher-width", type=positive_int, default=32)
    models.add_argument("--student-width", type=positive_int, default=8)
    models.add_argument("--teacher", help="weights of a trained teacher (a teacher.pt); skips the teacher stage")
    models.add_argument("--latent-channels", type=positive_int, default=16, help="autoencoder code channels")
    models.add_argument("--critic-width", type=positive_int, default=16, help="holistic critic base channels")

    losses = p.add_argument_group("losses")
    losses.add_argument("--losses", type=loss_list, default=["ce", "pixel", "pairwise", "holistic"],
                        help=f"comma-separated, among {','.join(TERMS)} (default: ce,pixel,pairwise,holistic)")
    losses.add_argument("--weighting", choices=("magnitude", "paper"), default="magnitude",
                        help="magnitude (default): weight the terms " + ",".join(sorted(CALIBRATED_TERMS)) +
                        " so that each starts at the cross-entropy's magnitude (Xie et al. sec. 4.1); "
                        "paper: the papers' fixed weights (or the --<term>-weight flags)")
    losses.add_argument("--calibration-batches", type=positive_int, default=4,
                        help="batches the magnitude rule measures the terms on (default 4)")
    for term, weight in PAPER_WEIGHTS.items():
        flag = "--unlabelled-lambda" if term == "unlabelled" else f"--{term}-weight"
        fixed = "" if term not in CALIBRATED_TERMS else ", with --weighting paper only"
        losses.add_argument(flag, type=nonnegative_float, default=None, dest=f"weight_{term}",
                            help=f"default {weight} (the paper's){fixed}")
    losses.add_argument("--temperature", type=positive_float, default=1.0, help="pixel-wise KD temperature")
    losses.add_argument("--pairwise-patch", type=positive_int, default=1, help="nodes of patch x patch pixels")
    losses.add_argument("--pairwise-window", type=nonnegative_int, default=None,
                        help="connect nodes within this Chebyshev distance (default: the full graph)")
    losses.add_argument("--pairwise-pool", choices=("avg", "max"), default="avg")
    losses.add_argument("--pseudo-threshold", type=probability, default=0.7,
                        help="teacher confidence needed for a pseudo-label (Xie et al.: 0.7)")
    losses.add_argument("--distill-on", choices=("labelled", "all"), default="labelled",
                        help="images the distillation terms see: the labelled ones (default, the papers'; with "
                        "unlabelled, Xie et al.'s eq. 3 adds them on the unlabelled images times lambda) or all")
    losses.add_argument("--critic-setup", choices=("paper", "code"), default="paper",
                        help="paper: the critic scores softmax maps with the image; code: raw logits alone and "
                        "the critic's loss x 0.1, as in Liu et al.'s public code")

    training = p.add_argument_group("training")
    training.add_argument("--steps", type=positive_int, default=150, help="student steps")
    training.add_argument("--teacher-steps", type=positive_int, default=400)
    training.add_argument("--autoencoder-steps", type=positive_int, default=100)
    training.add_argument("--batch-size", type=positive_int, default=8, help="labelled images per step, all ranks")
    training.add_argument("--unlabelled-batch-size", type=positive_int, default=8)
    training.add_argument("--optimizer", choices=tuple(OPTIMIZER_DEFAULTS), default="adam",
                          help="adam (default) or sgd: momentum 0.9, the papers' choice; poly decay for both")
    training.add_argument("--lr", type=positive_float, default=None,
                          help="learning rate (default: adam 5e-3; sgd 0.01, Liu et al.'s; He et al. use 0.007)")
    training.add_argument("--weight-decay", type=nonnegative_float, default=None,
                          help="default: adam 1e-4; sgd 5e-4, Liu et al.'s (He et al. use 4e-5)")
    training.add_argument("--critic-lr", type=positive_float, default=5e-3, help="the critic's Adam learning rate")
    training.add_argument("--amp", action="store_true",
                          help="mixed precision: bfloat16 autocast on CPU; float16 autocast + GradScaler on CUDA")
    training.add_argument("--eval-every", type=positive_int, default=None,
                          help="student steps between evaluations (default: a tenth of --steps); the best by val "
                          "mIoU is kept in best.pt")
    training.add_argument("--workers", type=nonnegative_int, default=0,
                          help="DataLoader worker processes preparing the next steps' batches (default 0: the "
                          "training process reads them); the batches, and so the results, do not depend on it")
    training.add_argument("--seed", type=nonnegative_int, default=0)
    training.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/kd", help="output folder (a checkpoint there is resumed)")
    run.add_argument("--checkpoint-every", type=positive_int, default=100, help="steps between checkpoints")
    run.add_argument("--stop-after", type=positive_int, default=None,
                     help="checkpoint and stop after this many steps of this invocation (time-boxed jobs)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")
    run.add_argument("--ablation", action="store_true", help="run the ablation (ignores --losses and --teacher)")
    run.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="ablation seeds, comma-separated")
    run.add_argument("--ablation-rows", type=lambda text: text.split("|"), default=None,
                     help=f"ablation rows to run, '|'-separated labels among: {'; '.join(r for r, _ in ABLATION_ROWS)}")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data != "shapes" and args.data_root is None:
        parser.error(f"--data-root is required with --data {args.data}")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        parser.error(f"--data-root {args.data_root} is not a folder")
    if args.data != "shapes" and args.image_size is not None:
        parser.error("--image-size is for --data shapes only: folder images keep their size, --crop-size sets "
                     "the training crops")
    for flag, value in (("--crop-size", args.crop_size), ("--scale-range", args.scale_range),
                        ("--unlabelled-root", args.unlabelled_root)):
        if args.data == "shapes" and value is not None:
            parser.error(f"{flag} is for --data voc or cityscapes only (the shapes are whole images of --image-size)")
    if args.unlabelled_root is not None and not Path(args.unlabelled_root).is_dir():
        parser.error(f"--unlabelled-root {args.unlabelled_root} is not a folder")
    teachers, labelled = args.teacher_images, args.labelled_images
    if args.data == "shapes":  # a folder's counts are checked against the images it has, by build_datasets
        teachers = SHAPES_DEFAULTS["teacher_images"] if teachers is None else teachers
        labelled = SHAPES_DEFAULTS["labelled_images"] if labelled is None else labelled
    if teachers is not None and labelled is not None and labelled > teachers:
        parser.error(f"--labelled-images ({labelled}) must be <= --teacher-images ({teachers})")
    if args.ablation and len(args.seeds) < 2:
        parser.error("--seeds: the ablation needs at least 2 seeds for a spread")
    labels = [label for label, _ in ABLATION_ROWS]
    if args.ablation_rows is not None and not set(args.ablation_rows) <= set(labels):
        parser.error(f"--ablation-rows: unknown rows {sorted(set(args.ablation_rows) - set(labels))}")
    if args.pairwise_pool == "max" and args.pairwise_patch == 1:
        parser.error("--pairwise-pool max needs --pairwise-patch > 1 (a 1-pixel node has nothing to pool)")
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 10)
    unlabelled_needed = "unlabelled" in args.losses or (args.distill_on == "all" and set(args.losses) - {"ce"})
    if (args.data != "shapes" and unlabelled_needed and args.unlabelled_root is None
            and args.labelled_images is None):
        parser.error("these losses need unlabelled images, and a folder's student has every training label by "
                     "default: give --unlabelled-root DIR, or --labelled-images N to leave the rest unlabelled")
    for name, value in OPTIMIZER_DEFAULTS[args.optimizer].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    given = {term: getattr(args, f"weight_{term}") for term in TERMS if getattr(args, f"weight_{term}") is not None}
    if args.weighting == "magnitude" and set(given) & CALIBRATED_TERMS:
        flags = ", ".join(f"--{term}-weight" for term in TERMS if term in set(given) & CALIBRATED_TERMS)
        parser.error(f"{flags}: --weighting magnitude chooses these weights; add --weighting paper to fix them")
    fixed = TERMS if args.weighting == "paper" else [term for term in TERMS if term not in CALIBRATED_TERMS]
    args.weights = {term: given.get(term, PAPER_WEIGHTS[term]) for term in fixed}
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.ablation:
        return main_guarded(args)
    try:
        run_ablation(args)
    except Interrupted as stop:
        print(stop, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
