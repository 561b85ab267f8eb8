"""Turn SIGTERM / SIGINT into a request to stop at the next step boundary, so a checkpoint can be saved.

A scheduler's SIGTERM (Kubernetes, SLURM, torchrun shutting a group down) must not kill the process in the
middle of a step or a checkpoint write. Inside `StopSignals`, the first signal only sets `requested`;
a second one restores the default handler's behaviour and interrupts at once. Outside the main thread
(where Python cannot install handlers) it does nothing.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:  # second signal: give up waiting for the step boundary
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
