"""The Trainer: one readable `train_step`, with precision, strategy and callbacks as small held objects.

A *step* is one optimiser update over `grad_accum` micro-batches. The loss of each micro-batch is
weighted by its share of the step's targets, so k micro-batches give the same gradient as one batch k
times larger even when the last micro-batch is short. Gradient sync is skipped on all but the last
micro-batch of a step (DDP's ``no_sync``). What the loss, the batch layout and the metrics are comes from
the `fullchain.tasks.Task` (datasets fullchain builds carry theirs; a dataset of ``(x, y)`` tuples gets
`TensorPairs`). Usable from Python without YAML::

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
from torch.utils.data import DataLoader, Dataset

from fullchain import metric_names as M
from fullchain.config import TrainConfig
from fullchain.data.sampler import ResumableSampler
from fullchain.distributed.balance import BalancedBatchSampler, LoadBalancer
from fullchain.distributed.strategy import LocalStrategy, rebind_optimizer, resolve_device
from fullchain.errors import UserError
from fullchain.tasks import Batch, Task, TensorPairs, batch_size, to_device
from fullchain.train.callbacks import CallbackList
from fullchain.train.checkpoint import Checkpointer, TrainingState, capture_rng_state, restore_rng_state
from fullchain.train.evaluation import evaluate_model
from fullchain.train.logging import MetricsLogger
from fullchain.train.nonfinite import NonFiniteGuard, NonFiniteTraining
from fullchain.train.precision import clip_gradients, make_precision
from fullchain.train.progress import ProgressBar
from fullchain.train.schedule import make_scheduler
from fullchain.train.signals import StopSignals


def task_of(data: Any) -> Task | None:
    """The task a fullchain dataset carries, looking through DataLoaders and Subsets."""
    while data is not None:
        if isinstance(getattr(data, "task", None), Task):
            return data.task
        data = getattr(data, "dataset", None)
    return None


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
    nonfinite_skipped_steps: int = 0
    last_eval: dict[str, Any] = field(default_factory=dict)
    resumed_from_step: int | None = None
    stopped_by: str | None = None  # the signal that ended training early, after a checkpoint
    diverged_at: int | None = None  # the step whose loss or gradients were not finite (train.on_nonfinite: stop)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "samples": self.samples,
            "wall_s": round(self.wall_s, 3),
            "samples_per_s": round(self.samples_per_s, 2),
            "final_loss": self.final_loss,
            "amp_skipped_steps": self.skipped_steps,
            "nonfinite_skipped_steps": self.nonfinite_skipped_steps,
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
        task: Task | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        callbacks: list[Any] = (),
        run_dir: str | Path | None = None,
        collate_fn: Callable | None = None,
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
        names = {id(p): name for name, p in model.named_parameters()}
        self.model = self.strategy.wrap(model)
        self.checkpointer = checkpointer
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.optimizer = rebind_optimizer(optimizer, names, self.strategy.unwrap(self.model))  # in place
        self.task = task or task_of(train_data) or TensorPairs()
        self.precision = make_precision(cfg.precision, self.device)
        self.nonfinite = NonFiniteGuard(cfg.on_nonfinite, cfg.precision, self.strategy.any_rank)
        self.seed = seed
        self.split = self.strategy.splitter(cfg.batch_size * self.strategy.data_world_size)
        self.train_loader = self._loader(train_data, collate_fn, shuffle=True)
        self.eval_loader = self._loader(eval_data, collate_fn, shuffle=False) if eval_data is not None else None
        self.micro_batches_per_epoch = len(self.train_loader)
        self.steps_per_epoch = max(1, math.ceil(self.micro_batches_per_epoch / cfg.grad_accum))
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.scheduler = scheduler or make_scheduler(optimizer, self.total_steps, cfg.schedule)
        self.step = 0
        self.epoch = 0
        self.samples_seen = 0
        self.micro_batches_in_epoch = 0
        self.last_eval: dict[str, Any] = {}
        self._last_out: dict[str, Any] = {}
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
        if shuffle and isinstance(self.split, LoadBalancer):
            return DataLoader(data, batch_sampler=BalancedBatchSampler(len(data), self.seed, self.split),
                              collate_fn=collate_fn or self.task.collate, num_workers=self.config.num_workers)
        sampler = None
        if shuffle:
            sampler = ResumableSampler(len(data), self.seed, rank=self.strategy.data_rank,
                                       world_size=self.strategy.data_world_size)
        return DataLoader(
            data,
            batch_size=self.config.batch_size,
            sampler=sampler,
            collate_fn=collate_fn or self.task.collate,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.config.num_workers,
        )

    # ---- the loop -------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        """One optimiser update over the micro-batches of one step; returns the step's loss and grad norm."""
        if not self.model.training:  # Module.train() walks every submodule: ~0.3 ms a step on a small CNN
            self.model.train()
        local_targets = sum(self.task.count_targets(batch) for batch in micro_batches)
        step_targets = self.split.step_targets(local_targets, self.device)
        step_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            batch = to_device(batch, self.device)
            with self.split.micro_batch(self.model, batch_size(batch), last=i == len(micro_batches) - 1):
                with self.precision.autocast():
                    outputs = self.model(*self.task.model_inputs(batch))
                    loss_sum, _ = self.task.loss(outputs, batch)
                    loss = loss_sum / step_targets  # each micro-batch weighs by its share of the step's targets
                self.precision.backward(loss)
            step_loss = step_loss + loss.detach()
        step_loss = self.split.finish(self.model, step_loss)
        self.precision.unscale(self.optimizer)
        grad_norm = clip_gradients(self.model.parameters(), self.config.clip_norm)
        if self.nonfinite.admits(self.step + 1, step_loss, grad_norm):
            self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"loss": step_loss, "grad_norm": grad_norm}

    def fit(self) -> TrainResult:
        """Train to the step budget; raises `NonFiniteTraining` (after closing callbacks) when the run diverges."""
        self.resumed_from_step = self._restore() if self.resume else None
        self.callbacks.fire("on_train_start", self)
        start = time.perf_counter()
        self._last_out = {"loss": torch.tensor(float("nan"))}
        diverged: NonFiniteTraining | None = None
        with StopSignals(enabled=self.checkpointer is not None) as stop:
            try:
                self._train_loop(stop)
            except NonFiniteTraining as exc:  # the bad update was not applied; the newest checkpoint stays the last
                diverged = exc
            # After a signal, only a single process saves: with several ranks the signal usually means
            # torchrun is tearing the group down, and a collective save with a dead peer would hang.
            if diverged is None and (not stop.requested or self.strategy.world_size == 1):
                self._final_checkpoint()
            elif self.checkpointer is not None:
                self.checkpointer.wait()
        wall = time.perf_counter() - start
        result = TrainResult(
            steps=self.step,
            samples=self.samples_seen,
            wall_s=wall,
            samples_per_s=self.samples_seen / wall if wall > 0 else float("nan"),
            final_loss=float(self._last_out["loss"]),
            skipped_steps=self.precision.skipped_steps,
            nonfinite_skipped_steps=self.nonfinite.skipped_steps,
            last_eval=self.last_eval,
            resumed_from_step=self.resumed_from_step,
            stopped_by=stop.requested,
            diverged_at=self.step + 1 if diverged is not None else None,
        )
        self.callbacks.fire("on_train_end", self, result)
        if diverged is not None:
            raise diverged
        return result

    def _train_loop(self, stop: StopSignals) -> None:
        """Epochs of steps until the step budget is spent or a stop signal arrives."""
        cfg = self.config
        last_log_time = time.perf_counter()
        samples_since_log, data_wait = 0, 0.0
        while self.step < self.total_steps and not stop.requested:
            batches = self.epoch_steps()
            while self.step < self.total_steps and not stop.requested:
                fetch_start = time.perf_counter()
                micro_batches = next(batches, None)
                data_wait += time.perf_counter() - fetch_start
                if micro_batches is None:
                    break
                out = self._last_out = self.train_step(micro_batches)
                samples = sum(batch_size(batch) for batch in micro_batches)
                self.step += 1
                self.samples_seen += samples
                self.micro_batches_in_epoch += len(micro_batches)
                self.split.maybe_rebalance(self.step)
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
            else:  # the step budget is spent or a signal arrived; the epoch ends only if its last batch ran
                if stop.requested or self.micro_batches_in_epoch < self.micro_batches_per_epoch:
                    continue
            self.epoch += 1
            self.micro_batches_in_epoch = 0
            self.callbacks.fire("on_epoch_end", self, self.epoch)
            if self._eval_due(end_of_epoch=True):
                self.evaluate()

    def epoch_steps(self) -> Iterator[list[Batch]]:
        """This epoch's micro-batches grouped into steps of `grad_accum` (the last step may be shorter).

        After a resume, the micro-batches the interrupted run already consumed in this epoch are skipped.
        """
        sampler = self.train_loader.sampler
        if isinstance(self.train_loader.batch_sampler, BalancedBatchSampler):
            self.train_loader.batch_sampler.set_epoch(self.epoch, skip_batches=self.micro_batches_in_epoch)
        elif isinstance(sampler, ResumableSampler):
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
            "world_size": self.strategy.data_world_size,
            "scheduler": self.scheduler.state_dict(),
            "precision": self.precision.state_dict(),
            "nonfinite": self.nonfinite.state_dict(),
            "rng": capture_rng_state(),
            "strategy": self.strategy.state_dict(),
            "split": self.split.state_dict(),
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
        """Load the checkpoint `resume` names ("auto": `Checkpointer.resume_point`, the newest that verifies;
        it refuses to start over when checkpoints exist and none verifies); returns its step."""
        if self.checkpointer is None:
            raise ValueError("resuming needs a checkpointer")
        path = self.checkpointer.resume_point() if str(self.resume) == "auto" else Path(self.resume)
        if path is None:
            return None
        load_start = time.perf_counter()
        state = self.checkpointer.load(path, model=self.model, optimizer=self.optimizer)
        if state.model is not None:
            self.unwrapped_model.load_state_dict(state.model)
        if state.optimizer is not None:
            try:
                self.optimizer.load_state_dict(state.optimizer)
            except (KeyError, ValueError) as exc:  # torch's own messages name neither the file nor the cause
                raise CheckpointMismatch(f"{path}: its optimizer state does not fit this run's optimizer ({exc!r}): "
                                         "resume with the optimizer and placement settings it was saved with, "
                                         "or start a new run") from None
        t = state.trainer
        if (t["batch_size"], t["grad_accum"]) != (self.config.batch_size, self.config.grad_accum):
            raise CheckpointMismatch(
                f"{path}: saved with batch_size {t['batch_size']} x grad_accum {t['grad_accum']}, now "
                f"{self.config.batch_size} x {self.config.grad_accum}; the data position would not line up"
            )
        self.step, self.epoch, self.samples_seen = t["step"], t["epoch"], t["samples_seen"]
        self.micro_batches_in_epoch = t["micro_batches_in_epoch"]
        if t["world_size"] != self.strategy.data_world_size:
            self.micro_batches_in_epoch = 0  # another sharding of the data: restart the epoch's order
        self.scheduler.load_state_dict(t["scheduler"])
        self.precision.load_state_dict(t["precision"])
        self.nonfinite.load_state_dict(t.get("nonfinite", {}))
        self.split.load_state_dict(t.get("split", {}))
        restore_rng_state(t["rng"])
        if t["world_size"] == self.strategy.data_world_size:
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
            M.NONFINITE_SKIPPED_STEPS_TOTAL: self.nonfinite.skipped_steps,
            "epoch": self.epoch,
        }
        metrics.update(self.strategy.metrics(self.step))
        metrics.update(self.split.metrics())
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
        metrics = evaluate_model(self.model, loader, self.task, self.device, autocast=self.precision.autocast)
        metrics["epoch"] = self.epoch
        self.last_eval = metrics
        self.callbacks.fire("on_eval_end", self, metrics)
        return metrics

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.strategy.unwrap(self.model)

