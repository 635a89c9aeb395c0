"""A miniature of the papers' ablations (Liu et al. Table 1, Xie et al. Table 1, He et al. Table 1).

One teacher is trained once; then the student is trained alone and with each distillation term added, for
every seed, each run in its own folder (finished runs are skipped when the ablation is rerun, an
interrupted one resumes). The table of mIoU mean +- std goes to ``<out>/ablation.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kdtrain.report import ablation_table
from kdtrain.trainer import Trainer

ABLATION_ROWS = [
    ("student alone (cross-entropy)", ("ce",)),
    ("+ pixel-wise KD (PI)", ("ce", "pixel")),
    ("+ pair-wise affinity (PA)", ("ce", "pairwise")),
    ("+ holistic WGAN-GP (HO)", ("ce", "holistic")),
    ("+ PI + PA + HO (Liu et al.)", ("ce", "pixel", "pairwise", "holistic")),
    ("+ probability (Lp)", ("ce", "probability")),
    ("+ Lp + consistency (Lc)", ("ce", "probability", "consistency")),
    ("+ Lp + Lc + pseudo-labels (Xie et al.)", ("ce", "probability", "consistency", "unlabelled")),
    ("+ adaptation + affinity (He et al.)", ("ce", "adaptation", "affinity")),
]


def run_ablation(args) -> str:
    start = time.perf_counter()
    out = Path(args.out)
    teacher_args = argparse.Namespace(**{**vars(args), "out": str(out / "teacher"), "losses": ["ce"],
                                         "teacher": None})
    teacher = Trainer(teacher_args, only_teacher=True)
    teacher_metrics = teacher.run()
    rows = [(label, terms) for label, terms in ABLATION_ROWS
            if args.ablation_rows is None or label in args.ablation_rows]
    results = {label: [] for label, _ in rows}
    for seed in args.seeds:
        for index, (label, terms) in enumerate(rows):
            run_args = argparse.Namespace(**{**vars(args), "out": str(out / f"row{index}-seed{seed}"),
                                             "losses": list(terms), "seed": seed,
                                             "teacher": str(out / "teacher" / "teacher.pt")})
            trainer = Trainer(run_args)
            results[label].append(trainer.run()["student"]["miou"])
            if trainer.distributed.is_main:
                print(f"[ablation] {label}, seed {seed}: mIoU {results[label][-1]:.4f}", flush=True)
    table = ablation_table(rows, results, teacher_metrics["teacher"]["miou"], args.seeds)
    if teacher.distributed.is_main:
        (out / "ablation.md").write_text(table)
        (out / "ablation.json").write_text(json.dumps(results, indent=2))
        print(table + f"\nablation done in {time.perf_counter() - start:.0f} s; table in {out / 'ablation.md'}")
    return table
