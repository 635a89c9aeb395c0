"""Checks the installed CUDA build of fastkd._C (no GPU needed): run from the repository root with the python of
a venv where `pip install .` built against a CUDA torch.

- build_info() says cuda=1 with the default architectures of setup.py (CI sets no TORCH_CUDA_ARCH_LIST);
- every op schema declared in csrc/<op>/<op>_schema.cpp has a CUDA kernel in the dispatcher under fastkd::, and a
  CPU implementation exactly where csrc/<op>/<op>_cpu.cpp exists; its fastkd_emulated:: twin has a CPU kernel;
- cuobjdump (shipped inside triton) lists SASS for every default architecture and PTX for the one marked
  +PTX, for every csrc/**/*.cu;
- no kernel uses a stack frame or local memory (spills fail), and the registers per kernel are printed.

    python .ci/cuda_build_check.py
"""

import glob
import os
import re
import subprocess
import sys

import torch
import triton

from fastkd import _extension

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def fail(message: str) -> None:
    print(f"[cuda-build-check] FAIL: {message}")
    sys.exit(1)


def main() -> None:
    info = _extension.build_info()
    if not (info["loaded"] and info["cuda"]):
        fail(f"fastkd._C is not a loaded CUDA build: {info}")
    with open("setup.py") as setup:
        default = re.search(r'^DEFAULT_CUDA_ARCH_LIST = "([^"]+)"', setup.read(), re.MULTILINE).group(1)
    archs = default.split(";")
    if info["archs"] != ",".join(archs):
        fail(f"build_info archs {info['archs']!r}, expected the default {default!r}")
    print(f"build_info: {torch.ops.fastkd.build_info()}")

    # op schema name -> (whether it has CUDA kernels (<stem>.cu beside <stem>_schema.cpp, and then an emulated
    # twin), whether it has a C++ CPU implementation (<stem>_cpu.cpp)); a CPU-only schema (common/pool_nodes) has
    # neither CUDA kernels nor a twin
    declared = {}
    for path in sorted(glob.glob("csrc/*/*_schema.cpp")):
        stem = path[:-len("_schema.cpp")]
        with open(path) as source:
            for name in re.findall(r'"(\w+)\(Tensor', source.read()):
                declared[name] = (os.path.exists(f"{stem}.cu"), os.path.exists(f"{stem}_cpu.cpp"))
    if not declared:
        fail("no op schema is declared in csrc/*/*_schema.cpp")
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    wrong = [f"fastkd::{name}: CUDA kernel {'missing' if cuda else 'unexpected'}"
             for name, (cuda, _) in declared.items() if has_kernel(f"fastkd::{name}", "CUDA") != cuda]
    wrong += [f"fastkd::{name}: CPU kernel {'missing' if cpu else 'unexpected'}"
              for name, (_, cpu) in declared.items() if has_kernel(f"fastkd::{name}", "CPU") != cpu]
    wrong += [f"fastkd_emulated::{name}: CPU kernel missing" for name, (cuda, _) in declared.items()
              if cuda and not has_kernel(f"fastkd_emulated::{name}", "CPU")]
    if wrong:
        fail("dispatcher: " + "; ".join(wrong))
    print(f"dispatcher: {len(declared)} fastkd:: op schemas; with a CUDA kernel and an emulated twin: "
          f"{', '.join(name for name, (cuda, _) in declared.items() if cuda)}; with a CPU kernel: "
          f"{', '.join(name for name, (_, cpu) in declared.items() if cpu)}")

    library = _extension._C.__file__
    elves = subprocess.run([CUOBJDUMP, "--list-elf", library], capture_output=True, text=True, check=True).stdout
    ptxs = subprocess.run([CUOBJDUMP, "--list-ptx", library], capture_output=True, text=True, check=True).stdout
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    for source in sources:
        name = os.path.basename(source)[:-3]
        for arch in archs:
            number = arch.replace("+PTX", "").replace(".", "")
            if f"{name}.sm_{number}.cubin" not in elves:
                fail(f"no sm_{number} SASS for {source} in {library}:\n{elves}")
            if arch.endswith("+PTX") and f"{name}.sm_{number}.ptx" not in ptxs:
                fail(f"no compute_{number} PTX for {source} in {library}:\n{ptxs}")
    print(f"cuobjdump: SASS for {', '.join(a.replace('+PTX', '') for a in archs)} and PTX for "
          f"{', '.join(a[:-4] for a in archs if a.endswith('+PTX'))}, in each of "
          f"{len(sources)} kernel files")

    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", library], capture_output=True, text=True,
                           check=True).stdout
    kernels, spilled = [], []  # (arch, symbol, registers, stack, shared, local)
    for section in usage.split("arch = ")[1:]:
        arch = section.split()[0]
        for found in re.finditer(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", section):
            symbol, registers, stack, shared, local = found.group(1), *map(int, found.groups()[1:])
            kernels.append((arch, symbol, registers, stack, shared, local))
            if stack or local:
                spilled.append(f"{arch} {symbol}: {stack} bytes stack, {local} bytes local")
    if not kernels:
        fail(f"cuobjdump found no kernel resource usage in {library}:\n{usage[:2000]}")
    for arch_name in sorted({k[0] for k in kernels}):
        per_arch = [k for k in kernels if k[0] == arch_name]
        registers = sorted(k[2] for k in per_arch)
        print(f"{arch_name}: {len(per_arch)} kernels, registers {registers[0]}-{registers[-1]}, "
              f"shared up to {max(k[4] for k in per_arch)} bytes, stack {max(k[3] for k in per_arch)}, "
              f"local {max(k[5] for k in per_arch)}")
    if spilled:
        fail("kernels with stack or local memory (spills):\n  " + "\n  ".join(spilled))
    print(f"[cuda-build-check] ok: {len(kernels)} kernel images, none with stack or local memory")


if __name__ == "__main__":
    main()
