"""Callbacks: objects with methods named after Trainer events, called in registration order.

Events: ``on_train_start(trainer)``, ``on_step_end(trainer, metrics)``, ``on_eval_end(trainer, metrics)``,
``on_epoch_end(trainer, epoch)``, ``on_train_end(trainer, result)``. A callback defines only the events
it cares about; logging and the progress bar are callbacks themselves.
"""

from __future__ import annotations

from typing import Any

EVENTS = ("on_train_start", "on_step_end", "on_eval_end", "on_epoch_end", "on_train_end")


class Callback:
    """Base class; override any subset of the events."""

    def on_train_start(self, trainer: Any) -> None: ...

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None: ...

    def on_eval_end(self, trainer: Any, metrics: dict[str, Any]) -> None: ...

    def on_epoch_end(self, trainer: Any, epoch: int) -> None: ...

    def on_train_end(self, trainer: Any, result: Any) -> None: ...


class CallbackList:
    """Dispatches an event to every callback that implements it."""

    def __init__(self, callbacks: list[Any]):
        for cb in callbacks:
            if not any(callable(getattr(cb, event, None)) for event in EVENTS):
                raise TypeError(f"{cb!r} implements none of the events {', '.join(EVENTS)}")
        self.callbacks = list(callbacks)

    def fire(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            handler = getattr(cb, event, None)
            if handler is not None:
                handler(*args)
