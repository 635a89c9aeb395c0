"""The per-kernel evidence table (benchmarks/kernel_evidence.py, recorded in benchmarks/results/kernel-evidence/):
it is made from today's kernels, it says what issue 15 asks of every kernel (no spills, no bank conflicts), and
its SASS reading finds loops, divisions and tensor-core instructions where they are."""

import json
import os
import sys

from helpers import BENCHMARKS

sys.path.insert(0, BENCHMARKS)
import kernel_evidence  # noqa: E402


def record():
    with open(os.path.join(kernel_evidence.RECORD, "evidence.json")) as f:
        return json.load(f)


def test_the_record_is_made_from_todays_kernels():
    assert record()["sources"] == kernel_evidence.sources_digest(), (
        "a kernel, the costs or the emulator's record changed: run python benchmarks/kernel_evidence.py --write "
        "(without TRITON_INTERPRET) and commit benchmarks/results/kernel-evidence/")


def test_every_kernel_of_both_backends_is_in_the_record_for_sm80_and_sm90():
    rows = record()["rows"]
    assert {(row["backend"], row["kernel"]) for row in rows} >= {
        ("cuda", "gram_kernel"), ("cuda", "apply_kernel"), ("cuda", "direct_rows_kernel"),
        ("cuda", "node_norm_kernel"), ("cuda", "node_backward_kernel"),
        ("cuda", "pool_nodes_kernel"), ("cuda", "node_radial_kernel"), ("cuda", "node_norm_split_kernel"),
        ("cuda", "node_radial_split_kernel"), ("cuda", "direct_difference_kernel"), ("cuda", "direct_columns_kernel"),
        ("cuda", "pool_nodes_warp_kernel"), ("cuda", "node_backward_warp_kernel"),
        ("cuda", "affinity_window_forward_kernel"), ("cuda", "affinity_window_gradient_kernel"),
        ("cuda", "window_tile_forward_kernel"), ("cuda", "window_tile_backward_kernel"),
        ("cuda", "consistency_forward_kernel"), ("cuda", "consistency_backward_kernel"),
        ("triton", "gram_kernel"), ("triton", "gram_apply_kernel"), ("triton", "direct_rows_kernel"),
        ("triton", "direct_difference_kernel"), ("triton", "direct_columns_kernel"), ("triton", "_window_forward_kernel"),
        ("triton", "_window_backward_kernel"), ("triton", "_consistency_forward_kernel")}
    for row in rows:
        assert {other["arch"] for other in rows if other["kernel"] == row["kernel"]
                and other["backend"] == row["backend"]} == {"sm_80", "sm_90"}
        assert 0 < row["model"]["H100 SXM"]["fraction"] <= 1, row
        assert row["model"]["H100 SXM"]["limited_by"] in row["model"]["H100 SXM"]["cycles"]


def test_no_kernel_spills_and_no_cuda_kernel_has_a_bank_conflict():
    for row in record()["rows"]:
        assert row["stack"] == 0 and row["local"] == 0, row["kernel"]
        if row["backend"] == "cuda":
            assert row["emulator"]["bank_conflicts"] == 0, row["kernel"]


def test_loads_above_the_sector_slack_have_their_reason_and_reasons_are_not_stale():
    rows = [row for row in record()["rows"] if row["backend"] == "cuda"]
    above = set()
    for row in rows:
        figures = row["emulator"]  # every CUDA kernel is in the emulator's profile
        ratio = figures["load_sectors_per_request"] / figures["ideal_load_sectors"]
        if ratio > kernel_evidence.SECTOR_SLACK:
            above.add(row["kernel"])
            assert row["sector_reason"], row["kernel"]
        else:
            assert "sector_reason" not in row, row["kernel"]
    assert above == set(kernel_evidence.SECTOR_REASONS)


def test_the_triton_gram_products_run_on_fp64_tensor_cores():
    for row in record()["rows"]:
        if row["backend"] == "triton" and row["kernel"] in ("gram_kernel", "gram_apply_kernel", "direct_rows_kernel"):
            assert row["main_loop"]["dmma"] > 0, row


def test_the_cuda_gram_apply_and_direct_row_products_run_on_fp64_tensor_cores_and_flat_staging_does_not_divide():
    rows = [row for row in record()["rows"]
            if row["backend"] == "cuda" and row["kernel"] in ("gram_kernel", "apply_kernel", "direct_rows_kernel")]
    assert len(rows) == 12  # 3 kernels x flat and general x sm_80 and sm_90
    for row in rows:
        loop = row["main_loop"]
        assert loop["dmma"] > 0, row["instantiation"]
        if row["instantiation"].endswith("true>"):  # the flat variant
            divisions = [loop.get(key, 0) for key in ("rcp64h", "double_division_calls", "integer_division_calls")]
            assert divisions == [0, 0, 0], (row["instantiation"], row["arch"])


LISTING = """
.text.kernel:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   LDG.E.64 R2, desc[UR4][R4.64] ;
        /*0020*/                   MUFU.RCP64H R7, R3 ;
        /*0030*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
.L_x_2:
        /*0040*/                   DFMA R8, R2, R2, R8 ;
        /*0050*/                   DMMA.884 R8, R2, R4, R8 ;
        /*0060*/                   LDS.64 R2, [R9] ;
        /*0070*/               @P0 BRA `(.L_x_2) ;
        /*0080*/                   F2F.F64.F32 R2, R3 ;
        /*0090*/              @!P1 BRA `(.L_x_1) ;
.L_x_3:
        /*00a0*/                   IADD3 R0, R0, 1, RZ ;
        /*00b0*/               @P2 BRA `(.L_x_3) ;
        /*00c0*/                   EXIT ;
"""


def test_the_main_loop_is_the_loop_with_the_products_and_its_mix_is_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_evidence.subprocess, "run",
                        lambda *args, **kwargs: type("Done", (), {"stdout": LISTING})())
    ((instructions, labels),) = kernel_evidence.disassemble("listing.cubin").values()
    first, last = kernel_evidence.main_loop(instructions, labels)
    assert (instructions[first].opcode, instructions[last].opcode) == ("DFMA", "BRA")  # the inner loop
    inner = kernel_evidence.mix(instructions[first:last + 1])
    assert (inner["dfma"], inner["dmma"], inner["shared_loads"], inner["instructions"]) == (1, 1, 1, 4)
    outer = kernel_evidence.mix(instructions[labels[".L_x_1"]:last + 3])
    assert (outer["rcp64h"], outer["integer_division_calls"], outer["conversions"], outer["global_bytes"]) == \
        (1, 1, 1, 256)
    model = kernel_evidence.estimate(inner, "compute", kernel_evidence.GPUS[0], 1.0, 1.0, 1.0)
    # the DMMA's 256 FMAs take the tensor cores 2 cycles, above issue (1); with the DFMA's 32 the floor is
    # 288 / 128 cycles, which the fraction caps at 1
    assert model["limited_by"] == "tensor cores" and model["fraction"] == 1.0
    divided = dict(inner, rcp64h=1, dfma=8, instructions=64)
    model = kernel_evidence.estimate(divided, "compute", kernel_evidence.GPUS[0], 1.0, 1.0, 1.0)
    # 7 of the 8 DFMA are a division's: 288 product FMAs against 16 issue cycles
    assert model["limited_by"] == "issue" and abs(model["fraction"] - 288 / 128 / 16) < 2e-3
