"""Inference latency and peak memory of one forward call, the figures `ds optimize` and `ds bench fusion` report.

Peak memory on CUDA comes from the caching allocator's peak counter. On CPU PyTorch keeps no such
counter, so we read the process's resident-set high-water mark: Linux lets a process reset it
(``/proc/self/clear_refs`` <- ``5``) and report it (``VmHWM`` in ``/proc/self/status``); the peak of a
call is its high-water mark minus the resident size just before it. glibc would otherwise serve the
call from freed blocks that are still resident, hiding its peak, so before each measurement
``malloc_trim(0)`` hands free heap pages back to the kernel, and the mmap threshold is pinned at 64 KiB
(``mallopt``) so large tensors are fresh mappings. Where this is unavailable (not Linux/glibc), memory is None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

_M_MMAP_THRESHOLD = -3
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024) else None
    except (OSError, AttributeError):
        return None


def _status_bytes(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def cpu_peak_supported() -> bool:
    return _STATUS.exists() and _CLEAR_REFS.exists() and _libc() is not None


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int | None:
    """Extra memory at the peak of ``fn()`` over what was in use when it started."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if not cpu_peak_supported():
        return None
    _libc().malloc_trim(0)
    start = _status_bytes("VmRSS:")
    _CLEAR_REFS.write_text("5")
    fn()
    return max(0, _status_bytes("VmHWM:") - start)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def latency_samples(fn: Callable[[], object], repeats: int, warmup: int = 2,
                    device: torch.device | str = "cpu") -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - started)
    return samples


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def median_p99_ms(samples: list[float]) -> tuple[float, float]:
    """Median and 99th percentile (nearest rank) of latency samples in seconds, as milliseconds."""
    ms = sorted(s * 1e3 for s in samples)
    return statistics.median(ms), ms[min(len(ms) - 1, int(0.99 * len(ms)))]


@dataclass(frozen=True)
class PairedLatency:
    """Two callables timed in alternation: medians per call, the median of per-round ratios, rounds and threads."""

    before_ms: float
    after_ms: float
    ratio: float  # median over rounds of after / before: above 1 means slower
    rounds: int
    calls_per_round: int
    threads: int

    def to_json(self) -> dict[str, float | int]:
        return {"before_ms": round(self.before_ms, 4), "after_ms": round(self.after_ms, 4),
                "after_vs_before": round(self.ratio, 4), "rounds": self.rounds,
                "calls_per_round": self.calls_per_round, "threads": self.threads}


def paired_latency(before: Callable[[], object], after: Callable[[], object], rounds: int = 7,
                   min_round_s: float = 0.005, device: torch.device | str = "cpu") -> PairedLatency:
    """Time ``before`` and ``after`` alternately; the order swaps every round, so neither always runs second.

    A round times enough back-to-back calls of one callable to last ``min_round_s``, so that a millisecond model
    is not judged by scheduler noise. Calls are counted from the fastest of three warm-up calls of each: a first
    call (lazy initialisation, a freshly captured graph) or one preempted call would otherwise size the rounds
    down to a single call.
    """
    fns = {"before": before, "after": after}

    def seconds(fn: Callable[[], object]) -> float:
        started = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - started

    warm = [min(seconds(fn) for _ in range(3)) for fn in fns.values()]
    # enough calls for the faster one's round to last min_round_s, but the slower one's no longer than 10x that
    calls = max(1, min(1000, math.ceil(min_round_s / max(min(warm), 1e-6)),
                       math.ceil(10 * min_round_s / max(max(warm), 1e-6))))
    times: dict[str, list[float]] = {"before": [], "after": []}
    for i in range(rounds):
        for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
            started = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - started) / calls)
    ratios = [a / b for a, b in zip(times["after"], times["before"], strict=True) if b > 0]
    return PairedLatency(median_ms(times["before"]), median_ms(times["after"]),
                         statistics.median(ratios) if ratios else 1.0, rounds, calls, torch.get_num_threads())
