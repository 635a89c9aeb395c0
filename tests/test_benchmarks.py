"""benchmarks/: every provider computes the loss it is compared on; the sweep runs end to end, records
out-of-memory and time-outs instead of hiding them, and writes its CSV, plots and summary."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from helpers import randn

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import providers  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402

# (op, provider) for every provider but the compiled one, which the --quick run below checks
PLAIN_PROVIDERS = [(op, name) for op in providers.OPS
                   for name in ("naive", "gram-fp32", "gram-fp64", "keops", "fastkd-torch")
                   if name in ("naive", "fastkd-torch") or getattr(providers.OPS[op], name.split("-")[0]) is not None]


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
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-13 * expected_grad.abs().max().item())


@pytest.mark.parametrize("op_name", sorted(providers.OPS))
def test_naive_computes_16_bit_inputs_in_float32(gen, op_name):
    s = randn((1, 4, 6, 8), gen, torch.bfloat16)
    t = randn((1, 4, 6, 8), gen, torch.bfloat16)
    naive = providers.OPS[op_name].naive
    loss = naive(s, t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, naive(s.float(), t.float()), rtol=0, atol=0)


def test_gram_fp32_cancels_near_convergence_where_fp64_does_not(gen):
    """Why the benchmarks report accuracy: at a 1e-3 mismatch the float32 Gram identity loses the loss."""
    s = randn((1, 16, 24, 24), gen, torch.float32).relu_()
    t = s * (1 + 1e-3 * randn(s.shape, gen, torch.float32))
    expected = providers.OPS["affinity_full"].reference(s, t)
    fp32 = providers.gram_affinity_full(s, t, torch.float32)
    fp64 = providers.gram_affinity_full(s, t, torch.float64)
    assert abs(fp64.item() / expected.item() - 1) < 1e-6
    assert abs(fp32.item() / expected.item() - 1) > 1e-2


def test_kernel_backends_on_cpu_are_listed_as_not_timed():
    runnable, unavailable = providers.providers(providers.OPS["consistency"], torch.device("cpu"))
    names = [provider.name for provider in runnable]
    assert "fastkd-triton" not in names and "fastkd-cuda" not in names
    assert set(unavailable) >= {"fastkd-triton", "fastkd-cuda"}
    assert all(reason for reason in unavailable.values())


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
    for op_name, op in providers.OPS.items():
        runnable, _ = providers.providers(op, device)
        expected = {provider.name for provider in runnable}
        if importlib.util.find_spec("pykeops") is None:
            expected.discard("keops")
        of_op = [row for row in rows if row["op"] == op_name]
        assert {row["provider"] for row in of_op} == expected
        series = run.plan(device, quick=True)
        sizes = next(series.sizes for series in series if series.op == op_name)
        assert len(of_op) == len(expected) * len(sizes) * len(run.MODES)
        for row in of_op:
            assert row["status"] == "ok", row
            assert float(row["q1_ms"]) <= float(row["median_ms"]) <= float(row["q3_ms"])
            assert row["device"] == env["device"] and row["torch"] == torch.__version__ and row["tf32"]
            assert row["reference"] == "literal"
            # every provider runs in float32 except gram-fp64; all but gram-fp32 keep the loss near convergence
            if row["provider"] != "gram-fp32":
                assert float(row["loss_rel_error"]) < 1e-4, row
        png = out / f"{op_name}_B{of_op[0]['batch']}_C{of_op[0]['channels']}.png"
        assert png.stat().st_size > 10_000 and png.read_bytes().startswith(b"\x89PNG")
        assert f"## {op_name}, B=" in summary and f"]({png.name})" in summary
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


def test_report_ratios_and_failures(tmp_path):
    """The summary's headline divides by the fastest fastkd backend at the largest size the naive version ran."""
    env = {"device": "a CPU", "command": "python benchmarks/run.py", "minutes": 1.0, "torch": "2", "triton": "3",
           "pykeops": "not installed", "fastkd": "0.1.0", "threads": 2, "tf32": "off", "dtype": "float32",
           "mismatch": 1e-3, "repeats": 3, "time_limit_s": 10.0, "unavailable": {"consistency": {"keops": "n/a"}}}
    (tmp_path / "environment.json").write_text(json.dumps(env))
    fields = dict(op="consistency", kind="", dtype="float32", batch=2, channels=19, note="", min_ms="", repeats=3,
                  loss_rel_error="1e-8", grad_rel_error="2e-8", reference="literal")
    measured = [("naive", "naive", 8, 8, "ok", 10.0, 4 << 20), ("fastkd-torch", "fastkd", 8, 8, "ok", 4.0, 1 << 20),
                ("fastkd-cpp", "fastkd", 8, 8, "ok", 2.0, 2 << 20), ("naive", "naive", 16, 16, "oom", None, None),
                ("fastkd-torch", "fastkd", 16, 16, "ok", 8.0, 2 << 20), ("fastkd-cpp", "fastkd", 16, 16, "ok", 3.0, 3 << 20)]
    with open(tmp_path / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, run.FIELDS, extrasaction="ignore")
        writer.writeheader()
        for provider, kind, height, width, status, median, peak in measured:
            for mode in run.MODES:
                ok = status == "ok"
                writer.writerow(dict(fields, provider=provider, kind=kind, mode=mode, height=height, width=width,
                                     m=height * width, status=status, median_ms=median if ok else "",
                                     q1_ms=median if ok else "", q3_ms=median if ok else "",
                                     peak_bytes=peak if ok else "", note="" if ok else "RuntimeError: out of memory"))
    summary = open(report.write_report(str(tmp_path))).read()
    assert ("at 8x8 (m = 64, the largest the naive version ran), fastkd-cpp 2 ms, 2 MiB, loss error 1.0e-08: "
            "naive takes 5x the time, 2x the memory, loss error 1.0e-08") in summary
    assert "naive: largest m 64 (oom from m = 256)" in summary
    assert "| 16x16 (256) | oom | 8 ms / 2 MiB | 3 ms / 3 MiB |" in summary
    assert "- naive at 16x16: oom, RuntimeError: out of memory" in summary
    assert "- consistency, keops: n/a" in summary
    assert (tmp_path / "consistency_B2_C19.png").exists()


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "2x9"], "H, W >= 3"),
    (["--sizes", "9by9"], "HxW"),
    (["--repeats", "0"], "--repeats"),
    (["--time-limit", "0"], "--time-limit"),
    (["--mismatch", "nan"], "--mismatch"),
    (["--providers", "fastkd-auto"], "--providers"),
    (["--ops", "pixelwise"], "--ops"),
])
def test_bad_arguments_are_refused_by_name(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
