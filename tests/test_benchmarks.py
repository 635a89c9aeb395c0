"""benchmarks/: every provider computes the loss it is compared on; the sweep runs end to end, records
out-of-memory and time-outs instead of hiding them, and writes its CSV, plots and summary."""

import csv
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from helpers import BENCHMARKS, randn

sys.path.insert(0, BENCHMARKS)

import floors  # noqa: E402
import providers  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
from fastkd.ops import costs  # noqa: E402


def _plain_names(op):
    """Every provider of ``op`` but the compiled one, which the --quick run below checks."""
    names = ["naive", "fastkd-torch", *(other.name for other in op.others)]
    names += ["gram-fp32", "gram-fp64"] if op.gram is not None else []
    return names + (["keops"] if op.keops is not None else [])


PLAIN_PROVIDERS = [(op_name, name) for op_name, op in providers.OPS.items() for name in _plain_names(op)]
# The plain float32 formulations whose loss loses digits near convergence (1e-3 mismatch), measured in the
# --quick run: the per-pixel KL is second order in the mismatch (its first-order terms cancel in the sum
# over channels), so float32 log-probabilities leave it 1e-3 to 1e-2 relative error; the pooled graph's
# 4 to 9 nodes have affinities near 1 that differ by about 1e-4, and float32 rounds them to 6e-8.
FLOAT32_CANCELS = {("pixelwise_kd", "naive"), ("pixelwise_kd", "naive+compile"), ("pixelwise_kd", "kl_div"),
                   ("affinity_pooled", "naive"), ("affinity_pooled", "naive+compile"), ("affinity_pooled", "structkd")}


def _provider(op_name: str, name: str):
    if name == "keops":
        pytest.importorskip("pykeops")
    runnable, _ = providers.providers(providers.OPS[op_name], torch.device("cpu"))
    return next(provider for provider in runnable if provider.name == name)


@pytest.mark.parametrize("op_name,name", PLAIN_PROVIDERS)
def test_provider_matches_the_reference_loss_and_gradient(gen, op_name, name):
    op = providers.OPS[op_name]
    batch, channels, height, width = 2, 5, 7, 9  # odd, and wider than the 5 x 5 window
    # no ReLU: a node of zeros in both maps makes a row difference 0, where sqrt (gram, keops) has no gradient
    s = randn((batch, channels, height, width), gen, torch.float64).requires_grad_()
    t = randn((batch, channels, height, width), gen, torch.float64)
    provider = _provider(op_name, name)
    loss = provider.loss(s, t)
    expected = op.reference(s, t)
    grad, = torch.autograd.grad(loss, s)
    expected_grad, = torch.autograd.grad(expected, s)
    if name == "gram-fp32":  # gram-fp64's formula in float32 (tested exactly above): float32 rounding only
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)
        assert (grad - expected_grad).norm() <= 1e-3 * expected_grad.norm()
    else:
        torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)
        # float64 rounding of sums taken in another order: CIRKD's formulation differs from the reference by up
        # to 3.8e-13 of the largest gradient element beyond rtol over seeds 0-299 (1e-13 failed on 8 of them);
        # the providers that share the reference's formula agree within rtol alone
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12 * expected_grad.abs().max().item())


@pytest.mark.parametrize("op_name,name", [(op_name, name) for op_name, op in providers.OPS.items()
                                          for name in ("naive", *(other.name for other in op.others))])
def test_plain_formulations_compute_16_bit_inputs_in_float32(gen, op_name, name):
    s = randn((1, 4, 6, 8), gen, torch.bfloat16)
    t = randn((1, 4, 6, 8), gen, torch.bfloat16)
    loss_of = _provider(op_name, name).loss
    loss = loss_of(s, t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_of(s.float(), t.float()), rtol=0, atol=0)


def test_the_authors_graphs_pool_as_their_definitions_say(gen):
    """StructKD's half-map patches give 3 x 3 nodes on a 65 x 65 map (FORMULAS.md section 1); CIRKD's 2 x 2
    patches ceil(H/2) x ceil(W/2); the loss is the mean over B m^2, so one changed node moves it."""
    assert floors.shape(providers.OPS["affinity_pooled"], 1, 8, 65, 65, 4).nodes == 9
    assert floors.shape(providers.OPS["affinity_patch_max"], 1, 8, 7, 9, 4).nodes == 4 * 5
    s = randn((1, 3, 65, 65), gen, torch.float64).relu_()
    t = s.clone()
    t[:, :, 64, 64] = s.max() + 1  # the last, partial 1 x 1 patch of the 3 x 3 grid is now a different node
    assert providers.structkd_affinity_pooled(s, s) == 0
    assert providers.structkd_affinity_pooled(s, t) > 0
    torch.testing.assert_close(providers.structkd_affinity_pooled(s, t),
                               providers.OPS["affinity_pooled"].reference(s, t), rtol=1e-12, atol=0)


def test_kl_div_averages_over_pixels_not_images(gen):
    """``reduction="batchmean"`` would divide the sum by B only: the provider divides by B H W, as
    PixelwiseKDLoss's mean does."""
    s = randn((2, 19, 3, 5), gen, torch.float64)
    t = randn((2, 19, 3, 5), gen, torch.float64)
    per_pixel_mean = providers.kl_div_pixelwise_kd(s, t)
    batchmean = torch.nn.functional.kl_div(s.log_softmax(1), t.softmax(1), reduction="batchmean")
    torch.testing.assert_close(per_pixel_mean * 15, batchmean, rtol=1e-12, atol=0)


def test_gram_fp32_cancels_near_convergence_where_fp64_does_not(gen):
    """Why the benchmarks report accuracy: at a 1e-4 mismatch the float32 Gram identity loses the whole loss
    (an error of 100% on each of 200 seeds tried; at 1e-3 its error is random, from 0.08% to over 100%)."""
    s = randn((1, 16, 24, 24), gen, torch.float32).relu_()
    t = s * (1 + 1e-4 * randn(s.shape, gen, torch.float32))
    expected = providers.OPS["affinity_full"].reference(s, t)
    fp32 = providers.gram_affinity_full(s, t, torch.float32)
    fp64 = providers.gram_affinity_full(s, t, torch.float64)
    assert abs(fp64.item() / expected.item() - 1) < 1e-6
    assert abs(fp32.item() / expected.item() - 1) > 0.5


def test_kernel_backends_on_cpu_are_listed_as_not_timed():
    runnable, unavailable = providers.providers(providers.OPS["consistency"], torch.device("cpu"))
    names = [provider.name for provider in runnable]
    assert "fastkd-triton" not in names and "fastkd-cuda" not in names
    assert set(unavailable) >= {"fastkd-triton", "fastkd-cuda"}
    assert all(reason for reason in unavailable.values())


def test_floor_rates_are_bytes_and_flops_over_the_median_time(monkeypatch):
    measured = floors.measure_rates(torch.device("cpu"), copy_bytes=1 << 20, gemm_size=32, repeats=3)
    assert all(math.isfinite(rate) and rate > 0 for rate in dataclasses.astuple(measured))
    seconds = iter([0.3, 0.1, 0.2] * 3)  # each measurement's three timed repetitions: median 0.2 s
    monkeypatch.setattr(floors.measure, "timed", lambda device, region: (region(), next(seconds))[1])
    rates = floors.measure_rates(torch.device("cpu"), copy_bytes=1 << 20, gemm_size=32, repeats=3)
    assert rates.bytes_per_second == 2 * (1 << 20) / 0.2  # read and written
    assert rates.float32_flops == rates.float64_flops == 2 * 32**3 / 0.2
    env = floors.Rates(5.5e9, 2.5e10, 1.25e10).environment()  # in GB/s and GFLOP/s
    assert env == {"copy_gb_s": 5.5, "fp32_gemm_gflop_s": 25.0, "fp64_gemm_gflop_s": 12.5}
    assert floors.Rates.from_environment(env) == floors.Rates(5.5e9, 2.5e10, 1.25e10)
    again = floors.Rates.from_environment(rates.environment())
    assert dataclasses.astuple(again) == pytest.approx(dataclasses.astuple(rates), rel=1e-5)


def test_floor_is_the_slower_of_moving_the_bytes_and_doing_the_flops():
    pixel, full = providers.OPS["pixelwise_kd"], providers.OPS["affinity_full"]
    batch, channels, height, width = 2, 19, 32, 64
    inputs, gradient = 2 * batch * channels * height * width * 4, batch * channels * height * width * 4
    memory_bound = floors.Rates(bytes_per_second=1e9, float32_flops=1e18, float64_flops=1e18)
    assert floors.floor(pixel, batch, channels, height, width, 4, "forward", memory_bound) == (inputs / 1e9, "memory")
    for mode in ("backward", "forward+backward"):  # the student's gradient is written once, the teacher has none
        seconds, bound = floors.floor(pixel, batch, channels, height, width, 4, mode, memory_bound)
        assert (seconds, bound) == ((inputs + gradient) / 1e9, "memory")
    # compute bound: fastkd.ops.costs's FLOPs, at the float32 rate for a per-pixel loss ...
    passes = costs.pixelwise_kd(costs.Shape(batch, channels, channels, height, width, height * width))
    seconds, bound = floors.floor(pixel, batch, channels, height, width, 4, "forward+backward",
                                  floors.Rates(1e18, 1e6, 1e18))
    assert bound == "compute" and seconds == pytest.approx((passes["forward"].flops + passes["backward"].flops) / 1e6)
    # ... at the float64 rate for the full graph, the cheaper of its two exact algorithms per pass
    x = costs.Shape(2, 64, 64, 32, 32, 1024)
    gram, direct = costs.gram_full_graph(x, False)["forward"].flops, costs.direct_full_graph(x)["forward"].flops
    assert gram < direct
    seconds, bound = floors.floor(full, 2, 64, 32, 32, 4, "forward", floors.Rates(1e18, 1e18, 1e6))
    assert bound == "compute" and seconds == pytest.approx(gram / 1e6)
    fast = floors.floor(full, 2, 64, 32, 32, 4, "forward", floors.Rates(1e18, 1e18, 1e18))
    assert floors.floor(full, 2, 64, 32, 32, 4, "forward", floors.Rates(1e18, 1e6, 1e18)) == fast  # not float32's
    # the pooled graph's 9 nodes: the direct tiles are the cheaper
    pooled = floors.shape(providers.OPS["affinity_pooled"], 2, 512, 65, 65, 4)
    assert floors.full_graph(pooled)["backward"] == costs.direct_full_graph(pooled)["backward"]


def test_per_pixel_costs_count_both_inputs_and_both_gradients():
    x = costs.Shape(2, 19, 19, 8, 16, 128)
    for function, forward, backward in ((costs.pixelwise_kd, 15, 12), (costs.probability, 11, 14)):
        passes = function(x)
        assert passes["forward"].flops == forward * 2 * 19 * 8 * 16
        assert passes["backward"].flops == backward * 2 * 19 * 8 * 16
        assert passes["forward"].minimum_bytes == x.inputs() and passes["backward"].minimum_bytes == 2 * x.inputs()
    with pytest.raises(ValueError, match="same classes"):
        costs.probability(costs.Shape(2, 19, 20, 8, 16, 128))


def _run_benchmarks(tmp_path, *args):
    """Runs benchmarks/run.py as a user would (from outside the tree, so the installed fastkd is used),
    without the test session's interpreter and emulator switches; returns the output folder."""
    out = tmp_path / "results"
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "FASTKD_EMULATE_CUDA")}
    completed = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "run.py"), "--out", str(out), *args],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert completed.returncode == 0, completed.stdout[-5000:]
    return out


def _rows(out):
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_quick_sweep_writes_csv_plots_and_summary(tmp_path):
    out = _run_benchmarks(tmp_path, "--quick")
    rows = _rows(out)
    env = json.loads((out / "environment.json").read_text())
    summary = (out / "summary.md").read_text()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rates = floors.Rates.from_environment(env)
    assert all(rate > 0 for rate in dataclasses.astuple(rates))
    assert f"## Headline on {env['device']}" in summary
    for op_name, op in providers.OPS.items():
        runnable, _ = providers.providers(op, device)
        expected = {provider.name for provider in runnable}
        if importlib.util.find_spec("pykeops") is None:
            expected.discard("keops")
        of_op = [row for row in rows if row["op"] == op_name]
        assert {row["provider"] for row in of_op} == expected
        assert env["auto"][op_name] in expected and env["auto"][op_name].startswith("fastkd-")
        series = run.plan(device, quick=True)
        sizes = next(series.sizes for series in series if series.op == op_name)
        assert len(of_op) == len(expected) * len(sizes) * len(run.MODES)
        for row in of_op:
            assert row["status"] == "ok", row
            assert float(row["q1_ms"]) <= float(row["median_ms"]) <= float(row["q3_ms"])
            assert row["device"] == env["device"] and row["torch"] == torch.__version__ and row["tf32"]
            assert float(row["copy_gb_s"]) == env["copy_gb_s"]
            assert row["reference"] == ("fastkd-torch-fp64" if op.max_pools else "literal")
            # every provider runs in float32 except gram-fp64; all but gram-fp32 and the formulations that
            # cancel in float32 keep the loss near convergence; fastkd's backends keep it to 1e-6
            error = float(row["loss_rel_error"])
            if row["kind"] == "fastkd":
                assert error < 1e-6, row
            elif (op_name, row["provider"]) in FLOAT32_CANCELS:
                assert error < 1e-1, row
            elif row["provider"] != "gram-fp32":
                assert error < 1e-4, row
            # the floor from the rates recorded, and the time as a multiple of it
            floor_seconds, bound = floors.floor(op, int(row["batch"]), int(row["channels"]), int(row["height"]),
                                                int(row["width"]), 4, row["mode"], rates)
            assert float(row["floor_ms"]) == pytest.approx(floor_seconds * 1e3, rel=1e-3)
            assert row["floor_bound"] == bound
            assert float(row["x_floor"]) == pytest.approx(float(row["median_ms"]) / float(row["floor_ms"]), rel=1e-4)
        png = out / f"{op_name}_B{of_op[0]['batch']}_C{of_op[0]['channels']}.png"
        assert png.stat().st_size > 10_000 and png.read_bytes().startswith(b"\x89PNG")
        assert f"## {op_name}, B=" in summary and f"]({png.name})" in summary
        assert f"| {op_name} | 1, {of_op[0]['channels']} | {sizes[-1][0]}x{sizes[-1][1]} | {env['auto'][op_name]} |" \
            in summary
    assert env["quick"] is True and env["repeats"] == 3


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(tmp_path):
    """With a 0.5 GiB budget the naive m x m matrices (1 GiB at 128 x 128) cannot be allocated: recorded as
    oom there and at every larger size, while fastkd goes on to the end of the sweep."""
    if torch.cuda.is_available():
        pytest.skip("the memory budget is a CPU address-space limit; on a GPU the device's own memory is the limit")
    out = _run_benchmarks(tmp_path, "--quick", "--ops", "affinity_full", "--providers", "naive", "fastkd-torch",
                          "--sizes", "16x16", "128x128", "160x160", "--memory-budget-gib", "0.5",
                          "--time-limit", "1000")  # no predicted time-outs on a busy machine
    status = {(row["provider"], row["m"], row["mode"]): row for row in _rows(out)}
    for mode in run.MODES:
        assert status["naive", "256", mode]["status"] == "ok"
        assert status["naive", "16384", mode]["status"] == "oom"
        assert "allocate" in status["naive", "16384", mode]["note"]
        assert status["naive", "25600", mode]["status"] == "oom"
        assert status["naive", "25600", mode]["note"] == "oom at m=16384 already"
        assert all(status["fastkd-torch", m, mode]["status"] == "ok" for m in ("256", "16384", "25600"))
    summary = (out / "summary.md").read_text()
    assert "| 128x128 (16384) | oom |" in summary
    assert "naive: largest m 256 (oom from m = 16384)" in summary


def test_a_size_predicted_over_the_time_limit_is_recorded_as_timeout():
    sweep = run.Sweep.__new__(run.Sweep)
    sweep.args = types.SimpleNamespace(time_limit=1.0)
    quadratic = providers.Provider("naive", "naive", 2, None)
    assert sweep.predicted_timeout(quadratic, {}, 400) is None  # nothing measured yet
    assert sweep.predicted_timeout(quadratic, {"naive": (100, 0.05)}, 400) is None  # 0.8 s
    status, note = sweep.predicted_timeout(quadratic, {"naive": (100, 0.1)}, 400)  # 1.6 s
    assert status == "timeout" and note == "predicted 1.6 s per forward+backward from 0.1 s at m=100 (limit 1 s)"


def _write_results(folder, env, measured, fields=run.FIELDS):
    """environment.json, and results.csv with one row per mode for each (op, batch, provider, kind, height,
    width, status, median ms, peak bytes, floor ms) of ``measured``."""
    (folder / "environment.json").write_text(json.dumps(env))
    common = dict(kind="", dtype="float32", channels=19, note="", min_ms="", repeats=3, loss_rel_error="1e-8",
                  grad_rel_error="2e-8", reference="literal")
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fields, extrasaction="ignore")
        writer.writeheader()
        for op, batch, provider, kind, height, width, status, median, peak, floor_ms in measured:
            for mode in run.MODES:
                ok = status == "ok"
                writer.writerow(dict(common, op=op, batch=batch, provider=provider, kind=kind, mode=mode,
                                     height=height, width=width, m=height * width, status=status,
                                     median_ms=median if ok else "", q1_ms=median if ok else "",
                                     q3_ms=median if ok else "", peak_bytes=peak if ok else "",
                                     note="" if ok else "RuntimeError: out of memory", floor_ms=floor_ms,
                                     floor_bound="memory", x_floor=median / floor_ms if ok else ""))


REPORT_ENV = {"device": "a CPU", "command": "python benchmarks/run.py", "minutes": 1.0, "torch": "2", "triton": "3",
              "pykeops": "not installed", "fastkd": "0.1.0", "threads": 2, "tf32": "off", "dtype": "float32",
              "mismatch": 1e-3, "repeats": 3, "time_limit_s": 10.0, "unavailable": {"consistency": {"keops": "n/a"}}}
CONSISTENCY_ROWS = [
    ("consistency", 2, "naive", "naive", 8, 8, "ok", 10.0, 4 << 20, 0.5),
    ("consistency", 2, "fastkd-torch", "fastkd", 8, 8, "ok", 4.0, 1 << 20, 0.5),
    ("consistency", 2, "fastkd-cpp", "fastkd", 8, 8, "ok", 2.0, 2 << 20, 0.5),
    ("consistency", 2, "naive", "naive", 16, 16, "oom", None, None, 1.5),
    ("consistency", 2, "fastkd-torch", "fastkd", 16, 16, "ok", 8.0, 2 << 20, 1.5),
    ("consistency", 2, "fastkd-cpp", "fastkd", 16, 16, "ok", 3.0, 3 << 20, 1.5)]


def test_report_ratios_and_failures(tmp_path):
    """The summary's headline divides by the fastest fastkd backend at the largest size the naive version ran;
    its floor table holds the auto backend, at the largest size it ran, against its floor and the fastest
    other provider there."""
    env = dict(REPORT_ENV, copy_gb_s=5.5, fp32_gemm_gflop_s=25.0, fp64_gemm_gflop_s=12.5,
               auto={"consistency": "fastkd-cpp", "probability": "fastkd-torch"})
    env["auto"]["affinity_full"] = "fastkd-triton"
    failed = [("affinity_full", 2, "naive", "naive", 8, 8, "ok", 6.0, 1 << 20, 0.25),
              ("affinity_full", 2, "fastkd-triton", "fastkd", 8, 8, "error", None, None, 0.25)]
    probability = [("probability", 1, "naive", "naive", 8, 8, "ok", 6.0, 1 << 20, 0.25),
                   ("probability", 1, "naive+compile", "compiled", 8, 8, "ok", 5.0, 1 << 20, 0.25),
                   ("probability", 1, "fastkd-cpp", "fastkd", 8, 8, "ok", 1.0, 1 << 20, 0.25),
                   ("probability", 1, "fastkd-torch", "fastkd", 8, 8, "ok", 2.0, 1 << 20, 0.25)]
    _write_results(tmp_path, env, CONSISTENCY_ROWS + probability + failed)
    summary = open(report.write_report(str(tmp_path))).read()
    assert ("at 8x8 (m = 64, the largest the naive version ran), fastkd-cpp 2 ms, 2 MiB, loss error 1.0e-08: "
            "naive takes 5x the time, 2x the memory, loss error 1.0e-08") in summary
    assert "naive: largest m 64 (oom from m = 256)" in summary
    assert "| 16x16 (256) | oom | 8 ms / 2 MiB | 3 ms / 3 MiB | 1.5 ms (memory) | 2x |" in summary
    assert "- naive at 16x16: oom, RuntimeError: out of memory" in summary
    assert "- consistency, keops: n/a" in summary
    assert (tmp_path / "consistency_B2_C19.png").exists()
    assert "copy bandwidth 5.5 GB/s (bytes read + written), float32 GEMM 25 GFLOP/s, float64 GEMM 12.5" in summary
    assert "## Headline on a CPU" in summary
    assert "| consistency | 2, 19 | 16x16 | fastkd-cpp | 3 ms | 1.5 ms (memory) | 2x | none ran | | | |" in summary
    # the auto backend, not the fastest; the fastest provider of another kind
    assert ("| probability | 1, 19 | 8x8 | fastkd-torch | 2 ms | 0.25 ms (memory) | 8x | naive+compile | 5 ms | "
            "2.5x | 1.0e-08 |") in summary
    assert "| affinity_full | 2, 19 | | fastkd-triton | error | | | | | | |" in summary  # why: under its section


def test_report_reads_results_written_before_the_floors(tmp_path):
    old_fields = [field for field in run.FIELDS if "floor" not in field and "gemm" not in field and "copy" not in field]
    _write_results(tmp_path, REPORT_ENV, CONSISTENCY_ROWS, fields=old_fields)
    summary = open(report.write_report(str(tmp_path))).read()
    assert "| 16x16 (256) | oom | 8 ms / 2 MiB | 3 ms / 3 MiB |\n" in summary
    assert "Headline" not in summary and "floor" not in summary


@pytest.mark.parametrize("op_name", sorted(providers.OPS))
def test_inputs_are_contiguous_near_converged_pairs(op_name):
    series = run.Series(op_name, 2, 5, ((9, 11),))
    s, t = run.make_inputs(op_name, series, 9, 11, torch.float32, torch.device("cpu"), 1e-3, 0)
    assert s.shape == t.shape == (2, 5, 9, 11) and s.is_contiguous() and t.is_contiguous()
    assert s.requires_grad and not t.requires_grad
    assert 0 < (t - s).abs().max() <= 1e-2 * s.abs().max()


def test_headline_runs_every_cpu_series_at_one_size_of_its_sweep():
    args = run.parse_args(["--headline"])
    for series in run.plan(torch.device("cpu"), quick=False):
        assert run.sized(series, args).sizes == (run.HEADLINE_SIZES[series.op, series.channels],)
        assert run.HEADLINE_SIZES[series.op, series.channels] in series.sizes
    assert run.sized(series, run.parse_args([])) == series


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "2x9"], "H, W >= 3"),
    (["--sizes", "9by9"], "HxW"),
    (["--repeats", "0"], "--repeats"),
    (["--time-limit", "0"], "--time-limit"),
    (["--mismatch", "nan"], "--mismatch"),
    (["--providers", "fastkd-auto"], "--providers"),
    (["--ops", "pixelwise"], "--ops"),
    (["--headline", "--quick"], "--headline"),
    (["--headline", "--sizes", "9x9"], "--headline"),
])
def test_bad_arguments_are_refused_by_name(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
