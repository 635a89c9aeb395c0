"""The CUDA emulator's profile of every CUDA kernel, at one representative shape per op.

Each case runs one loss forward and backward on ``backend="cuda"`` through fastkd's CUDA emulator (CPU tensors,
``FASTKD_EMULATE_CUDA=1``) with ``FASTKD_EMULATOR_PROFILE=1``, and keeps the emulator's line for every kernel
launch: grid, block, static shared bytes, shared-memory requests with their wavefronts and bank conflicts, and
global-memory requests with their 32-byte sectors (csrc/README.md, "The emulator's profile"). The shapes are
small, for the emulator's sake; per request, the figures are what the kernels do at any size (grids of more than
64 blocks are sampled: every ceil(blocks / 64)-th block).

    python benchmarks/emulator_profile.py            # print the table
    python benchmarks/emulator_profile.py --write    # and record it in results/emulator-profile/

tests/test_emulator_profile.py checks that the record is today's: a kernel change that moves a figure shows in
the diff of profile.json and profile.md.
"""

import argparse
import contextlib
import json
import os
import re
import sys
from typing import Callable, Dict, Iterator, List

import torch

import fastkd.functional as F
from report import write_record

RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "emulator-profile")


def parse(line: str) -> Dict[str, object]:
    """One profile line as {"kernel": name, "grid": "(x, y, z)", ..., "shared loads": {"requests": n, ...}}."""
    head, *sections = line.split(" | ")
    match = re.match(r"fastkd emulator profile: (.+?) grid=(\(.*?\)) block=(\(.*?\)) shared_bytes=(\d+) "
                     r"profiled_blocks=(\d+)/(\d+)$", head)
    if match is None:
        raise ValueError(f"not an emulator profile line: {line!r}")
    kernel, grid, block, shared_bytes, profiled, blocks = match.groups()
    figures: Dict[str, object] = dict(kernel=kernel, grid=grid, block=block, shared_bytes=int(shared_bytes),
                                      profiled_blocks=int(profiled), blocks=int(blocks))
    for section in sections:
        name, rest = section.split(":", 1)
        figures[name] = {key: float(value) for key, value in re.findall(r"(\w+)=(\S+)", rest)}
    return figures


def _inputs(*shapes, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).relu_().to(device).requires_grad_() for shape in shapes]


def _backward(loss_of: Callable[..., torch.Tensor], *shapes, device="cpu") -> List[torch.Tensor]:
    inputs = _inputs(*shapes, device=device)
    loss = loss_of(*inputs)
    loss.backward()
    return [loss.detach()] + [x.grad for x in inputs if x.grad is not None]


# name -> what runs (forward and backward) at the op's representative shape on a backend and device, returning
# the loss and gradients (the profile runs backend "cuda" on CPU tensors; benchmarks/gpu_check.sh runs the
# same cases on a GPU under compute-sanitizer)
CASES: Dict[str, Callable[[str, str], List[torch.Tensor]]] = {
    "affinity_full gram, C = 32 + 48, 64 x 64, B = 2": lambda backend, device: _backward(
        lambda s, t: F.pairwise_affinity_loss(s, t, backend=backend, algorithm="gram"), (2, 32, 64, 64),
        (2, 48, 64, 64), device=device),
    "affinity_full gram, patch = 2, C = 32 + 48, 24 x 24, B = 2": lambda backend, device: _backward(
        lambda s, t: F.pairwise_affinity_loss(s, t, patch=2, backend=backend, algorithm="gram"), (2, 32, 24, 24),
        (2, 48, 24, 24), device=device),
    "affinity_full direct, C = 32 + 48, 16 x 16, B = 2": lambda backend, device: _backward(
        lambda s, t: F.pairwise_affinity_loss(s, t, backend=backend, algorithm="direct"), (2, 32, 16, 16),
        (2, 48, 16, 16), device=device),
    "affinity_full few nodes, pool_scale = 0.5, C = 32 + 48, 65 x 65, B = 2": lambda backend, device: _backward(
        lambda s, t: F.pairwise_affinity_loss(s, t, pool_scale=0.5, backend=backend), (2, 32, 65, 65),
        (2, 48, 65, 65), device=device),
    "affinity_window window = 2, patch = 2, C = 32, 64 x 64, B = 2": lambda backend, device: _backward(
        lambda s, t: F.pairwise_affinity_loss(s, t, window=2, patch=2, backend=backend), (2, 32, 64, 64),
        (2, 32, 64, 64), device=device),
    "affinity_window window = 3 (per-node kernels), C = 32, 32 x 32, B = 2": lambda backend, device: _backward(
        lambda s, t: F.pairwise_affinity_loss(s, t, window=3, backend=backend), (2, 32, 32, 32), (2, 32, 32, 32),
        device=device),
    "affinity_window window = 3 (per-node kernels), C = 16, 64 x 64, B = 2 (8192 nodes: no channel splits)":
        lambda backend, device: _backward(lambda s, t: F.pairwise_affinity_loss(s, t, window=3, backend=backend),
                                          (2, 16, 64, 64), (2, 16, 64, 64), device=device),
    "consistency C = 19, 32 x 64, B = 2": lambda backend, device: _backward(
        lambda s, t: F.consistency_loss(s, t, backend=backend), (2, 19, 32, 64), (2, 19, 32, 64), device=device),
    "pixelwise_kd C = 19, 32 x 64, B = 2": lambda backend, device: _backward(
        lambda s, t: F.pixelwise_kd_loss(s, t.detach(), temperature=2.0, backend=backend), (2, 19, 32, 64),
        (2, 19, 32, 64), device=device),
    "probability C = 19, 32 x 64, B = 2": lambda backend, device: _backward(
        lambda s, t: F.probability_loss(s, t.detach(), backend=backend), (2, 19, 32, 64), (2, 19, 32, 64),
        device=device),
}


@contextlib.contextmanager
def _environment(**variables: str) -> Iterator[None]:
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def profile(case: str) -> List[Dict[str, object]]:
    """The profile of every kernel launch of one case, in launch order (the blocks in their default order)."""
    with _environment(FASTKD_EMULATE_CUDA="1", FASTKD_EMULATOR_PROFILE="1", FASTKD_EMULATOR_ORDER="launch"):
        torch.ops.fastkd_emulated.emulator_take_profile()
        CASES[case]("cuda", "cpu")
        return [dict(case=case, **parse(line)) for line in torch.ops.fastkd_emulated.emulator_take_profile()]


def table(rows: List[Dict[str, object]]) -> str:
    """The figures per request, one row per launch, as a markdown table."""
    lines = ["| case | kernel | grid | block | shared bytes | shared requests (ld + st) | wavefronts per request "
             "(ideal) | bank conflicts | global load sectors per request (ideal) | global store sectors per request "
             "(ideal) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ld, st = row["shared loads"], row["shared stores"]
        requests = ld["requests"] + st["requests"]
        wavefronts = f"{(ld['wavefronts'] + st['wavefronts']) / requests:.2f} " \
                     f"({(ld['ideal'] + st['ideal']) / requests:.2f})" if requests else "-"
        gl, gs = row["global loads"], row["global stores"]
        lines.append(
            f"| {row['case']} | `{row['kernel']}` | {row['grid']} | {row['block']} | {row['shared_bytes']} | "
            f"{int(ld['requests'])} + {int(st['requests'])} | {wavefronts} | "
            f"{int(ld['bank_conflicts'] + st['bank_conflicts'])} | "
            f"{gl['sectors_per_request']:.2f} ({gl['ideal']:.2f}) | "
            f"{gs['sectors_per_request']:.2f} ({gs['ideal']:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"record the profile in {RECORD}")
    args = parser.parse_args(argv)
    rows = [row for case in CASES for row in profile(case)]
    text = table(rows)
    print(text)
    if args.write:
        write_record(RECORD, "profile", rows, "The CUDA emulator's profile of every kernel",
                     "Written by `python benchmarks/emulator_profile.py --write` (see its docstring); checked by "
                     "tests/test_emulator_profile.py.\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
