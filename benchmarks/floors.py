"""The machine's floors, measured at the start of a run, and the floor of every benchmarked row.

- **Rates**: copy bandwidth (a large tensor copied into another: bytes read + written over the median time)
  and the float32 and float64 GEMM rates (an n x n matmul: 2 n^3 FLOPs over the median time), on the run's
  device, under its TF32 setting and thread count.
- **Floor of a row** = max(bytes that must move once / bandwidth, FLOPs / GEMM rate), from the FLOP counts
  of ``fastkd.ops.costs``: the float64 rate for the full graph (affinity_full, affinity_distillation and the
  pooled graphs: evaluating it exactly takes float64 products), the float32 rate otherwise. Bytes: the
  inputs read once (forward), and in backward also the student's gradient written once (the teacher needs
  none). ``forward+backward`` adds the two passes' FLOPs and moves the inputs and the gradient once.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Callable, Dict, Tuple

import torch

import measure
from fastkd.ops import costs
from fastkd.reference.affinity import node_grid_shape

PASSES = ("forward", "backward")


def _significant(value: float) -> float:
    return float(f"{value:.6g}")  # as the CSV writes numbers


@dataclasses.dataclass(frozen=True)
class Rates:
    bytes_per_second: float  # copy bandwidth, bytes read + written
    float32_flops: float  # per second, n x n float32 matmul
    float64_flops: float

    def environment(self) -> dict:
        """The fields environment.json and every CSV row record."""
        return {"copy_gb_s": _significant(self.bytes_per_second / 1e9),
                "fp32_gemm_gflop_s": _significant(self.float32_flops / 1e9),
                "fp64_gemm_gflop_s": _significant(self.float64_flops / 1e9)}

    @classmethod
    def from_environment(cls, env: dict) -> "Rates":
        return cls(env["copy_gb_s"] * 1e9, env["fp32_gemm_gflop_s"] * 1e9, env["fp64_gemm_gflop_s"] * 1e9)


# (copy bytes, GEMM n): large enough to leave the caches and fill the device, small enough to take seconds
SIZES = {("cuda", False): (1 << 30, 8192), ("cuda", True): (256 << 20, 4096),
         ("cpu", False): (256 << 20, 2048), ("cpu", True): (64 << 20, 1024)}


def _median_seconds(device: torch.device, region: Callable[[], object], repeats: int) -> float:
    region()  # warm-up: allocation, kernel selection, thread pool
    return statistics.median(measure.timed(device, region) for _ in range(repeats))


def measure_rates(device: torch.device, quick: bool = False, copy_bytes: int = 0, gemm_size: int = 0,
                  repeats: int = 5) -> Rates:
    """The device's copy bandwidth and GEMM rates (``copy_bytes``, ``gemm_size`` override the sizes)."""
    default_bytes, default_n = SIZES[device.type, quick]
    copy_bytes, n = copy_bytes or default_bytes, gemm_size or default_n
    source = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    bandwidth = 2 * source.numel() * 4 / _median_seconds(device, lambda: target.copy_(source), repeats)
    del source, target
    rates = []
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        rates.append(2 * n**3 / _median_seconds(device, lambda: a @ b, repeats))
        del a, b
    return Rates(bandwidth, *rates)


# ---------------------------------------------------------------- FLOPs and bytes of each op

def full_graph(x: costs.Shape, per_row: bool = False) -> dict:
    """The full graph summed exactly: per pass the cheaper of the Gram identity and the direct tiles (the
    two algorithms fastkd chooses between; the direct count holds for the distillation loss's rows too)."""
    options = (costs.gram_full_graph(x, per_row), costs.direct_full_graph(x))
    return {name: min((option[name] for option in options), key=lambda cost: cost.flops) for name in PASSES}


def shape(op, batch: int, channels: int, height: int, width: int, element_bytes: int) -> costs.Shape:
    """The costs' Shape of a row: student and teacher with ``channels`` each, and the op's node count."""
    rows, cols = node_grid_shape(height, width, op.loss_kwargs.get("patch", 1), op.loss_kwargs.get("pool_scale"))
    return costs.Shape(batch, channels, channels, height, width, rows * cols, element_bytes)


def floor(op, batch: int, channels: int, height: int, width: int, element_bytes: int, mode: str,
          rates: Rates) -> Tuple[float, str]:
    """``(seconds, "memory" | "compute")``: the floor of ``op`` in ``mode`` at this size on a machine with
    ``rates``, and which bound sets it."""
    x = shape(op, batch, channels, height, width, element_bytes)
    passes: Dict[str, costs.Cost] = op.cost(x)
    gradient = x.batch * x.cs * x.height * x.width * x.element_bytes  # the student's, written once
    used = mode.split("+")  # "forward", "backward" or both
    flops = sum(passes[name].flops for name in used)
    moved = passes["forward"].minimum_bytes + (gradient if "backward" in used else 0)
    flops_per_second = rates.float64_flops if op.implementation_op == "affinity_full" else rates.float32_flops
    cost = costs.Cost(flops=flops, minimum_bytes=moved, kernel_bytes=moved)
    seconds = cost.floor_seconds(flops_per_second, rates.bytes_per_second)
    return seconds, "compute" if flops / flops_per_second >= moved / rates.bytes_per_second else "memory"
