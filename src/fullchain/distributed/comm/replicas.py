"""Compressed gradient all-reduce across HSDP replicas (strategy fsdp or hybrid with ``mesh.replicate > 1``).

HSDP reduces gradients in two steps: a reduce-scatter inside each replica (the ``shard`` dimension, fp32,
typically the fast links inside a node) and an all-reduce of the resulting shards across replicas (the
``replicate`` dimension, typically the slow links between nodes). The second step is where compression pays,
as in the hierarchical DDP hook, which compresses only the inter-node all-reduce. FSDP2 hands it over through
``FSDPModule.set_all_reduce_hook``: the model is sharded over the ``shard`` dimension alone and every FSDP2
module's hook carries its reduce-scattered gradient shard across the replicas with the int8 wire (error
feedback, `fullchain.distributed.comm.int8`) or the bf16 wire (fp32 accumulation).

Where it does not apply, the run file gets one line (config validation): the reduce-scatter inside a replica
stays fp32 (compressing it would need FSDP2's reduce-scatter itself rewritten), PowerSGD needs whole gradient
matrices and sees flat shards here, and ``hierarchical`` is what HSDP already is.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from fullchain.distributed.comm.counters import ring_allreduce_bytes
from fullchain.distributed.comm.float_hooks import Bf16HookState, bf16_allreduce_
from fullchain.distributed.comm.int8 import Int8HookState, int8_allreduce_uncounted_
from fullchain.distributed.comm.state import HookState


class ReplicaAllReduce:
    """The mean over the replicate group of each FSDP2 module's gradient shard, on a compressed wire.

    One optimiser step calls the hook of every FSDP2 module that manages parameters of its own once (gradient
    accumulation syncs on the last micro-batch only); the last of them ends the step, which the int8 state
    counts (its first ``compression_start_step`` steps stay fp32), so a checkpoint taken between steps resumes
    exactly. A module seen twice before all were (one whose parameters got no gradient) also ends it.
    """

    def __init__(self, compression: str, group: dist.ProcessGroup, chunk_size: int, compression_start_step: int):
        self.group = group
        self.state: HookState = (Int8HookState(group, chunk_size, compression_start_step) if compression == "int8"
                                 else Bf16HookState(group))
        self._seen: set[str] = set()
        self._per_step = 0

    def attach(self, model: nn.Module) -> None:
        """Set the hook on every FSDP2 module of `model`, keyed by its name (stable across restarts)."""
        sharded = [(name, module) for name, module in model.named_modules() if isinstance(module, FSDPModule)]
        for name, module in sharded:
            module.set_all_reduce_hook(self._hook(name or "root"))
        self._per_step = sum(_owns_parameters(module) for _, module in sharded)

    def _hook(self, key: str) -> Callable[[torch.Tensor], None]:
        def all_reduce(shard: torch.Tensor) -> None:
            if key in self._seen:
                self._end_step()
            self._seen.add(key)
            start = time.perf_counter()
            self.state.stats.bytes_sent += self._reduce(shard, key)
            self.state.stats.calls += 1
            self.state.stats.comm_time_s += time.perf_counter() - start
            if len(self._seen) == self._per_step:
                self._end_step()
        return all_reduce

    def _end_step(self) -> None:
        self._seen.clear()
        self.state._end_iteration()

    def _reduce(self, shard: torch.Tensor, key: str) -> int:
        """Mean of `shard` over the replicas, in place; returns the bytes this rank sent."""
        if isinstance(self.state, Bf16HookState):
            return bf16_allreduce_(shard, self.group)
        if self.state.compressing and shard.dtype == torch.float32:
            return int8_allreduce_uncounted_(shard, self.state, key, self.group, average=True)
        world = dist.get_world_size(self.group)
        dist.all_reduce(shard, group=self.group)
        shard /= world
        sent = ring_allreduce_bytes(shard.numel(), shard.element_size(), world)
        self.state.stats.uncompressed_bytes += sent
        return sent


def _owns_parameters(module: nn.Module) -> bool:
    """Whether FSDP2 reduces gradients for `module` itself: it holds parameters no inner FSDP2 module holds."""
    inner = {id(p) for child in module.modules() if child is not module and isinstance(child, FSDPModule)
             for p in child.parameters()}
    return any(id(p) not in inner for p in module.parameters())
