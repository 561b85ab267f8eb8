"""Dynamic batching: concurrent requests share one forward pass.

A request waits at most `max_wait_s` (counted from its arrival) for others to fill a batch of up to
`max_batch_size` requests, and not at all when no other request is on its way (`arriving()` is 0: every
accepted request is already queued), so a lone client pays no batching delay. While a batch runs, the
next one gathers, so under load batches form without waiting. At most `queue_size` requests may wait
for a batch: the next gets `QueueFull` (the server answers 503 with Retry-After) instead of an
ever-growing latency. The forward pass runs on one worker thread, off the event loop, so the server
keeps accepting and answering while the model computes. A request whose item gets a non-finite output
(NaN or infinity: inputs far outside what the model saw, overflowing float32 on the way) fails alone
with `NonFiniteOutput`; the other requests of its batch get their answers.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fullchain.deploy.metrics import VariantMetrics


class QueueFull(Exception):
    """The batch queue holds `queue_size` requests already."""


class NonFiniteOutput(Exception):
    """The model's output for item `index` of the request holds NaN or infinity."""

    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


@dataclass
class _Pending:
    items: list[Any]  # encoded items (token ids, float32 arrays), collated by `infer`
    future: asyncio.Future
    arrival: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """`await submit(items)` -> one answer per item (the task's `postprocess`), computed in a shared batch."""

    def __init__(
        self,
        infer: Callable[[list[Any]], np.ndarray],
        postprocess: Callable[[np.ndarray], list[dict[str, Any]]],
        max_batch_size: int,
        max_wait_s: float,
        queue_size: int,
        metrics: VariantMetrics,
        arriving: Callable[[], int] = lambda: 1,
    ):
        self.infer, self.postprocess = infer, postprocess
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_s
        self.arriving = arriving
        self.queue_size, self.metrics = queue_size, metrics
        self._waiting: deque[_Pending] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Finish every accepted request, then stop the worker."""
        while self._waiting:
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=True)

    def wake(self) -> None:
        """Re-check the batch being gathered (a request that was on its way settled without joining)."""
        if self._arrived is not None:
            self._arrived.set()

    async def submit(self, items: list[Any]) -> list[dict[str, Any]]:
        if len(self._waiting) >= self.queue_size:
            raise QueueFull
        pending = _Pending(items, asyncio.get_running_loop().create_future())
        self._waiting.append(pending)
        self.metrics.queue_depth.set(len(self._waiting))
        self._arrived.set()
        return await pending.future

    async def _next_batch(self) -> list[_Pending]:
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._waiting[0].arrival + self.max_wait_s
        while (len(self._waiting) < self.max_batch_size and self.arriving() > 0
               and (remaining := deadline - time.perf_counter()) > 0):
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        take = min(self.max_batch_size, len(self._waiting))
        batch = [self._waiting.popleft() for _ in range(take)]
        self.metrics.queue_depth.set(len(self._waiting))
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            started = time.perf_counter()
            for pending in batch:
                self.metrics.queue_wait_seconds.observe(started - pending.arrival)
            self.metrics.batch_size.observe(len(batch))
            items = [item for pending in batch for item in pending.items]
            try:
                outputs = await loop.run_in_executor(self._executor, self.infer, items)
            except Exception as exc:  # a model failure answers this batch with 500, the server stays up
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            self.metrics.inference_seconds.observe(time.perf_counter() - started)
            finite = np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
            start = 0
            for pending in batch:
                end = start + len(pending.items)
                if pending.future.done():  # the client went away
                    pass
                elif finite[start:end].all():
                    pending.future.set_result(self.postprocess(outputs[start:end]))
                else:
                    pending.future.set_exception(NonFiniteOutput(int(np.argmin(finite[start:end]))))
                start = end
