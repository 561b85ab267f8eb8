"""Mixed precision: fp32 against bf16 autocast (and fp16 + dynamic loss scaling on CUDA) for training.

One model per precision, all from the same initialisation and data order, each driven through the Trainer's own
`train_step`. Training proceeds in chunks of steps, the precisions taking turns in an order that rotates from
round to round (`harness.alternate`), each chunk timed, so speed is measured side by side over the whole run.

- CPU: the ResNet-style CNN on Fashion-MNIST; every model then scores the full held-out split, so the accuracy
  cost of each precision is measured too.
- CUDA: workloads sized for the GPU, with data loading out of the way (synthetic batches made on the device
  once, so the step is what is timed): ResNet-50 at 224 px and a BERT-base-sized Transformer encoder (12 layers,
  768 wide, 512 tokens). fp32 gets the fastest fp32 setting (TF32 matmuls and convolutions) and every precision
  fused AdamW. Also recorded: the extra peak memory of a chunk, the host synchronisations of one step (CUDA's
  sync debug mode counts them) and the loss each model reaches on a held-out synthetic batch.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fullchain.bench.harness import BenchRecord, alternate, paired_ratio, summarise
from fullchain.config import ScheduleConfig, TrainConfig
from fullchain.distributed.strategy import resolve_device
from fullchain.models import RESNET_PRESETS, build_model
from fullchain.tasks.base import LABELS, batch_size
from fullchain.tasks.tensors import INPUTS
from fullchain.train.trainer import Trainer

LR = 2e-3


@dataclass(frozen=True)
class Workload:
    """A model and synthetic batches for it, made on the device."""

    name: str
    model: str
    args: dict
    batch: int
    input_shape: tuple[int, ...]  # one sample's shape
    vocab: int = 0  # token inputs when > 0, else unit-normal images

    def batches(self, n: int, device: torch.device, seed: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator(device=device).manual_seed(seed)
        classes = self.args["num_classes"]
        out = []
        for _ in range(n):
            shape = (self.batch, *self.input_shape)
            x = (torch.randint(1, self.vocab, shape, generator=g, device=device) if self.vocab
                 else torch.randn(shape, generator=g, device=device))
            out.append({INPUTS: x, LABELS: torch.randint(0, classes, (self.batch,), generator=g, device=device)})
        return out


def gpu_workloads(quick: bool) -> list[Workload]:
    resnet = Workload("resnet50_224px", "cnn", {**RESNET_PRESETS["resnet50"], "num_classes": 1000},
                      batch=64 if quick else 128, input_shape=(3, 224, 224))
    bert = Workload("transformer_bert_base_t512", "transformer",
                    {"vocab_size": 30522, "num_classes": 4, "d_model": 768, "n_heads": 12, "n_layers": 12,
                     "d_ff": 3072, "max_length": 512, "dropout": 0.1},
                    batch=16 if quick else 32, input_shape=(512,), vocab=30522)
    return [resnet, bert]


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    dev = resolve_device(device)
    if dev.type == "cuda":
        return run_synthetic(gpu_workloads(quick), dev, ["fp32", "bf16", "fp16"],
                             chunk_steps=5 if quick else 10, chunks=3 if quick else 5, quick=quick)
    return _run_fashion_mnist(quick, dev)


def _trainer(model: torch.nn.Module, data, precision: str, dev: torch.device, steps: int, batch_size: int,
             warmup: int, seed: int) -> Trainer:
    config = TrainConfig(max_steps=steps, batch_size=batch_size, precision=precision, device=str(dev),
                         schedule=ScheduleConfig(warmup_steps=warmup), progress=False, tensorboard=False)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=dev.type == "cuda" or None)
    return Trainer(model, opt, data, config=config, seed=seed)


def _chunk(trainer: Trainer, next_batch: Callable[[], list], steps: int, dev: torch.device) -> dict[str, float]:
    """`steps` training steps, timed (synchronised on CUDA); samples/s, ms a step and, on CUDA, extra peak MB."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    samples = 0
    start = time.perf_counter()
    for _ in range(steps):
        micro_batches = next_batch()
        trainer.train_step(micro_batches)
        samples += sum(batch_size(b) for b in micro_batches)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    measures = {"samples_per_s": samples / seconds, "step_ms": 1000 * seconds / steps}
    if dev.type == "cuda":
        measures["chunk_peak_extra_mb"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    return measures


def host_syncs(step: Callable[[], object]) -> int:
    """How many times `step` makes the host wait for the GPU (CUDA's sync debug mode warns at each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run_synthetic(workloads: list[Workload], dev: torch.device, precisions: list[str], chunk_steps: int,
                  chunks: int, quick: bool, n_batches: int = 4) -> BenchRecord:
    """Every workload, the precisions taking turns chunk by chunk in rotating order (see the module docstring)."""
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    record = BenchRecord(bench="amp", settings={
        "quick": quick, "precisions": precisions, "chunk_steps": chunk_steps, "timed_chunks": chunks,
        "optimizer": f"AdamW lr={LR}{', fused' if cuda else ''}, warmup + cosine",
        "fp32": "TF32 matmuls and convolutions" if cuda else "plain fp32",
        "data": f"{n_batches} synthetic batches per workload, made on the device once and cycled",
        "workloads": {w.name: {"model": w.model, "args": w.args, "batch": w.batch, "sample_shape": list(w.input_shape)}
                      for w in workloads},
    })
    for w in workloads:
        rounds, extra = _measure_workload(w, dev, precisions, chunk_steps, chunks, n_batches)
        for precision, measures in summarise(rounds).items():
            record.results[f"{w.name}/{precision}"] = {**measures, **extra[precision]}
        fp32_loss = extra["fp32"]["heldout_loss"]
        for precision in precisions[1:]:
            record.ratios[f"{w.name}/{precision}_vs_fp32_speed"] = paired_ratio(rounds, precision, "fp32",
                                                                                 "samples_per_s")
            record.ratios[f"{w.name}/{precision}_vs_fp32_heldout_loss"] = extra[precision]["heldout_loss"] / fp32_loss
            record.checks[f"{w.name}/{precision}_loss_finite"] = math.isfinite(extra[precision]["heldout_loss"])
        if cuda and "fp16" in precisions:
            record.checks[f"{w.name}/fp16_no_more_host_syncs_than_fp32"] = (
                extra["fp16"]["host_syncs_per_step"] <= extra["fp32"]["host_syncs_per_step"])
    record.notes.append("speed ratios pair chunk i of one precision with chunk i of fp32 (median over chunks)")
    return record


def _measure_workload(w: Workload, dev: torch.device, precisions: list[str], chunk_steps: int, chunks: int,
                      n_batches: int) -> tuple[dict[str, list[dict[str, float]]], dict[str, dict]]:
    batches = w.batches(n_batches, dev, seed=0)
    heldout = w.batches(1, dev, seed=1)[0]
    torch.manual_seed(0)
    init = build_model(name=w.model, args=w.args).state_dict()
    total_steps = chunk_steps * (chunks + 1)  # one warm-up chunk, then the timed ones
    dataset = torch.utils.data.TensorDataset(batches[0][INPUTS], batches[0][LABELS])  # the Trainer's bookkeeping
    trainers: dict[str, Trainer] = {}
    cursors: dict[str, Iterator[int]] = {}
    for precision in precisions:
        model = build_model(name=w.model, args=w.args)
        model.load_state_dict(init)
        trainers[precision] = _trainer(model.to(dev), dataset, precision, dev, total_steps, w.batch,
                                       warmup=chunk_steps, seed=0)
        cursors[precision] = itertools.count()

    def step_source(precision: str) -> Callable[[], list]:
        return lambda: [batches[next(cursors[precision]) % n_batches]]

    contenders = {p: (lambda p=p: _chunk(trainers[p], step_source(p), chunk_steps, dev)) for p in precisions}
    rounds = alternate(contenders, repeats=chunks, warmup=1)
    extra: dict[str, dict] = {}
    for precision, trainer in trainers.items():
        extra[precision] = {"heldout_loss": _heldout_loss(trainer, heldout),
                            "skipped_steps": trainer.precision.skipped_steps}
        if dev.type == "cuda":
            extra[precision]["host_syncs_per_step"] = host_syncs(lambda t=trainer, p=precision:
                                                                 t.train_step(step_source(p)()))
    return rounds, extra


def _heldout_loss(trainer: Trainer, batch: dict[str, torch.Tensor]) -> float:
    """Mean cross-entropy of the trained model on a batch it never trained on, in fp32."""
    model = trainer.model
    model.eval()
    with torch.no_grad():
        logits = model(*trainer.task.model_inputs(batch)).float()
        loss = torch.nn.functional.cross_entropy(logits, batch[LABELS])
    model.train()
    return float(loss)


def _run_fashion_mnist(quick: bool, dev: torch.device) -> BenchRecord:
    """The CPU benchmark: the ResNet-style CNN on Fashion-MNIST, speed and held-out accuracy per precision."""
    from fullchain.config import DataConfig
    from fullchain.data import build_data
    from fullchain.models import model_args_from_data

    if quick:
        s = {"max_samples": 3000, "model_args": {"widths": [16, 32, 64]}, "batch_size": 64, "chunk_steps": 8,
             "chunks": 3}
    else:
        s = {"max_samples": None, "model_args": {}, "batch_size": 128, "chunk_steps": 40, "chunks": 12}
    precisions = ["fp32", "bf16"]
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
        trainers[precision] = _trainer(model, bundle.train, precision, dev, total_steps, s["batch_size"],
                                       warmup=s["chunk_steps"], seed=seed)
        step_iters[precision] = trainers[precision].epoch_steps()

    def next_batch(precision: str) -> list:
        micro_batches = next(step_iters[precision], None)
        if micro_batches is None:  # epoch boundary: start the next epoch
            step_iters[precision] = trainers[precision].epoch_steps()
            micro_batches = next(step_iters[precision])
        return micro_batches

    contenders = {p: (lambda p=p: _chunk(trainers[p], lambda: next_batch(p), s["chunk_steps"], dev))
                  for p in precisions}
    rounds = alternate(contenders, repeats=s["chunks"], warmup=1)
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
            "order": "rotating (fp32 bf16, bf16 fp32, ...) after one warm-up chunk each",
            "optimizer": f"AdamW lr={LR}, warmup + cosine",
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
