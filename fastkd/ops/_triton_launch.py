"""What the Triton backends share (a leaf: torch and triton only): launch options and helpers, and the
conversion of float64 results to a tensor's element type inside kernels."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

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


@triton.jit
def to_element_type(value, ptr):
    """A float64 ``value`` converted to the element type of ``ptr`` for ``tl.store``.

    Narrower types go through float32: the Triton interpreter converts float64 straight to bfloat16 wrongly
    (errors of order 1 measured with triton 3.9), and float32 holds every bfloat16 and float16 value.
    """
    if ptr.dtype.element_ty != tl.float64:
        value = value.to(tl.float32)
    return value.to(ptr.dtype.element_ty)
