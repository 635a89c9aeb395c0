"""Every Triton kernel compiles for sm_80 and sm_90 (PTX and cubin), in every input dtype, with 32- and
64-bit sizes, and float64 tl.dot lowers to FP64 MMA: checked on any machine, GPU or not, by Triton's own
compiler (see triton_compile_check.py)."""

import os
import pathlib
import subprocess
import sys

from helpers import triton_kernels

triton_kernels("nodes")  # skips this module where triton is unavailable (and not required)


def test_every_kernel_compiles_for_sm80_and_sm90():
    script = pathlib.Path(__file__).with_name("triton_compile_check.py")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1200)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, "\n".join(line for line in lines if not line.startswith("ok")) + result.stderr
    for arch in ("sm_80", "sm_90"):
        compiled = [line for line in lines if line.startswith("ok") and f" {arch} " in line]
        assert len(compiled) >= 60, (arch, len(compiled))
        assert any("gram_kernel" in line and "fp64-mma" in line for line in compiled)
