"""The train stage (`ds train`, the first stage of `ds run`): from a validated run config to a model artifact.

`train_stage` builds data, model and optimiser from the config, trains with the Trainer and writes the model
artifact into ``runs/<name>/model``. Later stages read only the files it wrote. With
``distributed.placement.enabled`` the model trains placed (`fullchain.distributed.placement`): big embedding
tables in CPU memory with SparseAdam, the rest on ``train.device`` with the run's optimiser.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from fullchain.artifact import ArtifactMeta, save_artifact
from fullchain.config import OptimizerConfig, RunConfig, dump_config
from fullchain.data import DataBundle, build_data
from fullchain.distributed import placement
from fullchain.distributed.ddp import launched_by_torchrun
from fullchain.distributed.select import make_strategy
from fullchain.distributed.strategy import LocalStrategy
from fullchain.errors import TrainingStopped, UserError
from fullchain.models import MODELS, build_model, count_parameters, model_args_from_data
from fullchain.models.targets import TargetOrigin
from fullchain.tasks import Task, task_for
from fullchain.train.checkpoint import Checkpointer
from fullchain.train.trainer import Trainer, TrainResult

console = Console(stderr=True)
HF_INPUTS = ("input_ids", "attention_mask")  # what a Hugging Face encoder is called with


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig,
                    only: list[torch.nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """The configured optimiser (over `only` of the model's parameters when given: a placed model's dense part).
    A pretrained model's freshly initialised head (its `fresh_parameters`) is a second parameter group at
    ``lr * head_lr_scale``: a new layer needs a from-scratch rate, the pretrained body only a nudge."""
    fresh = set(getattr(model, "fresh_parameters", ()))
    kept = None if only is None else {id(p) for p in only}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (kept is None or id(p) in kept)]
    groups = [{"params": [p for n, p in named if n not in fresh]}]
    if fresh:
        groups.append({"params": [p for n, p in named if n in fresh], "lr": cfg.lr * cfg.head_lr_scale})
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, **cfg.args}
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[cfg.name]
    try:
        return cls(groups, **kwargs)
    except TypeError as exc:
        raise UserError(f"train.optimizer.args: {exc}") from None


def place_model(model: torch.nn.Module, cfg: RunConfig,
                device: torch.device) -> tuple[placement.Plan, torch.optim.Optimizer, LocalStrategy]:
    """``distributed.placement.enabled``: the run's plan applied to `model`, its optimiser (the run's over the
    dense part, SparseAdam over the tables) and the strategy that leaves the placed model where it is."""
    return placement.place_for_training(model, cfg, device,
                                        lambda params: build_optimizer(model, cfg.train.optimizer, params))


@dataclass
class TrainOutcome:
    result: TrainResult
    model_dir: Path
    bundle: DataBundle
    parameters: int


@dataclass
class Prepared:
    """The data, the model and its task, and how model.json will name the builder."""

    bundle: DataBundle
    model: torch.nn.Module
    task: Task
    builder: dict[str, str]
    args: dict[str, Any]


def prepare(cfg: RunConfig, on_meta: bool = False) -> Prepared:
    """The run file's data and model: a pretrained Hugging Face checkpoint, or a model built for the data (on the
    meta device with `on_meta`: its structure only, for a sharding strategy to materialise)."""
    if cfg.model.hf is not None:
        return prepare_pretrained(cfg)
    with console.status(f"loading {cfg.data.name}"):
        bundle = build_data(cfg.data, seed=cfg.seed)
    try:
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            model, builder, args = build_model_for(cfg, bundle)
    except (RuntimeError, NotImplementedError):
        if not on_meta:
            raise
        model, builder, args = build_model_for(cfg, bundle)  # a model that reads tensor values while it is built
    return Prepared(bundle, model, bundle.task, builder, args)


def prepare_pretrained(cfg: RunConfig) -> Prepared:
    """`model: {hf: SOURCE}`: the checkpoint's body with a new head, reading text with its own tokenizer."""
    from fullchain.models import hf

    unknown = set(cfg.model.args) - {"pooling"}
    if unknown:
        raise UserError(f"{cfg.source}: model.args: {', '.join(sorted(unknown))} cannot be set for a pretrained model "
                        "(its architecture comes from its config.json); only pooling: head, mean, cls or max")
    pooling = cfg.model.args.get("pooling")
    if pooling not in (None, "head", *hf.POOLINGS):
        raise UserError(f"{cfg.source}: model.args.pooling: {pooling!r} is not one of head, {', '.join(hf.POOLINGS)}")
    source = hf.resolve_source(cfg.model.hf)
    encoder = hf.load_text_encoder(source, cfg.data.tokenizer.max_length)
    with console.status(f"loading {cfg.data.name}"):
        bundle = build_data(cfg.data, seed=cfg.seed, encoding=encoder)
    if bundle.kind != "text":
        raise UserError(f"{cfg.source}: model.hf classifies text, but data {cfg.data.name!r} is {bundle.kind} data")
    model = hf.pretrained_classifier(source, bundle.label_names, encoder.pad_id, console, pooling, encoder.max_length)
    task = task_for({"kind": bundle.kind, **bundle.input_spec}, bundle.label_names, HF_INPUTS)
    args = {"source": cfg.model.hf, "pooling": getattr(model, "pooling", "head")}
    return Prepared(bundle, model, task, {"hf": type(model.hf).__name__}, args)


def build_model_for(cfg: RunConfig, bundle: DataBundle) -> tuple[torch.nn.Module, dict[str, str], dict[str, Any]]:
    """The configured model with its data-derived arguments filled in; returns model, builder, full args.

    Every problem is a `UserError` that names the run file as well as the model."""
    origin = TargetOrigin(cfg.source)
    try:
        if cfg.model.name is not None:
            MODELS[cfg.model.name].check_kind(bundle.kind)
        args = model_args_from_data(cfg.model.name, bundle.input_spec, cfg.model.args, target=cfg.model.target,
                                    origin=origin)
        builder = {"name": cfg.model.name} if cfg.model.name is not None else {"target": cfg.model.target}
        model = build_model(name=cfg.model.name, target=cfg.model.target, args=args, origin=origin)
    except UserError as exc:
        message = str(exc)
        raise UserError(message if message.startswith(f"{cfg.source}:") else f"{cfg.source}: {message}") from None
    return model, builder, args


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]


def make_checkpointer(cfg: RunConfig, strategy: LocalStrategy) -> Checkpointer | None:
    if not cfg.checkpoint.enabled:
        return None
    return Checkpointer(
        cfg.run_dir / "checkpoints",
        keep_last=cfg.checkpoint.keep_last,
        keep_every=cfg.checkpoint.keep_every,
        async_save=cfg.checkpoint.async_save,
        config_hash=config_hash(cfg),
        world_size=strategy.world_size,
        rank=strategy.rank,
    )


def metrics_endpoint(cfg: RunConfig):
    """The live /metrics + /dashboard endpoint when monitor.port is set (a Trainer callback), else None."""
    if cfg.monitor.port is None:
        return None
    from fullchain.monitor.exporter import TrainingExporter

    try:
        exporter = TrainingExporter(cfg.monitor.host, cfg.monitor.port)
    except OSError as exc:
        raise UserError(f"monitor.port: {exc}") from None
    console.print(f"live metrics: {exporter.url}/metrics, dashboard: {exporter.url}/dashboard")
    return exporter


def train_stage(cfg: RunConfig, resume: str | None = None, allow_fresh: bool = False) -> TrainOutcome | None:
    """Train as the run file says; returns the outcome on rank 0 (None on other ranks).

    `resume` is "auto" (the newest valid checkpoint, or a fresh start when there is none) or a path. When
    checkpoints exist and none verifies, "auto" stops with exit code 2 before training, unless `allow_fresh`
    (they are then moved aside and training starts from step 0).
    """
    if cfg.distributed.placement.enabled and launched_by_torchrun():
        placement.require_single_process(int(os.environ["WORLD_SIZE"]))
    strategy = make_strategy(cfg)
    run_dir = cfg.run_dir
    if strategy.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    seed_everything(cfg.seed)
    # A sharding strategy: only rank 0 builds the whole model; it sends every rank its shards after wrapping
    from_rank0 = strategy.builds_on_meta and cfg.model.hf is None
    prepared = prepare(cfg, on_meta=from_rank0 and not strategy.is_main)
    bundle, model = prepared.bundle, prepared.model
    seed_state = model.state_dict() if from_rank0 and strategy.is_main else None  # wrapping replaces parameters
    n_params = count_parameters(model)
    if strategy.is_main:
        console.print(
            f"[bold]{cfg.name}[/]: {next(iter(prepared.builder.values()))} ({n_params / 1e6:.2f}M params) "
            f"on {cfg.data.name}: {len(bundle.train)} train / {len(bundle.val) if bundle.val else 0} val / "
            f"{len(bundle.test)} test, precision {cfg.train.precision}, {strategy.world_size} process(es)"
        )
    checkpointer = make_checkpointer(cfg, strategy)
    if resume == "auto" and checkpointer is not None:  # decided, and said, before training starts
        resume = checkpointer.resume_point(allow_fresh, opt_in="ds train <run file> --resume auto --allow-fresh")
        if resume is None and strategy.is_main:
            console.print(f"no valid checkpoint in {checkpointer.directory}: training from step 0", soft_wrap=True)
    if resume and strategy.is_main:
        console.print(f"resuming from {resume}", soft_wrap=True)  # soft_wrap: a path stays on one line
    if cfg.distributed.placement.enabled:
        plan, optimizer, strategy = place_model(model, cfg, strategy.device)
        tables = ", ".join(plan.sparse_names)
        console.print(f"distributed.placement.enabled: {tables} in CPU memory with SparseAdam, the rest on "
                      f"{strategy.device}" if tables else "distributed.placement.enabled: no sparse or big table, "
                      f"every parameter on {strategy.device}", highlight=False)
        placement.print_plan(plan, console)
    else:
        optimizer = build_optimizer(model, cfg.train.optimizer)
    exporter = metrics_endpoint(cfg) if strategy.is_main else None
    trainer = Trainer(
        model,
        optimizer,
        bundle.train,
        bundle.val,
        cfg.train,
        task=prepared.task,
        run_dir=run_dir,
        seed=cfg.seed,
        strategy=strategy,
        checkpointer=checkpointer,
        checkpoint_every=cfg.checkpoint.every_steps if checkpointer else None,
        resume=resume,
        callbacks=[exporter] if exporter is not None else [],
    )
    if from_rank0:
        strategy.materialize(trainer.model, seed_state)
        del seed_state
    try:
        result = trainer.fit()
    finally:
        if checkpointer is not None:
            checkpointer.close()
        if exporter is not None:
            exporter.close()
    if result.stopped_by is not None:
        strategy.close()
        raise TrainingStopped(
            f"stopped by {result.stopped_by} at step {result.steps}; checkpoint saved in "
            f"{run_dir / 'checkpoints'}; continue with: ds train <run file> --resume auto",
            exit_code=128 + int(getattr(signal, result.stopped_by)),
        )
    final = strategy.full_model(trainer.model)  # collective: a sharded model gathers its parameters
    if not strategy.is_main:
        strategy.close()
        return None
    meta = ArtifactMeta(
        builder=prepared.builder,
        args=prepared.args,
        input={"kind": bundle.kind, **bundle.input_spec},
        label_names=bundle.label_names,
        preprocessing=bundle.preprocessing,
        data={"config": cfg.data.model_dump(mode="json"), "seed": cfg.seed},
        extra={"run": cfg.name, "train": result.summary()},
        task=prepared.task.describe(),
    )
    model_dir = save_artifact(run_dir / "model", final.cpu(), meta, encoder=bundle.encoder)
    strategy.close()
    return TrainOutcome(result=result, model_dir=model_dir, bundle=bundle, parameters=n_params)
