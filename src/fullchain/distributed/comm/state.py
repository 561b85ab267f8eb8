"""What every DDP communication hook shares: its state base class, the per-bucket state key, its return value.

A hook's state object holds the process group, counts optimiser steps (one per backward pass: the last bucket
ends the iteration), keeps a :class:`~fullchain.distributed.comm.counters.CommStats` and turns what must survive a
restart into ``{"meta": <JSON-able dict>, "tensors": {name: Tensor}}`` for the checkpoint.
"""

import zlib
from typing import Any

import torch
import torch.distributed as dist

from fullchain.distributed.comm.counters import CommStats
from fullchain.errors import UserError


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
        return dist.get_world_size(self.process_group)

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


def bucket_key(bucket) -> str:
    """Key for per-bucket state: the bucket index plus a fingerprint of its parameters' shapes.

    DDP rebuilds its buckets after the first iteration (and a resumed process starts again from the initial
    layout), so an index alone may name different parameters over time; with the fingerprint a residual is only
    ever applied to the bucket layout it was computed for.
    """
    shapes = [tuple(p.shape) for p in bucket.parameters()]
    crc = zlib.crc32(repr(shapes).encode())
    return f"b{bucket.index()}-n{bucket.buffer().numel()}-{crc:08x}"


def completed(tensor: torch.Tensor) -> torch.futures.Future:
    """A future already holding ``tensor``: what a hook that ran its collectives synchronously hands DDP."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(tensor)
    return fut
