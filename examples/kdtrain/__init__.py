"""The reference trainer of fastkd: a teacher, then students distilled with any mix of fastkd's losses.

``python examples/train.py --help`` is the entry point; the modules are meant to be read and copied:
``data`` (an embedded procedural dataset and a Cityscapes / Pascal VOC folder loader), ``models`` (teacher,
compact student, multi-path network), ``distill`` (the loss terms and their weights), ``trainer`` (stages,
checkpoints, DDP), ``report`` (evaluation, plots, the ablation table).
"""
