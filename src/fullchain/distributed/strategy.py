"""Parallel strategies as small objects the Trainer holds.

A strategy wraps the model for its kind of parallelism, says whether gradients must be synchronised on a
given micro-batch (accumulation skips the sync until the last micro-batch of a step), and tells which
process logs. `LocalStrategy` is one process on one device; data-parallel strategies subclass it.
"""

from __future__ import annotations

import contextlib

import torch

from fullchain.distributed.balance import UniformSplit


class LocalStrategy:
    world_size = 1
    rank = 0

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def sync_gradients(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward; `sync=False` defers the gradient all-reduce.

        Uses the wrapper's ``no_sync()`` when it has one (DDP), so accumulation never pays for a sync
        it throws away.
        """
        if not sync and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model)

    @property
    def data_rank(self) -> int:
        """Which slice of each global batch this rank reads (ranks of one tensor-parallel group share one)."""
        return self.rank

    @property
    def data_world_size(self) -> int:
        """How many slices each global batch is cut into."""
        return self.world_size

    @property
    def builds_on_meta(self) -> bool:
        """Whether ranks other than 0 build the model on the meta device (a sharding strategy's `materialize`
        then fills them from rank 0); every rank builds it whole here."""
        return False

    def splitter(self, global_batch: int) -> UniformSplit:
        """How each global batch is split over the data ranks (`fullchain.distributed.balance`)."""
        return UniformSplit(self)

    def full_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The trained model as one plain module with whole parameters on the main rank, None elsewhere.

        Collective with several ranks (a sharded model gathers its parameters): every rank calls it.
        """
        return self.unwrap(model) if self.is_main else None

    def barrier(self) -> None:
        """Wait for every rank; nothing to wait for in one process."""

    def any_rank(self, flag: bool) -> bool:
        """True when `flag` is true on any rank (a collective with several ranks)."""
        return flag

    def state_dict(self) -> dict:
        """Strategy state a checkpoint must carry (a communication hook's residuals); none here."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def metrics(self, steps: int) -> dict[str, float]:
        """Communication counters for metrics.jsonl; none in one process."""
        return {}

    def close(self) -> None:
        """Release the process group, if any."""


def rebind_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str],
                     model: torch.nn.Module) -> torch.optim.Optimizer:
    """Point `optimizer` at `model`'s parameters, in place, when wrapping replaced them (FSDP2 and tensor
    parallelism register new sharded parameters); `names` maps ``id(old parameter)`` to its name.

    Only an optimiser without state can be rebound: it is built before training, its state comes after.
    """
    current = dict(model.named_parameters())
    live = {id(p) for p in current.values()}
    if all(id(p) in live for g in optimizer.param_groups for p in g["params"]):
        return optimizer
    if optimizer.state:
        raise ValueError("the optimizer already holds state; build it before wrapping the model")
    for group in optimizer.param_groups:
        group["params"] = [current[names[id(p)]] for p in group["params"]]
    return optimizer


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from fullchain.errors import UserError

        raise UserError(f"train.device: {name!r} requested but no CUDA device is available (use auto or cpu)")
    return device
