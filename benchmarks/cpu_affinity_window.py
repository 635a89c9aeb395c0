"""Windowed PairwiseAffinityLoss on the CPU: the ``torch`` backend against the ``cpp`` ops
(``csrc/cpu/affinity_window_cpu.cpp``).

Times forward + backward (gradients for student and teacher) of ``PairwiseAffinityLoss(window=r,
reduction="sum", backend="torch")`` and of ``fastkd.cpp_kernels.affinity_window.window_graph_sum`` (the
same sum) for a few feature-map shapes, float32, patch 1 (one node per pixel), and prints a markdown table:
the median wall time of several repetitions after a warm-up (the two backends alternate, so that a busy
machine slows both alike), with ``torch.set_num_threads`` at the machine's core count, and the cpp/torch
ratio (< 1: cpp is faster).

    python benchmarks/cpu_affinity_window.py [--repeats 5] [--threads N] [--quick]

It runs the installed package (``pip install .`` first; run it from outside the source tree or as a
script, which puts ``benchmarks/``, not the tree, on ``sys.path``): the cpp ops live in ``fastkd._C``.
"""

import argparse
import os
import platform
import statistics
import time

import torch

import fastkd
from fastkd import _extension
from fastkd.ops.pairwise_affinity import PairwiseAffinityConfig

SHAPES = [  # (B, C, H, W), window r
    ((2, 64, 64, 64), 1),
    ((8, 64, 64, 64), 1),
    ((4, 128, 64, 64), 2),
    ((2, 256, 64, 64), 3),
    ((2, 128, 128, 128), 1),
    ((2, 256, 128, 128), 1),
]
QUICK_SHAPES = SHAPES[:3]


def implementations(window):
    if _extension.LOAD_ERROR is not None:
        raise SystemExit(f"the cpp backend needs fastkd._C: {_extension.LOAD_ERROR}")
    from fastkd.cpp_kernels.affinity_window import window_graph_sum

    config = PairwiseAffinityConfig.make(window=window, reduction="sum")
    torch_loss = fastkd.PairwiseAffinityLoss(window=window, reduction="sum", backend="torch")
    return {"torch": torch_loss, "cpp": lambda s, t: window_graph_sum(s, t, config)}


def step(loss_fn, s, t):
    loss = loss_fn(s, t)
    return (loss, *torch.autograd.grad(loss, (s, t)))


def median_seconds(impls, s, t, repeats):
    """{backend: median seconds of forward + backward}, the backends alternating."""
    times = {name: [] for name in impls}
    for impl in impls.values():
        step(impl, s, t)  # warm-up
    for _ in range(repeats):
        for name, impl in impls.items():
            start = time.perf_counter()
            step(impl, s, t)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def inputs(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=gen).requires_grad_()
    t = (s.detach() + 0.1 * torch.randn(*shape, generator=gen)).requires_grad_()
    return s, t


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="only the small shapes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
          f"(torch.set_num_threads({torch.get_num_threads()})), fastkd {fastkd.__version__}; forward + backward "
          f"(student and teacher), float32, patch 1, median of {args.repeats} after a warm-up\n")
    print("| B, C, H, W | window | torch (ms) | cpp (ms) | cpp/torch |")
    print("|---|---:|---:|---:|---:|")
    for shape, window in QUICK_SHAPES if args.quick else SHAPES:
        s, t = inputs(shape)
        seconds = median_seconds(implementations(window), s, t, args.repeats)
        print(f"| {', '.join(map(str, shape))} | {window} | {seconds['torch'] * 1e3:.1f} | "
              f"{seconds['cpp'] * 1e3:.1f} | {seconds['cpp'] / seconds['torch']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
