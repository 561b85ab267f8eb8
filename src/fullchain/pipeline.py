"""The stages behind `ds train` and `ds run`: from a validated run config to a run directory.

`train_stage` builds data, model and optimiser from the config, trains with the Trainer and writes the
model artifact; `run_pipeline` walks every stage in order and records each stage's headline figures in
``summary.json``. Later stages (optimize, export, serve) read only the files earlier stages wrote.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from fullchain.artifact import ArtifactMeta, save_artifact
from fullchain.config import OptimizerConfig, RunConfig, dump_config
from fullchain.data import DataBundle, build_data
from fullchain.distributed.ddp import DDPStrategy, launched_by_torchrun
from fullchain.distributed.strategy import LocalStrategy, resolve_device
from fullchain.errors import TrainingStopped, UserError
from fullchain.evaluate import evaluate_artifact
from fullchain.models import MODELS, build_model, count_parameters, model_args_from_data
from fullchain.models.targets import TargetOrigin
from fullchain.train.checkpoint import Checkpointer
from fullchain.train.trainer import Trainer, TrainResult

console = Console(stderr=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, **cfg.args}
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[cfg.name]
    try:
        return cls(params, **kwargs)
    except TypeError as exc:
        raise UserError(f"train.optimizer.args: {exc}") from None


@dataclass
class TrainOutcome:
    result: TrainResult
    model_dir: Path
    bundle: DataBundle
    parameters: int


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
    strategy = DDPStrategy(cfg.distributed) if launched_by_torchrun() else None
    strategy = strategy or LocalStrategy(resolve_device(cfg.train.device))
    run_dir = cfg.run_dir
    if strategy.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    seed_everything(cfg.seed)
    with console.status(f"loading {cfg.data.name}"):
        bundle = build_data(cfg.data, seed=cfg.seed)
    model, builder, args = build_model_for(cfg, bundle)
    n_params = count_parameters(model)
    if strategy.is_main:
        console.print(
            f"[bold]{cfg.name}[/]: {builder.get('name') or builder.get('target')} ({n_params / 1e6:.2f}M params) "
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
    exporter = metrics_endpoint(cfg) if strategy.is_main else None
    trainer = Trainer(
        model,
        build_optimizer(model, cfg.train.optimizer),
        bundle.train,
        bundle.val,
        cfg.train,
        run_dir=run_dir,
        collate_fn=bundle.collate,
        seed=cfg.seed,
        strategy=strategy,
        checkpointer=checkpointer,
        checkpoint_every=cfg.checkpoint.every_steps if checkpointer else None,
        resume=resume,
        callbacks=[exporter] if exporter is not None else [],
    )
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
    if not strategy.is_main:
        strategy.close()
        return None
    spec = ArtifactMeta(
        builder=builder,
        args=args,
        input={"kind": bundle.kind, **bundle.input_spec},
        label_names=bundle.label_names,
        preprocessing=bundle.preprocessing,
        data={"config": cfg.data.model_dump(mode="json"), "seed": cfg.seed},
        extra={"run": cfg.name, "train": result.summary()},
    )
    model_dir = save_artifact(run_dir / "model", trainer.unwrapped_model.cpu(), spec, encoder=bundle.encoder)
    strategy.close()
    return TrainOutcome(result=result, model_dir=model_dir, bundle=bundle, parameters=n_params)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def run_report(run_dir: Path) -> dict[str, Any]:
    """runs/<name>/report.html (+ .json): the log analyser's findings and plots over this run's metrics.jsonl."""
    from fullchain.monitor.logs import analyze_run
    from fullchain.monitor.report import write_report

    report = analyze_run(run_dir)
    html_path, _ = write_report(report, run_dir / "report.html")
    return {"report": str(html_path), "findings": [f.title for f in report.findings]}


def run_pipeline(cfg: RunConfig) -> dict[str, Any]:
    """`ds run`: every stage in order; returns (and writes) the summary."""
    started = time.perf_counter()
    outcome = train_stage(cfg)
    trust_code = cfg.model.target is not None  # the run file's own model code wrote this artifact
    eval_metrics = evaluate_artifact(outcome.model_dir, split="test", bundle=outcome.bundle, trust_code=trust_code)
    summary = {
        "name": cfg.name,
        "model_dir": str(outcome.model_dir),
        "train": {**outcome.result.summary(), "parameters": outcome.parameters},
        "eval": {k: v for k, v in eval_metrics.items() if k != "confusion_matrix"},
    }
    if cfg.optimize.enabled:
        from fullchain.optimize.pipeline import optimize_artifact, summarize

        report = optimize_artifact(outcome.model_dir, cfg.run_dir / "model-optimized", cfg.optimize,
                                   console=console, bundle=outcome.bundle, trust_code=trust_code)
        summary["optimize"] = {"model_dir": str(cfg.run_dir / "model-optimized"), **summarize(report)}
    if cfg.export.enabled:
        from fullchain.deploy.stage import export_stage

        summary["export"] = export_stage(cfg, outcome.model_dir, console)
    if cfg.serve.enabled:
        from fullchain.deploy.stage import serve_stage

        summary["serve"] = serve_stage(cfg, outcome.model_dir, console)
    summary["monitor"] = run_report(cfg.run_dir)
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    write_summary(cfg.run_dir, summary)
    return summary
