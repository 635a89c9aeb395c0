"""The evidence a CPU can give of how close every GPU kernel comes to its floor, one row per kernel and backend.

    python benchmarks/kernel_evidence.py            # print the table (about 3 minutes on 2 cores)
    python benchmarks/kernel_evidence.py --write    # and record it in results/kernel-evidence/

Run it without TRITON_INTERPRET, where nvcc is on PATH (or NVCC names it) and triton is installed. Per kernel:

- **Floors** of the op and pass the kernel serves, at the representative shapes of ``fastkd.ops.costs.EXAMPLES``:
  FLOPs and unavoidable bytes, and max(FLOPs / peak, bytes / bandwidth) on an H100 SXM and an A100 SXM (80 GB)
  with the peaks of ``GPUS``: the FP64 tensor-core rate for the float64 products, the HBM bandwidth.
- The full-graph CUDA kernels have two rows per architecture: ``<float, true>``, their flat variant, which every
  contiguous or channels-last map runs, and pooled maps too (in double, on the nodes ``pool_nodes_kernel`` pools
  once), and ``<float, false>``, the general variant, which only strided views of pixel nodes run.
- **Resources** from ptxas, for sm_80 and sm_90: registers, stack and local memory (a spill), static shared bytes.
  CUDA kernels are compiled by ``.ci/nvcc-check`` (the objects kept), Triton kernels by Triton's compiler for
  the first float32 launch the losses make at sizes divisible by 16 (``triton_launches.py``).
- **The main loop's instruction mix** from the SASS: the loop (a backward branch and the code it jumps over,
  nested loops counted once) holding the most FP64 products. Counted: DMMA (FP64 tensor-core MMA, 256 FMAs a warp
  instruction), DFMA (those of double divisions, 7 per MUFU.RCP64H, are not products), DADD and DMUL, MUFU
  (reciprocals, among them the double division's MUFU.RCP64H), calls to
  the division subroutines (``div_rn_f64``: a double division's slow path; ``div_s64``/``rem_s64``: 64-bit
  integer division), conversions (F2F, I2F, F2I, I2I, F2FP, HADD2.F32), shared and global loads and stores,
  barriers, and every instruction.
- **The emulator's figures** (CUDA only, from results/emulator-profile/profile.json): shared-memory bank
  conflicts, wavefronts per request, and the global load sectors per request against the ideal.
- **The estimated fraction of the floor**, from a throughput model of one SM running the main loop (written
  down in ``model``): one iteration of one warp costs the largest of its issue slots (4 schedulers, one
  instruction a cycle each), its FP64-pipe cycles (DFMA, DADD, DMUL: 64 lanes a cycle on an H100), its
  tensor-core cycles (DMMA: 128 FMAs a cycle), its MUFU cycles (16 lanes a cycle), its shared-memory wavefronts
  (one a cycle; the emulator's wavefronts per request for CUDA kernels, the ideal for Triton's), and for the
  memory-bound kernels its global bytes at the HBM bandwidth per SM (times the emulator's sectors over the
  ideal). The floor of the same iteration is its FP64 products at the tensor-core rate (compute-bound kernels)
  or, for the memory-bound ones, the unavoidable share of its global bytes at the HBM bandwidth (the share
  ``minimum_bytes / kernel_bytes`` of the op's pass in ``fastkd.ops.costs``: what the design adds, such as
  stored float64 buffers, counts against it). The ratio is an upper bound: the model assumes enough warps to
  hide every latency, full occupancy, L2 hits for the reloaded tiles of the compute-bound kernels, and HBM
  traffic for every load in a memory-bound kernel's loop (reloads that hit a cache, as the window kernels' 13
  offsets do, make it optimistic); it knows nothing of the launch's size (a grid of a few blocks, as
  ``pool_scale`` gives, runs on a few SMs).

Nothing here ran on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Dict, List, Optional, Tuple

from fastkd.ops import costs
from report import write_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(ROOT, "benchmarks", "results", "kernel-evidence")
EMULATOR_PROFILE = os.path.join(ROOT, "benchmarks", "results", "emulator-profile", "profile.json")
ARCHS = (80, 90)


@dataclasses.dataclass(frozen=True)
class Gpu:
    """Per-SM throughputs (the vendor's peak rates over SMs x boost clock)."""
    name: str
    sms: int
    clock_hz: float
    fp64_tensor_flops: float  # DMMA
    fp64_flops: float  # DFMA on the FP64 pipe
    bytes_per_second: float  # HBM

    def per_sm_cycle(self, rate: float) -> float:
        return rate / (self.sms * self.clock_hz)


# H100 SXM5 and A100 SXM4 80 GB, NVIDIA's data sheets (FLOPs count an FMA as 2)
GPUS = (Gpu("H100 SXM", 132, 1.98e9, 67e12, 34e12, 3.35e12), Gpu("A100 SXM", 108, 1.41e9, 19.5e12, 9.7e12, 2.039e12))
MUFU_LANES_PER_CYCLE = 16  # per SM, sm_80 and sm_90
SCHEDULERS = 4  # warp instructions issued per SM and cycle
SHARED_WAVEFRONTS_PER_CYCLE = 1

# kernel -> (the op's representative shape in costs.EXAMPLES, by its first words; the pass; the kernel's bound)
SERVES: Dict[str, Tuple[str, str, str]] = {
    "node_norm_kernel": ("PairwiseAffinityLoss() Gram, B=8, C=256+256, 128x128", "forward", "memory"),
    "node_backward_kernel": ("PairwiseAffinityLoss() Gram, B=8, C=256+256, 128x128", "backward", "memory"),
    "node_radial_kernel": ("PairwiseAffinityLoss(patch=2, window=2)", "backward", "memory"),
    "pool_nodes_kernel": ("PairwiseAffinityLoss(pool_scale=0.5) direct", "forward", "memory"),
    "gram_kernel": ("PairwiseAffinityLoss() Gram, B=8, C=256+256, 128x128", "forward", "compute"),
    "apply_kernel": ("PairwiseAffinityLoss() Gram, B=8, C=256+256, 128x128", "backward", "compute"),
    "gram_apply_kernel": ("PairwiseAffinityLoss() Gram, B=8, C=256+256, 128x128", "backward", "compute"),
    "node_norm_split_kernel": ("PairwiseAffinityLoss(pool_scale=0.5) direct", "forward", "memory"),
    "node_radial_split_kernel": ("PairwiseAffinityLoss(patch=2, window=2)", "backward", "memory"),
    "pool_nodes_warp_kernel": ("PairwiseAffinityLoss(pool_scale=0.5) direct", "forward", "memory"),
    "node_backward_warp_kernel": ("PairwiseAffinityLoss(pool_scale=0.5) direct", "backward", "memory"),
    "direct_difference_kernel": ("PairwiseAffinityLoss() direct", "backward", "compute"),
    "direct_columns_kernel": ("PairwiseAffinityLoss() direct", "backward", "compute"),
    "direct_rows_kernel": ("PairwiseAffinityLoss() direct", "forward", "compute"),
    "affinity_window_forward_kernel": ("PairwiseAffinityLoss(patch=2, window=2)", "forward", "memory"),
    "affinity_window_gradient_kernel": ("PairwiseAffinityLoss(patch=2, window=2)", "backward", "memory"),
    "window_tile_forward_kernel": ("PairwiseAffinityLoss(patch=2, window=2) CUDA tiles", "forward", "memory"),
    "window_tile_backward_kernel": ("PairwiseAffinityLoss(patch=2, window=2) CUDA tiles", "backward", "memory"),
    "_window_forward_kernel": ("PairwiseAffinityLoss(patch=2, window=2)", "forward", "memory"),
    "_window_backward_kernel": ("PairwiseAffinityLoss(patch=2, window=2)", "backward", "memory"),
    "consistency_forward_kernel": ("ConsistencyLoss()", "forward", "memory"),
    "consistency_backward_kernel": ("ConsistencyLoss()", "backward", "memory"),
    "_consistency_forward_kernel": ("ConsistencyLoss()", "forward", "memory"),
    "_consistency_backward_kernel": ("ConsistencyLoss()", "backward", "memory"),
    "pixelwise_kd_forward_kernel": ("PixelwiseKDLoss()", "forward", "memory"),
    "pixelwise_kd_backward_kernel": ("PixelwiseKDLoss()", "backward", "memory"),
    "_pixelwise_kd_forward_kernel": ("PixelwiseKDLoss()", "forward", "memory"),
    "_pixelwise_kd_backward_kernel": ("PixelwiseKDLoss()", "backward", "memory"),
    "probability_forward_kernel": ("ProbabilityLoss()", "forward", "memory"),
    "probability_backward_kernel": ("ProbabilityLoss()", "backward", "memory"),
    "_probability_forward_kernel": ("ProbabilityLoss()", "forward", "memory"),
    "_probability_backward_kernel": ("ProbabilityLoss()", "backward", "memory"),
}

# CUDA kernels whose loads take more than SECTOR_SLACK times the ideal sectors per request in the emulator's
# profile, and why (the bar: within 25% of the ideal, or the reason)
SECTOR_SLACK = 1.25
SECTOR_REASONS: Dict[str, str] = {
    "pool_nodes_kernel": (
        "a warp's lanes take consecutive nodes of one channel, so one request reads one pixel of each of 32 "
        "patches, kernel_w pixels apart (2 in the profiled 2 x 2 patches): twice the sectors of the bytes it uses, "
        "whose other halves the next pixel's request reads from L1. From kWidePatch (16) pixels wide a warp pools "
        "a channel of a node instead (pool_nodes_warp_kernel, 1.19 times the ideal)"),
    "window_tile_forward_kernel": (
        "the staging pools each node's patch on the fly (2 x 2 in the profiled case), lanes along consecutive "
        "nodes of a tile row: a request reads every second pixel, twice the sectors of its bytes, and the next "
        "request reads the other column from L1"),
    "window_tile_backward_kernel": (
        "the same staging as window_tile_forward_kernel (every second pixel of a row of 2 x 2 patches a "
        "request), and the node's own patch read again for its pooling backward"),
    "affinity_window_gradient_kernel": (
        "the partners' pixels are pooled on the fly (2 x 2 patches, lanes along nodes: every second pixel, as "
        "pool_nodes_kernel) and the D maps are read at window offsets that are not sector-aligned; it serves "
        "only windows of reach above 2 (reaches 1-2 take the tiled kernels)"),
}

# ---------------------------------------------------------------------------------------------------- SASS


@dataclasses.dataclass(frozen=True)
class Instruction:
    opcode: str  # e.g. "LDG.E.64"
    operands: str
    label: Optional[str]  # the label of a branch's or call's target


INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
LABEL = re.compile(r"^(\.L_x_\d+):")
TARGET = re.compile(r"`\(([^)]+)\)")


def disassemble(cubin: str) -> Dict[str, Tuple[List[Instruction], Dict[str, int]]]:
    """symbol -> (instructions, label -> index of the instruction it precedes), from ``nvdisasm -c``."""
    from triton_launches import NVDISASM
    text = subprocess.run([NVDISASM, "-c", cubin], capture_output=True, text=True, check=True).stdout
    functions: Dict[str, Tuple[List[Instruction], Dict[str, int]]] = {}
    instructions: List[Instruction] = []
    labels: Dict[str, int] = {}
    for line in text.splitlines():
        stripped = line.strip()
        start = re.match(r"^\.text\.(\S+):$", stripped)
        if start:
            instructions, labels = [], {}
            functions[start.group(1)] = (instructions, labels)
            continue
        label = LABEL.match(stripped)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        found = INSTRUCTION.search(line)
        if found:
            target = TARGET.search(found.group(2))
            instructions.append(Instruction(found.group(1), found.group(2), target.group(1) if target else None))
    return functions


DIVISION_DFMAS = 7  # a double division is MUFU.RCP64H, 7 DFMA (Newton steps and the correction) and a DMUL


def products_of(counts: Dict[str, int]) -> int:
    """The FP64 product FMAs of an instruction mix (:func:`mix`) of one warp: 256 per DMMA (m8n8k4), 32 per DFMA
    that is not part of a double division."""
    divisions = DIVISION_DFMAS * counts.get("rcp64h", 0)
    return 256 * counts.get("dmma", 0) + 32 * max(0, counts.get("dfma", 0) - divisions)


def fp64_products(body: List[Instruction]) -> int:
    """The FP64 product FMAs of one warp instruction stream."""
    return products_of(mix(body))


def main_loop(instructions: List[Instruction], labels: Dict[str, int]) -> Tuple[int, int]:
    """(first, last) instruction of the loop holding the most FP64 products (the smallest such loop); the loop
    with the most instructions when none has products; the whole kernel for straight-line code (the branch to
    itself that ends every kernel is no loop)."""
    loops = [(labels[i.label], index) for index, i in enumerate(instructions)
             if i.opcode.startswith("BRA") and i.label in labels and labels[i.label] < index]
    if not loops:
        return 0, len(instructions) - 1
    return max(loops, key=lambda loop: (fp64_products(instructions[loop[0]:loop[1] + 1]),
                                        (loop[1] - loop[0]) if not fp64_products(instructions[loop[0]:loop[1] + 1])
                                        else -(loop[1] - loop[0])))


CONVERSIONS = ("F2F", "I2F", "F2I", "I2I", "F2FP", "HADD2.F32")


def memory_bytes(opcode: str) -> int:
    """Bytes one lane moves in a load or store (LDG.E.64 8, LDG.E.128 16, LDG.E.U16 2, LDG.E 4)."""
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in opcode:
            return size
    return 4


def mix(body: List[Instruction]) -> Dict[str, int]:
    """The instruction classes of a loop body."""
    counts: Counter = Counter()
    for i in body:
        op = i.opcode
        counts["instructions"] += 1
        if op.startswith("DMMA"):
            counts["dmma"] += 1
        elif op.startswith("DFMA"):
            counts["dfma"] += 1
        elif op.startswith(("DADD", "DMUL")):
            counts["dadd_dmul"] += 1
        elif op.startswith("MUFU"):
            counts["mufu"] += 1
            counts["rcp64h"] += op.startswith("MUFU.RCP64H")
        elif op.startswith("CALL"):
            counts["double_division_calls" if "div_rn_f64" in (i.label or "") else
                   "integer_division_calls" if re.search(r"(div|rem)_[su]64", i.label or "") else "other_calls"] += 1
        elif op.startswith(CONVERSIONS):
            counts["conversions"] += 1
        elif op.startswith(("LDS", "STS", "LDSM")):
            counts["shared_" + ("loads" if op.startswith("LD") else "stores")] += 1
            counts["shared_bytes"] += 32 * memory_bytes(op)
        elif op.startswith(("LDG", "STG", "LDGSTS")):
            counts["global_" + ("stores" if op.startswith("ST") else "loads")] += 1
            counts["global_bytes"] += 32 * memory_bytes(op)
            counts["async_copies"] += op.startswith("LDGSTS")
        elif op.startswith("BAR"):
            counts["barriers"] += 1
    return dict(counts)


def estimate(counts: Dict[str, int], bound: str, gpu: Gpu, shared_wavefronts_per_request: float,
             sector_ratio: float, unavoidable_share: float) -> Dict[str, object]:
    """Cycles of one SM for one warp's iteration of the main loop, by resource, and the floor's share of it."""
    tensor_fmas = gpu.per_sm_cycle(gpu.fp64_tensor_flops) / 2
    fp64_lanes = gpu.per_sm_cycle(gpu.fp64_flops) / 2
    hbm_bytes = gpu.per_sm_cycle(gpu.bytes_per_second)
    shared_requests = counts.get("shared_loads", 0) + counts.get("shared_stores", 0)
    cycles = {
        "issue": counts.get("instructions", 0) / SCHEDULERS,
        "fp64 pipe": 32 * (counts.get("dfma", 0) + counts.get("dadd_dmul", 0)) / fp64_lanes,
        "tensor cores": 256 * counts.get("dmma", 0) / tensor_fmas,
        "mufu": 32 * counts.get("mufu", 0) / MUFU_LANES_PER_CYCLE,
        "shared memory": shared_requests * shared_wavefronts_per_request / SHARED_WAVEFRONTS_PER_CYCLE,
    }
    products = products_of(counts)
    if bound == "memory":  # the loop's loads at HBM speed; the floor: only the unavoidable share of them
        cycles["hbm"] = counts.get("global_bytes", 0) * sector_ratio / hbm_bytes
        floor = counts.get("global_bytes", 0) * unavoidable_share / hbm_bytes
    else:
        floor = products / tensor_fmas
    limit = max(cycles, key=cycles.get)
    return {"cycles": {name: round(value, 2) for name, value in cycles.items()}, "limited_by": limit,
            "floor_cycles": round(floor, 2),
            "fraction": round(min(1.0, floor / cycles[limit]), 3) if cycles[limit] > 0 else None}


# ---------------------------------------------------------------------------------------------------- kernels

KERNEL_NAME = re.compile(r"(\w+_kernel)<(.*)>")


def demangle(symbols: List[str]) -> Dict[str, str]:
    result = subprocess.run(["c++filt"], input="\n".join(symbols), capture_output=True, text=True, check=True)
    return dict(zip(symbols, result.stdout.splitlines()))


def float32_instantiation(demangled: str) -> Optional[Tuple[str, str]]:
    """(the kernel's name, its template arguments) when this is a float32 instantiation (every storage type
    float; every variant of the other arguments, such as the full-graph kernels' flat path, is one)."""
    found = re.search(r"(\w+_kernel)<([^()]*)>\(", demangled)
    if not found:
        return None
    arguments = [t.strip() for t in re.split(r",\s*", found.group(2))]
    storage = [t for t in arguments if t not in ("true", "false") and not t.lstrip("-").isdigit()]
    return (found.group(1), ", ".join(arguments)) if storage and all(t == "float" for t in storage) else None


def resource_usage(path: str) -> Dict[str, Dict[str, int]]:
    """symbol -> {"registers", "stack", "shared", "local"} from cuobjdump --dump-resource-usage."""
    from triton_launches import CUOBJDUMP
    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True,
                           check=True).stdout
    return {found.group(1): dict(zip(("registers", "stack", "shared", "local"), map(int, found.groups()[1:])))
            for found in re.finditer(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)}


def emulator_figures() -> Dict[str, Dict[str, float]]:
    """kernel -> the emulator's figures of its first recorded launch."""
    with open(EMULATOR_PROFILE) as f:
        rows = json.load(f)
    figures: Dict[str, Dict[str, float]] = {}
    for row in rows:
        name = KERNEL_NAME.search(row["kernel"]).group(1)
        if name in figures:
            continue
        shared = [row["shared loads"], row["shared stores"]]
        requests = sum(s["requests"] for s in shared)
        loads = row["global loads"]
        figures[name] = {
            "bank_conflicts": sum(s["bank_conflicts"] for s in shared),
            "wavefronts_per_request": sum(s["wavefronts"] for s in shared) / requests if requests else 0.0,
            "ideal_wavefronts_per_request": sum(s["ideal"] for s in shared) / requests if requests else 0.0,
            "load_sectors_per_request": loads["sectors_per_request"], "ideal_load_sectors": loads["ideal"],
            "case": row["case"],
        }
    return figures


def cuda_kernels(objects: str) -> List[Dict[str, object]]:
    """One row per CUDA kernel and architecture (the first float32 instantiation), from the objects .ci/nvcc-check
    kept in ``objects``."""
    from triton_launches import CUOBJDUMP
    rows, seen = [], set()
    for path in sorted(glob.glob(os.path.join(objects, "*_sm*.o"))):
        arch = int(re.search(r"_sm(\d+)\.o$", path).group(1))
        with tempfile.TemporaryDirectory() as extracted:
            subprocess.run([CUOBJDUMP, "-xelf", "all", os.path.abspath(path)], cwd=extracted, capture_output=True,
                           check=True)
            (cubin,) = glob.glob(os.path.join(extracted, "*.cubin"))
            functions = disassemble(cubin)
        usage = resource_usage(path)
        names = demangle(list(functions))
        for symbol, (instructions, labels) in functions.items():
            found = float32_instantiation(names[symbol])
            if found is None or found[0] not in SERVES or (found, arch) in seen:
                continue
            seen.add((found, arch))
            kernel, arguments = found
            first, last = main_loop(instructions, labels)
            rows.append(dict(backend="cuda", kernel=kernel, instantiation=f"{kernel}<{arguments}>",
                             arch=f"sm_{arch}", **usage[symbol],
                             main_loop=mix(instructions[first:last + 1]), whole_kernel=mix(instructions)))
    return rows


def triton_kernels() -> List[Dict[str, object]]:
    """One row per Triton kernel and architecture: its first float32 launch at the aligned shape."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from triton_launches import record_launches, specialise
    first_launch = {}
    for kernel, args, kwargs in record_launches():
        first_launch.setdefault(kernel.__name__, (kernel, args, kwargs))
    rows = []
    for arch in ARCHS:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        for name, (kernel, args, kwargs) in sorted(first_launch.items()):
            if name not in SERVES:
                continue
            signature, constexprs, attrs, options = specialise(kernel, args, kwargs, backend)
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
                file.write(compiled.asm["cubin"])
                file.flush()
                ((symbol, (instructions, labels)),) = disassemble(file.name).items()
                (usage,) = resource_usage(file.name).values()
            usage["shared"] = compiled.metadata.shared  # dynamic shared memory, which ptxas does not see
            first, last = main_loop(instructions, labels)
            constants = {kernel.arg_names[path[0]]: value for path, value in sorted(constexprs.items())}
            flags = {key: value for key, value in constants.items() if key.isupper() and not key.startswith("BLOCK")}
            rows.append(dict(backend="triton", kernel=name, arch=f"sm_{arch}", **usage, warps=options.num_warps,
                             instantiation=name + "".join(f" {key}={value}" for key, value in flags.items()),
                             constexprs={key: value for key, value in constants.items() if key.isupper()},
                             main_loop=mix(instructions[first:last + 1]), whole_kernel=mix(instructions)))
    return rows


def example(prefix: str):
    matches = [entry for entry in costs.EXAMPLES if entry[0].startswith(prefix)]
    return matches[0] if matches else None


def with_evidence(row: Dict[str, object], emulated: Dict[str, Dict[str, float]]) -> Dict[str, object]:
    """The row with its floors, the emulator's figures and the model's estimate per GPU."""
    shape, pass_name, bound = SERVES[row["kernel"]]
    row["bound"] = bound
    entry = example(shape)
    if entry is not None:
        description, function, arguments = entry
        cost = function(*arguments)[pass_name]
        row["floors"] = dict(shape=description, pass_=pass_name, gflop=round(cost.flops / 1e9, 3),
                             minimum_mb=round(cost.minimum_bytes / 1e6, 2),
                             **{f"{gpu.name} us": round(cost.floor_seconds(gpu.fp64_tensor_flops,
                                                                          gpu.bytes_per_second) * 1e6, 1)
                                for gpu in GPUS})
    figures = emulated.get(row["kernel"]) if row["backend"] == "cuda" else None
    if figures is not None:
        row["emulator"] = figures
    counts = row["main_loop"]
    ideal_wavefronts = (counts.get("shared_bytes", 0) / 128 /
                        max(1, counts.get("shared_loads", 0) + counts.get("shared_stores", 0)))
    wavefronts = figures["wavefronts_per_request"] if figures and figures["wavefronts_per_request"] else \
        max(1.0, ideal_wavefronts)
    sectors = figures["load_sectors_per_request"] / figures["ideal_load_sectors"] \
        if figures and figures["ideal_load_sectors"] else 1.0
    share = cost.minimum_bytes / cost.kernel_bytes if entry is not None else 1.0
    if sectors > SECTOR_SLACK:
        row["sector_reason"] = SECTOR_REASONS.get(row["kernel"], "")
    row["model"] = {gpu.name: estimate(counts, bound, gpu, wavefronts, sectors, share) for gpu in GPUS}
    return row


def table(rows: List[Dict[str, object]]) -> str:
    """One markdown line per kernel, backend and architecture."""
    lines = ["| backend | kernel | arch | bound | registers | spills (stack + local) | shared bytes | main loop: "
             "DMMA / DFMA / DADD+DMUL | MUFU (RCP64H) / division calls / conversions | LDS+STS / LDG+STG | "
             "instructions | bank conflicts | load sectors per request (ideal) | floor H100 / A100 (us) | "
             "estimate H100: fraction, limited by | A100 |",
             "|---|---|---|---|---:|---|---:|---|---|---|---:|---:|---|---|---|---|"]
    for row in rows:
        loop = row["main_loop"]
        emulator = row.get("emulator")
        floors = row.get("floors")
        h100, a100 = (row["model"][gpu.name] for gpu in GPUS)
        lines.append(
            f"| {row['backend']} | `{row['instantiation']}` | {row['arch']} | {row['bound']} | {row['registers']} | "
            f"{row['stack']} + {row['local']} | {row['shared']} | {loop.get('dmma', 0)} / {loop.get('dfma', 0)} / "
            f"{loop.get('dadd_dmul', 0)} | {loop.get('mufu', 0)} ({loop.get('rcp64h', 0)}) / "
            f"{loop.get('double_division_calls', 0) + loop.get('integer_division_calls', 0)} / "
            f"{loop.get('conversions', 0)} | {loop.get('shared_loads', 0) + loop.get('shared_stores', 0)} / "
            f"{loop.get('global_loads', 0) + loop.get('global_stores', 0)} | {loop.get('instructions', 0)} | "
            f"{int(emulator['bank_conflicts']) if emulator else '-'} | "
            + (f"{emulator['load_sectors_per_request']:.2f} ({emulator['ideal_load_sectors']:.2f})" if emulator
               else "-")
            + (f" | {floors[GPUS[0].name + ' us']:,.0f} / {floors[GPUS[1].name + ' us']:,.0f} | " if floors
               else " | - | ")
            + f"{h100['fraction']:.0%}, {h100['limited_by']} | {a100['fraction']:.0%}, {a100['limited_by']} |")
    reasons = {row["kernel"]: row["sector_reason"] for row in rows if "sector_reason" in row}
    lines += ["", f"Load sectors per request above {SECTOR_SLACK:g} times the ideal, and why:", ""]
    lines += [f"- `{kernel}`: {reason}." for kernel, reason in sorted(reasons.items())]
    return "\n".join(lines) + "\n"


def sources_digest() -> str:
    """A digest of everything the table is made from (kernel sources, the costs, the emulator's record, this
    script), so that a test can tell a stale record."""
    digest = hashlib.sha256()
    paths = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu*"), recursive=True)
                   + glob.glob(os.path.join(ROOT, "csrc", "common", "*.h"))
                   + glob.glob(os.path.join(ROOT, "fastkd", "ops", "**", "triton_backend.py"), recursive=True)
                   + glob.glob(os.path.join(ROOT, "fastkd", "ops", "_triton_*.py"))
                   + [os.path.join(ROOT, "fastkd", "ops", "costs.py"), EMULATOR_PROFILE, os.path.abspath(__file__)])
    for path in paths:
        digest.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"record the table in {RECORD}")
    parser.add_argument("--objects", help="a folder where FASTKD_NVCC_KEEP=DIR bash .ci/nvcc-check kept its "
                                          "objects (default: run it now)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run without TRITON_INTERPRET: interpreted kernels do not compile")
    import triton

    from triton_launches import ALIGNED_SHAPE
    with tempfile.TemporaryDirectory() as kept:
        objects = args.objects
        if objects is None:
            objects = kept
            subprocess.run(["bash", os.path.join(ROOT, ".ci", "nvcc-check")], check=True, stdout=subprocess.DEVNULL,
                           env=dict(os.environ, FASTKD_NVCC_KEEP=kept))
        rows = cuda_kernels(objects)
    rows += triton_kernels()
    emulated = emulator_figures()
    rows = [with_evidence(row, emulated) for row in sorted(rows, key=lambda r: (r["kernel"].lstrip("_"),
                                                                             r["backend"], r["instantiation"],
                                                                             r["arch"]))]
    text = table(rows)
    print(text)
    if args.write:
        write_record(RECORD, "evidence", dict(sources=sources_digest(), triton=triton.__version__,
                                              shape=ALIGNED_SHAPE, rows=rows),
                     "What a CPU can show of every GPU kernel",
                     "Written by `python benchmarks/kernel_evidence.py --write`; its docstring states every figure's "
                     "source and the model. Nothing here ran on a GPU.\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
