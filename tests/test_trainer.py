"""The reference trainer (examples/train.py): every loss combination end to end, the magnitude rule, Xie et
al.'s eq. 3, the best checkpoint, exact resumption after an interruption (with every option that keeps
state), two processes, and the command line's refusals. Tiny images and a few steps keep it short."""

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastkd

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import train  # noqa: E402  (examples/train.py)
from kdtrain.data import IGNORE_INDEX  # noqa: E402
from kdtrain.distill import DistillConfig, StudentObjective  # noqa: E402
from kdtrain.trainer import Interrupted, Trainer  # noqa: E402

TINY = ["--image-size", "16", "--teacher-images", "16", "--labelled-images", "8", "--unlabelled-images", "8",
        "--val-images", "8", "--batch-size", "4", "--unlabelled-batch-size", "4", "--teacher-width", "8",
        "--student-width", "4", "--latent-channels", "8", "--critic-width", "8", "--steps", "4",
        "--teacher-steps", "3", "--autoencoder-steps", "2", "--checkpoint-every", "2", "--no-progress"]


def tiny_args(out, gen, *extra):
    seed, data_seed = (int(v) for v in torch.randint(0, 2**20, (2,), generator=gen))
    return train.parse_args(TINY + ["--out", str(out), "--seed", str(seed), "--data-seed", str(data_seed),
                                    *extra])


COMBINATIONS = [  # (losses, other options)
    (["ce"], []),
    (["ce", "pixel", "pairwise", "holistic"], []),
    (["ce", "pixel", "holistic"], ["--critic-setup", "code", "--optimizer", "sgd", "--amp"]),
    (["ce", "pairwise"], ["--pairwise-patch", "2", "--pairwise-window", "1", "--pairwise-pool", "max"]),
    (["ce", "probability", "consistency", "unlabelled"], []),
    (["ce", "probability", "consistency", "unlabelled"], ["--distill-on", "all", "--weighting", "paper"]),
    (["ce", "adaptation", "affinity"], ["--amp"]),
    (["pixel", "probability", "unlabelled"], ["--student-model", "multipath"]),
]


@pytest.mark.parametrize("losses, options", COMBINATIONS, ids=lambda c: "+".join(c) or "-")
def test_each_loss_combination_trains_end_to_end(tmp_path, gen, losses, options):
    args = tiny_args(tmp_path, gen, "--losses", ",".join(losses), *options)
    trainer = Trainer(args)
    initial = {k: v.clone() for k, v in trainer.models["student"].state_dict().items()}
    metrics = trainer.run()

    needs_teacher = losses != ["ce"]
    expected_stages = (["teacher"] if needs_teacher else []) + (["autoencoder"] if "affinity" in losses else [])
    assert metrics["stages"] == expected_stages + ["student"]
    # He et al.'s two terms have their own adapters (C_f, C_a); the critic scores logits alone in "code"
    assert ("adapter" in trainer.models) == ("adaptation" in losses)
    assert ("affinity_adapter" in trainer.models) == ("affinity" in losses)
    if "holistic" in losses:
        expected_input = trainer.num_classes + (0 if args.critic_setup == "code" else 3)
        assert trainer.models["critic"].input_norm.num_features == expected_input
    assert set(metrics["weights"]) >= set(losses)
    for stage in metrics["stages"]:
        assert len(trainer.history[stage]) == trainer.stage_steps[stage]
    recorded = set(trainer.history["student"][0])
    assert set(losses) <= recorded and "total" in recorded
    assert ("critic" in recorded) == ("holistic" in losses)
    assert all(torch.isfinite(torch.tensor(list(terms.values()))).all() for terms in trainer.history["student"])
    for stage in ("student", "teacher") if needs_teacher else ("student",):
        assert 0 <= metrics[stage]["miou"] <= 1 and 0 <= metrics[stage]["pixel_accuracy"] <= 1
    final = trainer.models["student"].state_dict()
    assert any(not torch.equal(initial[k], final[k]) for k in initial if final[k].is_floating_point())
    assert json.loads((tmp_path / "metrics.json").read_text())["losses"] == losses
    pytest.importorskip("matplotlib")
    assert (tmp_path / "loss_curves.png").stat().st_size > 0 and (tmp_path / "predictions.png").stat().st_size > 0


def test_magnitude_rule_puts_each_term_at_the_cross_entropy(tmp_path, gen):
    """Calibrated on the first batch alone, with a student without dropout: the first step sees that batch
    with the same weights, so every calibrated weighted term equals the cross-entropy there; the weights
    are those of fastkd.magnitude_weights, recorded in metrics.json, and holistic keeps its paper weight."""
    args = tiny_args(tmp_path, gen, "--losses", "ce,pixel,consistency,pairwise,holistic,adaptation",
                     "--calibration-batches", "1")
    trainer = Trainer(args)
    calibrate, states = trainer._calibrate, {}

    def calibrate_and_record():
        states["before"] = {name: copy.deepcopy(trainer.models[name].state_dict()) for name in ("student", "adapter")}
        calibrate()
        states["after"] = {name: copy.deepcopy(trainer.models[name].state_dict()) for name in ("student", "adapter")}
    trainer._calibrate = calibrate_and_record
    metrics = trainer.run()
    # the calibration ran in training mode and left the BatchNorm statistics (and every weight) as they were
    for name, before in states["before"].items():
        assert all(torch.equal(before[key], states["after"][name][key]) for key in before), name
    first = trainer.history["student"][0]
    for name in ("pixel", "consistency", "pairwise", "adaptation"):
        assert first[name] == pytest.approx(first["ce"], rel=1e-4), name
        assert metrics["weights"][name] * metrics["calibration"]["terms"][name] == pytest.approx(
            metrics["calibration"]["ce"], rel=1e-12)
    assert metrics["weights"]["holistic"] == 0.1 and metrics["calibration"]["batches"] == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["weights"] == metrics["weights"]


def test_unlabelled_objective_is_xie_eq3(gen):
    """With distill_on="labelled": L = CE + sum_k w_k L_k(labelled) + lambda (CE_pseudo + sum_k w_k L_k(unlabelled))."""
    config = DistillConfig(terms=("ce", "probability", "consistency", "unlabelled"))
    objective = StudentObjective(config)
    images = torch.rand(5, 3, 8, 8, generator=gen)
    s_logits, t_logits = (torch.randn(5, 4, 8, 8, generator=gen) * 3 for _ in range(2))
    features = torch.randn(5, 6, 4, 4, generator=gen)
    labels = torch.randint(0, 4, (2, 8, 8), generator=gen)
    weights = {"ce": 1.0, "probability": 2.0, "consistency": 0.01, "unlabelled": 0.3}
    total, weighted = objective(images, labels, (s_logits, features), (t_logits, features), {}, weights)

    def terms(part):
        return 2.0 * fastkd.ProbabilityLoss()(s_logits[part], t_logits[part]) + \
            0.01 * fastkd.ConsistencyLoss()(s_logits[part], t_logits[part])
    pseudo = fastkd.pseudo_labels(t_logits[2:], 0.7, IGNORE_INDEX)
    pseudo_ce = torch.nn.functional.cross_entropy(s_logits[2:], pseudo, ignore_index=IGNORE_INDEX, reduction="sum")
    pseudo_ce = pseudo_ce / (pseudo != IGNORE_INDEX).sum().clamp(min=1)
    ce = torch.nn.functional.cross_entropy(s_logits[:2], labels)
    expected = ce + terms(slice(0, 2)) + 0.3 * (pseudo_ce + terms(slice(2, None)))
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(weighted["unlabelled"], 0.3 * (pseudo_ce + terms(slice(2, None))))
    assert set(weighted) == {"ce", "probability", "consistency", "unlabelled"}


def test_best_checkpoint_keeps_the_best_evaluation(tmp_path, gen):
    args = tiny_args(tmp_path, gen, "--losses", "ce", "--steps", "6", "--eval-every", "2")
    trainer = Trainer(args)
    evaluated = []
    evaluate = trainer._evaluate

    def record(model):
        metrics = evaluate(model)
        if model is trainer.models["student"]:
            evaluated.append((trainer.step, metrics["miou"]))
        return metrics
    trainer._evaluate = record
    metrics = trainer.run()
    assert [step for step, _ in evaluated] == [2, 4, 6]
    best_step, best_miou = max(evaluated, key=lambda e: (e[1], -e[0]))
    assert metrics["best"]["step"] == best_step and metrics["best"]["miou"] == best_miou
    saved = torch.load(tmp_path / "best.pt", weights_only=False)
    assert saved["step"] == best_step and saved["miou"] == best_miou
    assert metrics["best"]["miou"] >= metrics["student"]["miou"]


RESUMED_OPTIONS = [  # every piece of state: dropout of the multi-path student, the critic's random
    # interpolation, autoencoder, both adapters, the unlabelled stream, the calibrated weights, best.pt
    ["--losses", "ce,pixel,holistic,adaptation,affinity,unlabelled", "--student-model", "multipath",
     "--eval-every", "2"],
    # SGD's momentum buffers, the code's critic, bfloat16 autocast, the papers' fixed weights
    ["--losses", "ce,probability,consistency,holistic,unlabelled", "--optimizer", "sgd", "--critic-setup", "code",
     "--amp", "--weighting", "paper"],
]


@pytest.mark.parametrize("options", RESUMED_OPTIONS, ids=["magnitude-adam", "paper-sgd-amp"])
def test_interrupted_run_resumes_exactly(tmp_path, gen, monkeypatch, options):
    """SIGTERM in the teacher stage, then --stop-after in every later stage: the resumed run ends with
    the same weights, optimizer states and metrics, bit for bit, as the uninterrupted one."""
    reference_args = tiny_args(tmp_path / "reference", gen, *options)
    seeds = ["--seed", str(reference_args.seed), "--data-seed", str(reference_args.data_seed)]
    reference = Trainer(reference_args)
    reference_metrics = reference.run()

    resumed_out = tmp_path / "resumed"
    args = train.parse_args(TINY + options + seeds + ["--out", str(resumed_out)])
    first = Trainer(args)
    teacher_step = first._teacher_step

    def step_then_signal(batches):
        terms = teacher_step(batches)
        if first.step == 1:
            signal.raise_signal(signal.SIGTERM)  # delivered to the handler the run installed
        return terms

    monkeypatch.setattr(first, "_teacher_step", step_then_signal)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="SIGTERM"):
        first.run()
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the run restores the caller's handler
    assert torch.load(resumed_out / "checkpoint.pt", weights_only=False)["step"] == 2

    interruptions = 1
    # resumed with a loader worker: interrupted while it prepares the next step, it must change nothing
    stop_args = train.parse_args(TINY + options + seeds + ["--out", str(resumed_out), "--stop-after", "1",
                                                           "--workers", "1"])
    while True:
        try:
            resumed = Trainer(stop_args)
            metrics = resumed.run()
            break
        except Interrupted:
            interruptions += 1
    assert interruptions >= 6  # it stopped in the teacher, (autoencoder) and student stages

    assert metrics == reference_metrics
    for name, model in reference.models.items():
        expected, got = model.state_dict(), resumed.models[name].state_dict()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    for name, optimizer in reference.optimizers.items():
        expected = optimizer.state_dict()["state"]
        got = resumed.optimizers[name].state_dict()["state"]
        assert expected.keys() == got.keys() and expected, name
        assert all(torch.equal(expected[i][key], got[i][key]) for i in expected for key in expected[i]), name
    assert resumed.history == reference.history and resumed.weights == reference.weights
    best = [torch.load(out / "best.pt", weights_only=False) for out in (tmp_path / "reference", resumed_out)]
    assert best[0]["step"] == best[1]["step"]
    assert all(torch.equal(best[0]["student"][k], best[1]["student"][k]) for k in best[0]["student"])


def test_two_processes_with_torchrun(tmp_path, gen):
    seed = int(torch.randint(0, 2**20, (), generator=gen))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(EXAMPLES / "train.py"), *TINY, "--losses", "ce,pixel,pairwise,holistic,adaptation",
               "--out", str(tmp_path), "--seed", str(seed), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["replicas_identical"] is True
    assert 0 <= metrics["student"]["miou"] <= 1
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["stage"] == "done"


@pytest.mark.parametrize("argv, named", [
    (["--losses", "ce,kd"], "--losses"),
    (["--steps", "0"], "--steps"),
    (["--pseudo-threshold", "1.5"], "--pseudo-threshold"),
    (["--pixel-weight", "-1"], "--pixel-weight"),
    (["--data", "voc"], "--data-root"),
    (["--pairwise-pool", "max"], "--pairwise-pool"),
    (["--consistency-weight", "0.4"], "--consistency-weight"),  # the magnitude rule chooses it
    (["--optimizer", "rmsprop"], "--optimizer"),
    (["--critic-setup", "logits"], "--critic-setup"),
    (["--calibration-batches", "0"], "--calibration-batches"),
])
def test_bad_command_line_is_refused_naming_the_argument(capsys, argv, named):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_resuming_on_another_device_type_is_refused(tmp_path, gen):
    """CPU and CUDA differ in random streams, autocast dtype and loss scaling: a checkpoint resumes only on
    the device type that wrote it."""
    args = tiny_args(tmp_path, gen, "--losses", "ce", "--stop-after", "1")
    with pytest.raises(Interrupted):
        Trainer(args).run()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["device"] == "cpu"
    state["device"] = "cuda"
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(SystemExit, match="was written on cuda; resume it there"):
        Trainer(args)


def test_loader_workers_change_nothing(tmp_path, gen):
    """Batches prepared by two DataLoader worker processes (labelled and unlabelled streams, every stage)
    are those the training process reads itself: the same losses, weights and final student."""
    options = ["--losses", "ce,pixel,adaptation,unlabelled"]
    runs = {}
    for workers in ("0", "2"):
        args = tiny_args(tmp_path / workers, torch.Generator().manual_seed(int(gen.initial_seed()) % 2**31),
                         *options, "--workers", workers)
        trainer = Trainer(args)
        trainer.run()
        runs[workers] = trainer
    assert runs["0"].history == runs["2"].history and runs["0"].weights == runs["2"].weights
    expected, got = runs["0"].models["student"].state_dict(), runs["2"].models["student"].state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
