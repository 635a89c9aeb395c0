"""Consistency loss on the CPU: the ``torch`` backend against the ``cpp`` ops (``csrc/cpu/consistency_cpu.cpp``).

Times forward + backward (gradients for student and teacher) of both for a few realistic segmentation
shapes, float32, border "valid" and "same", and prints a markdown table: the median wall time of several
repetitions after a warm-up (the two backends alternate, so that a busy machine slows both alike), with
``torch.set_num_threads`` at the machine's core count, and the cpp/torch ratio (< 1: cpp is faster).

Peak extra memory: the highest resident set size during one forward + backward above the one before it
(Linux: ``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``), inputs excluded, gradients
included. It is measured in a child process started with ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc
maps every large block on its own and returns it when freed (otherwise a freed block is reused unseen and
the peak is underestimated); the times are taken in this process, with the default allocator settings.
Elsewhere than on Linux the memory columns are left out.

    python benchmarks/cpu_consistency.py [--repeats 7] [--threads N] [--quick] [--no-memory]

It runs the installed package (``pip install .`` first; run it from outside the source tree or as a
script, which puts ``benchmarks/``, not the tree, on ``sys.path``): the cpp ops live in ``fastkd._C``.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import fastkd
from fastkd import _extension
from fastkd.ops import consistency as op

MMAP_THRESHOLD = "65536"
SHAPES = [  # B, C, H, W: 19 classes (Cityscapes), from small crops to half-resolution batches
    (2, 19, 64, 64),
    (8, 19, 64, 64),
    (4, 19, 128, 128),
    (8, 19, 128, 256),
    (2, 19, 256, 512),
    (8, 19, 256, 512),
]
QUICK_SHAPES = SHAPES[:3]
BACKENDS = ("torch", "cpp")


def implementations():
    if _extension.LOAD_ERROR is not None:
        raise SystemExit(f"the cpp backend needs fastkd._C: {_extension.LOAD_ERROR}")
    import fastkd.cpp_kernels.consistency  # noqa: F401  (registers IMPLEMENTATIONS["cpp"])

    return {name: op.IMPLEMENTATIONS[name] for name in BACKENDS}


def step(implementation, s, t, config):
    loss = implementation(s, t, config)
    return (loss, *torch.autograd.grad(loss, (s, t)))


def median_seconds(impls, s, t, config, repeats):
    """{backend: median seconds of forward + backward}, the backends alternating."""
    times = {name: [] for name in impls}
    for name, impl in impls.items():
        step(impl, s, t, config)  # warm-up
    for _ in range(repeats):
        for name, impl in impls.items():
            start = time.perf_counter()
            step(impl, s, t, config)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _status_bytes(key):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_measurable():
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        _status_bytes("VmHWM")
        return os.environ.get("MALLOC_MMAP_THRESHOLD_") == MMAP_THRESHOLD
    except (OSError, KeyError):
        return False


def peak_extra_bytes(implementation, s, t, config, runs=2):
    """The smallest over ``runs`` of the peak resident memory of one forward + backward above the memory
    resident before it (the smallest: other threads of this process only add)."""
    peaks = []
    for _ in range(runs):
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS
        before = _status_bytes("VmRSS")
        result = step(implementation, s, t, config)
        peaks.append(_status_bytes("VmHWM") - before)
        del result
    return min(peaks)


def inputs(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=gen).requires_grad_()
    t = (s.detach() + 0.1 * torch.randn(*shape, generator=gen)).requires_grad_()
    return s, t


def measure_memory(shapes, impls):
    """Child process: one JSON line per (shape, border) with the peak extra bytes of each backend."""
    if not memory_measurable():
        return
    for shape in shapes:
        s, t = inputs(shape)
        for border in ("valid", "same"):
            config = op.ConsistencyConfig.make(border=border)
            step(impls["cpp"], s, t, config)  # load everything lazily loaded before the first measurement
            peaks = {name: peak_extra_bytes(impl, s, t, config) for name, impl in impls.items()}
            print(json.dumps({"shape": list(shape), "border": border, "peaks": peaks}), flush=True)


def memory_in_child(args):
    """{(shape, border): {backend: bytes}} from a child process with the mmap threshold fixed; {} where
    that cannot be measured."""
    if not sys.platform.startswith("linux"):
        return {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    command = [sys.executable, os.path.abspath(__file__), "--memory-child", "--threads", str(args.threads)]
    if args.quick:
        command.append("--quick")
    child = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    rows = (json.loads(line) for line in child.stdout.splitlines() if line.startswith("{"))
    return {(tuple(row["shape"]), row["border"]): row["peaks"] for row in rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="only the small shapes")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    impls = implementations()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.memory_child:
        return measure_memory(shapes, impls)
    memory = {} if args.no_memory else memory_in_child(args)
    print(f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
          f"(torch.set_num_threads({torch.get_num_threads()})), fastkd {fastkd.__version__}; forward + backward "
          f"(student and teacher), float32, dilation 1, median of {args.repeats} after a warm-up\n")
    header = "| B, C, H, W | border | torch (ms) | cpp (ms) | cpp/torch |"
    rule = "|---|---|---:|---:|---:|"
    if memory:
        header += " torch peak extra (MiB) | cpp peak extra (MiB) |"
        rule += "---:|---:|"
    print(header)
    print(rule)
    for shape in shapes:
        s, t = inputs(shape)
        for border in ("valid", "same"):
            config = op.ConsistencyConfig.make(border=border)
            seconds = median_seconds(impls, s, t, config, args.repeats)
            row = (f"| {', '.join(map(str, shape))} | {border} | {seconds['torch'] * 1e3:.1f} | "
                   f"{seconds['cpp'] * 1e3:.1f} | {seconds['cpp'] / seconds['torch']:.2f} |")
            if memory:
                peaks = memory[shape, border]
                row += f" {peaks['torch'] / 2**20:.1f} | {peaks['cpp'] / 2**20:.1f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
