"""A rich progress bar as a callback: step / total, loss, samples/s and ETA.

Rich redraws from its own thread twice a second, so updating it every step costs a few
microseconds; the loss shown is the last logged one, so the bar never forces a device sync.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fullchain import metric_names as M
from fullchain.train.callbacks import Callback


class ProgressBar(Callback):
    def __init__(self, console: Console | None = None, description: str = "train"):
        self.console = console or Console(stderr=True)
        self.description = description
        self._progress: Progress | None = None
        self._task = None
        self._fields = {"loss": "-", "speed": "-", "eval": ""}

    def on_train_start(self, trainer: Any) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} samples/s"),
            TextColumn("{task.fields[eval]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            refresh_per_second=2,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            self.description, total=trainer.total_steps, completed=trainer.step, **self._fields
        )

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if metrics.get("logged"):
            self._fields["loss"] = f"{metrics[M.TRAIN_LOSS]:.4f}"
            self._fields["speed"] = f"{metrics[M.TRAIN_SAMPLES_PER_SECOND]:.0f}"
        self._progress.update(self._task, completed=trainer.step, **self._fields)

    def on_eval_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if M.EVAL_ACCURACY in metrics:
            self._fields["eval"] = f"eval acc {metrics[M.EVAL_ACCURACY]:.3f}"
        else:
            self._fields["eval"] = f"eval loss {metrics[M.EVAL_LOSS]:.3f}"

    def on_train_end(self, trainer: Any, result: Any) -> None:
        self._progress.update(self._task, completed=trainer.step, **self._fields)
        self._progress.stop()
