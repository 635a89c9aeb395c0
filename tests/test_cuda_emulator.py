"""fastkd's CUDA emulator (csrc/emulator/) runs correct kernels deterministically and catches the bugs the
driver and compute-sanitizer would, and its profile tells good access patterns from bad ones: planted kernels
in csrc/emulator/selftest.cpp."""

import sys

import pytest
import torch

from fastkd import _extension
from helpers import BENCHMARKS, randn

sys.path.insert(0, BENCHMARKS)
import emulator_profile  # noqa: E402

pytestmark = pytest.mark.skipif(_extension.LOAD_ERROR is not None, reason=str(_extension.LOAD_ERROR))


def run(kernel, values=None):
    if values is None:
        values = torch.randn(1024, dtype=torch.float64)
    return torch.ops.fastkd_emulated.emulator_selftest(kernel, values)


def profile_of(kernel, monkeypatch):
    """The figures of the emulator's profile line for one self-test launch."""
    monkeypatch.setenv("FASTKD_EMULATOR_PROFILE", "1")
    torch.ops.fastkd_emulated.emulator_take_profile()
    run(kernel)
    lines = torch.ops.fastkd_emulated.emulator_take_profile()
    assert len(lines) == 1, lines
    return emulator_profile.parse(lines[0])


def test_block_reduction_with_barriers_is_exact_and_race_free(gen):
    values = randn((1024,), gen, torch.float64)
    expected = values[:64].clone()
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
        run("tree_sum_missing_syncthreads", randn((1024,), gen, torch.float64))


def test_warp_shuffles(gen):
    values = randn((1024,), gen, torch.float64)
    lanes = values[:64].view(2, 32).clone()
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
        run("divergent_syncthreads", randn((1024,), gen, torch.float64))


def test_shuffle_in_divergent_code_is_reported_as_a_deadlock(gen):
    with pytest.raises(RuntimeError, match=r"deadlock: thread \d+ waits at a warp shuffle"):
        run("divergent_shuffle", randn((1024,), gen, torch.float64))


def test_shared_index_out_of_bounds_is_reported(gen):
    with pytest.raises(RuntimeError, match=r"shared-memory index out of bounds: cell\[64\] of 64 elements, thread 63"):
        run("shared_out_of_bounds", randn((1024,), gen, torch.float64))


def test_shuffle_reading_an_exited_lane_is_reported():
    with pytest.raises(RuntimeError, match=r"a warp shuffle in exited_lane_shuffle_kernel by thread 0 with mask "
                                           r"0xffffffff names lane 16 \(thread 16\), which has exited"):
        run("exited_lane_shuffle")


def test_fp64_mma_has_the_ptx_fragments(gen):
    """mma.sync m8n8k4 f64 (csrc/common/mma.cuh): lane l holds A[l / 4][l % 4], B[l % 4][l / 4] and
    D[l / 4][2 (l % 4) + i]. Small integers make every product and sum exact, so the layout is checked bitwise."""
    values = torch.randint(-8, 9, (1024,), generator=gen).to(torch.float64)
    a, b_transposed, c = values[:32].view(8, 4), values[32:64].view(8, 4), values[64:128].view(8, 8)
    assert torch.equal(run("mma", values), (c + a @ b_transposed.T).flatten())


def test_fp64_mma_is_float64_accurate(gen):
    """Random values: D within the rounding of 4 fused steps (and of the check's own 8 roundings) of C + A B."""
    values = randn((1024,), gen, torch.float64)
    a, b_transposed, c = values[:32].view(8, 4), values[32:64].view(8, 4), values[64:128].view(8, 8)
    expected = c + a @ b_transposed.T
    bound = 12 * 2.0 ** -53 * (c.abs() + a.abs() @ b_transposed.abs().T)
    error = (run("mma", values) - expected.flatten()).abs()
    assert bool((error <= bound.flatten()).all()), error.max()


def test_mma_that_half_the_warp_skips_is_reported():
    with pytest.raises(RuntimeError, match=r"a warp mma.sync in mma_kernel by thread 0 with mask 0xffffffff names "
                                           r"lane 16 \(thread 16\), which has exited"):
        run("divergent_mma")


def test_mma_in_a_partial_warp_is_reported():
    with pytest.raises(RuntimeError, match=r"a warp mma.sync in mma_kernel by thread 0 with mask 0xffffffff names "
                                           r"lane 16 of a warp with only 16 lanes \(inactive lanes\)"):
        run("mma_in_a_partial_warp")


@pytest.mark.parametrize("kernel, limit", [
    ("grid_too_large", r"copy_kernel with grid \(1, 70000, 1\) and block \(64, 1, 1\): grid y = 70000, "
                       r"the limit is 65535"),
    ("block_too_deep", r"copy_kernel with grid \(1, 1, 1\) and block \(1, 1, 65\): block z = 65, the limit is 64"),
    ("shared_too_large", r"shared_too_large_kernel with grid \(1, 1, 1\) and block \(64, 1, 1\): static shared "
                         r"memory = 56000 bytes with big, the limit is 49152"),
])
def test_launch_over_cuda_limits_is_refused_naming_kernel_configuration_and_limit(kernel, limit):
    with pytest.raises(RuntimeError, match=limit):
        run(kernel)


def test_two_blocks_writing_one_address_is_a_global_memory_race():
    with pytest.raises(RuntimeError, match=r"global-memory race \(write after write\) in "
                                           r"blocks_write_one_address_kernel: result\[0\] is accessed by block "
                                           r"\(0, 0, 0\) thread \(0, 0, 0\) and block \(1, 0, 0\) thread "
                                           r"\(0, 0, 0\), different blocks"):
        run("blocks_write_one_address")


def test_reading_what_another_block_wrote_is_a_global_memory_race():
    with pytest.raises(RuntimeError, match=r"global-memory race \(read after write\) in "
                                           r"block_reads_another_block_kernel: result\[31\] is accessed by block "
                                           r"\(0, 0, 0\) thread \(31, 0, 0\) and block \(1, 0, 0\) thread "
                                           r"\(0, 0, 0\)"):
        run("block_reads_another_block")


@pytest.mark.parametrize("seed", ["1", "2", "3"])
def test_random_order_finds_the_race_between_blocks_in_every_order(monkeypatch, seed):
    monkeypatch.setenv("FASTKD_EMULATOR_ORDER", "random")
    monkeypatch.setenv("FASTKD_EMULATOR_SEED", seed)
    with pytest.raises(RuntimeError, match=r"global-memory race \(write after write\)"):
        run("blocks_write_one_address")


@pytest.mark.parametrize("seed", ["1", "2", "3"])
def test_random_order_keeps_correct_kernels_bitwise(monkeypatch, gen, seed):
    values = randn((1024,), gen, torch.float64)
    expected = {kernel: run(kernel, values) for kernel in ("tree_sum", "warp_sum")}
    monkeypatch.setenv("FASTKD_EMULATOR_ORDER", "random")
    monkeypatch.setenv("FASTKD_EMULATOR_SEED", seed)
    for kernel, result in expected.items():
        assert torch.equal(run(kernel, values), result), kernel


def test_random_order_finds_the_missing_syncthreads(monkeypatch, gen):
    monkeypatch.setenv("FASTKD_EMULATOR_ORDER", "random")
    with pytest.raises(RuntimeError, match=r"shared-memory race"):
        run("tree_sum_missing_syncthreads", randn((1024,), gen, torch.float64))


def test_unknown_order_is_refused(monkeypatch):
    monkeypatch.setenv("FASTKD_EMULATOR_ORDER", "backwards")
    with pytest.raises(RuntimeError, match=r"FASTKD_EMULATOR_ORDER is 'backwards': 'launch' \(the default\) or "
                                           r"'random'"):
        run("tree_sum")


def test_profile_counts_bank_conflicts(monkeypatch):
    clean = profile_of("shared_stride_1", monkeypatch)
    conflicted = profile_of("shared_stride_16", monkeypatch)
    # 16 stores of 32 doubles (conflict-free, 2 wavefronts each), then one load of 32 doubles
    assert clean["shared stores"] == dict(requests=16, wavefronts=32, ideal=32, bank_conflicts=0)
    assert conflicted["shared stores"] == clean["shared stores"]
    assert clean["shared loads"] == dict(requests=1, wavefronts=2, ideal=2, bank_conflicts=0)
    # stride 16 doubles = 128 bytes: all 32 lanes on banks 0 and 1, 32 words each
    assert conflicted["shared loads"] == dict(requests=1, wavefronts=32, ideal=2, bank_conflicts=30)
    assert conflicted["shared_bytes"] == 32 * 16 * 8 and conflicted["profiled_blocks"] == conflicted["blocks"] == 1


def test_profile_counts_sectors_per_request(monkeypatch):
    coalesced = profile_of("global_stride_1", monkeypatch)
    strided = profile_of("global_stride_32", monkeypatch)
    # 32 lanes x 8 bytes = 256 bytes = 8 sectors (torch's allocations are 64-byte aligned)
    assert coalesced["global loads"] == dict(requests=1, sectors=8, sectors_per_request=8, ideal=8)
    assert strided["global loads"] == dict(requests=1, sectors=32, sectors_per_request=32, ideal=8)
    assert coalesced["global stores"] == strided["global stores"] == dict(requests=1, sectors=8,
                                                                          sectors_per_request=8, ideal=8)
    assert coalesced["kernel"] == "global_stride_kernel" and coalesced["grid"] == "(1, 1, 1)"
    assert coalesced["block"] == "(32, 1, 1)" and coalesced["shared_bytes"] == 0
