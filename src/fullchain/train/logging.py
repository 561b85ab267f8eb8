"""Metric logging to ``metrics.jsonl`` (one JSON object per line) and TensorBoard, as a callback.

Rows carry ``step`` and the names from `fullchain.metric_names`; evaluation rows are written too, so the
file alone tells the whole run. Lines are flushed as written so a crash loses nothing already logged.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from fullchain.train.callbacks import Callback


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = str(value)  # JSON has no NaN/inf; keep the fact visible as "nan"/"inf"
        elif isinstance(value, int | float | str | bool) or value is None:
            out[key] = value
    return out


def last_step_in(path: Path) -> int | None:
    """The highest step already logged in a metrics.jsonl (None when there is none)."""
    if not path.is_file():
        return None
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return max(steps, default=None)


class MetricsLogger(Callback):
    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        self.last_logged_step = last_step_in(path)
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed at train end
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, "time": time.time(), **_jsonable(metrics)}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def on_train_start(self, trainer: Any) -> None:
        """After a resume or a restart, record it: from which step, how many logged steps are redone, which restart."""
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if trainer.resumed_from_step is None and restarts == 0:
            return
        start = trainer.resumed_from_step or 0
        lost = max(0, (self.last_logged_step or 0) - start)
        self.write(start, {"event": "resume", "steps_lost": lost, "restart_count": restarts,
                           "checkpoint_load_seconds": trainer.resume_load_s or 0.0})

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if metrics.get("logged"):
            self.write(trainer.step, {k: v for k, v in metrics.items() if k != "logged"})

    def on_eval_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        self.write(trainer.step, metrics)

    def on_train_end(self, trainer: Any, result: Any) -> None:
        if result.diverged_at is not None:
            self.write(result.diverged_at, {"event": "nonfinite", "train_loss": float("nan")})
        self._file.close()
        if self._tb is not None:
            self._tb.close()
