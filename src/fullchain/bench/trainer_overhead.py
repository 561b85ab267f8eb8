"""Trainer overhead: the Trainer (progress bar and logging on) against a hand-written PyTorch loop.

Same model initialisation, data order, seed, optimiser and schedule; fp32 on CPU, so the final weights
must be bit-identical. Lightning Fabric runs as a third contender when `lightning` is installed, and its final
weights are checked against the raw loop's too. Each
contender's timed region is what a user waits for: building the loader and optimiser, then every step.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fullchain.bench.harness import BenchRecord, alternate, summarise
from fullchain.config import DataConfig, ScheduleConfig, TrainConfig
from fullchain.data import build_data
from fullchain.data.sampler import ResumableSampler
from fullchain.distributed.strategy import resolve_device
from fullchain.models import build_model, model_args_from_data
from fullchain.train.schedule import lr_factor
from fullchain.train.trainer import Trainer

LR = 1e-3


def _loader(dataset, batch_size: int, seed: int) -> DataLoader:
    """A seeded shuffle per epoch (`sampler.set_epoch`, as with DistributedSampler): the Trainer's data order."""
    sampler = ResumableSampler(len(dataset), seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=torch.Generator().manual_seed(seed))


def _optimizer_and_schedule(model: torch.nn.Module, total_steps: int, schedule: ScheduleConfig):
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, schedule))
    return opt, sched


def raw_loop(model, dataset, batch_size, total_steps, schedule, seed, device) -> None:
    """What a user writes by hand."""
    loader = _loader(dataset, batch_size, seed)
    opt, sched = _optimizer_and_schedule(model, total_steps, schedule)
    model.train()
    step, epoch = 0, 0
    while step < total_steps:
        loader.sampler.set_epoch(epoch)
        epoch += 1
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            if step == total_steps:
                break


def fullchain_trainer(model, dataset, batch_size, total_steps, schedule, seed, device) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    config = TrainConfig(max_steps=total_steps, batch_size=batch_size, schedule=schedule, device=str(device))
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(model, opt, dataset, config=config, run_dir=run_dir, seed=seed).fit()


def lightning_fabric(model, dataset, batch_size, total_steps, schedule, seed, device) -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=device.type, devices=1, precision="32-true")
    opt, sched = _optimizer_and_schedule(model, total_steps, schedule)
    model, opt = fabric.setup(model, opt)
    sampler_loader = _loader(dataset, batch_size, seed)
    loader = fabric.setup_dataloaders(sampler_loader, use_distributed_sampler=False)
    model.train()
    step, epoch = 0, 0
    while step < total_steps:
        sampler_loader.sampler.set_epoch(epoch)
        epoch += 1
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            fabric.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            if step == total_steps:
                break


def _lightning_available() -> bool:
    try:
        import lightning.fabric  # noqa: F401
    except ImportError:
        return False
    return True


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    dev = resolve_device(device)
    if quick:
        data_cfg = DataConfig(name="digits", val_fraction=0.0, test_fraction=0.2)
        model_name, model_args, batch_size, total_steps, repeats = "cnn", {}, 64, 50, 5
    else:
        data_cfg = DataConfig(name="fashion_mnist", val_fraction=0.0, test_fraction=0.2, max_samples=20000)
        model_name, model_args, batch_size, total_steps, repeats = "cnn", {}, 64, 300, 9
    seed = 0
    bundle = build_data(data_cfg, seed=seed)
    train = TensorDataset(bundle.train.inputs, bundle.train.targets)  # plain (x, y) pairs for every contender
    args = model_args_from_data(model_name, bundle.input_spec, model_args)
    torch.manual_seed(seed)
    init_state = {k: v.clone() for k, v in build_model(name=model_name, args=args).state_dict().items()}
    schedule = ScheduleConfig(warmup_steps=total_steps // 10)

    final_weights: dict[str, dict[str, torch.Tensor]] = {}

    def contender(name: str, loop: Callable) -> Callable[[], dict[str, float]]:
        def measure() -> dict[str, float]:
            model = build_model(name=model_name, args=args)
            model.load_state_dict(init_state)
            model.to(dev)
            torch.manual_seed(seed)  # dropout and any other sampling start from the same state
            start = time.perf_counter()
            loop(model, train, batch_size, total_steps, schedule, seed, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            final_weights[name] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            return {"seconds": seconds, "samples_per_s": total_steps * batch_size / seconds}

        return measure

    contenders = {
        "raw_pytorch": contender("raw_pytorch", raw_loop),
        "fullchain": contender("fullchain", fullchain_trainer),
    }
    if _lightning_available():
        contenders["lightning_fabric"] = contender("lightning_fabric", lightning_fabric)
    rounds = alternate(contenders, repeats=repeats, warmup=1)

    record = BenchRecord(
        bench="trainer-overhead",
        settings={
            "quick": quick,
            "data": f"{data_cfg.name} train split ({len(bundle.train)} samples)",
            "model": model_name,
            "model_args": args,
            "batch_size": batch_size,
            "steps": total_steps,
            "repeats": repeats,
            "precision": "fp32",
            "optimizer": f"AdamW lr={LR}, warmup {schedule.warmup_steps} + cosine",
        },
        results=summarise(rounds),
    )
    record.add_ratio("trainer_vs_raw", rounds, "fullchain", "raw_pytorch", "samples_per_s")
    if "lightning_fabric" in rounds:
        record.add_ratio("fabric_vs_raw", rounds, "lightning_fabric", "raw_pytorch", "samples_per_s")
    raw = final_weights["raw_pytorch"]
    record.checks["weights_identical"] = _identical(raw, final_weights["fullchain"])
    if "lightning_fabric" in final_weights:  # the same loop through Fabric: it must train the same weights
        record.checks["fabric_weights_identical"] = _identical(raw, final_weights["lightning_fabric"])
    return record


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
