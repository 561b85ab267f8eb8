"""Gradient-compression communication hooks for DistributedDataParallel (MISSION C5).

The INT8 hook keeps the wire 8-bit without overflowing and without growing with the number of ranks
(the Bagua ByteGrad / DeepSpeed ZeRO++ pattern):

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

Collective support, checked on torch 2.13 with gloo: ``all_to_all_single`` (int8 and fp32),
``reduce_scatter_tensor``, ``all_gather_into_tensor`` (int8) and ``all_reduce`` of bf16 all work, so the same
code runs on gloo and NCCL. The hooks run their collectives synchronously from the hook (in DDP's bucket
order, the same on every rank) and return a completed ``torch.futures.Future``.

Byte counting: each hook counts the bytes this rank puts on the wire. For the collectives it runs itself
(all-to-all, all-gather, reduce-scatter) that is exact: ``(W - 1)`` peer messages. For an all-reduce it is
the ring-algorithm volume ``2 (W - 1) / W * numel * itemsize`` (what NCCL's and gloo's ring send per rank).

PowerSGD on gloo (torch 2.13): PyTorch's ``powerSGD_hook`` chains its second and third all-reduces in
future callbacks; with more than one bucket, gloo's callbacks issue collectives from different threads in
different orders on different ranks and the job aborts (``gloo::EnforceNotMet ... Received data size doesn't
match expected size``). No PowerSGDState option fixes it (``warm_start=False``, ``use_error_feedback=False``,
``batch_tensors_with_same_shape=True`` all abort). Waiting for the hook's future inside the hook (one bucket's
collectives finish before the next bucket starts) does, so on gloo we register that synchronous wrapper.
"""

# No `from __future__ import annotations` here: DDP's register_comm_hook checks that a hook's `bucket`
# annotation *is* dist.GradBucket, which string annotations fail.
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from fullchain.errors import UserError

CompressionName = Literal["none", "fp16", "bf16", "powersgd", "int8"]
COMPRESSIONS: tuple[str, ...] = ("none", "fp16", "bf16", "powersgd", "int8")
DEFAULT_CHUNK_SIZE = 256
DEFAULT_COMPRESSION_START_STEP = 10


# ----------------------------------------------------------------------------------------------- counters
@dataclass
class CommStats:
    """What a hook sent. ``bytes_sent`` is the total; ``uncompressed_bytes`` is the part sent in fp32 (warm-up).

    ``intra_node_bytes`` / ``inter_node_bytes`` are only split by the hierarchical hook (flat hooks know no
    topology and leave them 0).
    """

    bytes_sent: int = 0
    uncompressed_bytes: int = 0
    intra_node_bytes: int = 0
    inter_node_bytes: int = 0
    comm_time_s: float = 0.0
    calls: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if hasattr(self, name):
                setattr(self, name, type(getattr(self, name))(value))


def ring_allreduce_bytes(numel: int, itemsize: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``numel`` elements."""
    if world_size <= 1:
        return 0
    return int(round(2 * (world_size - 1) / world_size * numel * itemsize))


def _group_size(group) -> int:
    return dist.get_world_size(group)


def _completed(tensor: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def bucket_key(bucket) -> str:
    """Key for per-bucket state: the bucket index plus a fingerprint of its parameters' shapes.

    DDP rebuilds its buckets after the first iteration (and a resumed process starts again from the initial
    layout), so an index alone may name different parameters over time; with the fingerprint a residual is only
    ever applied to the bucket layout it was computed for.
    """
    shapes = [tuple(p.shape) for p in bucket.parameters()]
    crc = zlib.crc32(repr(shapes).encode())
    return f"b{bucket.index()}-n{bucket.buffer().numel()}-{crc:08x}"


# -------------------------------------------------------------------------------------------- hook states
class HookState:
    """Base of the per-hook state objects: process group, step counter, counters, checkpointable state.

    ``state_dict()`` returns ``{"meta": <JSON-able dict>, "tensors": {name: Tensor}}``;
    ``load_state_dict()`` accepts the same.
    """

    kind = "base"

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.step = 0
        self.stats = CommStats()

    @property
    def world_size(self) -> int:
        return _group_size(self.process_group)

    def counters(self) -> dict[str, Any]:
        return {**self.stats.as_dict(), "step": self.step}

    def _end_iteration(self) -> None:
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"meta": {"kind": self.kind, "step": self.step, "stats": self.stats.as_dict()}, "tensors": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = state.get("meta", {})
        if meta.get("kind", self.kind) != self.kind:
            raise UserError(f"checkpoint holds {meta.get('kind')!r} compression state but this run uses {self.kind!r}")
        self.step = int(meta.get("step", 0))
        self.stats.load(meta.get("stats", {}))


class AllreduceHookState(HookState):
    """State of the counting fp32 (``none``) and fp16 hooks."""

    def __init__(self, process_group=None, dtype: torch.dtype = torch.float32):
        super().__init__(process_group)
        self.dtype = dtype
        self.kind = "none" if dtype == torch.float32 else "fp16"


class Bf16HookState(HookState):
    kind = "bf16"


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


# ------------------------------------------------------------------------------------------- quantisation
def quantize_int8(x: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise rows of ``x`` (shape ``(rows, S * chunk_size)``) with one fp32 scale per sub-chunk.

    Returns ``(q int8 (rows, S * chunk_size), scales fp32 (rows, S))``; ``|x - q * scale| <= scale / 2``.
    """
    rows, cols = x.shape
    v = x.reshape(rows, cols // chunk_size, chunk_size)
    scales = v.abs().amax(dim=-1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(v / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q.reshape(rows, cols), scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, chunk_size: int) -> torch.Tensor:
    rows, cols = q.shape
    v = q.reshape(rows, cols // chunk_size, chunk_size).to(torch.float32) * scales.unsqueeze(-1)
    return v.reshape(rows, cols)


def _pack(q: torch.Tensor, scales: torch.Tensor, length: int) -> torch.Tensor:
    """One int8 message per row: the first ``length`` payload bytes then the fp32 scales as raw bytes."""
    return torch.cat([q[:, :length], scales.contiguous().view(torch.int8)], dim=1).contiguous()


def _unpack(msg: torch.Tensor, length: int, padded: int, chunk_size: int) -> torch.Tensor:
    rows = msg.shape[0]
    q = torch.zeros(rows, padded, dtype=torch.int8)
    q[:, :length] = msg[:, :length]
    scales = msg[:, length:].contiguous().view(torch.float32)
    return dequantize_int8(q, scales, chunk_size)


def chunk_layout(numel: int, world_size: int, chunk_size: int) -> tuple[int, int, int]:
    """``(L, S, Lp)``: chunk length per rank, sub-chunks per chunk, chunk length padded to sub-chunks."""
    length = max(1, math.ceil(numel / world_size))
    subchunks = math.ceil(length / chunk_size)
    return length, subchunks, subchunks * chunk_size


def _int8_allreduce(tensor: torch.Tensor, state: Int8HookState, key: str, group, average: bool) -> tuple[int, bool]:
    """The all-to-all / reduce / re-quantise / all-gather INT8 all-reduce of ``tensor`` in place.

    Returns ``(bytes sent by this rank, whether the result is finite)``.
    """
    world = _group_size(group)
    if world == 1:
        return 0, True
    cs = state.chunk_size
    flat = tensor.view(-1)
    numel = flat.numel()
    length, subchunks, padded = chunk_layout(numel, world, cs)

    # chunk j = flat[j L : (j + 1) L] (the last one zero-padded), each padded to Lp = S * chunk_size
    x = torch.zeros(world, padded, dtype=torch.float32)
    staged = torch.zeros(world * length, dtype=torch.float32)
    staged[:numel] = flat
    x[:, :length] = staged.view(world, length)

    worker_res = state.worker_residuals.get(key) if state.error_feedback else None
    if worker_res is not None and worker_res.shape == x.shape:
        x += worker_res
    q1, s1 = quantize_int8(x, cs)
    if state.error_feedback:
        state.worker_residuals[key] = x - dequantize_int8(q1, s1, cs)

    send = _pack(q1, s1, length)  # (world, length + 4 S)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    reduced = _unpack(recv, length, padded, cs).sum(dim=0, keepdim=True)  # (1, padded), fp32
    if average:
        reduced /= world

    owner_res = state.owner_residuals.get(key) if state.error_feedback else None
    if owner_res is not None and owner_res.shape == (padded,):
        reduced += owner_res
    q2, s2 = quantize_int8(reduced, cs)
    if state.error_feedback:
        state.owner_residuals[key] = (reduced - dequantize_int8(q2, s2, cs)).view(-1)

    mine = _pack(q2, s2, length).view(-1)
    gathered = torch.empty(world * mine.numel(), dtype=torch.int8)
    dist.all_gather_into_tensor(gathered, mine, group=group)
    result = _unpack(gathered.view(world, -1), length, padded, cs)[:, :length].reshape(-1)[:numel]
    flat.copy_(result)

    finite = bool(torch.isfinite(result).all())
    if not finite:  # a non-finite gradient must not poison the residuals for all later steps
        state.worker_residuals.pop(key, None)
        state.owner_residuals.pop(key, None)
    elif state.error_feedback:
        state._touched.add(key)
    return 2 * (world - 1) * send.shape[1], finite


def int8_allreduce_(
    tensor: torch.Tensor, state: Int8HookState, key: str = "tensor", group=None, average: bool = True
) -> torch.Tensor:
    """INT8-compressed all-reduce (mean by default) of an fp32 tensor, in place, with error feedback.

    ``key`` names the residuals of this tensor in ``state``; every rank must use the same key and call in the
    same order. Counts bytes and time in ``state.stats``.
    """
    start = time.perf_counter()
    group = group if group is not None else state.process_group
    sent, _ = _int8_allreduce(tensor, state, key, group, average)
    state.stats.bytes_sent += sent
    state.stats.calls += 1
    state.stats.comm_time_s += time.perf_counter() - start
    return tensor


def _fp32_allreduce_mean_(tensor: torch.Tensor, group) -> int:
    world = _group_size(group)
    dist.all_reduce(tensor, group=group)
    tensor /= world
    return ring_allreduce_bytes(tensor.numel(), tensor.element_size(), world)


# ------------------------------------------------------------------------------------------------- hooks
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
        sent, _ = _int8_allreduce(canonical, state, key, group, average=True)
        write_back(canonical)
    state.stats.bytes_sent += sent
    state.stats.calls += 1
    state.stats.comm_time_s += time.perf_counter() - start
    if bucket.is_last():
        state._end_iteration()
    return _completed(buffer)


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


def bf16_allreduce_(tensor: torch.Tensor, group=None) -> int:
    """Mean all-reduce with a bf16 wire and fp32 accumulation: all-to-all of bf16 chunks, fp32 sum on the
    owner, all-gather of the bf16 result. Returns bytes sent by this rank."""
    world = _group_size(group)
    flat = tensor.view(-1)
    if world == 1:
        return 0
    numel = flat.numel()
    length = max(1, math.ceil(numel / world))
    send = torch.zeros(world * length, dtype=torch.bfloat16)
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
    return _completed(buffer)


def _counting_allreduce_hook(state: AllreduceHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
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
        return _completed(result[0] if isinstance(result, list) else result)

    def _timed(f):
        state.stats.comm_time_s += time.perf_counter() - start
        return f.value()

    return fut.then(_timed)


class PowerSGDHookState(HookState):
    """Wraps PyTorch's ``PowerSGDState``; on gloo the hook waits for each bucket (see the module docstring).

    Bytes are estimated from PowerSGD's own numel counters (compressed P/Q plus uncompressed tensors) with the
    ring all-reduce volume.
    """

    kind = "powersgd"

    def __init__(self, process_group=None, synchronous: bool = False, **powersgd_kwargs):
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        super().__init__(process_group)
        self.synchronous = synchronous
        self.powersgd = powerSGD_hook.PowerSGDState(process_group=process_group, **powersgd_kwargs)

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        ps = self.powersgd
        out["meta"]["iter"] = ps.iter
        rng = ps.rng.get_state()
        out["meta"]["rng"] = [rng[0], int(rng[2]), int(rng[3]), float(rng[4])]
        tensors = {"rng_keys": torch.from_numpy(rng[1].astype("int64"))}
        for name in ("error_dict", "p_memory_dict", "q_memory_dict"):
            for k, v in getattr(ps, name).items():
                tensors[f"{name}/{k}"] = v.detach().clone()
        out["tensors"] = tensors
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import numpy as np

        super().load_state_dict(state)
        ps = self.powersgd
        meta, tensors = state.get("meta", {}), state.get("tensors", {})
        ps.iter = int(meta.get("iter", ps.iter))
        if "rng" in meta and "rng_keys" in tensors:
            name, pos, has_gauss, cached = meta["rng"]
            ps.rng.set_state((name, tensors["rng_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        for name in ("error_dict", "p_memory_dict", "q_memory_dict"):
            store = getattr(ps, name)
            store.clear()
            for k, v in tensors.items():
                if k.startswith(name + "/"):
                    store[int(k.split("/", 1)[1])] = v.clone()


def powersgd_hook(state: PowerSGDHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    start = time.perf_counter()
    ps = state.powersgd
    before = ps.total_numel_after_compression
    fut = powerSGD_hook.powerSGD_hook(ps, bucket)
    after = ps.total_numel_after_compression
    if after > before:  # PowerSGD adds the numel it all-reduces (P, Q and uncompressed tensors)
        numel = after - before
    else:  # its own fp32 warm-up: a plain all-reduce of the bucket
        numel = bucket.buffer().numel()
        state.stats.uncompressed_bytes += ring_allreduce_bytes(numel, 4, state.world_size)
    state.stats.bytes_sent += ring_allreduce_bytes(numel, 4, state.world_size)
    state.stats.calls += 1
    if bucket.is_last():
        state._end_iteration()
    if state.synchronous:
        result = fut.wait()
        state.stats.comm_time_s += time.perf_counter() - start
        return _completed(result)

    def _timed(f):
        state.stats.comm_time_s += time.perf_counter() - start
        return f.value()

    return fut.then(_timed)


# -------------------------------------------------------------------------------------------- registration
def register_compression(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    name: CompressionName,
    process_group=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compression_start_step: int = DEFAULT_COMPRESSION_START_STEP,
    procs_per_node: int | None = None,
    hierarchical: bool = False,
    error_feedback: bool = True,
    powersgd_rank: int = 1,
) -> HookState:
    """Register the communication hook for ``name`` on ``ddp_model`` and return its state object.

    ``hierarchical=True`` (with ``name`` ``none`` or ``int8``) uses the hierarchical all-reduce over nodes of
    ``procs_per_node`` consecutive ranks (default: torchrun's ``LOCAL_WORLD_SIZE``); ``int8`` then compresses the
    inter-node all-reduce.
    """
    if name not in COMPRESSIONS:
        raise UserError(f"distributed.compression must be one of {', '.join(COMPRESSIONS)}; got {name!r}")
    hook: Callable
    state: HookState
    if hierarchical:
        from fullchain.distributed.hierarchical import HierarchicalHookState, build_topology, hierarchical_hook

        if name not in ("none", "int8"):
            raise UserError(f"hierarchical all-reduce supports compression none or int8, not {name!r}")
        if process_group not in (None, dist.group.WORLD):
            raise UserError("hierarchical all-reduce runs over the default (world) process group only")
        topology = build_topology(procs_per_node)
        state = HierarchicalHookState(
            topology,
            int8_inter_node=name == "int8",
            chunk_size=chunk_size,
            compression_start_step=compression_start_step,
            error_feedback=error_feedback,
        )
        hook = hierarchical_hook
    elif name == "int8":
        state = Int8HookState(process_group, chunk_size, compression_start_step, error_feedback)
        state.param_index = {id(p): i for i, p in enumerate(ddp_model.module.parameters())}
        hook = int8_hook
    elif name == "bf16":
        state, hook = Bf16HookState(process_group), bf16_hook
    elif name in ("none", "fp16"):
        dtype = torch.float32 if name == "none" else torch.float16
        state, hook = AllreduceHookState(process_group, dtype), _counting_allreduce_hook
    else:  # powersgd
        backend = dist.get_backend(process_group)
        state = PowerSGDHookState(
            process_group,
            synchronous=backend != "nccl",
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=max(2, compression_start_step),
            use_error_feedback=True,
            warm_start=True,
        )
        hook = powersgd_hook
    ddp_model.register_comm_hook(state, hook)
    return state
