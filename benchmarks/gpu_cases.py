"""Runs the small case of every op (emulator_profile.CASES: every CUDA and Triton kernel, forward and backward) on
the GPU, for compute-sanitizer to watch; benchmarks/gpu_check.sh runs it under memcheck, racecheck, synccheck and
initcheck.

    python benchmarks/gpu_cases.py [--backends cuda triton]
"""

import argparse
import sys

import torch

from emulator_profile import CASES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", choices=("cuda", "triton"), default=["cuda", "triton"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no GPU: the cases run on CUDA tensors")
    for backend in args.backends:
        for case, run in CASES.items():
            results = run(backend, "cuda")
            torch.cuda.synchronize()
            finite = all(bool(torch.isfinite(x).all()) for x in results)
            print(f"{'ok' if finite else 'NOT FINITE'} {backend}: {case}", flush=True)
            if not finite:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
