"""Every CUDA kernel under the emulator, at one representative shape per op (benchmarks/emulator_profile.py):
its profile is the recorded one (benchmarks/results/emulator-profile/), a loss call prints it, and its results
are bitwise the same when blocks and threads run in a random order."""

import json
import os
import sys

import pytest
import torch

import fastkd.functional as F
from fastkd import _extension
from helpers import BENCHMARKS, randn

sys.path.insert(0, BENCHMARKS)
import emulator_profile  # noqa: E402

pytestmark = pytest.mark.skipif(_extension.LOAD_ERROR is not None, reason=str(_extension.LOAD_ERROR))


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    monkeypatch.setenv("FASTKD_EMULATE_CUDA", "1")
    monkeypatch.delenv("FASTKD_EMULATOR_ORDER", raising=False)


def recorded(case):
    with open(os.path.join(emulator_profile.RECORD, "profile.json")) as f:
        return [row for row in json.load(f) if row["case"] == case]


@pytest.mark.parametrize("case", list(emulator_profile.CASES))
def test_profile_is_the_recorded_one(case):
    """A kernel change that moves a figure fails here: rerun `python benchmarks/emulator_profile.py --write` and
    commit the new record with it, so the change shows as numbers."""
    rows = emulator_profile.profile(case)
    assert rows, "no kernel launch was profiled"
    assert rows == recorded(case)


def test_a_loss_call_prints_one_profile_line_per_launch(monkeypatch, capfd, gen):
    monkeypatch.setenv("FASTKD_EMULATOR_PROFILE", "1")
    s, t = randn((1, 5, 9, 13), gen), randn((1, 5, 9, 13), gen)
    capfd.readouterr()
    F.consistency_loss(s, t, backend="cuda")
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("fastkd emulator profile:")]
    torch.ops.fastkd_emulated.emulator_take_profile()
    assert len(lines) == 1  # the forward's one launch
    assert "consistency_forward_kernel<T> grid=(1, 1, 1) block=(256, 1, 1)" in lines[0]
    assert "bank_conflicts=" in lines[0] and "sectors_per_request=" in lines[0]


def test_without_the_flag_nothing_is_profiled(gen):
    torch.ops.fastkd_emulated.emulator_take_profile()
    F.consistency_loss(randn((1, 5, 9, 13), gen), randn((1, 5, 9, 13), gen), backend="cuda")
    assert torch.ops.fastkd_emulated.emulator_take_profile() == []


@pytest.mark.parametrize("case", list(emulator_profile.CASES))
def test_results_are_bitwise_the_same_in_a_random_order(monkeypatch, case):
    expected = emulator_profile.CASES[case]("cuda", "cpu")
    monkeypatch.setenv("FASTKD_EMULATOR_ORDER", "random")
    monkeypatch.setenv("FASTKD_EMULATOR_SEED", "7")
    results = emulator_profile.CASES[case]("cuda", "cpu")
    assert len(results) == len(expected) >= 2
    for result, reference in zip(results, expected):
        assert torch.equal(result, reference)
