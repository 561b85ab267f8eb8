"""Hierarchical all-reduce over nodes of consecutive ranks, and its DDP hook (MISSION C6).

Ranks ``[k * P, (k + 1) * P)`` form node ``k`` (``P = procs_per_node``). The all-reduce of a tensor is

1. a reduce-scatter inside the node (``dist.reduce_scatter_tensor`` on the intra-node group; gloo supports it
   natively in torch 2.13, so no emulation is needed): local rank ``i`` gets the node's sum of shard ``i``;
2. an all-reduce of shard ``i`` across nodes, on the inter-node group of all ranks with local rank ``i``
   (fp32, or the INT8 all-to-all / all-gather path of :mod:`fullchain.distributed.comm.int8`);
3. an all-gather of the shards inside the node.

Only ``1 / P`` of the tensor crosses the inter-node link per rank. Bytes are counted per link class: intra-node
(reduce-scatter + all-gather, ``(P - 1)`` shards each) and inter-node (ring all-reduce volume of the shard over
the ``N`` nodes, or the INT8 messages).
"""

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fullchain.distributed.comm.counters import CommStats, ring_allreduce_bytes
from fullchain.distributed.comm.int8 import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_COMPRESSION_START_STEP,
    Int8HookState,
    int8_allreduce_uncounted_,
)
from fullchain.distributed.comm.state import HookState, bucket_key, completed
from fullchain.errors import UserError


@dataclass
class Topology:
    procs_per_node: int
    num_nodes: int
    world_size: int
    rank: int
    intra_group: Any  # ranks of this node
    inter_group: Any  # ranks with this local rank on every node

    @property
    def node(self) -> int:
        return self.rank // self.procs_per_node

    @property
    def local_rank(self) -> int:
        return self.rank % self.procs_per_node


def build_topology(procs_per_node: int | None = None) -> Topology:
    """Create the intra- and inter-node groups over the default group (collective: every rank must call it).

    Every rank creates every group in the same order, as ``dist.new_group`` requires.
    """
    world = dist.get_world_size()
    rank = dist.get_rank()
    if procs_per_node is None:
        procs_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if procs_per_node < 1 or world % procs_per_node:
        raise UserError(
            f"distributed.topology.procs_per_node={procs_per_node} must be >= 1 and divide the world size {world}"
        )
    nodes = world // procs_per_node
    intra = inter = None
    for node in range(nodes):
        group = dist.new_group(ranks=list(range(node * procs_per_node, (node + 1) * procs_per_node)))
        if node == rank // procs_per_node:
            intra = group
    for local in range(procs_per_node):
        group = dist.new_group(ranks=[node * procs_per_node + local for node in range(nodes)])
        if local == rank % procs_per_node:
            inter = group
    return Topology(procs_per_node, nodes, world, rank, intra, inter)


def _hierarchical_sum_(
    tensor: torch.Tensor,
    topology: Topology,
    stats: CommStats,
    int8_state: Int8HookState | None = None,
    key: str = "tensor",
) -> torch.Tensor:
    flat = tensor.view(-1)
    numel = flat.numel()
    procs, nodes = topology.procs_per_node, topology.num_nodes
    shard_len = max(1, math.ceil(numel / procs))
    full = torch.zeros(procs * shard_len, dtype=tensor.dtype, device=tensor.device)
    full[:numel] = flat
    itemsize = full.element_size()

    if procs > 1:
        shard = torch.empty(shard_len, dtype=tensor.dtype, device=tensor.device)
        dist.reduce_scatter_tensor(shard, full, group=topology.intra_group)
        stats.intra_node_bytes += (procs - 1) * shard_len * itemsize
    else:
        shard = full

    if nodes > 1:
        if int8_state is not None and tensor.dtype == torch.float32:
            sent = int8_allreduce_uncounted_(shard, int8_state, key, topology.inter_group, average=False)
        else:
            dist.all_reduce(shard, group=topology.inter_group)
            sent = ring_allreduce_bytes(shard_len, itemsize, nodes)
            stats.uncompressed_bytes += sent
        stats.inter_node_bytes += sent

    if procs > 1:
        dist.all_gather_into_tensor(full, shard, group=topology.intra_group)
        stats.intra_node_bytes += (procs - 1) * shard_len * itemsize
    flat.copy_(full[:numel])
    stats.bytes_sent = stats.intra_node_bytes + stats.inter_node_bytes
    return tensor


def hierarchical_allreduce_(
    tensor: torch.Tensor,
    topology: Topology,
    stats: CommStats | None = None,
    int8_state: Int8HookState | None = None,
    key: str = "tensor",
    average: bool = False,
) -> torch.Tensor:
    """Sum (or mean with ``average=True``) ``tensor`` over all ranks in place, hierarchically.

    With ``int8_state`` the inter-node all-reduce is INT8-compressed (residuals stored under ``key``).
    Bytes and time go to ``stats`` when given.
    """
    stats = stats if stats is not None else CommStats()
    start = time.perf_counter()
    _hierarchical_sum_(tensor, topology, stats, int8_state, key)
    if average:
        tensor /= topology.world_size
    stats.calls += 1
    stats.comm_time_s += time.perf_counter() - start
    return tensor


class HierarchicalHookState(HookState):
    """State of :func:`hierarchical_hook`: topology, counters and (with ``int8_inter_node``) the INT8 state of
    the inter-node all-reduce, whose residuals are checkpointed."""

    kind = "hierarchical"

    def __init__(
        self,
        topology: Topology,
        int8_inter_node: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compression_start_step: int = DEFAULT_COMPRESSION_START_STEP,
        error_feedback: bool = True,
    ):
        super().__init__(None)
        self.topology = topology
        self.int8_inter_node = int8_inter_node
        self.int8 = (
            Int8HookState(topology.inter_group, chunk_size, compression_start_step, error_feedback)
            if int8_inter_node
            else None
        )

    def _end_iteration(self) -> None:
        super()._end_iteration()
        if self.int8 is not None:
            self.int8._end_iteration()

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["meta"]["int8_inter_node"] = self.int8_inter_node
        if self.int8 is not None:
            inner = self.int8.state_dict()
            out["meta"]["int8"] = inner["meta"]
            out["tensors"] = inner["tensors"]
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        meta = state.get("meta", {})
        if self.int8 is not None and "int8" in meta:
            self.int8.load_state_dict({"meta": meta["int8"], "tensors": state.get("tensors", {})})


def hierarchical_hook(state: HierarchicalHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP hook: hierarchical mean all-reduce of the bucket (INT8 across nodes once past the warm-up)."""
    buffer = bucket.buffer()
    int8_state = state.int8 if state.int8 is not None and state.int8.compressing else None
    hierarchical_allreduce_(buffer, state.topology, state.stats, int8_state, bucket_key(bucket), average=True)
    if bucket.is_last():
        state._end_iteration()
    return completed(buffer)
