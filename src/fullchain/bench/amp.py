"""Mixed precision: fp32 against bf16 autocast (and fp16 + dynamic loss scaling on CUDA) for training.

One model per precision, all from the same initialisation and data order, each driven through the
Trainer's own `train_step`. Training proceeds in chunks of steps that alternate between the precisions
(fp32 chunk, bf16 chunk, ...), each chunk timed, so speed is measured side by side over the whole run;
every model then scores the full held-out split, so the accuracy cost of each precision is measured too.
CPU: the ResNet-style CNN on Fashion-MNIST. CUDA: a ResNet-50-sized CNN (bottleneck blocks, 25M
parameters) on the same images.
"""

from __future__ import annotations

import time

import torch

from fullchain.bench.harness import BenchRecord, paired_ratio, summarise
from fullchain.config import DataConfig, ScheduleConfig, TrainConfig
from fullchain.data import build_data
from fullchain.distributed.strategy import resolve_device
from fullchain.models import RESNET_PRESETS, build_model, model_args_from_data
from fullchain.train.trainer import Trainer


def _settings(quick: bool, cuda: bool) -> dict:
    if cuda:
        model_args = {**RESNET_PRESETS["resnet50"], "channels": 1}
        return {"max_samples": 20000 if quick else None, "model_args": model_args, "batch_size": 256,
                "chunk_steps": 10 if quick else 25, "chunks": 3 if quick else 8}
    if quick:
        return {"max_samples": 3000, "model_args": {"widths": [16, 32, 64]}, "batch_size": 64,
                "chunk_steps": 8, "chunks": 3}
    return {"max_samples": None, "model_args": {}, "batch_size": 128, "chunk_steps": 40, "chunks": 12}


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    s = _settings(quick, cuda)
    precisions = ["fp32", "bf16", "fp16"] if cuda else ["fp32", "bf16"]
    seed = 0
    data_cfg = DataConfig(name="fashion_mnist", val_fraction=0.0, test_fraction=0.2, max_samples=s["max_samples"])
    bundle = build_data(data_cfg, seed=seed)
    args = model_args_from_data("cnn", bundle.input_spec, s["model_args"])
    torch.manual_seed(seed)
    init_state = build_model(name="cnn", args=args).state_dict()
    total_steps = s["chunk_steps"] * (s["chunks"] + 1)  # one warm-up chunk, then the timed ones

    trainers, step_iters = {}, {}
    for precision in precisions:
        model = build_model(name="cnn", args=args)
        model.load_state_dict(init_state)
        config = TrainConfig(
            max_steps=total_steps, batch_size=s["batch_size"], precision=precision, device=str(dev),
            schedule=ScheduleConfig(warmup_steps=s["chunk_steps"]), progress=False, tensorboard=False,
        )
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        trainers[precision] = Trainer(model, opt, bundle.train, config=config, seed=seed)
        step_iters[precision] = trainers[precision].epoch_steps()

    def run_chunk(precision: str) -> dict[str, float]:
        trainer = trainers[precision]
        samples = 0
        start = time.perf_counter()
        for _ in range(s["chunk_steps"]):
            micro_batches = next(step_iters[precision], None)
            if micro_batches is None:  # epoch boundary: start the next epoch
                step_iters[precision] = trainer.epoch_steps()
                micro_batches = next(step_iters[precision])
            trainer.train_step(micro_batches)
            samples += sum(len(y) for _, y in micro_batches)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return {"samples_per_s": samples / seconds, "step_ms": 1000 * seconds / s["chunk_steps"]}

    for precision in precisions:  # warm-up chunk (allocator, kernels, autocast caches)
        run_chunk(precision)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rounds: dict[str, list[dict[str, float]]] = {p: [] for p in precisions}
    for _ in range(s["chunks"]):
        for precision in precisions:
            rounds[precision].append(run_chunk(precision))

    results = summarise(rounds)
    for precision, trainer in trainers.items():
        metrics = trainer.evaluate(bundle.test, collate_fn=bundle.collate)
        results[precision].update(
            test_accuracy=metrics["eval_accuracy"], test_loss=metrics["eval_loss"],
            skipped_steps=trainer.precision.skipped_steps,
        )

    record = BenchRecord(
        bench="amp",
        settings={
            "quick": quick,
            "data": f"fashion_mnist: {len(bundle.train)} train, {len(bundle.test)} test (official t10k"
                    f"{' slice' if s['max_samples'] else ''})",
            "model": "cnn", "model_args": args, "batch_size": s["batch_size"],
            "steps_per_precision": total_steps, "timed_chunks": s["chunks"], "chunk_steps": s["chunk_steps"],
            "optimizer": "AdamW lr=2e-3, warmup + cosine",
        },
        results=results,
    )
    fp32_acc = results["fp32"]["test_accuracy"]
    for precision in precisions[1:]:
        record.ratios[f"{precision}_vs_fp32_speed"] = paired_ratio(rounds, precision, "fp32", "samples_per_s")
        record.ratios[f"{precision}_accuracy_delta_points"] = 100 * (results[precision]["test_accuracy"] - fp32_acc)
        delta = record.ratios[f"{precision}_accuracy_delta_points"]
        record.checks[f"{precision}_accuracy_within_0.5pt"] = abs(delta) <= 0.5
    return record
