"""Launch-side helpers the Triton kernel modules share."""

from __future__ import annotations

import contextlib

import torch

# Passed to every launch. An explicit register limit (.maxnreg) makes ptxas allocate without spilling: with
# Triton's default ptxas flags (--regAllocOptLevel=2, ptxas 13) several fastkd kernels were held at 128 or
# 168 registers and spilled 8-64 bytes per thread, and with this limit none spills on sm_80, sm_89 or sm_90
# (tests/triton_compile_check.py prints each kernel's registers). The interpreter ignores it.
KERNEL_OPTIONS = dict(maxnreg=255)


def on_device(x: torch.Tensor):
    """Launches on ``x``'s GPU (not the current one) for multi-GPU processes; nothing to do on CPU."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def strides(x: torch.Tensor):
    """The four element strides of a (B, C, H, W) tensor; kernels take any layout, so nothing is copied."""
    return tuple(x.stride())


def fixed_order_sum(partials: torch.Tensor) -> torch.Tensor:
    """Sum of per-program partial results. Kernels never add into shared memory locations with atomics;
    each program writes its own partial and they are reduced here in a fixed order, so the result is the
    same bit for bit on every run."""
    return partials.sum()
