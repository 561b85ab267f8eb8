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
        self._scale = self.scaler.get_scale()  # no host sync: the scaler holds no tensor yet

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step unless the gradients overflowed; an overflow lowers the scale, which is how it is detected.

        The scale before the step is remembered from the previous one, so a step reads the scale from the device
        once (reading it before and after would sync the host twice per step on CUDA).
        """
        self.scaler.step(optimizer)
        self.scaler.update()
        scale = self.scaler.get_scale()
        stepped, self._scale = scale >= self._scale, scale
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
            self._scale = float(state["scaler"].get("scale", self._scale))


PRECISIONS: dict[str, type[Precision]] = {"fp32": Precision, "bf16": BF16, "fp16": FP16}


def make_precision(name: str, device: torch.device) -> Precision:
    return PRECISIONS[name](device)


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of the gradients (inf/NaN when any gradient is), clipped to `max_norm` when set.

    Sharded gradients (DTensors) count whole: the norm of each device mesh's gradients is reduced over its
    ranks, and meshes are combined here, since torch's ``clip_grad_norm_`` cannot mix DTensors of two meshes
    (a tensor-parallel layer's and an FSDP-only layer's). A sparse gradient (an embedding table's looked-up rows)
    counts by its coalesced values, since torch's norms have no sparse kernel; scaling works on it as it is.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for p in params:
        grad = p.grad.coalesce().values() if p.grad.is_sparse else p.grad  # a repeated row's parts add up first
        by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(grad)
    norms = [torch.nn.utils.get_total_norm(grads) for grads in by_mesh.values()]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
