"""Data-parallel training with DistributedDataParallel, one process per device, launched by torchrun.

Gradient communication can be compressed (fp16, bf16, PowerSGD, int8 with error feedback) and made
hierarchical (see `fullchain.distributed.comm`); the hook's state travels with checkpoints and its bytes
and time are logged as comm_bytes_total / comm_seconds_total.

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

from fullchain import metric_names as M
from fullchain.config import DistributedConfig
from fullchain.distributed.balance import LoadBalancer, UniformSplit
from fullchain.distributed.comm.counters import ring_allreduce_bytes, tcp_bytes_sent
from fullchain.distributed.comm.register import register_compression
from fullchain.distributed.strategy import LocalStrategy


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


class ProcessGroupStrategy(LocalStrategy):
    """One process per device in torchrun's process group: the base of DDP and the mesh strategies."""

    def __init__(self, cfg: DistributedConfig | None = None):
        cfg = cfg or DistributedConfig()
        backend, timeout_s = cfg.backend, cfg.timeout_s
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
        self.comm_state = None  # a compression hook's state: checkpointed, its counters logged
        self.world_size = dist.get_world_size()
        self.local_rank = local_rank
        self.cfg = cfg

    def splitter(self, global_batch: int) -> UniformSplit | LoadBalancer:
        balance = self.cfg.balance
        if not balance.enabled:
            return UniformSplit(self)
        return self.balancer(global_batch, self.data_rank, self.data_world_size, balance.every_steps,
                             balance.min_share)

    def balancer(self, *args) -> LoadBalancer:
        """The balancer for this strategy's gradient sync (DDP's: sync deferred, one explicit all-reduce)."""
        return LoadBalancer(*args)

    def state_dict(self) -> dict:
        """The communication hook's state (its residuals), when a hook compresses gradients."""
        return {"comm_hook": self.comm_state.state_dict()} if self.comm_state is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.comm_state is not None and "comm_hook" in state:
            self.comm_state.load_state_dict(state["comm_hook"])

    def barrier(self) -> None:
        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        verdict = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
        return bool(verdict.item())

    def close(self) -> None:
        """Finish every collective in flight, then release the group.

        The barrier makes every rank reach the end before any tears its group down, so no peer sees a
        connection reset in its last collective.
        """
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class DDPStrategy(ProcessGroupStrategy):
    """DDP with an optional gradient-compression / hierarchical communication hook (`distributed.compression`)."""

    def __init__(self, cfg: DistributedConfig | None = None):
        super().__init__(cfg)
        self.fp32_bytes_per_step = 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=self.cfg.bucket_cap_mb)
        self.fp32_bytes_per_step = ring_allreduce_bytes(
            sum(p.numel() for p in model.parameters() if p.requires_grad), 4, self.world_size)
        if self.cfg.compression != "none" or self.cfg.hierarchical:
            self.comm_state = register_compression(
                ddp,
                self.cfg.compression,
                chunk_size=self.cfg.chunk_size,
                compression_start_step=self.cfg.compression_start_step,
                procs_per_node=self.cfg.topology.procs_per_node,
                hierarchical=self.cfg.hierarchical,
            )
        # "none" keeps DDP's native C++ all-reduce (overlapped with backward); its bytes are the ring volume.
        # A Python hook here (one whose future carries a Python callback) can also deadlock at exit: freeing
        # the reducer joins gloo's thread under the GIL while that thread waits for the GIL to drop the callback.
        return ddp

    def metrics(self, steps: int) -> dict[str, float]:
        wire = {M.COMM_WIRE_BYTES_TOTAL: sent} if (sent := tcp_bytes_sent()) is not None else {}
        if self.comm_state is None:
            return {M.COMM_BYTES_TOTAL: steps * self.fp32_bytes_per_step, **wire}
        stats = self.comm_state.stats
        return {M.COMM_BYTES_TOTAL: stats.bytes_sent, M.COMM_SECONDS_TOTAL: stats.comm_time_s,
                M.COMM_INTER_NODE_BYTES_TOTAL: stats.inter_node_bytes, **wire}
