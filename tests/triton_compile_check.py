"""Compiles every Triton kernel of fastkd as a GPU would get it, for sm_80, sm_89 and sm_90, with Triton's own
compiler and the ptxas that ships with triton; no GPU is needed. Fails on a compile error, on a kernel that
spills (any stack frame or local memory), on float64 ``tl.dot`` that does not lower to FP64 MMA, and on a
float scalar (``eps``, ``sign``, ``inverse_temperature``) that does not reach the kernel as float64 (a plain
Python float would be passed as float32 on a GPU, though not under the interpreter).

    python tests/triton_compile_check.py       one line per compiled variant (registers, spills), exit 1 on a failure

The variants are the launches the losses really make: every public loss is run with ``backend="triton"`` on
CPU tensors, and each kernel launch is recorded instead of run. Each recorded launch is then specialised the
way Triton's launcher specialises it on a GPU (an integer 1 becomes a constant, integers and pointers divisible
by 16 get that alignment; so contiguous inputs, 1 x 1 patches and sizes divisible by 16 compile to other code
than odd shapes) and compiled per architecture. A 64-bit variant of each kernel (tensors past 2^31 elements)
is compiled too. Run by test_triton_compile.py in a process without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET: interpreted kernels do not compile"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from fastkd._triton import TRITON_ERROR  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from triton_launches import record_launches, resources, specialise  # noqa: E402

ARCHS = (80, 89, 90)
# FP64 tensor-core MMA: m8n8k4 (sm_80 and up; triton 3.8 and 3.9 use it on sm_90 too) or the sm_90 shapes
# m16n8k{4,8,16} (triton 3.6 uses m16n8k16 there)
FP64_MMA = re.compile(r"mma\.sync\.aligned\.m\d+n\d+k\d+\.row\.col\.f64")
FP64_MMA_ARCHS = (80, 90)  # sm_89 (and sm_86) have no FP64 tensor cores: float64 tl.dot is FMAs there
FLOAT64_SCALARS = ("eps", "sign", "inverse_temperature")


def variants(launches):
    """(label, kernel, signature, constexprs, attrs, options, target) for each architecture: every distinct
    specialisation of the float32 launches; for the other dtypes, one per kernel and alignment; and one 64-bit
    variant per kernel (sizes and strides past 2^31, nothing known about alignment)."""
    chosen = []
    for arch in ARCHS:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        seen = set()
        for kernel, args, kwargs in launches:
            signature, constexprs, attrs, options = specialise(kernel, args, kwargs, backend)
            dtype = next((ty for name, ty in signature.items() if name.endswith("_ptr") and ty != "*fp64"), "*fp64")
            flags = ",".join(f"{kernel.arg_names[path[0]]}={value}" for path, value in sorted(constexprs.items())
                             if not kernel.arg_names[path[0]].startswith("BLOCK"))
            aligned = sum(1 for value in attrs.values() if value)  # arguments known divisible by 16
            key = (kernel.__name__, dtype, aligned, flags if dtype == "*fp32" else None)
            if key in seen:
                continue
            seen.add(key)
            label = f"{kernel.__name__} sm_{arch} {dtype[1:]} aligned={aligned} {flags}"
            chosen.append((label, kernel, signature, constexprs, attrs, options, target))
            if (kernel.__name__, "i64") not in seen:
                seen.add((kernel.__name__, "i64"))
                wide = {name: "i64" if ty == "i32" else ty for name, ty in signature.items()}
                chosen.append((f"{label} i64", kernel, wide, constexprs, {}, options, target))
    return chosen


CHOSEN = []  # the variants, set before the worker processes fork (kernels do not pickle)


def compile_variant(index):
    """(ok, line) for variant CHOSEN[index]."""
    label, kernel, signature, constexprs, attrs, options, target = CHOSEN[index]
    problems = [f"{name} is {signature[name]}, not fp64" for name in FLOAT64_SCALARS
                if name in signature and signature[name] != "fp64"]
    try:
        result = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
    except Exception as error:
        return False, f"FAIL {label}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    registers, stack, local = resources(result.asm["cubin"])
    mma = FP64_MMA.search(result.asm["ptx"]) is not None
    if stack or local:
        problems.append(f"spills: {stack} bytes stack, {local} bytes local memory")
    if "tt.dot" in result.asm["ttir"] and target.arch in FP64_MMA_ARCHS and not mma:  # fastkd's dots are float64
        problems.append(f"float64 tl.dot did not lower to FP64 MMA ({FP64_MMA.pattern})")
    line = (f"{label} warps {options.num_warps} registers {registers} stack {stack} local {local}"
            f"{' fp64-mma' if mma else ''}")
    return not problems, f"FAIL {line}: {'; '.join(problems)}" if problems else f"ok {line}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", help="only the kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiles in parallel (default: cores)")
    arguments = parser.parse_args()
    if TRITON_ERROR is not None:
        print(f"FAIL triton: {TRITON_ERROR}")
        return 1
    launches = [launch for launch in record_launches()
                if arguments.kernel is None or arguments.kernel in launch[0].__name__]
    kernels = sorted({kernel.__name__ for kernel, _, _ in launches})
    print(f"recorded {len(launches)} launches of {len(kernels)} kernels: {', '.join(kernels)}", flush=True)
    CHOSEN[:] = variants(launches)
    # fork: the workers inherit CHOSEN; each compile is single-threaded MLIR plus ptxas
    with multiprocessing.get_context("fork").Pool(max(1, arguments.jobs)) as pool:
        results = list(pool.imap(compile_variant, range(len(CHOSEN))))
    for _, line in results:
        print(line)
    failures = sum(1 for ok, _ in results if not ok)
    print(f"{len(results)} variants for {', '.join(f'sm_{arch}' for arch in ARCHS)}: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
