"""DDP hooks that send floats: fp32 (``none``, counted), fp16 and a bf16 wire that also works on gloo.

``none`` and ``fp16`` are PyTorch's own ``allreduce_hook`` / ``fp16_compress_hook`` with bytes (ring volume)
and time counted; ``bf16`` is written here because PyTorch's ``bf16_compress_hook`` is meant for NCCL.
"""

import math
import time

import torch
import torch.distributed as dist

from fullchain.distributed.comm.counters import ring_allreduce_bytes
from fullchain.distributed.comm.state import HookState, completed


class AllreduceHookState(HookState):
    """State of the counting fp32 (``none``) and fp16 hooks."""

    def __init__(self, process_group=None, dtype: torch.dtype = torch.float32):
        super().__init__(process_group)
        self.dtype = dtype
        self.kind = "none" if dtype == torch.float32 else "fp16"


class Bf16HookState(HookState):
    kind = "bf16"


def bf16_allreduce_(tensor: torch.Tensor, group=None) -> int:
    """Mean all-reduce with a bf16 wire and fp32 accumulation: all-to-all of bf16 chunks, fp32 sum on the
    owner, all-gather of the bf16 result. Returns bytes sent by this rank."""
    world = dist.get_world_size(group)
    flat = tensor.view(-1)
    if world == 1:
        return 0
    numel = flat.numel()
    length = max(1, math.ceil(numel / world))
    send = torch.zeros(world * length, dtype=torch.bfloat16, device=flat.device)
    send[:numel] = flat
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    mine = (recv.view(world, length).to(torch.float32).sum(dim=0) / world).to(torch.bfloat16)
    out = torch.empty_like(send)
    dist.all_gather_into_tensor(out, mine, group=group)
    flat.copy_(out[:numel])
    return 2 * (world - 1) * length * 2


def bf16_hook(state: Bf16HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """bf16 compression that also works on gloo (PyTorch's ``bf16_compress_hook`` is meant for NCCL)."""
    start = time.perf_counter()
    buffer = bucket.buffer()
    state.stats.bytes_sent += bf16_allreduce_(buffer, state.process_group)
    state.stats.calls += 1
    state.stats.comm_time_s += time.perf_counter() - start
    if bucket.is_last():
        state._end_iteration()
    return completed(buffer)


def counting_allreduce_hook(state: AllreduceHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """PyTorch's allreduce / fp16 hooks, counting bytes (ring volume) and time until the result is ready."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    start = time.perf_counter()
    buffer = bucket.buffer()
    itemsize = torch.tensor([], dtype=state.dtype).element_size()
    sent = ring_allreduce_bytes(buffer.numel(), itemsize, state.world_size)
    state.stats.bytes_sent += sent
    if state.dtype == torch.float32:
        state.stats.uncompressed_bytes += sent
        fut = default_hooks.allreduce_hook(state.process_group, bucket)
    else:
        fut = default_hooks.fp16_compress_hook(state.process_group, bucket)
    state.stats.calls += 1
    if bucket.is_last():
        state._end_iteration()
    if dist.get_backend(state.process_group) != "nccl":
        # On gloo, wait here and hand DDP a completed future: a future still carrying Python callbacks
        # when the process exits can deadlock the reducer's destructor against gloo's thread.
        result = fut.wait()
        state.stats.comm_time_s += time.perf_counter() - start
        return completed(result[0] if isinstance(result, list) else result)

    def _timed(f):
        state.stats.comm_time_s += time.perf_counter() - start
        return f.value()

    return fut.then(_timed)
