"""INT8 gradient all-reduce with two-sided error feedback, and its DDP hook (MISSION C5).

The wire stays 8-bit without overflowing and without growing with the number of ranks (the Bagua ByteGrad /
DeepSpeed ZeRO++ pattern; wire format in :mod:`fullchain.distributed.comm.int8_codec`):

1. the bucket (plus this worker's residual, error feedback 1) is split into ``world_size`` chunks of ``L``
   elements; each chunk is cut into sub-chunks of ``chunk_size`` elements, each with its own fp32 scale
   (``absmax / 127``), and quantised to int8;
2. ``all_to_all_single`` sends chunk ``j`` (int8 payload and its scales as raw bytes, one message) to rank
   ``j``, so every rank receives every rank's version of the chunk it owns;
3. the owner dequantises and averages in fp32, adds its owner residual (error feedback 2) and re-quantises
   with per-sub-chunk scales;
4. ``all_gather_into_tensor`` of the quantised reduced chunks; every rank dequantises into the bucket.

Per element, each quantisation errs by at most ``scale / 2`` of its sub-chunk, so the result differs from the
exact mean by at most ``mean_j(s1_j) / 2 + s2 / 2`` (without residuals; with error feedback the *accumulated*
error over steps stays within that bound instead of growing).
"""

import time
import zlib
from typing import Any

import torch
import torch.distributed as dist

from fullchain.distributed.comm.counters import ring_allreduce_bytes
from fullchain.distributed.comm.int8_codec import (
    chunk_layout,
    dequantize_int8,
    pack_messages,
    quantize_int8,
    unpack_messages,
)
from fullchain.distributed.comm.state import HookState, bucket_key, completed
from fullchain.errors import UserError

DEFAULT_CHUNK_SIZE = 256
DEFAULT_COMPRESSION_START_STEP = 10


class Int8HookState(HookState):
    """State of the INT8 hook: settings, step counter, counters and both error-feedback residuals.

    ``worker_residuals[key]`` (shape ``(W, Lp)``) is this worker's quantisation error of the whole bucket;
    ``owner_residuals[key]`` (shape ``(Lp,)``) the re-quantisation error of the chunk this rank owns.
    """

    kind = "int8"

    def __init__(
        self,
        process_group=None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compression_start_step: int = DEFAULT_COMPRESSION_START_STEP,
        error_feedback: bool = True,
    ):
        super().__init__(process_group)
        if chunk_size < 1:
            raise UserError(f"distributed.chunk_size must be >= 1, got {chunk_size}")
        if compression_start_step < 0:
            raise UserError(f"distributed.compression_start_step must be >= 0, got {compression_start_step}")
        self.chunk_size = int(chunk_size)
        # id(parameter) -> its position in model.parameters(), set by register_compression; empty when the hook
        # runs without a model (then buckets are quantised in DDP's own layout)
        self.param_index: dict[int, int] = {}
        self.compression_start_step = int(compression_start_step)
        self.error_feedback = bool(error_feedback)
        self.worker_residuals: dict[str, torch.Tensor] = {}
        self.owner_residuals: dict[str, torch.Tensor] = {}
        self._touched: set[str] = set()
        self._iterations_here = 0  # iterations run by this process (a resumed run restarts at 0)

    @property
    def compressing(self) -> bool:
        return self.step >= self.compression_start_step

    def _end_iteration(self) -> None:
        # Drop residuals of bucket layouts no longer in use (DDP's rebuild after the first iteration), but never
        # during this process's first iteration: a resumed run starts with the initial layout and only meets the
        # layout its checkpointed residuals belong to after the rebuild.
        if self._iterations_here >= 1 and self._touched:
            for store in (self.worker_residuals, self.owner_residuals):
                for key in [k for k in store if k not in self._touched]:
                    del store[key]
        self._touched = set()
        self._iterations_here += 1
        super()._end_iteration()

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["meta"].update(
            chunk_size=self.chunk_size,
            compression_start_step=self.compression_start_step,
            error_feedback=self.error_feedback,
        )
        out["tensors"] = {f"worker/{k}": v.clone() for k, v in self.worker_residuals.items()}
        out["tensors"].update({f"owner/{k}": v.clone() for k, v in self.owner_residuals.items()})
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        meta = state.get("meta", {})
        if int(meta.get("chunk_size", self.chunk_size)) != self.chunk_size:
            # Residual layouts depend on the chunk size; with another size they would be misapplied.
            self.worker_residuals, self.owner_residuals = {}, {}
            return
        self.worker_residuals, self.owner_residuals = {}, {}
        for name, tensor in state.get("tensors", {}).items():
            where, _, key = name.partition("/")
            store = self.worker_residuals if where == "worker" else self.owner_residuals
            store[key] = tensor.detach().to(torch.float32).clone()


def int8_allreduce_uncounted_(tensor: torch.Tensor, state: Int8HookState, key: str, group, average: bool) -> int:
    """The all-to-all / reduce / re-quantise / all-gather INT8 all-reduce of ``tensor`` over ``group``, in place.

    Updates the residuals under ``key`` but not ``state.stats``: returns the bytes this rank sent, for the caller
    to count where it belongs (the hierarchical hook counts them as inter-node bytes).
    """
    world = dist.get_world_size(group)
    if world == 1:
        return 0
    cs = state.chunk_size
    flat = tensor.view(-1)
    numel = flat.numel()
    length, subchunks, padded = chunk_layout(numel, world, cs)

    # chunk j = flat[j L : (j + 1) L] (the last one zero-padded), each padded to Lp = S * chunk_size
    x = torch.zeros(world, padded, dtype=torch.float32, device=flat.device)  # NCCL sends device tensors only
    staged = torch.zeros(world * length, dtype=torch.float32, device=flat.device)
    staged[:numel] = flat
    x[:, :length] = staged.view(world, length)

    worker_res = state.worker_residuals.get(key) if state.error_feedback else None
    if worker_res is not None and worker_res.shape == x.shape:
        x += worker_res.to(x.device)  # a restored residual comes from the CPU
    q1, s1 = quantize_int8(x, cs)
    if state.error_feedback:
        state.worker_residuals[key] = x - dequantize_int8(q1, s1, cs)

    send = pack_messages(q1, s1, length)  # (world, length + 4 S)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    reduced = unpack_messages(recv, length, padded, cs).sum(dim=0, keepdim=True)  # (1, padded), fp32
    if average:
        reduced /= world

    owner_res = state.owner_residuals.get(key) if state.error_feedback else None
    if owner_res is not None and owner_res.shape == (padded,):
        reduced += owner_res.to(reduced.device)
    q2, s2 = quantize_int8(reduced, cs)
    if state.error_feedback:
        state.owner_residuals[key] = (reduced - dequantize_int8(q2, s2, cs)).view(-1)

    mine = pack_messages(q2, s2, length).view(-1)
    gathered = torch.empty(world * mine.numel(), dtype=torch.int8, device=mine.device)
    dist.all_gather_into_tensor(gathered, mine, group=group)
    result = unpack_messages(gathered.view(world, -1), length, padded, cs)[:, :length].reshape(-1)[:numel]
    flat.copy_(result)

    if not bool(torch.isfinite(result).all()):  # a non-finite gradient must not poison later steps' residuals
        state.worker_residuals.pop(key, None)
        state.owner_residuals.pop(key, None)
    elif state.error_feedback:
        state._touched.add(key)
    return 2 * (world - 1) * send.shape[1]


def int8_allreduce_(
    tensor: torch.Tensor, state: Int8HookState, key: str = "tensor", group=None, average: bool = True
) -> torch.Tensor:
    """INT8-compressed all-reduce (mean by default) of an fp32 tensor, in place, with error feedback.

    ``key`` names the residuals of this tensor in ``state``; every rank must use the same key and call in the
    same order. Counts bytes and time in ``state.stats``.
    """
    start = time.perf_counter()
    group = group if group is not None else state.process_group
    state.stats.bytes_sent += int8_allreduce_uncounted_(tensor, state, key, group, average)
    state.stats.calls += 1
    state.stats.comm_time_s += time.perf_counter() - start
    return tensor


def _fp32_allreduce_mean_(tensor: torch.Tensor, group) -> int:
    world = dist.get_world_size(group)
    dist.all_reduce(tensor, group=group)
    tensor /= world
    return ring_allreduce_bytes(tensor.numel(), tensor.element_size(), world)


def int8_hook(state: Int8HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP hook: fp32 all-reduce for ``compression_start_step`` steps, then the INT8 all-to-all pattern."""
    start = time.perf_counter()
    buffer = bucket.buffer()
    group = state.process_group
    if buffer.dtype != torch.float32 or not state.compressing:
        sent = _fp32_allreduce_mean_(buffer, group)
        state.stats.uncompressed_bytes += sent
    else:
        canonical, key, write_back = _canonical_bucket(bucket, state.param_index)
        sent = int8_allreduce_uncounted_(canonical, state, key, group, average=True)
        write_back(canonical)
    state.stats.bytes_sent += sent
    state.stats.calls += 1
    state.stats.comm_time_s += time.perf_counter() - start
    if bucket.is_last():
        state._end_iteration()
    return completed(buffer)


def _canonical_bucket(bucket: dist.GradBucket, param_index: dict[int, int]):
    """The bucket's gradients in model-parameter order, its key, and a function that writes a result back.

    DDP lays a bucket out in reverse parameter order for the first iteration and in gradient-ready order
    after it rebuilds its buckets; a resumed process starts from the first layout again. Quantising in one
    canonical order makes the int8 groups, the chunk owners and the residual keys the same in both layouts,
    so a restarted run continues exactly where the saved residuals left off (when the bucket holds the same
    parameters in both layouts, as it does with one bucket).
    """
    buffer = bucket.buffer()
    params = bucket.parameters()
    if not param_index:
        return buffer, bucket_key(bucket), lambda _: None
    order = sorted(range(len(params)), key=lambda j: param_index.get(id(params[j]), -1))
    indices = [param_index.get(id(params[j]), -1) for j in order]
    key = f"params-{zlib.crc32(repr(indices).encode()):08x}-n{buffer.numel()}"
    if order == list(range(len(params))):
        return buffer, key, lambda _: None
    grads = bucket.gradients()
    canonical = torch.cat([grads[j].reshape(-1) for j in order])

    def write_back(result: torch.Tensor) -> None:
        offset = 0
        for j in order:
            n = grads[j].numel()
            grads[j].view(-1).copy_(result[offset:offset + n])
            offset += n

    return canonical, key, write_back
