"""fastkd's benchmarks: every implementation of each memory-heavy loss against naive PyTorch, time and
peak memory over a sweep of feature-map sizes, with the loss's accuracy against a float64 reference.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--ops OP ...] [--out DIR]

writes into ``--out`` (default ``benchmarks/results/<device>``, ``...-quick`` for ``--quick``):
``results.csv`` (one row per op, size, provider and mode), ``environment.json``, ``summary.md`` and one
PNG per op and channel count (time and peak memory against m, log-log), the last two by ``report.py``.

Before the sweep it measures the device's floors (copy bandwidth, float32 and float64 GEMM rates: see
``floors.py``); every row records its floor, ``max(bytes / bandwidth, FLOPs / GEMM rate)``, and its time as
a multiple of it.

Inputs are near convergence, where the Gram identity cancels: correlated post-ReLU features (plain logits
for the consistency, pixel-wise KD and probability losses) and a teacher equal to the student times
``1 + mismatch * noise``. The student requires grad, the teacher does not. Modes: ``forward`` (building
the autograd graph), ``backward`` (the gradient of the student, after an untimed forward) and
``forward+backward``. Each provider is warmed up (compiled, for ``naive+compile`` and ``keops``) before it
is timed; the providers then take turns, every repetition timing each of them in each mode, so that a busy
machine slows all alike; rows give the median and the quartiles. A provider that runs out of memory, or
would take longer than ``--time-limit`` seconds for one forward+backward (measured, or predicted from the
last size it ran), is recorded as ``oom`` or ``timeout`` at that size and every larger one of the sweep; the
sweep goes on with the others. On CPU the memory budget is enforced with an address-space limit, so running
out of it is an allocation error, not the OOM killer.

Run the installed package (``pip install .``; as a script, which puts ``benchmarks/``, not the source
tree, on ``sys.path``). Plots need ``matplotlib``; ``keops`` runs where ``pykeops`` is installed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import math
import os
import re
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import floors
import measure
import providers as providers_module
import report
from providers import OPS, PROVIDER_NAMES
from report import MODES
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# the literal reference materialises about this many B x m x m float64 matrices (or B x C x H x W maps for
# the losses on logits, which their shifted copies, softmaxes and gradients multiply); above REFERENCE_BUDGET
# bytes, and for the max-pooled graphs (Op.max_pools: the same subgradient as the providers where a patch's
# maximum is tied), the accuracy is measured against fastkd's torch backend in float64, which the tests check
# against the literal
LITERAL_COPIES = {"affinity_full": 8, "affinity_window": 10, "affinity_distillation": 8, "consistency": 40,
                  "affinity_pooled": 8, "affinity_patch_max": 8, "pixelwise_kd": 12, "probability": 10}
REFERENCE_BUDGET = 1 << 30
FIELDS = ["op", "provider", "kind", "mode", "dtype", "batch", "channels", "height", "width", "m", "status", "note",
          "median_ms", "q1_ms", "q3_ms", "min_ms", "repeats", "peak_bytes", "loss_rel_error", "grad_rel_error",
          "reference", "floor_ms", "floor_bound", "x_floor", "mismatch", "device", "tf32", "torch", "triton",
          "pykeops", "fastkd", "threads", "copy_gb_s", "fp32_gemm_gflop_s", "fp64_gemm_gflop_s"]


@dataclasses.dataclass(frozen=True)
class Series:
    """One sweep: an op at a fixed batch and channel count over growing feature maps (height, width)."""
    op: str
    batch: int
    channels: int
    sizes: Tuple[Tuple[int, int], ...]


# The papers' feature maps: 65x65 (He et al., 513 crops at stride 8), 64x128 (Liu et al., 512x1024 crops
# at stride 8), then up to full output resolution; C = 19 (Cityscapes logits) to 512 (teacher features).
AFFINITY_SIZES = ((16, 16), (32, 32), (32, 64), (65, 65), (64, 128), (128, 128), (128, 256), (256, 512), (512, 1024))
WIDE_AFFINITY_SIZES = ((32, 32), (65, 65), (64, 128), (128, 128), (128, 256), (256, 512), (512, 1024))
WINDOW_SIZES = ((32, 32), (65, 65), (64, 128), (128, 256), (256, 512), (512, 1024), (1024, 2048))
PIXEL_SIZES = ((65, 65), (64, 128), (128, 256), (256, 512), (512, 1024))  # the per-pixel losses, C = 19 logits
CONSISTENCY_SIZES = PIXEL_SIZES + ((1024, 2048),)
POOLED_SIZES = ((16, 16), (32, 32), (65, 65), (64, 128), (128, 128))  # StructKD's graph: 4 to 9 nodes
PATCH_MAX_SIZES = ((32, 32), (65, 65), (64, 128), (128, 128), (128, 256), (256, 512))  # m / 4 nodes


# --headline: each CPU series at one size, the cases issue 13 holds fastkd to on a 2-core CPU (and the wide
# full graphs at the largest size their float64 Gram finishes within the time limit there).
HEADLINE_SIZES = {("affinity_full", 64): (256, 512), ("affinity_full", 512): (128, 128),
                  ("affinity_distillation", 64): (256, 512), ("affinity_distillation", 512): (128, 128),
                  ("affinity_window", 64): (128, 256), ("consistency", 19): (512, 1024),
                  ("affinity_pooled", 512): (128, 128), ("affinity_patch_max", 512): (256, 512),
                  ("pixelwise_kd", 19): (512, 1024), ("probability", 19): (512, 1024)}


def plan(device: torch.device, quick: bool) -> List[Series]:
    if quick:
        return [Series("affinity_full", 1, 16, ((16, 16), (32, 32))),
                Series("affinity_window", 1, 16, ((16, 16), (32, 32))),
                Series("affinity_distillation", 1, 16, ((16, 16), (32, 32))),
                Series("consistency", 1, 19, ((32, 32), (64, 64))),
                Series("affinity_pooled", 1, 16, ((16, 16), (32, 32))),
                Series("affinity_patch_max", 1, 16, ((16, 16), (32, 32))),
                Series("pixelwise_kd", 1, 19, ((32, 32), (64, 64))),
                Series("probability", 1, 19, ((32, 32), (64, 64)))]
    batch = 8 if device.type == "cuda" else 2
    series = []
    for op in ("affinity_full", "affinity_distillation"):
        series += [Series(op, batch, 64, AFFINITY_SIZES), Series(op, batch, 512, WIDE_AFFINITY_SIZES)]
    series.append(Series("affinity_window", batch, 64, WINDOW_SIZES))
    consistency_sizes = CONSISTENCY_SIZES + (((2048, 4096),) if device.type == "cuda" else ())
    series.append(Series("consistency", batch, 19, consistency_sizes))
    series += [Series("affinity_pooled", batch, 512, POOLED_SIZES),
               Series("affinity_patch_max", batch, 512, PATCH_MAX_SIZES)]
    series += [Series(op, batch, 19, PIXEL_SIZES) for op in ("pixelwise_kd", "probability")]
    return series


def make_inputs(op: str, series: Series, height: int, width: int, dtype, device, mismatch: float, seed: int):
    """Student (requires grad) and teacher near convergence: features mixed from 8 smooth latent maps plus
    noise, after a ReLU for the feature losses (not for the ops on logits); teacher = student * (1 +
    mismatch * noise). Both contiguous (NCHW), as a network's features are."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (series.batch, series.channels, height, width)
    latent = F.avg_pool2d(torch.randn(series.batch, 8, height, width, generator=gen, device=device), 5, 1, 2)
    mix = torch.randn(series.channels, 8, generator=gen, device=device)
    # (einsum lays its result out as (C, B, H, W) in memory: every provider would read strided input)
    student = torch.einsum("ck,bkhw->bchw", mix, latent).contiguous() + 0.1 * torch.randn(shape, generator=gen,
                                                                                          device=device)
    if not OPS[op].logits:
        student = student.relu()
    teacher = student * (1 + mismatch * torch.randn(shape, generator=gen, device=device))
    return student.to(dtype).requires_grad_(), teacher.to(dtype)


def reference(op, s, t) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], str]:
    """The float64 loss and student gradient, and which reference gave them ("" where none could run)."""
    batch, channels, height, width = s.shape
    per_copy = batch * channels * height * width  # a float64 copy of the input
    if not op.logits:  # and the m x m matrices of the graph's nodes
        per_copy = max(per_copy, batch * floors.shape(op, batch, channels, height, width, 8).nodes ** 2)
    literal = LITERAL_COPIES[op.name] * per_copy * 8 <= REFERENCE_BUDGET and not op.max_pools
    s64 = s.detach().to(torch.float64).requires_grad_()
    try:
        if literal:
            loss = op.reference(s64, t.to(torch.float64))
        else:
            loss = op.loss_class(**op.loss_kwargs, backend="torch")(s64, t.to(torch.float64))
        (grad,) = torch.autograd.grad(loss, s64)
    except (RuntimeError, MemoryError) as error:
        if not measure.is_out_of_memory(error):
            raise
        return None, None, ""
    return loss.detach(), grad, "literal" if literal else "fastkd-torch-fp64"


def relative_error(value: torch.Tensor, expected: Optional[torch.Tensor]) -> Optional[float]:
    if expected is None:
        return None
    difference = torch.linalg.vector_norm(value.detach().to(torch.float64) - expected)
    return (difference / torch.linalg.vector_norm(expected)).item()


class Sweep:
    def __init__(self, args, device: torch.device, env: dict, writer, rates: floors.Rates):
        self.args = args
        self.device = device
        self.env = env
        self.writer = writer
        self.rates = rates
        self.meter = measure.MemoryMeter(device)
        self.unavailable: Dict[str, Dict[str, str]] = {}

    def run(self, series: Series) -> None:
        op = OPS[series.op]
        runnable, self.unavailable[op.name] = providers_module.providers(op, self.device)
        if self.args.providers is not None:
            runnable = [provider for provider in runnable if provider.name in self.args.providers]
        stopped: Dict[str, Tuple[str, str]] = {}  # provider -> (status, note) for every larger size
        last_call: Dict[str, Tuple[int, float]] = {}  # provider -> (m, seconds of one forward+backward)
        for height, width in series.sizes:
            m = height * width
            base = dict(op=op.name, dtype=self.args.dtype, batch=series.batch, channels=series.channels,
                        height=height, width=width, m=m, mismatch=self.args.mismatch, **self.env)
            to_try = []
            for provider in runnable:
                status = stopped.get(provider.name) or self.predicted_timeout(provider, last_call, m)
                if status is None:
                    to_try.append(provider)
                else:
                    self.write_skipped(base, provider, *status)
            if not to_try:
                print(f"{op.name} B={series.batch} C={series.channels} {height}x{width}: every provider past its "
                      f"limit", flush=True)
                continue
            try:
                s, t = make_inputs(op.name, series, height, width, DTYPES[self.args.dtype], self.device,
                                   self.args.mismatch, self.args.seed)
            except (RuntimeError, MemoryError) as error:
                if not measure.is_out_of_memory(error):
                    raise
                for provider in to_try:
                    self.write_skipped(base, provider, "oom", "the inputs alone do not fit")
                continue
            expected_loss, expected_grad, reference_name = reference(op, s, t)
            ready = []
            for provider in to_try:
                outcome = self.prepare(provider, s, t, m, expected_loss, expected_grad, reference_name)
                if outcome["status"] != "ok":
                    if outcome["status"] in ("oom", "timeout"):
                        stopped[provider.name] = (outcome["status"], f"{outcome['status']} at m={m} already")
                    self.write_skipped(base, provider, outcome["status"], outcome["note"])
                    continue
                last_call[provider.name] = (m, outcome.pop("call_seconds"))
                ready.append((provider, outcome))
            self.time_and_write(base, ready, s, t)
            del s, t
            self.free()
            print(f"{op.name} B={series.batch} C={series.channels} {height}x{width}: "
                  f"{len(ready)}/{len(runnable)} providers measured", flush=True)

    def predicted_timeout(self, provider, last_call, m) -> Optional[Tuple[str, str]]:
        if provider.name not in last_call:
            return None
        last_m, seconds = last_call[provider.name]
        predicted = seconds * (m / last_m) ** provider.cost_exponent
        if predicted <= self.args.time_limit:
            return None
        return "timeout", (f"predicted {predicted:.3g} s per forward+backward from {seconds:.3g} s at m={last_m} "
                           f"(limit {self.args.time_limit:g} s)")

    def step(self, provider, s, t):
        loss = provider.loss(s, t)
        (grad,) = torch.autograd.grad(loss, s)
        return loss, grad

    def prepare(self, provider, s, t, m, expected_loss, expected_grad, reference_name) -> dict:
        """Warm-up, then one forward+backward measuring peak memory and accuracy: a dict with status, note,
        the row fields measured here, and ``call_seconds``."""
        try:
            first = measure.timed(self.device, lambda: self.step(provider, s, t))
            if first > self.args.time_limit and not provider.compiles:
                return {"status": "timeout", "note": f"one forward+backward took {first:.3g} s "
                                                     f"(limit {self.args.time_limit:g} s)"}
            seconds = measure.timed(self.device, lambda: self.step(provider, s, t))
            if seconds > self.args.time_limit:
                return {"status": "timeout", "note": f"one forward+backward took {seconds:.3g} s "
                                                     f"(limit {self.args.time_limit:g} s)"}
            fields = {"status": "ok", "note": "", "call_seconds": seconds, "reference": reference_name}
            with self.meter.measuring():
                if self.meter.supported:
                    self.meter.baseline()
                loss = provider.loss(s, t)
                forward_peak = self.meter.peak() if self.meter.supported else None
                if self.meter.supported:
                    self.meter.restart_peak()
                (grad,) = torch.autograd.grad(loss, s)
                backward_peak = self.meter.peak() if self.meter.supported else None
            fields["peaks"] = {"forward": forward_peak, "backward": backward_peak,
                               "forward+backward": None if forward_peak is None else max(forward_peak, backward_peak)}
            fields["loss_rel_error"] = relative_error(loss, expected_loss)
            fields["grad_rel_error"] = relative_error(grad, expected_grad)
            return fields
        except Exception as error:  # recorded in the results, not raised: the sweep goes on
            out_of_memory = measure.is_out_of_memory(error)
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            return {"status": "oom" if out_of_memory else "error", "note": f"{type(error).__name__}: {first_line[:300]}"}
        finally:
            self.free()

    def time_and_write(self, base, ready, s, t) -> None:
        times = {(provider.name, mode): [] for provider, _ in ready for mode in MODES}
        for _ in range(self.args.repeats):
            for provider, _ in ready:
                for mode in MODES:
                    times[provider.name, mode].append(self.time_mode(provider, mode, s, t))
        for provider, fields in ready:
            for mode in MODES:
                samples = sorted(times[provider.name, mode])
                quartiles = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 \
                    else samples * 3
                self.write(base, provider, mode, status="ok", note="", median_ms=statistics.median(samples) * 1e3,
                           q1_ms=quartiles[0] * 1e3, q3_ms=quartiles[2] * 1e3, min_ms=samples[0] * 1e3,
                           repeats=len(samples), peak_bytes=fields["peaks"][mode], reference=fields["reference"],
                           loss_rel_error=fields["loss_rel_error"], grad_rel_error=fields["grad_rel_error"])

    def time_mode(self, provider, mode, s, t) -> float:
        if mode == "forward":
            return measure.timed(self.device, lambda: provider.loss(s, t))
        if mode == "forward+backward":
            return measure.timed(self.device, lambda: self.step(provider, s, t))
        loss = provider.loss(s, t)
        return measure.timed(self.device, lambda: torch.autograd.grad(loss, s))

    def write_skipped(self, base, provider, status, note) -> None:
        for mode in MODES:
            self.write(base, provider, mode, status=status, note=note)

    def write(self, base, provider, mode, **fields) -> None:
        seconds, bound = floors.floor(OPS[base["op"]], base["batch"], base["channels"], base["height"], base["width"],
                                      DTYPES[base["dtype"]].itemsize, mode, self.rates)
        floor_ms = seconds * 1e3
        x_floor = fields["median_ms"] / floor_ms if fields.get("median_ms") is not None else None
        row = dict(base, provider=provider.name, kind=provider.kind, mode=mode, floor_ms=floor_ms, floor_bound=bound,
                   x_floor=x_floor, **fields)
        self.writer.writerow({key: _format(row.get(key)) for key in FIELDS})
        self.writer.flush()  # an interrupted sweep keeps every row it measured

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _format(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


class RowWriter:
    """Rows of ``FIELDS`` into a CSV file."""

    def __init__(self, path: str):
        self.file = open(path, "w", newline="")
        self.csv = csv.DictWriter(self.file, FIELDS)
        self.csv.writeheader()
        self.writerow = self.csv.writerow
        self.flush = self.file.flush
        self.close = self.file.close


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _size(text: str) -> Tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if match is None or min(map(int, match.groups())) < 3:
        raise argparse.ArgumentTypeError(f"a size is HxW with H, W >= 3, got {text!r}")
    return int(match[1]), int(match[2])


def sized(series: Series, args) -> Series:
    """``series`` at the sizes ``--sizes`` or ``--headline`` asks for, else its own."""
    if args.headline:
        return dataclasses.replace(series, sizes=(HEADLINE_SIZES[series.op, series.channels],))
    return series if args.sizes is None else dataclasses.replace(series, sizes=tuple(args.sizes))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a small sweep (about two minutes on a 2-core CPU): checks that everything runs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=None, help="default: all")
    parser.add_argument("--providers", nargs="+", choices=PROVIDER_NAMES, default=None,
                        help="only these providers; default: all that can run here")
    parser.add_argument("--sizes", nargs="+", type=_size, default=None, metavar="HxW",
                        help="feature-map sizes for every op, instead of the sweep's")
    parser.add_argument("--headline", action="store_true",
                        help="each series at one size only, the headline case (run.HEADLINE_SIZES)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 3 quick, 5 CPU, 15 GPU)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds one forward+backward may take (default 5 quick, 10 CPU, 10 GPU)")
    parser.add_argument("--memory-budget-gib", type=float, default=None,
                        help="CPU only: memory the sweep may use (default 80%% of what is available)")
    parser.add_argument("--mismatch", type=float, default=1e-3, help="teacher = student * (1 + mismatch * noise)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (off by default: see the README)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default benchmarks/results/<device>[-quick]")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.time_limit is not None and not args.time_limit > 0:
        parser.error("--time-limit must be positive")
    if args.headline and (args.quick or args.sizes):
        parser.error("--headline chooses the sizes: not with --quick or --sizes")
    if args.mismatch < 0 or not math.isfinite(args.mismatch):
        parser.error("--mismatch must be a finite number >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.repeats is None:
        args.repeats = 3 if args.quick else 15 if gpu else 5
    if args.time_limit is None:
        args.time_limit = 5.0 if args.quick else 10.0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    torch._dynamo.config.cache_size_limit = 256  # one compiled graph per shape; never fall back silently
    env = measure.environment(device)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   slug(f"{device.type} {env['device']}") + ("-quick" if args.quick else ""))
    os.makedirs(out, exist_ok=True)
    rates = floors.measure_rates(device, quick=args.quick)  # before the memory limit: its buffers are large
    env.update(rates.environment())
    print(f"floors on {env['device']}: copy {env['copy_gb_s']:g} GB/s, float32 GEMM {env['fp32_gemm_gflop_s']:g} "
          f"GFLOP/s, float64 GEMM {env['fp64_gemm_gflop_s']:g} GFLOP/s", flush=True)
    if not gpu and sys.platform.startswith("linux"):
        budget = args.memory_budget_gib * 2**30 if args.memory_budget_gib else 0.8 * measure.available_cpu_memory()
        torch.ones(64, 64) @ torch.ones(64, 64)  # start the thread pool before its stacks count against the limit
        measure.limit_cpu_memory(int(budget))
        env["memory_budget_gib"] = round(budget / 2**30, 1)
    series_list = [sized(series, args) for series in plan(device, args.quick) if args.ops is None or series.op in args.ops]
    started = time.time()
    writer = RowWriter(os.path.join(out, "results.csv"))
    sweep = Sweep(args, device, {key: env[key] for key in FIELDS if key in env}, writer, rates)
    try:
        for series in series_list:
            sweep.run(series)
    finally:
        writer.close()
        meta = dict(env, dtype=args.dtype, repeats=args.repeats, time_limit_s=args.time_limit,
                    mismatch=args.mismatch, seed=args.seed, quick=args.quick, minutes=round((time.time() - started) / 60, 1),
                    command=" ".join(["python", "benchmarks/run.py"] + (argv if argv is not None else sys.argv[1:])),
                    unavailable=sweep.unavailable,
                    auto={series.op: providers_module.auto_provider(OPS[series.op], device) for series in series_list})
        with open(os.path.join(out, "environment.json"), "w") as handle:
            json.dump(meta, handle, indent=2)
    report.write_report(out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
