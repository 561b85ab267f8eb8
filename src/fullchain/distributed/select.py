"""The strategy a run file asks for: one process, DDP, or a mesh strategy (fsdp / hybrid) under torchrun."""

from __future__ import annotations

from fullchain.config import RunConfig
from fullchain.distributed.ddp import DDPStrategy, launched_by_torchrun
from fullchain.distributed.strategy import LocalStrategy, resolve_device


def make_strategy(cfg: RunConfig) -> LocalStrategy:
    """`distributed.strategy` when launched by torchrun; a single process otherwise (its mesh is one rank)."""
    if not launched_by_torchrun():
        return LocalStrategy(resolve_device(cfg.train.device))
    if cfg.distributed.strategy == "ddp":
        return DDPStrategy(cfg.distributed)
    from fullchain.distributed.fsdp import MeshStrategy
    from fullchain.models.registry import MODELS

    spec = MODELS.get(cfg.model.name) if cfg.model.name is not None else None
    label = f"model {cfg.model.name!r}" if spec is not None else "a model without a registered spec"
    return MeshStrategy(cfg.distributed, parallelize=spec.parallelize if spec is not None else None,
                        precision=cfg.train.precision, model_name=label)
