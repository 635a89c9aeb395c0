"""How the benchmarks measure: wall time with device synchronisation, peak memory, out-of-memory, and the
environment every result row records."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import platform
import resource
import time

import torch

import fastkd

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
SMALL_MMAP_THRESHOLD = 64 << 10  # while memory is measured: every block >= 64 KiB is mapped on its own
DEFAULT_MMAP_THRESHOLD = 32 << 20  # otherwise: glibc's dynamic threshold's ceiling on 64-bit Linux


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def environment(device: torch.device) -> dict:
    """What every row records about where and how it was measured."""
    return {
        "device": device_name(device),
        "tf32": (f"matmul={torch.backends.cuda.matmul.allow_tf32},cudnn={torch.backends.cudnn.allow_tf32},"
                 f"float32_matmul_precision={torch.get_float32_matmul_precision()}"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "pykeops": _version("pykeops"),
        "fastkd": fastkd.__version__,
        "threads": torch.get_num_threads(),
    }


OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_MESSAGES)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, region) -> float:
    """Seconds ``region()`` takes, from a synchronised start to a synchronised end (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        region()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    region()
    return time.perf_counter() - begin


class MemoryMeter:
    """Peak memory above a baseline: the caching allocator's peak on GPU; on CPU (Linux, glibc) the peak
    resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) with every block of 64 KiB or more
    mapped on its own while measuring, so that freed memory is returned and a reused block is seen.
    Elsewhere ``supported`` is False and no memory is reported."""

    def __init__(self, device: torch.device):
        self.device = device
        self._libc = None
        if device.type == "cuda":
            self.supported = True
            return
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._reset_peak()
            self._status_bytes("VmHWM")
            self.supported = True
        except (OSError, KeyError, AttributeError):
            self.supported = False

    @staticmethod
    def _status_bytes(key: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    @staticmethod
    def _reset_peak() -> None:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS

    @contextlib.contextmanager
    def measuring(self):
        """Within it, ``self.baseline()`` starts a measurement and ``self.peak()`` reads it."""
        if self.device.type != "cuda" and self.supported:
            self._libc.mallopt(M_MMAP_THRESHOLD, SMALL_MMAP_THRESHOLD)
        try:
            yield self
        finally:
            if self.device.type != "cuda" and self.supported:
                self._libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)

    def baseline(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._libc.malloc_trim(0)  # free heap pages go back, so reusing them shows in the resident size
            self._reset_peak()
            self._base = self._status_bytes("VmRSS")

    def restart_peak(self) -> None:
        """The next ``peak()`` counts from now on, still above the same baseline."""
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._reset_peak()

    def peak(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        return self._status_bytes("VmHWM") - self._base


def limit_cpu_memory(budget_bytes: int) -> None:
    """Makes allocations beyond ``budget_bytes`` more than this process maps now fail cleanly (an
    out-of-memory error, recorded as such) instead of waking the kernel's OOM killer."""
    with open("/proc/self/status") as status:
        mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + budget_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def available_cpu_memory() -> int:
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
