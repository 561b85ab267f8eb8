"""Checkpoints (C7): how long training is blocked per save, and how long recovery takes after a SIGKILL.

Contenders save the same model + AdamW state (about 100M parameters, 1.2 GB with Adam's moments; quick:
about 4M):
- `torch_save`: ``torch.save({"model": ..., "optimizer": ...}, path)`` - what most loops do; blocks for the
  whole write and is not atomic (it does not fsync, a kill mid-write leaves a torn file);
- `fullchain_sync`: the Checkpointer with ``async: false`` (staged, checksummed, fsynced, renamed);
- `fullchain_async`: the Checkpointer's default: `save()` returns once the state is copied to CPU memory;
- `dcp_async_save`: ``torch.distributed.checkpoint.async_save`` with its defaults;
- `dcp_async_stager`: the same with a ``DefaultStager``: staging buffers cached between saves (as ours are),
  staging in a background thread, pinned memory and non-blocking copies where CUDA is present. The loop still
  waits for staging to finish before it may change the weights, and that wait is counted;
- `dcp_async_cached` (only where CUDA is present: it always pins its buffers): ``FileSystemWriter(
  cache_staged_state_dict=True)``, DCP's older cached staging.
Each round saves twice, `save_interval_s` of training-like compute apart: `blocking_s` is the first save's
wait (nothing in flight), `blocking_backpressure_s` the second's, including the wait for the first save to
finish (what a loop that checkpoints that often waits), `persist_s` the second save's time to durable files
once nothing else is in flight. Extra peak memory is the rise of this process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) during the round. Recovery after a SIGKILL under torchrun (2 gloo ranks, full run only)
is split into restart + rendezvous + start-up, checkpoint load, and the work lost since the last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from fullchain.bench.harness import BenchRecord, alternate, summarise
from fullchain.train.checkpoint import Checkpointer, TrainingState


def _state(quick: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width, depth = (1024, 4) if quick else (4096, 6)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # materialise Adam's moments without paying for a forward pass
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _train_for(seconds: float) -> None:
    """Training-like compute on this thread (it competes with a background writer as a real step would)."""
    x = torch.randn(256, 256)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        x = torch.tanh(x @ x)


class _Contender:
    """`save()` returns when training may go on (waiting for the previous save if it must); `wait()`: durable."""

    def __init__(self, save, wait=lambda: None, close=lambda: None):
        self.save, self.wait, self.close = save, wait, close


def _round(contender: _Contender, interval_s: float) -> dict[str, float]:
    """Two saves `interval_s` of training apart; the second one's wait includes the first one's back-pressure."""
    _reset_peak()
    before = _rss_kib()
    start = time.perf_counter()
    contender.save()
    blocked = time.perf_counter() - start
    _train_for(interval_s)
    second = time.perf_counter()
    contender.wait()
    free = time.perf_counter()
    contender.save()
    blocked_backpressure = time.perf_counter() - second
    contender.wait()
    return {"blocking_s": blocked, "blocking_backpressure_s": blocked_backpressure,
            "persist_s": time.perf_counter() - free, "extra_peak_mib": (_peak_kib() - before) / 1024}


def _contenders(model, opt, root: Path) -> dict[str, _Contender]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    steps = iter(range(1, 10**9))

    def state() -> dict:
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}

    def torch_save() -> _Contender:
        return _Contender(lambda: torch.save(state(), root / "torch_save.pt"))

    def fullchain(async_save: bool) -> _Contender:
        ckpt = Checkpointer(root / f"fullchain-{'async' if async_save else 'sync'}", keep_last=1,
                            async_save=async_save)

        def save():
            ckpt.save(next(steps), TrainingState(model=model.state_dict(), optimizer=opt.state_dict(),
                                                 trainer={"step": 0}))

        return _Contender(save, ckpt.wait, ckpt.close)

    def dcp_async(name: str, cached: bool = False, stager: bool = False) -> _Contender:
        target = root / name
        writer = dcp.FileSystemWriter(target, cache_staged_state_dict=cached)
        cuda = torch.cuda.is_available()
        async_stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                    use_async_staging=True, use_non_blocking_copy=cuda)) \
            if stager else None
        pending: dict = {}

        def wait():
            if "upload" in pending:
                pending.pop("upload").result()
                for old in sorted(target.glob("step-*"))[:-1]:  # keep the last one, as keep_last=1 does
                    shutil.rmtree(old)

        def save():
            wait()  # DCP leaves it to the caller not to start a save while the previous one runs
            response = dcp.async_save(state(), checkpoint_id=target / f"step-{next(steps):09d}",
                                      storage_writer=writer, async_stager=async_stager)
            if stager:  # the weights may change only once they are staged
                response.staging_completion.result()
                pending["upload"] = response.upload_completion
            else:
                pending["upload"] = response

        return _Contender(save, wait, async_stager.close if async_stager else lambda: None)

    contenders = {
        "torch_save": torch_save(),
        "fullchain_sync": fullchain(False),
        "fullchain_async": fullchain(True),
        "dcp_async_save": dcp_async("dcp"),
        "dcp_async_stager": dcp_async("dcp-stager", stager=True),
    }
    if torch.cuda.is_available():
        contenders["dcp_async_cached"] = dcp_async("dcp-cached", cached=True)
    return contenders


def _state_bytes(model, opt) -> int:
    tensors = list(model.state_dict().values())
    tensors += [t for s in opt.state_dict()["state"].values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def resume_is_bit_exact(root: Path) -> bool:
    """Stop a run by SIGTERM mid-epoch (accumulation on) and resume: same weights as uninterrupted?"""
    from fullchain.config import DataConfig
    from fullchain.data import build_data
    from fullchain.models import build_model, model_args_from_data
    from fullchain.train.callbacks import Callback
    from fullchain.train.trainer import Trainer

    bundle = build_data(DataConfig(name="digits", val_fraction=0.0), seed=0)
    config = {"max_steps": 30, "batch_size": 16, "grad_accum": 2, "progress": False, "tensorboard": False}

    class StopAt(Callback):
        def on_step_end(self, trainer, metrics):
            if trainer.step == 11:
                os.kill(os.getpid(), signal.SIGTERM)

    def trainer(run_dir, **kw):
        torch.manual_seed(0)
        model = build_model(name="mlp", args=model_args_from_data("mlp", bundle.input_spec, {"dropout": 0.1}))
        return Trainer(model, torch.optim.AdamW(model.parameters()), bundle.train, config=config, seed=0,
                       checkpointer=Checkpointer(run_dir), **kw), model

    runs = {}
    for name, run_dir, kw in (("ref", "ref", {}), ("stopped", "cut", {"callbacks": [StopAt()]}),
                              ("resumed", "cut", {"resume": "auto"})):
        runs[name] = trainer(root / run_dir, **kw)  # seeds, then builds: each run starts from the same RNG
        runs[name][0].fit()
        runs[name][0].checkpointer.close()
    (_, ref_model), (resumed, model) = runs["ref"], runs["resumed"]
    return resumed.resumed_from_step == 11 and all(
        torch.equal(a, b) for a, b in zip(ref_model.state_dict().values(), model.state_dict().values(), strict=True)
    )


def torchrun_recovery(root: Path) -> dict[str, float]:
    """Kill one of two torchrun workers mid-run; time the way back from the run's own metrics."""
    root.mkdir(parents=True, exist_ok=True)
    run_yaml = root / "recovery.yaml"
    run_yaml.write_text(yaml.safe_dump({
        "name": "recovery", "runs_dir": str(root / "runs"), "seed": 0,
        "model": {"name": "mlp", "args": {"hidden": [512, 512], "dropout": 0.0}},
        "data": {"name": "digits", "val_fraction": 0.0},
        "train": {"max_steps": 1500, "batch_size": 32, "progress": False, "tensorboard": False, "log_every": 1},
        "checkpoint": {"every_steps": 100},
    }))
    cmd = [sys.executable, "-m", "fullchain.cli", "train", str(run_yaml), "--nproc-per-node", "2",
           "--max-restarts", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = root / "runs" / "recovery" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
        if rows and rows[-1]["step"] >= 250:
            break
        time.sleep(0.05)
    launcher = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    pids = subprocess.run(["pgrep", "-P", launcher[0]], capture_output=True, text=True).stdout.split()
    killed_at = time.time()
    os.kill(int(pids[-1]), signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun recovery run failed: {err[-2000:]}")
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    resume = next(r for r in rows if r.get("event") == "resume")
    step_rows = [r for r in rows if "train_loss" in r]
    before = [r for r in step_rows if r["time"] < killed_at]
    step_s = statistics.median(b["time"] - a["time"] for a, b in zip(before, before[1:], strict=False))
    load_s = resume["checkpoint_load_seconds"]
    return {
        "restart_and_rendezvous_s": resume["time"] - killed_at - load_s,
        "checkpoint_load_s": load_s,
        "steps_lost": resume["steps_lost"],
        "lost_work_s": resume["steps_lost"] * step_s,
        "total_recovery_s": resume["time"] - killed_at + resume["steps_lost"] * step_s,
    }


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    model, opt = _state(quick)
    repeats, interval_s = (3, 0.2) if quick else (5, 1.0)
    with tempfile.TemporaryDirectory(prefix="fullchain-ckpt-bench-") as tmp:
        root = Path(tmp)
        contenders = _contenders(model, opt, root)
        try:
            rounds = alternate({name: (lambda c=c: _round(c, interval_s)) for name, c in contenders.items()},
                               repeats=repeats, warmup=1)
        finally:
            for contender in contenders.values():
                contender.close()
        bit_exact = resume_is_bit_exact(root / "resume")
        recovery = None if quick else torchrun_recovery(root / "recovery")
    record = BenchRecord(
        bench="checkpoint",
        settings={
            "quick": quick,
            "parameters": sum(p.numel() for p in model.parameters()),
            "state_bytes": _state_bytes(model, opt),
            "optimizer": "AdamW (params + exp_avg + exp_avg_sq)",
            "repeats": repeats,
            "save_interval_s": interval_s,
            "disk": "local disk of the benchmark machine (tempfile)",
            "memory": "extra_peak_mib: rise of peak RSS during a round (two saves) after warm-up; fullchain_async "
                      "and DCP's stagers keep their CPU staging buffers (state_bytes) between saves",
            "dcp_stager": "DefaultStager(StagingOptions(use_pinned_memory and use_non_blocking_copy where CUDA is "
                          "present, use_shared_memory=False, use_async_staging=True)), staging wait counted; "
                          "dcp_async_cached (FileSystemWriter cache_staged_state_dict) only with CUDA: it pins",
        },
        results=summarise(rounds),
    )
    record.add_ratio("async_block_vs_sync", rounds, "fullchain_async", "torch_save", "blocking_s")
    record.add_ratio("async_block_backpressure_vs_sync", rounds, "fullchain_async", "torch_save",
                     "blocking_backpressure_s")
    for dcp_name, key in (("dcp_async_save", "dcp_async"), ("dcp_async_stager", "dcp_stager"),
                          ("dcp_async_cached", "dcp_cached")):
        if dcp_name not in rounds:
            continue
        record.add_ratio(f"async_block_vs_{key}", rounds, "fullchain_async", dcp_name, "blocking_s")
        record.add_ratio(f"async_block_backpressure_vs_{key}", rounds, "fullchain_async", dcp_name,
                         "blocking_backpressure_s")
    record.add_ratio("fullchain_sync_vs_torch_save", rounds, "fullchain_sync", "torch_save", "blocking_s")
    record.checks["resume_bit_exact"] = bit_exact
    if recovery is not None:
        record.results["torchrun_sigkill_recovery"] = recovery
    return record
