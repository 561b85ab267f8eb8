"""The Trainer: one readable `train_step`, with precision, strategy and callbacks as small held objects.

A *step* is one optimiser update over `grad_accum` micro-batches. The loss of each micro-batch is
weighted by its share of the step's targets, so k micro-batches give the same gradient as one batch k
times larger even when the last micro-batch is short. Gradient sync is skipped on all but the last
micro-batch of a step (DDP's ``no_sync``). Usable from Python without YAML::

    trainer = Trainer(model, optimizer, train_dataset, eval_dataset, config={"epochs": 3, "batch_size": 64})
    result = trainer.fit()
    metrics = trainer.evaluate()
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fullchain import metric_names as M
from fullchain.config import TrainConfig
from fullchain.data.bundle import IGNORE_INDEX
from fullchain.data.sampler import ResumableSampler
from fullchain.distributed.strategy import LocalStrategy, resolve_device
from fullchain.errors import UserError
from fullchain.train.callbacks import CallbackList
from fullchain.train.checkpoint import Checkpointer, TrainingState, capture_rng_state, restore_rng_state
from fullchain.train.evaluation import evaluate_model
from fullchain.train.logging import MetricsLogger
from fullchain.train.precision import clip_gradients, make_precision
from fullchain.train.progress import ProgressBar
from fullchain.train.schedule import make_scheduler
from fullchain.train.signals import StopSignals

Batch = tuple[torch.Tensor, torch.Tensor]


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy for classifiers ([B, C] logits) and language models ([B, T, V] logits)."""
    if logits.dim() == 3:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, targets)


def count_targets(targets: torch.Tensor) -> int:
    """Number of targets that carry loss (token targets equal to IGNORE_INDEX do not)."""
    if targets.dim() > 1:
        return int((targets != IGNORE_INDEX).sum())
    return targets.shape[0]


class CheckpointMismatch(UserError):
    """A checkpoint that cannot continue this run (other batch layout)."""


@dataclass
class TrainResult:
    steps: int
    samples: int
    wall_s: float
    samples_per_s: float
    final_loss: float
    skipped_steps: int
    last_eval: dict[str, Any] = field(default_factory=dict)
    resumed_from_step: int | None = None
    stopped_by: str | None = None  # the signal that ended training early, after a checkpoint

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "samples": self.samples,
            "wall_s": round(self.wall_s, 3),
            "samples_per_s": round(self.samples_per_s, 2),
            "final_loss": self.final_loss,
            "amp_skipped_steps": self.skipped_steps,
            "resumed_from_step": self.resumed_from_step,
        }


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_data: Dataset | DataLoader,
        eval_data: Dataset | DataLoader | None = None,
        config: TrainConfig | dict[str, Any] | None = None,
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_loss,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        callbacks: list[Any] = (),
        run_dir: str | Path | None = None,
        collate_fn: Callable | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        strategy: LocalStrategy | None = None,
        checkpointer: Checkpointer | None = None,
        checkpoint_every: int | None = None,
        resume: str | Path | None = None,
    ):
        self.config = config if isinstance(config, TrainConfig) else TrainConfig.model_validate(config or {})
        cfg = self.config
        self.strategy = strategy or LocalStrategy(resolve_device(cfg.device))
        self.device = self.strategy.device
        self.model = self.strategy.wrap(model)
        self.checkpointer = checkpointer
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.precision = make_precision(cfg.precision, self.device)
        self.seed = seed
        self.train_loader = self._loader(train_data, collate_fn, shuffle=True)
        self.eval_loader = self._loader(eval_data, collate_fn, shuffle=False) if eval_data is not None else None
        self.num_classes = num_classes
        micro_batches_per_epoch = len(self.train_loader)
        self.steps_per_epoch = max(1, math.ceil(micro_batches_per_epoch / cfg.grad_accum))
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.scheduler = scheduler or make_scheduler(optimizer, self.total_steps, cfg.schedule)
        self.step = 0
        self.epoch = 0
        self.samples_seen = 0
        self.micro_batches_in_epoch = 0
        self.last_eval: dict[str, Any] = {}
        self._last_checkpoint_step: int | None = None
        self.resumed_from_step: int | None = None
        self.resume_load_s: float | None = None
        default_callbacks: list[Any] = []
        if run_dir is not None and self.strategy.is_main:
            default_callbacks.append(MetricsLogger(Path(run_dir), tensorboard=cfg.tensorboard))
        if cfg.progress and self.strategy.is_main:
            default_callbacks.append(ProgressBar())
        self.callbacks = CallbackList(default_callbacks + list(callbacks))

    def _loader(self, data: Dataset | DataLoader, collate_fn: Callable | None, shuffle: bool) -> DataLoader:
        """Training data gets a `ResumableSampler` (seeded, sharded by rank, resumable mid-epoch).

        The loader's own generator keeps DataLoader from drawing on the global RNG at every epoch,
        which would shift dropout masks between an uninterrupted and a resumed run.
        """
        if isinstance(data, DataLoader):
            return data
        sampler = None
        if shuffle:
            sampler = ResumableSampler(len(data), self.seed, rank=self.strategy.rank,
                                       world_size=self.strategy.world_size)
        return DataLoader(
            data,
            batch_size=self.config.batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.config.num_workers,
        )

    # ---- the loop -------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        """One optimiser update over the micro-batches of one step; returns the step's loss and grad norm."""
        if not self.model.training:  # Module.train() walks every submodule: ~0.3 ms a step on a small CNN
            self.model.train()
        step_targets = sum(count_targets(y) for _, y in micro_batches)
        step_loss = 0.0
        for i, (x, y) in enumerate(micro_batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            is_last = i == len(micro_batches) - 1
            share = count_targets(y) / step_targets  # this micro-batch's weight in the step's mean loss
            with self.strategy.sync_gradients(self.model, sync=is_last):
                with self.precision.autocast():
                    loss = self.loss_fn(self.model(x), y)
                    if share != 1.0:
                        loss = loss * share
                self.precision.backward(loss)
            step_loss = step_loss + loss.detach()
        self.precision.unscale(self.optimizer)
        grad_norm = clip_gradients(self.model.parameters(), self.config.clip_norm)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"loss": step_loss, "grad_norm": grad_norm}

    def fit(self) -> TrainResult:
        cfg = self.config
        self.resumed_from_step = self._restore() if self.resume else None
        self.callbacks.fire("on_train_start", self)
        start = last_log_time = time.perf_counter()
        samples_since_log, data_wait = 0, 0.0
        out: dict[str, Any] = {"loss": torch.tensor(float("nan"))}
        with StopSignals(enabled=self.checkpointer is not None) as stop:
            while self.step < self.total_steps and not stop.requested:
                batches = self.epoch_steps()
                while self.step < self.total_steps and not stop.requested:
                    fetch_start = time.perf_counter()
                    micro_batches = next(batches, None)
                    data_wait += time.perf_counter() - fetch_start
                    if micro_batches is None:
                        break
                    out = self.train_step(micro_batches)
                    samples = sum(len(y) for _, y in micro_batches)
                    self.step += 1
                    self.samples_seen += samples
                    self.micro_batches_in_epoch += len(micro_batches)
                    samples_since_log += samples
                    metrics: dict[str, Any] = {"logged": False}
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        now = time.perf_counter()
                        metrics = self._log_metrics(out, samples_since_log, now - last_log_time, data_wait)
                        last_log_time, samples_since_log, data_wait = now, 0, 0.0
                    self.callbacks.fire("on_step_end", self, metrics)
                    if self._eval_due(end_of_epoch=False):
                        self.evaluate()
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self.save_checkpoint()
                else:
                    continue  # stopped by the step budget or a signal: leave the epoch unfinished
                self.epoch += 1
                self.micro_batches_in_epoch = 0
                self.callbacks.fire("on_epoch_end", self, self.epoch)
                if self._eval_due(end_of_epoch=True):
                    self.evaluate()
            # After a signal, only a single process saves: with several ranks the signal usually means
            # torchrun is tearing the group down, and a collective save with a dead peer would hang.
            if not stop.requested or self.strategy.world_size == 1:
                self._final_checkpoint()
        wall = time.perf_counter() - start
        result = TrainResult(
            steps=self.step,
            samples=self.samples_seen,
            wall_s=wall,
            samples_per_s=self.samples_seen / wall if wall > 0 else float("nan"),
            final_loss=float(out["loss"]),
            skipped_steps=self.precision.skipped_steps,
            last_eval=self.last_eval,
            resumed_from_step=self.resumed_from_step,
            stopped_by=stop.requested,
        )
        self.callbacks.fire("on_train_end", self, result)
        return result

    def epoch_steps(self) -> Iterator[list[Batch]]:
        """This epoch's micro-batches grouped into steps of `grad_accum` (the last step may be shorter).

        After a resume, the micro-batches the interrupted run already consumed in this epoch are skipped.
        """
        sampler = self.train_loader.sampler
        if isinstance(sampler, ResumableSampler):
            sampler.set_epoch(self.epoch, skip=self.micro_batches_in_epoch * self.config.batch_size)
        elif hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        it = iter(self.train_loader)
        while chunk := list(itertools.islice(it, self.config.grad_accum)):
            yield chunk

    # ---- checkpoints ----------------------------------------------------------------------------

    def training_state(self) -> TrainingState:
        """Everything a bit-exact continuation needs, at a step boundary."""
        trainer_state = {
            "step": self.step,
            "epoch": self.epoch,
            "samples_seen": self.samples_seen,
            "micro_batches_in_epoch": self.micro_batches_in_epoch,
            "batch_size": self.config.batch_size,
            "grad_accum": self.config.grad_accum,
            "world_size": self.strategy.world_size,
            "scheduler": self.scheduler.state_dict(),
            "precision": self.precision.state_dict(),
            "rng": capture_rng_state(),
            "strategy": self.strategy.state_dict(),
        }
        return TrainingState(
            model=self.unwrapped_model.state_dict(), optimizer=self.optimizer.state_dict(), trainer=trainer_state
        )

    def save_checkpoint(self) -> None:
        if self.checkpointer is None:
            raise ValueError("Trainer.save_checkpoint() needs a checkpointer")
        self.checkpointer.save(self.step, self.training_state(), model=self.model, optimizer=self.optimizer)
        self._last_checkpoint_step = self.step

    def _final_checkpoint(self) -> None:
        if self.checkpointer is None:
            return
        if self._last_checkpoint_step != self.step:
            self.save_checkpoint()
        self.checkpointer.wait()

    def _restore(self) -> int | None:
        """Load the checkpoint `resume` names ("auto": the newest that verifies); returns its step."""
        if self.checkpointer is None:
            raise ValueError("resuming needs a checkpointer")
        path = self.checkpointer.latest_valid() if str(self.resume) == "auto" else Path(self.resume)
        if path is None:
            return None
        load_start = time.perf_counter()
        state = self.checkpointer.load(path, model=self.model, optimizer=self.optimizer)
        if state.model is not None:
            self.unwrapped_model.load_state_dict(state.model)
        if state.optimizer is not None:
            self.optimizer.load_state_dict(state.optimizer)
        t = state.trainer
        if (t["batch_size"], t["grad_accum"]) != (self.config.batch_size, self.config.grad_accum):
            raise CheckpointMismatch(
                f"{path}: saved with batch_size {t['batch_size']} x grad_accum {t['grad_accum']}, now "
                f"{self.config.batch_size} x {self.config.grad_accum}; the data position would not line up"
            )
        self.step, self.epoch, self.samples_seen = t["step"], t["epoch"], t["samples_seen"]
        self.micro_batches_in_epoch = t["micro_batches_in_epoch"]
        if t["world_size"] != self.strategy.world_size:
            self.micro_batches_in_epoch = 0  # another sharding of the data: restart the epoch's order
        self.scheduler.load_state_dict(t["scheduler"])
        self.precision.load_state_dict(t["precision"])
        restore_rng_state(t["rng"])
        if t["world_size"] == self.strategy.world_size:
            self.strategy.load_state_dict(t.get("strategy", {}))
        self._last_checkpoint_step = self.step
        self.resume_load_s = time.perf_counter() - load_start
        return self.step

    def _log_metrics(self, out: dict[str, Any], samples: int, seconds: float, data_wait: float) -> dict:
        metrics = {
            "logged": True,
            M.TRAIN_LOSS: float(out["loss"]),
            M.LEARNING_RATE: self.scheduler.get_last_lr()[0],
            M.TRAIN_SAMPLES_TOTAL: self.samples_seen,
            M.TRAIN_SAMPLES_PER_SECOND: samples / seconds if seconds > 0 else float("nan"),
            M.DATA_WAIT_SECONDS: data_wait,
            M.AMP_SKIPPED_STEPS_TOTAL: self.precision.skipped_steps,
            "epoch": self.epoch,
        }
        metrics.update(self.strategy.metrics(self.step))
        if out.get("grad_norm") is not None:
            metrics[M.GRAD_NORM] = float(out["grad_norm"])
        if hasattr(self.precision, "loss_scale"):
            metrics[M.AMP_LOSS_SCALE] = self.precision.loss_scale
        return metrics

    def _eval_due(self, end_of_epoch: bool) -> bool:
        if self.eval_loader is None:
            return False
        every = self.config.eval_every
        if every is None:
            return end_of_epoch
        return not end_of_epoch and (self.step % every == 0 or self.step == self.total_steps)

    def evaluate(self, data: Dataset | DataLoader | None = None, collate_fn: Callable | None = None) -> dict:
        """Evaluate on `data` (default: the eval data given at construction); fires ``on_eval_end``."""
        loader = self.eval_loader if data is None else self._loader(data, collate_fn, shuffle=False)
        if loader is None:
            raise ValueError("Trainer.evaluate() needs eval data: pass eval_data to Trainer or data here")
        metrics = evaluate_model(
            self.model, loader, self.loss_fn, self.device, self.num_classes, autocast=self.precision.autocast
        )
        metrics["epoch"] = self.epoch
        self.last_eval = metrics
        self.callbacks.fire("on_eval_end", self, metrics)
        return metrics

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.strategy.unwrap(self.model)

