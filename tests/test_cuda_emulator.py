"""fastkd's CUDA emulator (csrc/emulator/) runs correct kernels deterministically and catches the bugs
compute-sanitizer's racecheck would: planted kernels in csrc/emulator/selftest.cpp."""

import pytest
import torch

from fastkd import _extension
from helpers import randn

pytestmark = pytest.mark.skipif(_extension.LOAD_ERROR is not None, reason=str(_extension.LOAD_ERROR))


def run(kernel, values):
    return torch.ops.fastkd_emulated.emulator_selftest(kernel, values)


def test_block_reduction_with_barriers_is_exact_and_race_free(gen):
    values = randn((64,), gen, torch.float64)
    expected = values.clone()
    stride = 32
    while stride:  # the kernel's summation order
        expected[:stride] += expected[stride:2 * stride]
        stride //= 2
    result = run("tree_sum", values)
    assert result[0].item() == expected[0].item()
    assert torch.equal(run("tree_sum", values), result)


def test_missing_syncthreads_is_reported_as_a_shared_memory_race(gen):
    with pytest.raises(RuntimeError, match=r"shared-memory race \((read after write|write after read)\) on "
                                           r"partial\[\d+\]: threads \d+ and \d+ .* no __syncthreads\(\) between"):
        run("tree_sum_missing_syncthreads", randn((64,), gen, torch.float64))


def test_warp_shuffles(gen):
    values = randn((64,), gen, torch.float64)
    lanes = values.view(2, 32).clone()
    offset = 16
    while offset:  # the kernel's order: lane i adds lane i + offset; lanes past the warp keep their own value
        shifted = lanes.clone()
        shifted[:, :32 - offset] = lanes[:, offset:]
        lanes += shifted
        offset //= 2
    result = run("warp_sum", values)
    assert torch.equal(result[:2], lanes[:, 0])


def test_divergent_syncthreads_is_reported(gen):
    with pytest.raises(RuntimeError, match=r"divergent __syncthreads\(\): thread 0 waits at __syncthreads\(\) "
                                           r"at .*selftest.cpp:\d+, thread 32 at .*selftest.cpp:\d+"):
        run("divergent_syncthreads", randn((64,), gen, torch.float64))


def test_shuffle_in_divergent_code_is_reported_as_a_deadlock(gen):
    with pytest.raises(RuntimeError, match=r"deadlock: thread \d+ waits at a warp shuffle"):
        run("divergent_shuffle", randn((64,), gen, torch.float64))


def test_shared_index_out_of_bounds_is_reported(gen):
    with pytest.raises(RuntimeError, match=r"shared-memory index out of bounds: cell\[64\] of 64 elements, thread 63"):
        run("shared_out_of_bounds", randn((64,), gen, torch.float64))
