"""Numeric precision as a small object the Trainer holds: autocast context, backward and optimiser step.

- fp32: plain backward and step.
- bf16: autocast to bfloat16 (CPU and CUDA); bf16 has fp32's exponent range, so no loss scaling.
- fp16: autocast to float16 with dynamic loss scaling (``torch.amp.GradScaler``); a step whose gradients
  overflow is skipped by the scaler and counted in ``skipped_steps``. fp16 autocast on CPU is very slow on
  most CPUs (measured ~30x slower than fp32 here), so the Trainer warns when it is chosen there.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable

import torch


class Precision:
    """fp32: no autocast, no scaling."""

    name = "fp32"
    dtype: torch.dtype | None = None

    def __init__(self, device: torch.device):
        self.device = device
        self.skipped_steps = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients to their true scale before clipping; a no-op without loss scaling."""

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the update; returns False when the step was skipped (fp16 overflow)."""
        optimizer.step()
        return True

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))


class BF16(Precision):
    name = "bf16"
    dtype = torch.bfloat16


class FP16(Precision):
    """fp16 autocast plus dynamic loss scaling; the scaler's state travels with checkpoints."""

    name = "fp16"
    dtype = torch.float16

    def __init__(self, device: torch.device):
        super().__init__(device)
        if device.type == "cpu":
            warnings.warn(
                "fp16 autocast on CPU is usually far slower than fp32; prefer train.precision: bf16 on CPU",
                stacklevel=2,
            )
        self.scaler = torch.amp.GradScaler(device.type)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= scale_before
        if not stepped:
            self.skipped_steps += 1
        return stepped

    @property
    def loss_scale(self) -> float:
        return float(self.scaler.get_scale())

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


PRECISIONS: dict[str, type[Precision]] = {"fp32": Precision, "bf16": BF16, "fp16": FP16}


def make_precision(name: str, device: torch.device) -> Precision:
    return PRECISIONS[name](device)


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of the gradients (inf/NaN when any gradient is), clipped to `max_norm` when set."""
    params = list(params)
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
