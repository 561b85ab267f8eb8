"""A shuffling sampler that can resume mid-epoch and shard across data-parallel ranks.

Epoch `e`'s order is ``torch.randperm(n)`` drawn from a generator seeded with ``seed + e``, so any rank can
recompute any epoch's order from two integers, and resuming needs only (epoch, samples already consumed).
torch's own RandomSampler keeps a running generator whose state depends on every earlier epoch, and its
DistributedSampler cannot start mid-epoch; that is why this one exists.

With `world_size > 1` every rank takes the same permutation, padded by wrapping so it divides evenly, and
keeps positions ``rank, rank + world_size, ...`` (as DistributedSampler does).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if num_samples <= 0:
            raise ValueError("ResumableSampler needs a non-empty dataset")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0  # this rank's samples to skip at the start of the current epoch (resume)

    @property
    def per_rank(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def order(self, epoch: int) -> list[int]:
        """All indices this rank visits in `epoch`, in order."""
        if self.shuffle:
            perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            perm = torch.arange(self.num_samples)
        total = self.per_rank * self.world_size
        if total > self.num_samples:  # wrap around so every rank gets the same count
            perm = torch.cat([perm, perm[: total - self.num_samples]])
        return perm[self.rank : total : self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        indices = self.order(self.epoch)[self.skip :]
        self.skip = 0
        return iter(indices)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start `epoch` on the next iteration, skipping its first `skip` samples (of this rank)."""
        self.epoch = epoch
        self.skip = skip
