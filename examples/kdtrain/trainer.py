"""Stages, checkpoints and data parallelism of the reference trainer.

A run goes through stages: ``teacher`` (cross-entropy on the teacher's labelled set; skipped when a trained
teacher is given or no term needs one), ``autoencoder`` (He et al. eq. 1 on the teacher's features; only for
the adaptation/affinity terms), ``student`` (the objective of :mod:`kdtrain.distill`), then ``done``. With
``--weighting magnitude`` the student stage starts by measuring its terms on the first
``--calibration-batches`` batches (no step taken, the models' state restored) and weighting them by
Xie et al.'s rule (:func:`fastkd.magnitude_weights`); the weights are printed, kept in the checkpoint and in
``metrics.json``. The student is evaluated every ``--eval-every`` steps and at the end; the best by val mIoU
is kept in ``best.pt``.

Checkpoints hold everything the rest of the run depends on: the stage and step, every model, optimizer,
scheduler and gradient scaler, the loss weights, the torch/numpy/python RNG states of every rank, and the
loss and evaluation history. The
data position is the step itself (:class:`kdtrain.data.BatchStream`). They are written atomically (a
temporary file, then ``os.replace``) every ``--checkpoint-every`` steps, at the end of each stage, and when
SIGINT or SIGTERM arrives (the step in progress finishes first), so rerunning the same command resumes
and ends bitwise where an uninterrupted run ends.

Data parallelism: under ``torchrun`` every rank takes its share of each global batch; the student and the
teacher are wrapped in DistributedDataParallel. The autoencoder, adapter and critic have their gradients
averaged by hand (:func:`average_gradients`): the autoencoder is trained through its ``loss`` method, not
``forward``, and the critic's gradient penalty differentiates through it twice, neither of which DDP's
forward hooks follow.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import fastkd
from kdtrain import report
from kdtrain.data import IGNORE_INDEX, BatchStream, StepBatches, build_datasets
from kdtrain.distill import TEACHER_TERMS, DistillConfig, StudentObjective
from kdtrain.models import build_model

# Arguments that may change between an interrupted run and its resumption without changing the result.
RESUME_NEUTRAL_ARGS = frozenset({"out", "stop_after", "checkpoint_every", "progress", "ablation", "seeds",
                                 "ablation_rows", "workers"})


class Distributed:
    """Rank, world size and device; initialises the process group when launched by torchrun."""

    def __init__(self, device: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)


def average_gradients(module: torch.nn.Module, distributed: Distributed) -> None:
    """All-reduce mean of the gradients of ``module`` (what DDP does for the modules it wraps)."""
    if distributed.world_size == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= distributed.world_size


def poly_scheduler(optimizer, total_steps: int):
    """The papers' poly learning rate: lr * (1 - step / total)^0.9 (Liu et al. sec. 3.1, He et al. sec. 4.1)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - min(step, total_steps) / total_steps) ** 0.9)


def build_optimizer(parameters, args) -> torch.optim.Optimizer:
    """``--optimizer sgd``: SGD with momentum 0.9, the papers' choice (Liu et al.: lr 0.01, weight decay 5e-4,
    the defaults; He et al.: 0.007, 4e-5); ``adam``: Adam (the trainer's default for these short runs)."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.Adam(parameters, lr=args.lr, weight_decay=args.weight_decay)


def save_atomically(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then ``os.replace``: a crash leaves the old or the new file."""
    temporary = path.with_suffix(".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Progress:
    """A tqdm bar when tqdm is installed (and ``enabled``), otherwise about ten plain lines per stage."""

    def __init__(self, description: str, total: int, initial: int, enabled: bool):
        self.description, self.total, self.enabled = description, total, enabled
        self.every = max(1, total // 10)
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, initial=initial, desc=description, dynamic_ncols=True)

    def update(self, step: int, terms: dict) -> None:
        if not self.enabled:
            return
        summary = " ".join(f"{name} {value:.4g}" for name, value in terms.items())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(summary, refresh=False)
        elif step % self.every == 0 or step == self.total:
            print(f"[{self.description}] step {step}/{self.total}  {summary}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Interrupted(Exception):
    """Raised after the checkpoint is written when a signal or ``--stop-after`` ends the run early."""


class Trainer:
    def __init__(self, args, only_teacher: bool = False):
        self.args = args
        self.out = Path(args.out)
        self.distributed = Distributed(args.device)
        self.device = self.distributed.device
        self.stop_signal = None
        self.steps_this_invocation = 0

        torch.manual_seed(args.seed)
        teacher_train, student_train, unlabelled, self.val, self.num_classes = build_datasets(args)
        rank, world = self.distributed.rank, self.distributed.world_size
        for name, size in (("--batch-size", args.batch_size), ("--unlabelled-batch-size", args.unlabelled_batch_size)):
            if size % world:
                raise ValueError(f"{name} {size} must be a multiple of the number of processes ({world})")
        self.teacher_stream = BatchStream(teacher_train, args.batch_size, args.data_seed, rank, world)
        self.labelled_stream = BatchStream(student_train, args.batch_size, args.seed, rank, world)
        self.config = DistillConfig(
            terms=tuple(args.losses), temperature=args.temperature, pairwise_patch=args.pairwise_patch,
            pairwise_window=args.pairwise_window, pairwise_pool=args.pairwise_pool,
            pseudo_threshold=args.pseudo_threshold, distill_on=args.distill_on, critic_setup=args.critic_setup)
        self.unlabelled_stream = (BatchStream(unlabelled, args.unlabelled_batch_size, args.seed + 1, rank, world)
                                  if self.config.needs_unlabelled and not only_teacher else None)
        self.objective = StudentObjective(self.config)

        needs_teacher = bool(TEACHER_TERMS & set(self.config.terms))
        terms = set() if only_teacher else set(self.config.terms)
        self.models = {"teacher": build_model(args.teacher_model, self.num_classes, args.teacher_width)}
        if not only_teacher:
            self.models["student"] = build_model(args.student_model, self.num_classes, args.student_width)
        adapters = {"adaptation": "adapter", "affinity": "affinity_adapter"}  # He et al.'s C_f and C_a
        adaptation = bool(terms & set(adapters))
        if adaptation:
            teacher_channels = self.models["teacher"].feature_channels
            self.models["autoencoder"] = fastkd.FeatureAutoencoder(teacher_channels, args.latent_channels)
        for term in sorted(terms & set(adapters)):
            self.models[adapters[term]] = fastkd.FeatureAdapter(self.models["student"].feature_channels,
                                                                args.latent_channels)
        if "holistic" in terms:  # Liu et al.'s code scores the raw logits without the image
            self.models["critic"] = fastkd.HolisticDiscriminator(
                self.num_classes, image_channels=0 if args.critic_setup == "code" else 3,
                base_channels=args.critic_width, blocks=3, attention=1)
        for model in self.models.values():
            model.to(self.device)
        torch.manual_seed(args.seed * 1_000 + rank)  # ranks share the initial weights, not their dropout masks

        stages = ["teacher"] if only_teacher else []
        if not only_teacher:
            if needs_teacher and args.teacher is None:
                stages.append("teacher")
            if adaptation:
                stages.append("autoencoder")
            stages.append("student")
        self.stages = stages + ["done"]
        self.stage_steps = {"teacher": args.teacher_steps, "autoencoder": args.autoencoder_steps,
                            "student": args.steps}
        self.teacher_available = needs_teacher or only_teacher or args.teacher is not None
        if args.teacher is not None and not only_teacher:
            self.models["teacher"].load_state_dict(torch.load(args.teacher, map_location=self.device))

        self.optimizers, self.schedulers = {}, {}
        self.trained = {"teacher": ("teacher",), "autoencoder": ("autoencoder",),
                        "student": ("student",) + tuple(adapters[t] for t in sorted(terms & set(adapters)))}
        for stage in self.stages[:-1]:
            parameters = [p for name in self.trained[stage] for p in self.models[name].parameters()]
            self.optimizers[stage] = build_optimizer(parameters, args)
            self.schedulers[stage] = poly_scheduler(self.optimizers[stage], self.stage_steps[stage])
        if "critic" in self.models:
            # One critic step per student step (Liu et al. sec. 2.2); Adam with betas (0.9, 0.99) and its own
            # learning rate is the trainer's choice, the paper does not name the critic's optimiser.
            self.optimizers["critic"] = torch.optim.Adam(self.models["critic"].parameters(), lr=args.critic_lr,
                                                         betas=(0.9, 0.99))
        # Mixed precision (--amp): bfloat16 autocast on CPU needs no loss scaling; float16 on CUDA does.
        self.amp_dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        self.scalers = {name: torch.amp.GradScaler(self.device.type, enabled=args.amp and self.device.type == "cuda")
                        for name in self.optimizers}
        self.wrapped = {name: self.distributed.wrap(self.models[name])
                        for name in ("teacher", "student") if name in self.models}

        self.stage, self.step = self.stages[0], 0
        self.history = {stage: [] for stage in self.stages[:-1]}
        self.evaluations = {}
        # every term's weight; with --weighting magnitude the calibrated ones are set when the student starts
        self.weights = dict(args.weights) if args.weighting == "paper" or not self.config.calibrated_terms else None
        self.calibration = None
        self.checkpoint_path = self.out / "checkpoint.pt"
        if self.checkpoint_path.exists():
            self._load()

    # ---- checkpoints -------------------------------------------------------------------------------------

    def _training_args(self) -> dict:
        return {k: v for k, v in vars(self.args).items() if k not in RESUME_NEUTRAL_ARGS}

    def save(self) -> None:
        rng_states = self.distributed.gather(rng_state())
        if self.distributed.is_main:
            state = {
                "stage": self.stage, "step": self.step, "args": self._training_args(),
                "world_size": self.distributed.world_size, "device": self.device.type, "rng": rng_states,
                "models": {name: model.state_dict() for name, model in self.models.items()},
                "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
                "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
                "scalers": {name: scaler.state_dict() for name, scaler in self.scalers.items()},
                "weights": self.weights, "calibration": self.calibration,
                "history": self.history, "evaluations": self.evaluations,
            }
            self.out.mkdir(parents=True, exist_ok=True)
            save_atomically(state, self.checkpoint_path)
        self.distributed.barrier()

    def _load(self) -> None:
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        changed = sorted(k for k in set(state["args"]) | set(self._training_args())
                         if state["args"].get(k) != self._training_args().get(k))
        if changed:
            raise SystemExit(f"{self.checkpoint_path} was written with other settings ({', '.join(changed)}); "
                             f"rerun with the same arguments or choose another --out")
        if state["device"] != self.device.type:  # CPU and CUDA differ in RNG, autocast type and loss scaling
            raise SystemExit(f"{self.checkpoint_path} was written on {state['device']}; resume it there "
                             f"(--device {state['device']}), this run is on {self.device.type}")
        if state["world_size"] != self.distributed.world_size:
            raise SystemExit(f"{self.checkpoint_path} was written by {state['world_size']} processes; resume "
                             f"with the same number (this run has {self.distributed.world_size})")
        for name, model in self.models.items():
            model.load_state_dict(state["models"][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][name])
        for name, scaler in self.scalers.items():
            scaler.load_state_dict(state["scalers"][name])
        set_rng_state(state["rng"][self.distributed.rank])
        self.stage, self.step = state["stage"], state["step"]
        self.weights, self.calibration = state["weights"], state["calibration"]
        self.history, self.evaluations = state["history"], state["evaluations"]

    # ---- the run -----------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Trains to the end (or until interrupted: raises :class:`Interrupted`); returns the final metrics."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.stage != "done":
                self._train_stage()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self._finish()

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signal.Signals(signum).name

    def _should_stop(self) -> bool:
        """Whether any rank got a signal or reached --stop-after (all ranks agree, so all stop together)."""
        stop = self.stop_signal is not None or self.steps_this_invocation == self.args.stop_after
        flag = self.distributed.sum(torch.tensor([float(stop)], device=self.device))
        return bool(flag.item())

    def _train_stage(self) -> None:
        stage, total = self.stage, self.stage_steps[self.stage]
        step_function = {"teacher": self._teacher_step, "autoencoder": self._autoencoder_step,
                         "student": self._student_step}[stage]
        for model in self.models.values():
            model.train()
        if stage != "teacher":
            self.models["teacher"].eval()
            self.models["teacher"].requires_grad_(False)
        if stage == "student" and "autoencoder" in self.models:
            self.models["autoencoder"].eval()
            self.models["autoencoder"].requires_grad_(False)
        if stage == "student" and self.weights is None:
            self._calibrate()
        progress = Progress(stage, total, self.step, self.distributed.is_main and self.args.progress)
        # --workers processes prepare the next steps' batches while this one trains; each batch is a function
        # of its step, so they are the batches the main process would read, and the loader's own generator
        # leaves the global random state alone
        loader = torch.utils.data.DataLoader(
            StepBatches(self._streams(stage)), batch_size=None, sampler=range(self.step, total),
            num_workers=self.args.workers, pin_memory=self.device.type == "cuda", generator=torch.Generator())
        try:
            for batches in loader:
                terms = step_function(self._to_device(batches))
                names = sorted(terms)
                values = self.distributed.sum(torch.tensor([terms[n] for n in names], dtype=torch.float64,
                                                           device=self.device)) / self.distributed.world_size
                terms = dict(zip(names, values.tolist()))
                self.step += 1
                self.steps_this_invocation += 1
                self.history[stage].append(terms)
                progress.update(self.step, terms)
                if stage == "student" and self.step % self.args.eval_every == 0 and self.step < total:
                    self._evaluate_student()
                if self._should_stop():
                    self.save()
                    raise Interrupted(f"stopped ({self.stop_signal or '--stop-after'}) in stage {stage} at step "
                                      f"{self.step}/{total}; checkpoint {self.checkpoint_path} written, rerun "
                                      f"the same command to resume")
                if self.step % self.args.checkpoint_every == 0 and self.step < total:
                    self.save()
        finally:
            progress.close()
        if stage == "teacher":
            self.evaluations[stage] = self._evaluate(self.models[stage])
        if stage == "student":
            self.evaluations[stage] = self._evaluate_student()
        if stage in ("teacher", "student") and self.distributed.is_main:
            print(f"[{stage}] val mIoU {self.evaluations[stage]['miou']:.4f} "
                  f"pixel accuracy {self.evaluations[stage]['pixel_accuracy']:.4f}", flush=True)
        if stage == "teacher" and self.distributed.is_main:
            torch.save(self.models["teacher"].state_dict(), self.out / "teacher.pt")
        self.stage, self.step = self.stages[self.stages.index(stage) + 1], 0
        self.save()

    def _evaluate(self, model) -> dict:
        return report.evaluate(model, self.val, self.num_classes, self.distributed, self.args.batch_size)

    def _evaluate_student(self) -> dict:
        """Evaluates the student now; a better val mIoU than any before replaces ``best.pt``."""
        metrics = self._evaluate(self.models["student"])
        best = self.evaluations.get("best")
        if best is None or metrics["miou"] > best["miou"]:
            self.evaluations["best"] = {"step": self.step, **metrics}
            if self.distributed.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                save_atomically({"step": self.step, "miou": metrics["miou"],
                                 "student": self.models["student"].state_dict()}, self.out / "best.pt")
        return metrics

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.args.amp)

    def _streams(self, stage: str) -> list:
        """The batch streams a step of ``stage`` reads: the teacher's, or the labelled (and unlabelled) ones."""
        if stage != "student":
            return [self.teacher_stream]
        return [self.labelled_stream] + ([self.unlabelled_stream] if self.unlabelled_stream is not None else [])

    def _to_device(self, batches: list) -> list:
        return [(images.to(self.device), labels.to(self.device)) for images, labels in batches]

    def _student_inputs(self, batches: list):
        """(images: the labelled then the unlabelled ones, labels of the labelled ones, teacher's output)."""
        (images, labels), *unlabelled = batches
        if unlabelled:
            images = torch.cat([images, unlabelled[0][0]])
        teacher_out = None
        if TEACHER_TERMS & set(self.config.terms):
            with torch.no_grad(), self._autocast():
                teacher_out = self.models["teacher"](images)
        return images, labels, teacher_out

    @torch.no_grad()
    def _calibrate(self) -> None:
        """Xie et al.'s magnitude rule: every calibrated term starts at the cross-entropy's magnitude.

        The terms are measured on the student stage's first ``--calibration-batches`` batches with the
        student at its initial weights, as the first steps will see them (training mode); the models' state
        (BatchNorm statistics) is restored afterwards and no step is taken. Values are averaged over ranks,
        so every rank gets the same weights.
        """
        names = self.config.calibrated_terms
        modules = [self.models[name] for name in self.trained["student"]]
        saved = [copy.deepcopy(module.state_dict()) for module in modules]
        measured = []
        batches = StepBatches(self._streams("student"))
        for step in range(self.args.calibration_batches):
            images, labels, teacher_out = self._student_inputs(self._to_device(batches[step]))
            with self._autocast():
                student_out = self.models["student"](images)
                task, terms = self.objective.calibration_terms(images, labels, student_out, teacher_out, self.models)
            measured.append([task.item()] + [terms[name].item() for name in names])
        for module, state in zip(modules, saved):
            module.load_state_dict(state)
        measured = self.distributed.sum(torch.tensor(measured, dtype=torch.float64, device=self.device))
        measured = (measured / self.distributed.world_size).cpu()
        try:
            calibrated = fastkd.magnitude_weights(measured[:, 0],
                                                  {name: measured[:, i + 1] for i, name in enumerate(names)})
        except ValueError as error:  # a term that is 0 (or not finite) on every calibration batch
            raise SystemExit(f"--weighting magnitude: {error}; rerun with --weighting paper") from None
        self.weights = {**self.args.weights, **calibrated}
        means = measured.mean(0).tolist()
        self.calibration = {"batches": self.args.calibration_batches, "ce": means[0],
                            "terms": dict(zip(names, means[1:]))}
        if self.distributed.is_main:
            print(f"[calibration] cross-entropy {means[0]:.4g} over {self.args.calibration_batches} batches; "
                  "weights " + ", ".join(f"{name} {calibrated[name]:.4g} (term {mean:.4g})"
                                         for name, mean in zip(names, means[1:])), flush=True)

    def _teacher_step(self, batches: list) -> dict:
        ((images, labels),) = batches
        with self._autocast():
            logits, _ = self.wrapped["teacher"](images)
            loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        self._optimise("teacher", loss)
        return {"ce": loss.item()}

    def _autoencoder_step(self, batches: list) -> dict:
        """He et al. eq. 1: the autoencoder learns to reconstruct the teacher's features."""
        ((images, _),) = batches
        with self._autocast():
            with torch.no_grad():
                _, features = self.models["teacher"](images)
            loss = self.models["autoencoder"].loss(features)
        self._optimise("autoencoder", loss, averaged=("autoencoder",))
        return {"reconstruction": loss.item()}

    def _student_step(self, batches: list) -> dict:
        images, labels, teacher_out = self._student_inputs(batches)
        terms = {}
        with self._autocast():
            student_out = self.wrapped["student"](images)
        if "critic" in self.models:  # the critic's step alternates with the student's (Liu et al. sec. 2.2)
            # in float32 even under --amp: the gradient penalty differentiates the unscaled critic scores,
            # whose float16 gradient could underflow (a GradScaler scales only the final loss)
            critic_loss = self.objective.critic_loss(self.models["critic"], images, student_out[0].float(),
                                                      teacher_out[0].float(), labels.shape[0])
            self._optimise("critic", critic_loss, averaged=("critic",))
            terms["critic"] = critic_loss.item()
        with self._autocast():
            loss, weighted = self.objective(images, labels, student_out, teacher_out, self.models, self.weights)
        self._optimise("student", loss, averaged=self.trained["student"][1:])  # DDP averages the student's
        terms.update({name: value.item() for name, value in weighted.items()}, total=loss.item())
        return terms

    def _optimise(self, name: str, loss: torch.Tensor, averaged=()) -> None:
        """One step of optimizer ``name`` (a stage or the critic); ``averaged``: modules DDP does not wrap."""
        optimizer, scaler = self.optimizers[name], self.scalers[name]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        for module in averaged:
            average_gradients(self.models[module], self.distributed)
        scaler.step(optimizer)
        scaler.update()
        if name in self.schedulers:
            self.schedulers[name].step()

    def _finish(self) -> dict:
        if self.teacher_available and "teacher" not in self.evaluations:  # a teacher given by --teacher
            self.evaluations["teacher"] = self._evaluate(self.models["teacher"])
        metrics = {"stages": self.stages[:-1], "losses": list(self.config.terms),
                   "world_size": self.distributed.world_size, "weights": self.weights,
                   "calibration": self.calibration, **self.evaluations}
        if self.distributed.world_size > 1:  # a sanity check of data parallelism: every replica is the same
            trained = self.models["student" if "student" in self.models else "teacher"]
            checksums = self.distributed.gather([p.detach().double().sum().item() for p in trained.parameters()])
            metrics["replicas_identical"] = all(c == checksums[0] for c in checksums)
        if self.distributed.is_main:
            (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            report.plot_losses(self.history, self.out / "loss_curves.png")
            shown = {name: self.models[name] for name in ("teacher", "student")
                     if name in self.models and (name == "student" or self.teacher_available)}
            report.plot_predictions(self.val, shown, self.out / "predictions.png", self.device)
        self.distributed.barrier()
        return metrics


def main_guarded(args) -> int:
    """Runs one training; a signal or --stop-after ends it cleanly with exit status 0."""
    try:
        trainer = Trainer(args)
        start = time.perf_counter()
        metrics = trainer.run()
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        return 0
    if trainer.distributed.is_main:
        print(f"done in {time.perf_counter() - start:.1f} s; metrics in {trainer.out / 'metrics.json'}: "
              + ", ".join(f"{stage} mIoU {metrics[stage]['miou']:.4f}" for stage in ("teacher", "student")
                          if stage in metrics))
    return 0
