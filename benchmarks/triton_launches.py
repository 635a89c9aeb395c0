"""The Triton kernel launches fastkd's losses really make, recorded on the CPU without running them, and the way
Triton's launcher specialises each one for a GPU: shared by tests/triton_compile_check.py (every variant compiles
without spills) and benchmarks/kernel_evidence.py (the SASS of one variant per kernel).

Import it in a process without TRITON_INTERPRET: the kernels must be decorated for compiling.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.runtime.jit import JITFunction, create_function_from_signature

import fastkd

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CUOBJDUMP = os.path.join(NVIDIA_BIN, "cuobjdump")
NVDISASM = os.path.join(NVIDIA_BIN, "nvdisasm")
ALIGNED_SHAPE = (2, 32, 32, 48)  # every size divisible by 16; the first shape recorded
ODD_SHAPE = (2, 19, 13, 21)
# Few nodes (63 pixels; pool_scale: 3 x 3 nodes) and more channels than a program's 32: the direct path's
# whole-D kernels and the node reductions' channel splits
FEW_NODES_SHAPE = (2, 40, 7, 9)


def record_launches():
    """Every Triton kernel launch of the losses' forward and backward passes, as (kernel, args, kwargs): float32
    first, then float16, bfloat16, float64; per dtype the aligned shape, the odd one, then few nodes."""
    launches = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append((kernel, args, kwargs))

    # The kernels were decorated for compiling (TRITON_INTERPRET unset when triton was imported); fastkd only
    # asks for TRITON_INTERPRET to accept CPU tensors, and the recorder runs nothing.
    os.environ["TRITON_INTERPRET"] = "1"
    original_run, JITFunction.run = JITFunction.run, record
    try:
        generator = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for shape in (ALIGNED_SHAPE, ODD_SHAPE):
                s = torch.randn(*shape, generator=generator).to(dtype).requires_grad_()
                t = torch.randn(*shape, generator=generator).to(dtype).requires_grad_()
                losses = [fastkd.ConsistencyLoss(border="valid", backend="triton"),
                          fastkd.ConsistencyLoss(border="same", dilation=2, backend="triton")]
                for algorithm in ("gram", "direct"):
                    options = dict(algorithm=algorithm, backend="triton")
                    losses += [fastkd.PairwiseAffinityLoss(**options),
                               fastkd.PairwiseAffinityLoss(patch=2, **options),
                               fastkd.PairwiseAffinityLoss(patch=2, pool="max", detach_norm=True, **options),
                               fastkd.AffinityDistillationLoss(**options)]
                losses += [fastkd.PairwiseAffinityLoss(window=2, backend="triton"),
                           fastkd.PairwiseAffinityLoss(window=1, patch=2, pool="max", detach_norm=True,
                                                       backend="triton"),
                           fastkd.PixelwiseKDLoss(temperature=4.0, backend="triton"),
                           fastkd.ProbabilityLoss(backend="triton")]
                for loss in losses:
                    loss(s, t).backward()
            s = torch.randn(*FEW_NODES_SHAPE, generator=generator).to(dtype).requires_grad_()
            t = torch.randn(*FEW_NODES_SHAPE, generator=generator).to(dtype).requires_grad_()
            for loss in (fastkd.PairwiseAffinityLoss(pool_scale=0.5, backend="triton"),
                         fastkd.PairwiseAffinityLoss(algorithm="direct", backend="triton"),
                         fastkd.AffinityDistillationLoss(algorithm="direct", backend="triton")):
                loss(s, t).backward()
    finally:
        JITFunction.run = original_run
        del os.environ["TRITON_INTERPRET"]
    return launches


def specialise(kernel, args, kwargs, backend):
    """(signature, constexprs, attrs, options) as Triton's launcher computes them for this backend."""
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def resources(cubin: bytes):
    """(registers, stack bytes, local bytes) of the one kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", file.name], capture_output=True, text=True,
                               check=True).stdout
    values = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
    return values["REG"], values["STACK"], values["LOCAL"]
