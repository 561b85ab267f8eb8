"""Checkpoints (C7): how long training is blocked per save, and how long recovery takes after a SIGKILL.

Contenders save the same model + AdamW state (about 100M parameters, 1.2 GB with Adam's moments; quick:
about 8M):
- `torch_save`: ``torch.save({"model": ..., "optimizer": ...}, path)`` - what most loops do; blocks for the
  whole write and is not atomic (it does not fsync, a kill mid-write leaves a torn file);
- `fullchain_sync`: the Checkpointer with ``async: false`` (staged, checksummed, fsynced, renamed);
- `fullchain_async`: the Checkpointer's default: `save()` returns once the state is copied to CPU memory;
- `dcp_async_save`: ``torch.distributed.checkpoint.async_save`` (PyTorch's own asynchronous path).
Blocking time is what the training loop waits for; persist time runs until the files are durable; extra
peak memory is the rise of this process's peak RSS (VmHWM, reset through /proc/self/clear_refs) during the
save. Recovery after a SIGKILL under torchrun (2 gloo ranks, full run only) is split into restart +
rendezvous + start-up, checkpoint load, and the work lost since the last checkpoint.
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

from fullchain.bench.harness import BenchRecord, alternate, paired_ratio, summarise
from fullchain.train.checkpoint import Checkpointer, TrainingState


def _state(quick: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width, depth = (1024, 8) if quick else (4096, 6)
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


def _measure(save, finish) -> dict[str, float]:
    """Blocking seconds of `save()`, seconds until `finish()` has made it durable, extra peak MiB."""
    _reset_peak()
    before = _rss_kib()
    start = time.perf_counter()
    save()
    blocked = time.perf_counter() - start
    finish()
    persisted = time.perf_counter() - start
    return {"blocking_s": blocked, "persist_s": persisted, "extra_peak_mib": (_peak_kib() - before) / 1024}


def _contenders(model, opt, root: Path) -> dict:
    counter = {"step": 0}

    def next_step() -> int:
        counter["step"] += 1
        return counter["step"]

    def torch_save():
        path = root / "torch_save.pt"
        return _measure(lambda: torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path),
                        lambda: None)

    def fullchain(async_save: bool):
        ckpt = Checkpointer(root / f"fullchain-{'async' if async_save else 'sync'}", keep_last=1,
                            async_save=async_save)

        def run():
            state = TrainingState(model=model.state_dict(), optimizer=opt.state_dict(), trainer={"step": 0})
            return _measure(lambda: ckpt.save(next_step(), state), ckpt.wait)

        return run

    def dcp_async():
        import torch.distributed.checkpoint as dcp

        target = root / "dcp"
        shutil.rmtree(target, ignore_errors=True)
        holder = {}
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        return _measure(lambda: holder.setdefault("f", dcp.async_save(state, checkpoint_id=str(target))),
                        lambda: holder["f"].result())

    return {
        "torch_save": torch_save,
        "fullchain_sync": fullchain(False),
        "fullchain_async": fullchain(True),
        "dcp_async_save": dcp_async,
    }


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
    repeats = 5
    with tempfile.TemporaryDirectory(prefix="fullchain-ckpt-bench-") as tmp:
        root = Path(tmp)
        rounds = alternate(_contenders(model, opt, root), repeats=repeats, warmup=1)
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
            "disk": "local disk of the benchmark machine (tempfile)",
            "memory": "extra_peak_mib: rise of peak RSS during a save after warm-up; fullchain_async keeps its "
                      "CPU staging buffers (state_bytes) between saves, as DCP's cached stager does",
        },
        results=summarise(rounds),
    )
    record.ratios["async_block_vs_sync"] = paired_ratio(rounds, "fullchain_async", "torch_save", "blocking_s")
    record.ratios["async_block_vs_dcp_async"] = paired_ratio(rounds, "fullchain_async", "dcp_async_save", "blocking_s")
    record.ratios["fullchain_sync_vs_torch_save"] = paired_ratio(rounds, "fullchain_sync", "torch_save", "blocking_s")
    record.checks["resume_bit_exact"] = bit_exact
    if recovery is not None:
        record.results["torchrun_sigkill_recovery"] = recovery
    return record
