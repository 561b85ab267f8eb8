"""Data-parallel training with DistributedDataParallel, one process per device, launched by torchrun.

The process group comes from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...): gloo on CPU,
NCCL with CUDA. Its timeout is short (`distributed.timeout_s`, default 60 s) instead of torch's 30 minutes,
so a collective waiting on a dead peer fails in seconds and torchrun can restart the group.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fullchain.distributed.strategy import LocalStrategy


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


class DDPStrategy(LocalStrategy):
    def __init__(self, backend: str = "auto", timeout_s: float = 60.0):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        super().__init__(device)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        self.backend = backend
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = local_rank

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
