"""PyTorch's PowerSGD hook with checkpointable state and byte counting, made safe on gloo.

On gloo (torch 2.13), PyTorch's ``powerSGD_hook`` chains its second and third all-reduces in future callbacks;
with more than one bucket, gloo's callbacks issue collectives from different threads in different orders on
different ranks and the job aborts (``gloo::EnforceNotMet ... Received data size doesn't match expected size``).
No PowerSGDState option fixes it (``warm_start=False``, ``use_error_feedback=False``,
``batch_tensors_with_same_shape=True`` all abort). Waiting for the hook's future inside the hook (one bucket's
collectives finish before the next bucket starts) does, so on gloo the state asks for that synchronous wrapper.
"""

import time
from typing import Any

import torch
import torch.distributed as dist

from fullchain.distributed.comm.counters import ring_allreduce_bytes
from fullchain.distributed.comm.state import HookState, completed


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
        return completed(result)

    def _timed(f):
        state.stats.comm_time_s += time.perf_counter() - start
        return f.value()

    return fut.then(_timed)
