"""What crosses the Checkpointer's boundary: the state the Trainer hands over, and the errors it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fullchain.errors import UserError


class CheckpointError(UserError):
    """A checkpoint could not be written, read or applied; the message names the path and the cause."""


class NoValidCheckpoint(CheckpointError):
    """A resume found checkpoints but none that verifies; the message lists each, why, and the opt-in."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or moved aside (it does not verify); the message says what is wrong with it."""


@dataclass
class TrainingState:
    """What the Trainer hands to `Checkpointer.save` and gets back from `Checkpointer.load`.

    model: ``model.state_dict()`` of the unwrapped model (single process; ignored when saving with
        world size > 1, where the model object goes through torch.distributed.checkpoint).
    optimizer: ``optimizer.state_dict()`` in torch's format (``{"state": {int: {...}}, "param_groups": [...]}``).
    trainer: JSON-able trainer state: step, epoch, samples_seen, sampler position, scheduler, precision,
        RNG states (see `capture_rng_state`), ... Tensors inside are allowed too (stored as safetensors).
    """

    model: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
