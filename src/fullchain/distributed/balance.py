"""Dynamic load balancing: each data-parallel rank's share of the global batch follows its measured speed.

Uniform data parallelism gives every rank ``batch_size`` samples, so every step waits for the slowest rank.
Here every rank reads the same global batch order (``batch_size x data ranks`` samples a step, the epoch's
permutation from the seed, as `ResumableSampler` draws it) and takes its own contiguous slice, sized by
`LoadBalancer.sizes`. The gradient stays exactly the uniform one: each rank weighs its loss sum by the
*global* target count (one all-reduce of a scalar), so the sum over ranks is the loss over the whole global
batch whatever the split.

Speed must be measured where no collective can hide it, or every rank would measure the slowest rank's time:

- DDP (`LoadBalancer`): each rank times its own forward and backward with the gradient sync deferred
  (``no_sync``), then the gradients are summed in one explicit all-reduce.
- FSDP2 (`ShardedLoadBalancer`): parameters are gathered inside the forward and gradients reduce-scattered
  inside the backward, so collectives cannot be moved out of the step. `ForwardClock` times each FSDP2
  module's pre-forward hook (the all-gather, and the wait for slower ranks that comes with it) and counts the
  rest of the forward as this rank's compute; the backward's collectives are FSDP2's own, and the forward's
  speed stands for the whole step's (a rank that is slower per sample is slower in both). FSDP2 averages
  gradients over the data ranks, so each rank's loss weight is multiplied by their number.

Every ``every_steps`` steps the ranks all-gather (samples, seconds) and all compute the same new split,
proportional to throughput, never below ``min_share`` of the global batch. Tensor parallelism (strategy
hybrid) is not balanced: the ranks of one tensor group share a batch and wait for each other in every layer.

No library balances data-parallel work across ranks of unequal speed (torch's Join only evens out the
number of batches), hence this module.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import Sampler

from fullchain import metric_names as M

SHARE_METRIC = M.TRAIN_RANK_BATCH_SAMPLES  # metrics.jsonl: train_rank_batch_samples_rank<R> per data rank


def split(total: int, weights: list[float], min_share: float = 0.0) -> list[int]:
    """`total` samples split proportionally to `weights` (largest remainder), each rank at least
    ``max(1, floor(min_share * total))`` (taken from the largest shares); the sizes always sum to `total`."""
    n = len(weights)
    least = min(total // n, max(1, math.floor(min_share * total)))
    weight_sum = sum(weights)
    exact = [total * w / weight_sum for w in weights] if weight_sum > 0 else [total / n] * n
    sizes = [math.floor(x) for x in exact]
    for i in sorted(range(n), key=lambda i: (sizes[i] - exact[i], i))[: total - sum(sizes)]:
        sizes[i] += 1
    for i in range(n):
        while sizes[i] < least:
            sizes[max(range(n), key=sizes.__getitem__)] -= 1
            sizes[i] += 1
    return sizes


class UniformSplit:
    """Plain data parallelism: every rank its fixed micro-batch, the wrapper's own gradient sync (the default)."""

    def __init__(self, strategy):
        self.strategy = strategy

    def step_targets(self, local_targets: int, device: torch.device) -> float:
        return local_targets

    def micro_batch(self, model: torch.nn.Module, samples: int, last: bool) -> contextlib.AbstractContextManager:
        return self.strategy.sync_gradients(model, sync=last)

    def finish(self, model: torch.nn.Module, step_loss: torch.Tensor) -> torch.Tensor:
        return step_loss

    def maybe_rebalance(self, step: int) -> bool:
        return False

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""


class LoadBalancer:
    """The current split of each global batch over the data ranks, re-measured every `every_steps` steps."""

    def __init__(self, global_batch: int, data_rank: int, data_world_size: int, every_steps: int = 10,
                 min_share: float = 0.05):
        self.global_batch = global_batch
        self.rank, self.world_size = data_rank, data_world_size
        self.every_steps, self.min_share = every_steps, min_share
        self.sizes = split(global_batch, [1.0] * data_world_size)
        self._samples, self._seconds = 0, 0.0

    def slice_of(self, batch_len: int) -> slice:
        """This rank's part of a global batch of `batch_len` samples (the epoch's last batch may be short)."""
        sizes = self.sizes if batch_len == self.global_batch else split(batch_len, self.sizes)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def step_targets(self, local_targets: int, device: torch.device) -> float:
        """The loss denominator: targets of the whole global batch (all ranks' micro-batches of this step)."""
        total = torch.tensor([float(local_targets)], device=device)
        dist.all_reduce(total)
        return float(total.item())

    @contextlib.contextmanager
    def micro_batch(self, model: torch.nn.Module, samples: int, last: bool) -> Iterator[None]:
        """Forward and backward of `samples` samples with the sync deferred, timed: this rank's own speed."""
        with model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext():
            start = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - start
        self._samples += samples

    def finish(self, model: torch.nn.Module, step_loss: torch.Tensor) -> torch.Tensor:
        """Sum gradients and loss over the ranks in one all-reduce (each rank's loss carries its global
        weight already); returns the global batch's loss."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads] + [step_loss.reshape(1).to(torch.float32)])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[-1]

    def maybe_rebalance(self, step: int) -> bool:
        """Every `every_steps` steps: a new split from every rank's measured throughput (collective)."""
        if step % self.every_steps:
            return False
        mine = torch.tensor([float(self._samples), self._seconds], dtype=torch.float64)
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        speeds = [float(s / t) if t > 0 else 0.0 for s, t in (g.tolist() for g in gathered)]
        self._samples, self._seconds = 0, 0.0
        if min(speeds) <= 0:
            return False
        new = split(self.global_batch, speeds, self.min_share)
        changed, self.sizes = new != self.sizes, new
        return changed

    def metrics(self) -> dict[str, float]:
        return {f"{SHARE_METRIC}_rank{r}": float(n) for r, n in enumerate(self.sizes)}

    def state_dict(self) -> dict:
        return {"sizes": list(self.sizes)}

    def load_state_dict(self, state: dict) -> None:
        sizes = state.get("sizes")
        if sizes and len(sizes) == self.world_size and sum(sizes) == self.global_batch:
            self.sizes = list(sizes)


class ForwardClock:
    """Seconds of forward computation on this rank, without the time FSDP2 spends gathering parameters.

    Every FSDP2 module's pre-forward hook (its all-gather and the wait for the other ranks) is timed; the
    root's whole forward minus those waits is this rank's own work, which is what differs between ranks.
    """

    def __init__(self, model: torch.nn.Module):
        self.compute_seconds = 0.0
        self._gather_seconds = 0.0
        self._root_start = 0.0
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # FSDP2 keeps its pre-forward hook's handle on the module's state; the hook is swapped for a
                # timed copy in place, so it keeps its position among the module's hooks.
                hook_id = module._get_fsdp_state()._pre_forward_hook_handle.id
                module._forward_pre_hooks[hook_id] = self._timed(module._forward_pre_hooks[hook_id])
        model.register_forward_pre_hook(self._root_called, prepend=True)
        model.register_forward_hook(self._root_done)

    def _timed(self, hook: Callable) -> Callable:
        @functools.wraps(hook)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self._gather_seconds += time.perf_counter() - start
        return timed

    def _root_called(self, module: torch.nn.Module, args: tuple) -> None:
        self._gather_seconds = 0.0
        self._root_start = time.perf_counter()

    def _root_done(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        self.compute_seconds += time.perf_counter() - self._root_start - self._gather_seconds


class ShardedLoadBalancer(LoadBalancer):
    """`LoadBalancer` under FSDP2: FSDP2's own reduce-scatter (an average over the data ranks), speed from
    `ForwardClock`."""

    def __init__(self, global_batch: int, data_rank: int, data_world_size: int, every_steps: int = 10,
                 min_share: float = 0.05, *, strategy):
        super().__init__(global_batch, data_rank, data_world_size, every_steps, min_share)
        self.strategy = strategy
        self._clock: ForwardClock | None = None

    def step_targets(self, local_targets: int, device: torch.device) -> float:
        """The global batch's targets over the data ranks: FSDP2 divides the summed gradient by their number."""
        return super().step_targets(local_targets, device) / self.world_size

    @contextlib.contextmanager
    def micro_batch(self, model: torch.nn.Module, samples: int, last: bool) -> Iterator[None]:
        if self._clock is None:
            self._clock = ForwardClock(model)
        before = self._clock.compute_seconds
        with self.strategy.sync_gradients(model, sync=last):
            yield
        self._seconds += self._clock.compute_seconds - before
        self._samples += samples

    def finish(self, model: torch.nn.Module, step_loss: torch.Tensor) -> torch.Tensor:
        """The global batch's loss (the gradients are already reduced by FSDP2)."""
        total = step_loss.detach().reshape(1).to(torch.float32)
        dist.all_reduce(total)
        return total[0] / self.world_size


class BalancedBatchSampler(Sampler[list[int]]):
    """This rank's slice of each global batch of the epoch's permutation; resumable at a step boundary."""

    def __init__(self, num_samples: int, seed: int, balancer: LoadBalancer):
        if num_samples <= 0:
            raise ValueError("BalancedBatchSampler needs a non-empty dataset")
        self.num_samples, self.seed, self.balancer = num_samples, seed, balancer
        self.epoch, self.skip_batches = 0, 0

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.balancer.global_batch) - self.skip_batches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        size = self.balancer.global_batch
        start, self.skip_batches = self.skip_batches * size, 0
        for begin in range(start, self.num_samples, size):
            batch = perm[begin: begin + size]
            if len(batch) < self.balancer.world_size:
                return  # too short to give every rank a sample
            yield batch[self.balancer.slice_of(len(batch))].tolist()  # the split as of this step
