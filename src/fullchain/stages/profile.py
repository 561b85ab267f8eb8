"""`ds profile`: the run file's data, model and optimiser built as `ds train` builds them, then a few steps
under the profiler (`fullchain.monitor.profile`)."""

from __future__ import annotations

from pathlib import Path

from fullchain.config import RunConfig
from fullchain.data import build_data
from fullchain.distributed.strategy import LocalStrategy, resolve_device
from fullchain.monitor.profile import ProfileResult, profile_report, profile_trainer
from fullchain.monitor.report import Report
from fullchain.stages.train import build_model_for, build_optimizer, place_model, seed_everything
from fullchain.train.trainer import Trainer


def profile_run(cfg: RunConfig, steps: int, out_dir: Path) -> tuple[ProfileResult, Report]:
    """Profiles `steps` training steps of the run file's model on its data."""
    seed_everything(cfg.seed)
    bundle = build_data(cfg.data, seed=cfg.seed)
    model, _, _ = build_model_for(cfg, bundle)
    train_cfg = cfg.train.model_copy(update={"progress": False, "tensorboard": False})
    device = resolve_device(cfg.train.device)
    if cfg.distributed.placement.enabled:  # profile what `ds train` runs: the placed model
        _, optimizer, strategy = place_model(model, cfg, device)
    else:
        optimizer, strategy = build_optimizer(model, cfg.train.optimizer), LocalStrategy(device)
    trainer = Trainer(model, optimizer, bundle.train, None, train_cfg, collate_fn=bundle.collate, seed=cfg.seed,
                      strategy=strategy)
    result = profile_trainer(trainer, steps, out_dir)
    return result, profile_report(result, f"{cfg.name} ({cfg.data.name}, {steps} steps)")
