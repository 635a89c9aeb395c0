"""Compiles every Triton kernel of fastkd for sm_80 and sm_90 with Triton's own compiler (to PTX and a cubin
through the ptxas that ships with triton); no GPU is needed. Run by test_triton_compile.py in a process
without TRITON_INTERPRET (under the interpreter ``triton.jit`` returns functions that cannot be compiled).

    python tests/triton_compile_check.py        prints one line per compiled variant, exits 1 on a failure
"""

import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastkd.triton_kernels import affinity, affinity_window, consistency, nodes  # noqa: E402

ARCHS = (80, 90)
INPUT_TYPES = ("*fp16", "*bf16", "*fp32", "*fp64")
FLOAT_SCALARS = ("eps", "sign")  # Python floats: the JIT passes them as fp32
FP64_MMA = "mma.sync.aligned.m8n8k4.row.col.f64"

# kernel: (pointers holding the caller's dtype (inputs and gradients), constexpr flags (values to combine, or
# the list of combinations that are launched), the block sizes the launchers use, whether it multiplies
# float64 tiles with tl.dot)
KERNELS = {
    nodes.node_norm_kernel: (("x_ptr",), dict(MAX_POOL=(False, True)),
                             dict(BLOCK_C=nodes.BLOCK_CHANNELS, BLOCK_N=nodes.BLOCK_NODES), False),
    nodes.node_backward_kernel: (("x_ptr", "grad_x_ptr"), dict(DETACH_NORM=(False, True), MAX_POOL=(False, True)),
                                 dict(BLOCK_C=nodes.BLOCK_CHANNELS, BLOCK_N=nodes.BLOCK_NODES), False),
    affinity.gram_kernel: (("x_ptr", "y_ptr"), dict(HAS_WEIGHT=(False, True), MAX_POOL=(False, True)),
                           dict(BLOCK_X=affinity.BLOCK_CHANNELS, BLOCK_Y=affinity.BLOCK_CHANNELS,
                                BLOCK_N=affinity.BLOCK_NODES), True),
    affinity.gram_apply_kernel: (("p_ptr", "q_ptr"),  # the launches of gram_rows and affinity_backward
                                 [dict(HAS_Q=q, HAS_WEIGHTED=weighted, STORE=store, DOTS=not store, MAX_POOL=pool)
                                  for q, weighted, store in ((True, False, False), (False, False, False),
                                                             (True, False, True), (True, True, True))
                                  for pool in (False, True)],
                                 dict(BLOCK_C=affinity.BLOCK_CHANNELS, BLOCK_N=affinity.BLOCK_NODES), True),
    affinity.direct_rows_kernel: (("s_ptr", "t_ptr"), dict(MAX_POOL=(False, True)),
                                  dict(BLOCK_I=affinity.BLOCK_NODES, BLOCK_J=affinity.BLOCK_NODES,
                                       BLOCK_C=affinity.BLOCK_CHANNELS), True),
    affinity.direct_backward_kernel: (("s_ptr", "t_ptr"), dict(NEED_S=(True,), NEED_T=(False, True),
                                                              MAX_POOL=(False, True)),
                                      dict(BLOCK_I=affinity.BLOCK_NODES, BLOCK_J=affinity.BLOCK_NODES,
                                           BLOCK_C=affinity.BLOCK_CHANNELS), True),
    affinity_window._window_forward_kernel: (("s_ptr", "t_ptr"), dict(MAX_POOL=(False, True)),
                                             dict(BLOCK_C=affinity_window.BLOCK_CHANNELS,
                                                  BLOCK_N=affinity_window.BLOCK_N), False),
    affinity_window._window_backward_kernel: (("x_ptr",), dict(MAX_POOL=(False, True)),
                                              dict(BLOCK_C=affinity_window.BLOCK_CHANNELS,
                                                   BLOCK_N=affinity_window.BLOCK_N), False),
    consistency._consistency_forward_kernel: (("s_ptr", "t_ptr"), dict(VALID=(False, True)),
                                              dict(BLOCK_C=consistency.BLOCK_C, BLOCK_P=consistency.BLOCK_P), False),
    consistency._consistency_backward_kernel: (("x_ptr", "out_ptr"), dict(),
                                               dict(BLOCK_C=consistency.BLOCK_C, BLOCK_P=consistency.BLOCK_P), False),
}


def signature(kernel, caller_pointers, input_type, constexprs, int_type):
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = input_type if name in caller_pointers else "*fp64"
        else:
            types[name] = "fp32" if name in FLOAT_SCALARS else int_type
    return types


def variants():
    """Every flag combination in float32 with 32-bit sizes, every input dtype with the first combination,
    and 64-bit sizes (tensors past 2^31 elements) with the first combination."""
    for kernel, (pointers, flags, blocks, uses_dot) in KERNELS.items():
        if isinstance(flags, dict):  # every combination of the values
            flags = [dict(zip(flags, values)) for values in itertools.product(*flags.values())]
        combinations = flags
        for arch in ARCHS:
            for combination in combinations:
                yield kernel, pointers, {**combination, **blocks}, "*fp32", "i32", arch, uses_dot
            for input_type in INPUT_TYPES:
                if input_type != "*fp32":
                    yield kernel, pointers, {**combinations[0], **blocks}, input_type, "i32", arch, uses_dot
            yield kernel, pointers, {**combinations[0], **blocks}, "*fp32", "i64", arch, uses_dot


def main() -> int:
    failures = 0
    for kernel, pointers, constexprs, input_type, int_type, arch, uses_dot in variants():
        flags = ",".join(f"{k}={v}" for k, v in constexprs.items() if not k.startswith("BLOCK"))
        label = f"{kernel.__name__} sm_{arch} {input_type[1:]} {int_type} {flags}"
        try:
            compiled = triton.compile(ASTSource(kernel, signature(kernel, pointers, input_type, constexprs, int_type),
                                                constexprs), target=GPUTarget("cuda", arch, 32))
        except Exception as error:  # report every failing variant, not only the first
            failures += 1
            print(f"FAIL {label}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            continue
        ptx = compiled.asm["ptx"]
        mma = FP64_MMA in ptx
        if uses_dot and not mma:
            failures += 1
            print(f"FAIL {label}: float64 tl.dot did not lower to FP64 MMA ({FP64_MMA})")
            continue
        print(f"ok {label} cubin {len(compiled.asm['cubin'])} bytes{' fp64-mma' if mma else ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
