"""`ds profile`: a few training steps under torch.profiler, split into data / forward / backward / optimiser /
communication, with the top operators, a Chrome trace and the same findings as the live monitor.

The split is measured around the Trainer's own `train_step` without changing it: the data time around the
fetch of each step's batches, forward through module hooks on the model, the optimiser through the
optimiser's step hooks, communication from the strategy's counters; backward is the rest of the step
(loss, backward pass, gradient clipping). torch.profiler adds the operator table and the trace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from fullchain import metric_names as M
from fullchain.monitor.report import Report, Table
from fullchain.monitor.rules import diagnose
from fullchain.tasks import batch_size

PHASES = ("data", "forward", "backward", "optimizer", "comm")
WARMUP_STEPS = 5


@dataclass
class ProfileResult:
    steps: int
    seconds: dict[str, float]  # phase -> total seconds over the profiled steps
    step_seconds: float  # total wall time of the profiled steps
    losses: list[float]
    samples: int
    top_ops: list[dict[str, Any]] = field(default_factory=list)
    trace: Path | None = None

    def shares(self) -> dict[str, float]:
        return {k: v / self.step_seconds if self.step_seconds > 0 else float("nan") for k, v in self.seconds.items()}

    def facts(self) -> dict[str, Any]:
        shares = self.shares()
        return {
            "steps": self.steps,
            "step_mean_s": self.step_seconds / max(self.steps, 1),
            "data_share": shares["data"],
            "comm_share": shares["comm"],
            "loss": self.losses,
            "samples_per_s": [],
            **{f"{phase}_s": s for phase, s in self.seconds.items()},
        }


class _Stopwatch:
    """Sums the time between a start and a stop event (forward hooks, optimiser step hooks)."""

    def __init__(self, sync: bool):
        self.total, self._start, self._sync = 0.0, 0.0, sync

    def start(self, *_: Any) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def stop(self, *_: Any) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self.total += time.perf_counter() - self._start


def _comm_seconds(trainer: Any) -> float:
    return float(trainer.strategy.metrics(trainer.step).get(M.COMM_SECONDS_TOTAL, 0.0))


def _next_step(trainer: Any, batches: Any) -> tuple[list, Any]:
    step = next(batches, None)
    if step is None:  # epoch ended: start the next one
        trainer.epoch += 1
        trainer.micro_batches_in_epoch = 0
        batches = trainer.epoch_steps()
        step = next(batches)
    return step, batches


def profile_trainer(trainer: Any, steps: int, out_dir: Path | None = None, top: int = 15) -> ProfileResult:
    """Runs `WARMUP_STEPS` + `steps` training steps of `trainer`; the latter are timed and profiled."""
    cuda = trainer.device.type == "cuda"
    forward, optimizer = _Stopwatch(cuda), _Stopwatch(cuda)
    handles = [trainer.model.register_forward_pre_hook(forward.start),
               trainer.model.register_forward_hook(forward.stop),
               trainer.optimizer.register_step_pre_hook(optimizer.start),
               trainer.optimizer.register_step_post_hook(optimizer.stop)]
    batches = trainer.epoch_steps()
    try:
        for _ in range(WARMUP_STEPS):
            micro_batches, batches = _next_step(trainer, batches)
            trainer.train_step(micro_batches)
        forward.total = optimizer.total = 0.0
        comm_before = _comm_seconds(trainer)
        data = total = 0.0
        losses, samples = [], 0
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                start = time.perf_counter()
                with record_function("fullchain.data"):
                    micro_batches, batches = _next_step(trainer, batches)
                fetched = time.perf_counter()
                with record_function("fullchain.train_step"):
                    out = trainer.train_step(micro_batches)
                    losses.append(float(out["loss"]))  # also waits for the device
                trainer.step += 1
                data += fetched - start
                total += time.perf_counter() - start
                samples += sum(batch_size(batch) for batch in micro_batches)  # tuples and dict batches alike
    finally:
        for handle in handles:
            handle.remove()
    comm = _comm_seconds(trainer) - comm_before
    seconds = {"data": data, "forward": forward.total, "optimizer": optimizer.total, "comm": comm}
    seconds["backward"] = max(0.0, total - sum(seconds.values()))
    result = ProfileResult(steps, {p: seconds[p] for p in PHASES}, total, losses, samples,
                           top_ops=top_operators(prof, top, cuda))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        result.trace = out_dir / "trace.json"
        prof.export_chrome_trace(str(result.trace))
    return result


def top_operators(prof: Any, top: int, cuda: bool) -> list[dict[str, Any]]:
    """The operators with the most self time (device time on CUDA), our own phase markers left out."""
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = [e for e in prof.key_averages() if not e.key.startswith("fullchain.")]
    rows.sort(key=lambda e: getattr(e, key), reverse=True)
    return [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1000, "total_ms": e.cpu_time_total / 1000}
            for e in rows[:top]]


def profile_report(result: ProfileResult, source: str) -> Report:
    facts = result.facts()
    shares = result.shares()
    split = Table("Step time split", ["phase", "seconds", "per step (ms)", "share"],
                  [[p, result.seconds[p], 1000 * result.seconds[p] / result.steps, f"{shares[p]:.1%}"]
                   for p in PHASES])
    ops = Table("Top operators (self time)", ["operator", "calls", "self ms", "total ms"],
                [[o["op"], o["calls"], o["self_ms"], o["total_ms"]] for o in result.top_ops])
    notes = [f"{result.steps} steps after {WARMUP_STEPS} warm-up steps, {result.samples} samples, "
             f"{1000 * result.step_seconds / result.steps:.1f} ms per step under the profiler; backward is the rest "
             "of the step (loss, backward pass, clipping)"]
    if result.trace:
        notes.append(f"Chrome trace: {result.trace} (open in chrome://tracing or ui.perfetto.dev)")
    return Report(f"ds profile: {source}", source, diagnose(facts), facts,
                  bars=[("seconds per phase over the profiled steps", result.seconds)], tables=[split, ops],
                  notes=notes)
