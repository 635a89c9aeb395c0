"""Stages, checkpoints and data parallelism of the reference trainer.

A run goes through stages: ``teacher`` (cross-entropy on the teacher's labelled set; skipped when a trained
teacher is given or no term needs one), ``autoencoder`` (He et al. eq. 1 on the teacher's features; only for
the adaptation/affinity terms), ``student`` (the objective of :mod:`kdtrain.distill`), then ``done``.

Checkpoints hold everything the rest of the run depends on: the stage and step, every model, optimizer and
scheduler, the torch/numpy/python RNG states of every rank, and the loss and evaluation history. The
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
from kdtrain.data import IGNORE_INDEX, BatchStream, build_datasets
from kdtrain.distill import ADAPTATION_TERMS, TEACHER_TERMS, DistillConfig, StudentObjective
from kdtrain.models import build_model

# Arguments that may change between an interrupted run and its resumption without changing the result.
RESUME_NEUTRAL_ARGS = frozenset({"out", "stop_after", "checkpoint_every", "progress", "ablation", "seeds",
                                 "ablation_rows"})


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
    """The papers' poly learning rate: lr * (1 - step / total)^0.9 (Liu et al., sec. 3.1)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - min(step, total_steps) / total_steps) ** 0.9)


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
            terms=tuple(args.losses), weights=args.weights, temperature=args.temperature,
            pairwise_patch=args.pairwise_patch, pairwise_window=args.pairwise_window,
            pairwise_pool=args.pairwise_pool, pseudo_threshold=args.pseudo_threshold, distill_on=args.distill_on)
        self.unlabelled_stream = (BatchStream(unlabelled, args.unlabelled_batch_size, args.seed + 1, rank, world)
                                  if self.config.needs_unlabelled and not only_teacher else None)
        self.objective = StudentObjective(self.config)

        needs_teacher = bool(TEACHER_TERMS & set(self.config.terms))
        adaptation = bool(ADAPTATION_TERMS & set(self.config.terms)) and not only_teacher
        self.models = {"teacher": build_model(args.teacher_model, self.num_classes, args.teacher_width)}
        if not only_teacher:
            self.models["student"] = build_model(args.student_model, self.num_classes, args.student_width)
        if adaptation:
            teacher_channels = self.models["teacher"].feature_channels
            self.models["autoencoder"] = fastkd.FeatureAutoencoder(teacher_channels, args.latent_channels)
            self.models["adapter"] = fastkd.FeatureAdapter(self.models["student"].feature_channels,
                                                           args.latent_channels)
        if "holistic" in self.config.terms and not only_teacher:
            self.models["critic"] = fastkd.HolisticDiscriminator(
                self.num_classes, image_channels=3, base_channels=args.critic_width, blocks=3, attention=1)
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

        def adam(*modules, lr):
            return torch.optim.Adam([p for m in modules for p in m.parameters()], lr=lr,
                                    weight_decay=args.weight_decay)

        self.optimizers, self.schedulers = {}, {}
        trained = {"teacher": ("teacher",), "autoencoder": ("autoencoder",),
                   "student": ("student", "adapter") if adaptation else ("student",)}
        for stage in self.stages[:-1]:
            self.optimizers[stage] = adam(*(self.models[name] for name in trained[stage]), lr=args.lr)
            self.schedulers[stage] = poly_scheduler(self.optimizers[stage], self.stage_steps[stage])
        if "critic" in self.models:
            # Adam, betas (0.9, 0.99): one critic step per student step (Liu et al. sec. 2.2)
            self.optimizers["critic"] = torch.optim.Adam(self.models["critic"].parameters(), lr=args.lr,
                                                         betas=(0.9, 0.99))
        self.wrapped = {name: self.distributed.wrap(self.models[name])
                        for name in ("teacher", "student") if name in self.models}

        self.stage, self.step = self.stages[0], 0
        self.history = {stage: [] for stage in self.stages[:-1]}
        self.evaluations = {}
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
                "world_size": self.distributed.world_size, "rng": rng_states,
                "models": {name: model.state_dict() for name, model in self.models.items()},
                "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
                "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
                "history": self.history, "evaluations": self.evaluations,
            }
            self.out.mkdir(parents=True, exist_ok=True)
            temporary = self.checkpoint_path.with_suffix(".tmp")
            torch.save(state, temporary)
            os.replace(temporary, self.checkpoint_path)  # atomic: a crash leaves the old or the new file
        self.distributed.barrier()

    def _load(self) -> None:
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        changed = sorted(k for k in set(state["args"]) | set(self._training_args())
                         if state["args"].get(k) != self._training_args().get(k))
        if changed:
            raise SystemExit(f"{self.checkpoint_path} was written with other settings ({', '.join(changed)}); "
                             f"rerun with the same arguments or choose another --out")
        if state["world_size"] != self.distributed.world_size:
            raise SystemExit(f"{self.checkpoint_path} was written by {state['world_size']} processes; resume "
                             f"with the same number (this run has {self.distributed.world_size})")
        for name, model in self.models.items():
            model.load_state_dict(state["models"][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][name])
        set_rng_state(state["rng"][self.distributed.rank])
        self.stage, self.step = state["stage"], state["step"]
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
        progress = Progress(stage, total, self.step, self.distributed.is_main and self.args.progress)
        try:
            while self.step < total:
                terms = step_function(self.step)
                names = sorted(terms)
                values = self.distributed.sum(torch.tensor([terms[n] for n in names], dtype=torch.float64,
                                                           device=self.device)) / self.distributed.world_size
                terms = dict(zip(names, values.tolist()))
                self.step += 1
                self.steps_this_invocation += 1
                self.history[stage].append(terms)
                progress.update(self.step, terms)
                if self._should_stop():
                    self.save()
                    raise Interrupted(f"stopped ({self.stop_signal or '--stop-after'}) in stage {stage} at step "
                                      f"{self.step}/{total}; checkpoint {self.checkpoint_path} written, rerun "
                                      f"the same command to resume")
                if self.step % self.args.checkpoint_every == 0 and self.step < total:
                    self.save()
        finally:
            progress.close()
        if stage in ("teacher", "student"):
            self.evaluations[stage] = report.evaluate(self.models[stage], self.val, self.num_classes,
                                                      self.distributed, self.args.batch_size)
            if self.distributed.is_main:
                print(f"[{stage}] val mIoU {self.evaluations[stage]['miou']:.4f} "
                      f"pixel accuracy {self.evaluations[stage]['pixel_accuracy']:.4f}", flush=True)
        if stage == "teacher" and self.distributed.is_main:
            torch.save(self.models["teacher"].state_dict(), self.out / "teacher.pt")
        self.stage, self.step = self.stages[self.stages.index(stage) + 1], 0
        self.save()

    def _batch(self, stream: BatchStream, step: int):
        images, labels = stream.batch(step)
        return images.to(self.device), labels.to(self.device)

    def _teacher_step(self, step: int) -> dict:
        images, labels = self._batch(self.teacher_stream, step)
        logits, _ = self.wrapped["teacher"](images)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        self._optimise("teacher", loss)
        return {"ce": loss.item()}

    def _autoencoder_step(self, step: int) -> dict:
        """He et al. eq. 1: the autoencoder learns to reconstruct the teacher's features."""
        images, _ = self._batch(self.teacher_stream, step)
        with torch.no_grad():
            _, features = self.models["teacher"](images)
        loss = self.models["autoencoder"].loss(features)
        self._optimise("autoencoder", loss, averaged=("autoencoder",))
        return {"reconstruction": loss.item()}

    def _student_step(self, step: int) -> dict:
        images, labels = self._batch(self.labelled_stream, step)
        labelled_count = images.shape[0]
        if self.unlabelled_stream is not None:
            unlabelled, _ = self._batch(self.unlabelled_stream, step)
            images = torch.cat([images, unlabelled])
        teacher_out = None
        if TEACHER_TERMS & set(self.config.terms):
            with torch.no_grad():
                teacher_out = self.models["teacher"](images)
        s_logits, s_features = self.wrapped["student"](images)
        terms = {}
        if "critic" in self.models:  # the critic's step alternates with the student's (Liu et al. sec. 2.2)
            critic_loss = self.objective.critic_loss(self.models["critic"], images, s_logits, teacher_out[0],
                                                      labelled_count)
            self.optimizers["critic"].zero_grad(set_to_none=True)
            critic_loss.backward()
            average_gradients(self.models["critic"], self.distributed)
            self.optimizers["critic"].step()
            terms["critic"] = critic_loss.item()
        weighted = self.objective(images, labels, labelled_count, s_logits, s_features, teacher_out,
                                  adapter=self.models.get("adapter"), autoencoder=self.models.get("autoencoder"),
                                  critic=self.models.get("critic"))
        loss = sum(weighted.values())
        self._optimise("student", loss, averaged=("adapter",) if "adapter" in self.models else ())
        terms.update({name: value.item() for name, value in weighted.items()}, total=loss.item())
        return terms

    def _optimise(self, stage: str, loss: torch.Tensor, averaged=()) -> None:
        optimizer = self.optimizers[stage]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name in averaged:
            average_gradients(self.models[name], self.distributed)
        optimizer.step()
        self.schedulers[stage].step()

    def _finish(self) -> dict:
        if self.teacher_available and "teacher" not in self.evaluations:  # a teacher given by --teacher
            self.evaluations["teacher"] = report.evaluate(self.models["teacher"], self.val, self.num_classes,
                                                          self.distributed, self.args.batch_size)
        metrics = {"stages": self.stages[:-1], "losses": list(self.config.terms),
                   "world_size": self.distributed.world_size, **self.evaluations}
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
